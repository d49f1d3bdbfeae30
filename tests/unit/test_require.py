"""tests/conftest.py's require helpers: a missing peer or test package skips on a developer
machine and fails in CI (CI=true), at module level too (tests/integration/test_api_fuzz.py)."""

from __future__ import annotations

import pytest

from tests.conftest import require, require_module


def test_a_missing_package_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="required in CI"):
        require_module("mailgw_no_such_package")


def test_a_missing_package_skips_the_module_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as info:
        require_module("mailgw_no_such_package")
    assert info.value.allow_module_level


def test_a_present_package_is_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert require_module("json").dumps([]) == "[]"


def test_a_missing_peer_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        require(False, "a server")
