"""DKIM against real peers: Perl Mail::DKIM verifies our signatures through a loopback DNS
server; `mailgw dkim keygen` and `mailgw dkim check` against that DNS server."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.cli import main
from gateway.keys import dkim as dkimkeys
from gateway.pipeline.dkim import Signer, SigningKey
from tests.conftest import require, require_tool
from tests.support.dns import DNSServer
from tests.unit.test_dkim import MULTIPART_8BIT, SIMPLE

pytestmark = pytest.mark.integration

VERIFY_PL = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Net::DNS::Resolver;
my $port = shift;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $port,
    recurse => 0, udp_timeout => 3, tcp_timeout => 3, retry => 1));
my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN; local $/; my $m = <STDIN>;
$dkim->PRINT($m); $dkim->CLOSE;
print "result=", $dkim->result, "\n";
foreach my $sig ($dkim->signatures) {
  print "sig s=", ($sig->selector // ''), " a=", ($sig->algorithm // ''),
        " result=", $sig->result, " detail=", ($sig->result_detail // ''), "\n";
}
"""


def _perl_dkim() -> tuple[str, bool]:
    """(Mail::DKIM version, whether it knows ed25519-sha256: CPAN 1.20230630 and later)."""
    perl = require_tool("perl")
    probe = subprocess.run(
        [perl, "-MMail::DKIM::Verifier", "-MNet::DNS::Resolver", "-e",
         "print $Mail::DKIM::Verifier::VERSION;"
         " print eval { require Mail::DKIM::Algorithm::ed25519_sha256; 1 } ? ' ed25519' : ''"],
        capture_output=True, text=True, check=False)
    require(probe.returncode == 0, "Perl Mail::DKIM and Net::DNS (Debian libmail-dkim-perl)")
    version, _, ed = probe.stdout.partition(" ")
    return version, ed == "ed25519"


def _zone(keys: dict[str, dkimkeys.PrivateKey]) -> dict[str, dict[str, list[str]]]:
    def strings(text: str) -> str:  # a long record as several <=255-character strings
        return " ".join(f'"{text[i:i + 255]}"' for i in range(0, len(text), 255))
    return {f"{sel}._domainkey.example.com": {"TXT": [strings(dkimkeys.dns_record(k))]}
            for sel, k in keys.items()}


async def _perl_verify(message: bytes, port: int) -> dict[str, str]:
    proc = await asyncio.create_subprocess_exec(
        "perl", "-e", VERIFY_PL, str(port), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(message), 30)
    assert proc.returncode == 0, err.decode()
    results = {}
    for line in out.decode().splitlines():
        if line.startswith("sig "):
            fields = dict(f.split("=", 1) for f in line[4:].split(" ", 3))
            results[f"{fields['s']} {fields['a']}"] = fields["detail"]
        elif line.startswith("result="):
            results["overall"] = line.split("=", 1)[1]
    return results


@pytest.fixture(scope="module")
def keys() -> dict[str, dkimkeys.PrivateKey]:
    return {"r1": dkimkeys.generate("rsa-sha256", 2048), "e1": dkimkeys.generate("ed25519-sha256")}


@pytest.mark.parametrize("message", [SIMPLE, MULTIPART_8BIT], ids=["simple", "multipart-8bit"])
async def test_mail_dkim_verifies_rsa_and_both(message: bytes, keys: dict[str, dkimkeys.PrivateKey]) -> None:
    _, has_ed25519 = _perl_dkim()
    rsa_only = Signer({"example.com": [SigningKey("example.com", "r1", "rsa-sha256", keys["r1"])]})
    both = Signer({"example.com": [SigningKey("example.com", "e1", "ed25519-sha256", keys["e1"]),
                                   SigningKey("example.com", "r1", "rsa-sha256", keys["r1"])]})
    async with DNSServer(_zone(keys)) as dns_server:
        signed = rsa_only.sign(message)
        assert await _perl_verify(signed, dns_server.port) == {
            "overall": "pass", "r1 rsa-sha256": "pass"}
        tampered = signed.replace(b"\r\n\r\n", b"\r\n\r\nX", 1)
        res = await _perl_verify(tampered, dns_server.port)
        assert res["overall"] == "fail" and res["r1 rsa-sha256"] == "fail (body has been altered)"

        res = await _perl_verify(both.sign(message), dns_server.port)
        assert res["overall"] == "pass" and res["r1 rsa-sha256"] == "pass"
        if has_ed25519:
            assert res["e1 ed25519-sha256"] == "pass"
        else:  # an older verifier ignores the ed25519 signature; the RSA one carries the message
            assert res["e1 ed25519-sha256"] == "invalid (unsupported algorithm ed25519-sha256)"


async def test_mail_dkim_verifies_ed25519(keys: dict[str, dkimkeys.PrivateKey]) -> None:
    version, has_ed25519 = _perl_dkim()
    if not has_ed25519:
        # Debian bookworm ships 1.20230212; ed25519 arrived in CPAN Mail-DKIM 1.20230630.
        # dkimpy (with PyNaCl) verifies ed25519 in tests/unit/test_dkim.py meanwhile.
        pytest.skip(f"Mail::DKIM {version} predates ed25519 support (1.20230630)")
    signer = Signer({"example.com": [SigningKey("example.com", "e1", "ed25519-sha256", keys["e1"])]})
    async with DNSServer(_zone(keys)) as dns_server:
        res = await _perl_verify(signer.sign(MULTIPART_8BIT), dns_server.port)
        assert res == {"overall": "pass", "e1 ed25519-sha256": "pass"}


# -- mailgw dkim keygen / check ------------------------------------------------------------


def _config(tmp_path: Path, dns_port: int, body: str = "") -> Path:
    p = tmp_path / "gateway.yaml"
    p.write_text(f"state_dir: ./var\ndelivery:\n  route: mx\n  nameservers: ['127.0.0.1:{dns_port}']\n"
                 + body)
    return p


async def test_keygen_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with DNSServer() as dns_server:
        cfg = _config(tmp_path, dns_server.port)
        rc = await asyncio.to_thread(main, ["dkim", "keygen", "-c", str(cfg), "--domain", "Example.com",
                                            "--selector", "s2026r"])
        out = capsys.readouterr().out
        assert rc == 0, out
        key_path = tmp_path / "var" / "dkim" / "example.com.s2026r.pem"
        assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
        key = dkimkeys.load_private_key(key_path.read_bytes())
        zone_line = next(line for line in out.splitlines() if "IN TXT" in line)
        assert zone_line == dkimkeys.zone_line("s2026r", "example.com", key)
        assert f"key_file: {key_path}, algorithm: rsa-sha256" in out
        # never overwrite
        rc = await asyncio.to_thread(main, ["dkim", "keygen", "-c", str(cfg), "--domain", "example.com",
                                            "--selector", "s2026r"])
        assert rc == 1 and "refusing to overwrite" in capsys.readouterr().err
        reloaded = dkimkeys.load_private_key(key_path.read_bytes())
        assert isinstance(key, rsa.RSAPrivateKey) and isinstance(reloaded, rsa.RSAPrivateKey)
        assert reloaded.private_numbers() == key.private_numbers()

        ed_path = tmp_path / "ed.pem"
        rc = await asyncio.to_thread(main, ["dkim", "keygen", "--domain", "example.com", "--selector",
                                            "s2026e", "--algorithm", "ed25519-sha256", "--out",
                                            str(ed_path), "--json"])
        info = json.loads(capsys.readouterr().out)
        assert rc == 0 and info["record"].startswith("v=DKIM1; k=ed25519; p=")

        _config(tmp_path, dns_server.port, f"""dkim:
  example.com:
    - {{selector: s2026r, key_file: {key_path}}}
    - {{selector: s2026e, key_file: {ed_path}, algorithm: ed25519-sha256}}
""")
        check = ["dkim", "check", "-c", str(cfg), "--domain", "example.com", "--timeout", "2"]
        # nothing published yet: exit 1, says what to publish
        rc = await asyncio.to_thread(main, check)
        out = capsys.readouterr().out
        assert rc == 1
        assert "s2026r._domainkey.example.com (rsa-sha256): MISSING" in out
        assert "publish: s2026r._domainkey.example.com. IN TXT" in out

        # publish the RSA record split into strings, the ed25519 one as keygen printed it
        rsa_strings = zone_line.split(" IN TXT ", 1)[1]
        dns_server.add("s2026r._domainkey.example.com", "TXT", rsa_strings)
        dns_server.add("s2026e._domainkey.example.com", "TXT", info["record"])
        rc = await asyncio.to_thread(main, [*check, "--json"])
        result = json.loads(capsys.readouterr().out)
        assert rc == 0 and result["ok"] is True
        assert [k["status"] for k in result["keys"]] == ["ok", "ok"]

        # a different key published under the selector
        dns_server.remove("s2026e._domainkey.example.com")
        dns_server.add("s2026e._domainkey.example.com", "TXT",
                       dkimkeys.dns_record(dkimkeys.generate("ed25519-sha256")))
        rc = await asyncio.to_thread(main, [*check, "--selector", "s2026e"])
        out = capsys.readouterr().out
        assert rc == 1 and "MISMATCH" in out and "different ed25519 key" in out

        # unparseable, then the DNS server failing
        dns_server.remove("s2026e._domainkey.example.com")
        dns_server.add("s2026e._domainkey.example.com", "TXT", "v=DKIM1; k=ed25519; garbage")
        rc = await asyncio.to_thread(main, [*check, "--selector", "s2026e"])
        assert rc == 1 and "UNPARSEABLE" in capsys.readouterr().out
        dns_server.servfail.add("*")
        rc = await asyncio.to_thread(main, [*check, "--selector", "s2026r", "--json"])
        result = json.loads(capsys.readouterr().out)
        assert rc == 1 and result["keys"][0]["status"] == "dns-error"

        # a domain without keys is a usage error
        rc = await asyncio.to_thread(main, ["dkim", "check", "-c", str(cfg), "--domain", "other.example"])
        assert rc == 2 and "no DKIM key for other.example" in capsys.readouterr().err


def test_mailgw_check_prints_key_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "k.pem").write_bytes(dkimkeys.private_pem(dkimkeys.generate("rsa-sha256", 1024)))
    cfg = _config(tmp_path, 53, "dkim:\n  example.com: {selector: s1, key_file: k.pem}\n")
    assert main(["check", "-c", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {cfg}:6: dkim.example.com.key_file: k.pem: RSA key of 1024 bits" in err
    (tmp_path / "k.pem").write_text("garbage")
    assert main(["check", "-c", str(cfg)]) == 2
    assert f"{cfg}:6: dkim.example.com.key_file: k.pem: not a private key" in capsys.readouterr().err
