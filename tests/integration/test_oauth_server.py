"""The tests' own OAuth2 / OpenID server (tests/support/oauth_server.py), every grant over real HTTP.

Issue 10's tests lean on this server (connect links, device flow, service accounts, app-only
access), so here each endpoint is driven the way a client or a browser drives it (aiohttp
client on loopback, the consent page's real form), including the error answers; at the end
a real Dovecot validates the tokens through its oauth2 passdb.
"""

from __future__ import annotations

import asyncio
import base64
import imaplib
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import pytest

from tests.conftest import require_module, require_tool
from tests.support.dovecot import Dovecot
from tests.support.oauth_server import (
    CLIENT_ASSERTION_TYPE,
    GRANT_CLIENT_CREDENTIALS,
    GRANT_DEVICE,
    GRANT_JWT_BEARER,
    TokenServer,
    s256,
)

jwt = require_module("jwt", "PyJWT[crypto], for the OpenID parts of the test server")

pytestmark = pytest.mark.integration

CALLBACK = "http://127.0.0.1:9/connect/callback"       # never contacted: redirects are not followed
GOOGLE_SCOPE = "https://mail.google.com/ openid email"


# -- fixtures and helpers ---------------------------------------------------------------------
@pytest.fixture
def ts() -> Iterator[TokenServer]:
    with TokenServer(redirect_uris=(CALLBACK,)) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


class _Form(HTMLParser):
    """The first form of a page: its action, its fields, its submit buttons (by id)."""

    def __init__(self) -> None:
        super().__init__()
        self.action = ""
        self.method = ""
        self.fields: dict[str, str] = {}
        self.buttons: dict[str, tuple[str, str]] = {}     # id -> (name, value)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form" and not self.action:
            self.action, self.method = a.get("action", ""), a.get("method", "get").lower()
        elif tag == "input" and "name" in a:
            self.fields[a["name"]] = a.get("value", "")
        elif tag == "button" and a.get("type") == "submit":
            self.buttons[a.get("id", "")] = (a.get("name", ""), a.get("value", ""))


def parse_form(page: str) -> _Form:
    form = _Form()
    form.feed(page)
    return form


async def submit(http: aiohttp.ClientSession, base: str, page: str, button: str,
                 **fields: str) -> aiohttp.ClientResponse:
    """Click `button` on the page's form, as a browser would (redirects are not followed)."""
    form = parse_form(page)
    assert form.method == "post" and button in form.buttons
    data = {**form.fields, **fields}
    name, value = form.buttons[button]
    data[name] = value
    return await http.post(base + form.action, data=data, allow_redirects=False)


def auth_params(ts: TokenServer, verifier: str, **extra: str) -> dict[str, str]:
    params = {"response_type": "code", "client_id": ts.client_id, "redirect_uri": CALLBACK,
              "scope": GOOGLE_SCOPE, "state": "st-" + secrets.token_hex(4),
              "code_challenge": s256(verifier), "code_challenge_method": "S256"}
    params.update(extra)
    return params


def basic(client_id: str, secret: str) -> dict[str, str]:
    """HTTP basic client authentication (RFC 6749 §2.3.1)."""
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def token(http: aiohttp.ClientSession, ts: TokenServer, data: dict[str, str], *,
                auth: bool = True) -> tuple[int, dict[str, Any]]:
    headers = basic(ts.client_id, ts.client_secret) if auth else {}
    async with http.post(ts.token_url, data=data, headers=headers) as resp:
        return resp.status, await resp.json()


async def tokeninfo(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(url) as resp:
        return resp.status, await resp.json()


async def code_for(http: aiohttp.ClientSession, ts: TokenServer, email: str, verifier: str,
                   **extra: str) -> tuple[str, dict[str, str]]:
    """Walk the consent page for `email`; -> (code, the callback's query)."""
    async with http.get(ts.authorize_url, params=auth_params(ts, verifier, **extra),
                        allow_redirects=False) as resp:
        assert resp.status == 200, await resp.text()
        page = await resp.text()
    async with await submit(http, ts.base_url, page, "approve", email=email) as resp:
        assert resp.status == 302
        back = query_of(resp.headers["Location"])
    return back["code"], back


def verify_id_token(ts: TokenServer, id_token: str, jwks: dict[str, Any]) -> dict[str, Any]:
    kid = jwt.get_unverified_header(id_token)["kid"]
    key = next(jwt.PyJWK(k) for k in jwks["keys"] if k["kid"] == kid)
    claims: dict[str, Any] = jwt.decode(id_token, key.key, algorithms=["RS256"], audience=ts.client_id,
                                        issuer=ts.issuer)
    return claims


def assertion(key_pem: str, claims: dict[str, Any], kid: str | None = None) -> str:
    headers = {"kid": kid} if kid else None
    return str(jwt.encode(claims, key_pem, algorithm="RS256", headers=headers))


def google_claims(ts: TokenServer, sa: dict[str, str], sub: str | None, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"iss": sa["client_email"], "aud": sa["token_uri"], "iat": now,
                              "exp": now + 3600, "scope": "https://mail.google.com/"}
    if sub is not None:
        claims["sub"] = sub
    claims.update(over)
    return claims


# -- discovery, JWKS --------------------------------------------------------------------------
async def test_discovery_document_and_jwks(ts: TokenServer, http: aiohttp.ClientSession) -> None:
    async with http.get(ts.discovery_url) as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["issuer"] == ts.issuer
    assert doc["authorization_endpoint"] == ts.authorize_url
    assert doc["token_endpoint"] == ts.token_url
    assert doc["device_authorization_endpoint"] == ts.device_authorization_url
    assert doc["userinfo_endpoint"] == ts.userinfo_url
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert {GRANT_DEVICE, GRANT_JWT_BEARER, GRANT_CLIENT_CREDENTIALS} <= set(doc["grant_types_supported"])
    async with http.get(doc["jwks_uri"]) as resp:
        jwks = await resp.json()
    assert [(k["kty"], k["alg"], k["use"], k["kid"]) for k in jwks["keys"]] == \
        [("RSA", "RS256", "sig", ts.signing_key_id)]
    assert "d" not in jwks["keys"][0]                     # public part only


# -- authorization code + PKCE ------------------------------------------------------------------
async def test_code_grant_through_the_consent_form(ts: TokenServer, http: aiohttp.ClientSession) -> None:
    verifier = secrets.token_urlsafe(48)
    params = auth_params(ts, verifier, nonce="n-123", login_hint="rep@example.test")
    async with http.get(ts.authorize_url, params=params, allow_redirects=False) as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
        page = await resp.text()
    form = parse_form(page)
    assert form.fields["email"] == "rep@example.test"             # the login hint fills the field
    assert set(form.buttons) == {"approve", "deny"}
    assert "https://mail.google.com/" in page
    async with await submit(http, ts.base_url, page, "approve") as resp:
        assert resp.status == 302
        location = resp.headers["Location"]
    assert location.startswith(CALLBACK + "?")
    back = query_of(location)
    assert back["state"] == params["state"] and back["iss"] == ts.issuer
    assert ts.consents[-1] == {"client_id": ts.client_id, "email": "rep@example.test",
                               "decision": "approve", "scope": GOOGLE_SCOPE}

    status, body = await token(http, ts, {"grant_type": "authorization_code", "code": back["code"],
                                          "redirect_uri": CALLBACK, "code_verifier": verifier})
    assert status == 200, body
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    assert body["scope"] == GOOGLE_SCOPE and body["refresh_token"].startswith("rt-")
    async with http.get(ts.jwks_url) as resp:
        jwks = await resp.json()
    claims = verify_id_token(ts, body["id_token"], jwks)
    assert claims["email"] == "rep@example.test" and claims["email_verified"] is True
    assert claims["nonce"] == "n-123" and claims["sub"].isdigit()
    assert claims["exp"] > claims["iat"] >= claims["auth_time"] - 1

    async with http.get(ts.userinfo_url, headers={"Authorization": f"Bearer {body['access_token']}"}) as r:
        assert r.status == 200
        info = await r.json()
    assert info["sub"] == claims["sub"] and info["email"] == "rep@example.test"
    status, ti = await tokeninfo(http, ts.tokeninfo_url + body["access_token"])
    assert status == 200 and ti["email"] == "rep@example.test" and ti["aud"] == ts.client_id

    # the refresh token works, with a new ID token for the same subject (and no nonce)
    status, again = await token(http, ts, {"grant_type": "refresh_token",
                                           "refresh_token": body["refresh_token"]})
    assert status == 200 and again["access_token"] != body["access_token"]
    refreshed = verify_id_token(ts, again["id_token"], jwks)
    assert refreshed["sub"] == claims["sub"] and "nonce" not in refreshed

    # a replayed code is refused and takes back what it issued (RFC 6749 §4.1.2)
    status, err = await token(http, ts, {"grant_type": "authorization_code", "code": back["code"],
                                         "redirect_uri": CALLBACK, "code_verifier": verifier})
    assert (status, err["error"]) == (400, "invalid_grant")
    assert (await tokeninfo(http, ts.tokeninfo_url + body["access_token"]))[0] == 400
    status, err = await token(http, ts, {"grant_type": "refresh_token",
                                         "refresh_token": body["refresh_token"]})
    assert (status, err["error"]) == (400, "invalid_grant")


async def test_deny_and_faults_at_the_authorization_endpoint(ts: TokenServer,
                                                             http: aiohttp.ClientSession) -> None:
    verifier = secrets.token_urlsafe(48)
    params = auth_params(ts, verifier)
    async with http.get(ts.authorize_url, params=params, allow_redirects=False) as resp:
        page = await resp.text()
    async with await submit(http, ts.base_url, page, "deny", email="rep@example.test") as resp:
        assert resp.status == 302
        back = query_of(resp.headers["Location"])
    assert back["error"] == "access_denied" and back["state"] == params["state"] and "code" not in back
    async with await submit(http, ts.base_url, page, "approve", email="rep@example.test") as resp:
        assert resp.status == 400                          # a request is decided once

    # no redirect to an unknown client or an unregistered redirect URI (RFC 6749 §4.1.2.1)
    for bad in ({"client_id": "nobody"}, {"redirect_uri": "http://127.0.0.1:9/elsewhere"}):
        async with http.get(ts.authorize_url, params={**params, **bad}, allow_redirects=False) as resp:
            assert resp.status == 400 and "Location" not in resp.headers
            assert "invalid_request" in await resp.text()
    # other faults go back to the client, with the state
    for bad, error in (({"code_challenge": ""}, "invalid_request"),
                       ({"code_challenge_method": "plain"}, "invalid_request"),
                       ({"response_type": "token"}, "unsupported_response_type")):
        async with http.get(ts.authorize_url, params={**params, **bad}, allow_redirects=False) as resp:
            assert resp.status == 302
            back = query_of(resp.headers["Location"])
        assert back["error"] == error and back["state"] == params["state"]


async def test_code_exchange_faults(ts: TokenServer, http: aiohttp.ClientSession) -> None:
    verifier = secrets.token_urlsafe(48)

    async def exchange(code: str, **over: str) -> tuple[int, str]:
        data = {"grant_type": "authorization_code", "code": code, "redirect_uri": CALLBACK,
                "code_verifier": verifier, **over}
        status, body = await token(http, ts, data)
        return status, str(body.get("error"))

    code, _ = await code_for(http, ts, "rep@example.test", verifier)
    assert await exchange(code, code_verifier=secrets.token_urlsafe(48)) == (400, "invalid_grant")  # PKCE
    code, _ = await code_for(http, ts, "rep@example.test", verifier)
    assert await exchange(code, code_verifier="") == (400, "invalid_request")
    code, _ = await code_for(http, ts, "rep@example.test", verifier)
    assert await exchange(code, redirect_uri=CALLBACK + "x") == (400, "invalid_grant")
    code, _ = await code_for(http, ts, "rep@example.test", verifier)
    ts.advance(ts.code_lifetime + 1)                       # the server's clock: no sleeping
    assert await exchange(code) == (400, "invalid_grant")
    assert await exchange("ac-made-up") == (400, "invalid_grant")
    # a code is bound to the client that asked for it
    ts.register_client("other", "other-secret", redirect_uris=(CALLBACK,))
    code, _ = await code_for(http, ts, "rep@example.test", verifier)
    async with http.post(ts.token_url, headers=basic("other", "other-secret"),
                         data={"grant_type": "authorization_code", "code": code, "redirect_uri": CALLBACK,
                               "code_verifier": verifier}) as resp:
        assert (resp.status, (await resp.json())["error"]) == (400, "invalid_grant")
    # client authentication comes first: basic, or the secret in the form; else 401
    code, _ = await code_for(http, ts, "rep@example.test", verifier)
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": CALLBACK,
            "code_verifier": verifier}
    assert (await token(http, ts, data, auth=False))[0] == 401
    status, body = await token(http, ts, {**data, "client_id": ts.client_id, "client_secret": "wrong"},
                               auth=False)
    assert (status, body["error"]) == (401, "invalid_client")
    status, body = await token(http, ts, {**data, "client_id": ts.client_id,
                                          "client_secret": ts.client_secret}, auth=False)
    assert status == 200 and body["access_token"]


async def test_consent_without_a_browser_and_the_address_the_provider_vouches_for(
        ts: TokenServer, http: aiohttp.ClientSession) -> None:
    verifier = secrets.token_urlsafe(48)
    ts.set_user("unverified@example.test", email_verified=False, name="Una Verified")
    url = f"{ts.authorize_url}?{urlencode(auth_params(ts, verifier, login_hint='rep@example.test'))}"
    ts.sign_in("unverified@example.test")          # the browser is signed in as someone else
    back = query_of(ts.consent(url))
    status, body = await token(http, ts, {"grant_type": "authorization_code", "code": back["code"],
                                          "redirect_uri": CALLBACK, "code_verifier": verifier})
    assert status == 200
    async with http.get(ts.jwks_url) as resp:
        claims = verify_id_token(ts, body["id_token"], await resp.json())
    assert (claims["email"], claims["email_verified"], claims["name"]) == \
        ("unverified@example.test", False, "Una Verified")
    ts.sign_in(None)
    assert query_of(ts.consent(url, approve=False))["error"] == "access_denied"
    assert query_of(ts.consent(url, email="rep@example.test"))["code"]
    with pytest.raises(ValueError, match="redirect_uri"):
        ts.consent(url.replace("callback", "elsewhere"))


# -- device authorization (RFC 8628) ---------------------------------------------------------
async def test_device_grant_pending_slow_down_approved_once(ts: TokenServer,
                                                           http: aiohttp.ClientSession) -> None:
    ts.register_client("cli", None)                 # a public client: no secret
    async with http.post(ts.device_authorization_url,
                         data={"client_id": "cli", "scope": GOOGLE_SCOPE}) as resp:
        assert resp.status == 200
        dev = await resp.json()
    assert dev["verification_uri"] == ts.verification_url and dev["interval"] == 5
    assert dev["verification_uri_complete"].endswith("user_code=" + dev["user_code"])
    assert len(dev["user_code"]) == 9 and dev["user_code"][4] == "-"
    poll = {"grant_type": GRANT_DEVICE, "device_code": dev["device_code"], "client_id": "cli"}

    async def answer() -> tuple[int, dict[str, Any]]:
        return await token(http, ts, poll, auth=False)

    assert (await answer())[1]["error"] == "authorization_pending"
    status, body = await answer()                   # polled again at once
    assert (status, body["error"]) == (400, "slow_down")
    ts.advance(10)                                  # the interval grew by 5 s
    assert (await answer())[1]["error"] == "authorization_pending"

    # the rep approves on the verification page (a real form)
    async with http.get(dev["verification_uri_complete"]) as resp:
        page = await resp.text()
    assert parse_form(page).fields["user_code"] == dev["user_code"]
    async with await submit(http, ts.base_url, page, "approve", email="rep@example.test") as resp:
        assert resp.status == 200 and "Device connected" in await resp.text()
    ts.advance(10)
    status, body = await answer()
    assert status == 200 and body["refresh_token"] and body["id_token"]
    status, ti = await tokeninfo(http, ts.tokeninfo_url + body["access_token"])
    assert ti["email"] == "rep@example.test"
    ts.advance(10)
    assert (await answer())[1]["error"] == "invalid_grant"     # used up


async def test_device_grant_denied_expired_and_client_checks(ts: TokenServer,
                                                            http: aiohttp.ClientSession) -> None:
    async def start() -> dict[str, Any]:
        async with http.post(ts.device_authorization_url, data={"scope": "openid"},
                             headers=basic(ts.client_id, ts.client_secret)) as resp:
            assert resp.status == 200
            return dict(await resp.json())

    denied, expired = await start(), await start()
    ts.deny_device(denied["user_code"].lower())            # case and dash do not matter
    status, body = await token(http, ts, {"grant_type": GRANT_DEVICE, "device_code": denied["device_code"]})
    assert (status, body["error"]) == (400, "access_denied")
    ts.advance(ts.device_lifetime + 1)
    status, body = await token(http, ts, {"grant_type": GRANT_DEVICE, "device_code": expired["device_code"]})
    assert (status, body["error"]) == (400, "expired_token")
    with pytest.raises(ValueError):
        ts.approve_device(expired["user_code"], "rep@example.test")
    # a confidential client must authenticate, at both endpoints
    async with http.post(ts.device_authorization_url, data={"client_id": ts.client_id}) as resp:
        assert (resp.status, (await resp.json())["error"]) == (401, "invalid_client")
    status, body = await token(http, ts, {"grant_type": GRANT_DEVICE, "device_code": "dc-x",
                                          "client_id": ts.client_id}, auth=False)
    assert status == 401


# -- JWT bearer (RFC 7523): Google domain-wide delegation ------------------------------------------
async def test_service_account_serves_three_mailboxes(ts: TokenServer, http: aiohttp.ClientSession) -> None:
    sa = ts.create_service_account(domains=("example.test",))
    assert sa["type"] == "service_account" and sa["token_uri"] == ts.token_url
    tokens = {}
    for mailbox in ("a@example.test", "b@example.test", "c@example.test"):
        signed = assertion(sa["private_key"], google_claims(ts, sa, mailbox), sa["private_key_id"])
        async with http.post(ts.token_url, data={"grant_type": GRANT_JWT_BEARER, "assertion": signed}) as r:
            assert r.status == 200
            body = await r.json()
        assert "refresh_token" not in body and body["scope"] == "https://mail.google.com/"
        tokens[mailbox] = body["access_token"]
    assert len(set(tokens.values())) == 3
    for mailbox, access in tokens.items():
        status, ti = await tokeninfo(http, ts.tokeninfo_url + access)
        assert status == 200 and ti["email"] == mailbox
        assert ts.token_allows(access, mailbox) and not ts.token_allows(access, "z@example.test")


async def test_jwt_bearer_refusals(ts: TokenServer, http: aiohttp.ClientSession) -> None:
    sa = ts.create_service_account(domains=("example.test",))
    other = ts.create_service_account(domains=("example.test",))
    now = int(time.time())

    async def refused(signed: str) -> tuple[int, str]:
        async with http.post(ts.token_url, data={"grant_type": GRANT_JWT_BEARER, "assertion": signed}) as r:
            return r.status, str((await r.json())["error"])

    def signed(key: dict[str, str] = sa, **over: Any) -> str:
        return assertion(key["private_key"], google_claims(ts, sa, "a@example.test") | over)

    assert await refused(signed(other)) == (400, "invalid_grant")                  # wrong key
    assert await refused(signed(iss="nobody@example.test")) == (400, "invalid_grant")
    assert await refused(signed(aud="https://elsewhere.example/token")) == (400, "invalid_grant")
    assert await refused(signed(iat=now - 7200, exp=now - 3600)) == (400, "invalid_grant")   # expired
    assert await refused(signed(iat=now + 600, exp=now + 1200)) == (400, "invalid_grant")    # future
    assert await refused(signed(exp=now + 7200)) == (400, "invalid_grant")         # longer than an hour
    assert await refused(signed(sub="a@elsewhere.test")) == (400, "unauthorized_client")
    assert await refused(signed(scope="")) == (400, "invalid_scope")
    assert await refused("not.a.jwt") == (400, "invalid_grant")
    tampered = signed().split(".")
    tampered[1] = jwt.utils.base64url_encode(
        jwt.utils.base64url_decode(tampered[1]).replace(b"a@example", b"b@example")).decode()
    assert await refused(".".join(tampered)) == (400, "invalid_grant")
    ts.advance(7200)                              # the server's clock passes the assertion's exp
    assert await refused(signed()) == (400, "invalid_grant")


# -- client credentials: Microsoft app-only -------------------------------------------------------
async def test_client_credentials_with_a_secret_and_with_a_certificate(
        ts: TokenServer, http: aiohttp.ClientSession) -> None:
    ts.register_client("app", "app-secret", mailboxes=("a@example.test",))
    ts.grant_mailboxes("app", "b@example.test")
    scope = "https://outlook.office365.com/.default"
    async with http.post(ts.token_url, data={"grant_type": "client_credentials", "client_id": "app",
                                             "client_secret": "app-secret", "scope": scope}) as r:
        assert r.status == 200
        body = await r.json()
    access = body["access_token"]
    assert "refresh_token" not in body and "id_token" not in body
    assert ts.token_allows(access, "A@example.test") and ts.token_allows(access, "b@example.test")
    assert not ts.token_allows(access, "c@example.test")
    status, ti = await tokeninfo(http, ts.tokeninfo_url + access)
    assert status == 200 and "email" not in ti and ti["aud"] == "app"
    status, ti = await tokeninfo(http, ts.mailbox_tokeninfo_url("b@example.test") + access)
    assert status == 200 and ti["email"] == "b@example.test"
    assert (await tokeninfo(http, ts.mailbox_tokeninfo_url("c@example.test") + access))[0] == 400
    async with http.get(ts.userinfo_url, headers={"Authorization": f"Bearer {access}"}) as r:
        assert r.status == 401 and "invalid_token" in r.headers["WWW-Authenticate"]

    async def refused(data: dict[str, str]) -> tuple[int, str]:
        async with http.post(ts.token_url, data={"grant_type": "client_credentials", **data}) as r:
            return r.status, str((await r.json())["error"])

    assert await refused({"client_id": "app", "client_secret": "app-secret",
                          "scope": "IMAP.AccessAsUser.All"}) == (400, "invalid_scope")
    assert await refused({"client_id": "app", "client_secret": "nope", "scope": scope}) == \
        (401, "invalid_client")

    # the certificate way: a private-key JWT instead of the secret (RFC 7523 §2.2)
    key = ts.add_client_key("app")
    now = int(time.time())
    claims = {"iss": "app", "sub": "app", "aud": ts.token_url, "iat": now, "exp": now + 600,
              "jti": secrets.token_hex(8)}
    good = assertion(key.private_key_pem, claims, key.key_id)
    async with http.post(ts.token_url, data={"grant_type": "client_credentials", "client_id": "app",
                                             "client_assertion_type": CLIENT_ASSERTION_TYPE,
                                             "client_assertion": good, "scope": scope}) as r:
        assert r.status == 200 and ts.token_allows((await r.json())["access_token"], "a@example.test")
    stranger = ts.create_service_account()["private_key"]
    for bad in (assertion(stranger, claims, key.key_id),                     # not the client's key
                assertion(key.private_key_pem, {**claims, "aud": "x"}, key.key_id),
                assertion(key.private_key_pem, {**claims, "sub": "other"}, key.key_id)):
        assert await refused({"client_assertion_type": CLIENT_ASSERTION_TYPE, "client_assertion": bad,
                              "scope": scope}) == (401, "invalid_client")


# -- refresh, revocation, rotation, scripted answers ------------------------------------------------
async def test_revoke_a_user_and_revocation_endpoint(ts: TokenServer, http: aiohttp.ClientSession) -> None:
    refresh = ts.issue_refresh_token("rep@example.test")
    keep = ts.issue_refresh_token("other@example.test")
    status, body = await token(http, ts, {"grant_type": "refresh_token", "refresh_token": refresh})
    assert status == 200
    access = body["access_token"]
    assert ts.revoke("REP@example.test") == 2                # the refresh and the access token
    status, body = await token(http, ts, {"grant_type": "refresh_token", "refresh_token": refresh})
    assert (status, body["error"]) == (400, "invalid_grant")
    assert body["error_description"] == "Token has been expired or revoked."
    assert (await tokeninfo(http, ts.tokeninfo_url + access))[0] == 400
    async with http.get(ts.userinfo_url, headers={"Authorization": f"Bearer {access}"}) as r:
        assert r.status == 401
    assert (await token(http, ts, {"grant_type": "refresh_token", "refresh_token": keep}))[0] == 200
    async with http.post(ts.revocation_url, data={"token": keep}) as r:
        assert r.status == 200
    assert (await token(http, ts, {"grant_type": "refresh_token", "refresh_token": keep}))[0] == 400


async def test_rotation_scripted_answers_and_unknown_grants(http: aiohttp.ClientSession) -> None:
    with TokenServer(rotate_refresh_tokens=True) as ts:
        old = ts.issue_refresh_token("rep@example.test")
        status, body = await token(http, ts, {"grant_type": "refresh_token", "refresh_token": old})
        assert status == 200 and body["refresh_token"] != old
        assert (await token(http, ts, {"grant_type": "refresh_token", "refresh_token": old}))[0] == 400
        assert (await token(http, ts, {"grant_type": "refresh_token",
                                       "refresh_token": body["refresh_token"]}))[0] == 200
        ts.fail_next(503, times=2)
        for _ in range(2):
            status, body = await token(http, ts, {"grant_type": "refresh_token", "refresh_token": "x"})
            assert (status, body["error"]) == (503, "temporarily_unavailable")
        status, body = await token(http, ts, {"grant_type": "password", "username": "u", "password": "p"})
        assert (status, body["error"]) == (400, "unsupported_grant_type")
        assert [g["grant_type"] for g in ts.grants][-4:] == ["refresh_token"] * 3 + ["password"]


# -- a real peer: Dovecot's oauth2 passdb against this server -----------------------------------
def xoauth2_login(host: str, port: int, user: str, access: str) -> bool:
    imap = imaplib.IMAP4(host, port, timeout=10)
    try:
        imap.authenticate("XOAUTH2", lambda _: f"user={user}\x01auth=Bearer {access}\x01\x01".encode())
        return True
    except imaplib.IMAP4.error:
        return False
    finally:
        with_logout(imap)


def with_logout(imap: imaplib.IMAP4) -> None:
    try:
        imap.logout()
    except (imaplib.IMAP4.error, OSError):
        pass


async def test_dovecot_accepts_code_and_delegated_tokens(ts: TokenServer,
                                                         http: aiohttp.ClientSession) -> None:
    require_tool("dovecot")
    verifier = secrets.token_urlsafe(48)
    code, _ = await code_for(http, ts, "rep@example.test", verifier)
    _, body = await token(http, ts, {"grant_type": "authorization_code", "code": code,
                                     "redirect_uri": CALLBACK, "code_verifier": verifier})
    sa = ts.create_service_account(domains=("example.test",))
    signed = assertion(sa["private_key"], google_claims(ts, sa, "b@example.test"))
    async with http.post(ts.token_url, data={"grant_type": GRANT_JWT_BEARER, "assertion": signed}) as r:
        delegated = (await r.json())["access_token"]
    dc = Dovecot(tokeninfo_url=ts.tokeninfo_url)
    for user in ("rep@example.test", "b@example.test"):
        dc.add_user(user, secrets.token_hex(8))
    with dc:
        login = asyncio.to_thread
        assert await login(xoauth2_login, dc.host, dc.port, "rep@example.test", body["access_token"])
        assert await login(xoauth2_login, dc.host, dc.port, "b@example.test", delegated)
        assert not await login(xoauth2_login, dc.host, dc.port, "rep@example.test", delegated)
        ts.revoke("rep@example.test")
        assert not await login(xoauth2_login, dc.host, dc.port, "rep@example.test", body["access_token"])
