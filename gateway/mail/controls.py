"""Read and remove the CRM's control headers (`X-Mailgw-*`) of a submitted message.

The CRM steers one message with four header fields (README "Control headers"):

- ``X-Mailgw-Template: <name>``: the template the message was made from (engagement
  ``--by template``);
- ``X-Mailgw-Campaign: <name>``: the campaign it belongs to (``--by campaign``);
- ``X-Mailgw-No-Track: yes|true|1|no|false|0`` (case-insensitive): ``yes`` turns open
  and click tracking off for this message, whatever the policies say;
- ``X-Mailgw-Send-At: <date>``: scheduled send. An RFC 5322 date
  (``Tue, 01 Dec 2026 09:00:00 +0100``) or ISO 8601 with an offset
  (``2026-12-01T09:00:00+01:00``, ``...Z``), at most :data:`MAX_SCHEDULE` ahead; a time
  that is now or past means "send at once".

Values are unfolded, must be one line of printable UTF-8 of at most :data:`MAX_VALUE`
characters; template and campaign are trimmed (an empty one counts as absent). A value
that breaks these rules, or a field given twice, raises :class:`ControlHeaderError`
(``554 5.6.0``, naming the field): the relay refuses the message at the end of DATA
rather than accept it and do something else than asked.

:func:`strip_controls` removes exactly these four fields (any case, with their folded
continuation lines) from the message's top-level header block and leaves every other
byte as it was: the relay calls it before any pipeline stage, so the fields never leave
the gateway and are never in a DKIM signature. :func:`lenient_controls` is the reader
for ingest and IMAP copies (the rep's Sent copy may carry them): it never raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

from gateway.errors import PermanentFailure
from gateway.mail.headers import Field, fields, split_entity, unfold

TEMPLATE = "X-Mailgw-Template"
CAMPAIGN = "X-Mailgw-Campaign"
NO_TRACK = "X-Mailgw-No-Track"
SEND_AT = "X-Mailgw-Send-At"
#: The control fields, as documented (the canonical spelling of each name).
NAMES: tuple[str, ...] = (TEMPLATE, CAMPAIGN, NO_TRACK, SEND_AT)
_KEYS: dict[bytes, str] = {n.lower().encode(): n for n in NAMES}

#: The longest value (in characters, after unfolding and trimming) a control field may have.
MAX_VALUE = 200
#: How far ahead `X-Mailgw-Send-At` may be (the queue is no calendar).
MAX_SCHEDULE = timedelta(days=30)

_YES = frozenset({"yes", "true", "1"})
_NO = frozenset({"no", "false", "0"})


class ControlHeaderError(PermanentFailure):
    """A control header the gateway cannot honour: ``554 5.6.0`` naming the field."""

    code = 554
    status = "5.6.0"

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}; message not accepted")
        self.header = name


@dataclass(frozen=True)
class Controls:
    """What a message's control headers ask for (all absent: the defaults)."""

    template: str | None = None
    campaign: str | None = None
    no_track: bool = False
    #: when to deliver (aware, UTC), only when in the future; None: at once
    send_at: datetime | None = None

    @property
    def any(self) -> bool:
        return self != NO_CONTROLS


NO_CONTROLS = Controls()


def _control_fields(header: bytes) -> list[Field]:
    return [f for f in fields(header) if f.key in _KEYS]


def _text(name: str, raw: bytes) -> str:
    """The unfolded, trimmed value: one line of printable UTF-8, at most MAX_VALUE chars."""
    try:
        value = unfold(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise ControlHeaderError(name, "value is not valid UTF-8") from None
    value = value.strip(" \t\r\n")
    if not value.isprintable():
        raise ControlHeaderError(name, "value must be one line of printable characters")
    if len(value) > MAX_VALUE:
        raise ControlHeaderError(name, f"value is longer than {MAX_VALUE} characters")
    return value


def _flag(name: str, value: str) -> bool:
    v = value.lower()
    if v in _YES:
        return True
    if v in _NO:
        return False
    raise ControlHeaderError(name, f"must be yes, true, 1, no, false or 0, not {value!r}")


def parse_send_at(value: str, now: datetime) -> datetime | None:
    """`value` as an aware UTC time, or None when it is now or past (send at once).
    ControlHeaderError when it is no date with a zone, or further than MAX_SCHEDULE ahead."""
    at: datetime | None = None
    if value[:4].isdigit():
        try:
            at = datetime.fromisoformat(value)
        except ValueError:
            at = None
    if at is None:
        try:
            at = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            at = None
    if at is None:
        raise ControlHeaderError(SEND_AT, "not an RFC 5322 or ISO 8601 date")
    if at.tzinfo is None or at.utcoffset() is None:
        raise ControlHeaderError(SEND_AT, "the date needs a time zone offset "
                                          "(e.g. +01:00, Z or +0100)")
    try:
        at = at.astimezone(UTC)
    except OverflowError:
        raise ControlHeaderError(SEND_AT, "date out of range") from None
    if at <= now:
        return None
    if at - now > MAX_SCHEDULE:
        raise ControlHeaderError(SEND_AT, f"more than {MAX_SCHEDULE.days} days ahead")
    return at


def parse_controls(header: bytes, now: datetime | None = None) -> Controls:
    """The control headers of a header block (ControlHeaderError for a bad or repeated one).

    `now` (aware; default the current time) decides whether a Send-At is in the future."""
    found = _control_fields(header)
    if not found:
        return NO_CONTROLS
    values: dict[str, str] = {}
    for f in found:
        assert f.key is not None
        name = _KEYS[f.key]
        if name in values:
            raise ControlHeaderError(name, "given more than once")
        values[name] = _text(name, f.value)
    no_track = _flag(NO_TRACK, values[NO_TRACK]) if NO_TRACK in values else False
    send_at = None
    if SEND_AT in values:
        send_at = parse_send_at(values[SEND_AT], now or datetime.now(UTC))
    return Controls(template=values.get(TEMPLATE) or None,
                    campaign=values.get(CAMPAIGN) or None, no_track=no_track, send_at=send_at)


def lenient_controls(header: bytes) -> Controls:
    """Template and campaign of a copy seen by ingest or IMAP (the first valid value of
    each, else None); never raises. No-Track and Send-At mean nothing there."""
    out: dict[str, str] = {}
    for f in _control_fields(header):
        assert f.key is not None
        name = _KEYS[f.key]
        if name in (TEMPLATE, CAMPAIGN) and name not in out:
            try:
                value = _text(name, f.value)
            except ControlHeaderError:
                continue
            if value:
                out[name] = value
    return Controls(template=out.get(TEMPLATE), campaign=out.get(CAMPAIGN))


def has_controls(data: bytes) -> bool:
    """Whether the top-level header block of `data` holds a control field (cheap test)."""
    header, _, _ = split_entity(data)
    return b"x-mailgw-" in header.lower() and bool(_control_fields(header))


def strip_controls(data: bytes) -> bytes:
    """`data` without its top-level control fields (and their continuation lines); every
    other byte unchanged. `data` itself when it has none."""
    header, blank, body = split_entity(data)
    if b"x-mailgw-" not in header.lower():
        return data
    kept = [f.raw for f in fields(header) if f.key not in _KEYS]
    stripped = b"".join(kept)
    if len(stripped) == len(header):
        return data
    return stripped + blank + body
