"""Schemathesis against the admin API over real HTTP: requests generated from the served
OpenAPI document (valid and invalid ones) never get a 5xx, and every response has a
documented status code, content type and body schema.

The API runs on its own event loop in a thread (schemathesis calls it synchronously),
on a SQLite store seeded with a few messages, contacts and a suppression. The two routes
that would dial IMAP/SMTP servers named in generated data (account test and reconnect)
are left out; account writes are fuzzed (the AccountService is not started: nothing
syncs what they create). Each operation gets a bounded number of
examples so the module stays well under a minute.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.accounts.service import AccountService
from gateway.api import openapi
from gateway.api.http import AdminAPI
from gateway.config import Config
from gateway.crm.contacts import ContactInput, upsert_contacts
from gateway.crm.store import Store
from gateway.crm.suppression import SuppressionList
from gateway.mail.parse import parse_message
from gateway.metrics import Metrics
from gateway.records import AcceptedMessage, fill_from_parsed
from tests.conftest import require_module

schemathesis = require_module("schemathesis")
hypothesis = require_module("hypothesis")
pytestmark = pytest.mark.integration

TOKEN = "fuzz-token-0123456789"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
EXAMPLES = 40
T = TypeVar("T")
RAW = (b"From: alice@example.com\r\nTo: bob@acme.test\r\nSubject: about Q0000\r\n"
       b"Message-ID: <Q0000@example.com>\r\nMIME-Version: 1.0\r\n"
       b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
       b"Content-Type: text/plain\r\n\r\nbody\r\n--b\r\n"
       b'Content-Type: application/pdf\r\nContent-Disposition: attachment; filename="o.pdf"\r\n'
       b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n--b--\r\n")

#: operations not fuzzed: they dial IMAP/SMTP servers
SKIPPED = {"POST /api/v1/accounts/{id}/test", "POST /api/v1/accounts/{id}/reconnect"}


class Server:
    """The admin API on its own loop in a daemon thread."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.api: AdminAPI | None = None
        self.store: Store | None = None
        self.accounts: AccountService | None = None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self) -> int:
        self.store = await Store.open(f"sqlite+aiosqlite:///{self.state}/crm.db",
                                      raw_dir=self.state / "raw")
        await upsert_contacts(self.store, [ContactInput(email="bob@acme.test", first_name="Bob",
                                                        company="Acme")], source="api")
        for i in range(3):
            qid = f"Q{i:04d}"
            a = AcceptedMessage(
                queue_id=qid, message_id=f"<{qid}@example.com>", from_addr="alice@example.com",
                to_addrs=["bob@acme.test"], cc_addrs=[], subject=f"about {qid}", date=T0,
                snippet="hi", size=10, recipients=["bob@acme.test"], user="alice@example.com",
                account=None, at=T0, text_body="body", raw=RAW if i == 0 else None)
            if a.raw is not None:   # raw bytes kept, with an attachment to serve
                fill_from_parsed(a, parse_message(a.raw))
            await self.store.record([a], [])
        await SuppressionList(self.store).add("gone@acme.test", detail="", created_by="test")
        config = Config.model_validate({"state_dir": str(self.state)})
        self.accounts = AccountService(lambda: config, self.store)
        accounts = self.accounts
        self.api = AdminAPI(self.store, get_config=lambda: accounts.effective(config),
                            metrics=Metrics(), token=TOKEN, accounts=accounts,
                            spool_counts=lambda: {"incoming": 0})
        await self.api.start("127.0.0.1", 0, loopback_only=True)
        assert self.api.port is not None
        return self.api.port

    async def _stop(self) -> None:
        if self.api is not None:
            await self.api.stop()
        if self.accounts is not None:
            await self.accounts.stop()
        if self.store is not None:
            await self.store.close()

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.run(self._start())}"

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture(scope="module")
def session() -> Iterator[Any]:
    requests = require_module("requests", "schemathesis depends on it")
    with requests.Session() as s:
        yield s


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with Server(tmp_path_factory.mktemp("state")) as url:
        yield url


def _document() -> dict[str, Any]:
    """The served document without its security requirement: every request carries the
    token (401 has its own tests), so a generated case must not count "no Authorization
    header" as the invalid part the server should have refused."""
    doc = openapi.document()
    doc.pop("security", None)
    for methods in doc["paths"].values():
        for op in methods.values():
            op.pop("security", None)
    return doc


SCHEMA = schemathesis.openapi.from_dict(_document())
OPERATIONS = [r.ok() for r in SCHEMA.get_all_operations()]


def _has_input(op: Any) -> bool:
    # a path parameter is any string: only query parameters and bodies can be invalid
    return any(p.location == "query" for p in op.iter_parameters()) or bool(list(op.body))


#: (operation, mode): invalid requests only where the operation takes input
CASES = [pytest.param(op, mode, id=f"{op.label} {mode}") for op in OPERATIONS
         if op.label not in SKIPPED for mode in ("positive", "negative")
         if mode == "positive" or _has_input(op)]


@pytest.mark.parametrize("operation, mode", CASES)
def test_generated_requests_get_documented_answers(base_url: str, session: Any, operation: Any,
                                                   mode: str) -> None:
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import (
        content_type_conformance,
        negative_data_rejection,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )
    from schemathesis.generation import GenerationMode
    checks = [negative_data_rejection, not_a_server_error, status_code_conformance,
              content_type_conformance, response_schema_conformance]

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    def run(case: Any) -> None:
        response = case.call(base_url=base_url, session=session, headers={"Authorization": f"Bearer {TOKEN}"},
                             timeout=10)
        case.validate_response(response, checks=checks)

    run()


@pytest.mark.parametrize("path, parameter", [
    ("/api/v1/messages/%C2%B2", None),              # a Unicode digit is not a message id
    ("/api/v1/messages/" + "9" * 30, None),
    ("/api/v1/messages?limit=", "limit"),
    ("/api/v1/messages?limit=%C2%B2", "limit"),
    ("/api/v1/messages?limit=" + "9" * 5000, "limit"),
    ("/api/v1/messages?cursor=WyIyMDI2LTAxLTAxVDAwOjAwOjAwKzAwOjAwIiw5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OV0",
     "cursor"),                                     # a cursor whose id overflows 64 bits
    ("/api/v1/messages?since=", "since"),
    ("/api/v1/messages?direction=", "direction"),
    ("/api/v1/messages?limit=1&limit=500", "limit"),
    ("/api/v1/messages?limt=10", "limt"),
    ("/api/v1/messages?limit=%D9%A1%D9%A2", "limit"),
    ("/api/v1/stats/engagement?days=", "days"),
    ("/api/v1/stats/engagement?days=%C2%B2", "days"),
    ("/api/v1/messages/1/attachments/%C2%B2", "n"),
    ("/api/v1/messages/1/attachments/-1", "n"),
    ("/api/v1/messages/Q0000/attachments/1", None),   # one attachment: index 0 only
    ("/api/v1/companies/a%20b", "domain"),
    ("/api/v1/companies/a..b/timeline", "domain"),
    ("/api/v1/companies/nobody.test", None),
    ("/api/v1/companies?search=", "search"),
])
def test_hostile_parameters_are_4xx_naming_the_parameter(base_url: str, path: str,
                                                         parameter: str | None) -> None:
    import json
    import urllib.error
    import urllib.request
    req = urllib.request.Request(base_url + path, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, body = resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        status, body = exc.code, json.loads(exc.read())
    if parameter is None:
        assert status == 404, body
    else:
        assert status == 400, body
        assert body["parameter"] == parameter


@pytest.mark.parametrize("path, params, body", [
    ("/api/v1/messages/{id}/raw", {"id": "Q0000"}, RAW),
    ("/api/v1/messages/{id}/attachments/{n}", {"id": "Q0000", "n": 0}, b"%PDF-"),
    ("/api/v1/companies/{domain}", {"domain": "acme.test"}, None),
    ("/api/v1/companies/{domain}/timeline", {"domain": "acme.test"}, None),
])
def test_served_bytes_and_companies_as_documented(base_url: str, session: Any, path: str,
                                                  params: dict[str, Any],
                                                  body: bytes | None) -> None:
    from schemathesis.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )
    case = SCHEMA[path]["GET"].Case(path_parameters=params)
    response = case.call(base_url=base_url, session=session,
                         headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert response.status_code == 200, response.text
    if body is not None:
        assert response.content == body
    case.validate_response(response, checks=[status_code_conformance, content_type_conformance,
                                             response_schema_conformance])
