"""`mailgw preview FILE.eml --from A --to B`: what the gateway would send to that recipient, unsent.

The message goes through what the relay does after DATA: Message-ID and Date added if
missing, Bcc removed, the policies decided for this sender and recipient, the stages
(signature, disclaimer, links, pixel) and DKIM, and the trace header on top. The
result goes to standard output byte for byte (CRLF line ends); a summary of what was
done goes to standard error. Nothing is spooled, stored or sent. Tracking tokens are
made with the daemon's key when it exists (`tracking.secret_file`, else
`state_dir/tracking.key`), so the links in a preview work; without one they are made
with a throwaway key and say so.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from pathlib import Path

from gateway.cli.common import EXIT_OK, Subparsers, config, user_for_sender
from gateway.config import generated_secret_path, read_secret
from gateway.errors import MailError, UsageError
from gateway.ids import new_queue_id


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("preview", parents=[common],
                       help="print what would be sent for a message to one recipient")
    p.add_argument("file", type=Path, help="the message (.eml), or - for standard input")
    p.add_argument("--from", dest="sender", required=True, metavar="ADDRESS",
                   help="envelope sender")
    p.add_argument("--to", dest="recipient", required=True, metavar="ADDRESS", help="one recipient")
    p.add_argument("--user", metavar="LOGIN",
                   help="SMTP AUTH login (default: the user whose login or account email is --from)")
    p.set_defaults(func=_preview)


def _preview(args: argparse.Namespace) -> int:
    # the pipeline and the relay (which loads the store) are imported here, not at the top:
    # every other command starts without them
    from gateway.pipeline.dkim import Signer
    from gateway.pipeline.outbound import Outbound
    from gateway.policy import policies_for
    from gateway.relay import Submission, prepare, received_header, take_controls
    from gateway.tracking.tokens import TokenSigner

    cfg = config(args)
    policies = policies_for(cfg)
    try:
        raw = sys.stdin.buffer.read() if str(args.file) == "-" else args.file.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    user = cfg.user(args.user) if args.user else user_for_sender(cfg, args.sender)
    if args.user and user is None:
        raise UsageError(f"--user {args.user}: no such user in the config")
    note = ""
    secret = cfg.tracking.secret_file
    # a plain path is where `run` keeps (or generates) the key; env: and credential: are read
    generated = generated_secret_path(secret, cfg.base_dir) if secret else None
    key_path = generated or cfg.state_path / "tracking.key"
    if secret and generated is None:
        tokens = TokenSigner.from_text(read_secret(secret, cfg.base_dir))
    elif key_path.exists():
        tokens = TokenSigner.from_text(key_path.read_text(encoding="utf-8"))
    else:
        tokens = TokenSigner([secrets.token_bytes(32)])
        note = " (throwaway tracking key: these links will not work)"
    outbound = Outbound(cfg, policies, Signer.from_config(cfg) if cfg.dkim else None,
                        lambda: tokens)
    now = time.time()
    qid = new_queue_id(now)
    sub = Submission(mail_from=args.sender, rcpts=[args.recipient], data=raw,
                     client_ip="127.0.0.1", client_helo="preview",
                     user=user.login if user else None, account=user.account if user else None)
    try:
        data, _ = prepare(sub, cfg.hostname, qid, now, trace=False)
        controls, data, with_controls = take_controls(data, now)
        plans = outbound.plan(data, sender=args.sender, recipients=[args.recipient],
                              user=sub.user, account=sub.account, first_id=qid,
                              no_track=controls.no_track, policy_header=with_controls)
    except MailError as exc:
        print(f"mailgw: the gateway would refuse this message: {exc.smtp_reply()}",
              file=sys.stderr)
        return 1
    p = plans[0]
    if not (p.links or p.report.pixels):
        note = ""
    sys.stdout.buffer.write(received_header(sub, cfg.hostname, p.queue_id, now) + p.data)
    sys.stdout.buffer.flush()
    r = p.report
    print(f"-- copy {p.queue_id} for {args.recipient}: "
          f"{'own copy' if p.tracked else 'shared copy'}, stages: {', '.join(r.stages) or 'none'}, "
          f"links tracked: {p.links}{note}, pixels: {r.pixels}, "
          f"DKIM: {'signed' if p.signed else 'not signed'}, route: {p.route}, "
          f"stored: {'yes' if p.store else 'no'}", file=sys.stderr)
    for n in r.notes + [f"not decoded: {s}" for s in r.skipped]:
        print(f"-- {n}", file=sys.stderr)
    return EXIT_OK
