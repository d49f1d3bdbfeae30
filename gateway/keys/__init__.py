"""Key material the gateway loads or keeps: DKIM private keys, the cipher for stored OAuth tokens."""
