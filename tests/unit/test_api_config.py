"""Config of the admin listener and webhooks: token rules, event names, URLs, durations, secrets;
and the mapping of configured webhooks to the store's subscriptions."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.api.webhooks import endpoints_from_config, targets
from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.records import WebhookTarget


def problems(tmp_path: Path, text: str) -> list[str]:
    p = tmp_path / "gateway.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    return [str(x).replace(f"{p}:", "") for x in ei.value.problems]


def test_webhooks_validated_with_line_and_key(tmp_path: Path) -> None:
    (tmp_path / "hook.key").write_text("k\n")
    (tmp_path / "empty.key").write_text("\n")
    got = problems(tmp_path, """webhooks:
  - url: https://crm.example.com/hooks
    secret_file: hook.key
    events: [message.stored, message.exploded]
  - url: ftp://crm.example.com/
    secret_file: hook.key
  - url: https://crm.example.com/other
    events: []
  - url: https://crm.example.com/third
    secret_file: hook.key
    timeout: soon
    retry_initial: 2h
    retry_max: 1h
""")
    assert got[0].startswith("4: webhooks[0].events[1]: Input should be 'message.stored'")
    assert got[1] == "5: webhooks[1].url: 'ftp://crm.example.com/' is not an http:// or https:// URL"
    assert got[2] == "7: webhooks[2].secret_file: Field required"
    assert got[3].startswith("11: webhooks[3].timeout: 'soon' is not a duration")
    assert len(got) == 4
    got = problems(tmp_path, """webhooks:
  - {url: "https://a.example.com/", secret_file: empty.key}
  - {url: "https://a.example.com/", secret_file: missing.key}
""")
    assert got == ["2: webhooks[0].secret_file: empty.key is empty",
                   "3: webhooks[1].secret_file: cannot read missing.key: No such file or directory",
                   "3: webhooks[1].url: duplicate webhook url 'https://a.example.com/'"]


def test_webhook_retry_bounds_and_mapping_to_targets(tmp_path: Path) -> None:
    (tmp_path / "hook.key").write_text("k3y\n")
    got = problems(tmp_path, """webhooks:
  - {url: "https://b.example.com/", secret_file: hook.key, retry_initial: 2h, retry_max: 1h}
""")
    assert got == ["2: webhooks[0]: retry_initial is longer than retry_max"]
    p = tmp_path / "ok.yaml"
    p.write_text("""webhooks:
  - {url: "https://a.example.com/h", secret_file: hook.key, events: [message.opened], max_age: 1d}
  - {url: "http://127.0.0.1:9000/h", secret_file: hook.key}
""")
    eps = endpoints_from_config(load_config(p))
    a = eps["https://a.example.com/h"]
    assert (a.secret, a.max_age, a.timeout, a.retry_initial, a.retry_max) == (
        b"k3y", 86400, 10, 10, 3600)
    assert targets(eps) == [WebhookTarget("https://a.example.com/h", frozenset({"message.opened"})),
                            WebhookTarget("http://127.0.0.1:9000/h", frozenset())]


def test_admin_token_needed_off_loopback(tmp_path: Path) -> None:
    got = problems(tmp_path, "listeners:\n  admin: {host: 0.0.0.0, port: 8081}\n")
    assert got == ["2: listeners.admin.token_file: required when the admin listener binds 0.0.0.0 "
                   "(not loopback only): the read API needs a bearer token there"]
    (tmp_path / "token").write_text("  \n")
    got = problems(tmp_path, "listeners:\n  admin: {host: 0.0.0.0, token_file: token}\n")
    assert got == ["2: listeners.admin.token_file: token is empty"]
    p = tmp_path / "ok.yaml"
    p.write_text("listeners:\n  admin: {host: 127.0.0.1}\n")
    admin = load_config(p).listeners.admin
    assert admin is not None and admin.loopback_only and admin.token_file is None
