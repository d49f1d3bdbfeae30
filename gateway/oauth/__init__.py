"""OAuth 2.0 and OpenID Connect values: provider endpoints, PKCE, signed state, SASL bytes (no I/O)."""
