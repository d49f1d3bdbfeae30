"""The SMTP edge: the submission and ingest listeners (TLS, AUTH, limits, reply codes)."""
