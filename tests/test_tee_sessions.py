"""The worker's session check against the broker's JWKS: refetched on an unknown kid at most
once a minute, a key that leaves the JWKS stops verifying, and no keys for too long fails closed."""

from __future__ import annotations

import json

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask

from agentkeys.errors import SessionKeysUnavailable, Unauthorized
from agentkeys.tee.sessions import MAX_STALE_SECONDS, REFRESH_SECONDS, JwksSessions
from tests.conftest import Clock, MakeApp, bearer_for_account, services_of
from tests.vectors import VECTOR_ANCHOR

ISSUER = "http://127.0.0.1:8000"


class Jwks:
    """The broker's published keys, as the worker fetches them; counts fetches."""

    def __init__(self, broker: Flask) -> None:
        self.client, self.fetches, self.down, self.drop = broker.test_client(), 0, False, False

    def __call__(self, url: str) -> bytes:
        self.fetches += 1
        if self.down:
            raise OSError("connection refused")
        document = self.client.get("/v1/session-keys").json
        assert document is not None
        if self.drop:
            document = {"keys": []}
        return json.dumps(document).encode()


@pytest.fixture
def broker(make_app: MakeApp, clock: Clock) -> Flask:
    app = make_app()
    services_of(app).sessions.clock = clock
    return app


def token_of(broker: Flask, anchor: str = VECTOR_ANCHOR) -> str:
    return bearer_for_account(broker, anchor)["Authorization"].split()[1]


def test_a_session_verifies_and_the_keys_are_fetched_once(broker: Flask, clock: Clock) -> None:
    jwks = Jwks(broker)
    sessions = JwksSessions(ISSUER + "/v1/session-keys", issuer=ISSUER, fetch=jwks, clock=clock)
    token = token_of(broker)
    for _ in range(5):
        assert sessions.verify(token).account == VECTOR_ANCHOR
    assert jwks.fetches == 1


def stranger_token(broker: Flask, kid: str) -> str:
    """The broker's claims under a kid it never published, signed by a key it never had."""
    claims = jwt.decode(token_of(broker), options={"verify_signature": False})
    key = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


def test_unknown_kids_refetch_at_most_once_a_minute(broker: Flask, clock: Clock) -> None:
    jwks = Jwks(broker)
    sessions = JwksSessions(ISSUER, issuer=ISSUER, fetch=jwks, clock=clock)
    sessions.verify(token_of(broker))
    assert jwks.fetches == 1
    for i in range(50):  # unknown kids cost an attacker nothing to make
        with pytest.raises(Unauthorized, match="unknown key"):
            sessions.verify(stranger_token(broker, f"kid-{i}"))
    assert jwks.fetches == 1
    clock.now += REFRESH_SECONDS
    with pytest.raises(Unauthorized, match="unknown key"):
        sessions.verify(stranger_token(broker, "kid-late"))
    assert jwks.fetches == 2


def test_a_key_published_later_is_fetched_on_its_first_token(broker: Flask, clock: Clock) -> None:
    jwks = Jwks(broker)
    jwks.drop = True  # the first fetch sees no keys yet, as before a rotation
    sessions = JwksSessions(ISSUER, issuer=ISSUER, fetch=jwks, clock=clock)
    token = token_of(broker)
    with pytest.raises(Unauthorized, match="unknown key"):
        sessions.verify(token)
    jwks.drop = False
    clock.now += REFRESH_SECONDS
    assert sessions.verify(token).account == VECTOR_ANCHOR
    assert jwks.fetches == 2


def test_a_key_that_leaves_the_jwks_stops_verifying(broker: Flask, clock: Clock) -> None:
    jwks = Jwks(broker)
    sessions = JwksSessions(ISSUER, issuer=ISSUER, fetch=jwks, clock=clock)
    token = token_of(broker)
    assert sessions.verify(token).account == VECTOR_ANCHOR
    jwks.drop = True  # the broker withdrew its key
    clock.now += REFRESH_SECONDS - 1
    assert sessions.verify(token).account == VECTOR_ANCHOR  # not refetched within the minute
    clock.now += 1
    with pytest.raises(Unauthorized, match="no longer valid"):
        sessions.verify(token)
    assert jwks.fetches == 2


def test_with_the_jwks_unreachable_too_long_no_session_verifies(
    broker: Flask, clock: Clock
) -> None:
    jwks = Jwks(broker)
    sessions = JwksSessions(ISSUER, issuer=ISSUER, fetch=jwks, clock=clock)
    token = token_of(broker)
    sessions.verify(token)
    jwks.down = True
    clock.now += MAX_STALE_SECONDS  # refetches fail; the last keys still serve meanwhile
    assert sessions.verify(token).account == VECTOR_ANCHOR
    clock.now += 1
    with pytest.raises(SessionKeysUnavailable):
        sessions.verify(token)
    jwks.down = False
    clock.now += REFRESH_SECONDS
    assert sessions.verify(token).account == VECTOR_ANCHOR  # back by itself


def test_never_fetched_is_unavailable_not_unauthorized(broker: Flask, clock: Clock) -> None:
    jwks = Jwks(broker)
    jwks.down = True
    sessions = JwksSessions(ISSUER, issuer=ISSUER, fetch=jwks, clock=clock)
    with pytest.raises(SessionKeysUnavailable):
        sessions.verify(token_of(broker))


@pytest.mark.parametrize(
    "document",
    [
        b"not json",
        b"[]",
        b'{"keys": {}}',
    ],
)
def test_a_bad_jwks_document_is_a_failed_fetch(
    broker: Flask, clock: Clock, document: bytes
) -> None:
    sessions = JwksSessions(ISSUER, issuer=ISSUER, fetch=lambda url: document, clock=clock)
    with pytest.raises(SessionKeysUnavailable):
        sessions.verify(token_of(broker))


def test_only_es256_keys_are_taken(broker: Flask, clock: Clock) -> None:
    published = broker.test_client().get("/v1/session-keys").json
    assert published is not None
    for item in published["keys"]:
        item["alg"] = "RS256"
    sessions = JwksSessions(
        ISSUER, issuer=ISSUER, fetch=lambda url: json.dumps(published).encode(), clock=clock
    )
    with pytest.raises(Unauthorized, match="unknown key"):
        sessions.verify(token_of(broker))
