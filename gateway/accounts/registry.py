"""The one list of connected accounts: those declared in gateway.yaml and those the store keeps.

    registry = AccountRegistry(get_config, store, cipher)
    await registry.refresh()                         # reads the store's runtime accounts
    registry.accounts()                              # declared + runtime, no I/O
    acct = await registry.create({"id": "bob", "email": "bob@example.com", ...},
                                 password="app-password")
    await registry.update("bob", {"sync": {"folders": ["INBOX"]}})
    await registry.delete("bob", purge=True)

Accounts declared under ``accounts:`` change only with the file (SIGHUP). Accounts
created at run time (the API, `mailgw accounts add`, a connect link, the device flow)
are rows of the ``accounts`` table with ``origin = 'runtime'``: their settings as JSON
(exactly the keys of an ``accounts:`` entry, validated the same way) and their secret
(password or refresh token) encrypted with the token key (`gateway.keys.tokens`), under
a label naming the account, so it decrypts for that account only. Every change bumps
the row's ``version``; `refresh()` (run by the tailers' check loop and after each
change made here) rereads the runtime accounts when the versions changed, so every
node sees an account within one `sync.check_interval` without a restart.

A runtime definition never names a file: `*_file` keys would let whoever may call the
API make the gateway read a file of its choosing and hand it to a server of theirs; the
secret travels in the request and is stored encrypted instead. An id declared in
gateway.yaml cannot be created at run time (409), and a runtime account whose id is
later declared in the file is shadowed by the declared one (logged).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog
from pydantic import ValidationError

from gateway.config import Account, Config, read_secret
from gateway.crm.accounts import Accounts, PurgeResult, StoredAccount
from gateway.crm.store import Store
from gateway.errors import AccountAuthError, Conflict, NotFound
from gateway.keys.tokens import TokenCipher

__all__ = ["AccountRegistry", "InvalidAccount", "credential_label"]

#: the keys of an account definition that a PATCH may change
PATCHABLE = frozenset({"sync", "send_as", "imap", "smtp", "provider", "email", "shared", "assign"})


class InvalidAccount(ValueError):
    """An account definition that does not validate; `problems` are (key path, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{k}: {m}" if k else m for k, m in problems))
        self.problems = problems


def token_cipher(cfg: Config) -> TokenCipher:
    """The key that encrypts tokens and credentials at rest: `token_key_file`, else
    `state_dir/token.key` (created with mode 0600 on first use)."""
    if cfg.token_key_file:
        return TokenCipher.from_secret(read_secret(cfg.token_key_file, cfg.base_dir))
    cfg.state_path.mkdir(parents=True, exist_ok=True, mode=0o750)
    return TokenCipher.from_key_file(cfg.state_path / "token.key")


def credential_label(account_id: str) -> str:
    """The label a stored account credential is sealed under (see TokenCipher.seal)."""
    return f"credential:{account_id}"


def _file_keys(value: Any, path: str = "") -> list[str]:
    """Every key ending in `_file` (or `ca_file`) anywhere in a definition."""
    out: list[str] = []
    if isinstance(value, Mapping):
        for k, v in value.items():
            here = f"{path}.{k}" if path else str(k)
            if str(k).endswith("_file") and v is not None:
                out.append(here)
            out.extend(_file_keys(v, here))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(_file_keys(v, f"{path}[{i}]"))
    return out


def _loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    return [(".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, "))
            for e in exc.errors()]


def _merge(base: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """`patch` over `base`, one level into nested sections (sync, imap, smtp)."""
    out = dict(base)
    for k, v in patch.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


class AccountRegistry:
    """Declared and runtime accounts (see the module docstring); an AccountDirectory."""

    def __init__(self, get_config: Callable[[], Config], store: Store, cipher: TokenCipher, *,
                 log: Any = None) -> None:
        self.get_config = get_config
        self.store = store
        self.state = Accounts(store)
        self.cipher = cipher
        self.log = log or structlog.get_logger("mailgw.accounts")
        self._runtime: dict[str, Account] = {}
        self._stored: dict[str, StoredAccount] = {}
        self._version: tuple[int, int] | None = None
        self._lock = asyncio.Lock()
        self._shadowed: set[str] = set()
        self._effective: tuple[Config, tuple[int, int] | None, Config] | None = None

    # -- AccountDirectory -------------------------------------------------------------------
    def accounts(self) -> Sequence[Account]:
        """Declared accounts first, then runtime ones (a declared id shadows a runtime one)."""
        cfg = self.get_config()
        declared = {a.id for a in cfg.accounts}
        return [*cfg.accounts, *(a for i, a in self._runtime.items() if i not in declared)]

    def account(self, account_id: str) -> Account | None:
        declared = self.get_config().account(account_id)
        return declared if declared is not None else self._runtime.get(account_id)

    def account_for_user(self, login: str) -> Account | None:
        cfg = self.get_config()
        user = cfg.user(login)
        if user is not None and user.account:
            return self.account(user.account)
        low = login.lower()
        for a in self.accounts():
            if any(s.lower() == low for s in a.send_as):
                return a
        return None

    def users_of(self, account_id: str) -> list[str]:
        """Logins that send as the account (`users[].account` and its `send_as`)."""
        acct = self.account(account_id)
        cfg = self.get_config()
        out = [u.login for u in cfg.users if u.account == account_id]
        if acct is not None:
            out += [s for s in acct.send_as if s.lower() not in {o.lower() for o in out}]
        return out

    def effective(self, cfg: Config) -> Config:
        """`cfg` with the runtime accounts added to `accounts` (after the declared ones) and
        users listed in a runtime account's `send_as` (who have no declared account) pointed
        at it: the configuration every service works from. The same Config object comes
        back while neither `cfg` nor the runtime accounts change (OwnAddresses and others
        remember answers per Config object)."""
        if (self._effective is not None and self._effective[0] is cfg
                and self._effective[1] == self._version):
            return self._effective[2]
        declared = {a.id for a in cfg.accounts}
        runtime = [a for i, a in self._runtime.items() if i not in declared]
        if not runtime and not any(a.send_as for a in cfg.accounts):
            out = cfg
        else:
            sends: dict[str, str] = {}
            for a in [*cfg.accounts, *runtime]:
                for login in a.send_as:
                    sends.setdefault(login.lower(), a.id)
            users = [u.model_copy(update={"account": sends[u.login.lower()]})
                     if u.account is None and u.login.lower() in sends else u for u in cfg.users]
            out = cfg.model_copy(update={"accounts": [*cfg.accounts, *runtime], "users": users})
        self._effective = (cfg, self._version, out)   # holds cfg: its id cannot be reused
        return out

    # -- reading the store ------------------------------------------------------------------
    async def refresh(self, *, force: bool = False) -> bool:
        """Reread runtime accounts if any changed (or `force`); True when something did."""
        async with self._lock:
            version = await self.state.runtime_version()
            if version == self._version and not force:
                return False
            stored = await self.state.runtime_accounts()
            declared = {a.id for a in self.get_config().accounts}
            runtime: dict[str, Account] = {}
            for row in stored:
                if row.status == "deleted":
                    continue
                if row.id in declared:
                    if row.id not in self._shadowed:
                        self._shadowed.add(row.id)
                        self.log.warning("runtime_account_shadowed", account=row.id,
                                         hint="an account with this id is declared in the configuration; "
                                              "the declared one is used")
                    continue
                try:
                    runtime[row.id] = Account.model_validate({**row.definition, "origin": "runtime"})
                except ValidationError as exc:
                    self.log.error("runtime_account_invalid", account=row.id,
                                   problems=[f"{k}: {m}" for k, m in _problems(exc)])
            self._runtime = runtime
            self._stored = {r.id: r for r in stored}
            self._version = version
            return True

    def stored(self, account_id: str) -> StoredAccount | None:
        return self._stored.get(account_id)

    # -- secrets ----------------------------------------------------------------------------
    async def password(self, account_id: str) -> str:
        """The account's password: `auth.password_file` when declared, else the stored one."""
        acct = self.account(account_id)
        if acct is None:
            raise NotFound(f"no account {account_id!r}")
        cfg = self.get_config()
        if acct.auth.password_file:
            return read_secret(acct.auth.password_file, cfg.base_dir)
        return await self._credential(account_id, "password")

    async def refresh_token(self, account_id: str) -> str:
        """The account's refresh token: `auth.refresh_token_file` when declared, else the one
        a connect link or the device flow stored. None stored: AccountAuthError (connect it)."""
        acct = self.account(account_id)
        if acct is None:
            raise NotFound(f"no account {account_id!r}")
        if acct.auth.refresh_token_file:
            return read_secret(acct.auth.refresh_token_file, self.get_config().base_dir).strip()
        return await self._credential(account_id, "refresh token")

    async def _credential(self, account_id: str, what: str) -> str:
        blob = await self.state.credential(account_id)
        if blob is None:
            raise AccountAuthError(f"account {account_id} has no {what}: connect it (a connect link "
                                   "or `mailgw accounts connect`)")
        plain = self.cipher.unseal(credential_label(account_id), blob)
        if plain is None:
            raise AccountAuthError(f"the stored {what} of account {account_id} does not decrypt "
                                   "with this token key (token_key_file changed?): reconnect it")
        return plain.decode()

    def seal(self, account_id: str, secret: str) -> bytes:
        return self.cipher.seal(credential_label(account_id), secret.encode())

    # -- changes ----------------------------------------------------------------------------
    def validate(self, definition: Mapping[str, Any]) -> Account:
        """A runtime definition as an Account, or InvalidAccount naming each bad key.

        Beyond the `accounts:` schema, a definition made through the API must not steer a
        secret anywhere the admin did not configure: no files, no OAuth endpoint or client
        of its own, the servers of an oauth2 or service account only those its provider or
        service account names (its tokens go nowhere else), and no plaintext (`tls: none`)
        server but on loopback."""
        problems: list[tuple[str, str]] = [
            (k, "accounts created at run time take no files: send the secret itself "
                "(auth.password, auth.refresh_token); it is stored encrypted")
            for k in _file_keys(definition)]
        auth = definition.get("auth") if isinstance(definition.get("auth"), Mapping) else {}
        assert isinstance(auth, Mapping)
        problems += [(f"auth.{k}", "set in oauth.providers (the gateway's app registration), not "
                                   "per account at run time")
                     for k in ("token_endpoint", "client_id", "scope") if auth.get(k) is not None]
        if problems:
            raise InvalidAccount(problems)
        cfg = self.get_config()
        method = auth.get("method", "password")
        servers = self._token_servers(cfg, method, auth)
        if servers is not None:
            definition = dict(definition)
            for key, allowed in zip(("imap", "smtp"), servers, strict=True):
                if key in definition and definition[key] is not None:
                    continue
                if allowed is not None:
                    definition[key] = allowed.model_dump(mode="json", exclude_none=True)
        try:
            acct = Account.model_validate({**definition, "origin": "runtime"})
        except ValidationError as exc:
            raise InvalidAccount(_problems(exc)) from None
        if servers is not None:
            allowed_imap, allowed_smtp = servers
            if acct.imap is not None and acct.imap != allowed_imap:
                problems.append(("imap", f"the IMAP server of an {method} account comes from its "
                                         "provider (oauth.providers / service_accounts / the preset): "
                                         "its tokens are sent to no other server"))
            if acct.smtp is not None and acct.smtp != allowed_smtp:
                problems.append(("smtp", f"the SMTP server of an {method} account comes from its "
                                         "provider (oauth.providers / service_accounts / the preset)"))
        for key, ep in (("imap", acct.imap), ("smtp", acct.smtp)):
            if ep is not None and ep.tls == "none" and not _loopback(ep.host or ""):
                problems.append((f"{key}.tls", "tls: none would send the credentials in the clear; at "
                                               "run time only loopback servers may use it"))
        if acct.auth.method == "service" and cfg.service_account(acct.auth.service_account or "") is None:
            problems.append(("auth.service_account",
                             f"no service account {acct.auth.service_account!r} under service_accounts:"))
        if acct.auth.method == "oauth2":
            name = acct.oauth_provider_name
            settings = cfg.oauth.settings(name) if name else None
            if settings is None:
                problems.append(("auth.oauth_provider", f"no OAuth provider {name!r} (oauth.providers, "
                                                        "or a preset: google, microsoft)"))
            elif not settings.client_id:
                problems.append(("auth.oauth_provider", f"oauth.providers.{name} has no client_id"))
        if acct.provider in ("imap", "exchange") and acct.imap is None:
            problems.append(("imap", f"provider {acct.provider} needs imap: {{host, port}}"))
        for i, login in enumerate(acct.send_as):
            if cfg.user(login) is None:
                problems.append((f"send_as.{i}", f"no user with login {login!r} in users:"))
        for i, login in enumerate(acct.assign.users):
            if cfg.user(login) is None:
                problems.append((f"assign.users.{i}", f"no user with login {login!r} in users:"))
        if problems:
            raise InvalidAccount(problems)
        return acct

    @staticmethod
    def _token_servers(cfg: Config, method: Any, auth: Mapping[str, Any]) -> tuple[Any, Any] | None:
        """(imap, smtp) a token account may use, from its OAuth provider or service account
        (None each: the mailbox provider's preset); None for password accounts."""
        if method == "service":
            sa = cfg.service_account(str(auth.get("service_account") or ""))
            return (sa.imap, sa.smtp) if sa is not None else (None, None)
        if method == "oauth2":
            name = auth.get("oauth_provider")
            s = cfg.oauth.settings(str(name)) if name else None
            return (s.imap, s.smtp) if s is not None else (None, None)
        return None

    async def create(self, definition: Mapping[str, Any], *, secret: str | None = None,
                     connected_email: str | None = None, replace: bool = False) -> Account:
        """Validate and store a runtime account (and its password or refresh token)."""
        acct = self.validate(definition)
        if self.get_config().account(acct.id) is not None:
            raise Conflict(f"account {acct.id!r} is declared in the configuration (gateway.yaml)")
        needs = {"password": "auth.password", "oauth2": "auth.refresh_token"}.get(acct.auth.method)
        if needs and secret is None and acct.sync.enabled and connected_email is None:
            raise InvalidAccount([(needs, f"method {acct.auth.method} needs {needs} (or create the "
                                          "account with a connect link)")])
        if acct.auth.method == "delegate":
            raise InvalidAccount([("auth.method", "method delegate needs a password file of the "
                                                  "service account: declare it in gateway.yaml")])
        body = acct.model_dump(mode="json", exclude_none=True, exclude={"origin"})
        await self.state.create_runtime(acct.id, acct.email, body,
                                        self.seal(acct.id, secret) if secret is not None else None,
                                        connected_email=connected_email, replace=replace)
        await self.refresh(force=True)
        return self.account(acct.id) or acct

    async def update(self, account_id: str, patch: Mapping[str, Any], *,
                     secret: str | None = None) -> Account:
        """Change a runtime account: sync settings, send-as users, servers (a PATCH)."""
        if self.get_config().account(account_id) is not None:
            raise Conflict(f"account {account_id!r} is declared in the configuration (gateway.yaml); "
                           "change it there and reload")
        await self.refresh()
        row = self._stored.get(account_id)
        if row is None or row.status == "deleted":
            raise NotFound(f"no account {account_id!r}")
        bad = sorted(set(patch) - PATCHABLE)
        if bad:
            raise InvalidAccount([(k, f"cannot be changed (changeable: {', '.join(sorted(PATCHABLE))})")
                                  for k in bad])
        merged = _merge(row.definition, patch)
        acct = self.validate(merged)
        before = self._runtime.get(account_id)
        if acct.auth.method == "password" and secret is None and before is not None and (
                (acct.imap, acct.smtp, acct.email, acct.auth.username)
                != (before.imap, before.smtp, before.email, before.auth.username)):
            raise InvalidAccount([("auth.password", "changing the servers, the address or the login "
                                                    "of a password account needs auth.password again "
                                                    "(the stored one never goes to a new server)")])
        body = acct.model_dump(mode="json", exclude_none=True, exclude={"origin"})
        await self.state.update_runtime(account_id, body, email=acct.email,
                                        credential=self.seal(account_id, secret) if secret else None)
        await self.refresh(force=True)
        return self.account(account_id) or acct

    async def delete(self, account_id: str, *, reason: str) -> str | None:
        """Stop syncing the account (declared or runtime), keep its mail; the previous status."""
        was = await self.state.mark_deleted(account_id, reason)
        await self.refresh(force=True)
        return was

    async def purge(self, account_id: str) -> PurgeResult:
        return await self.state.purge(account_id)

    async def overview(self) -> list[dict[str, Any]]:
        """`accounts list` / `GET /api/v1/accounts`: every account in force, with its state."""
        await self.refresh()
        return await self.state.overview(self.accounts())
