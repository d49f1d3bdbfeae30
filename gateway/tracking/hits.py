"""A classified open or click (`Hit`) and the two protocols the tracking endpoint records through.

`HitSink` is where classified hits go (the CRM store records them as events),
`CopyLookup` what the store knows about a recipient's copy; the in-memory versions
serve the tests and benchmarks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from gateway.tracking.classify import Category, CopyInfo, Kind


@dataclass(frozen=True)
class Hit:
    """One recorded open or click, classified; what the sink stores as an event."""

    id: str                       # unique per request (idempotent store writes)
    kind: Kind                    # open | click | honeypot
    copy_id: str                  # spool queue id of the recipient's copy
    link: int                     # link number (0 for opens)
    url: str | None               # the original URL for clicks
    at: float                     # Unix time of the request
    ip: str | None                # client address (after trusted X-Forwarded-For)
    user_agent: str
    referer: str
    headers: Mapping[str, str]    # HEADERS_OF_INTEREST that were present
    machine: bool
    category: Category            # human, proxied, proxy, scanner, bot, sender, timing, burst, ...
    reason: str | None            # why it is a machine; None for people
    recipient: str | None = None  # from the copy lookup, when known
    sender: str | None = None
    message_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["headers"] = dict(self.headers)
        return d


class HitSink(Protocol):
    """Where classified hits go (the CRM store records them as opened/clicked events)."""

    async def record_hit(self, hit: Hit) -> None: ...


class CopyLookup(Protocol):
    """What the store knows about copies: recipient, sender, delivery time, links, hits.

    One call answers for many copies (the endpoint looks up a batch of hits at once);
    an unknown copy is None or missing from the answer."""

    async def copy_infos(self, copy_ids: Sequence[str]) -> Mapping[str, CopyInfo | None]: ...


# -- in-memory implementations (tests, benchmarks) ------------------------------------------


class MemoryHitSink:
    """Keeps hits in a list; `fail` makes record_hit raise (to test failure handling)."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self.fail = False
        self.changed = asyncio.Event()

    async def record_hit(self, hit: Hit) -> None:
        if self.fail:
            raise RuntimeError("sink is down")
        self.hits.append(hit)
        self.changed.set()


class MemoryCopyLookup:
    """Copies in a dict; unknown ids are None; `fail` makes the lookup raise."""

    def __init__(self, copies: Iterable[CopyInfo] = ()) -> None:
        self.copies = {c.copy_id: c for c in copies}
        self.fail = False

    def add(self, copy: CopyInfo) -> None:
        self.copies[copy.copy_id] = copy

    async def copy_infos(self, copy_ids: Sequence[str]) -> Mapping[str, CopyInfo | None]:
        if self.fail:
            raise RuntimeError("store is down")
        return {c: self.copies.get(c) for c in copy_ids}
