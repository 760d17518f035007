"""Sign-in over HTTP (§6.1, §6.2): real SMTP for the magic link, a real OIDC provider on
loopback for OAuth2, sessions checked with the published JWKS."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from agentkeys.crypto import omni
from agentkeys.settings import OAuth2Provider, Secret
from tests.conftest import MakeApp, services_of
from tests.oidc_provider import OIDCProvider
from tests.smtp import Server, StartServer, magic_link_token

EMAIL = "Onboard@Example.com "
CANONICAL = "onboard@example.com"


@pytest.fixture
def mailbox(smtp_server: StartServer) -> Server:
    return smtp_server()


@pytest.fixture
def app(make_app: MakeApp, mailbox: Server) -> Flask:
    return make_app(mail_url=f"smtp://127.0.0.1:{mailbox.port}")


def request_email(client: FlaskClient, email: str = EMAIL) -> dict[str, Any]:
    response = client.post("/v1/auth/email/request", json={"email": email})
    assert response.status_code == 202, response.json
    body: dict[str, Any] = response.get_json()
    return body


def poll(client: FlaskClient, started: dict[str, Any], token: str | None = None) -> Any:
    auth = {"Authorization": f"Bearer {token or started['poll_token']}"}
    return client.get(started["poll_url"], headers=auth)


def verify_session(app: Flask, token: str) -> dict[str, Any]:
    """Check a session the way a separate signer would: only the published JWKS."""
    jwks = app.test_client().get("/v1/session-keys").json
    assert jwks is not None
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWKSet.from_dict(jwks)[kid].key
    claims: dict[str, Any] = jwt.decode(
        token,
        key,
        algorithms=["ES256"],
        audience="agentkeys:broker",
        issuer="http://127.0.0.1:8000",
    )
    return claims


def test_email_sign_in(app: Flask, mailbox: Server) -> None:
    client = app.test_client()
    started = request_email(client)
    assert set(started) == {
        "request_id",
        "poll_token",
        "poll_url",
        "user_code",
        "expires_in_seconds",
    }
    assert started["poll_url"] == f"/v1/auth/email/status/{started['request_id']}"
    # The time left when the answer is made: the mail is sent in between, so a second may pass.
    assert started["expires_in_seconds"] in (599, 600)
    assert poll(client, started).json == {"status": "pending"}

    message = mailbox.recorder.message()
    assert message["To"] == CANONICAL
    assert started["user_code"] in message.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    token = magic_link_token(message)
    verified = client.post("/v1/auth/email/verify", json={"token": token})
    assert verified.json == {"ok": True, "user_code": started["user_code"]}

    status = poll(client, started).json
    assert status["status"] == "verified"
    assert set(status) == {
        "status",
        "session_jwt",
        "expires_at",
        "account",
        "omni_account",
        "identity_type",
    }
    assert status["account"] == status["omni_account"] == omni("email", CANONICAL)
    assert status["identity_type"] == "email" and status["expires_at"].endswith("Z")
    claims = verify_session(app, status["session_jwt"])
    assert claims["account"] == omni("email", CANONICAL) and claims["kind"] == "identity"
    assert claims["sub"] == f"agentkeys:account:{claims['account']}"

    # Handed out once; the link works once.
    assert poll(client, started).json == {"status": "consumed"}
    replay = client.post("/v1/auth/email/verify", json={"token": token})
    assert replay.status_code == 400
    assert replay.json is not None and replay.json["error"] == "invalid_token"


def test_email_verify_refusals(app: Flask) -> None:
    client = app.test_client()
    started = request_email(client)
    wrong = client.post("/v1/auth/email/verify", json={"token": "x" * 43})
    assert wrong.json == {
        "type": "urn:agentkeys:problem:invalid_token",
        "title": "Bad Request",
        "status": 400,
        "detail": "This sign-in link is invalid, expired or already used.",
        "error": "invalid_token",
    }
    assert client.get("/v1/auth/email/verify").status_code == 405
    unknown = poll(client, started, token="not-the-poll-token")
    assert unknown.status_code == 404 and unknown.json is not None
    assert unknown.json["error"] == "unknown_request"
    assert client.get(started["poll_url"]).status_code == 401
    assert (
        client.get("/v1/auth/email/status/nope", headers={"Authorization": "Bearer x"}).status_code
        == 404
    )


def test_expired_magic_link(app: Flask, mailbox: Server) -> None:
    client = app.test_client()
    started = request_email(client)
    svc = services_of(app)
    svc.logins.clock = lambda: int(__import__("time").time()) + 601
    token = magic_link_token(mailbox.recorder.message())
    assert client.post("/v1/auth/email/verify", json={"token": token}).status_code == 400
    status = poll(client, started).json
    assert status == {
        "status": "failed",
        "error": "expired",
        "reason": "The sign-in request expired.",
    }


@pytest.mark.parametrize(
    "email",
    [
        "no-at-sign",
        "a@b",
        "a b@example.com",
        "a@exa mple.com",
        "é@example.com",
        "a\r\n@example.com",
        "x" * 250 + "@example.com",
    ],
)
def test_invalid_email(app: Flask, email: str) -> None:
    response = app.test_client().post("/v1/auth/email/request", json={"email": email})
    assert response.status_code == 400 and response.json is not None
    assert response.json["error"] == "invalid_email"


def test_mail_failure_is_503_and_fails_the_request(make_app: MakeApp) -> None:
    from tests.live import free_port

    client = make_app(mail_url=f"smtp://127.0.0.1:{free_port()}").test_client()
    response = client.post("/v1/auth/email/request", json={"email": CANONICAL})
    assert response.status_code == 503 and response.json is not None
    assert response.json["error"] == "mail_failed"


def test_landing_page_headers(app: Flask) -> None:
    response = app.test_client().get("/auth/email/landing")
    assert response.status_code == 200 and response.mimetype == "text/html"
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'nonce-" in csp and "unsafe" not in csp
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    page = response.get_data(as_text=True)
    nonce = csp.split("'nonce-")[1].split("'")[0]
    assert f'<script nonce="{nonce}">' in page and ">Approve</button>" in page


def test_email_rate_limits(make_app: MakeApp, mailbox: Server) -> None:
    from agentkeys.settings import Limit

    limits = {
        "email_address": Limit(2, 900),
        "email_ip": Limit(3, 60),
        "start_ip": Limit(60, 60),
        "verify_ip": Limit(2, 60),
    }
    app = make_app(mail_url=f"smtp://127.0.0.1:{mailbox.port}", rate_limits=limits)
    services_of(app).limiter.clock = lambda: 1_700_000_010  # 30 s before a minute's window ends
    client = app.test_client()
    assert [
        client.post("/v1/auth/email/request", json={"email": "a@example.com"}).status_code
        for _ in range(3)
    ] == [202, 202, 429]
    limited = client.post("/v1/auth/email/request", json={"email": "b@example.com"})
    assert limited.status_code == 429  # the per-IP limit (3 per minute) is spent too
    assert limited.headers["Retry-After"] == "30"
    assert limited.json is not None and limited.json["error"] == "rate_limited"
    codes = [
        client.post("/v1/auth/email/verify", json={"token": "x"}).status_code for _ in range(3)
    ]
    assert codes == [400, 400, 429]


def test_the_mail_limit_counts_one_mailbox_once(make_app: MakeApp, mailbox: Server) -> None:
    from agentkeys.settings import Limit

    limits = {"email_address": Limit(2, 900), "email_ip": Limit(60, 60)}
    app = make_app(mail_url=f"smtp://127.0.0.1:{mailbox.port}", rate_limits=limits)
    client = app.test_client()
    codes = [
        client.post("/v1/auth/email/request", json={"email": email}).status_code
        for email in ("me@example.com", "me+1@example.com", "ME+2@example.com", "you@example.com")
    ]
    assert codes == [202, 202, 429, 202]
    # The address itself is unchanged: the mail goes to the subaddress it was asked for.
    assert mailbox.recorder.envelopes[1].rcpt_tos == ["me+1@example.com"]


def test_gone_endpoints(app: Flask) -> None:
    client = app.test_client()
    for path in ("/v1/auth/exchange", "/session/validate", "/session/create"):
        assert client.post(path, json={}).status_code == 404
        assert client.get(path).status_code == 404


# --- OAuth2 ----------------------------------------------------------------------------------


@pytest.fixture
def provider() -> Iterator[OIDCProvider]:
    with OIDCProvider() as running:
        yield running


@pytest.fixture
def oauth_app(make_app: MakeApp, provider: OIDCProvider) -> Flask:
    configured = OAuth2Provider(
        name="test",
        issuer=provider.issuer,
        client_id=provider.client_id,
        client_secret=Secret((provider.client_secret or "").encode()),
    )
    return make_app(oauth2_providers=(configured,))


def start_oauth2(client: FlaskClient) -> dict[str, Any]:
    response = client.post("/v1/auth/oauth2/start", json={"provider": "test"})
    assert response.status_code == 200, response.json
    body: dict[str, Any] = response.get_json()
    return body


def provider_redirect(started: dict[str, Any]) -> str:
    """What the browser does at the provider: follow /authorize to our callback URL."""
    response = requests.get(started["authorization_url"], allow_redirects=False, timeout=5)
    assert response.status_code == 302
    location = response.headers["Location"]
    assert location.startswith("http://127.0.0.1:8000/auth/oauth2/callback?")
    return location.removeprefix("http://127.0.0.1:8000")


def test_oauth2_sign_in(oauth_app: Flask, provider: OIDCProvider) -> None:
    client = oauth_app.test_client()
    started = start_oauth2(client)
    query = parse_qs(urlsplit(started["authorization_url"]).query)
    assert query["code_challenge_method"] == ["S256"] and query["response_type"] == ["code"]
    assert query["redirect_uri"] == ["http://127.0.0.1:8000/auth/oauth2/callback"]
    assert started["poll_url"] == f"/v1/auth/oauth2/status/{started['request_id']}"

    callback = provider_redirect(started)
    page = client.get(callback)
    assert page.status_code == 200 and page.headers["Cache-Control"] == "no-store"
    html = page.get_data(as_text=True)
    assert started["user_code"] in html
    approval = html.split('name="approval_token" id="approval-token" value="')[1].split('"')[0]
    assert poll(client, started).json == {"status": "pending"}  # nothing until Approve

    # The callback's state is single use: a replay shows an error page and changes nothing.
    assert client.get(callback).status_code == 400

    approved = client.post("/v1/auth/oauth2/approve", json={"approval_token": approval})
    assert approved.json == {"ok": True, "user_code": started["user_code"]}
    status = poll(client, started).json
    assert status["status"] == "verified"
    assert status["account"] == omni("oauth2_test", provider.sub)
    assert status["identity_type"] == "oauth2_test"
    assert verify_session(oauth_app, status["session_jwt"])["omni_account"] == status["account"]
    again = client.post("/v1/auth/oauth2/approve", json={"approval_token": approval})
    assert again.status_code == 400


def test_oauth2_provider_error_fails_request(oauth_app: Flask, provider: OIDCProvider) -> None:
    provider.deny = True
    client = oauth_app.test_client()
    started = start_oauth2(client)
    page = client.get(provider_redirect(started))
    assert page.status_code == 400 and "access_denied" in page.get_data(as_text=True)
    status = poll(client, started).json
    assert status["status"] == "failed" and status["error"] == "provider_error"
    assert "access_denied" in status["reason"]


def test_oauth2_bad_id_token_fails_request(oauth_app: Flask, provider: OIDCProvider) -> None:
    provider.id_token_overrides = {"aud": "someone-else"}
    client = oauth_app.test_client()
    started = start_oauth2(client)
    assert client.get(provider_redirect(started)).status_code == 502
    status = poll(client, started).json
    assert status["status"] == "failed" and status["error"] == "oauth2_failed"


def test_oauth2_unknown_provider_and_bad_state(oauth_app: Flask) -> None:
    client = oauth_app.test_client()
    response = client.post("/v1/auth/oauth2/start", json={"provider": "nope"})
    assert response.status_code == 400 and response.json is not None
    assert response.json["error"] == "unknown_provider"
    page = client.get("/auth/oauth2/callback?code=x&state=forged")
    assert page.status_code == 400 and page.headers["Content-Security-Policy"].startswith(
        "default-src"
    )


def test_client_ip_from_forwarded_for_only_behind_trusted_proxies(make_app: MakeApp) -> None:
    from agentkeys.settings import DEFAULT_LIMITS, Limit

    limits = {**DEFAULT_LIMITS, "verify_ip": Limit(1, 60)}

    def codes(client: FlaskClient, forwarded: list[str]) -> list[int]:
        return [
            client.post(
                "/v1/auth/email/verify", json={"token": "x"}, headers={"X-Forwarded-For": ip}
            ).status_code
            for ip in forwarded
        ]

    # No trusted proxy: X-Forwarded-For is the client's own words and changes nothing.
    def fixed_clock(app: Flask) -> Flask:
        services_of(app).limiter.clock = lambda: 1_700_000_010  # no window ends mid-test
        return app

    direct = fixed_clock(make_app(rate_limits=limits)).test_client()
    assert codes(direct, ["198.51.100.1", "198.51.100.2"]) == [400, 429]
    # One trusted proxy: its X-Forwarded-For names the client, so each address has its own limit.
    proxied = fixed_clock(make_app(rate_limits=limits, trusted_proxies=1)).test_client()
    assert codes(proxied, ["198.51.100.3", "198.51.100.4", "198.51.100.3"]) == [400, 400, 429]
    # A client-made entry before the proxy's own does not help: only the last hop counts.
    assert codes(proxied, ["203.0.113.9, 198.51.100.4"]) == [429]


def test_a_failure_while_minting_loses_nothing(app: Flask, mailbox: Server) -> None:
    client = app.test_client()
    started = request_email(client)
    token = magic_link_token(mailbox.recorder.message())
    assert client.post("/v1/auth/email/verify", json={"token": token}).status_code == 200
    sessions = services_of(app).sessions
    real_mint = sessions.mint

    def broken_mint(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("signing failed")

    sessions.mint = broken_mint  # type: ignore[method-assign]
    assert poll(client, started).status_code == 500
    sessions.mint = real_mint  # type: ignore[method-assign]
    retry = poll(client, started).json
    assert retry["status"] == "verified" and retry["session_jwt"]
    assert poll(client, started).json == {"status": "consumed"}
