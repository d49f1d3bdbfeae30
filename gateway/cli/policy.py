"""`mailgw policy explain`: which rules match a message and the settings that result, with provenance."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gateway.cli.common import EXIT_OK, Subparsers, config, print_json, user_for_sender
from gateway.config import User
from gateway.errors import UsageError
from gateway.mail.addresses import domain_of


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("policy", parents=[common], help="outbound policies")
    ps = p.add_subparsers(dest="policy_cmd", required=True, parser_class=type(common))
    ex = ps.add_parser("explain", parents=[common],
                       help="the rules that match a message and the resulting settings")
    ex.add_argument("--from", dest="sender", required=True, metavar="ADDRESS",
                    help="envelope sender")
    ex.add_argument("--to", dest="recipient", required=True, metavar="ADDRESS",
                    help="one recipient")
    ex.add_argument("--subject", help="the Subject: header")
    ex.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                    help="a header field (repeatable)")
    who = ex.add_mutually_exclusive_group()
    who.add_argument("--user", metavar="LOGIN",
                     help="SMTP AUTH login (default: the user whose login or account email is "
                          "--from)")
    who.add_argument("--no-user", action="store_true",
                     help="no SMTP AUTH user (mail from a trusted network)")
    ex.add_argument("--account", metavar="ID", help="account id (default: the user's account)")
    ex.add_argument("--json", action="store_true", help="print JSON only")
    ex.set_defaults(func=_explain)


def _headers(args: argparse.Namespace) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if args.subject is not None:
        out.append(("Subject", args.subject))
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip() or any(c.isspace() for c in name.strip()):
            raise UsageError(f"--header {h!r}: expected 'Name: value'")
        out.append((name.strip(), value.strip()))
    return out


def _short(path: str | None) -> str:
    if path is None:
        return ""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def _explain(args: argparse.Namespace) -> int:
    from gateway.policy import Template, policies_for
    from gateway.policy.rules import nearest_domain

    cfg = config(args)
    policies = policies_for(cfg)  # ConfigError (exit 2) lists every problem
    user: User | None = None
    if args.user:
        user = cfg.user(args.user)
        if user is None:
            raise UsageError(f"--user {args.user}: no such user in {cfg.source}")
    elif not args.no_user:
        user = user_for_sender(cfg, args.sender)
    account = args.account or (user.account if user else None)
    if args.account and cfg.account(args.account) is None:
        raise UsageError(f"--account {args.account}: no such account in {cfg.source}")
    headers = _headers(args)
    decision = policies.decide(args.sender, args.recipient, user.login if user else None,
                               account, headers)
    s = decision.settings
    domain = domain_of(args.sender)
    notes: list[str] = []
    if s.dkim and nearest_domain(domain, {d.lower().rstrip(".") for d in cfg.dkim}) is None:
        notes.append(f"dkim is on but the config has no dkim: key for {domain}: nothing is signed")
    if policies.uses_headers and not headers:
        notes.append("no --subject/--header given: `header` matches are false")
    if args.json:
        out: dict[str, Any] = {
            "from": args.sender, "to": args.recipient,
            "user": user.login if user else None, "account": account,
            "headers": [[n, v] for n, v in headers],
            "policies_dir": str(policies.directory) if policies.directory else None,
            "files": [str(f) for f in policies.files],
            **decision.to_json(),
            "notes": notes,
        }
        print_json(out)
        return EXIT_OK
    print(f"from:     {args.sender}")
    print(f"to:       {args.recipient}")
    print(f"user:     {user.login if user else '-'}   account: {account or '-'}")
    for n, v in headers:
        print(f"header:   {n}: {v}")
    where = (f"{_short(str(policies.directory))} ({len(policies.files)} files, "
             f"{len(policies)} rules)") if policies.directory else "none (no policies directory)"
    print(f"policies: {where}")
    print()
    if decision.matched:
        print("matched rules, in order (later ones override earlier ones):")
        width = max(len(m.rule or "") for m in decision.matched)
        for i, m in enumerate(decision.matched, 1):
            print(f"  {i}. {m.rule:<{width}}  {_short(m.file)}:{m.line}")
    else:
        print("matched rules: none")
    print()
    print("settings:")
    rows = []
    for key, value in s.to_json().items():
        raw = getattr(s, key)
        if isinstance(raw, Template):
            shown = raw.describe()
        elif isinstance(value, list):
            shown = ", ".join(value) if value else "-"
        elif value is None:
            shown = "-"
        elif isinstance(value, bool):
            shown = "true" if value else "false"
        else:
            shown = str(value)
        srcs = " + ".join(
            f"default ({x.default})" if x.rule is None
            else f"rule {x.rule!r} ({_short(x.file)}:{x.line})" for x in decision.sources[key])
        rows.append((key, shown, srcs))
    kw = max(len(r[0]) for r in rows)
    vw = min(max(len(r[1]) for r in rows), 32)
    for key, shown, srcs in rows:
        if len(shown) > vw:  # a long value: its source on the next line
            print(f"  {key:<{kw}}  {shown}\n  {'':<{kw}}  {'':<{vw}}  {srcs}")
        else:
            print(f"  {key:<{kw}}  {shown:<{vw}}  {srcs}")
    for n in notes:
        print(f"note: {n}")
    return EXIT_OK
