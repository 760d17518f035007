"""Session JWTs (§6.3): ES256 with `kid`, minted and verified with the app's session keys."""

from __future__ import annotations

import base64
import functools
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt

from agentkeys.errors import Unauthorized
from agentkeys.identity import Identity
from agentkeys.keys import KeyRing

AUDIENCE = "agentkeys:broker"
IDENTITY = "identity"
WALLET = "wallet"
LEEWAY_SECONDS = 30
VERIFIED_CACHE_SIZE = 4096
_REQUIRED = ["iss", "aud", "sub", "iat", "exp", "jti", "kind", "account", "omni_account"]


@dataclass(frozen=True)
class Session:
    account: str
    omni_account: str
    identity_type: str
    kind: str
    issued_at: int
    expires_at: int
    jti: str
    wallet_address: str | None = None


class SessionTokens:
    """Mints and verifies sessions; `revoked_before(account)` gives the account's
    sessions_valid_after, or None when the account no longer exists."""

    def __init__(
        self,
        keys: KeyRing,
        *,
        issuer: str,
        client_id: str,
        ttl: dict[str, int],
        revoked_before: Callable[[str], int | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys, self.issuer, self.client_id, self.ttl = keys, issuer, client_id, ttl
        self.revoked_before, self.clock = revoked_before, clock
        # A token's signature check gives the same answer every time: remember recent ones
        # (keyed by the whole token; failures are never cached) instead of re-verifying ES256.
        self._signed = functools.lru_cache(maxsize=VERIFIED_CACHE_SIZE)(self._check_signature)

    def mint(
        self, account: str, identity: Identity, kind: str = IDENTITY, wallet: str | None = None
    ) -> tuple[str, Session]:
        now = int(self.clock())
        session = Session(
            account=account,
            omni_account=identity.omni(self.client_id),
            identity_type=identity.type,
            kind=kind,
            issued_at=now,
            expires_at=now + self.ttl[kind],
            jti=secrets.token_urlsafe(16),
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
        }
        if wallet is not None:
            claims["wallet_address"] = wallet
        key = self.keys.signing_key()
        token = jwt.encode(claims, key.private_key, algorithm="ES256", headers={"kid": key.kid})
        return token, session

    def verify(self, token: str, *, kinds: tuple[str, ...] = (IDENTITY,)) -> Session:
        """A valid, unrevoked session of one of `kinds`, or Unauthorized."""
        session = self._signed(token)
        now = self.clock()
        if session.issued_at > now + LEEWAY_SECONDS:
            raise Unauthorized("The bearer token is not a valid session.")
        if session.expires_at <= now - LEEWAY_SECONDS:
            raise Unauthorized("The session has expired; sign in again.")
        if session.kind not in kinds:
            raise Unauthorized(f"This needs a session of kind {' or '.join(kinds)}.")
        valid_after = self.revoked_before(session.account)
        # Unlink and merge revoke every older session of the account.
        if valid_after is None or session.issued_at < valid_after:
            raise Unauthorized("The session has been revoked; sign in again.")
        return session

    def _check_signature(self, token: str) -> Session:
        """Signature and claims of a session token; time, kind and revocation are checked by
        `verify` on every use (this part is cached per token: it cannot change)."""
        kid = _unverified_kid(token)
        key = self.keys.public_key(kid) if kid is not None else None
        if key is None:
            raise Unauthorized("The bearer token was signed with an unknown key.")
        try:
            # Pinned to ES256 (no alg confusion), with our issuer and audience and every claim.
            # iat and exp are checked in verify against self.clock (PyJWT only knows the wall
            # clock); sessions carry no nbf.
            claims = jwt.decode(
                token,
                key,
                algorithms=["ES256"],
                audience=AUDIENCE,
                issuer=self.issuer,
                options={
                    "require": _REQUIRED,
                    "verify_iat": False,
                    "verify_exp": False,
                    "verify_nbf": False,
                },
            )
        except jwt.PyJWTError:
            raise Unauthorized("The bearer token is not a valid session.") from None
        iat, exp = claims["iat"], claims["exp"]
        if type(iat) is not int or type(exp) is not int:
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
            wallet_address=claims.get("wallet_address"),
        )


def _unverified_kid(token: str) -> str | None:
    """The header's kid, to pick the key; jwt.decode then checks everything, header included."""
    try:
        header = json.loads(base64.urlsafe_b64decode(token.split(".", 1)[0] + "=="))
    except (ValueError, UnicodeDecodeError):
        raise Unauthorized("The bearer token is not a session token.") from None
    kid = header.get("kid") if isinstance(header, dict) else None
    return kid if isinstance(kid, str) else None
