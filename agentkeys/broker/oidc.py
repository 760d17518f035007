"""OIDC tokens for AWS STS AssumeRoleWithWebIdentity (§6.5), and the discovery document."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import jwt

from agentkeys.broker.keys import KeyRing
from agentkeys.sessions import Session

TAGS_CLAIM = "https://aws.amazon.com/tags"
WALLET_TAG, ACCOUNT_TAG = "agentkeys_wallet", "agentkeys_account"
JWKS_PATH = "/.well-known/jwks.json"
CLAIMS = ["iss", "sub", "aud", "iat", "nbf", "exp", "jti", TAGS_CLAIM]


def discovery_document(issuer: str) -> dict[str, Any]:
    return {
        "issuer": issuer,
        "jwks_uri": issuer + JWKS_PATH,
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "claims_supported": CLAIMS,
    }


class OIDCTokens:
    def __init__(
        self,
        keys: KeyRing,
        *,
        issuer: str,
        audience: str,
        ttl: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys, self.issuer, self.audience, self.ttl, self.clock = (
            keys,
            issuer,
            audience,
            ttl,
            clock,
        )

    def mint(self, session: Session) -> tuple[str, int]:
        """A token for the wallet of a wallet session, with session tags for IAM conditions."""
        if session.wallet_address is None:
            raise ValueError("only wallet sessions carry a wallet")
        now = int(self.clock())
        wallet = session.wallet_address.lower()
        claims = {
            "iss": self.issuer,
            "sub": f"agentkeys:wallet:{wallet}",
            "aud": self.audience,
            "iat": now,
            "nbf": now,
            "exp": now + self.ttl,
            "jti": secrets.token_urlsafe(16),
            TAGS_CLAIM: {
                "principal_tags": {WALLET_TAG: [wallet], ACCOUNT_TAG: [session.account]},
                "transitive_tag_keys": [WALLET_TAG, ACCOUNT_TAG],
            },
        }
        key = self.keys.signing_key()
        token = jwt.encode(claims, key.private_key, algorithm="ES256", headers={"kid": key.kid})
        return token, now + self.ttl
