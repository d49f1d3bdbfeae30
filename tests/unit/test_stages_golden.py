"""Golden files for the outbound stages: tests/data/stages/NAME.eml -> NAME.expected.eml.

Each input runs through `transform` with the default context below, overridden by the
optional NAME.ctx.json (StageSettings fields, plus ``base_url``). The output must equal
the expected file byte for byte. To (re)write the expected files after a deliberate
change, run with ``MAILGW_REGEN_GOLDEN=1`` and review the diff; without it a missing
expected file fails.

Besides the byte comparison every output is checked independently: it parses with the
stdlib, every text part decodes in its declared charset, no line exceeds 998 octets,
and every tracking token verifies and names this copy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from gateway.pipeline.stages import CopyContext, StageSettings, Transformed, transform
from gateway.tracking.tokens import TokenSigner
from tests.support.mime_checks import decoded_texts, long_lines, tokens_in, verified

DATA = Path(__file__).resolve().parent.parent / "data" / "stages"
CASES = sorted(p.name[: -len(".eml")] for p in DATA.glob("*.eml") if not p.name.endswith(".expected.eml"))
REGEN = os.environ.get("MAILGW_REGEN_GOLDEN") == "1"
BASE = "https://t.example.test"
COPY_ID = "01JNKZ6W3Q9R8S7T6V5X4Y3Z2A"
SIGNER = TokenSigner([b"golden-key-0123456789abcdef"])
DEFAULTS: dict[str, Any] = {"track_opens": True, "track_clicks": True,
                               "skip_links": ["*.skip.example.test/*"]}


def context(name: str) -> CopyContext:
    settings = dict(DEFAULTS)
    side = DATA / f"{name}.ctx.json"
    if side.exists():
        settings.update(json.loads(side.read_text(encoding="utf-8")))
    base = str(settings.pop("base_url", BASE))
    settings["skip_links"] = tuple(settings["skip_links"])
    return CopyContext("bob@example.test", COPY_ID, StageSettings(**settings),
                       base, SIGNER)


def run(name: str) -> tuple[bytes, Transformed]:
    raw = (DATA / f"{name}.eml").read_bytes()
    return raw, transform(raw, context(name))


def test_there_are_golden_cases() -> None:
    assert len(CASES) >= 15


@pytest.mark.parametrize("name", CASES)
def test_golden(name: str) -> None:
    raw, out = run(name)
    expected_path = DATA / f"{name}.expected.eml"
    if REGEN:
        expected_path.write_bytes(out.data)
    assert expected_path.exists(), f"{expected_path.name} missing: run with MAILGW_REGEN_GOLDEN=1 and review"
    expected = expected_path.read_bytes()
    assert out.data == expected
    if expected == raw:
        assert out.data is raw and not out.changed
    assert b"\n" not in out.data.replace(b"\r\n", b""), "bare LF"
    assert long_lines(out.data) == []


@pytest.mark.parametrize("name", CASES)
def test_golden_output_parses_and_tokens_verify(name: str) -> None:
    raw, out = run(name)
    texts = decoded_texts(out.data)
    before = {t for _, text in decoded_texts(raw) for t in tokens_in(text, BASE, "c")}  # already tracked
    clicks = [t for _, text in texts for t in tokens_in(text, BASE, "c") if t not in before]
    numbered: dict[int, str] = {}
    for tok in clicks:
        data = verified(SIGNER, tok)
        assert data.copy_id == COPY_ID
        if data.kind == "click":
            numbered[data.link] = data.url or ""
        else:
            assert data.kind == "honeypot" and data.link == 0
    assert numbered == out.report.links
    assert sorted(numbered) == list(range(1, len(numbered) + 1))
    opens = [t for _, text in texts for t in tokens_in(text, BASE, "o")]
    assert len(opens) == out.report.pixels
    for tok in opens:
        data = verified(SIGNER, tok)
        assert (data.kind, data.copy_id) == ("open", COPY_ID)
