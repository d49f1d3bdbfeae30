"""mailgw: a CRM mail gateway (submission relay, durable spool, delivery, CRM store)."""

__version__ = "0.1.0"
