"""GrantClient against the tests' OAuth2 / OpenID server on loopback: every grant, its refusals and outages.

The provider is read from the server's discovery document, as any standards-conforming
identity provider would be; the consent page is decided with `consent(url, email=)`, the
device page with `approve_device` / `deny_device`, and time moves with `advance()`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from gateway.accounts.grants import (
    GRANT_CLIENT_CREDENTIALS,
    GRANT_JWT_BEARER,
    DeviceAuthorization,
    GrantClient,
    Identity,
    ServiceAccountKey,
    TokenResponse,
)
from gateway.errors import AccountAuthError, AccountTimeout, AccountUnavailable
from gateway.oauth import pkce
from gateway.oauth.providers import OAuthClient, OAuthProvider
from tests.conftest import free_port, require_module
from tests.support.oauth_server import CLIENT_ASSERTION_TYPE, TokenServer

jwt = require_module("jwt", "PyJWT[crypto]")

pytestmark = pytest.mark.integration

CALLBACK = "http://127.0.0.1:9/connect/callback"       # never contacted: redirects are not followed
SCOPES = ("https://mail.example.test/", "openid", "email")
APP_SCOPE = "https://outlook.office365.com/.default"


# -- fixtures and helpers ---------------------------------------------------------------------
@pytest.fixture
def ts() -> Iterator[TokenServer]:
    with TokenServer(redirect_uris=(CALLBACK,)) as server:
        yield server


class Requests:
    """The URLs a GrantClient's session asked for (an aiohttp trace)."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.config = aiohttp.TraceConfig()
        self.config.on_request_start.append(self._started)

    async def _started(self, session: aiohttp.ClientSession, ctx: Any,
                       params: aiohttp.TraceRequestStartParams) -> None:
        self.urls.append(str(params.url))


@pytest.fixture
def requests() -> Requests:
    return Requests()


@pytest.fixture
async def grants(requests: Requests) -> AsyncIterator[GrantClient]:
    session = aiohttp.ClientSession(trace_configs=[requests.config])
    client = GrantClient(session=session, timeout=10)
    try:
        yield client
    finally:
        await client.close()
        await session.close()


@pytest.fixture
async def provider(ts: TokenServer, grants: GrantClient) -> OAuthProvider:
    return await grants.discover("test-idp", ts.discovery_url, SCOPES)


@pytest.fixture
def client(ts: TokenServer) -> OAuthClient:
    return OAuthClient(ts.client_id, client_secret=ts.client_secret)


def certificate_for(private_key_pem: str) -> str:
    """A self-signed certificate for a key (what an app registration uploads)."""
    key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailgw app")])
    start = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=365)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def connect(ts: TokenServer, grants: GrantClient, provider: OAuthProvider, client: OAuthClient,
                  email: str = "rep@example.test", *, nonce: str | None = None) -> tuple[TokenResponse, str]:
    """The code flow as the connect link drives it; -> (tokens, the nonce sent)."""
    verifier, state, nonce = pkce.new_verifier(), secrets.token_urlsafe(16), nonce or pkce.new_nonce()
    url = grants.authorization_url(provider, client, redirect_uri=CALLBACK, state=state,
                                   code_challenge=pkce.challenge(verifier), nonce=nonce, login_hint=email)
    back = query_of(ts.consent(url, email=email))
    assert back["state"] == state and back["iss"] == ts.issuer
    tokens = await grants.exchange_code(provider, client, code=back["code"], redirect_uri=CALLBACK,
                                        code_verifier=verifier)
    return tokens, nonce


# -- discovery ----------------------------------------------------------------------------
async def test_the_provider_comes_from_the_discovery_document(ts: TokenServer,
                                                               provider: OAuthProvider) -> None:
    assert provider == OAuthProvider(
        name="test-idp", token_endpoint=ts.token_url, authorization_endpoint=ts.authorize_url,
        device_authorization_endpoint=ts.device_authorization_url, jwks_uri=ts.jwks_url,
        userinfo_endpoint=ts.userinfo_url, revocation_endpoint=ts.revocation_url, issuer=ts.issuer,
        scopes=SCOPES)


async def test_discovery_faults(ts: TokenServer, grants: GrantClient) -> None:
    with pytest.raises(AccountUnavailable, match="discovery document"):
        await grants.discover("x", ts.base_url + "/nowhere", SCOPES)
    with pytest.raises(AccountUnavailable, match="unreachable"):
        await grants.discover("x", f"http://127.0.0.1:{free_port()}/.well-known/openid-configuration", SCOPES)


# -- authorization code + PKCE, ID token, userinfo ---------------------------------------------
async def test_code_grant_with_pkce_and_the_verified_identity(
        ts: TokenServer, grants: GrantClient, provider: OAuthProvider, client: OAuthClient) -> None:
    ts.set_user("rep@example.test", name="Rep Resentative")
    tokens, nonce = await connect(ts, grants, provider, client)
    assert tokens.access_token.startswith("at-") and tokens.refresh_token and tokens.id_token
    assert tokens.scope == " ".join(SCOPES)
    assert 3590 < tokens.expires_at - time.time() <= 3600
    for secret in (tokens.access_token, tokens.refresh_token, tokens.id_token):
        assert secret not in repr(tokens)
    form = ts.grants[-1]
    assert (form["client_id"], form["client_secret"]) == (ts.client_id, ts.client_secret)  # secret_post
    assert ts.token_allows(tokens.access_token, "rep@example.test")

    who = await grants.verify_id_token(provider, ts.client_id, tokens.id_token, nonce=nonce)
    assert who == Identity(email="rep@example.test", email_verified=True, subject=who.subject,
                           name="Rep Resentative")
    assert who.subject.isdigit()
    info = await grants.userinfo(provider, tokens.access_token)
    assert info["sub"] == who.subject and info["email"] == "rep@example.test"

    # the refresh token works, and brings an ID token for the same subject (without a nonce)
    fresh = await grants.refresh(provider, client, tokens.refresh_token)
    assert fresh.access_token != tokens.access_token and fresh.refresh_token is None
    assert fresh.id_token is not None
    assert (await grants.verify_id_token(provider, ts.client_id, fresh.id_token, nonce=None)).subject == \
        who.subject


async def test_the_address_the_provider_vouches_for(
        ts: TokenServer, grants: GrantClient, provider: OAuthProvider, client: OAuthClient) -> None:
    ts.set_user("una@example.test", email_verified=False, name="Una")
    tokens, nonce = await connect(ts, grants, provider, client, "una@example.test")
    assert tokens.id_token is not None
    who = await grants.verify_id_token(provider, ts.client_id, tokens.id_token, nonce=nonce)
    assert (who.email, who.email_verified) == ("una@example.test", False)


async def test_code_exchange_refusals(ts: TokenServer, grants: GrantClient, provider: OAuthProvider,
                                      client: OAuthClient) -> None:
    verifier = pkce.new_verifier()
    url = grants.authorization_url(provider, client, redirect_uri=CALLBACK, state="s",
                                   code_challenge=pkce.challenge(verifier), nonce="n")
    code = query_of(ts.consent(url, email="rep@example.test"))["code"]
    with pytest.raises(AccountAuthError, match="PKCE verification failed") as info:
        await grants.exchange_code(provider, client, code=code, redirect_uri=CALLBACK,
                                   code_verifier=pkce.new_verifier())
    assert info.value.server_text == "invalid_grant: PKCE verification failed"
    assert verifier not in str(info.value)
    # the code was spent by that attempt; a replay is refused too
    with pytest.raises(AccountAuthError, match="invalid_grant"):
        await grants.exchange_code(provider, client, code=code, redirect_uri=CALLBACK, code_verifier=verifier)
    code = query_of(ts.consent(url, email="rep@example.test"))["code"]
    with pytest.raises(AccountAuthError, match="invalid_client") as info:
        await grants.exchange_code(provider, OAuthClient(ts.client_id, client_secret="wrong"), code=code,
                                   redirect_uri=CALLBACK, code_verifier=verifier)
    assert "wrong" not in str(info.value)


async def test_id_token_refusals(ts: TokenServer, requests: Requests, provider: OAuthProvider,
                                 client: OAuthClient) -> None:
    offset = [0.0]
    grants = GrantClient(clock=lambda: time.time() + offset[0], timeout=10)
    try:
        tokens, nonce = await connect(ts, grants, provider, client)
        assert tokens.id_token is not None
        with pytest.raises(AccountAuthError, match="nonce"):
            await grants.verify_id_token(provider, ts.client_id, tokens.id_token, nonce=pkce.new_nonce())
        with pytest.raises(AccountAuthError, match="not meant for this client"):
            await grants.verify_id_token(provider, "someone-else", tokens.id_token, nonce=nonce)
        with pytest.raises(AccountAuthError, match="issued by"):
            await grants.verify_id_token(dataclasses.replace(provider, issuer="https://accounts.google.com"),
                                         ts.client_id, tokens.id_token, nonce=nonce)
        head, body, sig = tokens.id_token.split(".")
        claims = json.loads(jwt.utils.base64url_decode(body))
        forged = jwt.utils.base64url_encode(json.dumps({**claims, "email": "boss@example.test"}).encode())
        with pytest.raises(AccountAuthError, match="signature"):
            await grants.verify_id_token(provider, ts.client_id, f"{head}.{forged.decode()}.{sig}",
                                         nonce=nonce)
        with pytest.raises(AccountAuthError, match="not a signed JWT"):
            await grants.verify_id_token(provider, ts.client_id, "garbage", nonce=nonce)
        # kept until after it expired: an hour and more than the leeway later (both clocks)
        assert await grants.verify_id_token(provider, ts.client_id, tokens.id_token, nonce=nonce)
        ts.advance(3600 + 61)
        offset[0] += 3600 + 61
        with pytest.raises(AccountAuthError, match="expired"):
            await grants.verify_id_token(provider, ts.client_id, tokens.id_token, nonce=nonce)
        # and one issued now is fine
        tokens, nonce = await connect(ts, grants, provider, client)
        assert tokens.id_token is not None
        assert await grants.verify_id_token(provider, ts.client_id, tokens.id_token, nonce=nonce)
    finally:
        await grants.close()


async def test_the_key_set_is_kept_and_fetched_again_for_a_new_key(
        ts: TokenServer, grants: GrantClient, requests: Requests, provider: OAuthProvider,
        client: OAuthClient) -> None:
    def key_set_fetches() -> int:
        return requests.urls.count(ts.jwks_url)

    first, nonce = await connect(ts, grants, provider, client)
    assert first.id_token is not None
    await grants.verify_id_token(provider, ts.client_id, first.id_token, nonce=nonce)
    second, nonce2 = await connect(ts, grants, provider, client)
    assert second.id_token is not None
    await grants.verify_id_token(provider, ts.client_id, second.id_token, nonce=nonce2)
    assert key_set_fetches() == 1                          # kept
    ts.signing_key_id = "idp-rotated"                      # the provider publishes its key anew
    third, nonce3 = await connect(ts, grants, provider, client)
    assert third.id_token is not None
    await grants.verify_id_token(provider, ts.client_id, third.id_token, nonce=nonce3)
    assert key_set_fetches() == 2
    # a key the provider does not publish even after fetching again: refused, one fetch more
    with pytest.raises(AccountAuthError, match="does not publish"):
        await grants.verify_id_token(provider, ts.client_id, first.id_token, nonce=nonce)
    assert key_set_fetches() == 3
    # the key set cannot be had: try later
    unreachable = dataclasses.replace(provider, jwks_uri=ts.base_url + "/nowhere")
    with pytest.raises(AccountUnavailable, match="key set"):
        await grants.verify_id_token(unreachable, ts.client_id, third.id_token, nonce=nonce3)


# -- refresh: rotation, revocation, outages ------------------------------------------------------
async def test_refresh_rotation(grants: GrantClient) -> None:
    with TokenServer(rotate_refresh_tokens=True) as ts:
        provider = OAuthProvider("rotating", token_endpoint=ts.token_url)
        client = OAuthClient(ts.client_id, client_secret=ts.client_secret)
        old = ts.issue_refresh_token("rep@example.test")
        fresh = await grants.refresh(provider, client, old, scope=ts.scope)
        assert fresh.refresh_token and fresh.refresh_token != old
        assert ts.grants[-1]["scope"] == ts.scope
        with pytest.raises(AccountAuthError, match="invalid_grant"):
            await grants.refresh(provider, client, old)
        assert (await grants.refresh(provider, client, fresh.refresh_token)).access_token


async def test_revoked_grant_needs_reconnecting(ts: TokenServer, grants: GrantClient, provider: OAuthProvider,
                                                client: OAuthClient) -> None:
    refresh = ts.issue_refresh_token("rep@example.test")
    access = (await grants.refresh(provider, client, refresh)).access_token
    ts.revoke("rep@example.test")                          # the user removed the app's access
    with pytest.raises(AccountAuthError) as info:
        await grants.refresh(provider, client, refresh)
    assert info.value.server_text == "invalid_grant: Token has been expired or revoked."
    assert not info.value.temporary and refresh not in str(info.value)
    with pytest.raises(AccountAuthError, match="invalid_token"):
        await grants.userinfo(provider, access)


async def test_revocation_endpoint_is_best_effort(ts: TokenServer, grants: GrantClient,
                                                  provider: OAuthProvider, client: OAuthClient) -> None:
    refresh = ts.issue_refresh_token("rep@example.test")
    await grants.revoke(provider, client, refresh)
    assert ts.grants == []                                 # the token endpoint was not involved
    with pytest.raises(AccountAuthError, match="invalid_grant"):
        await grants.refresh(provider, client, refresh)
    # no endpoint, or an endpoint that is down: nothing raised
    await grants.revoke(dataclasses.replace(provider, revocation_endpoint=None), client, refresh)
    gone = dataclasses.replace(provider, revocation_endpoint=f"http://127.0.0.1:{free_port()}/revoke")
    await grants.revoke(gone, client, refresh)


async def test_outages_are_temporary_refusals_are_not(ts: TokenServer, grants: GrantClient,
                                                      provider: OAuthProvider, client: OAuthClient) -> None:
    refresh = ts.issue_refresh_token("rep@example.test")
    for status, body in ((503, None), (500, {"error": "server_error"}), (429, {"error": "slow down"}),
                         (400, {"error": "temporarily_unavailable"}), (200, {"token_type": "Bearer"}),
                         (302, {"moved": True})):
        ts.fail_next(status, body)
        with pytest.raises(AccountUnavailable) as info:
            await grants.refresh(provider, client, refresh)
        assert info.value.temporary, (status, body)
    ts.fail_next(200, {"access_token": "at-x"})            # no expires_in: an hour is assumed
    assert 3590 < (await grants.refresh(provider, client, refresh)).expires_at - time.time() <= 3600
    for status, body in ((400, {"error": "invalid_scope", "error_description": "no"}),
                         (401, {"error": "invalid_client"}), (403, {"detail": "forbidden"})):
        ts.fail_next(status, body)
        with pytest.raises(AccountAuthError) as refused:
            await grants.refresh(provider, client, refresh)
        assert refused.value.server_text, (status, body)
    assert refused.value.server_text == "HTTP 403: an answer without access_token or error (keys: detail)"
    # an answer that is not a success never puts a token into the error
    ts.fail_next(200, {"refresh_token": "rt-leaked", "token_type": "Bearer"})
    with pytest.raises(AccountUnavailable) as info:
        await grants.refresh(provider, client, refresh)
    assert "rt-leaked" not in str(info.value) and "rt-leaked" not in info.value.server_text
    # nobody listening
    dead = dataclasses.replace(provider, token_endpoint=f"http://127.0.0.1:{free_port()}/token")
    with pytest.raises(AccountUnavailable, match="unreachable"):
        await grants.refresh(dead, client, refresh)
    assert (await grants.refresh(provider, client, refresh)).access_token


async def test_a_silent_endpoint_times_out() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)                            # read nothing, answer nothing

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    grants = GrantClient(timeout=0.5)
    try:
        with pytest.raises(AccountTimeout, match=r"did not answer within 0\.5s"):
            await grants.refresh(OAuthProvider("mute", f"http://127.0.0.1:{port}/token"),
                                 OAuthClient("c", client_secret="s"), "rt-1")
        assert accepted                                    # it did connect
    finally:
        await grants.close()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


# -- device authorization (RFC 8628) ---------------------------------------------------------
async def test_device_grant_pending_slow_down_then_approved(ts: TokenServer, grants: GrantClient,
                                                            provider: OAuthProvider) -> None:
    ts.register_client("cli", None)                        # a public client: no secret
    cli = OAuthClient("cli")
    device = await grants.start_device(provider, cli)
    assert device.interval == 5 and device.verification_uri == ts.verification_url
    assert device.verification_uri_complete == f"{ts.verification_url}?user_code={device.user_code}"
    assert 890 < device.expires_at - time.time() <= 900
    assert device.device_code not in repr(device)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) != 2:                                # the second poll comes too soon
            ts.advance(seconds)
        if len(slept) == 4:
            ts.approve_device(device.user_code, "rep@example.test")

    tokens = await grants.poll_device(provider, cli, device, sleep=sleep)
    assert slept == [5, 5, 10, 10]                         # slow_down added five seconds
    assert all(set(g) == {"grant_type", "device_code", "client_id"} for g in ts.grants)
    assert tokens.refresh_token and tokens.id_token
    assert ts.token_allows(tokens.access_token, "rep@example.test")
    who = await grants.verify_id_token(provider, "cli", tokens.id_token, nonce=None)
    assert who.email == "rep@example.test"


async def test_device_grant_denied_and_expired(ts: TokenServer, grants: GrantClient,
                                               provider: OAuthProvider, client: OAuthClient) -> None:
    denied = await grants.start_device(provider, client)   # a confidential client authenticates
    assert ts.grants == []

    async def deny(seconds: float) -> None:
        ts.advance(seconds)
        ts.deny_device(denied.user_code)

    with pytest.raises(AccountAuthError, match="access_denied") as info:
        await grants.poll_device(provider, client, denied, sleep=deny)
    assert "denied" in info.value.server_text

    expired = await grants.start_device(provider, client)

    async def wait_too_long(seconds: float) -> None:
        ts.advance(ts.device_lifetime + 1)

    with pytest.raises(AccountAuthError, match="expired_token"):
        await grants.poll_device(provider, client, expired, sleep=wait_too_long)
    # the gateway's own clock says the code is over: no poll at all
    polls = len(ts.grants)
    over = DeviceAuthorization(expired.device_code, expired.user_code, expired.verification_uri, None,
                               expires_at=time.time() - 1, interval=5)
    with pytest.raises(AccountAuthError, match="expired before"):
        await grants.poll_device(provider, client, over, sleep=wait_too_long)
    assert len(ts.grants) == polls
    with pytest.raises(AccountAuthError, match="invalid_client"):
        await grants.start_device(provider, OAuthClient(ts.client_id))     # no secret
    with pytest.raises(ValueError, match="no device authorization endpoint"):
        await grants.start_device(dataclasses.replace(provider, device_authorization_endpoint=None), client)


# -- JWT bearer (RFC 7523): Google domain-wide delegation ------------------------------------------
async def test_a_service_account_serves_three_mailboxes(ts: TokenServer, grants: GrantClient) -> None:
    key = ServiceAccountKey.from_json(json.dumps(ts.create_service_account(domains=("example.test",))),
                                      "sa.json")
    assert key.token_uri == ts.token_url
    mailboxes = ("a@example.test", "b@example.test", "c@example.test")
    tokens = {m: await grants.jwt_bearer(key, subject=m, scope="https://mail.google.com/") for m in mailboxes}
    assert len({t.access_token for t in tokens.values()}) == 3
    for mailbox, t in tokens.items():
        assert t.refresh_token is None and t.scope == "https://mail.google.com/"
        assert ts.token_allows(t.access_token, mailbox)
        assert not ts.token_allows(t.access_token, "z@example.test")
    form = ts.grants[-1]
    assert set(form) == {"grant_type", "assertion"} and form["grant_type"] == GRANT_JWT_BEARER
    assert jwt.get_unverified_header(form["assertion"])["kid"] == key.private_key_id
    claims = jwt.decode(form["assertion"], options={"verify_signature": False})
    assert (claims["iss"], claims["sub"], claims["aud"], claims["scope"]) == \
        (key.client_email, "c@example.test", ts.token_url, "https://mail.google.com/")
    assert claims["exp"] - claims["iat"] == 3600

    with pytest.raises(AccountAuthError, match="unauthorized_client") as info:
        await grants.jwt_bearer(key, subject="a@elsewhere.test", scope="https://mail.google.com/")
    assert key.client_email in str(info.value) and "a@elsewhere.test" in str(info.value)
    stranger = ServiceAccountKey.from_json(json.dumps(TokenServer().create_service_account()), "other.json")
    with pytest.raises(AccountAuthError, match="invalid_grant"):
        await grants.jwt_bearer(stranger, subject="a@example.test", scope="https://mail.google.com/",
                                token_uri=ts.token_url)


# -- client credentials: Microsoft app-only --------------------------------------------------------
async def test_client_credentials_with_a_secret_and_with_a_key(ts: TokenServer, grants: GrantClient,
                                                               provider: OAuthProvider) -> None:
    ts.register_client("app", "app-secret", mailboxes=("a@example.test",))
    ts.grant_mailboxes("app", "b@example.test")
    app = dataclasses.replace(provider, app_scope=APP_SCOPE)
    tokens = await grants.client_credentials(app, OAuthClient("app", client_secret="app-secret"))
    assert tokens.refresh_token is None and tokens.id_token is None and tokens.scope == APP_SCOPE
    assert ts.token_allows(tokens.access_token, "a@example.test")
    assert ts.token_allows(tokens.access_token, "b@example.test")
    assert not ts.token_allows(tokens.access_token, "c@example.test")
    assert ts.grants[-1]["grant_type"] == GRANT_CLIENT_CREDENTIALS

    key = ts.add_client_key("app")
    keyed = OAuthClient("app", private_key_pem=key.private_key_pem, key_id=key.key_id)
    tokens = await grants.client_credentials(app, keyed, scope=APP_SCOPE)
    assert ts.token_allows(tokens.access_token, "a@example.test")
    form = ts.grants[-1]
    assert form["client_assertion_type"] == CLIENT_ASSERTION_TYPE and "client_secret" not in form
    claims = jwt.decode(form["client_assertion"], options={"verify_signature": False})
    assert claims["iss"] == claims["sub"] == "app" and claims["aud"] == ts.token_url

    # Microsoft's certificate credential: thumbprints in the header (the server goes by kid)
    certified = dataclasses.replace(keyed, certificate_pem=certificate_for(key.private_key_pem))
    assert ts.token_allows((await grants.client_credentials(app, certified)).access_token, "b@example.test")
    header = jwt.get_unverified_header(ts.grants[-1]["client_assertion"])
    assert {"x5t", "x5t#S256", "kid"} <= set(header) and header["alg"] == "RS256"

    with pytest.raises(AccountAuthError, match="invalid_scope"):
        await grants.client_credentials(app, keyed, scope="IMAP.AccessAsUser.All")
    with pytest.raises(AccountAuthError, match="invalid_client"):
        await grants.client_credentials(app, OAuthClient("app", client_secret="nope"))
    stranger = ts.add_client_key(ts.client_id)             # a key of another client
    with pytest.raises(AccountAuthError, match="invalid_client"):
        await grants.client_credentials(app, OAuthClient("app", private_key_pem=stranger.private_key_pem,
                                                         key_id=stranger.key_id))
    with pytest.raises(ValueError, match="no app-only scope"):
        await grants.client_credentials(provider, keyed)
