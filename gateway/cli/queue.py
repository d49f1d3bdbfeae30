"""`mailgw queue list|show|retry|delete|hold|release`: inspect and steer the spool directly.

Safe while the daemon runs: every change is an atomic rename between state directories,
which the daemon's scan of `incoming/` picks up within about a second.

Entries in done/ are delivered and wait only for the store writer to write their CRM
record and outcome events (the daemon removes them then): `list` counts them apart,
`show` shows them, and `retry`, `hold` and `delete` leave them alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from gateway.cli.common import EXIT_OK, Subparsers, config, print_json, ts
from gateway.errors import NotFound, UsageError


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    q = sub.add_parser("queue", parents=[common], help="inspect and steer the delivery queue")
    q.set_defaults(func=_queue)
    qs = q.add_subparsers(dest="queue_cmd", required=True, parser_class=type(common))
    ql = qs.add_parser("list", parents=[common], help="every queued message")
    ql.add_argument("--json", action="store_true")
    qsh = qs.add_parser("show", parents=[common], help="one queued message: envelope, headers")
    qsh.add_argument("id")
    qsh.add_argument("--json", action="store_true")
    qr = qs.add_parser("retry", parents=[common],
                       help="deliver a deferred message now (all of them without ID)")
    qr.add_argument("id", nargs="?")
    for name, what in (("delete", "remove a message from the queue for good"),
                       ("hold", "set a message aside (not delivered until released)"),
                       ("release", "put a held message back into delivery")):
        x = qs.add_parser(name, parents=[common], help=what)
        x.add_argument("id")


def _queue_entry(state: str, env: Any) -> dict[str, Any]:
    return {
        "id": env.id, "state": state, "size": env.size, "arrival": ts(env.received_at),
        "sender": env.mail_from, "user": env.user, "message_id": env.message_id,
        "attempts": env.attempts,
        "next_attempt": ts(env.next_attempt) if state == "deferred" else None,
        "scheduled_for": ts(env.scheduled_for) if env.scheduled_for is not None else None,
        "bounce": env.is_bounce,
        "crashes": env.crashes, "last_error": env.last_error, "hold_reason": env.hold_reason,
        "recipients": [{"address": r.addr, "status": r.status, "attempts": r.attempts,
                        "last_reply": r.last_reply, "remote": r.remote}
                       for r in env.recipients],
    }


def _scheduled(spool: Any, state: str, qid: str) -> float | None:
    """The time a scheduled send not yet attempted waits for, else None."""
    from gateway.spool import CorruptQueueFile

    try:
        env = spool.read_envelope(state, qid)
    except (CorruptQueueFile, NotFound):
        return None
    if env.scheduled_for is None or env.attempts or env.scheduled_for <= time.time():
        return None
    return float(env.scheduled_for)


def _spools(cfg: Any) -> list[Any]:
    """Every worker's spool of this node: `state_dir/spool` (worker 1, or the single
    process), then `state_dir/spool-N` of the other workers (`workers`)."""
    from gateway.spool import Spool

    others = sorted((p for p in cfg.state_path.glob("spool-*")
                     if p.name[len("spool-"):].isdigit() and p.is_dir()),
                    key=lambda p: int(p.name[len("spool-"):]))
    roots = [cfg.spool_path, *others]
    # with several workers, one may serve (and spool) before worker 1 has made spool/
    if not any(root.exists() for root in roots):
        raise NotFound(f"no spool at {cfg.spool_path} (has the daemon run with this config?)")
    spools = [Spool(root) for root in roots if root.exists()]
    for s in spools:
        s.setup()
    return spools


def _holder(spools: list[Any], qid: str) -> Any:
    """The spool (of whichever worker) holding `qid`; NotFound if none does."""
    for s in spools:
        try:
            s.find(qid)
        except NotFound:
            continue
        return s
    raise NotFound(f"no queue file with id {qid}")


def _queue(args: argparse.Namespace) -> int:
    cfg = config(args)
    from gateway.spool import QUEUED_STATES, CorruptQueueFile

    spools = _spools(cfg)
    qc = args.queue_cmd
    qid_arg = getattr(args, "id", None)
    spool = _holder(spools, qid_arg) if qid_arg else spools[0]
    if qc == "list":
        rows: list[dict[str, Any]] = []
        recording = sum(len(s.list_ids("done")) for s in spools)
        listed = (*QUEUED_STATES, "corrupt")
        for sp, state, qid in ((s, st, q) for s in spools for st, q in s.iter_all(listed)):
            if state == "corrupt":
                rows.append({"id": qid, "state": "corrupt"})
                continue
            try:
                rows.append(_queue_entry(state, sp.read_envelope(state, qid)))
            except (CorruptQueueFile, NotFound):
                continue
        if args.json:
            print_json(rows)
            return EXIT_OK
        note = (f"-- {recording} delivered message(s) waiting for their CRM record (done/)"
                if recording else None)
        if not rows:
            print("Mail queue is empty")
            if note:
                print(note)
            return EXIT_OK
        for r in rows:
            if r["state"] == "corrupt":
                print(f"{r['id']}  corrupt")
                continue
            print(f"{r['id']}  {r['state']:<8} {r['size']:>8}  {r['arrival'][:19]}  "
                  f"<{r['sender']}>")
            if r["scheduled_for"] is not None:
                print(f"        scheduled for {r['scheduled_for'][:19]}")
            if r["hold_reason"]:
                print(f"        held: {r['hold_reason']}")
            elif r["crashes"]:
                print(f"        crashed {r['crashes']} time(s): {r['last_error']}")
            for rc in r["recipients"]:
                if rc["status"] == "pending":
                    reason = f"  ({rc['last_reply']})" if rc["last_reply"] else ""
                    print(f"        {rc['address']}{reason}")
        print(f"-- {len(rows)} message(s)")
        if note:
            print(note)
        return EXIT_OK
    if qc == "show":
        state = spool.find(args.id)
        if state == "corrupt":
            raw = (spool.dir("corrupt") / args.id).read_bytes()
            print(raw[:4096].decode("utf-8", "replace"))
            return EXIT_OK
        env, data = spool.read(state, args.id)
        from gateway.mail.headers import split_message

        header, _ = split_message(data)
        entry = _queue_entry(state, env)
        if env.envelope_only:   # a done/ entry whose record is written keeps no bytes
            entry["message"] = "not kept (delivered, its CRM record is written)"
        if args.json:
            entry["headers"] = header.decode("utf-8", "replace")
            print_json(entry)
        else:
            for k, v in entry.items():
                if k != "recipients":
                    print(f"{k}: {v}")
            for rc in entry["recipients"]:
                print(f"recipient: {rc['address']} {rc['status']} attempts={rc['attempts']}"
                      f" last_reply={rc['last_reply']!r}")
            print()
            sys.stdout.write(header.decode("utf-8", "replace"))
        return EXIT_OK
    if qc == "retry":
        # a scheduled send is not retried: it waits for its time (`queue delete` cancels it)
        todo = [(spool, args.id)] if args.id else [
            (sp, q) for sp in spools for q in sp.list_ids("deferred")
            if not _scheduled(sp, "deferred", q)]
        ids = [q for _, q in todo]
        for spool, qid in todo:
            state = spool.find(qid)
            if state == "done":
                raise UsageError(f"{qid} is delivered (done/: its CRM record is being written)")
            if state not in ("deferred", "incoming"):
                raise UsageError(f"{qid} is in {state}/, not deferred (use `queue release`)")
            when = _scheduled(spool, state, qid)
            if when is not None:
                raise UsageError(f"{qid} is a scheduled send for {ts(when)}; it is sent then "
                                 "(`queue delete` cancels it)")
            if state == "deferred":
                spool.move(qid, "deferred", "incoming")
        print(f"{len(ids)} message(s) scheduled for delivery now")
        return EXIT_OK
    if qc == "delete":
        if spool.find(args.id) == "done":
            raise UsageError(f"{args.id} is delivered (done/): it leaves the spool by itself "
                             "once its CRM record and events are written")
        state = spool.delete(args.id)
        print(f"{args.id} deleted from {state}/")
        return EXIT_OK
    if qc == "hold":
        state = spool.find(args.id)
        if state not in ("incoming", "deferred"):
            raise UsageError(f"{args.id} is in {state}/ and cannot be held")
        spool.move(args.id, state, "hold")
        print(f"{args.id} held")
        return EXIT_OK
    if qc == "release":
        state = spool.find(args.id)
        if state != "hold":
            raise UsageError(f"{args.id} is in {state}/, not on hold")
        spool.release(args.id)   # clears the crash count of a poison message
        print(f"{args.id} released")
        return EXIT_OK
    raise UsageError(f"unknown queue command {qc}")
