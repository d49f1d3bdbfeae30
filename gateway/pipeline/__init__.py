"""Outbound message stages; each only changes the message, DKIM is always last."""
