"""`mailgw dkim keygen|check`: make a DKIM key and its DNS record; check the published record."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gateway.cli.common import EXIT_FAIL, EXIT_OK, Subparsers, config, print_json
from gateway.errors import UsageError

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    d = sub.add_parser("dkim", parents=[common], help="DKIM keys and DNS records")
    ds = d.add_subparsers(dest="dkim_cmd", required=True, parser_class=type(common))
    k = ds.add_parser("keygen", parents=[common],
                      help="write a new private key and print the DNS TXT record to publish")
    k.add_argument("--domain", required=True, help="signing domain (d=), e.g. example.com")
    k.add_argument("--selector", required=True, help="selector (s=), e.g. s2026")
    k.add_argument("--algorithm", choices=ALGORITHMS, default="rsa-sha256")
    k.add_argument("--bits", type=int, default=2048, help="RSA key length (default 2048)")
    k.add_argument("--out", metavar="PATH",
                   help="where to write the key (default state_dir/dkim/DOMAIN.SELECTOR.pem)")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=_keygen)
    c = ds.add_parser("check", parents=[common],
                      help="look up the published record and compare it with the configured key")
    c.add_argument("--domain", required=True)
    c.add_argument("--selector", help="only this selector (default: every key of the domain)")
    c.add_argument("--timeout", type=float, default=5.0, help="DNS timeout in seconds")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_check)


def _domain(value: str) -> str:
    from gateway.config import DOMAIN_RE

    d = value.strip().lower().rstrip(".")
    if not DOMAIN_RE.match(d):
        raise UsageError(f"--domain {value!r} is not a domain name")
    return d


def _keygen(args: argparse.Namespace) -> int:
    from gateway.keys import dkim as dkimkeys

    domain = _domain(args.domain)
    if not args.selector or "/" in args.selector or args.selector.startswith("."):
        raise UsageError(f"--selector {args.selector!r} is not a selector")
    if args.algorithm == "rsa-sha256" and not 1024 <= args.bits <= 8192:
        raise UsageError("--bits must be between 1024 and 8192 (2048 recommended)")
    out = Path(args.out) if args.out else _default_out(args, domain, args.selector)
    if out.exists():
        print(f"mailgw: {out} exists; refusing to overwrite it (choose a new selector or --out)",
              file=sys.stderr)
        return EXIT_FAIL
    key = dkimkeys.generate(args.algorithm, args.bits)
    try:
        dkimkeys.write_private_key(out, key)
    except FileExistsError:
        print(f"mailgw: {out} exists; refusing to overwrite it", file=sys.stderr)
        return EXIT_FAIL
    record = dkimkeys.dns_record(key)
    zone = dkimkeys.zone_line(args.selector, domain, key)
    snippet = (f"dkim:\n  {domain}:\n    - {{selector: {args.selector}, key_file: {out}, "
               f"algorithm: {args.algorithm}}}\n")
    if args.json:
        print_json({"domain": domain, "selector": args.selector, "algorithm": args.algorithm,
                    "key_file": str(out), "name": dkimkeys.dns_name(args.selector, domain),
                    "record": record, "zone_line": zone, "config": snippet})
        return EXIT_OK
    bits = f", {args.bits} bits" if args.algorithm == "rsa-sha256" else ""
    print(f"Wrote {out} ({args.algorithm}{bits}, mode 0600).\n")
    print("Publish this DNS record:\n")
    print(zone + "\n")
    print("Add this to gateway.yaml (then `mailgw dkim check --domain "
          f"{domain} --selector {args.selector}` once DNS has it):\n")
    print(snippet, end="")
    return EXIT_OK


def _default_out(args: argparse.Namespace, domain: str, selector: str) -> Path:
    """Where keygen writes without --out: the key_file the config names for this domain
    and selector (a plain path), else state_dir/dkim/DOMAIN.SELECTOR.pem. The config is
    loaded without reading its DKIM keys: the one about to be written does not exist yet."""
    from gateway.config import generated_secret_path, load_config

    cfg = load_config(args.config, dkim_keys=False)
    for entry in cfg.dkim.get(domain, []):
        if entry.selector == selector:
            path = generated_secret_path(entry.key_file, cfg.base_dir)
            if path is not None:
                return path
    return cfg.state_path / "dkim" / f"{domain}.{selector}.pem"


def lookup_txt(name: str, nameservers: list[tuple[str, int]], timeout: float) -> list[str]:
    """Every TXT record at `name`, each with its strings joined; [] when there is none.

    Raises RuntimeError for DNS failures (timeout, SERVFAIL) with a readable message.
    """
    import dns.exception
    import dns.resolver

    from gateway.mail.auth import make_resolver

    resolver = make_resolver(nameservers)   # as the ingest checks resolve: delivery.nameservers
    resolver.lifetime = timeout
    resolver.timeout = timeout
    try:
        answer = resolver.resolve(name, "TXT", raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return []
    except dns.exception.Timeout:
        raise RuntimeError(f"DNS lookup of {name} timed out") from None
    except dns.resolver.NoNameservers as exc:
        raise RuntimeError(f"DNS lookup of {name} failed (SERVFAIL): {exc}") from None
    except dns.exception.DNSException as exc:
        raise RuntimeError(f"DNS lookup of {name} failed: {exc}") from None
    out = []
    for rdata in answer.rrset or []:
        out.append(b"".join(rdata.strings).decode("utf-8", "replace"))
    return out


def check_published(name: str, key: Any, nameservers: list[tuple[str, int]],
                    timeout: float) -> tuple[str, str, str | None]:
    """(status, message, published text) with status ok|missing|mismatch|unparseable|dns-error."""
    from gateway.keys import dkim as dkimkeys

    try:
        records = lookup_txt(name, nameservers, timeout)
    except RuntimeError as exc:
        return "dns-error", str(exc), None
    dkim_records = [r for r in records if "p=" in r or r.lstrip().startswith("v=DKIM1")]
    if not dkim_records:
        return "missing", f"no DKIM TXT record at {name}", None
    if len(dkim_records) > 1:
        return ("unparseable", f"{len(dkim_records)} DKIM TXT records at {name}; "
                "receivers may pick any of them: publish exactly one", "\n".join(dkim_records))
    text = dkim_records[0]
    try:
        published = dkimkeys.parse_record(text)
    except ValueError as exc:
        return "unparseable", f"the record at {name} does not parse: {exc}", text
    ok, why = dkimkeys.matches(published, key)
    if not ok:
        return "mismatch", f"the record at {name} does not match key_file: {why}", text
    return "ok", f"the record at {name} matches key_file", text


def _check(args: argparse.Namespace) -> int:
    from gateway.config import read_secret_bytes
    from gateway.keys import dkim as dkimkeys

    cfg = config(args)
    domain = _domain(args.domain)
    entries = cfg.dkim.get(domain, [])
    if args.selector:
        entries = [e for e in entries if e.selector == args.selector]
    if not entries:
        what = f"selector {args.selector!r} of " if args.selector else ""
        raise UsageError(f"no DKIM key for {what}{domain} in the dkim: section of {cfg.source}")
    nameservers = cfg.delivery.nameserver_addresses()
    results: list[dict[str, Any]] = []
    for e in entries:
        key = dkimkeys.load_private_key(read_secret_bytes(e.key_file, cfg.base_dir))
        name = dkimkeys.dns_name(e.selector, domain)
        status, message, published = check_published(name, key, nameservers, args.timeout)
        results.append({"domain": domain, "selector": e.selector, "algorithm": e.algorithm,
                        "name": name, "status": status, "message": message,
                        "published": published, "expected": dkimkeys.dns_record(key),
                        "zone_line": dkimkeys.zone_line(e.selector, domain, key)})
    ok = all(r["status"] == "ok" for r in results)
    if args.json:
        print_json({"ok": ok, "keys": results})
        return EXIT_OK if ok else EXIT_FAIL
    for r in results:
        label = "OK" if r["status"] == "ok" else r["status"].upper()
        print(f"{r['selector']}._domainkey.{domain} ({r['algorithm']}): {label}: {r['message']}")
        if r["status"] in ("missing", "mismatch", "unparseable"):
            print(f"  publish: {r['zone_line']}")
    return EXIT_OK if ok else EXIT_FAIL
