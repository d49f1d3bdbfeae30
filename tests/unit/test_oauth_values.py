"""OAuth values without I/O: PKCE, signed tokens, providers, JWT assertions and ID-token checks, key files."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.accounts.grants import Identity, ServiceAccountKey
from gateway.oauth import jwt as oauth_jwt
from gateway.oauth import pkce
from gateway.oauth.jwt import IDTokenError
from gateway.oauth.providers import (
    MICROSOFT_TENANT_PLACEHOLDER,
    PRESETS,
    OAuthClient,
    OAuthProvider,
    authorization_url,
    from_discovery,
    google,
    microsoft,
)
from gateway.oauth.signed import BadSignature, Expired, InvalidToken, SignedTokens

KEY = bytes(range(32))
NOW = 1_700_000_000.0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pem(key: Any) -> str:
    return str(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()).decode())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# -- PKCE (RFC 7636) ----------------------------------------------------------------------
def test_pkce_matches_rfc7636_appendix_b() -> None:
    octets = bytes([116, 24, 223, 180, 151, 153, 224, 37, 79, 250, 96, 125, 216, 173, 187, 186, 22, 212,
                    37, 77, 105, 214, 191, 240, 91, 88, 5, 88, 83, 132, 141, 121])
    verifier = b64url(octets)
    assert verifier == "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert pkce.challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_new_verifiers_and_nonces_are_fresh_and_well_formed() -> None:
    verifiers = {pkce.new_verifier() for _ in range(50)}
    assert len(verifiers) == 50
    for v in verifiers:
        assert 43 <= len(v) <= 128 and set(v) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
        assert pkce.challenge(v) == b64url(hashlib.sha256(v.encode()).digest())
    assert len({pkce.new_nonce() for _ in range(50)}) == 50


@pytest.mark.parametrize("bad", ["", "a" * 42, "a" * 129, "a" * 42 + "+", "a" * 42 + "é", "a" * 42 + " "])
def test_challenge_refuses_a_verifier_outside_the_rfc(bad: str) -> None:
    with pytest.raises(ValueError, match="43 to 128"):
        pkce.challenge(bad)


# -- signed tokens ------------------------------------------------------------------------
def test_signed_token_round_trip_and_url_safety() -> None:
    tokens = SignedTokens(KEY)
    token = tokens.sign("state", {"link": "lk-1", "verifier": "v" * 86, "n": 7, "who": "rép"}, NOW + 600)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    assert tokens.verify("state", token, now=NOW) == {"link": "lk-1", "verifier": "v" * 86, "n": 7,
                                                      "who": "rép"}
    assert "KEY" not in repr(tokens) and repr(KEY) not in repr(tokens)


def test_signed_token_refuses_tampering_other_keys_and_other_purposes() -> None:
    tokens = SignedTokens(KEY)
    token = tokens.sign("state", {"link": "lk-1"}, NOW + 600)
    with pytest.raises(BadSignature):
        tokens.verify("link", token, now=NOW)              # a state is never a connect link
    with pytest.raises(BadSignature):
        SignedTokens(bytes(32)).verify("state", token, now=NOW)
    body, mac = token.split(".")
    forged_body = b64url(json.dumps({"d": {"link": "lk-2"}, "e": int(NOW + 600)}).encode())
    for bad in (f"{forged_body}.{mac}", f"{body}.{mac[:-1]}", f"{body}.{mac}A", f"{body}{mac}",
                f"{body}.{mac}.{mac}", f".{mac}", token + "=", token.upper()):
        with pytest.raises(BadSignature):
            tokens.verify("state", bad, now=NOW)
    # every other spelling of the MAC (its last character carries unused bits) is refused:
    # a token has exactly one string form
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for ch in alphabet:
        other = f"{body}.{mac[:-1]}{ch}"
        if other != token:
            with pytest.raises(BadSignature):
                tokens.verify("state", other, now=NOW)


def test_signed_token_expiry() -> None:
    tokens = SignedTokens(KEY)
    token = tokens.sign("link", {"id": "x"}, NOW + 60)
    assert tokens.verify("link", token, now=NOW + 59.9) == {"id": "x"}
    for late in (NOW + 60, NOW + 3600, float("nan")):
        with pytest.raises(Expired):
            tokens.verify("link", token, now=late)
    assert issubclass(Expired, ValueError) and issubclass(BadSignature, ValueError)


def test_signed_tokens_refuse_bad_keys_purposes_and_payloads() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SignedTokens(b"short")
    tokens = SignedTokens(KEY)
    for purpose in ("", "a\x00b"):
        with pytest.raises(ValueError, match="purpose"):
            tokens.sign(purpose, {}, NOW)
    for payload in ({"x": 1.5}, {"x": True}, {"x": None}, {"x": ["a"]}):
        with pytest.raises(ValueError, match="only strings and integers"):
            tokens.sign("p", payload, NOW)        # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        tokens.sign("p", {}, float("inf"))
    with pytest.raises(ValueError, match="too large"):
        tokens.sign("p", {"x": "y" * 10000}, NOW)


payloads = st.dictionaries(st.text(max_size=20), st.one_of(st.text(max_size=60), st.integers()), max_size=6)


@given(payload=payloads, purpose=st.text(min_size=1, max_size=20).filter(lambda p: "\x00" not in p),
       lifetime=st.floats(min_value=1, max_value=1e6))
def test_property_signed_round_trip(payload: dict[str, str | int], purpose: str, lifetime: float) -> None:
    tokens = SignedTokens(KEY)
    token = tokens.sign(purpose, payload, NOW + lifetime)
    assert tokens.verify(purpose, token, now=NOW) == payload
    with pytest.raises(Expired):
        tokens.verify(purpose, token, now=NOW + lifetime + 1)


@settings(max_examples=300)
@given(garbage=st.one_of(st.text(max_size=300), st.binary(max_size=200).map(b64url),
                         st.tuples(st.binary(max_size=100), st.binary(max_size=40)).map(
                             lambda t: f"{b64url(t[0])}.{b64url(t[1])}")))
def test_property_garbage_never_verifies_and_raises_only_bad_signature(garbage: str) -> None:
    with pytest.raises(BadSignature):
        SignedTokens(KEY).verify("state", garbage, now=NOW)


@given(cut=st.integers(min_value=0, max_value=200), flip=st.integers(min_value=0, max_value=255))
def test_property_an_altered_token_never_verifies(cut: int, flip: int) -> None:
    tokens = SignedTokens(KEY)
    token = tokens.sign("state", {"link": "lk-1", "v": "x" * 40}, NOW + 600)
    i = cut % len(token)
    replacement = chr(flip) if chr(flip) != token[i] else "?"
    altered = token[:i] + replacement + token[i + 1:]
    with pytest.raises(InvalidToken):
        tokens.verify("state", altered, now=NOW)


# -- providers ----------------------------------------------------------------------------
def test_google_preset() -> None:
    g = PRESETS["google"]()
    assert g == google() and g.name == "google"
    assert g.authorization_endpoint == "https://accounts.google.com/o/oauth2/v2/auth"
    assert g.token_endpoint == "https://oauth2.googleapis.com/token"
    assert g.device_authorization_endpoint == "https://oauth2.googleapis.com/device/code"
    assert g.jwks_uri == "https://www.googleapis.com/oauth2/v3/certs"
    assert g.userinfo_endpoint == "https://openidconnect.googleapis.com/v1/userinfo"
    assert g.revocation_endpoint == "https://oauth2.googleapis.com/revoke"
    assert g.issuer == "https://accounts.google.com"
    assert g.scope() == "https://mail.google.com/ openid email"
    assert dict(g.authorize_params) == {"access_type": "offline", "prompt": "consent"}


def test_microsoft_preset_and_its_tenant_issuers() -> None:
    m = PRESETS["microsoft"]()
    assert m.authorization_endpoint == "https://login.microsoftonline.com/common/oauth2/v2.0/authorize"
    assert m.token_endpoint == "https://login.microsoftonline.com/common/oauth2/v2.0/token"
    assert m.device_authorization_endpoint == "https://login.microsoftonline.com/common/oauth2/v2.0/devicecode"
    assert m.jwks_uri == "https://login.microsoftonline.com/common/discovery/v2.0/keys"
    assert m.userinfo_endpoint == "https://graph.microsoft.com/oidc/userinfo"
    assert m.revocation_endpoint is None
    assert m.issuer == f"https://login.microsoftonline.com/{MICROSOFT_TENANT_PLACEHOLDER}/v2.0"
    assert m.scopes == ("https://outlook.office.com/IMAP.AccessAsUser.All",
                        "https://outlook.office.com/SMTP.Send", "offline_access", "openid", "email")
    assert m.app_scope == "https://outlook.office365.com/.default"
    tid = "72F988BF-86F1-41AF-91AB-2D7CD011DB47"
    one = microsoft(tid)
    assert one.token_endpoint == f"https://login.microsoftonline.com/{tid}/oauth2/v2.0/token"
    assert one.issuer == f"https://login.microsoftonline.com/{tid.lower()}/v2.0"
    # a tenant named by its domain signs with its id: the issuer stays a template
    assert MICROSOFT_TENANT_PLACEHOLDER in (microsoft("contoso.onmicrosoft.com").issuer or "")
    for bad in ("", "a/b", "x?y=1", "../common"):
        with pytest.raises(ValueError, match="tenant"):
            microsoft(bad)


DISCOVERY = {"issuer": "https://idp.example", "token_endpoint": "https://idp.example/token",
             "authorization_endpoint": "https://idp.example/authorize", "jwks_uri": "https://idp.example/jwks",
             "device_authorization_endpoint": "https://idp.example/device",
             "userinfo_endpoint": "https://idp.example/userinfo", "response_types_supported": ["code"]}


def test_from_discovery() -> None:
    p = from_discovery("corp", DISCOVERY, ["openid", "email", "imap"])
    assert p == OAuthProvider(name="corp", token_endpoint="https://idp.example/token",
                              authorization_endpoint="https://idp.example/authorize",
                              device_authorization_endpoint="https://idp.example/device",
                              jwks_uri="https://idp.example/jwks",
                              userinfo_endpoint="https://idp.example/userinfo",
                              issuer="https://idp.example", scopes=("openid", "email", "imap"))
    assert p.revocation_endpoint is None and p.scope() == "openid email imap"
    for key in ("issuer", "token_endpoint"):
        with pytest.raises(ValueError, match=f"corp: the discovery document has no '{key}'"):
            from_discovery("corp", {k: v for k, v in DISCOVERY.items() if k != key}, ["openid"])
    for key, bad in (("jwks_uri", "ftp://idp.example/jwks"), ("token_endpoint", 42),
                     ("userinfo_endpoint", "/userinfo"), ("authorization_endpoint", "https://idp/#x")):
        with pytest.raises(ValueError, match=f"'{key}'"):
            from_discovery("corp", {**DISCOVERY, key: bad}, ["openid"])
    with pytest.raises(ValueError, match="issuer"):
        from_discovery("corp", {**DISCOVERY, "issuer": ""}, ["openid"])
    with pytest.raises(ValueError, match="list of scopes"):
        from_discovery("corp", DISCOVERY, "openid email")
    with pytest.raises(ValueError, match="JSON object"):
        from_discovery("corp", ["issuer"], ["openid"])     # type: ignore[arg-type]


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=30),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=3), max_leaves=8)


@given(doc=st.dictionaries(st.sampled_from([*DISCOVERY, "revocation_endpoint", "x"]),
                           json_values | st.sampled_from(list(DISCOVERY.values())), max_size=8))
def test_property_from_discovery_takes_a_provider_or_says_what_is_wrong(doc: dict[str, Any]) -> None:
    try:
        p = from_discovery("corp", doc, ["openid"])
    except ValueError as exc:
        assert "corp" in str(exc)
    else:
        assert p.token_endpoint == doc["token_endpoint"] and p.issuer == doc["issuer"]


def test_authorization_url() -> None:
    p = OAuthProvider(name="x", token_endpoint="https://idp/token",
                      authorization_endpoint="https://idp/authorize?tenant=a", scopes=("openid", "email"),
                      authorize_params=(("prompt", "consent"), ("state", "never-overrides")))
    url = authorization_url(p, "cid", redirect_uri="https://gw/cb", state="s t", code_challenge="ch",
                            nonce="n", login_hint="rep@example.test")
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "idp", "/authorize")
    assert parse_qsl(parts.query) == [
        ("tenant", "a"), ("response_type", "code"), ("client_id", "cid"), ("redirect_uri", "https://gw/cb"),
        ("scope", "openid email"), ("state", "s t"), ("code_challenge", "ch"),
        ("code_challenge_method", "S256"), ("nonce", "n"), ("login_hint", "rep@example.test"),
        ("prompt", "consent")]
    assert "login_hint" not in authorization_url(p, "cid", redirect_uri="r", state="s", code_challenge="c",
                                                 nonce="n")
    with pytest.raises(ValueError, match="no authorization endpoint"):
        authorization_url(OAuthProvider("y", "https://idp/token"), "cid", redirect_uri="r", state="s",
                          code_challenge="c", nonce="n")


def test_client_repr_hides_secrets() -> None:
    c = OAuthClient("cid", client_secret="very-secret")
    assert "very-secret" not in repr(c) and "cid" in repr(c)
    k = OAuthClient("cid", private_key_pem="-----BEGIN PRIVATE KEY-----abc")
    assert "abc" not in repr(k) and "private key" in repr(k)
    with pytest.raises(ValueError, match="client_id"):
        OAuthClient("")
    with pytest.raises(ValueError, match="private key"):
        OAuthClient("cid", certificate_pem="-----BEGIN CERTIFICATE-----")


# -- JWT assertions -----------------------------------------------------------------------
def self_signed(key: rsa.RSAPrivateKey) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailgw app")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(start).not_valid_after(start + datetime.timedelta(days=3650))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_client_assertion_with_a_certificate(rsa_key: rsa.RSAPrivateKey) -> None:
    cert = self_signed(rsa_key)
    client = OAuthClient("app-id", private_key_pem=pem(rsa_key), certificate_pem=cert)
    token = oauth_jwt.client_assertion(client, audience="https://idp/token", now=NOW)
    header = jwt.get_unverified_header(token)
    der = x509.load_pem_x509_certificate(cert.encode()).public_bytes(serialization.Encoding.DER)
    assert header["alg"] == "RS256" and "kid" not in header
    assert header["x5t#S256"] == b64url(hashlib.sha256(der).digest())
    assert header["x5t"] == b64url(hashlib.sha1(der).digest())
    claims = jwt.decode(token, rsa_key.public_key(), algorithms=["RS256"], audience="https://idp/token",
                        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False})
    assert claims["iss"] == claims["sub"] == "app-id"
    assert claims["iat"] == claims["nbf"] == int(NOW) and claims["exp"] == int(NOW) + 600
    other = oauth_jwt.client_assertion(client, audience="https://idp/token", now=NOW)
    assert jwt.decode(other, options={"verify_signature": False})["jti"] != claims["jti"]
    keyed = OAuthClient("app-id", private_key_pem=pem(rsa_key), key_id="ck-1")
    keyed_header = jwt.get_unverified_header(oauth_jwt.client_assertion(keyed, audience="a", now=NOW))
    assert keyed_header["kid"] == "ck-1"
    with pytest.raises(ValueError, match="no private key"):
        oauth_jwt.client_assertion(OAuthClient("app-id", client_secret="s"), audience="a", now=NOW)
    with pytest.raises(ValueError, match="cannot sign") as info:
        oauth_jwt.client_assertion(OAuthClient("app-id", private_key_pem="not a key"), audience="a", now=NOW)
    assert "not a key" not in str(info.value)
    with pytest.raises(ValueError, match="not a PEM certificate"):
        oauth_jwt.client_assertion(OAuthClient("app-id", private_key_pem=pem(rsa_key), certificate_pem="x"),
                                   audience="a", now=NOW)


def test_bearer_assertion(rsa_key: rsa.RSAPrivateKey) -> None:
    token = oauth_jwt.bearer_assertion(issuer="sa@p.iam.example", subject="a@example.test",
                                       audience="https://idp/token", scope="https://mail.google.com/",
                                       private_key_pem=pem(rsa_key), key_id="k1", now=NOW)
    assert jwt.get_unverified_header(token)["kid"] == "k1"
    claims = jwt.decode(token, rsa_key.public_key(), algorithms=["RS256"], audience="https://idp/token",
                        options={"verify_exp": False, "verify_iat": False})
    assert claims == {"iss": "sa@p.iam.example", "sub": "a@example.test", "aud": "https://idp/token",
                      "scope": "https://mail.google.com/", "iat": int(NOW), "exp": int(NOW) + 3600}


# -- ID tokens ----------------------------------------------------------------------------
ISSUER = "https://idp.example"


def jwk_of(key: Any, kid: str, alg: str = "RS256") -> dict[str, Any]:
    algo = jwt.algorithms.RSAAlgorithm if alg == "RS256" else jwt.algorithms.ECAlgorithm
    jwk: dict[str, Any] = algo.to_jwk(key.public_key(), as_dict=True)
    jwk.update({"kid": kid, "use": "sig", "alg": alg})
    return jwk


def id_token(key: Any, *, kid: str | None = "k1", alg: str = "RS256", **over: Any) -> str:
    claims: dict[str, Any] = {"iss": ISSUER, "sub": "1234", "aud": "cid", "iat": int(NOW),
                              "exp": int(NOW) + 3600, "nonce": "n-1", "email": "rep@example.test",
                              "email_verified": True, "name": "Rep"}
    claims.update(over)
    claims = {k: v for k, v in claims.items() if v is not None}
    return str(jwt.encode(claims, key, algorithm=alg, headers={"kid": kid} if kid else None))


def check(token: str, jwks: dict[str, Any], **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"issuer": ISSUER, "audience": "cid", "nonce": "n-1", "now": NOW}
    args.update(kw)
    return oauth_jwt.verify_id_token(token, jwks, **args)


def test_id_token_accepted_rs256_and_es256(rsa_key: rsa.RSAPrivateKey) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwks = {"keys": [jwk_of(rsa_key, "k1"), jwk_of(ec_key, "e1", "ES256")]}
    assert check(id_token(rsa_key), jwks)["email"] == "rep@example.test"
    assert check(id_token(ec_key, kid="e1", alg="ES256"), jwks)["sub"] == "1234"
    assert check(id_token(rsa_key, nonce=None), jwks, nonce=None)["sub"] == "1234"   # a refresh
    # no kid: the only key of the right type
    assert check(id_token(rsa_key, kid=None), jwks)["sub"] == "1234"
    assert check(id_token(rsa_key, aud=["cid", "api"], azp="cid"), jwks)["sub"] == "1234"
    # another spelling the provider uses (Google's bare host)
    assert check(id_token(rsa_key, iss="accounts.google.com"), jwks, issuer="https://accounts.google.com",
                 issuer_aliases=google().issuer_aliases)["sub"] == "1234"
    # within the leeway
    assert check(id_token(rsa_key, exp=int(NOW) - 30), jwks)["sub"] == "1234"


def test_id_token_refusals(rsa_key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey) -> None:
    jwks = {"keys": [jwk_of(rsa_key, "k1")]}
    public_pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    header = b64url(json.dumps({"alg": "none", "kid": "k1"}).encode())
    body = b64url(json.dumps({"iss": ISSUER, "sub": "1", "aud": "cid", "iat": NOW, "exp": NOW + 60}).encode())
    hs256 = jwt.api_jws.PyJWS(algorithms=["HS256"]).encode(
        json.dumps({"iss": ISSUER, "sub": "1", "aud": "cid", "iat": int(NOW), "exp": int(NOW) + 60,
                    "nonce": "n-1"}).encode(), hashlib.sha256(public_pem).digest(), algorithm="HS256",
        headers={"kid": "k1"})
    cases = [
        (f"{header}.{body}.", "'none'"),
        (hs256, "'HS256'"),                                   # the public key as an HMAC secret
        (id_token(other_key), "signature"),
        (id_token(rsa_key, kid="k9"), "does not publish"),
        (id_token(rsa_key, iss="https://evil.example"), "issued by"),
        (id_token(rsa_key, aud="someone-else"), "not meant for this client"),
        (id_token(rsa_key, aud=["cid", "api"]), "several audiences"),
        (id_token(rsa_key, aud=["cid", "api"], azp="api"), "several audiences"),
        (id_token(rsa_key, exp=int(NOW) - 61), "expired"),
        (id_token(rsa_key, iat=int(NOW) + 600), "future"),
        (id_token(rsa_key, nonce="n-2"), "nonce"),
        (id_token(rsa_key, nonce=None), "nonce"),
        (id_token(rsa_key, sub=None), "sub"),
        (id_token(rsa_key, exp="tomorrow"), "invalid|not times"),
        ("a.b", "not a signed JWT"),
        ("a.b.c", "not a signed JWT"),
        ("", "not a signed JWT"),
    ]
    for token, why in cases:
        with pytest.raises(IDTokenError, match=why):
            check(token, jwks)
    ec_jwks = {"keys": [{**jwk_of(rsa_key, "k1"), "alg": "ES256"}]}   # a key for another algorithm
    with pytest.raises(IDTokenError, match="does not publish"):
        check(id_token(rsa_key), ec_jwks)
    with pytest.raises(IDTokenError, match="does not publish"):
        check(id_token(rsa_key), {"keys": "nope"})


def test_microsoft_multi_tenant_issuer(rsa_key: rsa.RSAPrivateKey) -> None:
    jwks = {"keys": [jwk_of(rsa_key, "k1")]}
    template = microsoft().issuer or ""
    tid = "9188040d-6c67-4c5b-b112-36a304b66dad"
    good = id_token(rsa_key, iss=f"https://login.microsoftonline.com/{tid}/v2.0", tid=tid)
    assert check(good, jwks, issuer=template)["tid"] == tid
    for over, why in (({"tid": None}, "tenant"), ({"tid": "../evil"}, "tenant"),
                      ({"tid": "11111111-1111-1111-1111-111111111111"}, "issued by")):
        bad = id_token(rsa_key, iss=f"https://login.microsoftonline.com/{tid}/v2.0", **over)
        with pytest.raises(IDTokenError, match=why):
            check(bad, jwks, issuer=template)


@settings(max_examples=200)
@given(garbage=st.one_of(st.text(max_size=200), st.lists(st.binary(max_size=60).map(b64url), min_size=3,
                                                         max_size=3).map(".".join)))
def test_property_garbage_id_tokens_raise_only_id_token_error(garbage: str) -> None:
    with pytest.raises(IDTokenError):
        oauth_jwt.verify_id_token(garbage, {"keys": []}, issuer=ISSUER, audience="cid", nonce=None, now=NOW)


# -- identities ---------------------------------------------------------------------------
def test_identity_from_claims() -> None:
    assert Identity.from_claims({"sub": "1", "email": "a@x.test", "email_verified": True, "name": "A"}) == \
        Identity("a@x.test", True, "1", "A")
    assert Identity.from_claims({"sub": "1", "email": "a@x.test", "email_verified": "true"}).email_verified
    assert not Identity.from_claims({"sub": "1", "email": "a@x.test"}).email_verified
    # Microsoft: xms_edov vouches for the address; preferred_username is a fallback, unverified
    assert Identity.from_claims({"sub": "1", "email": "a@x.test", "xms_edov": True}).email_verified
    ms = Identity.from_claims({"sub": "1", "preferred_username": "a@x.test", "email_verified": True})
    assert (ms.email, ms.email_verified) == ("a@x.test", False)
    nobody = Identity.from_claims({"sub": "1", "preferred_username": "live.com#a"})
    assert nobody == Identity("", False, "1", "")


@given(claims=st.dictionaries(st.sampled_from(["sub", "email", "email_verified", "name", "xms_edov",
                                               "preferred_username"]), json_values))
def test_property_identity_from_any_claims(claims: dict[str, Any]) -> None:
    who = Identity.from_claims(claims)
    assert isinstance(who.email, str) and isinstance(who.name, str) and isinstance(who.subject, str)
    assert not who.email_verified or "@" in who.email


# -- service-account key files -------------------------------------------------------------
def key_file(key: rsa.RSAPrivateKey, **over: Any) -> str:
    doc: dict[str, Any] = {"type": "service_account", "project_id": "p", "private_key_id": "abc123",
                           "private_key": pem(key), "client_email": "sa@p.iam.gserviceaccount.com",
                           "client_id": "1", "token_uri": "https://oauth2.googleapis.com/token"}
    doc.update(over)
    return json.dumps({k: v for k, v in doc.items() if v is not None})


def test_service_account_key_from_json(rsa_key: rsa.RSAPrivateKey) -> None:
    key = ServiceAccountKey.from_json(key_file(rsa_key), "sa.json")
    assert (key.client_email, key.private_key_id, key.token_uri) == \
        ("sa@p.iam.gserviceaccount.com", "abc123", "https://oauth2.googleapis.com/token")
    assert "PRIVATE KEY" not in repr(key) and "sa@p" in repr(key)
    assert ServiceAccountKey.from_json(key_file(rsa_key, token_uri=None, private_key_id=None),
                                       "sa.json").token_uri == "https://oauth2.googleapis.com/token"


def test_service_account_key_errors_name_the_file_and_the_field(rsa_key: rsa.RSAPrivateKey) -> None:
    ec_pem = pem(ec.generate_private_key(ec.SECP256R1()))
    cases = [
        ("{", "not a JSON document"),
        ("[1]", "JSON object"),
        (key_file(rsa_key, type="authorized_user"), "'type' is 'authorized_user'"),
        (key_file(rsa_key, client_email=None), "no 'client_email'"),
        (key_file(rsa_key, client_email=""), "no 'client_email'"),
        (key_file(rsa_key, client_email="nobody"), "not an address"),
        (key_file(rsa_key, private_key=None), "no 'private_key'"),
        (key_file(rsa_key, private_key=7), "no 'private_key'"),
        (key_file(rsa_key, private_key="-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
         "not an unencrypted PEM private key"),
        (key_file(rsa_key, private_key=ec_pem), "not an RSA key"),
        (key_file(rsa_key, private_key_id=5), "'private_key_id'"),
        (key_file(rsa_key, token_uri="file:///etc/passwd"), "'token_uri'"),
    ]
    for text, why in cases:
        with pytest.raises(ValueError, match=why) as info:
            ServiceAccountKey.from_json(text, "/etc/mailgw/sa.json")
        assert str(info.value).startswith("/etc/mailgw/sa.json: ")
        assert "MII" not in str(info.value)                 # never a piece of the key


@given(text=st.one_of(st.text(max_size=200), json_values.map(json.dumps),
                      st.dictionaries(st.sampled_from(["type", "client_email", "private_key", "token_uri",
                                                       "private_key_id"]), json_values).map(json.dumps)))
def test_property_key_files_give_a_key_or_a_value_error(text: str) -> None:
    try:
        ServiceAccountKey.from_json(text, "sa.json")
    except ValueError as exc:
        assert str(exc).startswith("sa.json: ")

