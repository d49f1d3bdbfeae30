"""Full-text search of messages: an index each backend keeps in step with ``messages`` itself.

SQLite: ``messages_fts``, a contentless FTS5 table (rowid = ``messages.id``, tokenizer
``porter unicode61 remove_diacritics 2``) with three columns (subject; people: the sender's
name and the From/To/Cc addresses; body: the text body, else the HTML body, cut at
``BODY_CHARS``), filled by triggers on ``messages`` after INSERT, DELETE and UPDATE of those
columns. Contentless rather than external-content: the columns are computed from the row
(addresses out of their JSON arrays, the HTML body where there is no text), which an
external-content table could not read back from ``messages``, and the text is not stored
twice. SQLite 3.40 has no ``contentless_delete``, so the delete trigger hands FTS5 the
same computed values from ``old``, the row being deleted.

PostgreSQL: ``messages.search_vector``, a stored generated ``tsvector`` (``english``:
stems) of the same text, each address also by its domain (``carol@acme.test`` adds
``acme.test``), with a GIN index.

Existing messages are indexed here (SQLite: one INSERT ... SELECT; PostgreSQL: adding the
generated column computes it for every row, rewriting ``messages`` once).

Note for later migrations: rebuilding ``messages`` in SQLite batch mode (a copy, DROP and
rename) drops its triggers; such a migration must create them again (:func:`sqlite_triggers`
here gives their DDL). The index itself stays valid (DROP TABLE fires no triggers).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None

# frozen copies of gateway.crm.search's names and limit
FTS_TABLE = "messages_fts"
VECTOR_COLUMN = "search_vector"
VECTOR_INDEX = "ix_messages_search_vector"
BODY_CHARS = 200_000
TRIGGERS = ("messages_fts_insert", "messages_fts_delete", "messages_fts_update")
INDEXED = ("subject", "from_name", "from_addr", "to_addrs", "cc_addrs", "text_body", "html_body")


def _sqlite_columns(row: str) -> str:
    """The FTS5 columns (subject, people, body) of `row` (``new``, ``old`` or ``messages``)."""
    def addrs(col: str) -> str:
        return (f"CASE WHEN json_valid({row}.{col}) THEN coalesce((SELECT group_concat(value, ' ') "
                f"FROM json_each({row}.{col})), '') ELSE coalesce({row}.{col}, '') END")
    people = (f"coalesce({row}.from_name, '') || ' ' || coalesce({row}.from_addr, '') || ' ' || "
              f"{addrs('to_addrs')} || ' ' || {addrs('cc_addrs')}")
    body = (f"substr(CASE WHEN trim(coalesce({row}.text_body, '')) = '' "
            f"THEN coalesce({row}.html_body, '') ELSE {row}.text_body END, 1, {BODY_CHARS})")
    return f"coalesce({row}.subject, ''), {people}, {body}"


def sqlite_triggers() -> list[str]:
    """The DDL of the triggers that keep ``messages_fts`` in step with ``messages``."""
    insert = (f"INSERT INTO {FTS_TABLE} (rowid, subject, people, body) "
              f"VALUES (new.id, {_sqlite_columns('new')});")
    delete = (f"INSERT INTO {FTS_TABLE} ({FTS_TABLE}, rowid, subject, people, body) "
              f"VALUES ('delete', old.id, {_sqlite_columns('old')});")
    return [
        f"CREATE TRIGGER {TRIGGERS[0]} AFTER INSERT ON messages BEGIN {insert} END",
        f"CREATE TRIGGER {TRIGGERS[1]} AFTER DELETE ON messages BEGIN {delete} END",
        f"CREATE TRIGGER {TRIGGERS[2]} AFTER UPDATE OF {', '.join(INDEXED)} ON messages "
        f"BEGIN {delete} {insert} END",
    ]


def _pg_document() -> str:
    addresses = ("regexp_replace(coalesce(from_addr, '') || ' ' || coalesce(to_addrs::text, '') "
                 "|| ' ' || coalesce(cc_addrs::text, ''), "
                 "'([^\\s\"<>,@\\[\\]]+)@([^\\s\"<>,@\\[\\]]+)', '\\1@\\2 \\2', 'g')")
    body = (f"left(CASE WHEN btrim(coalesce(text_body, '')) = '' THEN coalesce(html_body, '') "
            f"ELSE text_body END, {BODY_CHARS})")
    return (f"to_tsvector('english'::regconfig, coalesce(subject, '') || ' ' || "
            f"coalesce(from_name, '') || ' ' || {addresses} || ' ' || {body})")


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE messages ADD COLUMN {VECTOR_COLUMN} tsvector "
                   f"GENERATED ALWAYS AS ({_pg_document()}) STORED")
        op.execute(f"CREATE INDEX {VECTOR_INDEX} ON messages USING gin ({VECTOR_COLUMN})")
        # statistics on the new column at once: without them the planner takes a common
        # word for a rare one and sorts all its hits rather than walking ix_messages_sort_at
        op.execute("ANALYZE messages")
        return
    op.execute(f"CREATE VIRTUAL TABLE {FTS_TABLE} USING fts5(subject, people, body, content='', "
               "tokenize='porter unicode61 remove_diacritics 2')")
    for ddl in sqlite_triggers():
        op.execute(ddl)
    op.execute(f"INSERT INTO {FTS_TABLE} (rowid, subject, people, body) "
               f"SELECT messages.id, {_sqlite_columns('messages')} FROM messages")


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(f"DROP INDEX IF EXISTS {VECTOR_INDEX}")
        op.execute(f"ALTER TABLE messages DROP COLUMN IF EXISTS {VECTOR_COLUMN}")
        return
    for name in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.execute(f"DROP TABLE IF EXISTS {FTS_TABLE}")
