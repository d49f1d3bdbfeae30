"""Machine-vs-human classification: the signature table, the sender, timing, bursts, honeypot."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from gateway.tracking.classify import (
    SIGNATURES,
    CopyInfo,
    Kind,
    Observation,
    PriorHit,
    Settings,
    classify,
    compile_table,
)

T0 = 1_700_000_000.0
COPY = CopyInfo(copy_id="01HZZZZZZZZZZZZZZZZZZZZZZZ", recipient="bob@example.org",
                sender="alice@example.com", delivered_at=T0, submitted_at=T0 - 2,
                client_ip="198.51.100.7", links=4)
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/124.0.0.0 Safari/537.36")
IPHONE_MAIL = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
               "(KHTML, like Gecko) Mobile/15E148")
OUTLOOK_DESKTOP = ("Mozilla/4.0 (compatible; ms-office; MSOffice 16)")
LATER = T0 + 3600  # long after delivery: timing rules do not apply


def obs(kind: Kind = "open", ua: str = CHROME, *, at: float = LATER, link: int = 0,
        ip: str = "203.0.113.9", referer: str = "", headers: dict[str, str] | None = None,
        method: str = "GET") -> Observation:
    return Observation(kind=kind, copy_id=COPY.copy_id, link=link, at=at, method=method, ip=ip,
                       user_agent=ua, referer=referer, headers=headers or {})


# (name, observation, expected machine, expected category, text expected in the reason)
CASES: list[tuple[str, Observation, bool, str, str]] = [
    ("human open in Chrome", obs(), False, "human", ""),
    ("human click in Chrome", obs("click", link=2), False, "human", ""),
    ("iPhone Mail without MPP", obs(ua=IPHONE_MAIL), False, "human", ""),
    ("Outlook desktop shows images: a person", obs(ua=OUTLOOK_DESKTOP), False, "human", ""),
    ("Gmail image proxy",
     obs(ua="Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"),
     True, "proxied", "gmail-image-proxy"),
    ("Apple MPP bare Mozilla/5.0", obs(ua="Mozilla/5.0"), True, "proxy", "apple-mpp"),
    ("Apple MPP only for opens: a bare UA click is not MPP", obs("click", ua="Mozilla/5.0", link=1),
     False, "human", ""),
    ("Yahoo proxy", obs(ua="YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"),
     True, "proxied", "yahoo-mail-proxy"),
    ("Yahoo proxy fetching a link is not a person's click",
     obs("click", ua="YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html",
         link=1), True, "proxy", "yahoo-mail-proxy-fetch"),
    ("Safe Links referer", obs("click", referer="https://nam10.safelinks.protection.outlook.com/?url=x",
                               link=1), True, "scanner", "microsoft-safe-links"),
    ("Safe Links lookalike referer is not Safe Links",
     obs("click", referer="https://safelinks.protection.outlook.com.evil.example/", link=1),
     False, "human", ""),
    ("Office pre-check click", obs("click", ua=OUTLOOK_DESKTOP, link=1), True, "scanner",
     "microsoft-office-precheck"),
    ("Office existence discovery", obs("click", ua="Microsoft Office Existence Discovery", link=1),
     True, "scanner", "microsoft-office-precheck"),
    ("Proofpoint referer", obs("click", referer="https://urldefense.com/v3/__https://x__", link=1),
     True, "scanner", "proofpoint-url-defense"),
    ("Mimecast referer", obs("click", referer="https://protect-eu.mimecast.com/s/abc", link=1),
     True, "scanner", "mimecast-url-protect"),
    ("Barracuda UA", obs("click", ua="Barracuda Sentinel (EE)", link=1), True, "scanner",
     "barracuda-link-protection"),
    ("Cisco referer", obs("click", referer="https://secure-web.cisco.com/1abc/https%3A", link=1),
     True, "scanner", "cisco-secure-email"),
    ("Sophos referer", obs("click", referer="https://eu-central-1.protection.sophos.com?d=x", link=1),
     True, "scanner", "sophos-time-of-click"),
    ("Trend Micro UA", obs("click", ua="TMES/1.0", link=1), True, "scanner", "trend-micro"),
    ("headless Chrome", obs("click", ua=CHROME.replace("Chrome/", "HeadlessChrome/"), link=1),
     True, "bot", "headless-browser"),
    ("curl", obs("click", ua="curl/8.5.0", link=1), True, "bot", "http-tool"),
    ("python-requests open", obs(ua="python-requests/2.31"), True, "bot", "http-tool"),
    ("okhttp click is a machine", obs("click", ua="okhttp/4.12.0", link=1), True, "bot",
     "app-http-client"),
    ("okhttp open may be a mail app", obs(ua="okhttp/4.12.0"), False, "human", ""),
    ("Googlebot", obs(ua="Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"),
     True, "bot", "crawler-or-preview"),
    ("Slack preview", obs("click", ua="Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
                          link=1), True, "bot", "crawler-or-preview"),
    ("no user agent", obs(ua=""), True, "no-user-agent", "no User-Agent"),
    ("prefetch header", obs("click", headers={"sec-purpose": "prefetch;prerender"}, link=1),
     True, "prefetch", "prefetch"),
    ("HEAD", obs(method="HEAD"), True, "head", "HEAD"),
    ("honeypot", obs("honeypot", link=9), True, "honeypot", "honeypot"),
    ("the sender's own open (submission client IP)", obs(ip="198.51.100.7"), True, "sender",
     "same IP address"),
    ("the sender over IPv4-mapped IPv6", obs(ip="::ffff:198.51.100.7"), True, "sender",
     "same IP address"),
    ("click 3 s after delivery", obs("click", at=T0 + 3, link=1), True, "timing",
     "clicked 3.0 s after delivery"),
    ("click 30 s after delivery", obs("click", at=T0 + 30, link=1), False, "human", ""),
    ("open 1 s after delivery", obs(at=T0 + 1), True, "timing", "opened 1.0 s after delivery"),
    ("open 5 s after delivery", obs(at=T0 + 5), False, "human", ""),
    ("hit before the delivery event was written", obs("click", at=T0 - 1, link=1), True, "timing",
     "0.0 s after delivery"),
]


@pytest.mark.parametrize(("name", "observation", "machine", "category", "reason"), CASES,
                         ids=[c[0] for c in CASES])
def test_table(name: str, observation: Observation, machine: bool, category: str, reason: str) -> None:
    v = classify(observation, COPY)
    assert (v.machine, v.category) == (machine, category), v.reason
    if machine:
        assert v.reason is not None and reason in v.reason
    else:
        assert v.reason is None


def test_without_copy_information_only_the_request_counts() -> None:
    assert classify(obs("click", at=T0 + 1, link=1), None).machine is False
    assert classify(obs(ip="198.51.100.7"), None).machine is False
    assert classify(obs(ua="Mozilla/5.0"), None).category == "proxy"


def test_networks_from_configuration() -> None:
    settings = Settings(internal_networks=(ipaddress.ip_network("10.0.0.0/8"),),
                        machine_networks=(ipaddress.ip_network("2001:db8::/32"),))
    v = classify(obs(ip="10.1.2.3"), COPY, settings=settings)
    assert (v.machine, v.category) == (True, "sender")
    v = classify(obs(ip="2001:db8::5"), COPY, settings=settings)
    assert (v.machine, v.category) == (True, "network")
    assert classify(obs(ip="192.0.2.1"), COPY, settings=settings).machine is False


def test_burst_of_most_links() -> None:
    prior = [PriorHit("a", "click", 1, LATER), PriorHit("b", "click", 2, LATER + 0.5)]
    # third distinct link of four within 3 s: not yet 80 % (needs 4 of 4)
    assert classify(obs("click", at=LATER + 1, link=3), COPY, prior).machine is False
    prior.append(PriorHit("c", "click", 3, LATER + 1))
    v = classify(obs("click", at=LATER + 1.2, link=4), COPY, prior)
    assert (v.machine, v.category) == (True, "burst") and v.reason == "4 of 4 links clicked within 3 s"
    # the same clicks spread over a minute are a person reading
    spread = [replace(p, at=LATER + 20 * i) for i, p in enumerate(prior)]
    assert classify(obs("click", at=LATER + 70, link=4), COPY, spread).machine is False
    # later hits never count against an earlier one
    assert classify(obs("click", at=LATER - 1, link=4), COPY, prior).machine is False


def test_two_link_message_and_repeated_clicks() -> None:
    two = replace(COPY, links=2)
    prior = [PriorHit("a", "click", 1, LATER)]
    v = classify(obs("click", at=LATER + 0.3, link=2), two, prior)
    assert v.category == "burst" and v.reason == "2 of 2 links clicked within 3 s"
    # the same link clicked five times within the window (a scanner retrying)
    same = [PriorHit(str(i), "click", 1, LATER + i * 0.1) for i in range(4)]
    v = classify(obs("click", at=LATER + 0.5, link=1), COPY, same)
    assert v.category == "burst" and v.reason == "5 clicks within 3 s"
    # a double click is a person
    assert classify(obs("click", at=LATER + 0.2, link=1), COPY, same[:1]).machine is False


def test_honeypot_taints_later_hits_of_the_copy() -> None:
    prior = [PriorHit("h", "honeypot", 9, LATER)]
    v = classify(obs("click", at=LATER + 30, link=1), COPY, prior)
    assert (v.machine, v.category) == (True, "honeypot") and "after the honeypot" in (v.reason or "")
    assert classify(obs("click", at=LATER + 601, link=1), COPY, prior).machine is False
    # the store's history counts too (another node saw the honeypot)
    from_store = replace(COPY, recent_hits=(PriorHit("h2", "honeypot", 9, LATER),))
    assert classify(obs("open", at=LATER + 5), from_store).category == "honeypot"


def test_table_rows_are_well_formed() -> None:
    names = [s.name for s in SIGNATURES]
    assert len(names) == len(set(names))
    compiled = compile_table(SIGNATURES)  # every regex and CIDR compiles
    assert len(compiled) == len(SIGNATURES)
    for s in SIGNATURES:
        assert s.applies_to and s.what and s.source, s.name
        assert s.ua or s.ua_exact or s.referer or s.networks, s.name


@pytest.mark.parametrize("ua", [
    CHROME, IPHONE_MAIL,
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "Mozilla/5.0 (X11; Linux x86_64; rv:115.0) Gecko/20100101 Thunderbird/115.10.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36 Edg/124.0.0.0",
    "Mozilla/5.0 (Linux; Android 10; CUBOT_X30) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0 Mobile Safari/537.36",
])
def test_real_browsers_are_people(ua: str) -> None:
    kinds: tuple[tuple[Kind, int], ...] = (("open", 0), ("click", 1))
    for kind, link in kinds:
        v = classify(obs(kind, ua=ua, link=link), COPY)
        assert v.machine is False, (kind, v.reason)


def test_recent_hits_memory_is_bounded() -> None:
    from gateway.http.tracking import RecentHits

    mem = RecentHits(window=100, max_copies=3, per_copy=5)
    mem.add("c", PriorHit("h", "honeypot", 9, 0.0))
    for i in range(50):
        mem.add("c", PriorHit(str(i), "click", 1, 1.0 + i))
    hits = mem.get("c")
    assert len(hits) == 5 and hits[0].kind == "honeypot" and hits[-1].id == "49"
    mem.add("c", PriorHit("late", "click", 1, 500.0))      # everything older left the window
    assert [h.id for h in mem.get("c")] == ["late"]
    for name in ("d", "e", "f"):
        mem.add(name, PriorHit(name, "open", 0, 500.0))
    assert mem.get("c") == () and len(mem.get("f")) == 1   # least recently hit copy dropped


def test_user_agent_patterns_are_lower_case() -> None:
    # they are searched in the lower-cased User-Agent (see Signature)
    for s in SIGNATURES:
        assert s.ua is None or s.ua == s.ua.lower(), s.name


GMAIL_PROXY = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"


def test_proxied_open_still_goes_through_the_later_rules() -> None:
    # displayed later: a person probably opened it (machine, but category proxied)
    v = classify(obs(ua=GMAIL_PROXY), COPY)
    assert (v.machine, v.category) == (True, "proxied")
    assert v.reason is not None and v.reason.startswith("gmail-image-proxy: ")
    # fetched right at delivery: a prefetch, not a person
    v = classify(obs(ua=GMAIL_PROXY, at=T0 + 1), COPY)
    assert (v.machine, v.category) == (True, "timing")
    # the admin's machine networks win over the proxy row
    settings = Settings(machine_networks=(ipaddress.ip_network("203.0.113.0/24"),))
    assert classify(obs(ua=GMAIL_PROXY), COPY, settings=settings).category == "network"
    # after the copy's honeypot was followed, a scanner rendered it
    prior = [PriorHit("h", "honeypot", 9, LATER - 10)]
    assert classify(obs(ua=GMAIL_PROXY), COPY, prior).category == "honeypot"
    # Apple MPP stays a plain machine open
    assert classify(obs(ua="Mozilla/5.0"), COPY).category == "proxy"
