"""Decide, then transform: one accepted submission -> the copies to spool (policies, stages, DKIM last).

For every recipient the policies decide (:meth:`PolicySet.decide` with the message's
headers); recipients are then grouped:

- a recipient whose opens or clicks are tracked gets a copy of their own, with tokens
  bound to that copy's queue id (README "Tracking endpoint"), when the message has
  somewhere to put a token (an HTML body); otherwise the copy is shared as below;
- the others are grouped by what is done to them (signature, disclaimer, DKIM, route,
  store), and every group shares one copy; recipients no stage changes share the
  untouched message itself, byte for byte.

Each copy then goes through the stages (:func:`gateway.pipeline.stages.transform`:
signature, disclaimer, links, pixel) and, last, DKIM (:class:`gateway.pipeline.dkim.Signer`).
The trace header is not added here: the relay puts it on top of each copy with that
copy's queue id, above the DKIM signature (trace fields are never signed).

Tracking needs the public `listeners.tracking` (its `base_url` makes the links); without
it opens and clicks are not tracked whatever the policies say.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.config import Config
from gateway.ids import new_queue_id
from gateway.mail.headers import split_message
from gateway.pipeline.dkim import Signer
from gateway.pipeline.stages import CopyContext, StageReport, StageSettings, transform
from gateway.policy import Decision, Headers, PolicySet, Settings
from gateway.tracking.tokens import TokenSigner


@dataclass
class CopyPlan:
    """One file to spool: its queue id, recipients and final bytes (without the trace header)."""

    queue_id: str
    recipients: list[str]
    data: bytes
    tracked: bool                    # a per-recipient copy carrying tokens
    links: int                       # links rewritten in it (the honeypot excluded)
    route: str
    store: bool
    dkim: bool                       # the policies want it signed
    signed: bool = False             # it was (a key exists for its From domain)
    report: StageReport = field(default_factory=StageReport)


@dataclass(frozen=True)
class _Group:
    """What is done to a recipient, as the key recipients are grouped by."""

    stages: StageSettings
    dkim: bool
    route: str
    store: bool


class Outbound:
    """Turns a submission into spool copies under one config, policy set, DKIM and token signer."""

    def __init__(self, cfg: Config, policies: PolicySet, dkim: Signer | None,
                 tokens: Callable[[], TokenSigner] | None) -> None:
        self.cfg = cfg
        self.policies = policies
        self.dkim = dkim
        self._tokens = tokens
        tracking = cfg.listeners.tracking
        self.base_url = tracking.base_url if tracking is not None and tokens is not None else None

    @property
    def active(self) -> bool:
        """Whether any copy could differ from the submission (rules, DKIM keys or tracking)."""
        return self.dkim is not None or bool(self.policies.rules) or self.base_url is not None

    def _stage_settings(self, decision: Decision, user: str | None,
                        no_track: bool = False) -> StageSettings:
        s = decision.settings
        tracking = self.base_url is not None and not no_track
        u = self.cfg.user(user) if user else None
        company = self.cfg.company
        return StageSettings(
            track_opens=s.track_opens and tracking, track_clicks=s.track_clicks and tracking,
            skip_links=tuple(s.skip_links),
            signature_html=s.signature.render_html(u, company) if s.signature else None,
            signature_text=s.signature.render_text(u, company) if s.signature else None,
            disclaimer_html=s.disclaimer.render_html(u, company) if s.disclaimer else None,
            disclaimer_text=s.disclaimer.render_text(u, company) if s.disclaimer else None)

    def plan(self, data: bytes, *, sender: str, recipients: list[str], user: str | None,
             account: str | None, first_id: str | None = None,
             no_track: bool = False, policy_header: bytes | None = None) -> list[CopyPlan]:
        """The copies to spool for `data` (Message-ID and Date added, Bcc removed already).

        CPU-bound when something applies (stages about 1 ms, RSA about 0.5 ms per copy):
        call it off the event loop. `first_id` is the queue id of the first copy (the one
        the client is told); the others get new ids. `no_track` (the message's
        `X-Mailgw-No-Track`) turns open and click tracking off as a policy
        ``{track_opens: false, track_clicks: false}`` would. `policy_header` is the header
        block `header` rules match on when it is not `data`'s own (the relay passes the
        one from before the control headers were removed, so rules can match on them).
        """
        # unfolding and RFC 2047-decoding every field is wasted unless a rule matches on headers
        headers = None
        if self.policies.uses_headers:
            headers = Headers.from_bytes(policy_header if policy_header is not None
                                         else split_message(data)[0])
        ids = iter([first_id] if first_id else [])
        signer: TokenSigner | None = None
        done: dict[_Group, tuple[bytes, StageReport]] = {}
        resolved: dict[Settings, StageSettings] = {}  # templates rendered once per message
        shared: dict[tuple[bytes, bool, str, bool], CopyPlan] = {}
        plans: list[CopyPlan] = []
        for r in recipients:
            d = self.policies.decide(sender, r, user, account, headers)
            stages = resolved.get(d.settings)
            if stages is None:
                stages = resolved[d.settings] = self._stage_settings(d, user, no_track)
            key = _Group(stages, d.settings.dkim, d.settings.route, d.settings.store)
            qid = next(ids, None) or new_queue_id()
            if key in done:              # the same settings gave a copy without tokens before
                body, report = done[key]
            else:
                if key.stages.tracking:
                    if signer is None and self._tokens is not None:
                        signer = self._tokens()
                    assert self.base_url is not None
                    ctx = CopyContext(r, qid, key.stages, self.base_url, signer)
                else:
                    ctx = CopyContext(r, qid, key.stages)
                t = transform(data, ctx)
                body, report = t.data, t.report
                if not (report.links or report.pixels):  # no token in it: the same for everyone
                    done[key] = (body, report)
            tokens = bool(report.links or report.pixels)
            if not tokens:
                group = (body, key.dkim, key.route, key.store)
                if group in shared:
                    shared[group].recipients.append(r)
                    continue
            plan = CopyPlan(qid, [r], body, tokens, sum(1 for n in report.links if n > 0),
                            key.route, key.store, key.dkim, report=report)
            if not tokens:
                shared[group] = plan
            plans.append(plan)
        if self.dkim is not None:
            for p in plans:
                if p.dkim:
                    signed = self.dkim.sign(p.data)
                    p.signed, p.data = signed is not p.data, signed
        return plans
