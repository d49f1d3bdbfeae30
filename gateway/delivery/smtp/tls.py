"""Client TLS contexts for outbound SMTP: verified against a CA file (or the system
store) or not verified at all, built off the event loop once per kind and cached."""

from __future__ import annotations

import asyncio
import ssl

from gateway.delivery.smtp.failures import Failure, errno_text
from gateway.delivery.transport import Destination


def make_client_context(ca_file: str | None, verify: bool) -> ssl.SSLContext:
    """A client context: verified against `ca_file` (or the system store), or not at all."""
    if not verify:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=ca_file)


class TLSContexts:
    """One context per (CA file, verify) pair, loaded in a thread on first use."""

    def __init__(self) -> None:
        self._contexts: dict[tuple[str | None, bool], ssl.SSLContext] = {}

    async def get(self, dest: Destination) -> ssl.SSLContext:
        """The context `dest` asks for ('opportunistic' never verifies); a CA file that
        cannot be read is a temporary 4.7.5 failure."""
        verify = dest.verify and dest.tls != "opportunistic"
        key = (dest.ca_file if verify else None, verify)
        ctx = self._contexts.get(key)
        if ctx is None:
            try:
                ctx = await asyncio.to_thread(make_client_context, key[0], verify)
            except (OSError, ssl.SSLError) as exc:
                raise Failure(451, "4.7.5", f"cannot set up TLS for {dest.where}: "
                              f"{errno_text(exc)} ({dest.ca_file})") from None
            self._contexts[key] = ctx
        return ctx
