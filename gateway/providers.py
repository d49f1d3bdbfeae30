"""Mailbox provider presets: each provider's servers, sign-in methods and address domains (no I/O).

`PRESETS` maps a provider name (the `provider:` key of an account) to a `MailProvider`:
its IMAP and SMTP servers, the OAuth provider preset it implies (google, microsoft),
whether its SMTP server files submitted mail in Sent by itself, which `auth.method`s it
takes (with the reason for each it refuses), what a person must do first (an app
password), and the address domains that imply it. `by_domain` answers "which provider
is alice@ymail.com?" from the table alone; `mx_provider` names the provider whose mail
exchangers an MX host name belongs to (Google Workspace, Microsoft 365, ...; the DNS
look-up itself is `gateway.accounts.discover`); `provider_problems` lists combinations
that cannot work, for `mailgw check` and the accounts API.

Host names are the ones the providers publish in their help pages. Two rest on less
certain ground and are marked where they are defined: Zoho's Canadian data centre
(`zohocloud.ca`) and the split of GMX into an international (`gmx.com`) and a German
(`gmx.net`) service.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, NamedTuple

__all__ = ["AUTH_METHODS", "PRESETS", "TLS", "AuthMethod", "MailProvider", "ProviderProblem", "Server",
           "by_domain", "mail_domain", "mx_provider", "provider_problems", "unknown_provider_message"]

TLS = Literal["none", "starttls", "implicit"]
AuthMethod = Literal["password", "oauth2", "delegate", "service"]
#: Every `auth.method` an account can name; a provider takes some of them.
AUTH_METHODS: tuple[AuthMethod, ...] = ("password", "oauth2", "delegate", "service")


@dataclass(frozen=True)
class Server:
    """An IMAP or SMTP server of a preset: host, port and how TLS is used."""

    host: str
    port: int
    tls: TLS


@dataclass(frozen=True)
class MailProvider:
    """One mailbox provider; see the module docstring.

    `imap`/`smtp` are None where the provider has no fixed servers (Exchange on-premises,
    a generic IMAP server): the account must name them. `auth_methods` are the
    `auth.method`s that can work; `refusals` says, for methods that cannot, why and what
    to use instead. `domains` are address domains that imply this provider: exact names,
    `*.suffix` (any subdomain) or `label.*` (that label under any one- or two-label
    suffix). `mx` are the mail-exchanger host suffixes that mean a custom domain is
    hosted here; `mx_servers` the servers such mailboxes use when they differ from the
    preset's (Zoho's organisation servers).
    """

    name: str
    label: str
    imap: Server | None
    smtp: Server | None
    oauth: Literal["google", "microsoft"] | None = None
    saves_sent: bool = False
    auth_methods: frozenset[AuthMethod] = frozenset({"password"})
    refusals: tuple[tuple[AuthMethod, str], ...] = ()
    app_password_note: str | None = None
    domains: tuple[str, ...] = ()
    mx: tuple[str, ...] = ()
    mx_servers: tuple[Server, Server] | None = None
    note: str | None = None

    @property
    def needs_imap_host(self) -> bool:
        """True where the account must give `imap: {host, port}` (no fixed server)."""
        return self.imap is None

    def why_not(self, method: str) -> str | None:
        """None when `method` can work here; else the reason it cannot and what to use."""
        if method in self.auth_methods:
            return None
        for m, why in self.refusals:
            if m == method:
                return why
        takes = ", ".join(m for m in AUTH_METHODS if m in self.auth_methods)
        return f"{self.label} does not take auth.method: {method} (it takes: {takes})"


# -- the presets ------------------------------------------------------------------------------

_MS_BASIC_GONE = ("Microsoft turned off basic authentication (passwords and app passwords, "
                  "also a delegate's) for IMAP and SMTP in Exchange Online; use auth.method: "
                  "oauth2 (the rep connects the mailbox) or service (app-only access for the tenant)")
_OUTLOOK_BASIC_GONE = ("Microsoft turned off basic authentication (passwords and app passwords) "
                       "for Outlook.com mailboxes; use auth.method: oauth2")
_NO_SASL_DELEGATE = ("{label} has no SASL delegate (master user) login: each mailbox signs in "
                     "as itself")
_APP_PASSWORD = ("{label} takes an app password, not the account password: the owner turns on "
                 "two-step verification and makes one in {where}")


def _no_delegate(label: str, instead: str) -> tuple[AuthMethod, str]:
    return ("delegate", _NO_SASL_DELEGATE.format(label=label) + f"; {instead}")


def _no_service(label: str) -> tuple[AuthMethod, str]:
    return ("service", f"{label} has no service accounts (delegated access to many mailboxes); "
                       "connect each mailbox with auth.method: password (an app password)")


def _imaps(host: str) -> Server:
    return Server(host, 993, "implicit")


def _zoho(name: str, dc: str, suffix: str, domains: tuple[str, ...], note: str = "") -> MailProvider:
    """A Zoho data centre: personal mailboxes on imap/smtp.<suffix>, organisations (custom
    domains) on imappro/smtppro.<suffix>."""
    label = f"Zoho Mail ({dc})"
    return MailProvider(
        name=name, label=label,
        imap=_imaps(f"imap.{suffix}"), smtp=Server(f"smtp.{suffix}", 465, "implicit"),
        auth_methods=frozenset({"password", "oauth2"}),
        refusals=(_no_delegate(label, "connect each mailbox"), _no_service(label)),
        app_password_note=_APP_PASSWORD.format(
            label=label, where=f"accounts.{suffix} > Security > App Passwords") +
        " (only with two-factor authentication on; IMAP access must be enabled in Mail settings)",
        domains=domains, mx=(suffix,),
        mx_servers=(_imaps(f"imappro.{suffix}"), Server(f"smtppro.{suffix}", 465, "implicit")),
        note=(f"mailboxes of an organisation (a custom domain) use imappro.{suffix} and "
              f"smtppro.{suffix}: set imap.host and smtp.host; Zoho files SMTP mail in Sent only "
              "when 'Save copy of sent emails' is on" + note))


_PRESET_LIST: tuple[MailProvider, ...] = (
    MailProvider(
        name="gmail", label="Gmail (Google Workspace)",
        imap=_imaps("imap.gmail.com"), smtp=Server("smtp.gmail.com", 587, "starttls"),
        oauth="google", saves_sent=True,
        auth_methods=frozenset({"password", "oauth2", "service"}),
        refusals=(_no_delegate("Gmail", "use auth.method: service (a Google Workspace service "
                                        "account with domain-wide delegation)"),),
        app_password_note=_APP_PASSWORD.format(
            label="Gmail", where="myaccount.google.com > Security > App passwords") +
        " (Workspace admins can forbid them; oauth2 or service is the lasting way)",
        domains=("gmail.com", "googlemail.com"),
        mx=("google.com", "googlemail.com")),
    MailProvider(
        name="microsoft365", label="Microsoft 365 (Exchange Online)",
        imap=_imaps("outlook.office365.com"), smtp=Server("smtp.office365.com", 587, "starttls"),
        oauth="microsoft", saves_sent=True,
        auth_methods=frozenset({"oauth2", "service"}),
        refusals=(("password", _MS_BASIC_GONE), ("delegate", _MS_BASIC_GONE)),
        domains=("*.onmicrosoft.com",),
        mx=("mail.protection.outlook.com", "mx.microsoft"),
        note="SMTP AUTH must be allowed for the mailbox (Exchange admin center > mailbox > "
             "Email apps > Authenticated SMTP)"),
    MailProvider(
        name="outlook", label="Outlook.com",
        imap=_imaps("outlook.office365.com"), smtp=Server("smtp-mail.outlook.com", 587, "starttls"),
        oauth="microsoft", saves_sent=True,
        auth_methods=frozenset({"oauth2"}),
        refusals=(("password", _OUTLOOK_BASIC_GONE),
                  _no_delegate("Outlook.com", "connect each mailbox with auth.method: oauth2"),
                  ("service", "Outlook.com mailboxes are personal: there is no tenant for app-only "
                              "access; connect each mailbox with auth.method: oauth2")),
        domains=("outlook.com", "hotmail.com", "live.com", "msn.com", "passport.com",
                 "windowslive.com", "outlook.co.uk", "outlook.de", "outlook.fr", "outlook.es",
                 "outlook.it", "hotmail.co.uk", "hotmail.de", "hotmail.fr", "hotmail.es",
                 "hotmail.it", "hotmail.nl", "hotmail.be", "hotmail.ca", "live.co.uk", "live.de",
                 "live.fr", "live.nl", "live.it", "live.ca", "live.com.au"),
        mx=("olc.protection.outlook.com",)),
    MailProvider(
        name="yahoo", label="Yahoo Mail",
        imap=_imaps("imap.mail.yahoo.com"), smtp=Server("smtp.mail.yahoo.com", 465, "implicit"),
        saves_sent=True, auth_methods=frozenset({"password", "oauth2"}),
        refusals=(_no_delegate("Yahoo Mail", "connect each mailbox"), _no_service("Yahoo Mail")),
        app_password_note=_APP_PASSWORD.format(
            label="Yahoo Mail", where="login.yahoo.com > Account security > Generate app password"),
        # Yahoo Japan (yahoo.co.jp) is another company with other servers: not listed.
        domains=("yahoo.com", "ymail.com", "rocketmail.com", "yahoo.co.uk", "yahoo.ie",
                 "yahoo.fr", "yahoo.de", "yahoo.it", "yahoo.es", "yahoo.ca", "yahoo.com.au",
                 "yahoo.co.nz", "yahoo.co.in", "yahoo.in", "yahoo.com.br", "yahoo.com.mx",
                 "yahoo.com.ar", "yahoo.com.sg", "yahoo.com.hk", "yahoo.com.tw", "yahoo.com.ph",
                 "yahoo.se", "yahoo.dk", "yahoo.no", "yahoo.gr", "yahoo.pl", "yahoo.ro"),
        mx=("yahoodns.net",),
        note="OAuth2 needs an app registered with Yahoo (and Yahoo's approval for mail scopes) "
             "declared under oauth.providers"),
    MailProvider(
        name="aol", label="AOL Mail",
        imap=_imaps("imap.aol.com"), smtp=Server("smtp.aol.com", 465, "implicit"),
        auth_methods=frozenset({"password", "oauth2"}),
        refusals=(_no_delegate("AOL Mail", "connect each mailbox"), _no_service("AOL Mail")),
        app_password_note=_APP_PASSWORD.format(
            label="AOL Mail", where="login.aol.com > Account security > Generate app password"),
        domains=("aol.com", "aim.com", "aol.co.uk", "aol.de", "aol.fr", "aol.it", "aol.es",
                 "aol.ca", "aol.com.au", "love.com", "ygm.com", "games.com", "wow.com"),
        # AOL's exchangers are Yahoo's (mx-aol.mail.gm0.yahoodns.net): see mx_provider.
        mx=()),
    MailProvider(
        name="icloud", label="iCloud Mail",
        imap=_imaps("imap.mail.me.com"), smtp=Server("smtp.mail.me.com", 587, "starttls"),
        auth_methods=frozenset({"password"}),
        refusals=(("oauth2", "iCloud Mail takes no OAuth2 for IMAP or SMTP; use auth.method: "
                             "password with an app-specific password"),
                  _no_delegate("iCloud Mail", "connect each mailbox"), _no_service("iCloud Mail")),
        app_password_note=_APP_PASSWORD.format(
            label="iCloud Mail", where="account.apple.com > Sign-In and Security > "
                                       "App-Specific Passwords") +
        "; the username is the iCloud address (for a custom domain too)",
        domains=("icloud.com", "me.com", "mac.com"),
        mx=("mail.icloud.com",)),
    _zoho("zoho", "United States", "zoho.com", ("zoho.com", "zohomail.com")),
    _zoho("zoho-eu", "Europe", "zoho.eu", ("zoho.eu", "zohomail.eu")),
    _zoho("zoho-in", "India", "zoho.in", ("zoho.in", "zohomail.in")),
    _zoho("zoho-au", "Australia", "zoho.com.au", ("zoho.com.au", "zohomail.com.au")),
    _zoho("zoho-jp", "Japan", "zoho.jp", ("zoho.jp", "zohomail.jp")),
    # Canada: Zoho's Canadian data centre lives under zohocloud.ca; the mail host names
    # follow the other centres' pattern but are the least certain of this table.
    _zoho("zoho-ca", "Canada", "zohocloud.ca", ("zohocloud.ca",),
          "; the Canadian host names (zohocloud.ca) follow the other data centres' pattern"),
    _zoho("zoho-sa", "Saudi Arabia", "zoho.sa", ("zoho.sa", "zohomail.sa")),
    _zoho("zoho-cn", "China", "zoho.com.cn", ("zoho.com.cn", "zohomail.cn")),
    MailProvider(
        name="fastmail", label="Fastmail",
        imap=_imaps("imap.fastmail.com"), smtp=Server("smtp.fastmail.com", 465, "implicit"),
        auth_methods=frozenset({"password"}),
        refusals=(("oauth2", "Fastmail offers OAuth2 only to the mail apps it has registered; use "
                             "auth.method: password with an app password"),
                  _no_delegate("Fastmail", "connect each mailbox"), _no_service("Fastmail")),
        app_password_note=_APP_PASSWORD.format(
            label="Fastmail", where="Settings > Privacy & Security > Manage app passwords") +
        " (access: IMAP and SMTP)",
        domains=("fastmail.com", "fastmail.fm", "fastmail.net", "fastmail.org", "fastmail.us",
                 "fastmail.to", "fastmail.cn", "fastmail.co.uk", "fastmail.com.au", "fastmail.de",
                 "fastmail.es", "fastmail.fr", "fastmail.im", "fastmail.in", "fastmail.jp",
                 "fastmail.mx", "fastmail.nl", "fastmail.se", "fastmail.tw", "fastmail.uk",
                 "messagingengine.com", "sent.com", "sent.as", "sent.at", "123mail.org",
                 "eml.cc", "fastimap.com", "ftml.net", "imap.cc", "mm.st"),
        mx=("messagingengine.com",)),
    # GMX runs two services: gmx.com (international) and gmx.net (Germany, Austria,
    # Switzerland), with different servers and logins, hence two presets.
    MailProvider(
        name="gmx", label="GMX (gmx.com)",
        imap=_imaps("imap.gmx.com"), smtp=Server("mail.gmx.com", 587, "starttls"),
        auth_methods=frozenset({"password"}),
        refusals=(("oauth2", "GMX takes no OAuth2 from other applications; use auth.method: "
                             "password"),
                  _no_delegate("GMX", "connect each mailbox"), _no_service("GMX")),
        app_password_note="GMX: turn on 'POP3, IMAP, SMTP' access in the mailbox settings; with "
                          "two-factor authentication on, use an application-specific password",
        domains=("gmx.com", "gmx.us", "gmx.co.uk", "gmx.fr", "gmx.es", "gmx.it", "gmx.ca",
                 "gmx.*"),
        mx=("gmx.com",)),
    MailProvider(
        name="gmx-de", label="GMX (gmx.net, gmx.de, gmx.at, gmx.ch)",
        imap=_imaps("imap.gmx.net"), smtp=Server("mail.gmx.net", 587, "starttls"),
        auth_methods=frozenset({"password"}),
        refusals=(("oauth2", "GMX takes no OAuth2 from other applications; use auth.method: "
                             "password"),
                  _no_delegate("GMX", "connect each mailbox"), _no_service("GMX")),
        app_password_note="GMX: turn on 'POP3/IMAP Abruf' (POP3, IMAP and SMTP access) in the "
                          "mailbox settings; with two-factor authentication on, use an "
                          "application-specific password",
        domains=("gmx.net", "gmx.de", "gmx.at", "gmx.ch", "gmx.li", "gmx.eu"),
        mx=("gmx.net",)),
    MailProvider(
        name="exchange", label="Exchange Server (on-premises)",
        imap=None, smtp=None,
        auth_methods=frozenset({"password", "delegate", "oauth2"}),
        refusals=(("service", "auth.method: service reaches Exchange Online and Google Workspace; "
                              "on-premises Exchange takes password or delegate (a mailbox with "
                              "Full Access to the others)"),),
        note="IMAP4 and authenticated SMTP must be enabled on the server (they are off by "
             "default); give imap: {host, port} and smtp: {host, port}"),
    MailProvider(
        name="imap", label="IMAP server",
        imap=None, smtp=None,
        auth_methods=frozenset({"password", "oauth2", "delegate", "service"})),
)

#: Every preset by name, in the order above.
PRESETS: Mapping[str, MailProvider] = MappingProxyType({p.name: p for p in _PRESET_LIST})


def unknown_provider_message(name: object) -> str:
    """The error for a `provider:` that is not a preset, listing the names there are."""
    return f"{name!r} is not a provider preset; use one of: {', '.join(PRESETS)}"


# -- domains -----------------------------------------------------------------------------------

_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def _normal(domain: str) -> str:
    return domain.strip().rstrip(".").lower()


def mail_domain(address: str) -> str:
    """The domain of an e-mail address, lower-case and in DNS (A-label) form.

    `" Alice@Example.COM. "` -> `"example.com"`; `"bob@bücher.example"` ->
    `"xn--bcher-kva.example"`. ValueError with a clear message for anything that is not
    local-part@domain with a domain DNS can look up (at least two labels, each of
    letters, digits and inner hyphens, at most 63 characters, 253 in all).
    """
    if not isinstance(address, str):
        raise ValueError(f"{address!r} is not an e-mail address")
    text = address.strip()
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"{address!r} is not an e-mail address (local-part@domain)")
    domain = _normal(domain)
    try:
        ascii_domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except (UnicodeError, ValueError):
        raise ValueError(f"{address!r}: {domain!r} is not a valid domain name") from None
    labels = ascii_domain.split(".")
    if (len(ascii_domain) > 253 or len(labels) < 2
            or not all(_LABEL_RE.match(label) for label in labels) or labels[-1].isdigit()):
        raise ValueError(f"{address!r}: {domain!r} is not a domain name mail can be looked up for")
    return ascii_domain


def _build_domain_index() -> tuple[dict[str, str], list[tuple[str, str]], dict[str, str]]:
    exact: dict[str, str] = {}
    suffixes: list[tuple[str, str]] = []
    labels: dict[str, str] = {}
    for p in _PRESET_LIST:
        for d in p.domains:
            if d.startswith("*."):
                suffixes.append((d[2:], p.name))
            elif d.endswith(".*"):
                labels.setdefault(d[:-2], p.name)
            else:
                exact.setdefault(d, p.name)
    suffixes.sort(key=lambda s: -len(s[0]))
    return exact, suffixes, labels


_EXACT, _SUFFIXES, _LABELS = _build_domain_index()


def _under(name: str, suffix: str) -> bool:
    """Is `name` `suffix` itself or a subdomain of it (label-wise, not string-wise)?"""
    return name == suffix or name.endswith("." + suffix)


def by_domain(domain: str) -> MailProvider | None:
    """The provider an address domain implies (`ymail.com` -> yahoo), or None.

    Exact names first, then `*.suffix` entries (longest first), then `label.*` entries.
    Takes a domain, not an address; never raises for any string (None for anything unknown).
    """
    if not isinstance(domain, str):
        return None
    d = _normal(domain)
    if not d:
        return None
    name = _EXACT.get(d)
    if name is None:
        name = next((n for suffix, n in _SUFFIXES if d.endswith("." + suffix)), None)
    if name is None:
        first, _, rest = d.partition(".")
        if rest and rest.count(".") <= 1 and all(rest.split(".")):
            name = _LABELS.get(first)
    return PRESETS[name] if name is not None else None


def mx_provider(exchange: str) -> MailProvider | None:
    """The provider whose mail exchangers `exchange` (an MX host name) belongs to, or None.

    `aspmx.l.google.com` -> gmail (Google Workspace); `contoso-com.mail.protection.outlook.com`
    -> microsoft365; `mx-aol.mail.gm0.yahoodns.net` -> aol; `mx.zoho.eu` -> zoho-eu. The
    longest matching suffix wins, so `mx.zoho.com.au` is Australia, not the United States.
    """
    if not isinstance(exchange, str):
        return None
    host = _normal(exchange)
    if not host:
        return None
    if host.startswith("mx-aol.") and _under(host, "yahoodns.net"):
        return PRESETS["aol"]
    best: tuple[int, str] | None = None
    for p in _PRESET_LIST:
        for suffix in p.mx:
            if _under(host, suffix) and (best is None or len(suffix) > best[0]):
                best = (len(suffix), p.name)
    return PRESETS[best[1]] if best is not None else None


# -- combinations that cannot work ----------------------------------------------------------------

class ProviderProblem(NamedTuple):
    """One problem with an account's provider settings.

    `key` is relative to the account (`provider`, `auth.method`, `imap`, `smtp`,
    `auth.service_account`); `severity` "error" means it cannot work (`mailgw check`
    refuses), "warning" that it may not (it says so and goes on).
    """

    key: str
    message: str
    severity: Literal["error", "warning"] = "error"


def provider_problems(provider: str, auth_method: str, *, has_imap_host: bool, has_smtp_host: bool,
                      sends: bool = False, has_token_endpoint: bool | None = None,
                      service_kind: str | None = None) -> list[ProviderProblem]:
    """The combinations of one account's settings that cannot work with its provider.

    `has_imap_host`/`has_smtp_host`: the account names its own `imap.host`/`smtp.host`.
    `sends`: mail is sent through this account's upstream (`delivery.route: account` and a
    user sends as it): without an SMTP server that cannot work. `has_token_endpoint`: for
    `oauth2`, whether `auth.token_endpoint` or `auth.oauth_provider` is given (None: the
    caller checks that itself). `service_kind`: for `service`, the kind of the service
    account named (`google`, `microsoft`), when known.
    Empty when nothing is wrong; an unknown provider is one problem and nothing more.
    """
    p = PRESETS.get(provider) if isinstance(provider, str) else None
    if p is None:
        return [ProviderProblem("provider", unknown_provider_message(provider))]
    problems: list[ProviderProblem] = []
    if p.needs_imap_host and not has_imap_host:
        problems.append(ProviderProblem(
            "provider", f"provider: {p.name} needs an imap: {{host, port}} section"))
    if sends and p.smtp is None and not has_smtp_host:
        problems.append(ProviderProblem(
            "smtp", f"mail is sent through this account but provider: {p.name} has no SMTP "
                    "server preset: give smtp: {host, port}"))
    if auth_method in AUTH_METHODS:
        why = p.why_not(auth_method)
        if why is not None:
            problems.append(ProviderProblem("auth.method", why))
        elif auth_method == "oauth2" and p.oauth is None and has_token_endpoint is False:
            problems.append(ProviderProblem(
                "auth.method", f"auth.method: oauth2 with provider: {p.name} needs auth.oauth_provider "
                               "(an oauth.providers entry) or auth.token_endpoint: no OAuth preset "
                               "serves it"))
        elif auth_method == "oauth2" and p.name == "exchange":
            problems.append(ProviderProblem(
                "auth.method", "Exchange Server takes OAuth2 for IMAP and SMTP only with hybrid "
                               "modern authentication set up; password or delegate is the usual way",
                "warning"))
        elif (auth_method == "service" and service_kind is not None and p.oauth is not None
              and service_kind != p.oauth):
            problems.append(ProviderProblem(
                "auth.service_account", f"a {service_kind} service account cannot open "
                                        f"{p.label} mailboxes (it needs a {p.oauth} one)"))
    return problems
