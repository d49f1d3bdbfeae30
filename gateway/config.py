"""Load `gateway.yaml` into validated, frozen models; every error names file, line and key.

The configuration is read once (and again on SIGHUP) and passed down as a value;
nothing in mailgw reads it from a global. Secrets are never inline: keys ending in
`_file` name a file, or `env:NAME` (an environment variable), or `credential:NAME`
(a file in systemd's `$CREDENTIALS_DIRECTORY`, see `LoadCredential=`). Relative
paths are relative to the directory of the configuration file.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigError, Problem
from gateway.providers import PRESETS, provider_problems, unknown_provider_message

DEFAULT_PATHS = (Path("gateway.yaml"), Path("/etc/mailgw/gateway.yaml"))

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: Any) -> float:
    """`90`, `"30s"`, `"5m"`, `"4h"`, `"5d"` -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m, 4h or 5d")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"{value!r} is not a duration such as 30s, 5m, 4h or 5d")


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


Duration = Annotated[float, BeforeValidator(parse_duration)]
Port = Annotated[int, Field(ge=1, le=65535)]
TLSMode = Literal["none", "starttls", "implicit"]


class Model(BaseModel):
    """Base: frozen, and unknown keys are errors (a typo must not be ignored)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_secret_ref(value: Any) -> Any:
    if value is None:
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a file path, env:NAME or credential:NAME")
    if value.startswith("env:") and not re.fullmatch(r"env:[A-Za-z_][A-Za-z0-9_]*", value):
        raise ValueError(f"{value!r}: env: must be followed by a variable name")
    return value


SecretRef = Annotated[str, BeforeValidator(_check_secret_ref)]


class SMTPListenerBase(Model):
    """What every SMTP listener has: address, TLS, size and session limits."""

    host: str = "127.0.0.1"
    port: Port = 2525
    tls: TLSMode = "none"
    cert_file: str | None = None
    key_file: str | None = None
    max_message_size: int = Field(default=25 * 1024 * 1024, ge=1024)
    max_recipients: int = Field(default=100, ge=1, le=10000)
    max_commands: int = Field(default=1000, ge=10)
    max_connections: int = Field(default=200, ge=1)
    timeout: Duration = 300.0

    @model_validator(mode="after")
    def _tls_files(self) -> SMTPListenerBase:
        if self.tls != "none" and not (self.cert_file and self.key_file):
            raise ValueError(f"tls: {self.tls} needs cert_file and key_file")
        return self

    @property
    def loopback_only(self) -> bool:
        """True when the listener binds only loopback addresses (AUTH then allowed without TLS)."""
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"

    @property
    def starttls_required(self) -> bool:
        """Must a client use STARTTLS before MAIL?"""
        return self.tls == "starttls"


class SubmissionListener(SMTPListenerBase):
    trusted_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    auth_failures: int = Field(default=5, ge=1)
    auth_failure_window: Duration = 600.0

    @field_validator("trusted_networks", mode="before")
    @classmethod
    def _networks(cls, v: Any) -> Any:
        return _networks_list(v)


class IngestListener(SMTPListenerBase):
    """The BCC / forward address's listener: MX-facing, no AUTH, STARTTLS offered."""

    port: Port = 2526
    #: with `tls: starttls`: refuse mail from clients that did not use STARTTLS
    require_tls: bool = False

    @property
    def starttls_required(self) -> bool:
        return self.tls == "starttls" and self.require_tls


def _networks_list(v: Any) -> Any:
    """A YAML list of networks (`10.0.0.0/8`, `::1`) -> ip_network objects; clear errors."""
    if v is None:
        return []
    if not isinstance(v, list):
        raise ValueError("expected a list of networks such as 10.0.0.0/8")
    out = []
    for item in v:
        try:
            out.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError as exc:
            raise ValueError(f"{item!r} is not an IP network: {exc}") from None
    return out


Networks = Annotated[list[ipaddress.IPv4Network | ipaddress.IPv6Network],
                     BeforeValidator(_networks_list)]


class TrackingListener(Model):
    host: str = "127.0.0.1"
    port: Port = 8080
    base_url: str = "http://127.0.0.1:8080"
    #: Reverse proxies / load balancers whose X-Forwarded-For is believed (else the peer address).
    trusted_proxies: Networks = []
    #: Hits waiting to be written to the store; beyond this they are dropped (logged, counted).
    queue_size: int = Field(default=10000, ge=1)

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", v):
            raise ValueError(f"{v!r} is not an http(s) URL such as https://t.example.com")
        return v.rstrip("/")


class AdminListener(Model):
    """The read API, /metrics and /healthz. Without `token_file` the API is served only on
    loopback (a non-loopback host then fails validation)."""

    host: str = "127.0.0.1"
    port: Port = 8081
    token_file: SecretRef | None = None

    @property
    def loopback_only(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


class Listeners(Model):
    submission: SubmissionListener | None = SubmissionListener()
    ingest: IngestListener | None = None
    tracking: TrackingListener | None = None
    admin: AdminListener | None = None


class User(Model):
    login: str
    password_hash: str
    name: str = ""
    title: str = ""
    phone: str = ""
    account: str | None = None

    @field_validator("password_hash")
    @classmethod
    def _hash(cls, v: str) -> str:
        if not v.startswith("$argon2"):
            raise ValueError("must be a hash made by `mailgw users hash` ($argon2id$...)")
        return v

    @property
    def email(self) -> str:
        return self.login


class Endpoint(Model):
    """An IMAP or SMTP server: host, port, how TLS is used and (optionally) the CA to trust."""

    host: str
    port: Port
    tls: TLSMode = "implicit"
    ca_file: str | None = None


class SMTPUpstream(Model):
    host: str | None = None
    port: Port | None = None
    tls: TLSMode | None = None
    username: str | None = None
    password_file: SecretRef | None = None
    ca_file: str | None = None
    saves_sent: bool | None = None


# which OAuth provider preset a mailbox provider implies
_PROVIDER_OAUTH = {p.name: p.oauth for p in PRESETS.values() if p.oauth is not None}
_OAUTH_KEYS = ("oauth_provider", "token_endpoint", "client_id", "client_secret_file",
               "refresh_token_file", "scope")
#: OAuth providers the gateway knows without configuration (their endpoints are presets;
#: the client id and secret of the gateway's app registration are still configuration)
OAUTH_PRESETS = ("google", "microsoft")


def _http_url(v: str | None) -> str | None:
    if v is not None and not re.match(r"^https?://[^/\s]+", v):
        raise ValueError(f"{v!r} is not an http(s) URL")
    return v


HttpURL = Annotated[str, AfterValidator(_http_url)]


class OAuthProviderSettings(Model):
    """One OAuth 2.0 / OpenID Connect provider (an entry of `oauth.providers`).

    `preset` (google or microsoft; default: the entry's name when it is one) fills the
    endpoints; every endpoint can be set explicitly instead or on top, so any
    standards-conforming provider works. `discovery: true` reads the endpoints from the
    issuer's `/.well-known/openid-configuration` at start. `client_id` and
    `client_secret_file` (or `private_key_file` + `certificate_file`) are the gateway's
    app registration at the provider. `mail_provider` is the mailbox preset (gmail,
    microsoft365, ...) of accounts connected through this provider; `imap`/`smtp` give
    their servers where no preset fits.
    """

    preset: Literal["google", "microsoft"] | None = None
    tenant: str = "common"
    client_id: str | None = None
    client_secret_file: SecretRef | None = None
    private_key_file: SecretRef | None = None
    certificate_file: str | None = None
    issuer: HttpURL | None = None
    discovery: bool = False
    authorization_endpoint: HttpURL | None = None
    token_endpoint: HttpURL | None = None
    device_authorization_endpoint: HttpURL | None = None
    jwks_uri: HttpURL | None = None
    userinfo_endpoint: HttpURL | None = None
    revocation_endpoint: HttpURL | None = None
    scopes: list[str] | None = None
    mail_provider: str | None = None
    imap: Endpoint | None = None
    smtp: SMTPUpstream | None = None
    label: str | None = None

    @model_validator(mode="after")
    def _credential(self) -> OAuthProviderSettings:
        if self.client_secret_file and self.private_key_file:
            raise ValueError("give client_secret_file or private_key_file, not both")
        if bool(self.private_key_file) != bool(self.certificate_file):
            raise ValueError("private_key_file and certificate_file go together (a certificate credential)")
        if self.discovery and not self.issuer:
            raise ValueError("discovery: true needs issuer (the discovery document is found under it)")
        return self


class OAuth(Model):
    """`oauth:` the OAuth providers reps connect their mailboxes through, and connect links."""

    providers: dict[str, OAuthProviderSettings] = {}
    connect_link_ttl: Duration = 7 * 86400.0
    device_timeout: Duration = 900.0

    @field_validator("providers")
    @classmethod
    def _names(cls, v: dict[str, OAuthProviderSettings]) -> dict[str, OAuthProviderSettings]:
        bad = [k for k in v if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", k)]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))}: provider names are letters, digits, . _ -")
        return v

    def settings(self, name: str) -> OAuthProviderSettings | None:
        """The entry for `name`; a preset name without an entry gets an empty one."""
        if name in self.providers:
            return self.providers[name]
        return OAuthProviderSettings() if name in OAUTH_PRESETS else None

    def preset_of(self, name: str) -> str | None:
        s = self.providers.get(name)
        if s is not None and s.preset:
            return s.preset
        return name if name in OAUTH_PRESETS else None


class ServiceAccount(Model):
    """One credential with delegated access to many mailboxes (`service_accounts:`).

    `kind: google`: a Google Workspace service account with domain-wide delegation;
    `key_file` is its JSON key; tokens come from the JWT-bearer grant (RFC 7523) with
    `sub` set to each mailbox. `kind: microsoft`: a Microsoft Entra app with app-only
    access to Exchange Online; tokens come from the client-credentials grant in `tenant`,
    with `client_secret_file` or a certificate (`private_key_file` + `certificate_file`).
    `token_endpoint` and `scope` override the presets (another identity provider, tests).
    """

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    kind: Literal["google", "microsoft"]
    key_file: SecretRef | None = None
    tenant: str | None = None
    client_id: str | None = None
    client_secret_file: SecretRef | None = None
    private_key_file: SecretRef | None = None
    certificate_file: str | None = None
    token_endpoint: HttpURL | None = None
    scope: str | None = None
    #: the servers of its mailboxes where the provider preset does not fit (tests, another IdP)
    imap: Endpoint | None = None
    smtp: SMTPUpstream | None = None

    @model_validator(mode="after")
    def _kind_keys(self) -> ServiceAccount:
        if self.kind == "google":
            if not self.key_file:
                raise ValueError("kind: google needs key_file (the service account's JSON key)")
            extra = [k for k in ("tenant", "client_id", "client_secret_file", "private_key_file",
                                 "certificate_file") if getattr(self, k)]
            if extra:
                raise ValueError(f"{', '.join(extra)} only apply to kind: microsoft")
        else:
            if not self.tenant:
                raise ValueError("kind: microsoft needs tenant (the directory id or domain)")
            if not self.client_id:
                raise ValueError("kind: microsoft needs client_id (the app registration)")
            if bool(self.client_secret_file) == bool(self.private_key_file):
                raise ValueError("kind: microsoft needs client_secret_file or private_key_file "
                                 "(with certificate_file), one of them")
            if bool(self.private_key_file) != bool(self.certificate_file):
                raise ValueError("private_key_file and certificate_file go together")
            if self.key_file:
                raise ValueError("key_file only applies to kind: google")
        return self


class AccountAuth(Model):
    """How the gateway logs in to an account's mailbox.

    `password`: `username` (default: the account's email) and `password_file` (a password
    or app password). `oauth2`: XOAUTH2 or OAUTHBEARER (`mechanism`) with access tokens
    from the refresh-token grant of the OAuth provider `oauth_provider` (an entry of
    `oauth.providers`, or a preset: google, microsoft; default: the account provider's,
    gmail -> google, microsoft365/outlook -> microsoft), or of an explicit
    `token_endpoint`; the refresh token is `refresh_token_file`, or, for an account
    connected through a connect link or `mailgw accounts connect`, kept encrypted in the
    store. `service`: access tokens from a service account (`service_accounts:`) with
    delegated access to this mailbox (Google domain-wide delegation, Microsoft 365
    app-only access); `username` is the mailbox (default: the account's email).
    `delegate`: a SASL service account (`username`, `password_file`) opens the mailbox of
    `delegate_user` (default: the account's email) through SASL PLAIN's authorization
    identity, as Dovecot master users and Exchange delegate access work.
    """

    method: Literal["password", "oauth2", "service", "delegate"] = "password"
    username: str | None = None
    password_file: SecretRef | None = None
    oauth_provider: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    token_endpoint: str | None = None
    client_id: str | None = None
    client_secret_file: SecretRef | None = None
    refresh_token_file: SecretRef | None = None
    scope: str | None = None
    mechanism: Literal["xoauth2", "oauthbearer"] = "xoauth2"
    delegate_user: str | None = None
    service_account: str | None = None

    @field_validator("token_endpoint")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return _http_url(v)

    @model_validator(mode="after")
    def _method_keys(self) -> AccountAuth:
        if self.method == "oauth2":
            if self.password_file:
                raise ValueError("method: oauth2 takes no password_file")
        else:
            extra = [k for k in _OAUTH_KEYS if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"{', '.join(extra)} only apply to method: oauth2")
        if self.method == "service":
            if not self.service_account:
                raise ValueError("method: service needs service_account (an id under service_accounts:)")
            if self.password_file:
                raise ValueError("method: service takes no password_file")
        elif self.service_account is not None:
            raise ValueError("service_account only applies to method: service")
        if self.method == "delegate":
            if not self.username:
                raise ValueError("method: delegate needs username (the service account)")
            if not self.password_file:
                raise ValueError("method: delegate needs password_file (the service account's)")
        elif self.delegate_user is not None:
            raise ValueError("delegate_user only applies to method: delegate")
        return self

    @property
    def uses_tokens(self) -> bool:
        """Whether the mailbox is opened with OAuth 2.0 bearer tokens (oauth2, service)."""
        return self.method in ("oauth2", "service")


# Folder names that mean folders which are never synced
NEVER_SYNCED = frozenset({"junk", "spam", "junk e-mail", "junk email", "bulk mail", "drafts",
                          "draft", "trash", "deleted items", "deleted messages", "bin",
                          "all mail", "all", "starred", "flagged", "important", "\\junk",
                          "\\drafts", "\\trash", "\\all", "\\flagged", "\\important"})


class AccountSync(Model):
    direction: Literal["two-way", "one-way"] = "two-way"
    folders: list[str] = ["INBOX", "Sent"]
    history_days: int = Field(default=30, ge=0)
    enabled: bool = True

    @field_validator("folders")
    @classmethod
    def _folders(cls, v: list[str]) -> list[str]:
        bad = [f for f in v if f.strip().lower() in NEVER_SYNCED or f.strip().split("/")[-1].lower()
               in NEVER_SYNCED]
        if bad:
            raise ValueError(f"{', '.join(bad)}: junk, drafts, trash and all-mail folders are never synced")
        if not v:
            raise ValueError("needs at least one folder (INBOX, Sent, ...)")
        return v


# Provider presets (gateway.providers): name -> (IMAP server, SMTP server), for the presets
# that have fixed servers (not exchange or imap, whose accounts name their own)
PROVIDERS: dict[str, tuple[Endpoint, Endpoint]] = {
    p.name: (Endpoint(host=p.imap.host, port=p.imap.port, tls=p.imap.tls),
             Endpoint(host=p.smtp.host, port=p.smtp.port, tls=p.smtp.tls))
    for p in PRESETS.values() if p.imap is not None and p.smtp is not None
}


#: Providers whose SMTP servers file submitted mail in the Sent folder themselves.
PROVIDERS_SAVING_SENT = frozenset(p.name for p in PRESETS.values() if p.saves_sent)


def _provider_name(value: Any) -> Any:
    """`provider:` must name a preset of gateway.providers; the error lists them."""
    if not isinstance(value, str) or value not in PRESETS:
        raise ValueError(unknown_provider_message(value))
    return value


ProviderName = Annotated[str, BeforeValidator(_provider_name)]


class AccountAssign(Model):
    """How a shared mailbox (`shared: true`) assigns inbound mail nobody owns (README
    "Shared mailboxes"): `round_robin` over `users` (logins under `users:`), or `none`."""

    fallback: Literal["round_robin", "none"] = "none"
    users: list[str] = []

    @model_validator(mode="after")
    def _users(self) -> AccountAssign:
        if self.fallback == "round_robin" and not self.users:
            raise ValueError("fallback: round_robin needs users (logins under users:)")
        low = [u.lower() for u in self.users]
        dupes = sorted({u for u in low if low.count(u) > 1})
        if dupes:
            raise ValueError(f"{dupes[0]} appears more than once in users")
        return self


class Account(Model):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    email: str
    provider: ProviderName = "imap"
    imap: Endpoint | None = None
    auth: AccountAuth = AccountAuth()
    smtp: SMTPUpstream | None = None
    sync: AccountSync = AccountSync()

    #: logins of submission users who may send as this account (besides `users[].account`)
    send_as: list[str] = []
    #: a team mailbox (sales@, support@): each inbound message is assigned to a rep
    shared: bool = False
    assign: AccountAssign = AccountAssign()
    #: "config" for accounts declared here, "runtime" for accounts the store keeps (set by
    #: the account registry, never by the file: credentials of those live in the store)
    origin: Literal["config", "runtime"] = Field(default="config", exclude=True)

    @model_validator(mode="after")
    def _auth_fits(self) -> Account:
        a = self.auth
        if (a.method == "password" and self.sync.enabled and not a.password_file
                and self.origin == "config"):
            raise ValueError("auth.password_file is needed to sync this mailbox (or sync.enabled: false)")
        return self

    @property
    def oauth_provider_name(self) -> str | None:
        """The OAuth provider this account's tokens come from (method oauth2): the explicit
        `auth.oauth_provider`, else the mailbox provider's (gmail -> google, ...)."""
        if self.auth.method != "oauth2":
            return None
        return self.auth.oauth_provider or _PROVIDER_OAUTH.get(self.provider)

    def imap_endpoint(self) -> Endpoint | None:
        """The IMAP server: the explicit `imap:` section, else the provider preset."""
        if self.imap is not None:
            return self.imap
        preset = PROVIDERS.get(self.provider)
        return preset[0] if preset else None

    def saves_sent(self) -> bool:
        """Does mail submitted through this account's own SMTP upstream land in its Sent
        folder by itself? `smtp.saves_sent` when set; else the provider's habit: Gmail,
        Microsoft 365, Outlook.com and Yahoo file what their SMTP servers accept in Sent;
        iCloud, Zoho and plain IMAP servers generally do not (the mail client APPENDs it)."""
        if self.smtp is not None and self.smtp.saves_sent is not None:
            return self.smtp.saves_sent
        return self.provider in PROVIDERS_SAVING_SENT

    @property
    def tailed(self) -> bool:
        """Whether the tailer imports from this mailbox (two-way sync, enabled)."""
        return self.sync.enabled and self.sync.direction == "two-way"

    def smtp_endpoint(self) -> Endpoint | None:
        """The upstream SMTP server for mail sent as this account (preset, then explicit keys)."""
        preset = PROVIDERS[self.provider][1] if self.provider in PROVIDERS else None
        s = self.smtp or SMTPUpstream()
        host = s.host or (preset.host if preset else None)
        if host is None:
            return None
        port = s.port or (preset.port if preset else 587)
        tls = s.tls or (preset.tls if preset else "starttls")
        return Endpoint(host=host, port=port, tls=tls)


def parse_nameserver(text: str) -> tuple[str, int]:
    """`addr`, `addr:port` or `[v6addr]:port` -> (address, port); ValueError if not an IP."""
    host, port = text.strip(), 53
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?", host)
    if m:
        host, port = m.group(1), int(m.group(2) or 53)
    elif host.count(":") == 1:
        host, _, p = host.partition(":")
        if not p.isdigit():
            raise ValueError(f"{text!r}: the port must be a number")
        port = int(p)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address (optionally with :port)") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port out of range")
    return host, port


class Smarthost(Model):
    host: str
    port: Port = 587
    tls: TLSMode = "starttls"
    username: str | None = None
    password_file: SecretRef | None = None
    ca_file: str | None = None

    @model_validator(mode="after")
    def _auth(self) -> Smarthost:
        if self.username and not self.password_file:
            raise ValueError("username is set but password_file is not")
        return self


class Retry(Model):
    schedule: list[Duration] = [60.0, 300.0, 900.0, 3600.0, 14400.0]
    give_up_after: Duration = 5 * 86400.0

    @field_validator("schedule")
    @classmethod
    def _nonempty(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("needs at least one interval")
        return v


class Delivery(Model):
    route: Literal["account", "smarthost", "mx"] = "smarthost"
    smarthost: Smarthost | None = None
    retry: Retry = Retry()
    concurrency: int = Field(default=20, ge=1, le=1000)
    per_destination: int = Field(default=10, ge=1, le=1000)
    mx_port: Port = 25
    mx_tls: Literal["opportunistic", "required"] = "opportunistic"
    mx_ca_file: str | None = None
    #: DNS servers for MX and DKIM lookups: `192.0.2.53`, `192.0.2.53:5353`, `[2001:db8::53]:53`.
    nameservers: list[str] = []
    connect_timeout: Duration = 30.0
    command_timeout: Duration = 300.0
    connection_idle: Duration = 10.0
    #: an upstream connection is not reused once it is this old (Postfix
    #: smtp_connection_reuse_time_limit) or has carried this many messages
    #: (smtp_connection_reuse_count_limit); 0: no limit
    connection_reuse_time: Duration = Field(default=300.0, ge=0)
    connection_reuse_count: int = Field(default=100, ge=0)
    #: attempts of one queue entry whose processing may raise (a poison message) before
    #: the entry is moved to hold/ with the error as its hold reason
    max_crashes: int = Field(default=3, ge=1, le=1000)
    #: VERP return path for smarthost and MX delivery: each copy is sent with the envelope
    #: sender ``<local>+<queue id>@<domain>``, so asynchronous bounces come back to the
    #: ingest listener (which must receive mail for ``<domain>``) and name their copy.
    return_path: str | None = None

    @field_validator("return_path")
    @classmethod
    def _return_path(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip()
        local, at, domain = v.rpartition("@")
        if not at or not local or not domain or "." not in domain or "+" in local \
                or any(c in v for c in " <>\"(),;:[]\\") or not v.isascii():
            raise ValueError(f"return_path must be a plain address <local>@<domain> without '+', "
                             f"not {v!r}")
        return v.lower()

    @field_validator("nameservers")
    @classmethod
    def _nameservers(cls, v: list[str]) -> list[str]:
        for item in v:
            parse_nameserver(item)
        return v

    def nameserver_addresses(self) -> list[tuple[str, int]]:
        """`nameservers` as (address, port) pairs (port 53 unless given)."""
        return [parse_nameserver(x) for x in self.nameservers]

    @model_validator(mode="after")
    def _route(self) -> Delivery:
        if self.route == "smarthost" and self.smarthost is None:
            raise ValueError("route: smarthost needs a smarthost: {host: ...} section")
        return self


class Tracking(Model):
    opens: bool = True
    clicks: bool = True
    secret_file: SecretRef | None = None
    #: The company's own egress networks: hits from there are the sender's (not counted).
    internal_networks: Networks = []
    #: Networks whose hits are always machines (e.g. Apple's relay egress, a scanner's range).
    machine_networks: Networks = []
    #: A click (open) sooner than this after delivery is a machine (see tracking/classify.py).
    click_after_delivery: Duration = 10.0
    open_after_delivery: Duration = 2.0
    #: Most links of a copy clicked within this window is a machine.
    burst_window: Duration = 3.0
    #: Hits on a copy within this time after its honeypot link was followed are machines.
    honeypot_window: Duration = 600.0


class DKIMKey(Model):
    selector: str = Field(pattern=r"^[A-Za-z0-9]([A-Za-z0-9_-]*[A-Za-z0-9])?"
                                  r"(\.[A-Za-z0-9]([A-Za-z0-9_-]*[A-Za-z0-9])?)*$")
    key_file: SecretRef
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"
    #: Signature lifetime (`x=` tag); none by default.
    expire_after: Duration | None = None


DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                        r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def _dkim_section(v: Any) -> Any:
    """`dkim: {domain: {selector,...}}` or `{domain: [{...}, {...}]}` -> {domain: [keys]}."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError("expected a mapping of domain: {selector, key_file, algorithm}")
    out: dict[Any, Any] = {}
    for domain, entry in v.items():
        name = str(domain).lower().rstrip(".")
        if not DOMAIN_RE.match(name):
            raise ValueError(f"{domain!r} is not a domain name")
        out[name] = entry if isinstance(entry, list) else [entry]
    return out


class Ingest(Model):
    addresses: list[str] = []
    accept_from: Literal["users"] | list[str] = "users"


class CRM(Model):
    auto_create_contacts: bool = False
    #: name: a new address whose display name is one contact's full name becomes that
    #: contact's further address (gateway.crm.identify)
    link_by: list[Literal["address", "domain", "name"]] = ["address", "domain"]
    exclude: list[str] = []

    @field_validator("link_by", mode="before")
    @classmethod
    def _one_link_by(cls, v: Any) -> Any:
        # `link_by: name` is the one-item list [name] (README "Contacts and companies")
        return [v] if isinstance(v, str) else v


#: Event types a webhook may subscribe to (``events: []`` subscribes to all of them).
WEBHOOK_EVENTS: tuple[str, ...] = (
    "message.stored", "message.sent", "message.deferred", "message.bounced", "message.opened",
    "message.clicked", "message.replied", "message.auto_replied", "message.delayed",
    "message.read_receipt", "message.complained", "message.assigned", "account.connected",
    "account.needs_reconnect", "account.deleted")
WebhookEvent = Literal["message.stored", "message.sent", "message.deferred", "message.bounced",
                       "message.opened", "message.clicked", "message.replied",
                       "message.auto_replied", "message.delayed", "message.read_receipt",
                       "message.complained", "message.assigned", "account.connected",
                       "account.needs_reconnect", "account.deleted"]


class Webhook(Model):
    """A receiver of signed event POSTs from the outbox (see gateway.api.webhooks)."""

    url: str
    secret_file: SecretRef
    events: list[WebhookEvent] = []
    timeout: Duration = Field(default=10.0, gt=0, le=300)
    max_age: Duration = Field(default=3 * 86400.0, gt=0)
    retry_initial: Duration = Field(default=10.0, gt=0)
    retry_max: Duration = Field(default=3600.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.fullmatch(r"https?://[^/\s?#@]+(?:[/?#]\S*)?", v):
            raise ValueError(f"{v!r} is not an http:// or https:// URL")
        return v

    @model_validator(mode="after")
    def _retry(self) -> Webhook:
        if self.retry_initial > self.retry_max:
            raise ValueError("retry_initial is longer than retry_max")
        return self


class Sync(Model):
    """How connected mailboxes are tailed (all accounts of this node)."""

    #: IMAP connections open at once, tailers and Sent-copy appends together. Each tailed
    #: account holds one while it IDLEs; with more accounts than this they take turns.
    max_connections: int = Field(default=20, ge=1, le=10000)
    #: how often folders other than INBOX (and INBOX on servers without IDLE) are checked
    poll_interval: Duration = Field(default=120.0, ge=1.0)
    #: how often the folder list is read again (LIST), so that a configured folder created
    #: after the connection listed them is found (and gets its initial sync); IDLE being
    #: re-issued reads it too
    list_interval: Duration = Field(default=120.0, ge=1.0)
    #: IDLE is re-issued after this long (servers drop it after 29-30 minutes)
    idle_interval: Duration = Field(default=25 * 60.0, ge=1.0, le=29 * 60.0)
    #: silence in IDLE after which the connection is probed (DONE must be answered)
    idle_liveness: Duration = Field(default=5 * 60.0, ge=0.1)
    #: IMAP command and connect timeout
    timeout: Duration = Field(default=60.0, ge=0.1)
    #: reconnect delays: capped exponential backoff with full jitter
    backoff_min: Duration = Field(default=1.0, gt=0)
    backoff_max: Duration = Field(default=300.0, gt=0)
    #: a node's lease on a mailbox lasts this long unless renewed (renewed every third of it)
    lease_ttl: Duration = Field(default=60.0, ge=1.0)
    #: how often account status changes (`mailgw accounts disable`, ...) are looked for
    check_interval: Duration = Field(default=2.0, ge=0.05)
    #: this node's name in leases (default: host name and process id)
    node_id: str | None = None
    #: worker processes that parse fetched mail (MIME) off the event loop, shared by the
    #: node's tailers: `auto` one per core (at most 4), 0 parses in a thread of the
    #: daemon's process instead (README "Connected mailboxes (IMAP sync)")
    parse_workers: int | Literal["auto"] = Field(default="auto")
    #: folders in their initial sync at once on this node; the others wait their turn
    #: (with a thousand new mailboxes, all at once would hold every store connection and
    #: parse buffer: checkpoint reads and lease renewals timed out)
    initial_syncs: int = Field(default=8, ge=1, le=1000)

    @field_validator("parse_workers")
    @classmethod
    def _parse_workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 0 <= v <= 64:
            raise ValueError("parse_workers must be auto or between 0 and 64")
        return v

    @model_validator(mode="after")
    def _bounds(self) -> Sync:
        if self.backoff_max < self.backoff_min:
            raise ValueError("backoff_max must not be below backoff_min")
        return self


class Logging(Model):
    format: Literal["json", "console", "auto"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


#: Store URL schemes mailgw can open (the async driver is picked from the plain names).
STORE_SCHEMES = ("sqlite", "sqlite+aiosqlite", "postgresql", "postgres", "postgresql+asyncpg")


class Store(Model):
    """`store:` the CRM database. A PostgreSQL password is a secret: `password_file`
    (a file, env:NAME or credential:NAME), never inline in `url`."""

    url: str = ""
    password_file: SecretRef | None = None
    #: where raw message bytes are kept: `disk` (content-addressed under raw_dir), `database`
    #: (table raw_messages), or `none` (only the parsed fields are stored)
    raw: Literal["disk", "database", "none"] = "disk"
    raw_dir: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v:
            return v
        from sqlalchemy.engine import make_url

        try:
            u = make_url(v)
        except Exception as exc:
            raise ValueError(f"not a database URL: {exc}") from None
        if u.drivername not in STORE_SCHEMES:
            raise ValueError(f"unsupported store URL scheme {u.drivername}://: use "
                             "sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DB")
        if u.password is not None:
            raise ValueError("the URL carries a password inline; secrets are never inline: put it "
                             "in a file (mode 0600) and name it as store.password_file "
                             "(or env:NAME, credential:NAME), and drop it from the URL")
        return v

    @model_validator(mode="after")
    def _password_for_postgresql(self) -> Store:
        if self.password_file and not self.url.startswith("postgres"):
            raise ValueError("password_file only applies to a postgresql+asyncpg:// url")
        return self


class Company(Model):
    """Who the gateway sends for; `{company.name}` in signature and disclaimer templates."""

    name: str = ""


class Config(Model):
    hostname: str = "localhost"
    state_dir: str = "./var"
    store: Store = Store()
    listeners: Listeners = Listeners()
    users: list[User] = []
    accounts: list[Account] = []
    delivery: Delivery = Delivery(route="mx")
    tracking: Tracking = Tracking()
    dkim: Annotated[dict[str, list[DKIMKey]], BeforeValidator(_dkim_section)] = {}
    ingest: Ingest = Ingest()
    crm: CRM = CRM()
    company: Company = Company()
    # Missing directory: no rules when left at the default, an error when set explicitly.
    policies_dir: str = "./policies"
    webhooks: list[Webhook] = []
    sync: Sync = Sync()
    logging: Logging = Logging()
    drain_timeout: Duration = 10.0
    # key that encrypts OAuth2 tokens at rest (base64 of 32 bytes); default: a file
    # `state_dir/token.key` created with mode 0600 on first use
    token_key_file: SecretRef | None = None
    oauth: OAuth = OAuth()
    service_accounts: list[ServiceAccount] = []
    #: processes that accept and transform mail: `auto` (one per usable core, the default)
    #: or a number; 1 is a single process (no supervisor). See `worker_count`.
    workers: Literal["auto"] | int = "auto"

    # Set by the loader, not by the file.
    source: str = Field(default="<memory>", exclude=True)

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", v):
            raise ValueError(f"{v!r} is not a host name")
        return v

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 256):
            return v
        raise ValueError(f"{v!r} is not `auto` or a number of processes from 1 to 256")

    # -- derived values -------------------------------------------------------------
    @property
    def base_dir(self) -> Path:
        return Path(self.source).resolve().parent if self.source != "<memory>" else Path.cwd()

    def path(self, value: str) -> Path:
        """Resolve a path from the config relative to the config file's directory."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    @property
    def state_path(self) -> Path:
        return self.path(self.state_dir)

    @property
    def spool_path(self) -> Path:
        """Worker 1's spool (and the single process's): `state_dir/spool`."""
        return self.state_path / "spool"

    def worker_spool_path(self, index: int) -> Path:
        """Worker `index`'s spool: worker 1 keeps `state_dir/spool`, so going from one process
        to several loses nothing; worker N (N > 1) has `state_dir/spool-N`."""
        return self.worker_state_path("spool", index)

    def worker_state_path(self, name: str, index: int) -> Path:
        """A per-worker directory of `state_dir` (`spool`, `sent-copies`): worker 1 keeps
        `state_dir/NAME`, so going from one process to several loses nothing; worker N
        (N > 1) has `state_dir/NAME-N`."""
        return self.state_path / (name if index <= 1 else f"{name}-{index}")

    @property
    def worker_count(self) -> int:
        """`workers` as a number: `auto` is the cores this process may run on."""
        return usable_cores() if self.workers == "auto" else self.workers

    @property
    def raw_path(self) -> Path | None:
        """Where raw messages are kept on disk (None unless `store.raw: disk`)."""
        if self.store.raw != "disk":
            return None
        return self.path(self.store.raw_dir) if self.store.raw_dir else self.state_path / "raw"

    @property
    def store_url(self) -> str:
        """The SQLAlchemy URL; SQLite paths are made absolute against the config directory."""
        url = self.store.url or f"sqlite+aiosqlite:///{self.state_path / 'crm.db'}"
        m = re.match(r"^(sqlite(?:\+\w+)?):///(?!/)(.+)$", url)
        if m and m.group(2) != ":memory:":
            url = f"{m.group(1)}:///{self.path(m.group(2))}"
        if self.store.password_file:  # read when the store is opened; check has read it once
            from sqlalchemy.engine import make_url

            password = read_secret(self.store.password_file, self.base_dir).strip()
            url = make_url(url).set(password=password).render_as_string(hide_password=False)
        return url

    def user(self, login: str) -> User | None:
        low = login.lower()
        for u in self.users:
            if u.login.lower() == low:
                return u
        return None

    def account(self, account_id: str) -> Account | None:
        for a in self.accounts:
            if a.id == account_id:
                return a
        return None

    def service_account(self, sa_id: str) -> ServiceAccount | None:
        for sa in self.service_accounts:
            if sa.id == sa_id:
                return sa
        return None


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask, so a cgroup/taskset limit counts)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------------
# secrets


def _secret_path(ref: str, base_dir: Path) -> Path:
    """The file a `*_file` value names: `credential:NAME` in $CREDENTIALS_DIRECTORY, else a
    path (relative to the config's directory)."""
    if ref.startswith("credential:"):
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if not cred_dir:
            raise FileNotFoundError(
                f"{ref}: $CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the unit)")
        return Path(cred_dir) / ref[len("credential:"):]
    path = Path(ref).expanduser()
    return path if path.is_absolute() else base_dir / path


def read_secret(ref: str, base_dir: Path) -> str:
    """Resolve a `*_file` value: a path, `env:NAME` or `credential:NAME`; strip one newline."""
    if ref.startswith("env:"):
        name = ref[4:]
        if name not in os.environ:
            raise FileNotFoundError(f"environment variable {name} is not set")
        return os.environ[name]
    text = _secret_path(ref, base_dir).read_text(encoding="utf-8")
    return text[:-1] if text.endswith("\n") else text


def read_secret_bytes(ref: str, base_dir: Path) -> bytes:
    """Like :func:`read_secret`, but the raw bytes of the file (or variable), unstripped."""
    if ref.startswith("env:"):
        return read_secret(ref, base_dir).encode("utf-8")
    return _secret_path(ref, base_dir).read_bytes()


# ----------------------------------------------------------------------------------
# loading with line numbers


def _node_line(node: yaml.Node | None, loc: Sequence[int | str]) -> tuple[int | None, str]:
    """Follow a pydantic error location through the YAML node tree; return (line, key path)."""
    line = node.start_mark.line + 1 if node is not None else None
    keys: list[str] = []
    for part in loc:
        if node is None:
            keys.append(str(part))
            continue
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == part:
                    child = v
                    line = k.start_mark.line + 1
                    break
            keys.append(part)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if 0 <= part < len(node.value):
                child = node.value[part]
                line = child.start_mark.line + 1
            keys.append(f"[{part}]")
        else:
            # pydantic adds union-member or validator tags to loc; they are no YAML keys
            continue
        node = child
    path = ""
    for k in keys:
        path += k if k.startswith("[") or not path else "." + k
    return line, path


def node_location(node: yaml.Node | None, loc: Sequence[int | str]) -> tuple[int | None, str]:
    """The line and dotted key path of `loc` (keys and list indexes) in a composed YAML tree."""
    return _node_line(node, loc)


def _yaml_problem(file: str, exc: yaml.YAMLError) -> Problem:
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark is not None else None
    what = getattr(exc, "problem", None) or str(exc)
    return Problem(file, line, "", f"YAML syntax error: {what}")


def _duplicate_keys(file: str, node: yaml.Node) -> list[Problem]:
    """Every mapping key given twice in the same mapping (YAML would silently keep the last)."""
    problems: list[Problem] = []
    stack: list[tuple[yaml.Node, str]] = [(node, "")]
    while stack:
        current, path = stack.pop()
        if isinstance(current, yaml.MappingNode):
            first: dict[str, int] = {}
            for k, v in current.value:
                if not isinstance(k, yaml.ScalarNode) or k.tag == "tag:yaml.org,2002:merge":
                    stack.append((v, path))
                    continue
                key = f"{path}.{k.value}" if path else str(k.value)
                line = k.start_mark.line + 1
                if k.value in first:
                    problems.append(Problem(file, line, key, f"duplicate key {k.value!r} (first given "
                                                             f"at line {first[k.value]}; YAML "
                                                             "would silently keep only the last)"))
                else:
                    first[k.value] = line
                stack.append((v, key))
        elif isinstance(current, yaml.SequenceNode):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(current.value))
    problems.sort(key=lambda q: q.line or 0)
    return problems


def load_yaml_with_nodes(path: Path) -> tuple[Any, yaml.Node | None]:
    """Parse a YAML file into (data, node tree); raise ConfigError naming the line on syntax
    errors and on a key given twice in one mapping."""
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(file, None, "", f"cannot read: {exc.strerror or exc}")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            return {}, None
        duplicates = _duplicate_keys(file, node)
        if duplicates:
            raise ConfigError(duplicates)
        loader = yaml.SafeLoader("")
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(file, exc)]) from None
    return data, node


def validation_problems(file: str, exc: ValidationError, node: yaml.Node | None,
                        prefix: Sequence[int | str] = ()) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = [*prefix, *err["loc"]]
        line, key = _node_line(node, loc)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see gateway.example.yaml)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        problems.append(Problem(file, line, key, msg))
    return problems


def _semantic_problems(cfg: Config, node: yaml.Node | None,
                       warnings: list[Problem] | None = None, *,
                       dkim_keys: bool = True) -> Iterator[Problem]:
    """Cross-key checks pydantic cannot do alone: references, files, duplicates.

    Problems are yielded; things that work but should be fixed go to `warnings`.
    """
    file = cfg.source

    def at(loc: Sequence[int | str], message: str) -> Problem:
        line, key = _node_line(node, loc)
        return Problem(file, line, key, message)

    account_ids = [a.id for a in cfg.accounts]
    seen: set[str] = set()
    for i, a in enumerate(cfg.accounts):
        if a.id in seen:
            yield at(("accounts", i, "id"), f"duplicate account id {a.id!r}")
        seen.add(a.id)
        sa = cfg.service_account(a.auth.service_account) if a.auth.service_account else None
        sends = cfg.delivery.route == "account" and any(u.account == a.id for u in cfg.users)
        for p in provider_problems(a.provider, a.auth.method, has_imap_host=a.imap is not None,
                                   has_smtp_host=bool(a.smtp and a.smtp.host), sends=sends,
                                   service_kind=sa.kind if sa else None):
            problem = at(("accounts", i, *p.key.split(".")), p.message)
            if p.severity == "error":
                yield problem
            elif warnings is not None:
                warnings.append(problem)
    yield from _oauth_problems(cfg, at, warnings)
    logins: set[str] = set()
    for i, u in enumerate(cfg.users):
        if u.login.lower() in logins:
            yield at(("users", i, "login"), f"duplicate login {u.login!r}")
        logins.add(u.login.lower())
        if u.account is not None and u.account not in account_ids:
            yield at(("users", i, "account"), f"no account with id {u.account!r} in accounts:")
        if cfg.delivery.route == "account":
            acct = cfg.account(u.account) if u.account else None
            if acct is None or acct.smtp_endpoint() is None:
                yield at(("users", i, "account"),
                         "delivery.route is account but this user has no account with an SMTP upstream")
            elif not _sends_with_credentials(acct):
                yield at(("users", i, "account"),
                         f"delivery.route is account but account {acct.id} has no SMTP credentials "
                         "(auth.password_file, smtp.password_file, oauth2 or service): its upstream "
                         "would refuse the mail with 530")
    for i, a in enumerate(cfg.accounts):
        for j, login in enumerate(a.send_as):
            if cfg.user(login) is None:
                yield at(("accounts", i, "send_as", j), f"no user with login {login!r} in users:")
        for j, login in enumerate(a.assign.users):
            if cfg.user(login) is None:
                yield at(("accounts", i, "assign", "users", j),
                         f"no user with login {login!r} in users:")
        if not a.shared and (a.assign.fallback != "none" or a.assign.users) and warnings is not None:
            warnings.append(at(("accounts", i, "assign"), "assign only applies to an account "
                                                          "with shared: true"))
    if cfg.crm.link_by == ["name"] and warnings is not None:
        warnings.append(at(("crm", "link_by"), "[name] links contacts by address and name but no "
                           "company by domain: write [address, domain, name] to keep companies"))

    def check_file(loc: Sequence[int | str], ref: str | None, secret: bool) -> Iterator[Problem]:
        if not ref:
            return
        try:
            if secret:
                read_secret(ref, cfg.base_dir)
            else:
                cfg.path(ref).read_bytes()
        except (OSError, UnicodeDecodeError) as exc:
            yield at(loc, f"cannot read {ref}: {getattr(exc, 'strerror', None) or exc}")

    for name in ("submission", "ingest"):
        smtp = getattr(cfg.listeners, name)
        if smtp is not None:
            yield from check_file(("listeners", name, "cert_file"), smtp.cert_file, False)
            yield from check_file(("listeners", name, "key_file"), smtp.key_file, False)
    admin = cfg.listeners.admin
    if admin is not None:
        loc = ("listeners", "admin", "token_file")
        if admin.token_file is None and not admin.loopback_only:
            yield at(loc, f"required when the admin listener binds {admin.host} (not loopback only): "
                          "the read API needs a bearer token there")
        bad = list(check_file(loc, admin.token_file, True))
        yield from bad
        if admin.token_file and not bad and not read_secret(admin.token_file, cfg.base_dir).strip():
            yield at(loc, f"{admin.token_file} is empty")
    sh = cfg.delivery.smarthost
    if sh is not None:
        yield from check_file(("delivery", "smarthost", "password_file"), sh.password_file, True)
        yield from check_file(("delivery", "smarthost", "ca_file"), sh.ca_file, False)
    for i, a in enumerate(cfg.accounts):
        yield from check_file(("accounts", i, "auth", "password_file"), a.auth.password_file, True)
        yield from check_file(("accounts", i, "auth", "client_secret_file"),
                              a.auth.client_secret_file, True)
        yield from check_file(("accounts", i, "auth", "refresh_token_file"),
                              a.auth.refresh_token_file, True)
        if a.imap is not None:
            yield from check_file(("accounts", i, "imap", "ca_file"), a.imap.ca_file, False)
        if a.smtp is not None:
            yield from check_file(("accounts", i, "smtp", "password_file"),
                                  a.smtp.password_file, True)
    urls: set[str] = set()
    for i, w in enumerate(cfg.webhooks):
        bad = list(check_file(("webhooks", i, "secret_file"), w.secret_file, True))
        yield from bad
        if not bad and not read_secret(w.secret_file, cfg.base_dir).strip():
            yield at(("webhooks", i, "secret_file"), f"{w.secret_file} is empty")
        if w.url in urls:
            yield at(("webhooks", i, "url"), f"duplicate webhook url {w.url!r}")
        urls.add(w.url)
    yield from check_file(("token_key_file",), cfg.token_key_file, True)
    yield from check_file(("store", "password_file"), cfg.store.password_file, True)
    yield from _tracking_secret_problems(cfg, at, warnings)
    if dkim_keys:
        yield from _dkim_problems(cfg, node, at, warnings)

    ports: dict[tuple[str, int], str] = {}
    for name in ("submission", "ingest", "tracking", "admin"):
        lst = getattr(cfg.listeners, name)
        if lst is None:
            continue
        key = (lst.host, lst.port)
        if key in ports:
            yield at(("listeners", name, "port"),
                     f"{lst.host}:{lst.port} is already used by listeners.{ports[key]}")
        ports[key] = name


def generated_secret_path(ref: str, base_dir: Path) -> Path | None:
    """The file a `*_file` value names when mailgw may create it there (a plain path);
    None for env:NAME and credential:NAME, which only the administrator can provide."""
    if ref.startswith(("env:", "credential:")):
        return None
    return _secret_path(ref, base_dir)


def _tracking_secret_problems(cfg: Config, at: Any,
                              warnings: list[Problem] | None) -> Iterator[Problem]:
    """`tracking.secret_file`: readable, or a path where `run` generates a key (0600)."""
    ref = cfg.tracking.secret_file
    if not ref:
        return
    loc = ("tracking", "secret_file")
    path = generated_secret_path(ref, cfg.base_dir)
    if path is not None and not path.exists():
        if warnings is not None:
            warnings.append(at(loc, f"{ref} does not exist yet: `mailgw run` generates a new "
                                    "key there (mode 0600)"))
        return
    try:
        text = read_secret(ref, cfg.base_dir)
    except (OSError, UnicodeDecodeError) as exc:
        yield at(loc, f"cannot read {ref}: {getattr(exc, 'strerror', None) or exc}")
        return
    if not text.strip():
        yield at(loc, f"{ref} is empty")


def _sends_with_credentials(a: Account) -> bool:
    return (a.auth.uses_tokens or a.auth.method == "delegate" or bool(a.auth.password_file)
            or bool(a.smtp and a.smtp.password_file))


def _oauth_problems(cfg: Config, at: Any, warnings: list[Problem] | None) -> Iterator[Problem]:
    """OAuth providers, service accounts and the accounts that use them fit together."""
    def secret(loc: Sequence[int | str], ref: str | None) -> Iterator[Problem]:
        if ref:
            try:
                read_secret(ref, cfg.base_dir)
            except (OSError, UnicodeDecodeError) as exc:
                yield at(loc, f"cannot read {ref}: {getattr(exc, 'strerror', None) or exc}")

    for pname, p in cfg.oauth.providers.items():
        ploc = ("oauth", "providers", pname)
        if cfg.oauth.preset_of(pname) is None and not p.discovery and not p.token_endpoint:
            yield at(ploc, f"provider {pname!r} is not a preset (google, microsoft): give token_endpoint "
                          "(and authorization_endpoint, ...) or issuer with discovery: true")
        if p.mail_provider is not None and p.mail_provider not in PRESETS:
            yield at((*ploc, "mail_provider"), unknown_provider_message(p.mail_provider))
        yield from secret((*ploc, "client_secret_file"), p.client_secret_file)
        yield from secret((*ploc, "private_key_file"), p.private_key_file)
    seen: set[str] = set()
    for i, s in enumerate(cfg.service_accounts):
        if s.id in seen:
            yield at(("service_accounts", i, "id"), f"duplicate service account id {s.id!r}")
        seen.add(s.id)
        yield from secret(("service_accounts", i, "key_file"), s.key_file)
        yield from secret(("service_accounts", i, "client_secret_file"), s.client_secret_file)
        yield from secret(("service_accounts", i, "private_key_file"), s.private_key_file)
    for i, a in enumerate(cfg.accounts):
        auth = a.auth
        loc: tuple[int | str, ...] = ("accounts", i, "auth")
        if auth.method == "oauth2":
            name = a.oauth_provider_name
            settings = cfg.oauth.settings(name) if name else None
            if name and settings is None and not auth.token_endpoint:
                yield at((*loc, "oauth_provider"), f"no OAuth provider {name!r} under oauth.providers "
                                                   "(and it is not a preset: google, microsoft)")
            elif not name and not auth.token_endpoint:
                yield at((*loc, "method"), "method: oauth2 needs a token endpoint: auth.oauth_provider "
                                           "(google, microsoft or an oauth.providers entry) or "
                                           "auth.token_endpoint")
            if not auth.client_id and not (settings and settings.client_id):
                yield at((*loc, "client_id"), "method: oauth2 needs client_id (here, or under "
                                              f"oauth.providers.{name or 'NAME'})")
            if not auth.refresh_token_file and warnings is not None:
                warnings.append(at((*loc, "refresh_token_file"),
                                   f"no refresh token: account {a.id} needs connecting (a connect link "
                                   "or `mailgw accounts connect`) before it syncs or sends"))
        elif auth.method == "service":
            sa = cfg.service_account(auth.service_account or "")
            if sa is None:
                yield at((*loc, "service_account"),
                         f"no service account {auth.service_account!r} under service_accounts:")



def _dkim_problems(cfg: Config, node: yaml.Node | None, at: Any,
                   warnings: list[Problem] | None) -> Iterator[Problem]:
    """Every DKIM key file: readable, a private key, of the configured algorithm, long enough."""
    from gateway.keys.dkim import KeyFileError, check_key, load_private_key

    selectors: set[tuple[str, str]] = set()
    for domain, entries in cfg.dkim.items():
        for i, entry in enumerate(entries):
            # the single-mapping form has no list index in the YAML; _node_line skips it
            loc: tuple[int | str, ...] = ("dkim", domain, i)
            if (domain, entry.selector) in selectors:
                yield at((*loc, "selector"), f"selector {entry.selector!r} is used twice for {domain}")
            selectors.add((domain, entry.selector))
            try:
                key = load_private_key(read_secret_bytes(entry.key_file, cfg.base_dir))
            except OSError as exc:
                yield at((*loc, "key_file"), f"cannot read {entry.key_file}: {exc.strerror or exc}")
                continue
            except KeyFileError as exc:
                yield at((*loc, "key_file"), f"{entry.key_file}: {exc}")
                continue
            errors, warns = check_key(key, entry.algorithm)
            for message in errors:
                yield at((*loc, "key_file"), f"{entry.key_file}: {message}")
            if warnings is not None:
                warnings.extend(at((*loc, "key_file"), f"{entry.key_file}: {w}") for w in warns)


def load_config(path: str | Path | None = None, warnings: list[Problem] | None = None, *,
                dkim_keys: bool = True) -> Config:
    """Read, validate and return the configuration; raise ConfigError with every problem.

    Pass a list as `warnings` to collect what works but should be fixed (`mailgw check`
    prints them; the daemon logs them). `dkim_keys=False` skips reading the DKIM key
    files (`mailgw dkim keygen` writes one the config may already name).
    """
    p = find_config(path)
    data, node = load_yaml_with_nodes(p)
    file = str(p)
    if node is None:
        raise ConfigError([Problem(file, 1, "", "the file is empty (or only comments); "
                                                "start from gateway.example.yaml")])
    if not isinstance(data, dict):
        raise ConfigError([Problem(file, 1, "", "the top level must be a mapping of keys")])
    try:
        cfg = Config.model_validate({**data, "source": str(p.resolve())})
    except ValidationError as exc:
        raise ConfigError(validation_problems(file, exc, node)) from None
    found: list[Problem] = []
    problems = list(_semantic_problems(cfg, node, found, dkim_keys=dkim_keys))
    if warnings is not None:
        warnings.extend(Problem(file, q.line, q.key, q.message) for q in found)
    if problems:
        raise ConfigError([Problem(file, q.line, q.key, q.message) for q in problems])
    return cfg


def find_config(path: str | Path | None) -> Path:
    if path is not None:
        return Path(path)
    for candidate in DEFAULT_PATHS:
        if candidate.exists():
            return candidate
    return DEFAULT_PATHS[0]
