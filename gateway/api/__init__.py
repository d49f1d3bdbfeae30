"""The admin surface over HTTP: the read API, /metrics and /healthz, and webhook delivery."""
