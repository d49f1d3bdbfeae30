"""Contacts as people: display names, the relay's Bcc, `link_by: name` (ambiguous names listed),
meeting invitations' attendees; on SQLite and PostgreSQL, and the parsers fuzzed."""

from __future__ import annotations

import importlib.util
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import gateway.crm.migrations
from gateway.config import load_config
from gateway.crm.companies import list_companies
from gateway.crm.contacts import ContactInput, contact_timeline, get_contact, upsert_contacts
from gateway.crm.engine import make_engine
from gateway.crm.identify import list_ambiguous
from gateway.crm.linking import LinkRules
from gateway.crm.migrate import upgrade
from gateway.crm.people import name_key, split_name
from gateway.crm.store import Store
from gateway.errors import ConfigError
from gateway.mail.calendar import MAX_ATTENDEES, attendees
from gateway.mail.parse import parse_message
from gateway.records import AcceptedMessage, NewMessage, SourceRef, bcc_of
from tests.unit.test_store import _downgrade as downgrade

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
OWN = LinkRules(own_addresses=frozenset({"alice@example.com"}), own_domains=frozenset({"example.com"}))
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- display names -----------------------------------------------------------------------------
@pytest.mark.parametrize(("display", "address", "names"), [
    ("Carol Smith", "carol@acme.test", ("Carol", "Smith")),
    ("Smith, Carol", "carol@acme.test", ("Carol", "Smith")),
    ("  Carol   Smith ", "x@y.test", ("Carol", "Smith")),
    ('"Carol Smith"', "x@y.test", ("Carol", "Smith")),
    ("Carol", "cs@acme.test", ("Carol", "")),
    ("carol", "carol@acme.test", ("", "")),            # the local part again: says nothing
    ("Mary Ann Smith", "x@y.test", ("Mary Ann", "Smith")),
    ("Ludwig van Beethoven", "x@y.test", ("Ludwig", "van Beethoven")),
    ("Dr. Carol Smith", "x@y.test", ("Carol", "Smith")),
    ("Carol J. Smith", "x@y.test", ("Carol J.", "Smith")),
    ("Anne-Marie O'Neil", "x@y.test", ("Anne-Marie", "O'Neil")),
    ("José Álvarez", "x@y.test", ("José", "Álvarez")),
    ("王 小明", "x@y.test", ("王", "小明")),
    ("CAROL SMITH", "x@y.test", ("CAROL", "SMITH")),    # case kept as written
    ("Smith, Carol, Jr.", "x@y.test", ("", "")),
    ("Carol Smith, Jr.", "x@y.test", ("", "")),
    ("carol@acme.test", "carol@acme.test", ("", "")),
    ("Sales Team", "sales@acme.test", ("", "")),
    ("Acme Support", "help@acme.test", ("", "")),
    ("noreply", "noreply@acme.test", ("", "")),
    ("Carol Smith via LinkedIn", "x@y.test", ("", "")),
    ("Carol (Acme)", "x@y.test", ("", "")),
    ("Team 42", "x@y.test", ("", "")),
    ("12345", "x@y.test", ("", "")),
    ("A B C D E", "x@y.test", ("", "")),
    ("Acme | Billing", "x@y.test", ("", "")),
    ("", "x@y.test", ("", "")),
])
def test_display_names_split_into_first_and_last(display: str, address: str,
                                                  names: tuple[str, str]) -> None:
    assert split_name(display, address) == names


def test_name_key_folds_case_diacritics_dots_and_order() -> None:
    assert name_key("Carol", "Smith") == name_key("CAROL", "smith") == "carol smith"
    assert name_key(*split_name("Smith, Carol")) == "carol smith"
    assert name_key("José", "Álvarez") == name_key("Jose", "Alvarez")
    assert name_key("Carol J.", "Smith") == name_key("Carol J", "Smith")
    assert name_key("Carol", "") == ""          # a first name alone never links


def _frozen_0005() -> Any:
    path = Path(gateway.crm.migrations.__file__).parent / "versions" / "0006_people.py"
    spec = importlib.util.spec_from_file_location("_frozen_0006_people", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


R0005 = _frozen_0005()


@PROPS
@given(first=st.text(max_size=20), last=st.text(max_size=20))
@example(first="José", last="Álvarez")
@example(first="Carol J.", last="Smith, ")
def test_frozen_name_key_agrees_with_the_live_one(first: str, last: str) -> None:
    assert R0005.name_key(first, last) == name_key(first, last)


@PROPS
@given(display=st.text(max_size=60), address=st.text(max_size=20))
def test_split_name_is_total_and_never_invents_text(display: str, address: str) -> None:
    first, last = split_name(display, address)
    assert isinstance(first, str) and isinstance(last, str)
    if first or last:
        assert first and "@" not in first + last
        words = f"{first} {last}".split()
        assert 1 <= len(words) <= 4 and all(w in display for w in words)


# -- the crm.link_by setting ------------------------------------------------------------------
def test_link_by_name_is_a_setting_and_a_bad_value_names_file_line_key(tmp_path: Path) -> None:
    p = tmp_path / "gateway.yaml"
    p.write_text("hostname: gw.example.com\ncrm:\n  link_by: [address, name]\n")
    rules = LinkRules.from_config(load_config(p))
    assert rules.link_by_name and rules.link_by_address and not rules.link_by_domain
    p.write_text("hostname: gw.example.com\ncrm:\n  link_by: [address, nmae]\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(ei.value.problems[0]).startswith(f"{p}:3: crm.link_by[1]: ")


@pytest.mark.parametrize(("written", "address", "domain", "name", "warned"), [
    ("name", True, False, True, True),          # as the issue writes it: the list [name]
    ("[name]", True, False, True, True),
    ("address", True, False, False, False),
    ("[address, domain]", True, True, False, False),   # SPEC's
    ("[address, domain, name]", True, True, True, False),
])
def test_link_by_takes_a_single_value_as_a_one_item_list(
        tmp_path: Path, written: str, address: bool, domain: bool, name: bool,
        warned: bool) -> None:
    p = tmp_path / "gateway.yaml"
    p.write_text(f"hostname: gw.example.com\ncrm:\n  link_by: {written}\n")
    warnings: list[Any] = []
    rules = LinkRules.from_config(load_config(p, warnings))
    # `name` implies linking by address (identify.resolve); it never turns addresses off
    assert (rules.links_contacts, rules.link_by_domain, rules.link_by_name) == (
        address, domain, name)
    assert [str(w) for w in warnings] == ([
        f"{p}:3: crm.link_by: [name] links contacts by address and name but no company by "
        "domain: write [address, domain, name] to keep companies"] if warned else [])
    p.write_text("hostname: gw.example.com\ncrm:\n  link_by: nmae\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert [str(q) for q in ei.value.problems] == [
        f"{p}:3: crm.link_by: Input should be 'address', 'domain' or 'name'"]


# -- iCalendar attendees -----------------------------------------------------------------------
INVITE = (
    "BEGIN:VCALENDAR\r\nMETHOD:REQUEST\r\nPRODID:-//test//EN\r\nBEGIN:VEVENT\r\n"
    "ORGANIZER;CN=\"Alice Example\":mailto:alice@example.com\r\n"
    "ATTENDEE;ROLE=REQ-PARTICIPANT;PARTSTAT=NEEDS-ACTION;CN=Carol Smith;RSVP=TRU\r\n"
    " E:mailto:carol@acme.test\r\n"
    "ATTENDEE;CN=\"Jones, Dave\";CUTYPE=INDIVIDUAL:MAILTO:Dave.Jones@Acme.Test\r\n"
    "attendee;cn=Erin ^'E^' Fox:mailto:erin%40fox.test\r\n"
    "ATTENDEE;CN=Room 1;CUTYPE=ROOM:urn:uuid:0a1b\r\n"
    "ATTENDEE;CN=Carol again:mailto:CAROL@acme.test\r\n"
    "DESCRIPTION:ATTENDEE;CN=Not One:mailto:nobody@x.test\r\n"
    "END:VEVENT\r\nEND:VCALENDAR\r\n")


def test_attendees_of_an_invitation() -> None:
    assert attendees(INVITE) == [("alice@example.com", "Alice Example"),
                                 ("carol@acme.test", "Carol Smith"),
                                 ("Dave.Jones@Acme.Test", "Jones, Dave"),
                                 ("erin@fox.test", 'Erin "E" Fox')]


def test_attendees_are_capped() -> None:
    many = "".join(f"ATTENDEE:mailto:p{i}@x.test\n" for i in range(MAX_ATTENDEES + 50))
    assert len(attendees(many)) == MAX_ATTENDEES


@pytest.mark.parametrize("text", [
    "ATTENDEE" + ";" * (1 << 20),                                  # no value at all
    'ATTENDEE;CN="' + '"' * (1 << 20),                             # quotes that never close
    "ATTENDEE;CN=" + "\r\n a" * 350_000 + ":mailto:a@b.test",     # one line folded 350k times
    "\r\n" * (1 << 19),                                           # nothing but line breaks
    "ATTENDEE:\n" * 100_000,                                       # 100k properties, no address
    "x" * (4 << 20),                                               # past MAX_BYTES
], ids=["semicolons", "quotes", "folds", "breaks", "properties", "large"])
def test_hostile_calendars_are_read_in_bounded_time(text: str) -> None:
    start = time.perf_counter()
    attendees(text)
    assert time.perf_counter() - start < 2.0     # linear code: 0.03-0.2 s on a busy machine


_ICAL_PIECES = st.sampled_from([
    "ATTENDEE", "ORGANIZER", ";", ":", "CN=", '"', "mailto:", "MAILTO:", "@", "x.test", "\r\n",
    "\n", "\r", "\r\n ", "\r\n\t", "^n", "^'", "^^", "%40", "Carol Smith", "BEGIN:VEVENT", ",",
])
_ICAL = st.lists(st.one_of(_ICAL_PIECES, st.text(max_size=6)), max_size=40).map("".join)
_NAME = st.text(st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters='"^'),
                max_size=15)
_LOCAL = st.text("abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=10)


@PROPS
@given(text=_ICAL)
@example(text="ATTENDEE;CN=\"a:b\":mailto:a@b.test")
@example(text="ATTENDEE" + ";" * 5000)
def test_attendee_extraction_is_total_and_returns_clean_addresses(text: str) -> None:
    out = attendees(text)
    keys = [a.lower() for a, _ in out]
    assert len(keys) == len(set(keys)) <= MAX_ATTENDEES
    for address, name in out:
        assert "@" in address and not any(c.isspace() for c in address)
        assert "\n" not in name and "\r" not in name


@PROPS
@given(people=st.lists(st.tuples(_LOCAL, _NAME), max_size=8, unique_by=lambda p: p[0]),
       width=st.integers(min_value=5, max_value=75))
def test_attendees_written_and_folded_are_read_back(people: list[tuple[str, str]],
                                                    width: int) -> None:
    lines = ["BEGIN:VCALENDAR", "BEGIN:VEVENT"]
    for local, name in people:
        lines.append(f'ATTENDEE;CN="{name}";RSVP=TRUE:mailto:{local}@x.test')
    lines += ["END:VEVENT", "END:VCALENDAR"]
    folded = []
    for line in lines:      # RFC 5545 §3.1 folding at `width` characters
        chunks = [line[i:i + width] for i in range(0, len(line), width)] or [""]
        folded.append("\r\n ".join(chunks))
    got = attendees("\r\n".join(folded) + "\r\n")
    assert got == [(f"{local}@x.test", " ".join(name.split())) for local, name in people]


# -- the store ---------------------------------------------------------------------------------
def imap_msg(mid: str, *, frm: str, names: dict[str, str] | None = None,
             to: tuple[str, ...] = ("alice@example.com",), cc: tuple[str, ...] = (),
             uid: int = 1, **kw: Any) -> NewMessage:
    names = names or {}
    return NewMessage(
        message_id=mid, from_addr=frm, from_name=names.get(frm, ""), to_addrs=list(to),
        cc_addrs=list(cc), subject="Quote", date=T0, direction="inbound", account="alice",
        display_names={a.lower(): n for a, n in names.items()},
        sources=[SourceRef("imap", f"alice/INBOX/1/{uid}", T0, account="alice", folder="INBOX",
                           uidvalidity=1, uid=uid)], **kw)


async def contact_names(store: Store) -> dict[str, tuple[str, str, str]]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(sa.text(
            "SELECT email, first_name, last_name, source FROM contacts"))
        return {e: (f, last, s) for e, f, last, s in rows.all()}


async def test_auto_created_contacts_take_the_display_name(store: Store) -> None:
    store.configure(replace(OWN, auto_create_contacts=True))
    await upsert_contacts(store, [ContactInput("erin@fox.test", first_name="Erin",
                                               last_name="Imported")])
    await store.store_messages([imap_msg(
        "<m1@acme.test>", frm="carol@acme.test", cc=("dave@acme.test", "sales@acme.test",
                                                     "erin@fox.test", "frank@acme.test"),
        names={"carol@acme.test": "Carol Smith", "dave@acme.test": "Jones, Dave",
               "sales@acme.test": "Acme Sales Team", "erin@fox.test": "Erin Somebody-Else",
               "frank@acme.test": "frank"})])
    assert await contact_names(store) == {
        "carol@acme.test": ("Carol", "Smith", "auto"),
        "dave@acme.test": ("Dave", "Jones", "auto"),
        "sales@acme.test": ("", "", "auto"),          # a role, not a person: no names
        "frank@acme.test": ("", "", "auto"),          # its local part again: no names
        "erin@fox.test": ("Erin", "Imported", "import"),   # imported names are never touched
    }
    [m] = await store.list_messages()
    assert {c["email"]: c["name"] for c in m["contacts"]}["carol@acme.test"] == "Carol Smith"


async def test_a_nameless_auto_contact_takes_a_later_display_name(store: Store) -> None:
    store.configure(replace(OWN, auto_create_contacts=True, link_by_name=True))
    await upsert_contacts(store, [ContactInput("erin@fox.test")])      # imported, no names
    # a Bcc recipient (the envelope has no names), a named one, a role address
    await store.record([relay_msg("Q1", "<n1@example.com>", to=["carol@acme.test"],
                                  recipients=["carol@acme.test", "dave@beta.test"])], [])
    await store.store_messages([imap_msg(
        "<n0@acme.test>", frm="carol@acme.test", cc=("sales@acme.test",), uid=1,
        names={"carol@acme.test": "Carol Smith", "sales@acme.test": "Acme Sales"})])
    assert await contact_names(store) == {
        "dave@beta.test": ("", "", "auto"), "carol@acme.test": ("Carol", "Smith", "auto"),
        "sales@acme.test": ("", "", "auto"), "erin@fox.test": ("", "", "import")}
    await store.store_messages([imap_msg(
        "<n2@beta.test>", frm="dave@beta.test", uid=2,
        cc=("carol@acme.test", "sales@acme.test", "erin@fox.test"),
        names={"dave@beta.test": '"Dave Jones"', "carol@acme.test": "Caroline Smythe",
               "sales@acme.test": "Gina Rossi", "erin@fox.test": "Erin Fox"})])
    assert await contact_names(store) == {
        "dave@beta.test": ("Dave", "Jones", "auto"),      # filled from the later mail
        "carol@acme.test": ("Carol", "Smith", "auto"),    # a name is never replaced
        "sales@acme.test": ("", "", "auto"),              # a role: not whoever writes from it
        "erin@fox.test": ("", "", "import")}              # imported data is never touched
    # the name key came with the names: link_by: name finds dave by them now
    await store.store_messages([imap_msg("<n3@gmail.com>", frm="dave.j@gmail.com", uid=3,
                                         names={"dave.j@gmail.com": "Dave Jones"})])
    contact = await get_contact(store, "dave.j@gmail.com")
    assert contact is not None and contact["emails"] == ["dave@beta.test", "dave.j@gmail.com"]


async def test_auto_created_contacts_make_the_company_of_their_domain(store: Store) -> None:
    store.configure(OWN)                     # no contacts made: mail stored before
    await store.store_messages([imap_msg("<c0@acme.test>", frm="carol@acme.test", uid=1)])
    store.configure(replace(OWN, auto_create_contacts=True))
    await store.store_messages([imap_msg(
        "<c1@acme.test>", frm="dave@acme.test", uid=2, cc=("priya@gmail.com", "bob@example.com"),
        names={"dave@acme.test": "Dave Jones"})])
    [acme] = await list_companies(store)     # never gmail.com (free mail) nor example.com (ours)
    assert (acme["domain"], acme["name"]) == ("acme.test", "acme.test")
    dave = await get_contact(store, "dave@acme.test")
    priya = await get_contact(store, "priya@gmail.com")
    assert dave is not None and dave["company_domain"] == "acme.test"
    assert priya is not None and priya["company_domain"] is None
    # the new message and the one stored earlier with an address at the domain
    for m in await store.list_messages():
        assert [c["domain"] for c in m["companies"]] == ["acme.test"], m["message_id"]
    # an import names it; a contact made later joins it, and no second company is made
    await upsert_contacts(store, [ContactInput("dave@acme.test", company="Acme Inc")])
    await store.store_messages([imap_msg("<c2@acme.test>", frm="erin@acme.test", uid=3)])
    [acme] = await list_companies(store)
    assert acme["name"] == "Acme Inc"
    erin = await get_contact(store, "erin@acme.test")
    assert erin is not None and erin["company"] == "Acme Inc"
    # without link_by: domain no company is made
    store.configure(replace(OWN, auto_create_contacts=True, link_by_domain=False))
    await store.store_messages([imap_msg("<c3@beta.test>", frm="zed@beta.test", uid=4)])
    assert [c["domain"] for c in await list_companies(store)] == ["acme.test"]


def relay_msg(qid: str, mid: str, *, to: list[str], recipients: list[str],
              **kw: Any) -> AcceptedMessage:
    return AcceptedMessage(queue_id=qid, message_id=mid, from_addr="alice@example.com",
                           to_addrs=to, cc_addrs=[], subject="Offer", date=T0, snippet="hi",
                           size=10, recipients=recipients, user="alice@example.com",
                           account="alice", at=T0, **kw)


def test_bcc_is_the_envelope_minus_to_and_cc() -> None:
    a = relay_msg("Q1", "<x@example.com>", to=["Carol@Acme.test"],
                  recipients=["carol@acme.test", "Boss@Acme.test", "boss@acme.test", "dave@b.test"])
    assert bcc_of(a) == ["Boss@Acme.test", "dave@b.test"]
    # header fields neither parsed nor given: nothing is known to be Bcc
    assert bcc_of(relay_msg("Q2", "<y@x>", to=[], recipients=["carol@acme.test"])) == []
    a = relay_msg("Q3", "<z@x>", to=[], recipients=["carol@acme.test"])
    a.parsed = True     # parsed and no To/Cc at all ("undisclosed recipients"): all Bcc
    assert bcc_of(a) == ["carol@acme.test"]


async def test_bcc_recipients_of_relayed_mail_are_linked_and_created(store: Store) -> None:
    store.configure(replace(OWN, auto_create_contacts=True))
    await upsert_contacts(store, [ContactInput("boss@acme.test", first_name="Bo", last_name="Ss")])
    await store.record([relay_msg("Q1", "<b1@example.com>", to=["carol@acme.test"],
                                  recipients=["carol@acme.test", "boss@acme.test",
                                              "dave@other.test"])], [])
    [m] = await store.list_messages()
    assert m["to"] == ["carol@acme.test"] and m["bcc"] == ["boss@acme.test", "dave@other.test"]
    assert sorted((c["email"], c["role"]) for c in m["contacts"]) == [
        ("boss@acme.test", "bcc"), ("carol@acme.test", "to"), ("dave@other.test", "bcc")]
    assert "dave@other.test" in await contact_names(store)
    # mail later to the Bcc recipient is on its contact's timeline, with the Bcc'd one
    later = imap_msg("<b2@other.test>", frm="dave@other.test", uid=2)
    await store.store_messages([later])
    assert [t["message_id"] for t in await contact_timeline(store, "dave@other.test")] == [
        "<b2@other.test>", "<b1@example.com>"]
    # inbound mail never has a Bcc
    assert {x["message_id"]: x["bcc"] for x in await store.list_messages()}["<b2@other.test>"] == []


async def test_bcc_of_a_message_stored_first_from_ingest_is_added_by_the_relay(store: Store) -> None:
    store.configure(OWN)
    await upsert_contacts(store, [ContactInput("boss@acme.test"), ContactInput("carol@acme.test")])
    first = NewMessage(message_id="<i1@example.com>", from_addr="alice@example.com",
                       to_addrs=["carol@acme.test"], cc_addrs=[], subject="Offer", date=T0,
                       direction="outbound", sources=[SourceRef("ingest", "ING1", T0)])
    await store.store_messages([first])
    await store.record([relay_msg("Q1", "<i1@example.com>", to=["carol@acme.test"],
                                  recipients=["carol@acme.test", "boss@acme.test",
                                              "nobody@else.test"])], [])
    [m] = await store.list_messages()
    assert m["bcc"] == ["boss@acme.test", "nobody@else.test"]
    assert sorted((c["email"], c["role"]) for c in m["contacts"]) == [
        ("boss@acme.test", "bcc"), ("carol@acme.test", "to")]
    assert [x["id"] for x in await store.list_messages(contact="nobody@else.test")] == [m["id"]]
    # the relay's record replayed adds nothing
    await store.record([relay_msg("Q1", "<i1@example.com>", to=["carol@acme.test"],
                                  recipients=["carol@acme.test", "boss@acme.test"])], [])
    [again] = await store.list_messages()
    assert again["contacts"] == m["contacts"]


async def test_link_by_name_adds_the_address_to_the_one_contact_of_that_name(store: Store) -> None:
    store.configure(replace(OWN, link_by_name=True))
    await upsert_contacts(store, [ContactInput("carol@acme.test", first_name="Carol",
                                               last_name="Smith")])
    # stored before: from an address no contact has, and no name given
    await store.store_messages([imap_msg("<p0@gmail.com>", frm="carol.personal@gmail.com", uid=1)])
    await store.store_messages([imap_msg(
        "<p1@gmail.com>", frm="carol.personal@gmail.com", uid=2,
        names={"carol.personal@gmail.com": "Smith, Carol"})])
    contact = await get_contact(store, "Carol.Personal@gmail.com")
    assert contact is not None and contact["email"] == "carol@acme.test"
    assert contact["emails"] == ["carol@acme.test", "carol.personal@gmail.com"]
    by_mid = {m["message_id"]: m for m in await store.list_messages()}
    for mid in ("<p0@gmail.com>", "<p1@gmail.com>"):     # the earlier one too
        assert [(c["email"], c["role"]) for c in by_mid[mid]["contacts"]] == [
            ("carol@acme.test", "from")]
    assert {t["message_id"] for t in await contact_timeline(store, "carol@acme.test")} == {
        "<p0@gmail.com>", "<p1@gmail.com>"}
    assert await list_ambiguous(store) == []
    # an import of that address as a contact of its own wins over the link by name
    await upsert_contacts(store, [ContactInput("carol.personal@gmail.com", first_name="Carol",
                                               last_name="Smith")])
    own = await get_contact(store, "carol.personal@gmail.com")
    assert own is not None and own["emails"] == ["carol.personal@gmail.com"]


async def test_link_by_name_leaves_an_ambiguous_name_unlinked_and_lists_it(store: Store) -> None:
    store.configure(replace(OWN, link_by_name=True, auto_create_contacts=True))
    await upsert_contacts(store, [
        ContactInput("john@acme.test", first_name="John", last_name="Doe"),
        ContactInput("jdoe@beta.test", first_name="JOHN", last_name="Doe"),
        ContactInput("solo@acme.test", first_name="John", last_name="")])
    for uid in (1, 2):
        await store.store_messages([imap_msg(
            f"<j{uid}@gmail.com>", frm="john.doe@gmail.com", uid=uid,
            names={"john.doe@gmail.com": "John  Doe"})])
    # neither linked nor made into a third John Doe
    assert "john.doe@gmail.com" not in await contact_names(store)
    assert await get_contact(store, "john.doe@gmail.com") is None
    assert all(m["contacts"] == [] for m in await store.list_messages())
    [row] = await list_ambiguous(store)
    assert (row["address"], row["name"], row["messages"]) == ("john.doe@gmail.com", "John  Doe", 2)
    assert row["candidates"] == ["jdoe@beta.test", "john@acme.test"]
    # a first name alone is never a match: "John" becomes a contact of its own
    await store.store_messages([imap_msg("<j3@x.test>", frm="jo@x.test", uid=3,
                                         names={"jo@x.test": "John"})])
    assert (await contact_names(store))["jo@x.test"] == ("John", "", "auto")
    # once a contact has the address it is no longer listed
    await upsert_contacts(store, [ContactInput("john.doe@gmail.com")])
    assert await list_ambiguous(store) == []


INVITE_MAIL = (
    b"From: Carol Smith <carol@acme.test>\r\nTo: alice@example.com\r\n"
    b"Subject: Invitation: Kick-off\r\nMessage-ID: <inv1@acme.test>\r\n"
    b"Date: Sun, 01 Nov 2026 09:00:00 +0000\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=B\r\n\r\n"
    b"--B\r\nContent-Type: text/plain\r\n\r\nJoin us.\r\n"
    b"--B\r\nContent-Type: text/calendar; method=REQUEST; charset=UTF-8\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\n"
    + __import__("base64").encodebytes((
        "BEGIN:VCALENDAR\r\nMETHOD:REQUEST\r\nBEGIN:VEVENT\r\n"
        "ORGANIZER;CN=Carol Smith:mailto:carol@acme.test\r\n"
        "ATTENDEE;CN=Alice:mailto:alice@example.com\r\n"
        "ATTENDEE;CN=Dave Jones;RSVP=TRUE:mailto:dave@acme.test\r\n"
        "ATTENDEE;CN=\"Øyvind Berg\":mailto:oyvind@fjord.test\r\n"
        "ATTENDEE;CN=Priya Patel:mailto:priya@gmail.com\r\n"
        "END:VEVENT\r\nEND:VCALENDAR\r\n").encode())
    + b"--B--\r\n")


async def test_an_invitation_adds_its_three_attendees_as_correspondents(store: Store) -> None:
    store.configure(replace(OWN, auto_create_contacts=True))
    p = parse_message(INVITE_MAIL)
    assert p.attendees == ["carol@acme.test", "alice@example.com", "dave@acme.test",
                           "oyvind@fjord.test", "priya@gmail.com"]
    m = NewMessage.from_parsed(p, INVITE_MAIL, direction="inbound", account="alice",
                               sources=[SourceRef("ingest", "ING9", T0)])
    await store.store_messages([m])
    [row] = await store.list_messages()
    # the organizer is the sender (role from); our own user is never a contact
    assert sorted((c["email"], c["name"], c["role"]) for c in row["contacts"]) == [
        ("carol@acme.test", "Carol Smith", "from"),
        ("dave@acme.test", "Dave Jones", "attendee"),
        ("oyvind@fjord.test", "Øyvind Berg", "attendee"),
        ("priya@gmail.com", "Priya Patel", "attendee")]
    assert [x["id"] for x in await store.list_messages(contact="oyvind@fjord.test")] == [row["id"]]
    assert row["to"] == ["alice@example.com"] and row["bcc"] == []


async def test_imap_header_filter_lets_through_mail_from_a_contacts_other_address(
        store: Store) -> None:
    store.configure(OWN)
    await upsert_contacts(store, [ContactInput("carol@acme.test", first_name="Carol",
                                               last_name="Smith")])
    mail = [["carol.personal@gmail.com", "alice@example.com"]]
    names = [{"carol.personal@gmail.com": "Carol Smith"}]
    assert await store.concerning(mail, names) == [False]      # link_by: address only
    store.configure(replace(OWN, link_by_name=True))
    assert await store.concerning(mail, names) == [True]
    assert await store.concerning(mail, [{"carol.personal@gmail.com": "Carol Jones"}]) == [False]
    assert await store.concerning(mail) == [False]


async def test_encoded_display_names_are_decoded_before_the_split(store: Store) -> None:
    store.configure(replace(OWN, auto_create_contacts=True))
    raw = (b"From: =?utf-8?q?=C3=81lvarez=2C_Jos=C3=A9?= <jose@acme.test>\r\n"
           b"To: alice@example.com, =?iso-8859-1?b?Sm/rbCBCcmFu?= <joel@acme.test>\r\n"
           b"Subject: Hola\r\nMessage-ID: <e1@acme.test>\r\n\r\nhi\r\n")
    m = NewMessage.from_parsed(parse_message(raw), raw, direction="inbound",
                               sources=[SourceRef("ingest", "ING1", T0)])
    await store.store_messages([m])
    names = await contact_names(store)
    assert names["jose@acme.test"] == ("José", "Álvarez", "auto")
    assert names["joel@acme.test"] == ("Joël", "Bran", "auto")


async def test_upgrade_from_0004_keys_the_contacts_there_and_downgrade_returns(url: str) -> None:
    await upgrade(url, "0004")
    engine = make_engine(url, migrations=True)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text(
                "INSERT INTO contacts (email, first_name, last_name, title, phone, fields, source, "
                "created_at, updated_at) VALUES (:e, :f, :l, '', '', '{}', 'import', :t, :t)"),
                [{"e": "carol@acme.test", "f": "Carol", "l": "Smith", "t": T0},
                 {"e": "solo@acme.test", "f": "Solo", "l": "", "t": T0}])
    finally:
        await engine.dispose()
    await upgrade(url)
    s = await Store.open(url)
    try:
        s.configure(replace(OWN, link_by_name=True))
        await s.store_messages([imap_msg("<u1@gmail.com>", frm="cs@gmail.com",
                                         names={"cs@gmail.com": "Carol Smith"})])
        contact = await get_contact(s, "cs@gmail.com")
        assert contact is not None and contact["email"] == "carol@acme.test"
    finally:
        await s.close()
    await downgrade(url, "0004")
    engine = make_engine(url, migrations=True)
    try:
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
            assert "contact_addresses" not in tables and "contact_ambiguities" not in tables
            roles = (await conn.execute(sa.text("SELECT role FROM message_addresses"))).scalars()
            assert set(roles) == {"from", "to"}
    finally:
        await engine.dispose()
    await upgrade(url)
