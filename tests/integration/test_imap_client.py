"""The IMAP client against a real Dovecot on loopback: folders, read-only fetches, IDLE, failures, auth."""

from __future__ import annotations

import asyncio
import email
import email.policy
import itertools
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.accounts.grants import GrantClient
from gateway.accounts.tokens import ConfigAccounts, TokenService
from gateway.config import Account, Config
from gateway.errors import (
    AccountAuthError,
    AccountTimeout,
    AccountUnavailable,
    FolderError,
    IMAPCommandError,
)
from gateway.imap import protocol
from gateway.imap.account import open_account
from gateway.imap.client import IMAPClient
from gateway.keys.tokens import MemoryTokenStore, TokenCipher
from tests.conftest import free_port, require_tool
from tests.integration.harness import wait_until
from tests.support.dovecot import Dovecot, message
from tests.support.oauth_server import TokenServer

pytestmark = pytest.mark.integration

_n = itertools.count(1)


@pytest.fixture(scope="module")
def token_server() -> Iterator[TokenServer]:
    with TokenServer() as ts:
        yield ts


@pytest.fixture(scope="module")
def dovecot(token_server: TokenServer) -> Iterator[Dovecot]:
    require_tool("dovecot")
    with Dovecot(tls=True, tokeninfo_url=token_server.tokeninfo_url) as dc:
        yield dc


@pytest.fixture
def user(dovecot: Dovecot) -> str:
    """A fresh mailbox owner per test, so tests never see each other's mail."""
    name = f"user{next(_n)}-{int(time.time() * 1000) % 100000}@example.test"
    dovecot.add_user(name, "pw-" + name)
    return name


def client(dc: Dovecot, **kw: Any) -> IMAPClient:
    kw.setdefault("timeout", 10.0)
    kw.setdefault("connect_timeout", 10.0)
    return IMAPClient(dc.host, dc.port, tls="none", **kw)


@pytest.fixture
async def imap(dovecot: Dovecot, user: str) -> AsyncIterator[IMAPClient]:
    c = client(dovecot)
    await c.connect()
    await c.authenticate_password(user, dovecot.users[user])
    try:
        yield c
    finally:
        await c.logout()


# -- folders -----------------------------------------------------------------------------

async def test_special_use_folders_resolve_and_unsynced_ones_are_refused(imap: IMAPClient) -> None:
    folders = {f.name: f for f in await imap.list_folders()}
    assert folders["Sent Items"].special_use == "\\Sent"
    assert folders["All Mail"].special_use == "\\All"

    got = await imap.resolve_folders(["INBOX", "Sent", "Archive", "\\Sent", "Sent Items"])
    assert [f.name for f in got] == ["INBOX", "Sent Items", "Archive"]

    with pytest.raises(FolderError) as err:
        await imap.resolve_folders(["INBOX", "Junk", "Drafts", "Trash", "All Mail", "Starred",
                                    "No Such Folder"])
    problems = err.value.problems
    assert set(problems) == {"Junk", "Drafts", "Trash", "All Mail", "Starred", "No Such Folder"}
    assert "\\Junk" in problems["Junk"] and "never synced" in problems["Junk"]
    assert "\\All" in problems["All Mail"]
    assert "\\Flagged" in problems["Starred"]
    assert "no such folder" in problems["No Such Folder"]


async def test_unicode_folder_names_round_trip(dovecot: Dovecot, user: str) -> None:
    await asyncio.to_thread(dovecot.create_mailbox, user, protocol.encode_mailbox("Kunden/Büro"))
    async with client(dovecot) as c:
        await c.authenticate_password(user, dovecot.users[user])
        [folder] = await c.resolve_folders(["Kunden/Büro"])
        state = await c.examine(folder)
        assert state.name == "Kunden/Büro" and state.exists == 0


# -- reading never changes anything -------------------------------------------------------

async def test_examine_and_fetch_never_set_seen(dovecot: Dovecot, user: str, imap: IMAPClient) -> None:
    unread = [dovecot.append(user, "INBOX", message(f"unread {i}")) for i in range(3)]
    seen = dovecot.append(user, "INBOX", message("already read"), flags=["\\Seen"])
    state = await imap.examine("INBOX")
    assert state.read_only and state.exists == 4
    heads = [h async for h in imap.fetch_headers([*unread, seen])]
    assert [h.uid for h in heads] == [*unread, seen]
    assert all("\\Seen" not in h.flags for h in heads[:3]) and "\\Seen" in heads[3].flags
    bodies = [b async for b in imap.fetch_bodies([*unread, seen])]
    assert len(bodies) == 4

    # a second, independent session sees the same flags as before
    after = await asyncio.to_thread(dovecot.all_flags, user, "INBOX")
    for uid in unread:
        assert "\\Seen" not in after[uid], after
    assert "\\Seen" in after[seen]


async def test_header_first_then_bodies_of_the_chosen_ones(dovecot: Dovecot, user: str,
                                                           imap: IMAPClient) -> None:
    when = datetime(2024, 3, 5, 10, 30, 0, tzinfo=UTC)
    raws = {}
    for i, sender in enumerate(["lead@customer.example", "noreply@newsletter.example",
                                "ceo@customer.example"]):
        raw = message(f"msg {i}", sender=sender, body=f"body {i} (with an unbalanced paren\r\n" * 50)
        raws[dovecot.append(user, "INBOX", raw, date=when + timedelta(hours=i))] = raw
    await imap.examine("INBOX")
    uids = await imap.search_uids(1)
    assert uids == sorted(raws)

    heads = [h async for h in imap.fetch_headers(sorted(uids, reverse=True))]
    assert [h.uid for h in heads] == sorted(uids, reverse=True)
    for h in heads:
        parsed = email.message_from_bytes(h.header, policy=email.policy.default)
        assert parsed["Message-ID"] and parsed["From"] and parsed["Subject"]
        assert b"body" not in h.header                   # headers only
        assert h.size == len(raws[h.uid])
        assert h.internaldate == when + timedelta(hours=sorted(raws).index(h.uid))
        assert h.modseq is not None                      # CONDSTORE is on
    wanted = [h.uid for h in heads if "customer.example" in
              str(email.message_from_bytes(h.header, policy=email.policy.default)["From"])]
    assert len(wanted) == 2
    bodies = {b.uid: b.raw async for b in imap.fetch_bodies(wanted)}
    assert bodies == {uid: raws[uid] for uid in wanted}  # byte for byte


async def test_fetches_go_in_batches_of_at_most_200(dovecot: Dovecot, user: str) -> None:
    now = datetime.now(UTC)
    dovecot.fill(user, ((message(f"bulk {i}", body=f"line {i}\r\n" * 20), [], now - timedelta(minutes=i))
                        for i in range(450)))
    sent: list[str] = []

    class Recording(IMAPClient):
        async def _send_command(self, tag: str, words: Sequence[str | protocol.Literal],
                                scrub: bool = False) -> protocol.Response | None:
            if list(words[:2]) == ["UID", "FETCH"]:
                sent.append(str(words[2]))
            return await super()._send_command(tag, words, scrub)

    async with Recording(dovecot.host, dovecot.port, tls="none", timeout=10) as c:
        await c.authenticate_password(user, dovecot.users[user])
        state = await c.examine("INBOX")
        assert state.exists == 450
        uids = await c.search_since(now - timedelta(days=2))
        assert len(uids) == 450
        newest_first = sorted(uids, reverse=True)
        heads = [h async for h in c.fetch_headers(newest_first)]
        assert [h.uid for h in heads] == newest_first
        assert len(sent) == 3
        assert all(len(protocol.parse_uid_set(s)) <= 200 for s in sent)
        bodies = [b async for b in c.fetch_bodies(newest_first[:120], batch=50)]
        assert len(bodies) == 120 and len(sent) == 6
        assert all(b.raw.startswith(b"From: ") for b in bodies)


async def test_flag_changes_since_a_modseq(dovecot: Dovecot, user: str, imap: IMAPClient) -> None:
    uids = [dovecot.append(user, "INBOX", message(f"m{i}")) for i in range(3)]
    state = await imap.examine("INBOX")
    assert state.highestmodseq is not None
    assert await imap.changed_since(state.highestmodseq) == []
    await asyncio.to_thread(dovecot.store_flags, user, "INBOX", uids[1], ["\\Seen"])
    changes = await imap.changed_since(state.highestmodseq)
    assert [(c.uid, "\\Seen" in c.flags) for c in changes] == [(uids[1], True)]
    assert changes[0].modseq is not None and changes[0].modseq > state.highestmodseq


async def test_append_puts_the_sent_copy_in_sent(dovecot: Dovecot, user: str, imap: IMAPClient) -> None:
    [sent] = await imap.resolve_folders(["Sent"])
    raw = message("sent through the gateway", sender=user, to="lead@customer.example")
    when = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    uid = await imap.append(sent, raw, date=when)
    assert uid is not None
    assert dovecot.flags(user, "Sent Items", uid) - {"\\Recent"} == {"\\Seen"}
    await imap.examine(sent)
    [body] = [b async for b in imap.fetch_bodies([uid])]
    assert body.raw == raw and body.internaldate == when


async def test_commands_refused_by_the_server_leave_the_connection_usable(imap: IMAPClient) -> None:
    with pytest.raises(IMAPCommandError) as err:
        await imap.examine("Does Not Exist")
    assert "NONEXISTENT" in err.value.server_text or "exist" in err.value.server_text.lower()
    assert (await imap.examine("INBOX")).exists == 0


# -- IDLE --------------------------------------------------------------------------------

async def wait_idling(c: IMAPClient, task: asyncio.Task[Any], timeout: float = 10.0) -> None:
    """Until `c` is in IDLE; `idle()` ending first fails the test (with its error, if any)."""
    await wait_until(lambda: c.idling or task.done(), timeout, "IDLE to start")
    if not c.idling:
        task.result()
        raise AssertionError("idle() returned before idling")


async def test_idle_wakes_up_on_new_mail(dovecot: Dovecot, user: str, imap: IMAPClient) -> None:
    dovecot.append(user, "INBOX", message("first"))
    state = await imap.examine("INBOX")
    task = asyncio.create_task(imap.idle(interval=60))
    await wait_idling(imap, task)
    uid = await asyncio.to_thread(dovecot.append, user, "INBOX", message("second"))
    async with asyncio.timeout(10):                      # the mail ends it, long before 60 s
        result = await task
    assert result.reason == "event"
    assert result.exists == state.exists + 1
    assert await imap.search_uids(uid) == [uid]          # the connection goes on after DONE


async def test_idle_returns_when_the_interval_elapses_and_probes_liveness(dovecot: Dovecot,
                                                                          user: str) -> None:
    class Counting(IMAPClient):
        dones = 0

        async def _write(self, data: bytes) -> None:
            if data == b"DONE\r\n":
                self.dones += 1
            await super()._write(data)

    c = Counting(dovecot.host, dovecot.port, tls="none", timeout=10.0, connect_timeout=10.0,
                 idle_liveness=0.3)
    async with c:
        await c.authenticate_password(user, dovecot.users[user])
        await c.examine("INBOX")
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(10):
            result = await c.idle(interval=2.0)
        assert result.reason == "interval" and result.events == ()
        assert loop.time() - started >= 2.0              # not before the interval (cannot race)
        assert c.dones >= 2                              # silence: DONE proved it alive, IDLE again
        assert await c.noop() == []                      # DONE was clean: still in step


async def test_changes_seen_between_commands_are_returned_without_idling(dovecot: Dovecot, user: str,
                                                                         imap: IMAPClient) -> None:
    await imap.examine("INBOX")
    await asyncio.to_thread(dovecot.append, user, "INBOX", message("arrives"))
    events = await imap.noop()
    assert [e.kind for e in events if e.kind == "EXISTS"] == ["EXISTS"]


async def test_server_stopped_mid_idle_is_a_quick_typed_temporary_error(dovecot: Dovecot,
                                                                        user: str) -> None:
    c = client(dovecot, timeout=5)
    await c.connect()
    await c.authenticate_password(user, dovecot.users[user])
    await c.examine("INBOX")
    task = asyncio.create_task(c.idle(interval=600))
    await wait_idling(c, task)
    await asyncio.to_thread(dovecot.stop)
    try:
        with pytest.raises(AccountUnavailable) as err:
            async with asyncio.timeout(15):              # at once: neither interval nor liveness
                await task
        assert err.value.temporary
        with pytest.raises(AccountUnavailable):          # the client stays failed
            await c.noop()
        with pytest.raises(AccountUnavailable):          # nothing listens while it is down
            await client(dovecot).connect()
    finally:
        await asyncio.to_thread(dovecot.start)
    async with client(dovecot) as again:                 # and a new client works after restart
        await again.authenticate_password(user, dovecot.users[user])
        assert (await again.examine("INBOX")).exists == 0


async def test_server_killed_mid_idle_is_a_typed_temporary_error(dovecot: Dovecot, user: str) -> None:
    c = client(dovecot, timeout=5)
    await c.connect()
    await c.authenticate_password(user, dovecot.users[user])
    await c.examine("INBOX")
    task = asyncio.create_task(c.idle(interval=600))
    await wait_idling(c, task)
    await asyncio.to_thread(dovecot.kill)
    try:
        with pytest.raises(AccountUnavailable):
            async with asyncio.timeout(15):
                await task
    finally:
        await asyncio.to_thread(dovecot.start)


async def test_server_that_stops_answering_mid_idle_is_a_timeout(dovecot: Dovecot, user: str) -> None:
    """Liveness: silence during IDLE leads to DONE, and no answer to DONE is AccountTimeout."""
    c = client(dovecot, timeout=1.0, idle_liveness=0.5)
    await c.connect()
    await c.authenticate_password(user, dovecot.users[user])
    await c.examine("INBOX")
    task = asyncio.create_task(c.idle(interval=600))
    await wait_idling(c, task)
    pids = await asyncio.to_thread(dovecot.freeze, user)
    assert pids
    try:
        with pytest.raises(AccountTimeout):
            async with asyncio.timeout(10):              # liveness 0.5 s + no reply to DONE in 1 s
                await task
    finally:
        dovecot.thaw(pids)


async def test_silent_server_is_a_timeout_not_a_hang() -> None:
    """A peer that accepts but never speaks: connect gives up after connect_timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        c = IMAPClient("127.0.0.1", port, tls="none", connect_timeout=0.5)
        with pytest.raises(AccountTimeout):
            async with asyncio.timeout(5):               # connect_timeout ends it, not this
                await c.connect()
    finally:
        listener.close()


async def test_connection_refused_is_temporary() -> None:
    with pytest.raises(AccountUnavailable) as err:
        await IMAPClient("127.0.0.1", free_port(), tls="none", connect_timeout=5).connect()
    assert err.value.temporary


async def test_uidvalidity_change_is_visible(dovecot: Dovecot, user: str) -> None:
    dovecot.append(user, "INBOX", message("before"))
    async with client(dovecot) as c:
        await c.authenticate_password(user, dovecot.users[user])
        before = await c.examine("INBOX")
    new = before.uidvalidity + 1000
    await asyncio.to_thread(dovecot.set_uid_validity, user, "INBOX", new)
    async with client(dovecot) as c:
        await c.authenticate_password(user, dovecot.users[user])
        after = await c.examine("INBOX")
    assert before.uidvalidity != after.uidvalidity == new


# -- TLS ---------------------------------------------------------------------------------

async def test_starttls_and_implicit_tls_verify_the_certificate(dovecot: Dovecot, user: str,
                                                                tmp_path: Path) -> None:
    assert dovecot.tls_port is not None and dovecot.ca_file is not None
    async with IMAPClient("localhost", dovecot.port, tls="starttls", ca_file=dovecot.ca_file,
                          timeout=10) as c:
        assert "STARTTLS" not in c.capabilities           # capabilities were asked again
        await c.authenticate_password(user, dovecot.users[user])
    async with IMAPClient("localhost", dovecot.tls_port, tls="implicit", ca_file=dovecot.ca_file,
                          timeout=10) as c:
        await c.authenticate_password(user, dovecot.users[user])
        assert (await c.examine("INBOX")).read_only
    from tests.support.tlscert import make_cert
    other = make_cert(tmp_path, stem="other")
    with pytest.raises(AccountUnavailable) as err:
        await IMAPClient("localhost", dovecot.tls_port, tls="implicit", ca_file=other.cert_file,
                         connect_timeout=10).connect()
    assert "certificate" in str(err.value).lower()


# -- authentication ----------------------------------------------------------------------

async def test_wrong_password_is_an_auth_error_with_the_servers_words(dovecot: Dovecot, user: str) -> None:
    for how in ("plain", "login"):
        c = client(dovecot)
        await c.connect()
        with pytest.raises(AccountAuthError) as err:
            async with asyncio.timeout(10):              # a refusal, not a hang
                if how == "plain":
                    await c.authenticate_plain(user, "wrong")
                else:
                    await c.login(user, "wrong")
        assert not err.value.temporary
        assert "[AUTHENTICATIONFAILED]" in err.value.server_text
        assert "Authentication failed" in err.value.server_text
        await c.logout()


async def test_master_user_as_delegate_reads_the_target_mailbox(dovecot: Dovecot, user: str,
                                                                tmp_path: Path) -> None:
    dovecot.append(user, "INBOX", message("for the target user"))
    secret = tmp_path / "master.pw"
    secret.write_text(dovecot.master_password + "\n")
    account = Account.model_validate({
        "id": "delegated", "email": user,
        "imap": {"host": dovecot.host, "port": dovecot.port, "tls": "none"},
        "auth": {"method": "delegate", "username": dovecot.master_user,
                 "password_file": str(secret)}})
    imap = await open_account(account, tmp_path, timeout=10)
    try:
        state = await imap.examine("INBOX")
        assert state.exists == 1
        [h] = [h async for h in imap.fetch_headers(await imap.search_uids(1))]
        assert b"for the target user" in h.header
    finally:
        await imap.logout()

    secret.write_text("not-the-master-password\n")
    with pytest.raises(AccountAuthError):
        await open_account(account, tmp_path, timeout=10)


def _oauth_account(dovecot: Dovecot, token_server: TokenServer, user: str, tmp_path: Path,
                   mechanism: str) -> Account:
    (tmp_path / "refresh").write_text(token_server.issue_refresh_token(user))
    (tmp_path / "client_secret").write_text(token_server.client_secret)
    return Account.model_validate({
        "id": f"oauth-{mechanism}", "email": user,
        "imap": {"host": dovecot.host, "port": dovecot.port, "tls": "none"},
        "auth": {"method": "oauth2", "token_endpoint": token_server.token_url,
                 "client_id": token_server.client_id, "client_secret_file": "client_secret",
                 "refresh_token_file": "refresh", "mechanism": mechanism}})


def _tokens(account: Account, tmp_path: Path, now: list[float]) -> TokenService:
    cfg = Config.model_validate({"accounts": [account.model_dump()],
                                 "source": str(tmp_path / "gateway.yaml")})
    return TokenService(lambda: cfg, ConfigAccounts(lambda: cfg), MemoryTokenStore(),
                        TokenCipher(TokenCipher.generate_key()), GrantClient(clock=lambda: now[0]),
                        clock=lambda: now[0])


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
async def test_oauth2_through_dovecots_oauth2_passdb(dovecot: Dovecot, token_server: TokenServer,
                                                     user: str, tmp_path: Path, mechanism: str) -> None:
    account = _oauth_account(dovecot, token_server, user, tmp_path, mechanism)
    dovecot.append(user, "INBOX", message("oauth mail"))
    now = [time.time()]
    tokens = _tokens(account, tmp_path, now)
    grants_before = len(token_server.grants)
    try:
        imap = await open_account(account, tmp_path, tokens=tokens, timeout=10)
        assert (await imap.examine("INBOX")).exists == 1
        await imap.logout()
        assert len(token_server.grants) == grants_before + 1

        # a second login within the token's life uses the cached token
        imap = await open_account(account, tmp_path, tokens=tokens, timeout=10)
        await imap.logout()
        assert len(token_server.grants) == grants_before + 1

        # near expiry (inside the 5 min margin) the token is refreshed before use
        now[0] += token_server.access_lifetime - 120
        imap = await open_account(account, tmp_path, tokens=tokens, timeout=10)
        await imap.logout()
        assert len(token_server.grants) == grants_before + 2

        # a token the server no longer accepts: refreshed once, then the login works
        token_server.expire_access_tokens()
        imap = await open_account(account, tmp_path, tokens=tokens, timeout=10)
        assert (await imap.examine("INBOX")).exists == 1
        await imap.logout()
        assert len(token_server.grants) == grants_before + 3
    finally:
        await tokens.close()


async def test_oauth2_revoked_grant_and_rejected_token_are_auth_errors(
        dovecot: Dovecot, token_server: TokenServer, user: str, tmp_path: Path) -> None:
    c = client(dovecot)
    await c.connect()
    with pytest.raises(AccountAuthError) as err:
        await c.authenticate_xoauth2(user, "not-a-token")
    assert "AUTHENTICATIONFAILED" in err.value.server_text
    assert '"status":"401"' in err.value.server_text.replace(" ", "")  # the SASL error challenge
    await c.logout()

    account = _oauth_account(dovecot, token_server, user, tmp_path, "xoauth2")
    token_server.revoke_refresh_token((tmp_path / "refresh").read_text())
    tokens = _tokens(account, tmp_path, [time.time()])
    try:
        with pytest.raises(AccountAuthError) as err:
            await open_account(account, tmp_path, tokens=tokens, timeout=10)
        assert "invalid_grant" in err.value.server_text
    finally:
        await tokens.close()


def test_harness_reads_flags_through_its_own_session(dovecot: Dovecot, user: str) -> None:
    """The harness's flag reader must itself not mark mail read, or the tests above prove nothing."""
    uid = dovecot.append(user, "INBOX", message("probe"))
    for _ in range(2):
        assert "\\Seen" not in dovecot.flags(user, "INBOX", uid)
    threading.Thread(target=dovecot.store_flags, args=(user, "INBOX", uid, ["\\Seen"])).run()
    assert "\\Seen" in dovecot.flags(user, "INBOX", uid)
