"""The account service the daemon and the CLI hold: registry, tokens, connect links, probes, in one place.

    accounts = AccountService(get_config, store)
    await accounts.start()                       # polls the store for runtime accounts
    cfg_in_force = accounts.effective(cfg)       # declared + runtime accounts
    await accounts.tokens.access_token("alice")  # TokenSource for IMAP and SMTP
    report = await accounts.test("alice")        # IMAP login + folders, SMTP connect/TLS/AUTH
    await accounts.stop()

It is the AccountStatusSink of delivery and the SecretSource of the IMAP tailers, and
it reruns `registry.refresh()` every `sync.check_interval`, so accounts created, changed
or deleted through another node (or the CLI) take effect here within that time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import aiosmtplib
import structlog

from gateway.accounts.connect import Connect
from gateway.accounts.grants import GrantClient
from gateway.accounts.providers import Providers
from gateway.accounts.registry import AccountRegistry, token_cipher
from gateway.accounts.tokens import TokenService
from gateway.config import Account, Config, read_secret
from gateway.crm.accounts import DBTokenStore
from gateway.crm.store import Store
from gateway.delivery.smtp.connect import NoPasswordMechanism, PasswordRefused, password_login
from gateway.errors import AccountAuthError, AccountError, FolderError, NotFound, StoreError
from gateway.imap.account import open_account
from gateway.oauth import sasl

__all__ = ["AccountService"]

#: connect links are deleted this long after they expired (their outcome is support history)
LINK_HISTORY = timedelta(days=30)


class AccountService:
    """See the module docstring."""

    def __init__(self, get_config: Callable[[], Config], store: Store, *, log: Any = None,
                 grants: GrantClient | None = None,
                 on_change: Callable[[], None] | None = None) -> None:
        cfg = get_config()
        self.get_config = get_config
        self.store = store
        self.log = log or structlog.get_logger("mailgw.accounts")
        cipher = token_cipher(cfg)
        self.registry = AccountRegistry(get_config, store, cipher, log=self.log)
        self.grants = grants or GrantClient()
        self.providers = Providers(get_config, self.grants)
        self.tokens = TokenService(get_config, self.registry, DBTokenStore(store), cipher,
                                   self.grants, providers=self.providers)
        self.connect = Connect(get_config, self.registry, self.grants, self.providers, log=self.log,
                               on_connected=self._connected)
        self.on_change = on_change     # the tailers' wake-up: look at the accounts again now
        self._task: asyncio.Task[None] | None = None

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self.registry.refresh(force=True)
        except StoreError as exc:
            self.log.error("runtime_accounts_unreadable", error=str(exc))
        self._task = asyncio.create_task(self._poll(), name="accounts-poll")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.grants.close()

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        pruned_at = loop.time()
        while True:
            await asyncio.sleep(self.get_config().sync.check_interval)
            try:
                if await self.registry.refresh() and self.on_change is not None:
                    self.on_change()
                if loop.time() - pruned_at > 3600:   # connect links are kept 30 days past expiry
                    pruned_at = loop.time()
                    await self.registry.state.prune_links(LINK_HISTORY)
            except StoreError as exc:
                self.log.warning("runtime_accounts_unreadable", error=str(exc))

    def effective(self, cfg: Config) -> Config:
        return self.registry.effective(cfg)

    async def changed(self) -> None:
        """After a change made here (API, callback): reread and wake the tailers at once."""
        await self.registry.refresh(force=True)
        if self.on_change is not None:
            self.on_change()

    async def _connected(self, account_id: str) -> None:
        self.tokens.forget(account_id)
        await self.changed()

    async def delete(self, account_id: str, *, reason: str) -> str | None:
        """Stop syncing the account (its mail is kept); a runtime OAuth account's refresh token
        is revoked at the provider first (RFC 7009, best effort), since its copy here goes."""
        acct = self.registry.account(account_id)
        if acct is not None and acct.origin == "runtime" and acct.auth.method == "oauth2":
            try:
                token = await self.registry.refresh_token(account_id)
                provider, client, _ = await self.providers.for_account(acct)
                await self.grants.revoke(provider, client, token)
            except (AccountError, StoreError, ValueError) as exc:
                self.log.warning("refresh_token_not_revoked", account=account_id, error=str(exc))
        was = await self.registry.delete(account_id, reason=reason)
        self.tokens.forget(account_id)
        return was

    # -- AccountStatusSink, SecretSource ------------------------------------------------------
    async def needs_reconnect(self, account_id: str, reason: str) -> None:
        was = await self.registry.state.set_status(account_id, "needs_reconnect", reason,
                                                   only_from=("active",))
        if was == "active":
            self.log.warning("account_needs_reconnect", account=account_id, reason=reason)

    async def password(self, account_id: str) -> str:
        return await self.registry.password(account_id)

    # -- probes -------------------------------------------------------------------------------
    async def test(self, account_id: str, *, smtp: bool = True) -> dict[str, Any]:
        """`POST /api/v1/accounts/{id}/test`, `mailgw accounts test`: log in to IMAP and list
        the configured folders, then connect to the SMTP upstream (TLS, EHLO, AUTH) and quit
        without sending. Each part reports ok or the error, with the server's words."""
        acct = self.registry.account(account_id)
        if acct is None:
            raise NotFound(f"no account {account_id!r}")
        ep = acct.imap_endpoint()
        report: dict[str, Any] = {"id": acct.id, "email": acct.email,
                                  "server": f"{ep.host}:{ep.port} ({ep.tls})" if ep else None}
        try:
            report.update(await self._imap(acct))
            report["ok"] = not report.get("folder_problems")
        except AccountError as exc:
            report.update(ok=False, error=str(exc), server_text=exc.server_text or None,
                          kind=type(exc).__name__)
        if smtp:
            report["smtp"] = await self._smtp(acct)
            report["ok"] = bool(report["ok"] and report["smtp"].get("ok", True))
        return report

    async def _imap(self, account: Account) -> dict[str, Any]:
        cfg = self.get_config()
        out: dict[str, Any] = {}
        imap = await open_account(account, cfg.base_dir, tokens=self.tokens, secrets=self,
                                  timeout=cfg.sync.timeout, connect_timeout=cfg.sync.timeout)
        try:
            out["logged_in"] = True
            out["capabilities"] = {c: imap.has(c) for c in ("IDLE", "CONDSTORE", "SPECIAL-USE",
                                                            "UIDPLUS")}
            folders: list[dict[str, Any]] = []
            problems: dict[str, str] = {}
            for want in account.sync.folders:
                try:
                    [f] = await imap.resolve_folders([want])
                except FolderError as exc:
                    problems.update(exc.problems)
                    continue
                state = await imap.examine(f)
                folders.append({"configured": want, "folder": f.name, "special_use": f.special_use,
                                "messages": state.exists, "uidvalidity": state.uidvalidity})
            out["folders"] = folders
            out["folder_problems"] = problems
            try:
                [sent] = await imap.resolve_folders(["Sent"])
                out["sent_copies_to"] = sent.name
            except FolderError as exc:
                out["sent_copies_to"] = None
                out["sent_problem"] = exc.problems.get("Sent")
        finally:
            await imap.logout()
        return out

    async def _smtp(self, account: Account) -> dict[str, Any]:
        """Connect, TLS, EHLO and AUTH at the account's SMTP upstream, then QUIT."""
        ep = account.smtp_endpoint()
        if ep is None:
            return {"ok": True, "skipped": "no SMTP upstream for this account (provider imap "
                                           "without smtp:)"}
        cfg = self.get_config()
        s = account.smtp
        out: dict[str, Any] = {"server": f"{ep.host}:{ep.port} ({ep.tls})"}
        ctx = ssl.create_default_context()
        ca = s.ca_file if s and s.ca_file else None
        if ca:
            ctx.load_verify_locations(cafile=str(cfg.path(ca)))
        client = aiosmtplib.SMTP(hostname=ep.host, port=ep.port, use_tls=ep.tls == "implicit",
                                 start_tls=ep.tls == "starttls", tls_context=ctx,
                                 local_hostname=cfg.hostname, timeout=cfg.delivery.connect_timeout)
        user = (s.username if s else None) or account.auth.username or account.email
        try:
            await client.connect()
            if client.last_ehlo_response is None:   # connect() says EHLO only around STARTTLS
                await client.ehlo()
            out["tls"] = ep.tls != "none"
            out["extensions"] = sorted(client.esmtp_extensions)
            await self._smtp_auth(client, account, user, out)
            out["ok"] = True
        except aiosmtplib.SMTPResponseException as exc:
            out.update(ok=False, error=f"{exc.code} {exc.message}")
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            out.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        except AccountError as exc:
            out.update(ok=False, error=str(exc))
        finally:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                if client.is_connected:
                    await client.quit()
        return out

    async def _smtp_auth(self, client: aiosmtplib.SMTP, account: Account, user: str,
                         out: dict[str, Any]) -> None:
        cfg = self.get_config()
        auth = account.auth
        if auth.uses_tokens:
            mech = sasl.MECHANISMS[auth.mechanism]

            async def attempt(token: str) -> None:
                blob = sasl.initial_response(auth.mechanism, user, token, client.hostname or "",
                                             client.port or 0)
                await _auth_initial(client, mech, blob)

            await _with_retry(attempt, lambda rejected: self.tokens.access_token(
                account.id, rejected=rejected))
            out["auth"] = mech
            return
        s = account.smtp
        ref = (s.password_file if s else None) or auth.password_file
        if ref:
            password = read_secret(ref, cfg.base_dir)
        elif account.origin == "runtime" and auth.method == "password":
            password = await self.registry.password(account.id)
        else:
            out["auth"] = None
            return
        try:   # one mechanism: a second try would count toward the provider's lockout
            out["auth"] = await password_login(client, user, password,
                                               timeout=cfg.delivery.command_timeout,
                                               remote=f"{client.hostname}:{client.port}")
        except NoPasswordMechanism as exc:
            raise AccountError(f"cannot log in to the SMTP server: {exc}") from None
        except PasswordRefused as exc:
            out["auth"] = exc.mechanism
            raise exc.response from None


async def _auth_initial(client: aiosmtplib.SMTP, mechanism: str, blob: bytes) -> None:
    """AUTH with an initial response; an error challenge (334) is answered with an empty line."""
    resp = await client.execute_command(b"AUTH", mechanism.encode(), base64.b64encode(blob))
    if resp.code == 334:
        resp = await client.execute_command(b"")
    if resp.code != 235:
        raise aiosmtplib.SMTPAuthenticationError(resp.code, resp.message)


async def _with_retry(attempt: Callable[[str], Awaitable[None]],
                      token: Callable[[str | None], Awaitable[str]]) -> None:
    first = await token(None)
    try:
        await attempt(first)
    except aiosmtplib.SMTPAuthenticationError as exc:
        if exc.code != 535:
            raise
        try:
            await attempt(await token(first))
        except aiosmtplib.SMTPAuthenticationError as again:
            raise AccountAuthError(f"the SMTP server refused the token: {again.code} {again.message}",
                                   server_text=f"{again.code} {again.message}") from None
