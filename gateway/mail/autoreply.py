"""What kind of mail an inbound message is: a person's, an auto-reply, automatic or bulk mail, a report.

Pure functions of a message's header fields, subject and text; no I/O. The store
counts a ``replied`` event only for ``message``, records ``auto_replied`` for
``auto_reply`` and nothing for the rest. The kinds, checked in this order:

- ``delivery_report`` / ``read_receipt`` / ``feedback_report``: ``Content-Type:
  multipart/report`` with ``report-type`` ``delivery-status`` (RFC 3464),
  ``disposition-notification`` (RFC 8098) or ``feedback-report`` (RFC 5965); and
  ``delivery_report`` for mail from ``mailer-daemon@`` or ``postmaster@`` (the
  non-standard notices some providers send); any other report type is ``automatic``.
- ``auto_reply``: ``Auto-Submitted: auto-replied`` (comments and parameters aside,
  ``auto-replied (vacation)``), ``X-Autoreply``, ``X-Autorespond``,
  ``Precedence: auto_reply``; or an out-of-office subject (see :data:`OOO_SUBJECT`) on
  mail that is otherwise automatic, bulk, from a null return path, or has no marker at
  all (many responders set none).
- ``automatic``: ``Auto-Submitted`` with any value but ``no`` (RFC 3834), or a null
  return path (``Return-Path: <>``).
- ``bulk``: ``Precedence: bulk|junk|list``, ``List-Id`` or ``List-Unsubscribe``.
- ``message``: everything else. ``X-Auto-Response-Suppress`` (which Outlook sets on
  ordinary mail too) is not a marker.

:func:`return_date` is best effort: it reads the first date after a "back"/"until"
phrase in English, German, French, Spanish, Dutch, Italian, Portuguese and Swedish
(see :data:`_TRIGGER`), in one of the forms ``2026-12-14``, ``14.12.2026``,
``14/12/2026`` (day first; month first where the day-first reading is impossible,
or lies before the message's date and the month-first one does not), ``14 December
2026``, ``December 14, 2026``, ``14. Dezember``, ``14 de diciembre de 2026``. A date
without a year is taken in the year of the message's date, or the next year when that
would be more than 30 days before it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from gateway.mail.parse import ExtraHeaders

KINDS: tuple[str, ...] = ("message", "auto_reply", "automatic", "bulk", "delivery_report",
                          "read_receipt", "feedback_report")
REPORT_KINDS: dict[str, str] = {"delivery-status": "delivery_report",
                                "disposition-notification": "read_receipt",
                                "feedback-report": "feedback_report"}
#: out-of-office subjects, at the start of the subject (after any "[tag]")
OOO_SUBJECT = re.compile(
    r"^\s*(?:\[[^\]]*\]\s*)?(?:"
    r"automatic\s+reply|auto(?:matic)?[- ]?(?:reply|response|respond(?:er)?)|autoreply|"
    r"out\s+of\s+(?:the\s+)?office|ooo\b|away\s+from\s+(?:the\s+)?office|vacation\s+(?:reply|notice)|"
    r"abwesenheit|automatische\s+antwort|nicht\s+im\s+büro|"
    r"réponse\s+automatique|reponse\s+automatique|absence|absent\b|"
    r"respuesta\s+automática|respuesta\s+automatica|fuera\s+de\s+la\s+oficina|"
    r"automatisch\s+antwoord|afwezig|"
    r"risposta\s+automatica|fuori\s+ufficio|"
    r"resposta\s+automática|resposta\s+automatica|ausente|fora\s+do\s+escritório|"
    r"automatiskt\s+svar|frånvaro|"
    r"automatisk\s+svar|automaattinen\s+vastaus|automatyczna\s+odpowiedź"
    r")", re.IGNORECASE)
_SYSTEM_SENDERS = ("mailer-daemon", "postmaster")
_BULK_PRECEDENCE = ("bulk", "junk", "list")
_COMMENT = re.compile(r"\([^()]*\)")


@dataclass(frozen=True)
class Kind:
    """What :func:`classify` found: the kind, and for an auto-reply the return date."""

    kind: str
    return_date: str | None = None     # ISO date, auto-replies only


def _param(value: str, name: str) -> str | None:
    m = re.search(rf";\s*{name}\s*=\s*\"?([^\";\s]+)", value, re.IGNORECASE)
    return m.group(1).lower() if m else None


def _report_kind(content_type: str | None) -> str | None:
    if not content_type:
        return None
    if content_type.split(";", 1)[0].strip().lower() != "multipart/report":
        return None
    return REPORT_KINDS.get(_param(content_type, "report-type") or "", "automatic")


def is_ooo_subject(subject: str) -> bool:
    """Does `subject` read like an out-of-office or automatic reply?"""
    return bool(OOO_SUBJECT.match(subject or ""))


def kind_of(headers: ExtraHeaders, *, subject: str, from_addr: str) -> str:
    """The kind of a message from its header fields alone (see the module docstring)."""
    report = _report_kind(headers.content_type)
    if report is not None:
        return report
    local = (from_addr or "").rsplit("@", 1)[0].strip().lower()
    if local in _SYSTEM_SENDERS:
        return "delivery_report"
    # the keyword without RFC 5322 comments or parameters: Sieve vacation (Pigeonhole,
    # Cyrus) writes "auto-replied (vacation)"
    auto = _COMMENT.sub(" ", headers.auto_submitted or "").split(";", 1)[0].strip().lower()
    precedence = (headers.precedence or "").strip().lower()
    if auto == "auto-replied" or headers.x_autoreply is not None \
            or headers.x_autorespond is not None or precedence in ("auto_reply", "auto-reply"):
        return "auto_reply"
    ooo = is_ooo_subject(subject)
    if auto and auto != "no":
        return "auto_reply" if ooo else "automatic"
    if precedence in _BULK_PRECEDENCE:
        return "auto_reply" if ooo else "bulk"
    if headers.list_id is not None or headers.list_unsubscribe is not None:
        return "bulk"
    if (headers.return_path or "").strip() == "<>":
        return "auto_reply" if ooo else "automatic"
    return "auto_reply" if ooo else "message"


def classify(headers: ExtraHeaders, *, subject: str, from_addr: str, text: str = "",
             sent: datetime | None = None) -> Kind:
    """The kind of a message and, for an auto-reply, the return date its text gives."""
    kind = kind_of(headers, subject=subject, from_addr=from_addr)
    if kind != "auto_reply":
        return Kind(kind)
    ref = sent.date() if sent is not None else None
    return Kind(kind, return_date(f"{subject}\n{text[:TEXT_SCAN]}", ref))


# -- the return date --------------------------------------------------------------------
TEXT_SCAN = 4000
_MONTHS: dict[str, int] = {}
for _n, _names in enumerate((
        "january jan januar janvier enero januari gennaio janeiro jänner janv ene",
        "february feb februar février fevrier febrero februari febbraio fevereiro févr fevr",
        "march mar märz maerz mars marzo maart março marco mrt",
        "april apr avril abril aprile avr abr",
        "may mai mayo mei maggio maio maj",
        "june jun juni juin junio giugno junho",
        "july jul juli juillet julio luglio julho juil",
        "august aug août aout agosto augustus ago",
        "september sep sept septembre septiembre settembre setembro set",
        "october oct oktober octobre octubre ottobre outubro okt ott out",
        "november nov novembre noviembre novembro",
        "december dec dezember décembre decembre diciembre dicembre dezembro dez déc dic"),
        start=1):
    for _name in _names.split():
        _MONTHS.setdefault(_name, _n)
_MONTH = r"(?P<mname>[^\W\d_]{3,10})\.?"
#: the phrases after which the first date is the return date (or the last day away)
_TRIGGER = re.compile(
    r"\b(?:back|return(?:ing)?|returns|return\s+on|until|till|through|in\s+the\s+office|"
    r"zurück|wieder|bis|ab\s+dem|ab|"
    r"retour|jusqu(?:'|\u2019)?au|à\s+partir\s+du|"
    r"regres\w*|vuelta|hasta|de\s+nuevo|"
    r"terug|tot\s+en\s+met|vanaf|"
    r"rientr\w*|fino\s+al|"
    r"retorn\w*|volto|até|"
    r"tillbaka|åter)\b", re.IGNORECASE)
_DATES = (
    re.compile(r"\b(?P<y>20\d\d)-(?P<m>\d\d?)-(?P<d>\d\d?)\b"),
    # 14.12.2026, 14/12/26, 14.12. (a year, or a final dot: not a time like 9.30)
    re.compile(r"\b(?P<d>\d\d?)[./](?P<m>\d\d?)(?:[./](?P<y>(?:20)?\d\d)\b|\.(?!\d))"),
    re.compile(r"\b(?P<d>\d\d?)(?:\.|st|nd|rd|th|er|º)?\s+(?:de\s+|of\s+)?" + _MONTH
               + r"(?:\s+(?:de\s+)?(?P<y>20\d\d))?", re.IGNORECASE),
    re.compile(_MONTH + r"\s+(?P<d>\d\d?)(?:st|nd|rd|th)?(?:,?\s+(?P<y>20\d\d))?\b",
               re.IGNORECASE),
)
_WINDOW = 80


def _make(y: int | None, m: int, d: int, ref: date | None) -> date | None:
    if y is not None and y < 100:
        y += 2000
    if y is None:
        if ref is None:
            return None
        y = ref.year
        try:
            if date(y, m, d) < ref - timedelta(days=30):
                y += 1
        except ValueError:
            return None
    try:
        return date(y, m, d)
    except ValueError:
        return None


def _date_at(text: str, ref: date | None) -> tuple[int, date] | None:
    """The first date in `text` (its position and value), or None."""
    best: tuple[int, date] | None = None
    for i, pattern in enumerate(_DATES):
        for m in pattern.finditer(text):
            if best is not None and m.start() >= best[0]:
                break
            g = m.groupdict()
            y = int(g["y"]) if g.get("y") else None
            if "mname" in g and g["mname"] is not None:
                month = _MONTHS.get(g["mname"].lower())
                if month is None:
                    continue
                found = _make(y, month, int(g["d"]), ref)
            else:
                day, mon = int(g["d"]), int(g["m"])
                found = _make(y, mon, day, ref)
                if i == 1 and (found is None or (ref is not None and found < ref)):
                    # month first: 12/14/2026, or a US sender's 12/07/2026 whose
                    # day-first reading (12 July) lies before the message was sent
                    swapped = _make(y, day, mon, ref)
                    if found is None or (swapped is not None and ref is not None
                                         and swapped >= ref):
                        found = swapped
            if found is not None:
                best = (m.start(), found)
                break
    return best


def return_date(text: str, ref: date | None = None) -> str | None:
    """The ISO date an out-of-office text says its writer is back (or away until), or None.

    `ref` is the date of the message, for dates written without a year.
    """
    for trigger in _TRIGGER.finditer(text or ""):
        window = text[trigger.end():trigger.end() + _WINDOW]
        found = _date_at(window, ref)
        if found is not None:
            return found[1].isoformat()
    return None
