"""Pure match predicates for policy rules: compiled globs over one recipient's envelope and headers.

A rule's `match` is compiled once, when the policies are loaded, into a `Matcher`;
`Matcher(ctx)` answers for one `Context` (the sender, one recipient, the SMTP AUTH
user, the account and, after DATA, the message headers). Nothing here does I/O.

Semantics (the contract `policies/*.yaml` documents):

- **Globs** follow Python's `fnmatch` and are case-insensitive: `*` matches any run of
  characters (also `@` and `.`), `?` one character, `[abc]` one of the set, `[!abc]`
  one not in it. A pattern without `*?[` is compared literally (and faster).
- `sender`, `recipient`: globs on the whole address (`*@sales.example.com`). The null
  sender `<>` is the empty string (so only `*` matches it).
- `sender_domain`, `recipient_domain`: globs on the domain after the last `@`.
  `example.com` matches that domain exactly; `*.example.com` matches every subdomain
  but not `example.com` itself (list both for both).
- `user`: globs on the SMTP AUTH login; mail without a login (a trusted network)
  never matches a `user` key. `account`: globs on the account id of that user.
- `header`: `{name: X-Campaign, value: "spring-*"}` or a list of them. The field name
  is compared case-insensitively; the value glob applies to the unfolded value (RFC
  5322 folding removed, RFC 2047 encoded words decoded, outer whitespace stripped);
  the item matches if any field of that name matches. `value` defaults to `*`
  (the field is present). Before DATA no headers are known and `header` never matches.
- A list is any-of; several keys in one `match` are all-of; no keys match everything.
- `not: {...}`: the rule matches only if that nested match does not (so
  `not: {recipient: [a, b]}` excludes both a and b).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from gateway.mail.addresses import domain_of
from gateway.mail.text import decode_words

_WILDCARDS = frozenset("*?[")


def is_literal(pattern: str) -> bool:
    """True when `pattern` has no glob wildcard (`*`, `?`, `[`)."""
    return not (_WILDCARDS & set(pattern))


class GlobSet:
    """Any-of a list of case-insensitive globs; literals in a set, wildcards in one regex."""

    __slots__ = ("_literals", "_regex", "patterns")

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns: tuple[str, ...] = tuple(patterns)
        lowered = [p.lower() for p in self.patterns]
        self._literals = frozenset(p for p in lowered if is_literal(p))
        wild = [fnmatch.translate(p) for p in lowered if not is_literal(p)]
        self._regex = re.compile("|".join(wild), re.IGNORECASE).match if wild else None

    def match_lower(self, value: str) -> bool:
        """Match an already lower-cased value (the hot path)."""
        if value in self._literals:
            return True
        return self._regex is not None and self._regex(value) is not None

    def __call__(self, value: str) -> bool:
        return self.match_lower(value.lower())

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def __repr__(self) -> str:
        return f"GlobSet({list(self.patterns)!r})"


def url_skipped(url: str, globs: Sequence[str]) -> bool:
    """Whether `url` matches a `skip_links` glob: case-insensitively, against the whole URL
    or against it without its ``scheme://`` (so ``*.example.com/*`` and
    ``https://example.com/unsubscribe*`` both work)."""
    if not globs:
        return False
    low = url.lower()
    bare = low.split("://", 1)[-1]
    for glob in globs:
        g = glob.lower()
        if fnmatch.fnmatchcase(low, g) or fnmatch.fnmatchcase(bare, g):
            return True
    return False


# ----------------------------------------------------------------------------------
# headers


def unfold(value: str) -> str:
    """An unfolded, decoded, stripped header value (RFC 5322 §2.2.3, RFC 2047)."""
    if "\n" in value:
        value = value.replace("\r\n", "").replace("\n", "")
    return decode_words(value.strip())


class Headers:
    """A message's header fields by lower-cased name, values unfolded and decoded."""

    __slots__ = ("_fields",)

    def __init__(self, fields: Mapping[str, Sequence[str]] | None = None) -> None:
        self._fields: dict[str, list[str]] = {}
        for name, values in (fields or {}).items():
            self._fields.setdefault(name.strip().lower(), []).extend(unfold(v) for v in values)

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]]) -> Headers:
        h = cls()
        for name, value in pairs:
            h._fields.setdefault(name.strip().lower(), []).append(unfold(value))
        return h

    @classmethod
    def from_bytes(cls, header: bytes) -> Headers:
        """Parse a header block (the bytes before the empty line); bad bytes become U+FFFD."""
        pairs: list[tuple[str, str]] = []
        for raw in header.decode("utf-8", "replace").replace("\r\n", "\n").split("\n"):
            if not raw:
                continue
            if raw[0] in " \t":
                if pairs:
                    pairs[-1] = (pairs[-1][0], pairs[-1][1] + raw)
                continue
            name, sep, value = raw.partition(":")
            if sep:
                pairs.append((name, value))
        return cls.from_pairs(pairs)

    def get_all(self, name: str) -> list[str]:
        return self._fields.get(name.lower(), [])

    def items(self) -> Iterable[tuple[str, list[str]]]:
        return self._fields.items()

    def __repr__(self) -> str:
        return f"Headers({self._fields!r})"


# ----------------------------------------------------------------------------------
# the thing a rule is matched against


def nearest_domain(domain: str, domains: Container[str]) -> str | None:
    """`domain` or its nearest parent that is in `domains` (lower case, without a trailing
    dot), else None: ``sales.example.com`` is covered by ``example.com``. The DKIM signer
    picks its keys this way, and the `dkim` default follows it."""
    labels = domain.lower().rstrip(".").split(".")
    for i in range(len(labels)):
        candidate = ".".join(labels[i:])
        if candidate in domains:
            return candidate
    return None


@dataclass(frozen=True, slots=True)
class Context:
    """One recipient's view of a transaction, lower-cased once for every rule."""

    sender: str
    sender_domain: str
    recipient: str
    recipient_domain: str
    user: str | None
    account: str | None
    headers: Headers | None

    @classmethod
    def make(cls, sender: str, recipient: str, user: str | None = None,
             account: str | None = None, headers: Headers | None = None) -> Context:
        s = sender.strip().strip("<>").lower()
        r = recipient.strip().strip("<>").lower()
        return cls(s, domain_of(s).rstrip("."), r, domain_of(r).rstrip("."), user.lower() if user else None,
                   account.lower() if account else None, headers)


class HeaderPredicate:
    """One `header:` item: a field name and a glob on its unfolded value."""

    __slots__ = ("name", "value")

    def __init__(self, name: str, value: str = "*") -> None:
        self.name = name.lower()
        self.value = GlobSet([value])

    def __call__(self, headers: Headers) -> bool:
        return any(self.value(v) for v in headers.get_all(self.name))


_FIELDS = ("sender", "sender_domain", "recipient", "recipient_domain", "user", "account")


class Matcher:
    """A compiled `match`: all of its keys, each any-of its globs, minus its `not`."""

    __slots__ = ("_checks", "_headers", "_negated", "uses_headers")

    def __init__(self, globs: Mapping[str, Sequence[str]] | None = None,
                 headers: Sequence[tuple[str, str]] = (),
                 negated: Matcher | None = None) -> None:
        checks = []
        for key, patterns in (globs or {}).items():
            if key not in _FIELDS:
                raise ValueError(f"unknown match key {key!r}")
            checks.append((attrgetter(key), GlobSet(patterns)))
        self._checks: tuple[tuple[Any, GlobSet], ...] = tuple(checks)
        self._headers = tuple(HeaderPredicate(n, v) for n, v in headers)
        self._negated = negated
        self.uses_headers: bool = bool(self._headers) or bool(negated and negated.uses_headers)

    def __call__(self, ctx: Context) -> bool:
        for get, globs in self._checks:
            value = get(ctx)
            if value is None or not globs.match_lower(value):
                return False
        if self._headers:
            h = ctx.headers
            if h is None or not any(p(h) for p in self._headers):
                return False
        return self._negated is None or not self._negated(ctx)

    @property
    def matches_everything(self) -> bool:
        return not self._checks and not self._headers and self._negated is None
