"""Relay.accept: where the outbound planning runs (the event loop must stay free for big work)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from gateway.pipeline.outbound import CopyPlan, Outbound
from gateway.relay import Relay, Submission
from gateway.spool import Spool
from tests.unit.test_outbound import HTML, setup

USER = "alice@example.com"


async def test_several_recipients_are_planned_off_the_event_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning costs about a millisecond per tracked copy (stages, RSA): a small message to
    100 recipients must not hold every other session for a tenth of a second."""
    out = setup(tmp_path, {})                  # opens and clicks tracked: a copy per recipient
    loop_thread = threading.get_ident()
    on_loop: list[bool] = []
    real = Outbound.plan

    def spy(self: Outbound, *args: Any, **kwargs: Any) -> list[CopyPlan]:
        on_loop.append(threading.get_ident() == loop_thread)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Outbound, "plan", spy)
    spool = Spool(tmp_path / "spool")
    spool.setup()
    relay = Relay(spool, "gw.example.test", outbound=lambda: out)
    try:
        many = [f"r{i}@acme.test" for i in range(20)]
        await relay.accept(Submission(USER, many, HTML, user=USER))
        await relay.accept(Submission(USER, ["a@acme.test"], HTML, user=USER))
    finally:
        spool.close()
    assert on_loop == [False, True]        # several copies: a worker thread; one small copy: the loop
    assert len(spool.list_ids("incoming")) == 21
