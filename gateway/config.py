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
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigError, Problem

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


class SubmissionListener(Model):
    host: str = "127.0.0.1"
    port: Port = 2525
    tls: TLSMode = "none"
    cert_file: str | None = None
    key_file: str | None = None
    trusted_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    max_message_size: int = Field(default=25 * 1024 * 1024, ge=1024)
    max_recipients: int = Field(default=100, ge=1, le=10000)
    max_commands: int = Field(default=1000, ge=10)
    max_connections: int = Field(default=200, ge=1)
    timeout: Duration = 300.0
    auth_failures: int = Field(default=5, ge=1)
    auth_failure_window: Duration = 600.0

    @field_validator("trusted_networks", mode="before")
    @classmethod
    def _networks(cls, v: Any) -> Any:
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

    @model_validator(mode="after")
    def _tls_files(self) -> SubmissionListener:
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


class IngestListener(Model):
    host: str = "127.0.0.1"
    port: Port = 2526


class TrackingListener(Model):
    host: str = "127.0.0.1"
    port: Port = 8080
    base_url: str = "http://127.0.0.1:8080"


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
    """An IMAP or SMTP server: host, port and how TLS is used."""

    host: str
    port: Port
    tls: TLSMode = "implicit"


class SMTPUpstream(Model):
    host: str | None = None
    port: Port | None = None
    tls: TLSMode | None = None
    username: str | None = None
    password_file: SecretRef | None = None
    ca_file: str | None = None
    saves_sent: bool | None = None


class AccountAuth(Model):
    method: Literal["password", "oauth2", "delegate"] = "password"
    username: str | None = None
    password_file: SecretRef | None = None


class AccountSync(Model):
    direction: Literal["two-way", "one-way"] = "two-way"
    folders: list[str] = ["INBOX", "Sent"]
    history_days: int = Field(default=30, ge=0)
    enabled: bool = True


# Provider presets: (imap host, imap port, imap tls), (smtp host, smtp port, smtp tls)
PROVIDERS: dict[str, tuple[Endpoint, Endpoint]] = {
    "gmail": (Endpoint(host="imap.gmail.com", port=993, tls="implicit"),
              Endpoint(host="smtp.gmail.com", port=587, tls="starttls")),
    "microsoft365": (Endpoint(host="outlook.office365.com", port=993, tls="implicit"),
                     Endpoint(host="smtp.office365.com", port=587, tls="starttls")),
    "outlook": (Endpoint(host="outlook.office365.com", port=993, tls="implicit"),
                Endpoint(host="smtp-mail.outlook.com", port=587, tls="starttls")),
    "yahoo": (Endpoint(host="imap.mail.yahoo.com", port=993, tls="implicit"),
              Endpoint(host="smtp.mail.yahoo.com", port=465, tls="implicit")),
    "icloud": (Endpoint(host="imap.mail.me.com", port=993, tls="implicit"),
               Endpoint(host="smtp.mail.me.com", port=587, tls="starttls")),
    "zoho": (Endpoint(host="imap.zoho.com", port=993, tls="implicit"),
             Endpoint(host="smtp.zoho.com", port=465, tls="implicit")),
}


class Account(Model):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    email: str
    provider: Literal["gmail", "microsoft365", "outlook", "yahoo", "icloud", "zoho", "imap"] = "imap"
    imap: Endpoint | None = None
    auth: AccountAuth = AccountAuth()
    smtp: SMTPUpstream | None = None
    sync: AccountSync = AccountSync()

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
    nameservers: list[str] = []
    connect_timeout: Duration = 30.0
    command_timeout: Duration = 300.0
    connection_idle: Duration = 10.0

    @model_validator(mode="after")
    def _route(self) -> Delivery:
        if self.route == "smarthost" and self.smarthost is None:
            raise ValueError("route: smarthost needs a smarthost: {host: ...} section")
        return self


class Tracking(Model):
    opens: bool = True
    clicks: bool = True
    secret_file: SecretRef | None = None


class DKIMKey(Model):
    selector: str
    key_file: str
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"


class Ingest(Model):
    addresses: list[str] = []
    accept_from: Literal["users"] | list[str] = "users"


class CRM(Model):
    auto_create_contacts: bool = False
    link_by: list[Literal["address", "domain"]] = ["address", "domain"]
    exclude: list[str] = []


#: Event types a webhook may subscribe to (``events: []`` subscribes to all of them).
WEBHOOK_EVENTS: tuple[str, ...] = (
    "message.stored", "message.sent", "message.deferred", "message.bounced", "message.opened",
    "message.clicked", "message.replied", "account.needs_reconnect")
WebhookEvent = Literal["message.stored", "message.sent", "message.deferred", "message.bounced",
                       "message.opened", "message.clicked", "message.replied",
                       "account.needs_reconnect"]


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


class Logging(Model):
    format: Literal["json", "console", "auto"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Store(Model):
    url: str = ""


class Config(Model):
    hostname: str = "localhost"
    state_dir: str = "./var"
    store: Store = Store()
    listeners: Listeners = Listeners()
    users: list[User] = []
    accounts: list[Account] = []
    delivery: Delivery = Delivery(route="mx")
    tracking: Tracking = Tracking()
    dkim: dict[str, DKIMKey] = {}
    ingest: Ingest = Ingest()
    crm: CRM = CRM()
    policies_dir: str = "./policies"
    webhooks: list[Webhook] = []
    logging: Logging = Logging()
    drain_timeout: Duration = 10.0

    # Set by the loader, not by the file.
    source: str = Field(default="<memory>", exclude=True)

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", v):
            raise ValueError(f"{v!r} is not a host name")
        return v

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
        return self.state_path / "spool"

    @property
    def store_url(self) -> str:
        """The SQLAlchemy URL; SQLite paths are made absolute against the config directory."""
        url = self.store.url or f"sqlite+aiosqlite:///{self.state_path / 'crm.db'}"
        m = re.match(r"^(sqlite(?:\+\w+)?):///(?!/)(.+)$", url)
        if m and m.group(2) != ":memory:":
            url = f"{m.group(1)}:///{self.path(m.group(2))}"
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


# ----------------------------------------------------------------------------------
# secrets


def read_secret(ref: str, base_dir: Path) -> str:
    """Resolve a `*_file` value: a path, `env:NAME` or `credential:NAME`; strip one newline."""
    if ref.startswith("env:"):
        name = ref[4:]
        if name not in os.environ:
            raise FileNotFoundError(f"environment variable {name} is not set")
        return os.environ[name]
    if ref.startswith("credential:"):
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if not cred_dir:
            raise FileNotFoundError(
                f"{ref}: $CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the unit)")
        path = Path(cred_dir) / ref[len("credential:"):]
    else:
        path = Path(ref).expanduser()
        if not path.is_absolute():
            path = base_dir / path
    text = path.read_text(encoding="utf-8")
    return text[:-1] if text.endswith("\n") else text


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


def _yaml_problem(file: str, exc: yaml.YAMLError) -> Problem:
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark is not None else None
    what = getattr(exc, "problem", None) or str(exc)
    return Problem(file, line, "", f"YAML syntax error: {what}")


def load_yaml_with_nodes(path: Path) -> tuple[Any, yaml.Node | None]:
    """Parse a YAML file into (data, node tree); raise ConfigError naming the line on syntax errors."""
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(file, None, "", f"cannot read: {exc.strerror or exc}")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            return {}, None
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


def _semantic_problems(cfg: Config, node: yaml.Node | None) -> Iterator[Problem]:
    """Cross-key checks pydantic cannot do alone: references, files, duplicates."""
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
        if a.provider == "imap" and a.imap is None:
            yield at(("accounts", i, "provider"), "provider: imap needs an imap: {host, port} section")
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

    sub = cfg.listeners.submission
    if sub is not None:
        yield from check_file(("listeners", "submission", "cert_file"), sub.cert_file, False)
        yield from check_file(("listeners", "submission", "key_file"), sub.key_file, False)
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
    for domain, dkim_key in cfg.dkim.items():
        yield from check_file(("dkim", domain, "key_file"), dkim_key.key_file, False)

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


def load_config(path: str | Path | None = None) -> Config:
    """Read, validate and return the configuration; raise ConfigError with every problem."""
    p = find_config(path)
    data, node = load_yaml_with_nodes(p)
    file = str(p)
    if not isinstance(data, dict):
        raise ConfigError([Problem(file, 1, "", "the top level must be a mapping of keys")])
    try:
        cfg = Config.model_validate({**data, "source": str(p.resolve())})
    except ValidationError as exc:
        raise ConfigError(validation_problems(file, exc, node)) from None
    problems = list(_semantic_problems(cfg, node))
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
