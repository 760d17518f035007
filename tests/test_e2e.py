"""The broker's promises end to end under `gunicorn -w 4`, on SQLite and on PostgreSQL:
email and OAuth2 sign-in, recovery through a linked identity, refusals, shared limits."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import jwt
import redis
import requests

from agentkeys.crypto import derive_wallet, omni
from tests.broker import Broker, broker_env
from tests.live import free_port, gunicorn
from tests.oidc_provider import OIDCProvider
from tests.smtp import StartServer
from tests.vectors import VECTOR_MASTER

ALICE, BACKUP = "alice@example.com", "alice+backup@example.com"


def verify_with_jwks(base: str, token: str) -> dict[str, Any]:
    """pyjwt's own JWKS client fetches the published keys and checks the session."""
    key = jwt.PyJWKClient(base + "/v1/session-keys").get_signing_key_from_jwt(token)
    claims: dict[str, Any] = jwt.decode(
        token, key.key, algorithms=["ES256"], audience="agentkeys:broker", issuer=base
    )
    return claims


REDIS_TEST_URL = "redis://127.0.0.1:6379/15"  # a database of its own, emptied per run


def test_broker_under_four_workers(any_database_url: str, smtp_server: StartServer) -> None:
    """On PostgreSQL the limits live in Redis; on SQLite in the database."""
    mailbox = smtp_server()
    limits_in_redis = any_database_url.startswith("postgresql")
    if limits_in_redis:
        redis.Redis.from_url(REDIS_TEST_URL).flushdb()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with OIDCProvider(redirect_uris=(f"{base}/auth/oauth2/callback",)) as provider:
        env = broker_env(
            base,
            any_database_url,
            mailbox,
            AGENTKEYS_OAUTH2_TESTIDP_ISSUER=provider.issuer,
            AGENTKEYS_OAUTH2_TESTIDP_CLIENT_ID=provider.client_id,
            AGENTKEYS_OAUTH2_TESTIDP_CLIENT_SECRET=provider.client_secret or "",
            AGENTKEYS_RATE_LIMITS="verify_ip=40/86400",  # a day's window: none ends mid-test
            **({"AGENTKEYS_REDIS_URL": REDIS_TEST_URL} if limits_in_redis else {}),
        )
        with gunicorn(env, workers=4, port=port):
            broker = Broker(base, mailbox)
            alice, alice_link = broker.email_sign_in(ALICE)
            claims = verify_with_jwks(base, alice["session_jwt"])
            assert claims["account"] == alice["account"] == omni("email", ALICE)

            # A replayed magic link and a wrong token are refused.
            assert broker.post("/v1/auth/email/verify", {"token": alice_link}).status_code == 400
            assert broker.post("/v1/auth/email/verify", {"token": "z" * 43}).status_code == 400

            # OAuth2 against the provider on loopback.
            started = broker.post("/v1/auth/oauth2/start", {"provider": "testidp"}).json()
            to_callback = requests.get(
                started["authorization_url"], allow_redirects=False, timeout=10
            )
            page = requests.get(to_callback.headers["Location"], timeout=10)
            assert page.status_code == 200
            approval = page.text.split('id="approval-token" value="')[1].split('"')[0]
            assert broker.post("/v1/auth/oauth2/approve", {"approval_token": approval}).ok
            oauth = broker.get(started["poll_url"], started["poll_token"]).json()
            assert oauth["account"] == omni("oauth2_testidp", provider.sub)
            assert verify_with_jwks(base, oauth["session_jwt"])["identity_type"] == "oauth2_testidp"

            # Link a second email; signing in with it gives the same account and wallet.
            backup, _ = broker.email_sign_in(BACKUP)
            linked = broker.post(
                "/v1/identities/link", {"proof": backup["session_jwt"]}, alice["session_jwt"]
            )
            assert linked.status_code == 200, linked.text
            again, _ = broker.email_sign_in(BACKUP)
            assert again["account"] == alice["account"]
            wallet = derive_wallet(VECTOR_MASTER, alice["account"]).address
            for session in (alice, again):
                derived = broker.post(
                    "/dev/derive-address",
                    {"omni_account": alice["account"]},
                    session["session_jwt"],
                )
                assert derived.json() == {"address": wallet, "key_version": 1}
            # Another account's bearer is refused by the signer.
            other = broker.post(
                "/dev/derive-address", {"omni_account": alice["account"]}, oauth["session_jwt"]
            )
            assert other.status_code == 403 and other.json()["error"] == "forbidden"

            # The verify limit (40 a day per IP) holds across the 4 workers.
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                codes = list(
                    pool.map(
                        lambda _: (
                            broker.post("/v1/auth/email/verify", {"token": "y" * 43}).status_code
                        ),
                        range(60),
                    )
                )
            # Verifies so far: three magic links, the replay, the wrong token, the OAuth2 approval.
            used = 6
            assert codes.count(429) + codes.count(400) == 60
            assert codes.count(400) == 40 - used, codes
            if limits_in_redis:
                counters = redis.Redis.from_url(REDIS_TEST_URL).keys("agentkeys:limit:verify_ip:*")
                assert len(counters) == 1
