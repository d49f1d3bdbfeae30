"""Outbound delivery: the scheduler (retry, expiry, DSN) and its primitives.

`transport` speaks SMTP to one destination (pooled connections, one result per
recipient), `mx` turns a domain into mail exchangers through DNS, `dsn` writes
RFC 3464 bounce messages. Import the submodules directly; this package imports
nothing on purpose (no import-time side effects, no cycles with the scheduler).
"""
