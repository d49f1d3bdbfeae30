"""The Sent-copy queue's files on disk: sent-copies/{tmp,new,failed}, one file per copy."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from gateway.config import Account, Config
from gateway.ids import valid_queue_id
from gateway.imap.client import IMAPClient
from gateway.imap.sent import SentCopies
from gateway.imap.slots import ConnectionSlots


def no_config() -> Config:
    raise AssertionError("the queue's files need no configuration")


async def no_imap(account: Account) -> IMAPClient:
    raise AssertionError("nothing is appended in these tests")


def queue(directory: Path) -> SentCopies:
    return SentCopies(directory, no_config, no_imap, ConnectionSlots(1), None)


async def test_a_copy_is_one_file_in_new(tmp_path: Path) -> None:
    sent = queue(tmp_path / "sent-copies")
    raw = b"Message-ID: <a@gw>\r\nSubject: x\r\n\r\nbody\r\n"
    qid = await sent.enqueue("rep", raw)
    assert valid_queue_id(qid)
    root = tmp_path / "sent-copies"
    assert sorted(p.name for p in root.iterdir()) == ["failed", "new", "tmp"]
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o7027 == 0 for p in root.iterdir())
    assert (root / "new" / qid).read_bytes() == b"MAILGW-SENT 1 rep\n" + raw
    assert list((root / "tmp").iterdir()) == []
    assert sent.pending() == {"rep": [qid]}
    assert sent._read(qid) == ("rep", raw)
    with pytest.raises(ValueError):
        await sent.enqueue("a/b", raw)


async def test_a_restart_drops_half_written_copies_and_keeps_queued_ones(tmp_path: Path) -> None:
    sent = queue(tmp_path / "sent-copies")
    qid = await sent.enqueue("rep", b"Subject: x\r\n\r\n")
    (tmp_path / "sent-copies" / "tmp" / f"{qid}X.1234").write_bytes(b"MAILGW-SENT 1 re")
    again = queue(tmp_path / "sent-copies")
    again._recover()
    assert list((tmp_path / "sent-copies" / "tmp").iterdir()) == []
    assert again.pending() == {"rep": [qid]}


async def test_a_failed_copy_is_kept_with_its_reason(tmp_path: Path) -> None:
    sent = queue(tmp_path / "sent-copies")
    qid = await sent.enqueue("rep", b"Subject: x\r\n\r\n")
    sent._fail(qid, "rep", "APPEND refused: [TOOBIG]")
    failed = tmp_path / "sent-copies" / "failed"
    assert sorted(p.name for p in failed.iterdir()) == [qid, f"{qid}.reason"]
    assert (failed / f"{qid}.reason").read_text() == "rep: APPEND refused: [TOOBIG]\n"
    assert sent.failed_ids() == [qid] and sent.pending() == {} and sent.failed == 1
    sent._fail(qid, "rep", "again")            # already moved: nothing breaks
    sent._done(qid)                             # gone from new/: nothing breaks
