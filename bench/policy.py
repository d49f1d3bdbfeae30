"""Benchmark PolicySet.decide(): microseconds per call for the shipped examples and for N rules.

    python3 bench/policy.py [--rules 10 100 1000] [--calls 20000]

Prints, per rule count, the time of one decide() for a recipient that matches few rules
(the common case), for one with headers after DATA, and per rule. No assertions: figures only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.config import load_config  # noqa: E402
from gateway.policy import Headers, PolicySet, load_policies, policies_for  # noqa: E402


def per_call(ps: PolicySet, calls: int, headers: Headers | None, n_senders: int = 50) -> float:
    senders = [f"rep{i}@sales{i % 7}.example.test" for i in range(n_senders)]
    rcpts = [f"buyer{i}@customer{i % 13}.example.org" for i in range(n_senders)]
    ps.decide(senders[0], rcpts[0], "alice@example.test", None, headers)  # warm the cache
    t = time.perf_counter()
    for k in range(calls):
        ps.decide(senders[k % n_senders], rcpts[k % n_senders], "alice@example.test", None,
                  headers)
    return (time.perf_counter() - t) / calls * 1e6


def synthetic(n: int, cfg_path: Path, tmp: Path) -> PolicySet:
    d = tmp / f"p{n}"
    d.mkdir()
    lines = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            match = f'{{recipient_domain: [partner{i}.example.net, "*.partner{i}.example.net"]}}'
        elif kind == 1:
            match = f'{{sender: ["team{i}-*@example.test"], recipient: ["*@vip{i}.example.org"]}}'
        elif kind == 2:
            match = f'{{header: {{name: X-Campaign-{i}, value: "spring-*"}}}}'
        else:
            match = f'{{sender_domain: [sales{i % 7}.example.test], not: {{recipient: [x{i}@y.test]}}}}'
        lines.append(f"- name: rule {i}\n  match: {match}\n  set: {{track_opens: false}}\n")
    (d / "rules.yaml").write_text("".join(lines))
    return load_policies(d, load_config(cfg_path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rules", type=int, nargs="*", default=[10, 100, 1000])
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args()
    cfg_path = ROOT / "gateway.example.yaml"
    hdrs = Headers.from_bytes(b"Subject: Hello\r\nX-Campaign-2: spring-sale\r\nFrom: a@b\r\n")
    ex = policies_for(load_config(cfg_path))
    print(f"{'rules':>6} {'us/decide':>10} {'us/decide+hdrs':>15} {'ns/rule':>8}")
    us = per_call(ex, args.calls, None)
    ush = per_call(ex, args.calls, hdrs)
    print(f"{len(ex):>6} {us:>10.2f} {ush:>15.2f} {us * 1000 / max(len(ex), 1):>8.0f}"
          "   (shipped policies/)")
    with tempfile.TemporaryDirectory() as t:
        for n in args.rules:
            ps = synthetic(n, cfg_path, Path(t))
            calls = max(1000, args.calls * 10 // max(n, 10))
            us = per_call(ps, calls, None)
            ush = per_call(ps, calls, hdrs)
            print(f"{n:>6} {us:>10.2f} {ush:>15.2f} {us * 1000 / n:>8.0f}")


if __name__ == "__main__":
    main()
