"""IMAP answers from a broken or hostile server (issue 12 item 3): every one of them is a
`ProtocolError` in the parser and a typed `AccountUnavailable` from the client (what the
tailer treats as a protocol failure), in time and memory bounded by the bytes received.

The client tests talk to a scripted server on a local socket: it answers each command
with the lines given for its name."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import AccountUnavailable
from gateway.imap import protocol
from gateway.imap.client import SEARCH_LIMIT, IMAPClient
from gateway.imap.protocol import ProtocolError, parse_response, read_response

FUZZ = settings(max_examples=150, deadline=timedelta(milliseconds=300),
                suppress_health_check=[HealthCheck.too_slow])


def parse_line(line: bytes) -> protocol.Response:
    return parse_response([line])


# --- numbers and sequence sets ------------------------------------------------------


@pytest.mark.parametrize("text", ["²", "1²", "١٢", " 1", "1_0", "+5", "-1", "", "1" * 5000,
                                  str(2**64), "0x10"],
                         ids=["sup2", "1sup2", "arabic", "space", "underscore", "plus", "minus",
                              "empty", "5000-digits", "2^64", "hex"])
def test_numbers_are_ascii_digits_within_bounds(text: str) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_number(text)


def test_number_bounds() -> None:
    assert protocol.parse_number("9223372036854775807") == protocol.NUMBER_MAX
    assert protocol.parse_number("4294967295", limit=protocol.UID_MAX) == protocol.UID_MAX
    with pytest.raises(ProtocolError):
        protocol.parse_number("4294967296", limit=protocol.UID_MAX)


def test_a_huge_sequence_set_is_refused_before_it_is_expanded() -> None:
    start = time.perf_counter()
    with pytest.raises(ProtocolError, match="4294967295 UIDs"):
        protocol.parse_uid_set("1:4294967295", limit=1_000_000)
    assert time.perf_counter() - start < 0.1     # 1:20000000 took 78 s and 1.6 GB before
    assert protocol.uid_ranges("1:4294967295,7") == [(1, 4294967295), (7, 7)]
    assert protocol.parse_uid_set("1:4294967295", low=4294967290) == list(range(4294967290, 4294967296))
    assert protocol.parse_uid_set("10:3,20", low=5, high=12) == [5, 6, 7, 8, 9, 10]
    assert protocol.parse_uid_set("3,5:6", limit=3) == [3, 5, 6]


@pytest.mark.parametrize("text", ["1:²", "0", "0:5", "1:4294967296", "a", "1:2:3", "1" * 5000, "1,,x"],
                         ids=["unicode", "zero", "zero-range", "above-2^32", "atom", "two-colons",
                              "5000-digits", "trailing-atom"])
def test_sequence_sets_with_non_uids_are_protocol_errors(text: str) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_uid_set(text)


@pytest.mark.parametrize("line", [b"* 1\xc2\xb2 EXISTS", b"* " + b"9" * 5000 + b" EXISTS",
                                  b"* 99999999999 FETCH (UID 1)"],
                         ids=["unicode", "5000-digits", "above-2^32"])
def test_message_numbers_in_responses(line: bytes) -> None:
    if line.startswith(b"* 1\xc2"):
        assert parse_line(line).number is None        # not a number: an unknown data kind
    else:
        with pytest.raises(ProtocolError):
            parse_line(line)


async def test_a_literal_size_of_5000_digits_is_a_protocol_error() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"* 1 FETCH (BODY[] {" + b"9" * 5000 + b"}\r\n")
    reader.feed_eof()
    with pytest.raises(ProtocolError):
        await read_response(reader)


_IMAP_PIECES = st.sampled_from([
    "*", " ", "OK", "ESEARCH", "SEARCH", "FETCH", "EXISTS", "(", ")", '"', "\\", "[", "]",
    "UIDVALIDITY", "ALL", "1", "9" * 30, ":", ",", "*", "²", "{5}", "NIL", "UID", "TAG", "x",
    "4294967295", "0",
])


@FUZZ
@given(st.lists(_IMAP_PIECES, max_size=60), st.integers(1, 50))
def test_fuzz_response_parser(pieces: list[str], repeat: int) -> None:
    line = ("".join(pieces) * repeat).encode()
    try:
        r = parse_line(line)
    except ProtocolError:
        return
    for item in r.data:
        if isinstance(item, str):
            try:
                protocol.parse_uid_set(item, limit=10_000)
            except ProtocolError:
                pass


# --- the client against a scripted server -------------------------------------------


class Script:
    """A one-connection IMAP server answering each command from `answers` (command name
    -> untagged lines; the tagged OK follows)."""

    def __init__(self, answers: dict[str, list[bytes]], caps: bytes = b"IMAP4rev1 ESEARCH") -> None:
        self.answers = answers
        self.caps = caps
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: list[tuple[asyncio.Task[None], asyncio.StreamWriter]] = []

    async def __aenter__(self) -> Script:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task, writer in self._conns:   # end each connection; its handler sees EOF
            writer.close()
            await task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.append((task, writer))
        writer.write(b"* OK [CAPABILITY " + self.caps + b"] ready\r\n")
        try:
            while line := await reader.readline():
                tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
                words = rest.split(b" ")
                name = (b" ".join(words[:2]) if words[0].upper() == b"UID" else words[0]).upper()
                if name == b"CAPABILITY":
                    writer.write(b"* CAPABILITY " + self.caps + b"\r\n")
                for out in self.answers.get(name.decode(), []):
                    writer.write(out + b"\r\n")
                writer.write(tag + b" OK done\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


EXAMINE_OK = [b"* 3 EXISTS", b"* OK [UIDVALIDITY 7] ok", b"* OK [UIDNEXT 4] ok"]


Connect = Callable[["Script"], Awaitable[IMAPClient]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    clients: list[IMAPClient] = []

    async def make(script: Script) -> IMAPClient:
        c = IMAPClient("127.0.0.1", script.port, tls="none", timeout=5, connect_timeout=5)
        clients.append(c)
        await c.connect()
        await c.login("u", "p")
        return c

    yield make
    for c in clients:
        c.close()


@pytest.mark.parametrize("answer", [
    b"* ESEARCH (TAG \"x\") UID ALL 1:4294967295",
    b"* ESEARCH (TAG \"x\") UID ALL 1:\xc2\xb2",
    b"* ESEARCH (TAG \"x\") UID ALL (1)",
    b"* SEARCH 1 \xc2\xb2",
    b"* SEARCH 1 " + b"9" * 5000,
    b"* SEARCH 1 4294967296",
], ids=["esearch-4G", "esearch-unicode", "esearch-list", "search-unicode", "search-5000-digits",
        "search-too-large"])
async def test_bad_search_answers_are_typed_failures(connect: Connect, answer: bytes) -> None:
    caps = b"IMAP4rev1 ESEARCH" if b"ESEARCH" in answer else b"IMAP4rev1"
    async with Script({"EXAMINE": EXAMINE_OK, "UID SEARCH": [answer]}, caps) as script:
        c = await connect(script)
        await c.examine("INBOX")
        start = time.perf_counter()
        with pytest.raises(AccountUnavailable):
            await c.search_uids(1)
        assert time.perf_counter() - start < 2.0


async def test_an_esearch_range_is_clipped_to_what_was_asked(connect: Connect) -> None:
    answer = b"* ESEARCH (TAG \"x\") UID ALL 1:4294967295"
    async with Script({"EXAMINE": EXAMINE_OK, "UID SEARCH": [answer]}) as script:
        c = await connect(script)
        await c.examine("INBOX")
        assert await c.search_uids(4294967290) == list(range(4294967290, 4294967296))
        assert await c.search_uids(10, 12) == [10, 11, 12]


async def test_search_answers_up_to_the_limit_are_read(connect: Connect) -> None:
    answer = b"* ESEARCH (TAG \"x\") UID ALL 1:%d" % SEARCH_LIMIT
    async with Script({"EXAMINE": EXAMINE_OK, "UID SEARCH": [answer]}) as script:
        c = await connect(script)
        await c.examine("INBOX")
        assert len(await c.search_uids(1)) == SEARCH_LIMIT


@pytest.mark.parametrize("answer", [b"* OK [UIDVALIDITY] x", b"* OK [UIDVALIDITY \xc2\xb2] x",
                                    b"* OK [UIDNEXT " + b"1" * 5000 + b"] x",
                                    b"* OK [HIGHESTMODSEQ 99999999999999999999] x"],
                         ids=["no-number", "unicode", "5000-digits", "above-2^63"])
async def test_bad_examine_answers_are_typed_failures(connect: Connect, answer: bytes) -> None:
    async with Script({"EXAMINE": [b"* 3 EXISTS", answer, b"* OK [UIDVALIDITY 7] ok"]}) as script:
        c = await connect(script)
        with pytest.raises(AccountUnavailable):
            await c.examine("INBOX")


async def test_a_good_mailbox_still_reads(connect: Connect) -> None:
    async with Script({"EXAMINE": EXAMINE_OK, "UID SEARCH": [b"* SEARCH 1 3 (MODSEQ 9)"]},
                      b"IMAP4rev1") as script:
        c = await connect(script)
        state = await c.examine("INBOX")
        assert (state.uidvalidity, state.uidnext, state.exists) == (7, 4, 3)
        assert await c.search_uids(2) == [3]
