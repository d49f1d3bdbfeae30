"""Every runtime dependency in pyproject.toml has an upper bound, and the installed one is in range."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
_REQ_RE = re.compile(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*(.*)$")


def _requirements() -> list[tuple[str, str]]:
    deps: list[str] = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    out = []
    for dep in deps:
        m = _REQ_RE.match(dep)
        assert m is not None, dep
        out.append((m.group(1), m.group(2)))
    return out


def _release(text: str) -> tuple[int, ...]:
    m = re.match(r"\d+(?:\.\d+)*", text)
    assert m is not None, text
    return tuple(int(x) for x in m.group(0).split("."))


def _pad(a: tuple[int, ...], n: int) -> tuple[int, ...]:
    return a + (0,) * (n - len(a))


def _within(installed: str, spec: str) -> bool:
    have = _release(installed)
    for clause in (c.strip() for c in spec.split(",")):
        m = re.match(r"(>=|<)\s*(.+)$", clause)
        assert m is not None, clause
        op, want = m.group(1), _release(m.group(2))
        n = max(len(have), len(want))
        if op == ">=" and _pad(have, n) < _pad(want, n):
            return False
        if op == "<" and not _pad(have, n) < _pad(want, n):
            return False
    return True


@pytest.mark.parametrize(("name", "spec"), _requirements())
def test_pinned_with_an_upper_bound(name: str, spec: str) -> None:
    clauses = [c.strip() for c in spec.split(",")]
    assert all(re.match(r"(>=|<)\s*\d", c) for c in clauses), f"{name}: only >= and < are used: {spec}"
    assert any(c.startswith("<") for c in clauses), f"{name} has no upper bound: {spec}"


@pytest.mark.parametrize(("name", "spec"), _requirements())
def test_installed_version_is_in_range(name: str, spec: str) -> None:
    try:
        installed = version(name)
    except PackageNotFoundError:
        pytest.fail(f"{name} is not installed")
    assert _within(installed, spec), f"{name} {installed} is outside the tested range {spec}"
