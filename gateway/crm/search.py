"""Full-text search of stored messages: a user's query as terms, and the SQL that matches them.

The index itself is the database's (migration ``0007`` (0007_search.py), made again with the
Bcc and attendee addresses by ``0010`` (0010_search_bcc.py); both backends keep it in step
with every write and delete of a ``messages`` row by themselves, in the same transaction):

- SQLite: ``messages_fts``, a contentless FTS5 table (rowid = ``messages.id``; tokenizer
  ``porter unicode61 remove_diacritics 2``: word stems, accents folded) filled by triggers
  on ``messages``;
- PostgreSQL: ``messages.search_vector``, a stored generated ``tsvector`` (config
  ``english``: word stems) with a GIN index; every address is indexed whole and also by its
  domain.

What is indexed: the subject, the sender's name, the From/To/Cc addresses, the relay's Bcc
(``bcc_addrs``: relayed mail only), the attendees of its meeting invitations
(``attendee_addrs``) and the body text (the HTML body where a message has no text part), the
first :data:`BODY_CHARS` characters.

A query (:func:`parse_query`) is words, ``"quoted phrases"`` and addresses, separated by
blanks; every term must match (AND). Each term reaches the database as one quoted FTS5
phrase or one ``phraseto_tsquery``, so no user input is query syntax: nothing typed can make
a query fail. ``carol@acme.test`` matches that address, ``acme.test`` every address at the
domain (and the words, on SQLite, where addresses are tokenised into words).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from gateway.crm.models import FTS_TABLE, VECTOR_COLUMN, messages_table
from gateway.records import clean_text

#: The text search configuration on PostgreSQL.
PG_CONFIG = "english"
#: How much of a body is indexed (PostgreSQL refuses a tsvector over 1 MB): the value
#: migrations 0007 and 0010 build the index with (a change needs a migration).
BODY_CHARS = 200_000
#: Limits on a query: beyond them it is refused (400), not cut.
MAX_QUERY_CHARS = 500
MAX_TERMS = 20


class BadQuery(ValueError):
    """A search query that cannot be run (empty, too long, no word in it)."""


def parse_query(q: str) -> list[str]:
    """The terms of a search query: blank-separated words and addresses, and ``"phrases"``.

    A quote opens a phrase up to the next quote (or the end). Terms without a letter or
    digit (``-``, ``&&``) are left out, as the indexes leave such characters out. Raises
    :class:`BadQuery` when nothing searchable remains or the query is over the limits.
    """
    if len(q) > MAX_QUERY_CHARS:
        raise BadQuery(f"at most {MAX_QUERY_CHARS} characters")
    text = clean_text(q)
    terms: list[str] = []
    for i, part in enumerate(text.split('"')):
        # even pieces are outside quotes (split into words), odd ones are phrases
        pieces = part.split() if i % 2 == 0 else [" ".join(part.split())]
        terms += [p for p in pieces if any(ch.isalnum() for ch in p)]
    terms = list(dict.fromkeys(terms))
    if not terms:
        raise BadQuery("no word to search for")
    if len(terms) > MAX_TERMS:
        raise BadQuery(f"at most {MAX_TERMS} words or phrases")
    return terms


def fts5_match(terms: Sequence[str]) -> str:
    """An FTS5 MATCH expression: each term one quoted phrase (quotes doubled), all ANDed."""
    return " AND ".join('"' + t.replace('"', '""') + '"' for t in terms)


def matching(dialect: str, terms: Sequence[str]) -> sa.ColumnElement[bool]:
    """A WHERE clause on ``messages``: the message matches every term."""
    if dialect == "postgresql":
        vector: sa.ColumnElement[Any] = sa.literal_column(f"{messages_table.name}.{VECTOR_COLUMN}")
        return vector.op("@@")(terms_query(terms))
    fts = sa.table(FTS_TABLE, sa.column("rowid"))
    hits = (sa.select(fts.c.rowid)
            .where(sa.literal_column(FTS_TABLE).op("MATCH")(fts5_match(terms))))
    # `id + 0`: not the primary key, so SQLite walks messages newest first (the sort_at index)
    # and stops at the page's end, probing the hits; on `id IN` it would fetch and sort every
    # hit first (a word in most messages: 0.6 s at 20,000 messages, 15 ms this way)
    return (messages_table.c.id + 0).in_(hits)


def terms_query(terms: Sequence[str]) -> sa.ColumnElement[str]:
    """PostgreSQL: the tsquery of all `terms`, each a phrase (``phraseto_tsquery``), ANDed."""
    config: sa.ColumnElement[Any] = sa.literal_column(f"'{PG_CONFIG}'::regconfig")
    parts = [sa.func.phraseto_tsquery(config, t) for t in terms]
    out: sa.ColumnElement[str] = parts[0]
    for p in parts[1:]:
        out = out.op("&&")(p)
    return out
