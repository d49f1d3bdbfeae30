"""The SASL initial responses that carry an OAuth 2.0 bearer token (IMAP and SMTP alike).

    xoauth2("alice@example.com", token)                    # Google's and Microsoft's XOAUTH2
    oauthbearer("alice@example.com", token, host, port)    # RFC 7628 OAUTHBEARER

Both return the raw bytes; the protocol client base64-encodes them.
"""

from __future__ import annotations

__all__ = ["MECHANISMS", "initial_response", "oauthbearer", "xoauth2"]

#: the OAuth SASL mechanisms, as configured (`auth.mechanism`) and as servers name them
MECHANISMS = {"xoauth2": "XOAUTH2", "oauthbearer": "OAUTHBEARER"}


def xoauth2(username: str, token: str) -> bytes:
    """`user=U ^A auth=Bearer T ^A ^A` (Google's XOAUTH2, which Microsoft also takes)."""
    return f"user={username}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer(username: str, token: str, host: str, port: int) -> bytes:
    """RFC 7628 section 3.1: a GS2 header with the authorization identity, then key=value pairs."""
    gs2 = f"n,a={username.replace('=', '=3D').replace(',', '=2C')},"
    return f"{gs2}\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01".encode()


def initial_response(mechanism: str, username: str, token: str, host: str, port: int) -> bytes:
    """The bytes for `mechanism` ("xoauth2" or "oauthbearer", either case)."""
    m = mechanism.lower()
    if m == "xoauth2":
        return xoauth2(username, token)
    if m == "oauthbearer":
        return oauthbearer(username, token, host, port)
    raise ValueError(f"{mechanism!r} is not an OAuth SASL mechanism (xoauth2, oauthbearer)")
