"""Wallet sign-in with SIWE (§6.4). Challenges live in the database, so one started on any
worker or instance verifies on any other, and each is consumed by one atomic UPDATE."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, bindparam, insert, select, update

from agentkeys.broker.db import one_statement, read_only, siwe_challenges
from agentkeys.broker.login import REQUEST_ID
from agentkeys.broker.store import IdentityLinkStore
from agentkeys.crypto import parse_signature, recover_personal, to_checksum_address
from agentkeys.errors import (
    ChainNotAllowed,
    ChallengeExpired,
    ChallengeUsed,
    InvalidSignature,
    Unauthorized,
    UnknownRequest,
    WrongSigner,
)
from agentkeys.identity import EVM, Identity
from agentkeys.sessions import Session
from agentkeys.signer import ACCOUNT_RESOURCE_PREFIX
from agentkeys.siwe import SiweMessage
from agentkeys.timefmt import now_seconds, rfc3339

CHALLENGE_TTL = 600
PLAIN_STATEMENT = "Sign in to AgentKeys with this wallet."
BOUND_STATEMENT = "Link this wallet to your AgentKeys account and sign in."


# Built once, as every sign-in runs it (see store._ACCOUNT_OF).
_CONSUME = (
    update(siwe_challenges)
    .where(
        siwe_challenges.c.request_id == bindparam("id"),
        siwe_challenges.c.status == "pending",
    )
    .values(status="used")
    .returning(
        siwe_challenges.c.address,
        siwe_challenges.c.account,
        siwe_challenges.c.message,
        siwe_challenges.c.expires_at,
        siwe_challenges.c.session_generation,
        siwe_challenges.c.session_expires_at,
    )
)


@dataclass(frozen=True)
class Challenge:
    request_id: str
    message: str
    nonce: str
    expires_at: int


@dataclass(frozen=True)
class WalletSignIn:
    account: str
    address: str  # lowercase


class WalletChallenges:
    def __init__(
        self,
        engine: Engine,
        store: IdentityLinkStore,
        *,
        issuer: str,
        chain_ids: tuple[int, ...],
        clock: Callable[[], int] = now_seconds,
    ) -> None:
        self.engine, self.store, self.issuer = engine, store, issuer
        self.single = one_statement(engine)
        self.chain_ids, self.clock = chain_ids, clock

    def start(self, address: str, chain_id: int | None, session: Session | None) -> Challenge:
        """A strict EIP-4361 challenge for `address` (lowercase), bound to the account of the
        identity `session` if given; a bound challenge lives no longer than that session."""
        chain = self.chain_ids[0] if chain_id is None else chain_id
        if chain not in self.chain_ids:
            raise ChainNotAllowed(f"Chain id {chain} is not allowed here.")
        account = None if session is None else session.account
        if account is not None:
            self.store.check_wallet_linkable(account, address)
        now = self.clock()
        nonce = secrets.token_hex(12)  # 96 bits, 24 alphanumerics (EIP-4361 asks for ≥ 8)
        message = SiweMessage(
            scheme=None,
            domain=self.issuer.split("://", 1)[1],
            address=to_checksum_address(address),
            statement=BOUND_STATEMENT if account else PLAIN_STATEMENT,
            uri=self.issuer,
            version="1",
            chain_id=str(chain),
            nonce=nonce,
            issued_at=rfc3339(now),
            expiration_time=rfc3339(now + CHALLENGE_TTL),
            resources=(f"{ACCOUNT_RESOURCE_PREFIX}{account}",) if account else None,
        ).format()
        request_id = secrets.token_urlsafe(16)
        with self.single.begin() as conn:
            conn.execute(
                insert(siwe_challenges).values(
                    request_id=request_id,
                    address=address,
                    account=account,
                    session_generation=None if session is None else session.generation,
                    session_expires_at=None if session is None else session.expires_at,
                    message=message,
                    status="pending",
                    created_at=now,
                    expires_at=now + CHALLENGE_TTL,
                )
            )
        return Challenge(request_id, message, nonce, now + CHALLENGE_TTL)

    def verify(self, request_id: str, signature: str) -> WalletSignIn:
        """Consume the challenge (whatever the outcome), then check the signature."""
        if not REQUEST_ID.match(request_id):
            raise UnknownRequest("No such wallet challenge.")
        with self.single.begin() as conn:
            row = conn.execute(_CONSUME, {"id": request_id}).first()
        if row is None:
            with read_only(self.engine).connect() as conn:
                known = conn.execute(
                    select(siwe_challenges.c.request_id).where(
                        siwe_challenges.c.request_id == request_id
                    )
                ).first()
            if known is None:
                raise UnknownRequest("No such wallet challenge.")
            raise ChallengeUsed("This challenge was already used; start a new one.")
        # No grace: the broker wrote the Expiration Time with this same clock.
        if self.clock() >= row.expires_at:
            raise ChallengeExpired("This challenge has expired; start a new one.")
        parse_signature(signature)  # malformed → 400
        try:
            signer = recover_personal(row.message.encode(), signature).lower()
        except InvalidSignature:
            signer = None
        if signer != row.address:
            raise WrongSigner("The signature is not by the challenge's address.")
        if row.account is not None:
            # The challenge dies with the session that started it: a revoked identity must not
            # come back through a challenge it started before the revocation.
            if self.clock() >= row.session_expires_at:
                raise Unauthorized("The session that started this challenge has expired.")
            self.store.confirm_wallet(row.account, row.address, row.session_generation)
            return WalletSignIn(row.account, row.address)
        # A plain sign-in: the account the address is confirmed for, or a new one; pending
        # links of other accounts stay pending (only a bound challenge confirms them).
        return WalletSignIn(self.store.sign_in(Identity(EVM, row.address)), row.address)
