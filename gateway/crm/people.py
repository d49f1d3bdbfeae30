"""Contacts as people: display names split into first and last, the name key `link_by: name` matches on.

Pure functions, no I/O. :func:`split_name` reads a decoded display name (RFC 2047
already undone by the parser) the way a CRM wants a contact's names, and gives
``("", "")`` for anything that is not plainly a person's name, so an auto-created
contact is never called "Sales Team" or "noreply". The rules, in order:

- whitespace is collapsed and surrounding quotes or blanks dropped;
- not plain (no names): empty; an ``@``; a character other than letters, spaces,
  ``-``, ``'``, ``.`` and one ``,`` (so digits, quotes, brackets, ``|``, ``/``, ``:``
  never pass); more than four words; a word naming a role or a machine (:data:`ROLE_WORDS`:
  team, sales, support, noreply, via…); a single lower-case word equal to the
  address's local part (``carol <carol@x>`` says nothing the address does not);
- ``Last, First`` (exactly one comma, both sides non-empty, the right side no
  suffix such as ``Jr.``) becomes first ``First``, last ``Last``;
- a leading title (Dr, Mr, Mrs, Ms, Mx, Prof) is dropped;
- one word is a first name only; two to four words: the last name is the last word,
  or, from the second word on, everything from the first lower-case particle
  (``van``, ``de``, ``von``…: ``Ludwig van Beethoven`` -> ``Ludwig`` / ``van Beethoven``),
  the first name is the rest.

Case is kept as written (``CAROL SMITH`` stays upper case: guessing case is worse).

:func:`role_address` says whether an address's local part is a role (``sales@``): a
nameless contact made for one is never named after whoever writes from it later.

:func:`name_key` is what `crm.link_by: name` compares: the full name case-folded, with
diacritics, dots and commas removed and whitespace collapsed; "" for fewer than two
words (a first name alone never links two addresses). A frozen copy lives in
migration ``0006`` (0006_people.py) (it keys the contacts that exist when it runs).
"""

from __future__ import annotations

import re
import unicodedata

MAX_WORDS = 4

#: words that make a display name a role, a team or a machine, not a person (case-folded)
ROLE_WORDS: frozenset[str] = frozenset({
    "team", "sales", "support", "info", "noreply", "no-reply", "donotreply", "do-not-reply",
    "admin", "administrator", "office", "billing", "service", "services", "help", "helpdesk",
    "desk", "contact", "marketing", "news", "newsletter", "notification", "notifications",
    "accounts", "accounting", "hr", "jobs", "careers", "customer", "customers", "department",
    "via", "mailer-daemon", "postmaster", "webmaster", "bot", "system", "robot", "alerts",
    "invoice", "invoices", "orders", "reception", "inquiries", "enquiries", "hello",
})
TITLES: frozenset[str] = frozenset({"dr", "mr", "mrs", "ms", "mx", "prof", "sir"})
SUFFIXES: frozenset[str] = frozenset({"jr", "sr", "ii", "iii", "iv", "phd", "md", "esq"})
PARTICLES: frozenset[str] = frozenset({
    "van", "von", "de", "der", "den", "del", "della", "di", "da", "dos", "das", "du", "la", "le",
    "ter", "ten", "zu", "bin", "al", "el", "mac", "af", "av"})

_WS_RE = re.compile(r"\s+")
_PLAIN_RE = re.compile(r"^[^\W\d_]+(?:[-'.\u2019][^\W\d_]*)*\.?$")


def _plain_word(word: str) -> bool:
    return bool(_PLAIN_RE.match(word))


def _bare(word: str) -> str:
    return word.strip(".").casefold()


def split_name(display: str, address: str = "") -> tuple[str, str]:
    """(first name, last name) of a display name, ``("", "")`` when it is not plainly a
    person's (see the module docstring for the rules)."""
    name = _WS_RE.sub(" ", display or "").strip().strip("\"'").strip()
    if not name or "@" in name or len(name) > 200:
        return "", ""
    if name.count(",") > 1:
        return "", ""
    if "," in name:
        last, _, first = (part.strip() for part in name.partition(","))
        if not last or not first or _bare(first) in SUFFIXES:
            return "", ""
        words = [*first.split(" "), "|", *last.split(" ")]
    else:
        words = name.split(" ")
    plain = [w for w in words if w != "|"]
    if len(plain) > MAX_WORDS or not all(_plain_word(w) for w in plain):
        return "", ""
    if any(_bare(w) in ROLE_WORDS for w in plain):
        return "", ""
    if words and _bare(words[0]) in TITLES and len(plain) > 1 and words[1] != "|":
        words = words[1:]
    if "|" in words:                      # "Last, First"
        cut = words.index("|")
        return " ".join(words[:cut]), " ".join(words[cut + 1:])
    if len(words) == 1:
        word = words[0]
        local = address.rpartition("@")[0]
        if word == word.lower() and word.casefold() == local.casefold():
            return "", ""
        return word, ""
    cut = next((i for i in range(1, len(words) - 1) if words[i] in PARTICLES), len(words) - 1)
    return " ".join(words[:cut]), " ".join(words[cut:])


def role_address(address: str) -> bool:
    """Is the address's local part a role or a machine (``sales@``, ``no-reply@``,
    ``support.emea@``: a word of :data:`ROLE_WORDS`)? Whoever signs its mail is not it."""
    local = address.rpartition("@")[0].casefold()
    return local in ROLE_WORDS or any(w in ROLE_WORDS for w in re.split(r"[._+\-]", local))


def name_key(first: str, last: str) -> str:
    """The normalised full name `link_by: name` matches on ("" below two words)."""
    text = unicodedata.normalize("NFKD", f"{first} {last}")
    text = "".join(c for c in text if not unicodedata.combining(c))
    words = text.casefold().replace(".", " ").replace(",", " ").split()
    return " ".join(words) if len(words) >= 2 else ""
