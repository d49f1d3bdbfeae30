"""Integration tests: the gateway against real peers on loopback (upstreams, PostgreSQL, Dovecot)."""
