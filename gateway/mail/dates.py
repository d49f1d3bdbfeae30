"""Parse the dates mail carries: RFC 5322 `Date:` headers and the human dates in forward blocks.

`parse_rfc_date` reads a header (lenient, like `email.utils`); `parse_human_date` reads
what Gmail ("Mon, Nov 16, 2026 at 10:00 AM"), Outlook ("Monday, November 16, 2026
10:00 AM", "16 November 2026 10:00", "Montag, 16. November 2026 10:00") and Apple Mail
("November 16, 2026 at 10:00:00 AM GMT+1", "25 October 2021 at 11:17:21 EEST") print
above a forwarded message, in English, German, French, Spanish, Italian, Dutch and
Portuguese. Both return an aware datetime in UTC or None, and never raise.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from email.utils import parsedate_tz

_MONTHS: dict[str, int] = {}
for _num, _names in enumerate(
    [
        "january jan januar janv janvier enero ene gennaio genn gen januari jan. janeiro",
        "february feb februar febr fevr février fév fev febrero febbraio februari fevereiro",
        "march mar märz maerz mär mrz mars marzo maart março marco",
        "april apr avril avr abril abr aprile",
        "may mai mayo maggio mei maio mag",
        "june jun juni juin junio giugno giu junho",
        "july jul juli juillet juil julio luglio lug julho",
        "august aug august août aout agosto ago augustus",
        "september sep sept septembre septiembre settembre set setembro",
        "october oct oktober okt octobre octubre ottobre ott outubro out",
        "november nov novembre noviembre novembro",
        "december dec dezember dez décembre decembre déc diciembre dic dicembre dezembro",
    ],
    start=1,
):
    for _name in _names.split():
        _MONTHS.setdefault(_name.rstrip("."), _num)

# Zone abbreviations as printed by Apple Mail and Outlook; ambiguous ones (IST, CST in
# China) follow the common mail usage.
_ZONES: dict[str, int] = {
    "utc": 0, "gmt": 0, "z": 0, "ut": 0, "wet": 0, "bst": 60, "west": 60, "ist": 60,
    "cet": 60, "mez": 60, "cest": 120, "mesz": 120, "eet": 120, "eest": 180, "msk": 180,
    "est": -300, "edt": -240, "cst": -360, "cdt": -300, "mst": -420, "mdt": -360,
    "pst": -480, "pdt": -420, "akst": -540, "akdt": -480, "hst": -600, "jst": 540,
    "kst": 540, "aest": 600, "aedt": 660, "acst": 570, "awst": 480, "nzst": 720, "nzdt": 780,
    "sgt": 480, "hkt": 480,
}

_TIME_RE = re.compile(
    r"(?<![\d:])(\d{1,2})[:h](\d{2})(?::(\d{2}))?(?:\s*(a\.?\s?m\.?|p\.?\s?m\.?)(?![a-z]))?", re.I
)
_GMT_OFFSET_RE = re.compile(r"\b(?:gmt|utc)\s*([+-])\s*(\d{1,2})(?::?(\d{2}))?(?!\d)", re.I)
_WORD_RE = re.compile(r"[^\W\d_]+\.?", re.U)
_ISO_RE = re.compile(r"(?<!\d)(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})(?!\d)")
_NUMERIC_RE = re.compile(r"(?<!\d)(\d{1,2})([./-])(\d{1,2})\2(\d{2,4})(?!\d)")
_NUM_RE = re.compile(r"(?<![\d:+-])(\d{1,4})(?:st|nd|rd|th|er|e|\.)?(?![\d:])", re.I)


def _aware(dt: datetime, offset_minutes: int | None) -> datetime:
    tz = UTC if offset_minutes is None else timezone(timedelta(minutes=offset_minutes))
    return dt.replace(tzinfo=tz).astimezone(UTC)


def parse_rfc_date(value: str | None) -> tuple[datetime | None, int | None]:
    """(UTC datetime, the header's own offset in minutes or None) for an RFC 5322 date."""
    if not value:
        return None, None
    try:
        tup = parsedate_tz(value)
    except (ValueError, TypeError, IndexError, OverflowError):
        tup = None
    if tup is None:
        return parse_human_date(value), None
    try:
        year = tup[0]
        dt = datetime(year, tup[1], tup[2], tup[3], tup[4], min(tup[5], 59))
    except (ValueError, OverflowError, TypeError):
        return None, None
    offset = tup[9]
    minutes = None if offset is None else offset // 60
    if minutes is not None and not -24 * 60 < minutes < 24 * 60:
        minutes = None
    try:
        return _aware(dt, minutes), minutes
    except (ValueError, OverflowError):
        return None, None


def zone_offset(text: str) -> int | None:
    """The UTC offset in minutes a date string names ("GMT+1", "+0100", "EEST"), or None."""
    m = _GMT_OFFSET_RE.search(text)
    if m is None:
        m = re.search(r"(?<![\d:])([+-])(\d{2}):?(\d{2})(?!\d)", text)
    if m is not None:
        sign = -1 if m.group(1) == "-" else 1
        hours = int(m.group(2))
        minutes = int(m.group(3) or 0)
        if hours <= 14 and minutes < 60:
            return sign * (hours * 60 + minutes)
    for word in re.findall(r"[A-Za-z]{1,5}", text):
        zone = _ZONES.get(word.lower())
        if zone is not None and (word.isupper() or word.lower() in ("utc", "gmt")):
            return zone
    return None


def parse_human_date(text: str, default_offset: int | None = None) -> datetime | None:
    """A date as mail clients print it in forward headers -> UTC datetime, or None.

    Needs a day, a month and a year; the time defaults to midnight. Without a zone in
    the text, `default_offset` (minutes east of UTC, e.g. the forwarder's own Date
    header offset) applies, else UTC. Purely numeric dates are read as d.m.y with
    dots or dashes and m/d/y with slashes (Outlook in a US locale).
    """
    if not text or len(text) > 200:
        return None
    try:
        return _parse_human(text, default_offset)
    except (ValueError, OverflowError, IndexError):
        return None


def _parse_human(text: str, default_offset: int | None) -> datetime | None:
    s = text.strip()
    offset = zone_offset(s)
    # Drop the zone text so its digits are not read as a day or year.
    s = _GMT_OFFSET_RE.sub(" ", s)
    s = re.sub(r"(?<![\d:])[+-]\d{2}:?\d{2}(?!\d)", " ", s)
    s = re.sub(r"\(.*?\)", " ", s)

    hour = minute = second = 0
    tm = _TIME_RE.search(s)
    if tm is not None:
        hour, minute = int(tm.group(1)), int(tm.group(2))
        second = int(tm.group(3) or 0)
        ampm = (tm.group(4) or "").lower().replace(".", "").replace(" ", "")
        if ampm == "pm" and hour < 12:
            hour += 12
        elif ampm == "am" and hour == 12:
            hour = 0
        s = s[: tm.start()] + " " + s[tm.end() :]
    s_low = s.lower()

    year = month = day = None
    iso = _ISO_RE.search(s_low)
    numeric = _NUMERIC_RE.search(s_low) if iso is None else None
    if iso is not None:
        year, month, day = int(iso.group(1)), int(iso.group(2)), int(iso.group(3))
    elif numeric is not None:
        a, sep, b, y = int(numeric.group(1)), numeric.group(2), int(numeric.group(3)), int(numeric.group(4))
        if sep == "/" and a <= 12:
            month, day = a, b
        else:
            day, month = a, b
        year = y + 2000 if y < 100 else y
    else:
        # The last month word wins: "mar., 16 nov. 2026" starts with Tuesday in French.
        for word in _WORD_RE.findall(s_low):
            num = _MONTHS.get(word.rstrip("."))
            if num is not None:
                month = num
        if month is None:
            return None
        numbers = [int(n) for n in _NUM_RE.findall(s_low)]
        years = [n for n in numbers if n >= 1000]
        days = [n for n in numbers if 1 <= n <= 31]
        if not years or not days:
            return None
        year, day = years[0], days[0]
    if year is None or month is None or day is None:
        return None
    dt = datetime(year, month, day, hour, minute, min(second, 59))
    return _aware(dt, offset if offset is not None else default_offset)
