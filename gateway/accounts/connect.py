"""Connecting a rep's mailbox through their OAuth provider: connect links, the callback, the device flow.

    links = Connect(get_config, registry, grants, providers)
    link = await links.create("google", email="alice@example.com", login="alice@example.com")
    link.url            # https://t.example.com/connect/<signed token>; single use, expires
    where = await links.begin(token)          # the rep opened the link: 302 to the provider
    outcome = await links.callback(query)     # the provider sent them back: an Outcome

The flow is the authorization-code grant with PKCE (RFC 7636) and OpenID Connect:

1. `create` stores a row in ``connect_links`` (provider, the address it is for, the user
   who will send as the account, the account to reconnect, sync settings) and returns a
   URL carrying a token signed with a key derived from the token key, which names the
   row and its expiry (`oauth.connect_link_ttl`).
2. `begin` checks the token, that the link is neither used nor expired, makes a PKCE
   verifier and a nonce, keeps them encrypted on the row (so whichever node receives
   the callback can finish) and returns the provider's authorization URL with a signed
   `state` naming the link and this attempt.
3. `callback` checks `state`, that this attempt is the link's latest, exchanges the code,
   verifies the ID token (issuer, audience, expiry, nonce, signature by the provider's
   keys), compares the address the provider vouches for with the one the link was made
   for, marks the link used (once: a second callback finds it used), stores the account
   with its refresh token encrypted (or stores the new refresh token of the account
   being reconnected) and enqueues `account.connected`.

Refused consent, a bad or expired link, a link already used, a `state` that does not
verify, an address that does not match and an address the provider has not verified
each end with an Outcome saying so, and change no account. A refused consent or a
mismatched address leaves the link usable: the rep may try again with the right mailbox.

The device flow (RFC 8628, `mailgw accounts connect`) ends in the same store step.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from gateway.accounts.grants import DeviceAuthorization, GrantClient, Identity, TokenResponse
from gateway.accounts.providers import Providers
from gateway.accounts.registry import AccountRegistry, InvalidAccount
from gateway.config import Config
from gateway.errors import AccountError, Conflict, NotFound
from gateway.oauth.pkce import challenge, new_nonce, new_verifier
from gateway.oauth.providers import OAuthProvider, authorization_url
from gateway.oauth.signed import BadSignature, Expired, InvalidToken, SignedTokens

__all__ = ["CALLBACK_PATH", "LINK_PATH", "Connect", "Link", "Outcome"]

LINK_PATH = "/connect/"
CALLBACK_PATH = "/connect/callback"
#: how long a rep has between opening the link and coming back from the provider
FLOW_TTL = 30 * 60.0
#: the mailbox preset of accounts connected through an OAuth preset
MAIL_PROVIDER = {"google": "gmail", "microsoft": "microsoft365"}


@dataclass(frozen=True)
class Link:
    """A connect link as the API returns it."""

    id: str
    url: str
    provider: str
    email: str | None
    login: str | None
    account_id: str | None
    expires_at: datetime


@dataclass(frozen=True)
class Outcome:
    """How a callback (or the device flow) ended; the public pages render it.

    kind: connected | reconnected | refused | expired | used | invalid | state_invalid |
    mismatch | unverified | failed
    """

    kind: str
    detail: str = ""
    account_id: str | None = None
    email: str | None = None
    expected: str | None = None
    folders: list[str] = field(default_factory=list)
    direction: str | None = None
    provider: str | None = None

    @property
    def ok(self) -> bool:
        return self.kind in ("connected", "reconnected")


def account_id_for(email: str) -> str:
    """An account id made from an address: `alice@example.com` -> `alice-example.com`."""
    local, _, domain = email.lower().partition("@")
    ident = re.sub(r"[^a-z0-9._-]+", "-", f"{local}-{domain}" if domain else local).strip("-._")
    return ident or "account"


def _iso(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class Connect:
    """Connect links and the device flow (see the module docstring)."""

    def __init__(self, get_config: Callable[[], Config], registry: AccountRegistry,
                 grants: GrantClient, providers: Providers, *, log: Any = None,
                 clock: Callable[[], float] = time.time,
                 on_connected: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.get_config = get_config
        self.registry = registry
        self.grants = grants
        self.providers = providers
        self.log = log or structlog.get_logger("mailgw.connect")
        self.clock = clock
        self.signer = SignedTokens(registry.cipher.derive("connect-links"))
        self.on_connected = on_connected   # (account id): drop cached tokens, wake the tailers

    # -- links ------------------------------------------------------------------------------
    def base_url(self) -> str:
        lst = self.get_config().listeners.tracking
        if lst is None or not lst.base_url:
            raise InvalidAccount([("listeners.tracking.base_url",
                                   "connect links live on the public (tracking) listener: configure "
                                   "listeners.tracking with its base_url")])
        return lst.base_url.rstrip("/")

    def redirect_uri(self) -> str:
        return self.base_url() + CALLBACK_PATH

    async def create(self, provider: str, *, email: str | None = None, login: str | None = None,
                     account_id: str | None = None, settings: Mapping[str, Any] | None = None,
                     created_by: str | None = None, ttl: float | None = None) -> Link:
        """A new single-use link for one rep (InvalidAccount names what is wrong)."""
        cfg = self.get_config()
        problems: list[tuple[str, str]] = []
        s = cfg.oauth.settings(provider)
        if s is None:
            names = sorted({*cfg.oauth.providers, "google", "microsoft"})
            problems.append(("provider", f"no OAuth provider {provider!r} (known: {', '.join(names)})"))
        elif not s.client_id:
            problems.append(("provider", f"oauth.providers.{provider} has no client_id: register the "
                                         "gateway as an app at the provider first"))
        if login is not None and cfg.user(login) is None:
            problems.append(("login", f"no user with login {login!r} in users:"))
        if email is not None and not re.fullmatch(r"[^@\s]+@[^@\s]+", email):
            problems.append(("email", f"{email!r} is not an e-mail address"))
        if login is not None and email is None and "@" not in login:
            problems.append(("email", "a link that lets a user send as the mailbox must name the "
                                      "mailbox (email): whoever opens an open link connects theirs"))
        if account_id is not None:
            acct = self.registry.account(account_id)
            if acct is None:
                if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", account_id):
                    problems.append(("account_id", "letters, digits, . _ - (an account id)"))
            else:
                if acct.auth.method != "oauth2":
                    problems.append(("account_id", f"account {account_id} does not use OAuth "
                                                   f"(auth.method {acct.auth.method})"))
                elif acct.oauth_provider_name != provider:
                    problems.append(("provider", f"account {account_id} connects through "
                                                 f"{acct.oauth_provider_name}, not {provider}"))
                if acct.auth.refresh_token_file:
                    problems.append(("account_id", f"account {account_id} takes its refresh token from "
                                                   f"{acct.auth.refresh_token_file} (gateway.yaml); "
                                                   "update that file instead"))
                if email is not None and email.lower() != acct.email.lower():
                    problems.append(("email", f"account {account_id} is {acct.email}, not {email}"))
                email = acct.email
        if settings:
            bad = sorted(set(settings) - {"sync"})
            if bad:
                problems.append((bad[0], "a link's settings take only sync (folders, direction, "
                                         "history_days)"))
        if not problems and s is not None:      # the account the link would create must validate
            probe = self._definition(provider, account_id or "link-check",
                                     email or "rep@example.invalid", login, settings or {})
            try:
                self.registry.validate(probe)
            except InvalidAccount as exc:
                problems += [(k if not k.startswith("id") else "account_id", m) for k, m in exc.problems]
        if problems:
            raise InvalidAccount(problems)
        base = self.base_url()
        if email is None and login is not None and "@" in login:
            email = login
        now = self.clock()
        expires = now + (ttl if ttl is not None else cfg.oauth.connect_link_ttl)
        link_id = secrets.token_hex(16)
        await self.registry.state.create_link({
            "id": link_id, "provider": provider, "email": email.lower() if email else None,
            "login": login, "account_id": account_id,
            "settings": json.dumps(dict(settings)) if settings else None, "created_by": created_by,
            "created_at": _iso(now), "expires_at": _iso(expires)})
        token = self.signer.sign("connect-link", {"l": link_id}, expires)
        return Link(id=link_id, url=f"{base}{LINK_PATH}{token}", provider=provider,
                    email=email, login=login, account_id=account_id, expires_at=_iso(expires))

    async def describe(self, link_id: str) -> dict[str, Any]:
        """A link's state for `GET /api/v1/connect-links/{id}`."""
        row = await self.registry.state.link(link_id)
        if row is None:
            raise NotFound(f"no connect link {link_id!r}")
        now = _iso(self.clock())
        state = ("used" if row["used_at"] else "expired" if row["expires_at"] <= now
                 else "opened" if row["opened_at"] else "new")
        return {"id": row["id"], "provider": row["provider"], "email": row["email"],
                "login": row["login"], "account_id": row["account_id"], "state": state,
                "created_at": row["created_at"].isoformat(), "expires_at": row["expires_at"].isoformat(),
                "opened_at": row["opened_at"].isoformat() if row["opened_at"] else None,
                "used_at": row["used_at"].isoformat() if row["used_at"] else None,
                "result": row["result"], "result_detail": row["result_detail"],
                "result_account": row["result_account"]}

    # -- the browser flow -------------------------------------------------------------------
    async def begin(self, token: str) -> tuple[str | None, Outcome | None]:
        """The rep opened the link: (the provider's authorization URL, None), or (None, why not)."""
        now = self.clock()
        try:
            link_id = str(self.signer.verify("connect-link", token, now=now)["l"])
        except Expired:
            return None, Outcome("expired", "This link has expired. Ask for a new one.")
        except (InvalidToken, KeyError):
            return None, Outcome("invalid", "This is not a valid connect link.")
        row = await self.registry.state.link(link_id)
        if row is None:
            return None, Outcome("invalid", "This connect link does not exist (any more).")
        if row["used_at"] is not None:
            return None, Outcome("used", "This link has been used already. Ask for a new one if you "
                                         "need to connect again.", account_id=row["result_account"])
        if row["expires_at"] <= _iso(now):
            return None, Outcome("expired", "This link has expired. Ask for a new one.")
        try:
            provider, client = await self.providers.get(row["provider"])
            if not provider.authorization_endpoint:
                raise ValueError(f"provider {row['provider']} has no authorization endpoint")
        except (AccountError, ValueError) as exc:
            return None, Outcome("failed", str(exc), provider=row["provider"])
        flow = self._flow(link_id, row) if row["opened_at"] is not None and \
            row["opened_at"].timestamp() + FLOW_TTL > now else None
        if flow is None:    # a new attempt; one in progress is reused, so that a mail scanner
            # opening the link before the rep does not invalidate the rep's sign-in
            flow = {"v": new_verifier(), "n": new_nonce(), "a": secrets.token_hex(8),
                    "t": math.floor(now)}
            if not await self.registry.state.open_link(link_id, self.registry.cipher.seal(
                    f"connect-flow:{link_id}", json.dumps(flow).encode())):
                return None, Outcome("used", "This link has been used already, or has just expired.")
        verifier, nonce, attempt = str(flow["v"]), str(flow["n"]), str(flow["a"])
        # the state lives as long as its attempt (from when the attempt began, not from this
        # opening), so every opening of one attempt hands out the same state
        started = flow.get("t")
        began = float(started) if isinstance(started, int) else now
        state = self.signer.sign("connect-state", {"l": link_id, "a": attempt},
                                 min(began + FLOW_TTL, row["expires_at"].timestamp() + FLOW_TTL))
        url = authorization_url(provider, client.client_id, redirect_uri=self.redirect_uri(),
                                state=state, code_challenge=challenge(verifier), nonce=nonce,
                                login_hint=row["email"])
        return url, None

    async def callback(self, query: Mapping[str, str]) -> Outcome:
        """The provider sent the rep back (`?code=&state=` or `?error=&state=`)."""
        now = self.clock()
        try:
            st = self.signer.verify("connect-state", query.get("state", ""), now=now)
            link_id, attempt = str(st["l"]), str(st["a"])
        except Expired:
            return Outcome("expired", "The sign-in took too long. Open your link again.")
        except (BadSignature, InvalidToken, KeyError):
            return Outcome("state_invalid", "This sign-in response does not belong to a connect link "
                                            "of this gateway (its state does not verify). Nothing was "
                                            "changed.")
        row = await self.registry.state.link(link_id)
        if row is None:
            return Outcome("invalid", "This connect link does not exist (any more).")
        if row["used_at"] is not None:
            return Outcome("used", "This link has been used already.", account_id=row["result_account"])
        flow = self._flow(link_id, row)
        if not flow or flow.get("a") != attempt:
            return Outcome("state_invalid", "This sign-in is not the latest one started from your link "
                                            "(was it opened again?). Nothing was changed; open the "
                                            "link again.")
        provider_name = row["provider"]
        if "error" in query:
            error = re.sub(r"[^a-z_]", "", query.get("error", "").lower())[:40] or "error"
            await self.registry.state.finish_link(link_id, "refused", (
                f"{error}: {query.get('error_description', '')}")[:500])
            if error == "access_denied":
                return Outcome("refused", "You declined to give the gateway access. Nothing was "
                                          "connected; you can open the link again if you change your "
                                          "mind.", provider=provider_name)
            # the provider's own words are not shown: anyone holding a state could put text here
            return Outcome("failed", f"The provider did not grant access (error {error}). Nothing was "
                                     "connected; open the link again or ask for a new one.",
                           provider=provider_name)
        code = query.get("code")
        if not code:
            return Outcome("failed", "The provider's answer has no authorization code.")
        try:
            provider, client = await self.providers.get(provider_name)
            tokens = await self.grants.exchange_code(provider, client, code=code,
                                                     redirect_uri=self.redirect_uri(),
                                                     code_verifier=str(flow["v"]))
            identity = await self._identity(provider, client.client_id, tokens, str(flow["n"]))
        except (AccountError, ValueError) as exc:
            await self.registry.state.finish_link(link_id, "failed", str(exc))
            return Outcome("failed", f"Signing in did not work: {exc}", provider=provider_name)
        settings = json.loads(row["settings"]) if row["settings"] else {}
        return await self._finish(provider_name, identity, tokens, expected=row["email"],
                                  login=row["login"], account_id=row["account_id"], settings=settings,
                                  link_id=link_id)

    def _flow(self, link_id: str, row: Mapping[str, Any]) -> dict[str, Any] | None:
        """The authorization in progress on a link (verifier, nonce, attempt), if readable."""
        blob = row["flow_ciphertext"]
        text = self.registry.cipher.unseal(f"connect-flow:{link_id}", bytes(blob)) if blob else None
        try:
            flow = json.loads(text) if text else None
        except ValueError:
            return None
        return flow if isinstance(flow, dict) else None

    async def _identity(self, provider: OAuthProvider, client_id: str, tokens: TokenResponse,
                        nonce: str | None) -> Identity:
        if tokens.id_token:
            return await self.grants.verify_id_token(provider, client_id, tokens.id_token, nonce=nonce)
        info = await self.grants.userinfo(provider, tokens.access_token)
        email = str(info.get("email") or "")
        return Identity(email=email, email_verified=bool(info.get("email_verified", False)),
                        subject=str(info.get("sub") or ""), name=str(info.get("name") or ""))

    async def _finish(self, provider_name: str, identity: Identity, tokens: TokenResponse, *,
                      expected: str | None, login: str | None, account_id: str | None,
                      settings: Mapping[str, Any], link_id: str | None) -> Outcome:
        """The store step shared by the link callback and the device flow."""
        state = self.registry.state
        email = identity.email.strip().lower()
        if not email:
            return await self._end(link_id, Outcome("unverified", "The provider did not say which "
                                                    "address you signed in with (no email claim)."))
        if not identity.email_verified and not self._tenant_vouches(provider_name):
            return await self._end(link_id, Outcome(
                "unverified", f"The provider has not verified {email}; the gateway only connects "
                              "verified addresses.", email=email))
        if expected and email != expected.lower():
            return await self._end(link_id, Outcome(
                "mismatch", f"You signed in as {email}, but this link is for {expected}. Nothing was "
                            "connected; open the link again and sign in with that mailbox.",
                email=email, expected=expected))
        if not tokens.refresh_token:
            return await self._end(link_id, Outcome(
                "failed", "The provider gave no refresh token (offline access), so the gateway could "
                          "not keep the mailbox connected."))
        if link_id is not None and not await state.use_link(link_id):
            return Outcome("used", "This link has been used already.")
        ident = account_id or account_id_for(email)
        existing = self.registry.account(ident)
        sealed = self.registry.seal(ident, tokens.refresh_token)
        try:
            if existing is not None and account_id is not None and existing.email.lower() != email:
                raise Conflict(f"account {ident} is {existing.email}, not {email}")
            if existing is not None and existing.email.lower() == email and (
                    account_id is not None or (existing.origin == "runtime"
                                               and existing.oauth_provider_name == provider_name)):
                if existing.auth.method != "oauth2":
                    raise Conflict(f"account {ident} does not use OAuth (auth.method "
                                   f"{existing.auth.method})")
                await state.reconnected(ident, sealed, email)
                await self.registry.refresh(force=True)
                kind = "reconnected"
                acct = existing
            else:
                if existing is not None:   # another account (address, or declared) has this id
                    ident = f"{ident}-{secrets.token_hex(3)}"
                    sealed = self.registry.seal(ident, tokens.refresh_token)
                definition = self._definition(provider_name, ident, email, login, settings)
                acct = await self.registry.create(definition, secret=tokens.refresh_token,
                                                  connected_email=email)
                kind = "connected"
        except (InvalidAccount, Conflict, NotFound) as exc:
            return await self._end(link_id, Outcome("failed", f"The mailbox could not be stored: {exc}",
                                                    email=email))
        if self.on_connected is not None:
            await self.on_connected(acct.id)
        self.log.info("account_connected", account=acct.id, email=email, provider=provider_name,
                      how="reconnect" if kind == "reconnected" else "new")
        return await self._end(link_id, Outcome(kind, "", account_id=acct.id, email=email,
                                                folders=list(acct.sync.folders),
                                                direction=acct.sync.direction, provider=provider_name))

    def _tenant_vouches(self, provider_name: str) -> bool:
        """Microsoft ID tokens rarely carry `email_verified` (only `xms_edov` when configured as
        an optional claim). With the microsoft preset and one named tenant (not common,
        organizations or consumers), the ID token's issuer pins that tenant, whose
        administrators assign its addresses: its verified ID token vouches for the address.
        A multi-tenant app would let any tenant claim any address ("nOAuth"), so there the
        address must be verified (`xms_edov`)."""
        cfg = self.get_config()
        if cfg.oauth.preset_of(provider_name) != "microsoft":
            return False
        s = cfg.oauth.settings(provider_name)
        return s is not None and s.tenant.lower() not in ("common", "organizations", "consumers")

    async def _end(self, link_id: str | None, outcome: Outcome) -> Outcome:
        if link_id is not None:
            await self.registry.state.finish_link(link_id, outcome.kind, outcome.detail or None,
                                                  outcome.account_id)
        return outcome

    def _definition(self, provider_name: str, ident: str, email: str, login: str | None,
                    settings: Mapping[str, Any]) -> dict[str, Any]:
        cfg = self.get_config()
        s = cfg.oauth.settings(provider_name)
        preset = cfg.oauth.preset_of(provider_name)
        mail = (s.mail_provider if s and s.mail_provider else MAIL_PROVIDER.get(preset or "", "imap"))
        out: dict[str, Any] = {"id": ident, "email": email, "provider": mail,
                               "auth": {"method": "oauth2", "oauth_provider": provider_name}}
        if s is not None and s.imap is not None:
            out["imap"] = s.imap.model_dump(mode="json", exclude_none=True)
        if s is not None and s.smtp is not None:
            out["smtp"] = s.smtp.model_dump(mode="json", exclude_none=True)
        if settings.get("sync"):
            out["sync"] = dict(settings["sync"])
        if login:
            out["send_as"] = [login]
        return out

    # -- the device flow (the shell) ----------------------------------------------------------
    async def device(self, provider_name: str, *, email: str | None, login: str | None = None,
                     account_id: str | None = None, settings: Mapping[str, Any] | None = None,
                     show: Callable[[DeviceAuthorization], None]) -> Outcome:
        """RFC 8628: show the user code and URL, poll until the user approves, store."""
        provider, client = await self.providers.get(provider_name)
        if not provider.device_authorization_endpoint:
            return Outcome("failed", f"provider {provider_name} has no device authorization endpoint")
        device = await self.grants.start_device(provider, client)
        show(device)
        try:
            async with asyncio.timeout(self.get_config().oauth.device_timeout):
                tokens = await self.grants.poll_device(provider, client, device)
            identity = await self._identity(provider, client.client_id, tokens, None)
        except TimeoutError:
            return Outcome("expired", "Nobody approved the code in time (oauth.device_timeout).")
        except (AccountError, ValueError) as exc:
            return Outcome("refused" if "denied" in str(exc) else "failed", str(exc))
        return await self._finish(provider_name, identity, tokens, expected=email, login=login,
                                  account_id=account_id, settings=settings or {}, link_id=None)
