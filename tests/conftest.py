"""Shared test fixtures: free ports, real-peer requirements (skip on a laptop, fail in CI)."""

from __future__ import annotations

import os
import shutil
import socket

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require(condition: bool, what: str) -> None:
    """Skip when a real peer is missing on a developer machine; fail when CI=true."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"{what} is required in CI (CI=true) but is missing")
    pytest.skip(f"{what} not available")


def require_tool(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"the {name} command")
    assert path is not None
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
