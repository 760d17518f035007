"""No 5xx for anything a client sends (PROTOCOL §4): every string field of every endpoint, the
path parameters and the bearer header, with lone surrogates and control characters, on SQLite
and on PostgreSQL."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agentkeys.crypto import normalize_address
from agentkeys.errors import AgentKeysError
from agentkeys.identity import canonical_email
from agentkeys.settings import DEFAULT_LIMITS, Limit
from tests.conftest import MakeApp, bearer_for
from tests.vectors import VECTOR_ADDRESS

PROBLEM_KEYS = {"type", "title", "status", "detail", "error"}
ALICE = "alice@example.com"
# Any code point at all, surrogates (Cs) and controls (Cc) included.
ANY_TEXT = st.text(st.characters(codec=None, categories=None), max_size=80)
LATIN1 = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=200)


@pytest.fixture
def database_url(any_database_url: str) -> str:
    return any_database_url


@pytest.fixture
def app(make_app: MakeApp) -> Flask:
    # Limits high enough that every example reaches the endpoint's own checks.
    return make_app(rate_limits={name: Limit(10**9, 60) for name in DEFAULT_LIMITS})


def assert_problem(response: Any, *, status: int | None = None) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.get_data())
    body = response.get_json()
    assert response.mimetype == "application/problem+json" and set(body) == PROBLEM_KEYS
    assert body["status"] == response.status_code
    if status is not None:
        assert response.status_code == status, body


def valid(check: Callable[[str], object], value: str) -> bool:
    try:
        check(value)
    except AgentKeysError:
        return False
    return True


def is_address(value: str) -> bool:
    return valid(normalize_address, value)


# (path, a body of valid-looking values, which bearer it needs, which values would succeed)
BODIES: list[tuple[str, dict[str, str], str | None, Callable[[str], bool] | None]] = [
    ("/v1/auth/email/request", {"email": ALICE}, None, lambda v: valid(canonical_email, v)),
    ("/v1/auth/email/verify", {"token": "t" * 43}, None, None),
    ("/v1/auth/oauth2/start", {"provider": "google"}, None, None),
    ("/v1/auth/oauth2/approve", {"approval_token": "t" * 43}, None, None),
    ("/v1/identities/link", {"proof": "a.b.c"}, "identity", None),
    (
        "/v1/wallet/link",
        {"identity_type": "evm", "identity_value": VECTOR_ADDRESS},
        "identity",
        lambda v: is_address(v) or v == "evm",
    ),
    ("/v1/auth/wallet/start", {"address": VECTOR_ADDRESS}, None, is_address),
    ("/v1/auth/wallet/start", {"address": VECTOR_ADDRESS}, "identity", is_address),
    ("/v1/auth/wallet/verify", {"request_id": "r" * 22, "signature": "0x" + "00" * 65}, None, None),
    ("/dev/derive-address", {"omni_account": "ab" * 32}, "identity", None),
    ("/dev/sign-message", {"omni_account": "ab" * 32, "message_hex": "00"}, "identity", None),
]
FIELDS = [
    pytest.param(path, body, field, bearer, skip, id=f"{path}:{field}:{bearer}")
    for path, body, bearer, skip in BODIES
    for field in body
]


@pytest.mark.parametrize(("path", "body", "field", "bearer", "skip"), FIELDS)
def test_any_string_in_any_body_field_is_a_4xx_problem(
    app: Flask,
    path: str,
    body: dict[str, str],
    field: str,
    bearer: str | None,
    skip: Callable[[str], bool] | None,
) -> None:
    headers = bearer_for(app, ALICE) if bearer else {}
    client = app.test_client()

    @settings(
        max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(value=ANY_TEXT)
    def check(value: str) -> None:
        if skip is not None:
            assume(not skip(value))  # a valid value may succeed: that is not the point here
        sent = json.dumps({**body, field: value})  # ensure_ascii: a surrogate goes as \ud800
        response = client.post(path, data=sent, content_type="application/json", headers=headers)
        assert_problem(response)

    check()


PATHS = [
    ("GET", "/v1/auth/email/status/{}"),
    ("GET", "/v1/auth/oauth2/status/{}"),
    ("DELETE", "/v1/identities/oauth2_google/{}"),
    ("DELETE", "/v1/identities/email/{}"),
    ("DELETE", "/v1/identities/evm/{}"),
    ("DELETE", "/v1/identities/{}/x"),
]


@pytest.mark.parametrize(("method", "template"), PATHS, ids=[p[1] for p in PATHS])
def test_any_path_parameter_is_a_4xx_problem(app: Flask, method: str, template: str) -> None:
    client = app.test_client()
    headers = bearer_for(app, ALICE)
    headers_of = {"GET": {"Authorization": "Bearer poll-token"}, "DELETE": headers}

    @settings(
        max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(value=st.binary(min_size=1, max_size=60).filter(lambda v: b"/" not in v))
    def check(value: bytes) -> None:
        # Any bytes but "/" (which would change the route, not the value), as percent-escapes.
        quoted = "".join(f"%{b:02X}" for b in value)
        response = client.open(template.format(quoted), method=method, headers=headers_of[method])
        assert_problem(response)

    check()


def test_any_oauth2_callback_query_is_a_4xx_page(app: Flask) -> None:
    client = app.test_client()

    @settings(
        max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(state=ANY_TEXT, code=ANY_TEXT, error=st.none() | ANY_TEXT)
    def check(state: str, code: str, error: str | None) -> None:
        query = {"state": state, "code": code} | ({} if error is None else {"error": error})
        encoded = {k: v.encode("utf-8", "surrogatepass") for k, v in query.items()}
        response = client.get("/auth/oauth2/callback", query_string=encoded)
        assert response.status_code == 400 and response.mimetype == "text/html"

    check()


BEARER_ENDPOINTS = [
    ("GET", "/v1/identities"),
    ("POST", "/v1/mint-oidc-jwt"),
    ("POST", "/v1/sessions/revoke"),
    ("GET", "/v1/auth/email/status/" + "r" * 22),
]


@pytest.mark.parametrize(("method", "path"), BEARER_ENDPOINTS, ids=[p[1] for p in BEARER_ENDPOINTS])
def test_any_bearer_header_is_a_4xx_problem(app: Flask, method: str, path: str) -> None:
    client = app.test_client()

    @settings(
        max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(token=LATIN1)
    def check(token: str) -> None:
        response = client.open(path, method=method, headers={"Authorization": f"Bearer {token}"})
        assert_problem(response)

    check()


# -- the cases the review found, by name ---------------------------------------------------------

SURROGATE_BODIES = [
    ("/v1/auth/email/verify", '{"token": "\\ud800"}'),
    ("/v1/auth/oauth2/approve", '{"approval_token": "\\ud800"}'),
    ("/v1/auth/wallet/verify", '{"request_id": "\\ud800", "signature": "0x00"}'),
    ("/v1/identities/link", '{"proof": "\\ud800"}'),
    ("/v1/identities/link", '{"proof": "eyJhbGciOiJFUzI1NiJ9.e30.\\udfff"}'),
]


@pytest.mark.parametrize(("path", "raw"), SURROGATE_BODIES)
def test_a_lone_surrogate_is_invalid_json(app: Flask, path: str, raw: str) -> None:
    assert "\\ud" in raw  # sent as the JSON escape, which parses to a lone surrogate
    response = app.test_client().post(
        path, data=raw, content_type="application/json", headers=bearer_for(app, ALICE)
    )
    assert_problem(response, status=400)
    assert response.get_json()["error"] == "invalid_json"


RAW_BODIES = {
    "a surrogate's UTF-8 bytes": b'{"token": "\xed\xa0\x80"}',
    "UTF-16": '{"token": "x"}'.encode("utf-16"),
    "UTF-16 with an escaped surrogate": '{"token": "\\ud800"}'.encode("utf-16-le"),
    "UTF-32": '{"token": "x"}'.encode("utf-32"),
    "Latin-1": '{"token": "caf\xe9"}'.encode("latin-1"),
}


@pytest.mark.parametrize("raw", RAW_BODIES.values(), ids=RAW_BODIES.keys())
def test_a_body_that_is_not_utf8_is_invalid_json(app: Flask, raw: bytes) -> None:
    response = app.test_client().post(
        "/v1/auth/email/verify", data=raw, content_type="application/json"
    )
    assert_problem(response, status=400)
    assert response.get_json()["error"] == "invalid_json"


def nested_header_token(depth: int) -> str:
    header = base64.urlsafe_b64encode(b"[" * depth + b"]" * depth).rstrip(b"=").decode()
    return f"{header}.e30.c2ln"


@pytest.mark.parametrize("depth", [200, 5_000, 100_000])
@pytest.mark.parametrize(("method", "path"), [*BEARER_ENDPOINTS[:3], ("POST", "/dev/sign-message")])
def test_a_deeply_nested_jwt_header_is_401(app: Flask, depth: int, method: str, path: str) -> None:
    client: FlaskClient = app.test_client()
    headers = {"Authorization": f"Bearer {nested_header_token(depth)}"}
    body = {"omni_account": "ab" * 32, "message_hex": "00"} if method == "POST" else None
    response = client.open(path, method=method, headers=headers, json=body)
    assert_problem(response, status=401)


def test_a_longest_valid_email_is_accepted(app: Flask) -> None:
    email = "a" * 64 + "@" + ".".join(["b" * 63, "c" * 63, "d" * 58]) + ".io"
    assert len(email) == 254 and canonical_email(email) == email
    response = app.test_client().post("/v1/auth/email/request", json={"email": email})
    assert response.status_code == 202, response.get_json()
