"""agentkeys.broker.oauth2 end to end against a real OIDC provider on loopback
(tests/oidc_provider.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
import requests

from agentkeys.broker.oauth2 import (
    MAX_RESPONSE_BYTES,
    OIDCClient,
    new_nonce,
    new_pkce,
    new_state,
    pkce_challenge,
)
from agentkeys.errors import OAuth2Error
from agentkeys.settings import OAuth2Provider, Secret
from tests.live import free_port
from tests.oidc_provider import DEFAULT_REDIRECT_URI, OIDCProvider

# RFC 7636 Appendix B: the verifier is BASE64URL of these 32 octets, the challenge of its SHA-256.
RFC7636_VERIFIER_OCTETS = bytes(
    [116, 24, 223, 180, 151, 153, 224, 37, 79, 250, 96, 125, 216, 173, 187, 186,
     22, 212, 37, 77, 105, 214, 191, 240, 91, 88, 5, 88, 83, 132, 141, 121]
)  # fmt: skip
RFC7636_VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
RFC7636_CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def provider() -> Iterator[OIDCProvider]:
    with OIDCProvider() as running:
        yield running


@pytest.fixture
def public_provider() -> Iterator[OIDCProvider]:
    with OIDCProvider(client_id="public-cli", client_secret=None) as running:
        yield running


def make_client(
    provider: OIDCProvider,
    *,
    secret: str | bool | None = True,
    clock: FakeClock | None = None,
    **kwargs: Any,
) -> OIDCClient:
    """A client configured for `provider`; secret=True uses the provider's own secret."""
    if secret is True:
        secret = provider.client_secret
    config = OAuth2Provider(
        name="test",
        issuer=provider.issuer,
        client_id=provider.client_id,
        client_secret=Secret(secret.encode()) if isinstance(secret, str) else None,
    )
    return OIDCClient(
        config, redirect_uri=DEFAULT_REDIRECT_URI, clock=clock or FakeClock(), **kwargs
    )


def authorize(client: OIDCClient, **pkce: str) -> tuple[str, str, str]:
    """Open the authorization URL as a browser would; return (code, verifier, nonce)."""
    verifier, challenge = new_pkce()
    state, nonce = new_state(), new_nonce()
    url = client.authorization_url(state=state, nonce=nonce, code_challenge=challenge)
    response = requests.get(url, allow_redirects=False, timeout=5)
    assert response.status_code == 302
    location = urlsplit(response.headers["Location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == DEFAULT_REDIRECT_URI
    query = parse_qs(location.query)
    assert query["state"] == [state]
    return query["code"][0], verifier, nonce


def sign_in(client: OIDCClient) -> tuple[str, str]:
    """authorize + exchange_code: (id_token, nonce)."""
    code, verifier, nonce = authorize(client)
    return client.exchange_code(code, verifier), nonce


@dataclass(frozen=True)
class Now:
    """A time relative to when the test runs (a table is built when the module is imported)."""

    offset: int


def resolve(provider: OIDCProvider, value: Any) -> Any:
    """Parametrize tables name the running provider's values as "ISSUER/" and "CLIENT"."""
    if isinstance(value, Now):
        return int(time.time()) + value.offset
    if isinstance(value, list):
        return [resolve(provider, item) for item in value]
    return {"ISSUER/": provider.issuer + "/", "CLIENT": provider.client_id}.get(value, value)


def raw_jws(header: dict[str, Any], claims: dict[str, Any], sign: Any = None) -> str:
    """A compact JWS built by hand, for tokens pyjwt refuses to make (alg none, HS256+PEM)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{b64(signature)}"


# -- PKCE, state, nonce ----------------------------------------------------------------------


def test_pkce_challenge_matches_rfc7636_appendix_b() -> None:
    assert base64.urlsafe_b64encode(RFC7636_VERIFIER_OCTETS).rstrip(b"=") == (
        RFC7636_VERIFIER.encode()
    )
    assert pkce_challenge(RFC7636_VERIFIER) == RFC7636_CHALLENGE


def test_new_pkce_pair_is_fresh_and_within_rfc7636() -> None:
    pairs = {new_pkce() for _ in range(20)}
    assert len(pairs) == 20
    for verifier, challenge in pairs:
        assert re.fullmatch(r"[A-Za-z0-9\-._~]{43,128}", verifier)
        expected = hashlib.sha256(verifier.encode()).digest()
        assert base64.urlsafe_b64decode(challenge + "=") == expected
        assert "=" not in challenge


@pytest.mark.parametrize("make", [new_state, new_nonce])
def test_state_and_nonce_are_urlsafe_with_128_bits_or_more(make: Any) -> None:
    values = {make() for _ in range(20)}
    assert len(values) == 20
    for value in values:
        assert re.fullmatch(r"[A-Za-z0-9_\-]+", value)
        assert len(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))) >= 16


@pytest.mark.parametrize("verifier", ["a" * 42, "a" * 129, "a" * 42 + "+", "a" * 42 + "="])
def test_pkce_challenge_refuses_verifiers_outside_rfc7636(verifier: str) -> None:
    with pytest.raises(ValueError, match="43 to 128"):
        pkce_challenge(verifier)


# -- the flow -------------------------------------------------------------------------------


def test_full_flow_confidential_client_uses_client_secret_basic(provider: OIDCProvider) -> None:
    client = make_client(provider)
    id_token, nonce = sign_in(client)
    claims = client.verify_id_token(id_token, nonce=nonce)
    assert claims["sub"] == provider.sub
    assert claims["email"] == provider.email
    assert claims["iss"] == provider.issuer
    assert provider.token_client_auth == ["basic"]


def test_full_flow_public_client_names_itself_in_the_body(public_provider: OIDCProvider) -> None:
    client = make_client(public_provider, secret=None)
    id_token, nonce = sign_in(client)
    assert client.verify_id_token(id_token, nonce=nonce)["sub"] == public_provider.sub
    assert public_provider.token_client_auth == ["none"]


def test_basic_auth_form_urlencodes_id_and_secret() -> None:
    # RFC 6749 §2.3.1: "a:b c" and "p@ss:w/rd+%" must survive the Basic header round trip.
    with OIDCProvider(client_id="a:b c", client_secret="p@ss:w/rd+%") as provider:
        client = make_client(provider)
        id_token, nonce = sign_in(client)
        assert client.verify_id_token(id_token, nonce=nonce)["sub"] == provider.sub
        assert provider.token_client_auth == ["basic"]


def test_authorization_url_carries_every_parameter_and_keeps_the_endpoint_query(
    provider: OIDCProvider,
) -> None:
    provider.authorization_endpoint_query = "tenant=acme&prompt=login"
    client = make_client(provider)
    url = client.authorization_url(state="st", nonce="nn", code_challenge=RFC7636_CHALLENGE)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{provider.issuer}/authorize"
    assert parse_qs(parts.query, strict_parsing=True) == {
        "tenant": ["acme"],
        "prompt": ["login"],
        "response_type": ["code"],
        "scope": ["openid email"],
        "client_id": [provider.client_id],
        "redirect_uri": [DEFAULT_REDIRECT_URI],
        "state": ["st"],
        "nonce": ["nn"],
        "code_challenge": [RFC7636_CHALLENGE],
        "code_challenge_method": ["S256"],
    }
    code, verifier, nonce = authorize(client)  # the provider accepts it as a whole
    assert client.verify_id_token(client.exchange_code(code, verifier), nonce=nonce)


def test_provider_denial_comes_back_with_error_and_state(provider: OIDCProvider) -> None:
    provider.deny = True
    client = make_client(provider)
    url = client.authorization_url(state="st-1", nonce="n", code_challenge=RFC7636_CHALLENGE)
    location = requests.get(url, allow_redirects=False, timeout=5).headers["Location"]
    query = parse_qs(urlsplit(location).query)
    assert query["error"] == ["access_denied"]
    assert query["state"] == ["st-1"]
    assert "code" not in query


# -- code exchange failures -----------------------------------------------------------------


def assert_hides(error: OAuth2Error, *values: str) -> None:
    for value in values:
        assert value not in error.detail
        assert value not in str(error)


def test_wrong_client_secret_is_refused_without_echoing_it(provider: OIDCProvider) -> None:
    client = make_client(provider, secret="not-the-secret")
    code, verifier, _ = authorize(client)
    with pytest.raises(OAuth2Error) as caught:
        client.exchange_code(code, verifier)
    assert caught.value.code == "oauth2_failed"
    assert caught.value.detail == "the provider's token endpoint refused: invalid_client"
    assert_hides(caught.value, "not-the-secret", code, verifier)


def test_public_client_without_secret_at_a_confidential_provider_is_refused(
    provider: OIDCProvider,
) -> None:
    client = make_client(provider, secret=None)
    code, verifier, _ = authorize(client)
    with pytest.raises(OAuth2Error, match="invalid_client"):
        client.exchange_code(code, verifier)


def test_replayed_code_is_refused(provider: OIDCProvider) -> None:
    client = make_client(provider)
    code, verifier, _ = authorize(client)
    client.exchange_code(code, verifier)
    with pytest.raises(OAuth2Error) as caught:
        client.exchange_code(code, verifier)
    assert caught.value.detail == "the provider's token endpoint refused: invalid_grant"
    assert_hides(caught.value, code, verifier)


def test_wrong_code_verifier_is_refused(provider: OIDCProvider) -> None:
    client = make_client(provider)
    code, _, _ = authorize(client)
    other_verifier, _ = new_pkce()
    with pytest.raises(OAuth2Error) as caught:
        client.exchange_code(code, other_verifier)
    assert caught.value.detail == (
        "the provider's token endpoint refused: invalid_grant (PKCE verification failed)"
    )
    assert_hides(caught.value, code, other_verifier, provider.client_secret or "")


def test_provider_echoing_the_code_and_verifier_is_redacted(provider: OIDCProvider) -> None:
    def echo(form: dict[str, str]) -> tuple[int, str]:
        description = f"bad code {form['code']} for verifier {form['code_verifier']}"
        return 400, json.dumps({"error": "invalid_grant", "error_description": description})

    provider.token_responder = echo
    client = make_client(provider)
    code, verifier, _ = authorize(client)
    with pytest.raises(OAuth2Error) as caught:
        client.exchange_code(code, verifier)
    assert caught.value.detail == (
        "the provider's token endpoint refused: invalid_grant "
        "(bad code [redacted] for verifier [redacted])"
    )


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (200, json.dumps({"access_token": "x", "token_type": "Bearer"}), "has no id_token"),
        (200, json.dumps({"id_token": ""}), "has no id_token"),
        (200, "<html>not json</html>", "did not answer with a JSON object"),
        (200, json.dumps(["id_token"]), "did not answer with a JSON object"),
        (502, "Bad Gateway", "answered HTTP 502"),
        (500, json.dumps({"id_token": "x"}), "answered HTTP 500"),
        (200, json.dumps({"error": "server_error"}), "refused: server_error"),
        (400, json.dumps({"error": "bad code\r\nX: y"}), "refused: error"),
        (200, " " * MAX_RESPONSE_BYTES + "{}", "answer is too large"),
    ],
)
def test_bad_token_responses_are_oauth2_errors(
    provider: OIDCProvider, status: int, body: str, reason: str
) -> None:
    provider.token_responder = lambda form: (status, body)
    client = make_client(provider)
    code, verifier, _ = authorize(client)
    with pytest.raises(OAuth2Error) as caught:
        client.exchange_code(code, verifier)
    assert reason in caught.value.detail
    assert_hides(caught.value, code, verifier, provider.client_secret or "")


def test_token_endpoint_timeout_is_an_oauth2_error(provider: OIDCProvider) -> None:
    client = make_client(provider, http_timeout=0.2)
    code, verifier, _ = authorize(client)
    provider.response_delay = 0.6
    started = time.monotonic()
    with pytest.raises(OAuth2Error, match="could not reach the provider's token endpoint"):
        client.exchange_code(code, verifier)
    assert time.monotonic() - started < 0.55


def test_unreachable_provider_is_an_oauth2_error() -> None:
    config = OAuth2Provider("gone", f"http://127.0.0.1:{free_port()}", "cid", None)
    client = OIDCClient(config, redirect_uri=DEFAULT_REDIRECT_URI)
    with pytest.raises(OAuth2Error, match="could not reach the provider's discovery"):
        client.discovery()


# -- id_token checks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"iss": "https://evil.example"}, "the id_token was issued by another issuer"),
        ({"iss": "ISSUER/"}, "the id_token was issued by another issuer"),
        ({"aud": "another-client"}, "the id_token is for another client (aud)"),
        ({"aud": ["another-client", "third"]}, "the id_token is for another client (aud)"),
        ({"exp": Now(-61)}, "the id_token has expired"),
        ({"iat": Now(600)}, "the id_token is issued in the future"),
        ({"nonce": "not-the-nonce"}, "the id_token nonce does not match this sign-in"),
        ({"nonce": 12345}, "the id_token nonce does not match this sign-in"),
        ({"nonce": None}, "the id_token lacks the nonce claim"),
        ({"sub": None}, "the id_token lacks the sub claim"),
        ({"sub": ""}, "the id_token sub is not a 1 to 255 character string"),
        ({"sub": "x" * 256}, "the id_token sub is not a 1 to 255 character string"),
        ({"sub": 42}, "the id_token sub is not a 1 to 255 character string"),
        ({"iss": None}, "the id_token lacks the iss claim"),
        ({"aud": None}, "the id_token lacks the aud claim"),
        ({"exp": None}, "the id_token lacks the exp claim"),
        ({"iat": None}, "the id_token lacks the iat claim"),
        ({"aud": ["CLIENT", "other"]}, "the id_token was issued to another party (azp)"),
        ({"aud": ["CLIENT", "other"], "azp": "other"}, "issued to another party (azp)"),
        ({"azp": "other"}, "the id_token was issued to another party (azp)"),
    ],
)
def test_id_token_check_fails_for_its_reason(
    provider: OIDCProvider, overrides: dict[str, Any], reason: str
) -> None:
    provider.id_token_overrides = {k: resolve(provider, v) for k, v in overrides.items()}
    client = make_client(provider)
    id_token, nonce = sign_in(client)
    with pytest.raises(OAuth2Error) as caught:
        client.verify_id_token(id_token, nonce=nonce)
    assert caught.value.code == "oauth2_failed"
    assert reason in caught.value.detail


@pytest.mark.parametrize(
    "overrides",
    [
        {"exp": Now(-30)},  # within the 60 s leeway
        {"aud": ["CLIENT", "other"], "azp": "CLIENT"},
        {"sub": "x" * 255},
    ],
)
def test_id_token_edge_cases_that_pass(provider: OIDCProvider, overrides: dict[str, Any]) -> None:
    provider.id_token_overrides = {k: resolve(provider, v) for k, v in overrides.items()}
    client = make_client(provider)
    id_token, nonce = sign_in(client)
    claims = client.verify_id_token(id_token, nonce=nonce)
    assert claims["sub"] == provider.id_token_overrides.get("sub", provider.sub)


def test_alg_none_is_refused(provider: OIDCProvider) -> None:
    client = make_client(provider)
    nonce = new_nonce()
    token = raw_jws({"alg": "none", "kid": provider.current_key.kid}, provider.claims(nonce=nonce))
    with pytest.raises(OAuth2Error, match="algorithm we do not accept"):
        client.verify_id_token(token, nonce=nonce)
    assert provider.jwks_fetches == 0  # refused before any key lookup


def test_hs256_signed_with_the_public_key_is_refused(provider: OIDCProvider) -> None:
    client = make_client(provider)
    nonce = new_nonce()
    pem = provider.current_key.public_pem
    token = raw_jws(
        {"alg": "HS256", "typ": "JWT", "kid": provider.current_key.kid},
        provider.claims(nonce=nonce),
        sign=lambda data: hmac.new(pem, data, hashlib.sha256).digest(),
    )
    with pytest.raises(OAuth2Error, match="algorithm we do not accept"):
        client.verify_id_token(token, nonce=nonce)


def test_allowed_alg_the_provider_does_not_advertise_is_refused(provider: OIDCProvider) -> None:
    client = make_client(provider)
    nonce = new_nonce()
    key = provider.current_key
    token = jwt.encode(
        provider.claims(nonce=nonce), key.private_key, algorithm="PS256", headers={"kid": key.kid}
    )
    with pytest.raises(OAuth2Error, match="algorithm we do not accept"):
        client.verify_id_token(token, nonce=nonce)


def test_alg_that_differs_from_the_jwk_alg_is_refused(provider: OIDCProvider) -> None:
    provider.discovery_overrides = {"id_token_signing_alg_values_supported": ["RS256", "RS384"]}
    client = make_client(provider)
    nonce = new_nonce()
    key = provider.current_key  # its JWK says alg RS256
    token = jwt.encode(
        provider.claims(nonce=nonce), key.private_key, algorithm="RS384", headers={"kid": key.kid}
    )
    with pytest.raises(OAuth2Error, match="algorithm does not match its key"):
        client.verify_id_token(token, nonce=nonce)


def test_signature_by_another_key_under_a_known_kid_is_refused(provider: OIDCProvider) -> None:
    client = make_client(provider)
    nonce = new_nonce()
    forged = jwt.encode(
        provider.claims(nonce=nonce),
        provider.unknown_key.private_key,
        algorithm="RS256",
        headers={"kid": provider.current_key.kid},
    )
    with pytest.raises(OAuth2Error, match="signature does not verify"):
        client.verify_id_token(forged, nonce=nonce)


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "eyJhbGciOiJSUzI1NiJ9.e30"])
def test_malformed_id_token_is_refused(provider: OIDCProvider, token: str) -> None:
    with pytest.raises(OAuth2Error, match="not a well-formed JWT"):
        make_client(provider).verify_id_token(token, nonce="n")


def test_id_token_without_kid_is_refused(provider: OIDCProvider) -> None:
    nonce = new_nonce()
    token = jwt.encode(
        provider.claims(nonce=nonce), provider.current_key.private_key, algorithm="RS256"
    )
    with pytest.raises(OAuth2Error, match="names no key"):
        make_client(provider).verify_id_token(token, nonce=nonce)


# -- JWKS cache -----------------------------------------------------------------------------


def test_jwks_is_fetched_once_for_known_keys(provider: OIDCProvider) -> None:
    client = make_client(provider)
    for _ in range(2):
        id_token, nonce = sign_in(client)
        client.verify_id_token(id_token, nonce=nonce)
    assert provider.jwks_fetches == 1
    assert provider.discovery_fetches == 1


def test_unknown_kid_refetches_at_most_once_per_interval(provider: OIDCProvider) -> None:
    clock = FakeClock()
    client = make_client(provider, clock=clock)
    id_token, nonce = sign_in(client)
    client.verify_id_token(id_token, nonce=nonce)
    assert provider.jwks_fetches == 1

    clock.now += 120  # long after the first fetch, the provider rotates its key
    provider.rotate_key()
    id_token, nonce = sign_in(client)  # signed with the new kid
    assert client.verify_id_token(id_token, nonce=nonce)["sub"] == provider.sub
    assert provider.jwks_fetches == 2  # exactly one refetch for the new kid

    clock.now += 30
    provider.sign_with_unknown_key = True
    id_token, nonce = sign_in(client)
    with pytest.raises(OAuth2Error, match="key the provider does not list"):
        client.verify_id_token(id_token, nonce=nonce)
    assert provider.jwks_fetches == 2  # within the minute: no refetch

    clock.now += 31  # 61 s after the last fetch
    with pytest.raises(OAuth2Error, match="key the provider does not list"):
        client.verify_id_token(id_token, nonce=nonce)
    assert provider.jwks_fetches == 3  # the interval passed: one more fetch, still unknown


def test_old_and_new_keys_verify_after_rotation(provider: OIDCProvider) -> None:
    client = make_client(provider)
    old_token, old_nonce = sign_in(client)
    provider.rotate_key()
    new_token, new_nonce = sign_in(client)
    assert client.verify_id_token(new_token, nonce=new_nonce)
    assert client.verify_id_token(old_token, nonce=old_nonce)
    assert provider.jwks_fetches == 1


def test_concurrent_first_use_fetches_discovery_and_jwks_once(provider: OIDCProvider) -> None:
    nonce = new_nonce()
    token = provider.mint_id_token(nonce=nonce)
    provider.response_delay = 0.05  # widen the window in which threads could race
    client = make_client(provider)
    barrier = threading.Barrier(8)
    subs: list[str] = []

    def verify() -> None:
        barrier.wait()
        subs.append(client.verify_id_token(token, nonce=nonce)["sub"])

    threads = [threading.Thread(target=verify) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)
    assert subs == [provider.sub] * 8
    assert provider.discovery_fetches == 1
    assert provider.jwks_fetches == 1


# -- discovery ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"issuer": "ISSUER/"}, "names a different issuer"),
        ({"issuer": "https://evil.example"}, "names a different issuer"),
        ({"issuer": None}, "names a different issuer"),
        ({"jwks_uri": None}, "lacks a valid jwks_uri"),
        ({"token_endpoint": None}, "lacks a valid token_endpoint"),
        ({"authorization_endpoint": None}, "lacks a valid authorization_endpoint"),
        ({"jwks_uri": "file:///etc/passwd"}, "lacks a valid jwks_uri"),
        ({"id_token_signing_alg_values_supported": ["HS256", "none"]}, "no algorithm we accept"),
    ],
)
def test_bad_discovery_is_refused(
    provider: OIDCProvider, overrides: dict[str, Any], reason: str
) -> None:
    provider.discovery_overrides = {k: resolve(provider, v) for k, v in overrides.items()}
    client = make_client(provider)
    with pytest.raises(OAuth2Error, match=re.escape(reason)):
        client.discovery()


def test_discovery_is_cached_once_it_succeeds(provider: OIDCProvider) -> None:
    provider.discovery_overrides = {"issuer": "https://evil.example"}
    client = make_client(provider)
    with pytest.raises(OAuth2Error):
        client.discovery()
    provider.discovery_overrides = {}
    first = client.discovery()
    assert client.discovery() is first
    assert provider.discovery_fetches == 2
    assert first.token_endpoint == f"{provider.issuer}/token"
    assert first.id_token_algorithms == ("RS256",)
