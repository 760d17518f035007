"""ES256 signing keys shared by every worker and instance through the database (§6.3, §6.5).

Private keys are sealed with AES-256-GCM under AGENTKEYS_KEY_ENCRYPTION_KEY (required in
production); development without it stores them unsealed, marked so, and the release step seals
them once the key is set. A rotated-in key is
published one JWKS max-age before it signs; a retired key stays published until its last
token has expired.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from agentkeys.broker.db import read_only, signing_keys
from agentkeys.settings import Secret

JWKS_MAX_AGE = 300  # seconds; the Cache-Control max-age of every published JWKS
RELOAD_SECONDS = 30  # workers re-read the key table at least this often (< JWKS_MAX_AGE)
UNKNOWN_KID_RELOAD_SECONDS = 5
VERIFY_LEEWAY = 30  # verifiers accept tokens this long past exp: keep their key published


KEK = "AGENTKEYS_KEY_ENCRYPTION_KEY"


class KeyUnsealError(RuntimeError):
    """The stored keys cannot be opened with this process's key-encryption key."""


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    public_jwk: dict[str, str]
    signs_from: int
    retire_at: int | None


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def public_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    numbers = key.public_key().public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
    }
    # RFC 7638 thumbprint: a kid that is a pure function of the public key.
    canonical = json.dumps(jwk, sort_keys=True, separators=(",", ":")).encode()
    return {**jwk, "kid": b64url(hashlib.sha256(canonical).digest()), "use": "sig", "alg": "ES256"}


class KeyRing:
    """The keys of one purpose (`session` or `oidc`), cached per process and re-read often."""

    def __init__(
        self,
        engine: Engine,
        purpose: str,
        *,
        kek: Secret | None,
        token_ttl: int,
        clock: Callable[[], float] = time.time,
        create_first: bool = False,
    ) -> None:
        """`create_first` (development): the first read makes the first key if there is none,
        so a process that booted while the database was down needs no restart to get keys."""
        self.engine, self.purpose, self.token_ttl, self.clock = engine, purpose, token_ttl, clock
        self.create_first = create_first
        self._aead = AESGCM(kek.reveal()) if kek is not None else None
        self._lock = threading.Lock()
        self._keys: list[SigningKey] = []
        self._loaded_at = float("-inf")

    def ensure_initial(self) -> None:
        """Create the first key if there is none; safe when several workers start at once.
        Loads every key, so a wrong key-encryption key fails here rather than on first use."""
        if not self._rows_exist():
            # Another worker may create it first: its insert wins the unique slot; re-read below.
            with contextlib.suppress(IntegrityError):
                first = ec.generate_private_key(ec.SECP256R1())
                self._insert(first, int(self.clock()), f"{self.purpose}:1")
        self.reload()

    def rotate(self) -> SigningKey:
        """Publish a new key now; it signs after one JWKS max-age, and the old keys retire once
        every token they may still sign has expired."""
        now = int(self.clock())
        signs_from = now + JWKS_MAX_AGE
        key = ec.generate_private_key(ec.SECP256R1())
        with self.engine.begin() as conn:
            conn.execute(
                update(signing_keys)
                .where(signing_keys.c.purpose == self.purpose, signing_keys.c.retire_at.is_(None))
                .values(retire_at=signs_from + self.token_ttl + VERIFY_LEEWAY)
            )
        kid = self._insert(key, signs_from, None)
        self.reload()
        return next(k for k in self._keys if k.kid == kid)

    def seal_unsealed(self) -> int:
        """Seal, in place, the keys stored without a key-encryption key (an older development
        database): same kid and times, so what they signed still verifies. Returns how many."""
        if self._aead is None:
            return 0
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(signing_keys.c.kid, signing_keys.c.private_key).where(
                    signing_keys.c.purpose == self.purpose, signing_keys.c.sealed == 0
                )
            ).all()
        count = 0
        for row in rows:
            _, blob = self._seal(row.kid, self._open(row.kid, row.private_key, False))
            with self.engine.begin() as conn:
                # `sealed == 0` in the WHERE: a concurrent run that sealed it first wins.
                count += conn.execute(
                    update(signing_keys)
                    .where(signing_keys.c.kid == row.kid, signing_keys.c.sealed == 0)
                    .values(private_key=blob, sealed=1)
                ).rowcount
        if count:
            self.reload()
        return count

    def signing_key(self) -> SigningKey:
        now = self.clock()
        usable = [k for k in self._current() if k.signs_from <= now]
        if not usable:
            raise RuntimeError(f"no {self.purpose} signing key; run the release step")
        return max(usable, key=lambda k: k.signs_from)

    def published(self) -> list[SigningKey]:
        return self._current()

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.public_jwk for k in self.published()]}

    def publishes(self, kid: str) -> bool:
        """Whether `kid` is published now (re-read at least every RELOAD_SECONDS)."""
        return any(k.kid == kid for k in self._current())

    def public_key(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        key = next((k for k in self._current() if k.kid == kid), None)
        if key is None and self.clock() - self._loaded_at > UNKNOWN_KID_RELOAD_SECONDS:
            self.reload()  # a key rotated in by another process since the last read
            key = next((k for k in self._current() if k.kid == kid), None)
        return None if key is None else key.private_key.public_key()

    def reload(self) -> None:
        with read_only(self.engine).connect() as conn:
            rows = conn.execute(
                select(signing_keys).where(signing_keys.c.purpose == self.purpose)
            ).all()
        keys = [
            SigningKey(
                kid=row.kid,
                private_key=self._open(row.kid, row.private_key, bool(row.sealed)),
                public_jwk=json.loads(row.public_jwk),
                signs_from=row.signs_from,
                retire_at=row.retire_at,
            )
            for row in rows
        ]
        with self._lock:
            self._keys, self._loaded_at = keys, self.clock()

    def _current(self) -> list[SigningKey]:
        if self.clock() - self._loaded_at > RELOAD_SECONDS:
            if self.create_first and not self._keys:
                self.ensure_initial()
            else:
                self.reload()
        now = self.clock()
        return [k for k in self._keys if k.retire_at is None or k.retire_at > now]

    def _rows_exist(self) -> bool:
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    select(signing_keys.c.kid).where(signing_keys.c.purpose == self.purpose)
                ).first()
                is not None
            )

    def _insert(self, key: ec.EllipticCurvePrivateKey, signs_from: int, slot: str | None) -> str:
        jwk = public_jwk(key)
        sealed, blob = self._seal(jwk["kid"], key)
        with self.engine.begin() as conn:
            conn.execute(
                insert(signing_keys).values(
                    kid=jwk["kid"],
                    purpose=self.purpose,
                    slot=slot,
                    private_key=blob,
                    sealed=int(sealed),
                    public_jwk=json.dumps(jwk),
                    created_at=int(self.clock()),
                    signs_from=signs_from,
                    retire_at=None,
                )
            )
        return jwk["kid"]

    def _seal(self, kid: str, key: ec.EllipticCurvePrivateKey) -> tuple[bool, bytes]:
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        if self._aead is None:
            return False, der  # development only: production settings require the KEK
        nonce = os.urandom(12)
        return True, nonce + self._aead.encrypt(nonce, der, self._aad(kid))

    def _open(self, kid: str, blob: bytes, sealed: bool) -> ec.EllipticCurvePrivateKey:
        if sealed:
            if self._aead is None:
                raise KeyUnsealError(f"the {self.purpose} signing keys are sealed: set {KEK}")
            try:
                blob = self._aead.decrypt(blob[:12], blob[12:], self._aad(kid))
            except InvalidTag:
                raise KeyUnsealError(
                    f"cannot unseal {self.purpose} key {kid}: {KEK} is wrong"
                ) from None
        key = serialization.load_der_private_key(blob, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise RuntimeError(f"signing key {kid} is not an EC key")
        return key

    def _aad(self, kid: str) -> bytes:
        # Binding the kid and purpose stops a sealed key being swapped into another row.
        return f"agentkeys-signing-key:{self.purpose}:{kid}".encode()
