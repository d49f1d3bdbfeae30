"""Helpers shared by the command-group modules: exit codes, the parser class, config, output."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.config import Config, User, load_config
from gateway.errors import UsageError

if TYPE_CHECKING:
    from gateway.crm.store import Store

T = TypeVar("T")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED, EXIT_PIPE = 130, 141   # 128 + SIGINT, 128 + SIGPIPE, as shells report them

#: argparse's sub-parsers action (its class is private).
Subparsers = Any


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 on usage errors: keep that
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"mailgw: error: {message}\n")


def config(args: argparse.Namespace) -> Config:
    """The validated configuration named by -c (ConfigError -> exit 2)."""
    return load_config(args.config)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


async def with_store(cfg: Config, read: Callable[[Store], Awaitable[T]]) -> T:
    """`read` on the configured store, closed afterwards whatever happens."""
    from gateway.crm.store import Store

    store = await Store.from_config(cfg)
    try:
        return await read(store)
    finally:
        await store.close()


def print_rows(rows: Sequence[dict[str, Any]], as_json: bool, line: Callable[[dict[str, Any]], str],
               total: str) -> int:
    """A listing: `rows` as JSON, or one `line` each and a closing ``-- total`` line."""
    if as_json:
        print_json(rows)
        return EXIT_OK
    for r in rows:
        print(line(r))
    print(f"-- {total}")
    return EXIT_OK


def ts(t: float | None) -> str | None:
    """A Unix time as ISO 8601 UTC, None for 0/None."""
    return datetime.fromtimestamp(t, UTC).isoformat() if t else None


def parse_since(value: str | None, option: str = "--since") -> datetime | None:
    """`YYYY-MM-DD` or ISO 8601 -> an aware datetime (UTC when no zone is given)."""
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{option} {value!r}: expected YYYY-MM-DD or ISO 8601") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def user_for_sender(cfg: Config, sender: str) -> User | None:
    """The user whose login, or whose account's address, is `sender` (None: no such user)."""
    user = cfg.user(sender)
    if user is not None:
        return user
    low = sender.lower()
    for a in cfg.accounts:
        if a.email.lower() == low:
            for u in cfg.users:
                if u.account == a.id:
                    return u
    return None
