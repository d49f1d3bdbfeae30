"""The durable spool (see gateway.spool.spool)."""

from gateway.spool.spool import (
    STATES,
    CorruptQueueFile,
    Envelope,
    Recipient,
    Spool,
    new_queue_id,
    valid_queue_id,
)

__all__ = ["STATES", "CorruptQueueFile", "Envelope", "Recipient", "Spool", "new_queue_id",
           "valid_queue_id"]
