"""Tell machine opens and clicks from people: pure rules over one hit and what came before it.

Every hit on the tracking endpoint is recorded; this module only decides ``machine``
(true or false), a ``category`` and says why. ``machine: true`` means "not seen to be the
recipient, a person, looking at the message or choosing a link": an image proxy that
fetched the pixel, a security scanner that followed every link, a browser prefetch, or the
sender looking at their own copy. ``machine: false`` is category ``human``.

One kind of machine hit is kept apart: category ``proxied``, an open fetched through a
mailbox provider's image proxy that fetches when the message is displayed (Gmail's
``GoogleImageProxy``, Yahoo's ``YahooMailProxy``). A person probably opened the message,
but the proxy hides who and with which client, so it stays ``machine: true`` (SPEC §5:
image-proxy opens are machine) while reports and summaries show it apart from both human
and machine opens, and the open rate counts it as a person (:mod:`gateway.crm.reports`).
A proxied open still goes through rules 5-9 below: one fetched within
``open_after_delivery`` of delivery is a prefetch at delivery (``timing``), one from
``tracking.machine_networks`` is ``network``. Apple Mail Privacy Protection is not
proxied: it fetches on download, read or not, so it is category ``proxy`` (machine).

The rules, first match wins (the reason names the rule):

1. ``HEAD`` requests (never recorded by the endpoint; listed for completeness).
2. The honeypot link: a link hidden from people (``display:none``, no text) that only
   software follows.
3. Browser prefetch: ``Purpose: prefetch`` / ``Sec-Purpose: prefetch`` / ``X-Moz: prefetch``.
4. :data:`SIGNATURES`, one table of known proxies, scanners and bots (user agent,
   Referer host, client network), plus the admin's ``tracking.machine_networks``. A
   ``proxied`` row (image proxies that fetch on display) decides only when rules 5-9 do not.
5. No ``User-Agent`` at all: browsers and mail clients always send one.
6. The sender themself: the hit comes from the IP address of the client that submitted
   the message, or from ``tracking.internal_networks`` (the company's own egress).
   What cannot be detected: the sender reading their copy on another network (phone on
   mobile data), or in a webmail whose images are proxied. mailgw has no web session of
   its own, so a "logged-in sender" cannot be recognised either. Internal recipients on
   the sender's network are counted as the sender too; turn tracking off for internal
   mail by policy (README "Policies"; ``policies/10-internal.yaml`` does it).
7. A hit on the same copy within ``honeypot_window`` after its honeypot link was followed.
8. Timing: a click within ``click_after_delivery`` (an open within
   ``open_after_delivery``) of the moment the recipient's server accepted the copy —
   people are not that fast, the receiving gateway's scanner is.
9. Bursts: most links of a copy (at least two, at least ``burst_share`` of them) clicked
   within ``burst_window``, or ``burst_clicks`` clicks of a copy within the window.
   Only earlier hits count, so the first click of a burst is decided by rules 1-8 alone;
   a scanner that clicks all links at once is usually caught by rule 8 anyway.

What cannot be told apart, honestly: Apple Mail Privacy Protection fetches every image
when the message is downloaded to the device, whether or not it is ever read, through
Apple's relay with the bare user agent ``Mozilla/5.0``; a person reading with MPP on
looks the same, so every MPP open is a machine open (``proxy``). Gmail fetches images
through its proxy (``GoogleImageProxy``) mostly when the message is displayed, but also
re-fetches and caches, and hides the reader's address and client: ``proxied``, counted
as a person opening in the open rate, never as a human open. Yahoo Mail's proxy fetches
images when a message is shown, like Gmail's, so its opens are ``proxied`` too; a click
fetched by it is not a person choosing a link and stays ``proxy``. Scanners that pose as desktop Chrome
from cloud addresses and wait minutes are not caught by any rule here.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

Kind = Literal["open", "click", "honeypot"]
Category = Literal["human", "proxied", "head", "honeypot", "prefetch", "proxy", "scanner",
                   "bot", "network", "no-user-agent", "sender", "timing", "burst"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

OPENS: frozenset[str] = frozenset({"open"})
CLICKS: frozenset[str] = frozenset({"click", "honeypot"})
ANY: frozenset[str] = OPENS | CLICKS


@dataclass(frozen=True)
class Signature:
    """One row of the table: a known proxy, scanner or bot and how to recognise it.

    A request matches the row when the row applies to its kind and ANY of the given tests
    matches: `ua` (a regular expression, written in lower case, searched in the lower-cased
    User-Agent: much faster than re.IGNORECASE),
    `ua_exact` (the whole User-Agent), `referer` (a regular expression matched against the
    Referer's host name) or `networks` (the client address is in one of the CIDRs).
    """

    name: str
    category: Category
    applies_to: frozenset[str]
    what: str
    ua: str | None = None
    ua_exact: str | None = None
    referer: str | None = None
    networks: tuple[str, ...] = ()
    source: str = ""


#: Known proxies, scanners and bots. Sources are cited per row; user agents change, so
#: this is the table to extend (`tracking.machine_networks` adds networks without code).
SIGNATURES: tuple[Signature, ...] = (
    # -- mailbox providers' image proxies (opens) --------------------------------------
    Signature(
        "gmail-image-proxy", "proxied", OPENS,
        "Gmail's image proxy fetched the pixel (Google hides who opened, and when)",
        ua=r"googleimageproxy|via ggpht\.com",
        source="UA 'Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com "
               "GoogleImageProxy)': scientiamobile.com/what-is-google-image-proxy; proxy since "
               "Dec 2013: wordtothewise.com/2013/12/gmail-deploys-image-proxy-servers"),
    Signature(
        "apple-mpp", "proxy", OPENS,
        "Apple Mail Privacy Protection prefetched the pixel through Apple's relay",
        ua_exact="Mozilla/5.0",
        source="MPP downloads every image when mail reaches the device, through iCloud Private "
               "Relay infrastructure (wordtothewise.com/2021/09/apple-mpp-reporting-and-"
               "geolocation; help.socketlabs.com 'identifying Apple MPP opens'); ESPs key on the "
               "bare 'Mozilla/5.0' user agent. Apple publishes the relay's egress ranges "
               "(mask-api.icloud.com/egress-ip-ranges.csv, large, changes often): add them to "
               "tracking.machine_networks to catch MPP fetches that send another user agent"),
    Signature(
        "yahoo-mail-proxy", "proxied", OPENS,
        "Yahoo Mail's image proxy fetched the pixel as the message was shown",
        ua=r"yahoomailproxy",
        source="UA 'YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html'"),
    Signature(
        "yahoo-mail-proxy-fetch", "proxy", CLICKS,
        "Yahoo Mail's content fetch proxy fetched the link (not a person's click)",
        ua=r"yahoomailproxy",
        source="as above"),
    # -- link scanners (clicks) ----------------------------------------------------------
    Signature(
        "microsoft-safe-links", "scanner", CLICKS,
        "Microsoft Defender Safe Links checked the link",
        ua=r"safelinks|microsoft-urlanalyzer|bingpreview",
        referer=r"(^|\.)safelinks\.protection\.outlook\.com$",
        source="Safe Links rewrites to *.safelinks.protection.outlook.com and checks the URL at "
               "delivery and at time of click; the check carries that Referer "
               "(check.live-direct-marketing.online/blog/microsoft-defender-link-click-pattern)"),
    Signature(
        "microsoft-office-precheck", "scanner", CLICKS,
        "Microsoft Office fetched the link before opening the browser",
        ua=r"ms-office|microsoft office|msoffice|microsoft outlook|existence discovery",
        source="Office apps request a link themselves ('Microsoft Office Existence Discovery', "
               "'ms-office') before handing it to the browser; for opens the same user agent is "
               "Outlook desktop showing images, a person, so this row is for clicks only"),
    Signature(
        "proofpoint-url-defense", "scanner", CLICKS,
        "Proofpoint URL Defense checked the link",
        ua=r"proofpoint", referer=r"(^|\.)urldefense(\.proofpoint)?\.com$",
        source="rewrites to urldefense.proofpoint.com / urldefense.com "
               "(check.live-direct-marketing.online/blog/bot-clicks-security-scanners-detect)"),
    Signature(
        "mimecast-url-protect", "scanner", CLICKS,
        "Mimecast URL Protect checked the link",
        ua=r"mimecast", referer=r"(^|\.)(protect-[a-z0-9-]+\.mimecast|mimecastprotect)\.com$",
        source="rewrites to protect-*.mimecast.com (same source as Proofpoint)"),
    Signature(
        "barracuda-link-protection", "scanner", CLICKS,
        "Barracuda Link Protection checked the link",
        ua=r"barracuda", referer=r"(^|\.)linkprotect\.cudasvc\.com$",
        source="rewrites to linkprotect.cudasvc.com, 'Barracuda' in the user agent (same source)"),
    Signature(
        "cisco-secure-email", "scanner", CLICKS,
        "Cisco Secure Email (IronPort) checked the link",
        ua=r"ironport|ciscosecureemail", referer=r"(^|\.)secure-web\.cisco\.com$",
        source="rewrites to secure-web.cisco.com (same source)"),
    Signature(
        "symantec-click-time", "scanner", CLICKS,
        "Symantec / Broadcom email security checked the link",
        ua=r"symantec", referer=r"(^|\.)clicktime\.symantec\.com$",
        source="click-time URL protection rewrites to clicktime.symantec.com"),
    Signature(
        "trend-micro", "scanner", CLICKS,
        "Trend Micro email security checked the link",
        ua=r"trend ?micro|\btmes\b",
        source="'TMES' user agent (check.live-direct-marketing.online, as above)"),
    Signature(
        "sophos-time-of-click", "scanner", CLICKS,
        "Sophos time-of-click protection checked the link",
        ua=r"sophos", referer=r"(^|\.)protection\.sophos\.com$",
        source="Sophos Email rewrites to <region>.protection.sophos.com"),
    Signature(
        "other-email-security", "scanner", ANY,
        "an email security gateway fetched the URL",
        ua=r"fortimail|fortinet|fireeye|forcepoint|mcafee|kaspersky|zscaler|checkpoint|"
           r"\bavanan\b|abnormal ?security|\bvade\b|spamtitan|hornetsecurity|libraesva",
        source="vendor names that appear in scanner user agents (same source)"),
    # -- generic automation --------------------------------------------------------------
    Signature(
        "headless-browser", "bot", ANY,
        "a headless or automated browser (sandbox detonation)",
        ua=r"headlesschrome|phantomjs|puppeteer|playwright|selenium|webdriver",
        source="sandboxes render mail in headless Chrome and click every link"),
    Signature(
        "http-tool", "bot", ANY,
        "an HTTP library or command-line tool, not a browser or mail client",
        ua=r"^(curl|wget|python-requests|python-urllib|python-httpx|aiohttp|go-http-client|"
           r"libwww-perl|postmanruntime|httpie|scrapy|masscan|zgrab)\b",
        source="default user agents of scripting HTTP clients"),
    Signature(
        "app-http-client", "bot", CLICKS,
        "a click without a browser (an application's HTTP client)",
        ua=r"^(okhttp|java|apache-httpclient|dalvik|winhttp|node-fetch|axios|undici|ruby)\b",
        source="a click opens a browser; these libraries are how scanners fetch. For opens they "
               "can be a mail app loading images (Android apps use okhttp/Dalvik), so opens are "
               "not judged by them"),
    Signature(
        "crawler-or-preview", "bot", ANY,
        "a crawler or link-preview bot",
        ua=r"(?<!cu)bot\b|crawler\b|spider\b|scanner\b|preview\b|fetcher\b|facebookexternalhit|"
           r"whatsapp|slack-imgproxy|skypeuripreview|google-safety|google-read-aloud",
        source="bots name themselves '...bot', '...crawler', '...spider'"),
)


@dataclass(frozen=True)
class Settings:
    """Thresholds and networks for the rules (from `tracking:` in the configuration)."""

    click_after_delivery: float = 10.0
    open_after_delivery: float = 2.0
    burst_window: float = 3.0
    burst_share: float = 0.8
    burst_clicks: int = 5
    honeypot_window: float = 600.0
    internal_networks: tuple[Network, ...] = ()
    machine_networks: tuple[Network, ...] = ()


@dataclass(frozen=True)
class Observation:
    """One request on the endpoint, as seen by the rules."""

    kind: Kind
    copy_id: str
    link: int
    at: float
    method: str = "GET"
    ip: str | None = None
    user_agent: str = ""
    referer: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)   # lower-case names


@dataclass(frozen=True)
class PriorHit:
    """An earlier hit on the same copy (from the endpoint's memory or from the store)."""

    id: str
    kind: Kind
    link: int
    at: float


@dataclass(frozen=True)
class CopyInfo:
    """What the store knows about one recipient's copy (looked up by its queue id)."""

    copy_id: str
    recipient: str
    sender: str
    message_id: str | None = None
    submitted_at: float | None = None   # when the gateway accepted the message
    delivered_at: float | None = None   # when the recipient's side accepted the copy (`sent`)
    client_ip: str | None = None        # the submitting SMTP client's address
    links: int = 0                      # tracked links in the copy (the honeypot excluded)
    recent_hits: tuple[PriorHit, ...] = ()   # hits the store has for this copy, recent first


@dataclass(frozen=True)
class Verdict:
    machine: bool
    category: Category
    reason: str | None       # None for people

    @classmethod
    def human(cls) -> Verdict:
        return cls(False, "human", None)


@dataclass(frozen=True)
class _Compiled:
    sig: Signature
    ua: re.Pattern[str] | None
    referer: re.Pattern[str] | None
    networks: tuple[Network, ...]


def compile_table(table: Iterable[Signature]) -> tuple[_Compiled, ...]:
    return tuple(_Compiled(
        s, re.compile(s.ua) if s.ua else None,
        re.compile(s.referer) if s.referer else None,
        tuple(ipaddress.ip_network(n, strict=False) for n in s.networks)) for s in table)


_DEFAULT_TABLE = compile_table(SIGNATURES)


def parse_ip(value: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address (an IPv4-mapped IPv6 address as its IPv4 address), or None if it is not one."""
    if not value:
        return None
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def in_networks(addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
                networks: Iterable[Network]) -> bool:
    return addr is not None and any(addr.version == n.version and addr in n for n in networks)


def _referer_host(referer: str) -> str:
    try:
        return (urlsplit(referer).hostname or "").lower()
    except ValueError:
        return ""


def match_signature(obs: Observation, table: Sequence[_Compiled] = _DEFAULT_TABLE) -> Signature | None:
    """The first row of `table` matching `obs`, or None."""
    ua = obs.user_agent.strip()
    low = ua.lower()
    host = _referer_host(obs.referer) if obs.referer else ""
    addr = parse_ip(obs.ip)
    for row in table:
        s = row.sig
        if obs.kind not in s.applies_to:
            continue
        if (s.ua_exact is not None and ua == s.ua_exact) \
                or (row.ua is not None and low and row.ua.search(low)) \
                or (row.referer is not None and host and row.referer.search(host)) \
                or (row.networks and in_networks(addr, row.networks)):
            return s
    return None


def _is_prefetch(headers: Mapping[str, str]) -> bool:
    for name in ("purpose", "sec-purpose", "x-purpose", "x-moz"):
        if "prefetch" in headers.get(name, "").lower() or "preview" in headers.get(name, "").lower():
            return True
    return False


def classify(obs: Observation, copy: CopyInfo | None, prior: Iterable[PriorHit] = (),
             settings: Settings = Settings(),
             table: Sequence[_Compiled] = _DEFAULT_TABLE) -> Verdict:
    """Decide whether `obs` is a machine (see the module docstring for the rules).

    `prior` are other hits on the same copy; only those before `obs.at` are considered.
    """
    if obs.method.upper() == "HEAD":
        return Verdict(True, "head", "HEAD request (a link checker; never recorded)")
    if obs.kind == "honeypot":
        return Verdict(True, "honeypot", "followed the hidden honeypot link")
    if _is_prefetch(obs.headers):
        return Verdict(True, "prefetch", "browser prefetch (Purpose: prefetch)")
    sig = match_signature(obs, table)
    if sig is not None and sig.category != "proxied":
        return Verdict(True, sig.category, f"{sig.name}: {sig.what}")
    # a proxied open goes on through the remaining rules; it is proxied if none says more
    proxied = Verdict(True, "proxied", f"{sig.name}: {sig.what}") if sig is not None else None
    addr = parse_ip(obs.ip)
    if in_networks(addr, settings.machine_networks):
        return Verdict(True, "network", f"{obs.ip} is in tracking.machine_networks")
    if not obs.user_agent.strip():
        return Verdict(True, "no-user-agent", "no User-Agent header (browsers always send one)")
    if copy is not None and copy.client_ip and addr is not None and addr == parse_ip(copy.client_ip):
        return Verdict(True, "sender", f"the sender's own {obs.kind}: same IP address as the "
                                       "client that submitted the message")
    if in_networks(addr, settings.internal_networks):
        return Verdict(True, "sender", f"from an internal network ({obs.ip} is in "
                                       "tracking.internal_networks): the sender or a colleague")
    before = [p for p in _merge(prior, copy) if p.at <= obs.at]
    honeypots = [p.at for p in before if p.kind == "honeypot"]
    if honeypots and obs.at - max(honeypots) <= settings.honeypot_window:
        return Verdict(True, "honeypot", f"{obs.at - max(honeypots):.0f} s after the honeypot link of "
                                         "this copy was followed")
    if copy is not None:
        start = copy.delivered_at or copy.submitted_at
        limit = settings.click_after_delivery if obs.kind == "click" else settings.open_after_delivery
        if start is not None and obs.at - start < limit:
            what = "clicked" if obs.kind == "click" else "opened"
            return Verdict(True, "timing", f"{what} {max(obs.at - start, 0.0):.1f} s after delivery "
                                           f"(people need more than {limit:g} s)")
    if obs.kind == "click":
        window = [p for p in before if p.kind == "click" and obs.at - p.at <= settings.burst_window]
        clicks = len(window) + 1
        links = {p.link for p in window} | {obs.link}
        total = copy.links if copy is not None else 0
        if total >= 2 and len(links) >= max(2, math.ceil(settings.burst_share * total)):
            return Verdict(True, "burst", f"{len(links)} of {total} links clicked within "
                                          f"{settings.burst_window:g} s")
        if clicks >= settings.burst_clicks:
            return Verdict(True, "burst", f"{clicks} clicks within {settings.burst_window:g} s")
    return proxied or Verdict.human()


def _merge(prior: Iterable[PriorHit], copy: CopyInfo | None) -> list[PriorHit]:
    seen: dict[str, PriorHit] = {p.id: p for p in prior}
    if copy is not None:
        for p in copy.recent_hits:
            seen.setdefault(p.id, p)
    return list(seen.values())
