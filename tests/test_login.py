"""LoginRequests (PROTOCOL §6.1, §6.2): pending sign-ins on SQLite and on PostgreSQL."""

from __future__ import annotations

import hashlib
import re
from typing import Any, TypeVar

import pytest
from sqlalchemy import Engine, select

from agentkeys.broker.db import login_requests
from agentkeys.broker.login import (
    CONSUMED,
    FAILED,
    PENDING,
    REQUEST_TTL,
    VERIFIED,
    LoginRequests,
    OAuth2Pending,
    Status,
)
from agentkeys.broker.oauth2 import new_nonce, new_pkce, new_state
from agentkeys.errors import NotFound
from agentkeys.identity import EMAIL, Identity
from tests.conftest import T0, Clock, race

T = TypeVar("T")
ONBOARD = Identity(EMAIL, "onboard@example.com")
GOOGLE_USER = Identity("oauth2_google", "108234567890123456789")
USER_CODE = re.compile(r"[BCDFGHJKLMNPQRSTVWXZ2-9]{4}-[BCDFGHJKLMNPQRSTVWXZ2-9]{4}\Z")


@pytest.fixture
def logins(engine: Engine, clock: Clock) -> LoginRequests:
    return LoginRequests(engine, clock=clock)


def start_oauth2(logins: LoginRequests) -> tuple[str, str, str, Any]:
    """An OAuth2 request as /v1/auth/oauth2/start makes it: (state, nonce, verifier, Started)."""
    state, nonce, (verifier, _challenge) = new_state(), new_nonce(), new_pkce()
    return state, nonce, verifier, logins.start_oauth2("google", state, nonce, verifier)


def rows(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(login_requests))]


# --- email (§6.1) -------------------------------------------------------------------------


def test_start_email_is_pending_until_approved_once(logins: LoginRequests) -> None:
    started = logins.start_email(ONBOARD)

    assert USER_CODE.match(started.user_code)
    assert started.expires_at == T0 + REQUEST_TTL
    assert started.approve_token is not None
    assert len(started.approve_token) >= 43  # 256 bits, base64url
    assert len(started.poll_token) >= 22  # at least 128 bits
    assert logins.status(started.request_id, started.poll_token) == Status(PENDING)

    assert logins.approve("not-the-token") is None
    assert logins.status(started.request_id, started.poll_token) == Status(PENDING)
    assert logins.approve(started.poll_token) is None  # the poll token approves nothing

    assert logins.approve(started.approve_token) == started.user_code
    assert logins.approve(started.approve_token) is None  # replayed magic link

    # Verified carries the identity until one pickup (after the session is minted) consumes it.
    assert logins.status(started.request_id, started.poll_token) == Status(VERIFIED, ONBOARD)
    assert logins.status(started.request_id, started.poll_token) == Status(VERIFIED, ONBOARD)
    assert logins.pickup(started.request_id) is True
    assert logins.pickup(started.request_id) is False
    assert logins.status(started.request_id, started.poll_token) == Status(CONSUMED)
    assert logins.approve(started.approve_token) is None


def test_each_request_is_approved_only_by_its_own_token(logins: LoginRequests) -> None:
    first, second = logins.start_email(ONBOARD), logins.start_email(ONBOARD)
    assert first.request_id != second.request_id
    assert first.approve_token and second.approve_token

    assert logins.approve(second.approve_token) == second.user_code

    assert logins.status(first.request_id, first.poll_token) == Status(PENDING)
    assert logins.status(second.request_id, second.poll_token) == Status(VERIFIED, ONBOARD)


def test_status_needs_the_requests_own_poll_token(logins: LoginRequests) -> None:
    first, second = logins.start_email(ONBOARD), logins.start_email(ONBOARD)

    for request_id, poll_token in [
        (first.request_id, "wrong"),
        (first.request_id, ""),
        (first.request_id, second.poll_token),
        (first.request_id, first.poll_token + "x"),
        ("no-such-request", first.poll_token),
    ]:
        with pytest.raises(NotFound) as raised:
            logins.status(request_id, poll_token)
        assert raised.value.code == "unknown_request"  # §6.1: 404 unknown_request
    # A wrong guess does not disturb the real requester.
    assert logins.status(first.request_id, first.poll_token) == Status(PENDING)


def test_racing_approvals_verify_exactly_once(logins: LoginRequests) -> None:
    started = logins.start_email(ONBOARD)
    token = started.approve_token
    assert token is not None

    codes = race(16, lambda: logins.approve(token))

    assert [c for c in codes if c is not None] == [started.user_code]
    assert codes.count(None) == 15


def test_racing_polls_hand_the_verified_identity_out_once(logins: LoginRequests) -> None:
    started = logins.start_email(ONBOARD)
    assert started.approve_token is not None
    logins.approve(started.approve_token)

    pickups = race(8, lambda: logins.pickup(started.request_id))

    assert sorted(pickups) == [False] * 7 + [True]
    assert logins.status(started.request_id, started.poll_token) == Status(CONSUMED)


def test_requests_expire(logins: LoginRequests, clock: Clock) -> None:
    in_time, late = logins.start_email(ONBOARD), logins.start_email(ONBOARD)
    state, *_ = start_oauth2(logins)
    assert in_time.approve_token and late.approve_token

    clock.now = T0 + REQUEST_TTL - 1
    assert logins.approve(in_time.approve_token) == in_time.user_code

    clock.now = T0 + REQUEST_TTL
    expired = Status(FAILED, error="expired", reason="The sign-in request expired.")
    assert logins.status(late.request_id, late.poll_token) == expired
    assert logins.approve(late.approve_token) is None
    assert logins.take_state(state) is None
    assert logins.status(late.request_id, late.poll_token) == expired


def test_a_verified_request_is_picked_up_only_within_its_lifetime(
    logins: LoginRequests, clock: Clock
) -> None:
    started = logins.start_email(ONBOARD)
    assert started.approve_token is not None
    logins.approve(started.approve_token)
    assert logins.status(started.request_id, started.poll_token).status == VERIFIED

    clock.now = T0 + 3 * 86400  # a poll token found days later
    expired = Status(FAILED, error="expired", reason="The sign-in request expired.")
    assert logins.status(started.request_id, started.poll_token) == expired
    assert logins.pickup(started.request_id) is False


# --- OAuth2 (§6.2) ------------------------------------------------------------------------


def test_oauth2_state_is_taken_once_then_the_approval_token_verifies_once(
    logins: LoginRequests, engine: Engine
) -> None:
    state, nonce, verifier, started = start_oauth2(logins)
    assert started.approve_token is None  # none until the provider says who signed in
    assert logins.status(started.request_id, started.poll_token) == Status(PENDING)

    assert logins.take_state("wrong-state") is None
    pending = logins.take_state(state)
    assert pending == OAuth2Pending(
        started.request_id, "google", nonce, verifier, started.user_code
    )
    assert logins.take_state(state) is None  # a replayed callback

    approval = logins.identified(started.request_id, GOOGLE_USER)
    assert logins.status(started.request_id, started.poll_token) == Status(PENDING)
    (row,) = rows(engine)
    assert (row["nonce"], row["code_verifier"]) == (None, None)  # spent with the code

    assert logins.approve("wrong") is None
    assert logins.approve(approval) == started.user_code
    assert logins.approve(approval) is None
    assert logins.status(started.request_id, started.poll_token) == Status(VERIFIED, GOOGLE_USER)
    assert logins.pickup(started.request_id) is True
    assert logins.status(started.request_id, started.poll_token) == Status(CONSUMED)


def test_failed_requests_report_why_and_approve_nothing(logins: LoginRequests) -> None:
    state, _, _, oauth = start_oauth2(logins)
    email = logins.start_email(ONBOARD)
    assert email.approve_token is not None
    pending = logins.take_state(state)
    assert pending is not None
    approval = logins.identified(pending.request_id, GOOGLE_USER)

    logins.fail(oauth.request_id, "access_denied", "The user denied access.")
    logins.fail(email.request_id, "mail_failed", "x" * 600)

    assert logins.status(oauth.request_id, oauth.poll_token) == Status(
        FAILED, error="access_denied", reason="The user denied access."
    )
    assert logins.approve(approval) is None
    assert logins.status(email.request_id, email.poll_token) == Status(
        FAILED, error="mail_failed", reason="x" * 500
    )
    assert logins.approve(email.approve_token) is None
    # A failed request stays failed; failing a verified one changes nothing either.
    logins.fail(oauth.request_id, "other", "other")
    assert logins.status(oauth.request_id, oauth.poll_token).error == "access_denied"
    # A provider answer that arrives after the request failed verifies nothing either.
    late_state, _, _, late = start_oauth2(logins)
    assert logins.take_state(late_state) is not None
    logins.fail(late.request_id, "access_denied", "The user denied access.")
    assert logins.approve(logins.identified(late.request_id, GOOGLE_USER)) is None
    assert logins.status(late.request_id, late.poll_token).status == FAILED
    verified = logins.start_email(ONBOARD)
    assert verified.approve_token is not None
    logins.approve(verified.approve_token)
    logins.fail(verified.request_id, "late", "too late")
    assert logins.status(verified.request_id, verified.poll_token) == Status(VERIFIED, ONBOARD)


def test_only_hashes_of_the_bearer_secrets_are_stored(
    logins: LoginRequests, engine: Engine
) -> None:
    email = logins.start_email(ONBOARD)
    state, _, _, oauth = start_oauth2(logins)
    assert email.approve_token is not None
    secrets = [email.poll_token, email.approve_token, oauth.poll_token, state]
    stored = rows(engine)
    pending = logins.take_state(state)
    assert pending is not None
    approval = logins.identified(pending.request_id, GOOGLE_USER)
    secrets.append(approval)
    stored += rows(engine)

    def sha256(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()

    by_id = {r["request_id"]: r for r in stored}
    assert bytes(by_id[email.request_id]["poll_token_hash"]) == sha256(email.poll_token)
    assert bytes(by_id[email.request_id]["approve_token_hash"]) == sha256(email.approve_token)
    assert bytes(by_id[oauth.request_id]["poll_token_hash"]) == sha256(oauth.poll_token)
    assert {bytes(r["approve_token_hash"] or b"") for r in stored} >= {sha256(approval)}
    for row in stored:
        for column, value in row.items():
            text = bytes(value).hex() if isinstance(value, bytes | memoryview) else str(value)
            raw = bytes(value) if isinstance(value, bytes | memoryview) else b""
            for secret in secrets:
                assert secret not in text, column
                assert secret.encode() not in raw, column
