"""Search finds a message by its Bcc recipients and its invitations' attendees too.

``messages`` gains ``attendee_addrs`` (JSON list): the attendee addresses of its meeting
invitations not named in From/To/Cc/Bcc (the ``attendee`` rows of ``message_addresses``,
which a generated column or a trigger on ``messages`` cannot read), filled here from
those rows. The search document's addresses become From, To, Cc, ``bcc_addrs`` (the
relay's Bcc) and ``attendee_addrs``:

- SQLite: the three triggers of 0007 are dropped and created again with the new
  ``people`` column (the update trigger also fires on ``bcc_addrs``, which the relay sets
  on a message stored first from ingest or IMAP Sent, and ``attendee_addrs``), and the
  contentless ``messages_fts`` is emptied (``delete-all``) and filled again: its rows were
  indexed without these addresses, and a contentless delete must be handed exactly what
  was indexed;
- PostgreSQL: ``search_vector`` (and its GIN index) is dropped and added again with the
  new document (PostgreSQL 15 cannot change a generation expression), which computes it
  for every row.

``messages`` is never rebuilt (columns are added and dropped in place). The downgrade
restores 0007's index exactly (:func:`sqlite_triggers` / :func:`pg_document` with
:data:`ADDRESSES_0007`, which tests/unit/test_migration_frozen.py checks against 0007).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision: str | None = "0009"
branch_labels: str | None = None
depends_on: str | None = None

# frozen copies of gateway.crm.search's names and limit (as in 0007)
FTS_TABLE = "messages_fts"
VECTOR_COLUMN = "search_vector"
VECTOR_INDEX = "ix_messages_search_vector"
BODY_CHARS = 200_000
TRIGGERS = ("messages_fts_insert", "messages_fts_delete", "messages_fts_update")
#: the JSON address lists in the document, after the sender's address: 0007's and this one's
ADDRESSES_0007 = ("to_addrs", "cc_addrs")
ADDRESSES = ("to_addrs", "cc_addrs", "bcc_addrs", "attendee_addrs")


def _indexed(addresses: tuple[str, ...]) -> tuple[str, ...]:
    """The columns whose update re-indexes a row."""
    return ("subject", "from_name", "from_addr", *addresses, "text_body", "html_body")


def _sqlite_columns(row: str, addresses: tuple[str, ...]) -> str:
    """The FTS5 columns (subject, people, body) of `row` (``new``, ``old`` or ``messages``)."""
    def addrs(col: str) -> str:
        return (f"CASE WHEN json_valid({row}.{col}) THEN coalesce((SELECT group_concat(value, ' ') "
                f"FROM json_each({row}.{col})), '') ELSE coalesce({row}.{col}, '') END")
    people = (f"coalesce({row}.from_name, '') || ' ' || coalesce({row}.from_addr, '') || ' ' || "
              + " || ' ' || ".join(addrs(c) for c in addresses))
    body = (f"substr(CASE WHEN trim(coalesce({row}.text_body, '')) = '' "
            f"THEN coalesce({row}.html_body, '') ELSE {row}.text_body END, 1, {BODY_CHARS})")
    return f"coalesce({row}.subject, ''), {people}, {body}"


def sqlite_triggers(addresses: tuple[str, ...] = ADDRESSES) -> list[str]:
    """The DDL of the triggers that keep ``messages_fts`` in step with ``messages``."""
    insert = (f"INSERT INTO {FTS_TABLE} (rowid, subject, people, body) "
              f"VALUES (new.id, {_sqlite_columns('new', addresses)});")
    delete = (f"INSERT INTO {FTS_TABLE} ({FTS_TABLE}, rowid, subject, people, body) "
              f"VALUES ('delete', old.id, {_sqlite_columns('old', addresses)});")
    return [
        f"CREATE TRIGGER {TRIGGERS[0]} AFTER INSERT ON messages BEGIN {insert} END",
        f"CREATE TRIGGER {TRIGGERS[1]} AFTER DELETE ON messages BEGIN {delete} END",
        f"CREATE TRIGGER {TRIGGERS[2]} AFTER UPDATE OF {', '.join(_indexed(addresses))} "
        f"ON messages BEGIN {delete} {insert} END",
    ]


def pg_document(addresses: tuple[str, ...] = ADDRESSES) -> str:
    """The expression of ``search_vector``: each address also by its domain."""
    joined = " || ' ' || ".join(f"coalesce({c}::text, '')" for c in addresses)
    pattern = "'([^\\s\"<>,@\\[\\]]+)@([^\\s\"<>,@\\[\\]]+)', '\\1@\\2 \\2', 'g'"
    found = f"regexp_replace(coalesce(from_addr, '') || ' ' || {joined}, {pattern})"
    body = (f"left(CASE WHEN btrim(coalesce(text_body, '')) = '' THEN coalesce(html_body, '') "
            f"ELSE text_body END, {BODY_CHARS})")
    return (f"to_tsvector('english'::regconfig, coalesce(subject, '') || ' ' || "
            f"coalesce(from_name, '') || ' ' || {found} || ' ' || {body})")


def _reindex(addresses: tuple[str, ...]) -> None:
    """The index built again from every row, with the document of `addresses`."""
    if op.get_context().dialect.name == "postgresql":
        op.execute(f"DROP INDEX IF EXISTS {VECTOR_INDEX}")
        op.execute(f"ALTER TABLE messages DROP COLUMN IF EXISTS {VECTOR_COLUMN}")
        op.execute(f"ALTER TABLE messages ADD COLUMN {VECTOR_COLUMN} tsvector "
                   f"GENERATED ALWAYS AS ({pg_document(addresses)}) STORED")
        op.execute(f"CREATE INDEX {VECTOR_INDEX} ON messages USING gin ({VECTOR_COLUMN})")
        op.execute("ANALYZE messages")   # see 0007: the planner needs the new column's statistics
        return
    for name in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.execute(f"INSERT INTO {FTS_TABLE} ({FTS_TABLE}) VALUES ('delete-all')")
    for ddl in sqlite_triggers(addresses):
        op.execute(ddl)
    op.execute(f"INSERT INTO {FTS_TABLE} (rowid, subject, people, body) "
               f"SELECT messages.id, {_sqlite_columns('messages', addresses)} FROM messages")


def upgrade() -> None:
    postgresql = op.get_context().dialect.name == "postgresql"
    # in place, never a rebuild of messages (it would drop the search triggers)
    with op.batch_alter_table("messages", recreate="never") as batch:
        batch.add_column(sa.Column("attendee_addrs", sa.JSON(), nullable=True))
    agg = "json_agg(a.address ORDER BY a.address)" if postgresql else "json_group_array(a.address)"
    source = ("message_addresses a" if postgresql else
              "(SELECT message_pk, address FROM message_addresses WHERE role = 'attendee' "
              "ORDER BY address) a")
    op.execute(f"UPDATE messages SET attendee_addrs = (SELECT {agg} FROM {source} "
               "WHERE a.message_pk = messages.id"
               + (" AND a.role = 'attendee'" if postgresql else "") + ") "
               "WHERE id IN (SELECT message_pk FROM message_addresses WHERE role = 'attendee')")
    _reindex(ADDRESSES)


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        # the generated column reads attendee_addrs: it goes first
        op.execute(f"DROP INDEX IF EXISTS {VECTOR_INDEX}")
        op.execute(f"ALTER TABLE messages DROP COLUMN IF EXISTS {VECTOR_COLUMN}")
    else:
        for name in TRIGGERS:   # they read attendee_addrs: SQLite refuses to drop it under them
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    with op.batch_alter_table("messages", recreate="never") as batch:
        batch.drop_column("attendee_addrs")
    _reindex(ADDRESSES_0007)
