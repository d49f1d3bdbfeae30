"""Connected accounts as a service: declared and stored accounts, OAuth grants and tokens, connect links."""
