"""IMAP wire format: reading responses with literals, parsing, quoting, UID sets, names, dates."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.imap import protocol
from gateway.imap.client import Folder, _resolve
from gateway.imap.protocol import ProtocolError, parse_response, read_response


async def read_all(data: bytes, limit: int = 2 ** 16) -> list[protocol.Response]:
    reader = asyncio.StreamReader(limit=limit)
    reader.feed_data(data)
    reader.feed_eof()
    out = []
    while True:
        try:
            out.append(parse_response(await read_response(reader)))
        except asyncio.IncompleteReadError:
            return out


async def test_literals_are_taken_by_byte_count_whatever_they_contain() -> None:
    body = b"From: x\r\n\r\nA 1 OK fake\r\n* 9 EXISTS\r\n((( \"unbalanced {3}\r\n"
    data = (b"* 1 FETCH (UID 7 FLAGS (\\Seen) BODY[] {%d}\r\n" % len(body) + body +
            b" INTERNALDATE \"01-Feb-2024 03:04:05 +0000\")\r\n* 2 EXISTS\r\nA1 OK done\r\n")
    fetch, exists, done = await read_all(data)
    assert fetch.kind == "FETCH" and fetch.number == 1
    assert fetch.data == [["UID", "7", "FLAGS", ["\\Seen"], "BODY[]", body,
                           "INTERNALDATE", "01-Feb-2024 03:04:05 +0000"]]
    assert (exists.kind, exists.number) == ("EXISTS", 2)
    assert (done.tag, done.kind, done.text) == ("A1", "OK", "done")


async def test_many_lines_in_one_read_do_not_recurse() -> None:
    data = b"".join(b"* %d FETCH (UID %d FLAGS ())\r\n" % (i, i) for i in range(1, 20001))
    responses = await read_all(data + b"A1 OK done\r\n")
    assert len(responses) == 20001 and responses[-2].number == 20000


async def test_overlong_line_and_literal_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError):
        await read_all(b"* OK " + b"x" * 5000 + b"\r\n", limit=1024)
    reader = asyncio.StreamReader()
    reader.feed_data(b"* 1 FETCH (BODY[] {999999999}\r\n")
    with pytest.raises(ProtocolError):
        await read_response(reader, max_literal=1000)


def test_status_responses_keep_code_and_free_text() -> None:
    r = parse_response([b'A7 NO [AUTHENTICATIONFAILED] Authentication failed. (x "y'])
    assert (r.kind, r.code, r.text) == ("NO", "AUTHENTICATIONFAILED", 'Authentication failed. (x "y')
    assert r.describe() == 'NO [AUTHENTICATIONFAILED] Authentication failed. (x "y'
    r = parse_response([b"* OK [UIDVALIDITY 3857529045] UIDs valid"])
    assert (r.tag, r.code, r.code_args) == ("*", "UIDVALIDITY", "3857529045")
    r = parse_response([b"* OK [PERMANENTFLAGS ()] Read-only mailbox."])
    assert (r.code, r.code_args) == ("PERMANENTFLAGS", "()")
    assert parse_response([b"+ idling"]).kind == "CONTINUE"


def test_data_responses() -> None:
    r = parse_response([b'* LIST (\\HasNoChildren \\Sent) "/" "Sent Items"'])
    assert r.data == [["\\HasNoChildren", "\\Sent"], "/", "Sent Items"]
    r = parse_response([b"* LIST (\\Noselect) NIL \"\""])
    assert r.data == [["\\Noselect"], None, ""]
    assert parse_response([b"* SEARCH 3 5 8"]).data == ["3", "5", "8"]
    assert parse_response([b"* SEARCH"]).data == []
    r = parse_response([b'* ESEARCH (TAG "G3") UID ALL 1:3,7'])
    assert r.data == [["TAG", "G3"], "UID", "ALL", "1:3,7"]
    r = parse_response([b'* 4 FETCH (BODY[HEADER.FIELDS (FROM "TO")] "x\\"y" MODSEQ (12))'])
    assert r.data == [["BODY[HEADER.FIELDS (FROM \"TO\")]", 'x"y', "MODSEQ", ["12"]]]


@pytest.mark.parametrize("bad", [b"* 1 FETCH (UID 1", b"* 1 FETCH UID 1)", b"garbage", b"A1 FETCH x"])
def test_malformed_responses_are_protocol_errors(bad: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_response([bad])


def test_quote_astring() -> None:
    assert protocol.quote_astring("INBOX") == "INBOX"
    assert protocol.quote_astring("Sent Items") == '"Sent Items"'
    assert protocol.quote_astring('a"b\\c') == '"a\\"b\\\\c"'
    assert protocol.quote_astring("") == '""'
    assert protocol.quote_astring("NIL") == '"NIL"'
    assert protocol.quote_astring("pässword") == protocol.Literal("pässword".encode())
    assert protocol.quote_astring("two\r\nlines") == protocol.Literal(b"two\r\nlines")


@given(st.sets(st.integers(min_value=1, max_value=10 ** 6), min_size=1, max_size=300))
def test_uid_sets_round_trip(uids: set[int]) -> None:
    text = protocol.uid_set(uids)
    assert protocol.parse_uid_set(text) == sorted(uids)
    assert text.count(",") < len(uids)


def test_uid_set_examples() -> None:
    assert protocol.uid_set([9, 1, 2, 3, 5, 10]) == "1:3,5,9:10"
    assert protocol.parse_uid_set("4:*", largest=6) == [4, 5, 6]
    with pytest.raises(ValueError):
        protocol.uid_set([])


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40))
def test_mailbox_names_round_trip(name: str) -> None:
    encoded = protocol.encode_mailbox(name)
    assert encoded.isascii()
    assert protocol.decode_mailbox(encoded) == name


def test_mailbox_name_examples() -> None:
    # RFC 3501 5.1.3's example
    assert protocol.decode_mailbox("~peter/mail/&U,BTFw-/&ZeVnLIqe-") == "~peter/mail/台北/日本語"
    assert protocol.encode_mailbox("Entwürfe & Co") == "Entw&APw-rfe &- Co"


def test_internaldate_round_trip() -> None:
    when = datetime(2024, 2, 1, 3, 4, 5, tzinfo=timezone(-timedelta(hours=7)))
    text = protocol.format_internaldate(when)
    assert text == '"01-Feb-2024 03:04:05 -0700"'
    assert protocol.parse_internaldate(text.strip('"')) == when
    assert protocol.parse_internaldate(" 1-Feb-2024 03:04:05 +0000") == datetime(2024, 2, 1, 3, 4, 5,
                                                                                  tzinfo=UTC)
    assert protocol.parse_internaldate("yesterday") is None
    assert protocol.format_search_date(when) == "1-Feb-2024"


GMAIL = [Folder("INBOX", "/", frozenset({"\\HasNoChildren"})),
         Folder("[Gmail]", "/", frozenset({"\\Noselect", "\\HasChildren"})),
         Folder("[Gmail]/All Mail", "/", frozenset({"\\All"})),
         Folder("[Gmail]/Sent Mail", "/", frozenset({"\\Sent"})),
         Folder("[Gmail]/Spam", "/", frozenset({"\\Junk"})),
         Folder("[Gmail]/Important", "/", frozenset({"\\Important"})),
         Folder("Clients", "/", frozenset())]
NO_SPECIAL_USE = [Folder("INBOX", "."), Folder("INBOX.Sent", "."), Folder("INBOX.Junk", "."),
                  Folder("INBOX.Trash", "."), Folder("INBOX.Customers", ".")]


def test_folder_resolution_through_special_use() -> None:
    assert _resolve("Sent", GMAIL) == GMAIL[3]
    assert _resolve("\\Sent", GMAIL) == GMAIL[3]
    assert _resolve("inbox", GMAIL) == GMAIL[0]
    assert _resolve("Clients", GMAIL) == GMAIL[6]
    assert _resolve("clients", GMAIL) == GMAIL[6]
    for refused in ("All Mail", "[Gmail]/All Mail", "Spam", "Junk", "[Gmail]/Spam", "Important"):
        reason = _resolve(refused, GMAIL)
        assert isinstance(reason, str) and "never synced" in reason, refused
    assert "Noselect" in str(_resolve("[Gmail]", GMAIL))
    assert "no such folder" in str(_resolve("Archive", GMAIL))


def test_folder_resolution_without_special_use_goes_by_well_known_names() -> None:
    assert _resolve("Sent", NO_SPECIAL_USE) == NO_SPECIAL_USE[1]
    assert _resolve("INBOX.Customers", NO_SPECIAL_USE) == NO_SPECIAL_USE[4]
    assert "never synced" in str(_resolve("INBOX.Junk", NO_SPECIAL_USE))
    assert "never synced" in str(_resolve("Trash", NO_SPECIAL_USE))
