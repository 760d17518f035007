"""Session JWTs (§6.3): ES256 with `kid`, minted and verified with the app's session keys, and
verified by a separate signer (the TEE worker) with the published ones. No database here."""

from __future__ import annotations

import base64
import functools
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import jwt

from agentkeys.errors import Unauthorized
from agentkeys.identity import Identity

if TYPE_CHECKING:
    from agentkeys.broker.keys import KeyRing

AUDIENCE = "agentkeys:broker"
IDENTITY = "identity"
WALLET = "wallet"
LEEWAY_SECONDS = 30
VERIFIED_CACHE_SIZE = 4096
MAX_HEADER_CHARS = 1024
_REQUIRED = ["iss", "aud", "sub", "iat", "exp", "jti", "kind", "account", "omni_account", "gen"]


@dataclass(frozen=True)
class Session:
    account: str
    omni_account: str
    identity_type: str
    kind: str
    issued_at: int
    expires_at: int
    jti: str
    generation: int
    kid: str
    wallet_address: str | None = None


class Generations(Protocol):
    """Per-account session generations (the IdentityLinkStore): revoking adds one."""

    def session_generation(self, account: str) -> int | None:
        """The generation valid sessions carry; None for an unknown or merged account."""

    def member_generation(self, account: str, identity: Identity) -> int | None:
        """The generation, if `identity` is linked to `account` now; else None."""


class SessionTokens:
    """Mints and verifies sessions; a session is valid while its account's generation is the
    one it was minted in (exact revocation, PROTOCOL §6.3)."""

    def __init__(
        self,
        keys: KeyRing,
        *,
        issuer: str,
        client_id: str,
        ttl: dict[str, int],
        generations: Generations,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys, self.issuer, self.client_id, self.ttl = keys, issuer, client_id, ttl
        self.generations, self.clock = generations, clock
        # A token's signature check gives the same answer every time: remember recent ones
        # (keyed by the whole token; failures are never cached) instead of re-verifying ES256.
        self._signed = functools.lru_cache(maxsize=VERIFIED_CACHE_SIZE)(self._check_signature)

    def mint(
        self, account: str, identity: Identity, kind: str = IDENTITY, wallet: str | None = None
    ) -> tuple[str, Session]:
        generation = self.generations.member_generation(account, identity)
        # Read with the link itself: an unlink committed before this refuses, one after it
        # moves the generation on and so revokes this session too.
        if generation is None:
            raise Unauthorized("That identity is no longer linked to this account; sign in again.")
        key = self.keys.signing_key()
        now = int(self.clock())
        session = Session(
            account=account,
            omni_account=identity.omni(self.client_id),
            identity_type=identity.type,
            kind=kind,
            issued_at=now,
            expires_at=now + self.ttl[kind],
            jti=secrets.token_urlsafe(16),
            generation=generation,
            kid=key.kid,
            wallet_address=wallet,
        )
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": f"agentkeys:account:{account}",
            "iat": now,
            "exp": session.expires_at,
            "jti": session.jti,
            "kind": kind,
            "account": account,
            "omni_account": session.omni_account,
            "identity_type": identity.type,
            "gen": generation,
        }
        if wallet is not None:
            claims["wallet_address"] = wallet
        token = jwt.encode(claims, key.private_key, algorithm="ES256", headers={"kid": key.kid})
        return token, session

    def verify(self, token: str, *, kinds: tuple[str, ...] = (IDENTITY,)) -> Session:
        """A valid, unrevoked session of one of `kinds`, or Unauthorized."""
        session = self._signed(token)
        check_current(session, now=self.clock(), kinds=kinds)
        # The signature check is cached per token: a key retired or withdrawn since must still
        # end its tokens, within the key ring's reload interval.
        if not self.keys.publishes(session.kid):
            raise Unauthorized("The bearer token was signed with a key that is no longer valid.")
        # Unlink, merge and sign-out-everywhere move the generation on: every older session ends.
        if session.generation != self.generations.session_generation(session.account):
            raise Unauthorized("The session has been revoked; sign in again.")
        return session

    def _check_signature(self, token: str) -> Session:
        return decode_session(token, self.keys.public_key, issuer=self.issuer)


def check_current(session: Session, *, now: float, kinds: tuple[str, ...]) -> None:
    """Time and kind, checked on every use (the signature check may be cached)."""
    if session.issued_at > now + LEEWAY_SECONDS:
        raise Unauthorized("The bearer token is not a valid session.")
    if session.expires_at <= now - LEEWAY_SECONDS:
        raise Unauthorized("The session has expired; sign in again.")
    if session.kind not in kinds:
        raise Unauthorized(f"This needs a session of kind {' or '.join(kinds)}.")


def decode_session(token: str, public_key: Callable[[str], Any | None], *, issuer: str) -> Session:
    """Signature and claims of a session token, with the key `public_key(kid)` gives; time, kind
    and revocation are checked on every use (this part cannot change, so callers may cache it)."""
    kid = _unverified_kid(token)
    key = public_key(kid) if kid is not None else None
    if key is None:
        raise Unauthorized("The bearer token was signed with an unknown key.")
    try:
        # Pinned to ES256 (no alg confusion), with our issuer and audience and every claim.
        # iat and exp are checked in check_current against the caller's clock (PyJWT only knows
        # the wall clock); sessions carry no nbf.
        claims = jwt.decode(
            token,
            key,
            algorithms=["ES256"],
            audience=AUDIENCE,
            issuer=issuer,
            options={
                "require": _REQUIRED,
                "verify_iat": False,
                "verify_exp": False,
                "verify_nbf": False,
            },
        )
    except jwt.PyJWTError:
        raise Unauthorized("The bearer token is not a valid session.") from None
    iat, exp, generation = claims["iat"], claims["exp"], claims["gen"]
    if type(iat) is not int or type(exp) is not int or type(generation) is not int:
        raise Unauthorized("The bearer token is not a valid session.")
    if claims["sub"] != f"agentkeys:account:{claims['account']}":
        raise Unauthorized("The bearer token is not a valid session.")
    return Session(
        account=str(claims["account"]),
        omni_account=str(claims["omni_account"]),
        identity_type=str(claims.get("identity_type", "")),
        kind=str(claims["kind"]),
        issued_at=iat,
        expires_at=exp,
        jti=str(claims["jti"]),
        generation=generation,
        kid=str(kid),
        wallet_address=claims.get("wallet_address"),
    )


def _unverified_kid(token: str) -> str | None:
    """The header's kid, to pick the key; jwt.decode then checks everything, header included."""
    segment = token.split(".", 1)[0]
    # Our headers are under 200 characters; a bound keeps deeply nested JSON from the parser.
    if len(segment) > MAX_HEADER_CHARS:
        raise Unauthorized("The bearer token is not a session token.")
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=="))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Unauthorized("The bearer token is not a session token.") from None
    kid = header.get("kid") if isinstance(header, dict) else None
    return kid if isinstance(kid, str) else None
