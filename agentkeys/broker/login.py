"""Pending sign-ins (§6.1, §6.2): a requester polls with a secret poll token while the person
approves elsewhere (magic link, or the page after the provider's redirect).

Tokens are random, only their SHA-256 is stored, and every single-use step is one atomic
UPDATE … WHERE status = 'pending' … RETURNING, so exactly one of several racing workers wins.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, insert, select, update

from agentkeys.broker.db import login_requests, read_only
from agentkeys.errors import UnknownRequest
from agentkeys.identity import Identity
from agentkeys.timefmt import now_seconds

REQUEST_TTL = 600
PENDING, VERIFIED, CONSUMED, FAILED = "pending", "verified", "consumed", "failed"
_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ23456789"  # no vowels (no words), no 0/O or 1/I
# The ids this service issues are token_urlsafe(16): anything else is unknown without a query
# (and no NUL or other odd character a client sends ever reaches the database driver).
REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{16,64}\Z")


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_user_code() -> str:
    code = "".join(secrets.choice(_CODE_ALPHABET) for _ in range(8))
    return f"{code[:4]}-{code[4:]}"


@dataclass(frozen=True)
class Started:
    request_id: str
    poll_token: str
    user_code: str
    expires_at: int
    approve_token: str | None  # the magic-link token (email); None until the callback (OAuth2)


@dataclass(frozen=True)
class Status:
    status: str
    identity: Identity | None = None
    error: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class OAuth2Pending:
    request_id: str
    provider: str
    nonce: str
    code_verifier: str
    user_code: str


class LoginRequests:
    def __init__(self, engine: Engine, clock: Callable[[], int] = now_seconds) -> None:
        self.engine, self.clock = engine, clock

    def start_email(self, email: Identity) -> Started:
        approve_token = secrets.token_urlsafe(32)  # 256 bits, in the mail only
        return self._start(
            kind="email",
            identity_type=email.type,
            identity_value=email.value,
            approve_token_hash=token_hash(approve_token),
            approve_token=approve_token,
        )

    def start_oauth2(self, provider: str, state: str, nonce: str, code_verifier: str) -> Started:
        return self._start(
            kind="oauth2",
            provider=provider,
            state_hash=token_hash(state),
            nonce=nonce,
            code_verifier=code_verifier,
        )

    def _start(self, *, approve_token: str | None = None, **values: object) -> Started:
        now = self.clock()
        request_id, poll_token = secrets.token_urlsafe(16), secrets.token_urlsafe(32)
        user_code = new_user_code()
        with self.engine.begin() as conn:
            conn.execute(
                insert(login_requests).values(
                    request_id=request_id,
                    poll_token_hash=token_hash(poll_token),
                    user_code=user_code,
                    status=PENDING,
                    created_at=now,
                    expires_at=now + REQUEST_TTL,
                    **values,
                )
            )
        return Started(request_id, poll_token, user_code, now + REQUEST_TTL, approve_token)

    def approve(self, approve_token: str) -> str | None:
        """Verify the request holding this token once; its user code, or None."""
        with self.engine.begin() as conn:
            row = conn.execute(
                update(login_requests)
                .where(
                    login_requests.c.approve_token_hash == token_hash(approve_token),
                    login_requests.c.status == PENDING,
                    login_requests.c.identity_value.is_not(None),
                    login_requests.c.expires_at > self.clock(),
                )
                .values(status=VERIFIED, approve_token_hash=None)
                .returning(login_requests.c.user_code)
            ).first()
        return None if row is None else str(row.user_code)

    def take_state(self, state: str) -> OAuth2Pending | None:
        """The pending OAuth2 request of a callback's state, spending the state (single use)."""
        with self.engine.begin() as conn:
            row = conn.execute(
                update(login_requests)
                .where(
                    login_requests.c.state_hash == token_hash(state),
                    login_requests.c.status == PENDING,
                    login_requests.c.expires_at > self.clock(),
                )
                .values(state_hash=None)
                .returning(
                    login_requests.c.request_id,
                    login_requests.c.provider,
                    login_requests.c.nonce,
                    login_requests.c.code_verifier,
                    login_requests.c.user_code,
                )
            ).first()
        if row is None:
            return None
        return OAuth2Pending(
            row.request_id, row.provider, row.nonce, row.code_verifier, row.user_code
        )

    def identified(self, request_id: str, identity: Identity) -> str:
        """Record who the provider says signed in; returns the one-time approval token."""
        approve_token = secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            conn.execute(
                update(login_requests)
                .where(login_requests.c.request_id == request_id)
                .values(
                    identity_type=identity.type,
                    identity_value=identity.value,
                    approve_token_hash=token_hash(approve_token),
                    nonce=None,
                    code_verifier=None,
                )
            )
        return approve_token

    def fail(self, request_id: str, error: str, reason: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(login_requests)
                .where(login_requests.c.request_id == request_id)
                .where(login_requests.c.status == PENDING)
                .values(
                    status=FAILED,
                    error=error,
                    reason=reason[:500],
                    approve_token_hash=None,
                    state_hash=None,
                    nonce=None,
                    code_verifier=None,
                )
            )

    def status(self, request_id: str, poll_token: str) -> Status:
        """The request's state for its requester (a verified one carries its identity)."""
        if not REQUEST_ID.match(request_id):
            raise UnknownRequest("No such sign-in request.")
        with read_only(self.engine).connect() as conn:
            row = conn.execute(
                select(login_requests).where(login_requests.c.request_id == request_id)
            ).first()
        # Constant-time: the poll token is a bearer secret.
        if row is None or not hmac.compare_digest(row.poll_token_hash, token_hash(poll_token)):
            raise UnknownRequest("No such sign-in request.")
        # A verified request not picked up in its lifetime expires too: a poll token found
        # days later must not turn into a session.
        if row.status in (PENDING, VERIFIED) and row.expires_at <= self.clock():
            return Status(FAILED, error="expired", reason="The sign-in request expired.")
        if row.status == VERIFIED:
            return Status(VERIFIED, identity=Identity(row.identity_type, row.identity_value))
        return Status(row.status, error=row.error, reason=row.reason)

    def pickup(self, request_id: str) -> bool:
        """Mark a verified request consumed; True for exactly one caller. The session is minted
        before this, so a failure on the way leaves the request verified, not lost."""
        with self.engine.begin() as conn:
            consumed = conn.execute(
                update(login_requests)
                .where(
                    login_requests.c.request_id == request_id,
                    login_requests.c.status == VERIFIED,
                    login_requests.c.expires_at > self.clock(),
                )
                .values(status=CONSUMED)
            ).rowcount
        return bool(consumed)
