"""IMAP two-way sync: the connection layer (`client`, `protocol`) and OAuth2 tokens (`oauth`)."""
