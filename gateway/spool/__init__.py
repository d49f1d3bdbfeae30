"""The durable spool (see gateway.spool.spool)."""

from gateway.ids import new_queue_id, valid_queue_id
from gateway.spool.spool import (
    STATES,
    CorruptQueueFile,
    Envelope,
    Recipient,
    Spool,
)

__all__ = ["STATES", "CorruptQueueFile", "Envelope", "Recipient", "Spool", "new_queue_id",
           "valid_queue_id"]
