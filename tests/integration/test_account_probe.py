"""`mailgw accounts test` against a real SMTP upstream: one AUTH mechanism per probe.

A refused password must cost one failed login at the provider, not one per mechanism the
server offers (aiosmtplib's ``login()`` would try PLAIN and then LOGIN), and the probe's
report names the mechanism and keeps the server's reply with its enhanced status code.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.accounts.service import AccountService
from gateway.config import Config
from gateway.crm.store import Store
from tests.support.upstream import Upstream

pytestmark = pytest.mark.asyncio


def _config(tmp_path: Path, port: int, password: str) -> Config:
    (tmp_path / "smtp-password").write_text(password + "\n")
    return Config.model_validate({
        "state_dir": str(tmp_path / "state"),
        "accounts": [{"id": "rep", "email": "rep@example.test", "provider": "imap",
                      # no IMAP server listens there: the probe's IMAP half fails at once
                      "imap": {"host": "127.0.0.1", "port": 9, "tls": "none"},
                      "smtp": {"host": "127.0.0.1", "port": port, "tls": "none",
                               "username": "alice", "password_file": str(tmp_path / "smtp-password")},
                      "auth": {"password_file": str(tmp_path / "smtp-password")}}]})


@pytest.mark.parametrize("password, ok", [("wrong", False), ("s3cret", True)])
async def test_accounts_test_logs_in_to_smtp_with_one_mechanism(
        store: Store, tmp_path: Path, password: str, ok: bool) -> None:
    async with Upstream(auth=("alice", "s3cret")) as up:
        config = _config(tmp_path, up.port, password)
        service = AccountService(lambda: config, store)
        try:
            report = await service.test("rep")
        finally:
            await service.stop()
        smtp = report["smtp"]
        assert smtp["ok"] is ok, smtp
        assert "auth" in smtp["extensions"], smtp     # EHLO was said before AUTH
        assert smtp["auth"] == "PLAIN", smtp
        assert up.password_attempts == [(1, "PLAIN")]
        if not ok:
            assert smtp["error"].startswith("535 "), smtp
            assert "5.7.8" in smtp["error"], smtp
            assert up.auth_failures == 1
