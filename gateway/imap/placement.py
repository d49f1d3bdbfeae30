"""Which live node tails which mailbox: rendezvous hashing with bounded loads.

Every node computes the same answer from the same inputs (the accounts to tail and the
live nodes, both read from the store), so no coordinator is needed: a node takes leases
only on the mailboxes :func:`place` gives it and lets go of the others. The leases stay
the guarantee that two nodes never tail one mailbox at once; this only decides who
should try.

Rendezvous (highest-random-weight) hashing ranks the nodes for each account by a hash of
(node, account); an account goes to its best-ranked node that still has room. The room
is exact: with A accounts and N nodes, A mod N nodes (the first in id order) take
ceil(A/N) and the others floor(A/N), so the counts never differ by more than one. When a
node joins or leaves, most accounts keep their node (those whose first choice is
unchanged and not over capacity).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable

__all__ = ["place"]


def _weight(node: str, account: str) -> int:
    digest = hashlib.blake2b(f"{node}\0{account}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _by_weight(account: str, node: str) -> int:
    return _weight(node, account)


def place(accounts: Iterable[str], nodes: Iterable[str]) -> dict[str, str]:
    """Account id -> node id for every account (nothing when there is no node)."""
    live = sorted(set(nodes))
    todo = sorted(set(accounts))
    if not live or not todo:
        return {}
    base, extra = divmod(len(todo), len(live))
    room = {n: base + (1 if i < extra else 0) for i, n in enumerate(live)}
    # accounts whose preference is strongest go first, so that a node's capacity is used by
    # the accounts that want it most (and stays put as other accounts come and go)
    ranked = {a: sorted(live, key=functools.partial(_by_weight, a), reverse=True) for a in todo}
    order = sorted(todo, key=lambda a: (-_weight(ranked[a][0], a), a))
    out: dict[str, str] = {}
    for a in order:
        for n in ranked[a]:
            if room[n] > 0:
                room[n] -= 1
                out[a] = n
                break
    return out
