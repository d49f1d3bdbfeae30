"""The CRM store: messages, per-recipient events, and their schema migrations."""
