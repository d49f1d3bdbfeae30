"""Configuration keys added for tracking and DKIM look-ups: validation with file, line and key."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from gateway.config import load_config, parse_nameserver
from gateway.errors import ConfigError
from gateway.http.tracking import settings_from_config


def test_tracking_listener_and_classification_keys(tmp_path: Path) -> None:
    p = tmp_path / "gateway.yaml"
    p.write_text("""listeners:
  tracking:
    host: 0.0.0.0
    port: 8080
    base_url: https://t.example.com/
    trusted_proxies: [10.0.0.0/8, "::1"]
tracking:
  internal_networks: [192.0.2.0/24]
  machine_networks: ["2001:db8::/32"]
  click_after_delivery: 15s
  burst_window: 2s
""")
    cfg = load_config(p)
    lst = cfg.listeners.tracking
    assert lst is not None and lst.base_url == "https://t.example.com"
    assert lst.trusted_proxies == [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")]
    s = settings_from_config(cfg)
    assert s.click_after_delivery == 15 and s.burst_window == 2 and s.open_after_delivery == 2
    assert s.internal_networks == (ipaddress.ip_network("192.0.2.0/24"),)
    assert s.machine_networks == (ipaddress.ip_network("2001:db8::/32"),)


def test_tracking_errors_name_line_and_key(tmp_path: Path) -> None:
    p = tmp_path / "gateway.yaml"
    p.write_text("""listeners:
  tracking:
    base_url: t.example.com
    trusted_proxies: [10.0.0.0/8, not-a-network]
tracking:
  internal_networks: 10.0.0.0/8
""")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    lines = [str(x) for x in ei.value.problems]
    assert any(s.startswith(f"{p}:3: listeners.tracking.base_url: 't.example.com' is not an http(s) URL")
               for s in lines), lines
    assert any(s.startswith(f"{p}:4: listeners.tracking.trusted_proxies: 'not-a-network' is not an IP")
               for s in lines), lines
    assert any(s.startswith(f"{p}:6: tracking.internal_networks: expected a list") for s in lines), lines


def test_nameservers_take_ports(tmp_path: Path) -> None:
    assert parse_nameserver("192.0.2.53") == ("192.0.2.53", 53)
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("[2001:db8::53]:5300") == ("2001:db8::53", 5300)
    assert parse_nameserver("2001:db8::53") == ("2001:db8::53", 53)
    for bad in ("ns.example.com", "127.0.0.1:x", "127.0.0.1:70000"):
        with pytest.raises(ValueError):
            parse_nameserver(bad)
    p = tmp_path / "gateway.yaml"
    p.write_text("delivery:\n  route: mx\n  nameservers: ['127.0.0.1:5353', ns.example.com]\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert f"{p}:3: delivery.nameservers: 'ns.example.com' is not an IP address" in str(ei.value)
