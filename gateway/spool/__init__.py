"""The durable spool (see gateway.spool.spool)."""

from gateway.ids import new_queue_id, valid_queue_id
from gateway.spool.spool import (
    QUEUED_STATES,
    STATES,
    CorruptQueueFile,
    Envelope,
    Recipient,
    Spool,
    outcome_event,
    outcome_events,
)

__all__ = ["QUEUED_STATES", "STATES", "CorruptQueueFile", "Envelope", "Recipient", "Spool",
           "new_queue_id", "outcome_event", "outcome_events", "valid_queue_id"]
