"""Contacts as people: Bcc and attendee roles, a contact's further addresses, ambiguous names.

``message_addresses.role`` and ``message_contacts.role`` admit ``bcc`` (an envelope
recipient of a relayed message not in its To or Cc) and ``attendee`` (an ATTENDEE or
ORGANIZER of a meeting invitation). ``messages`` gains ``bcc_addrs``. ``contacts``
gains ``name_key`` (the normalised full name ``crm.link_by: name`` matches on; the
contacts there are keyed here with a frozen copy of
:func:`gateway.crm.people.name_key`). ``contact_addresses`` holds a contact's further
addresses, ``contact_ambiguities`` the addresses left unlinked because several contacts
have their display name.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import unicodedata

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None

# frozen copies: the address roles before and after this revision
OLD_ROLES = ("from", "to", "cc")
NEW_ROLES = ("from", "to", "cc", "bcc", "attendee")


def UTCDateTime() -> sa.DateTime:
    # frozen copy of the DDL of gateway.crm.models.UTCDateTime (see 0002)
    return sa.DateTime(timezone=True)


def BigID() -> sa.types.TypeEngine[int]:
    # frozen copy of gateway.crm.models.BigID
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def name_key(first: str, last: str) -> str:
    # frozen copy of gateway.crm.people.name_key (tests/unit/test_people.py checks they agree)
    text = unicodedata.normalize("NFKD", f"{first} {last}")
    text = "".join(c for c in text if not unicodedata.combining(c))
    words = text.casefold().replace(".", " ").replace(",", " ").split()
    return " ".join(words) if len(words) >= 2 else ""


def _roles(table: str, roles: tuple[str, ...]) -> None:
    with op.batch_alter_table(table) as batch:
        batch.drop_constraint(op.f(f"ck_{table}_role"), type_="check")
        batch.create_check_constraint(op.f(f"ck_{table}_role"), _in("role", roles))


def upgrade() -> None:
    _roles("message_addresses", NEW_ROLES)
    _roles("message_contacts", NEW_ROLES)
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("bcc_addrs", sa.JSON(), nullable=True))
    with op.batch_alter_table("contacts") as batch:
        batch.add_column(sa.Column("name_key", sa.String(), server_default="", nullable=False))
        batch.create_index("ix_contacts_name_key", ["name_key"])
    conn = op.get_bind()
    contacts = sa.table("contacts", sa.column("id"), sa.column("first_name"),
                        sa.column("last_name"), sa.column("name_key"))
    keyed = [{"_id": pk, "k": k} for pk, first, last in conn.execute(
                 sa.select(contacts.c.id, contacts.c.first_name, contacts.c.last_name))
             if (k := name_key(first or "", last or ""))]
    if keyed:
        conn.execute(sa.update(contacts).where(contacts.c.id == sa.bindparam("_id"))
                     .values(name_key=sa.bindparam("k")), keyed)
    op.create_table(
        "contact_addresses",
        sa.Column("address", sa.String(), nullable=False),
        sa.Column("contact_pk", BigID(), nullable=False),
        sa.Column("source", sa.String(8), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["contact_pk"], ["contacts.id"], ondelete="CASCADE",
                                name=op.f("fk_contact_addresses_contact_pk_contacts")),
        sa.PrimaryKeyConstraint("address", name=op.f("pk_contact_addresses")),
    )
    op.create_index("ix_contact_addresses_contact_pk", "contact_addresses", ["contact_pk"])
    op.create_table(
        "contact_ambiguities",
        sa.Column("address", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("candidates", sa.JSON(), nullable=False),
        sa.Column("messages", sa.Integer(), nullable=False),
        sa.Column("first_seen_at", UTCDateTime(), nullable=False),
        sa.Column("last_seen_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("address", name=op.f("pk_contact_ambiguities")),
    )


def downgrade() -> None:
    op.drop_table("contact_ambiguities")
    op.drop_index("ix_contact_addresses_contact_pk", "contact_addresses")
    op.drop_table("contact_addresses")
    with op.batch_alter_table("contacts") as batch:
        batch.drop_index("ix_contacts_name_key")
        batch.drop_column("name_key")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("bcc_addrs")
    op.execute(f"DELETE FROM message_contacts WHERE NOT ({_in('role', OLD_ROLES)})")
    op.execute(f"DELETE FROM message_addresses WHERE NOT ({_in('role', OLD_ROLES)})")
    _roles("message_contacts", OLD_ROLES)
    _roles("message_addresses", OLD_ROLES)
