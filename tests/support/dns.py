"""A tiny authoritative DNS server on 127.0.0.1 (UDP, free port) answering from a dict.

    zone = {
        "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.1"]},
        "alias.example.test": {"CNAME": ["mx1.example.test"]},
    }
    async with DNSServer(zone) as dns_server:
        resolver = MXResolver(nameservers=[dns_server.host], port=dns_server.port)

Answers: the records of the asked type (following CNAMEs within the dict); NOERROR
with no answer (NODATA) for a known name without that type; NXDOMAIN for a name
not in the dict. Names are case-insensitive, with or without the final dot.

Record values: MX `(preference, exchange)` or `"10 mx.example.test"`; `"."` as the
exchange makes a null MX (RFC 7505). A, AAAA, CNAME, TXT, and any other type: the
text form of the record data (`"127.0.0.1"`, `"v=spf1 -all"`).

It binds a free port on 127.0.0.1 unless given `host` and `port` (a resolver that
cannot be told a port, like the daemon's `delivery.nameservers`, needs port 53 on a
loopback address of its own; binding it takes root).

Failures on demand: names in `servfail` get SERVFAIL, names in `silent` get no
answer at all (the client times out); `"*"` in either set means every name.
`queries` records every (name, type) asked, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

__all__ = ["DNSServer"]

Zone = Mapping[str, Mapping[str, Sequence[Any]]]


def _key(name: str | dns.name.Name) -> str:
    text = name.to_text() if isinstance(name, dns.name.Name) else name
    return text.rstrip(".").lower()


def _absolute(name: str) -> str:
    return name if name.endswith(".") else name + "."


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            query = dns.message.from_wire(data)
        except Exception:  # not DNS: a real server would ignore it too
            return
        response = self.server.answer(query)
        if response is not None and self.transport is not None:
            self.transport.sendto(response.to_wire(), addr)


class DNSServer:
    """UDP DNS server for tests; see the module docstring."""

    host = "127.0.0.1"

    def __init__(self, records: Zone | None = None, *, ttl: int = 60, host: str | None = None,
                 port: int = 0) -> None:
        self.ttl = ttl
        if host is not None:
            self.host = host
        self.records: dict[str, dict[str, list[Any]]] = {}
        for name, types in (records or {}).items():
            for rdtype, values in types.items():
                self.add(name, rdtype, *values)
        self.servfail: set[str] = set()
        self.silent: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self.port = port
        self._transport: asyncio.DatagramTransport | None = None

    def add(self, name: str, rdtype: str, *values: Any) -> None:
        """Add records (an empty call makes the name exist with no records: NODATA)."""
        self.records.setdefault(_key(name), {}).setdefault(rdtype.upper(), []).extend(values)

    def remove(self, name: str) -> None:
        self.records.pop(_key(name), None)

    # -- life cycle -----------------------------------------------------------------------
    async def start(self) -> DNSServer:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=(self.host, self.port))
        self._transport = transport
        self.port = int(transport.get_extra_info("sockname")[1])
        return self

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def __aenter__(self) -> DNSServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- answering ------------------------------------------------------------------------
    def _matches(self, names: Iterable[str], key: str) -> bool:
        return any(n == "*" or _key(n) == key for n in names)

    def answer(self, query: dns.message.Message) -> dns.message.Message | None:
        """The response to `query`, or None to stay silent."""
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        q = query.question[0]
        qkey = _key(q.name)
        qtype = dns.rdatatype.to_text(q.rdtype)
        self.queries.append((qkey, qtype))
        if self._matches(self.silent, qkey):
            return None
        if self._matches(self.servfail, qkey):
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        name, key = q.name, qkey
        for _ in range(8):  # follow CNAMEs inside the zone
            types = self.records.get(key)
            if types is None:
                if key == qkey:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                return response
            if qtype != "CNAME" and "CNAME" in types:
                target = _absolute(str(types["CNAME"][0]))
                response.answer.append(self._rrset(name, "CNAME", [target]))
                name, key = dns.name.from_text(target), _key(target)
                continue
            values = types.get(qtype)
            if values:
                response.answer.append(self._rrset(name, qtype, values))
            return response
        response.set_rcode(dns.rcode.SERVFAIL)  # a CNAME loop
        return response

    def _rrset(self, name: dns.name.Name, rdtype: str, values: Sequence[Any]) -> dns.rrset.RRset:
        texts = [self._text(rdtype, v) for v in values]
        return dns.rrset.from_text_list(name, self.ttl, dns.rdataclass.IN, rdtype, texts)

    @staticmethod
    def _text(rdtype: str, value: Any) -> str:
        if rdtype == "MX" and isinstance(value, tuple):
            pref, exchange = value
            return f"{int(pref)} {_absolute(str(exchange))}"
        if rdtype == "MX":
            pref, _, exchange = str(value).partition(" ")
            return f"{pref} {_absolute(exchange.strip())}"
        if rdtype in ("CNAME", "NS", "PTR"):
            return _absolute(str(value))
        if rdtype == "TXT" and not str(value).startswith('"'):
            return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        return str(value)
