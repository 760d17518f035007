"""Identity sessions checked against the broker's published session keys (PROTOCOL §5): the
worker has no database, so it fetches AGENTKEYS_SESSION_JWKS_URL, at most once a minute."""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import jwt

from agentkeys.errors import SessionKeysUnavailable, Unauthorized
from agentkeys.sessions import IDENTITY, Session, check_current, decode_session

REFRESH_SECONDS = 60  # unknown kids and removed keys are noticed within this
MAX_STALE_SECONDS = 300  # with the JWKS unreachable this long, no session is accepted
FETCH_TIMEOUT = 5
MAX_JWKS_BYTES = 64 * 1024
VERIFIED_CACHE_SIZE = 4096

log = logging.getLogger(__name__)


def fetch_url(url: str) -> bytes:
    """GET the JWKS; TLS is verified by urllib's default context."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT) as response:  # noqa: S310
        data: bytes = response.read(MAX_JWKS_BYTES + 1)
    if len(data) > MAX_JWKS_BYTES:
        raise ValueError("the JWKS is larger than expected")
    return data


def parse_jwks(data: bytes) -> dict[str, Any]:
    """kid -> public key, for the ES256 signing keys of a JWKS document only."""
    document = json.loads(data)
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise ValueError("the JWKS has no keys list")
    found = {}
    for item in keys:
        # Only P-256 signing keys: sessions are ES256 and nothing else may stand in for them.
        if not isinstance(item, dict) or not isinstance(item.get("kid"), str):
            continue
        if item.get("kty") != "EC" or item.get("crv") != "P-256" or item.get("use", "sig") != "sig":
            continue
        if item.get("alg", "ES256") != "ES256":
            continue
        found[item["kid"]] = jwt.PyJWK(item, algorithm="ES256").key
    return found


class JwksSessions:
    """Verifies identity sessions with the keys the broker publishes."""

    def __init__(
        self,
        url: str,
        *,
        issuer: str,
        fetch: Callable[[str], bytes] = fetch_url,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url, self.issuer, self.fetch, self.clock = url, issuer, fetch, clock
        self._keys: dict[str, Any] = {}
        self._fetched_at: float | None = None  # last successful fetch
        self._tried_at: float | None = None  # last attempt, successful or not
        self._lock = threading.Lock()
        # A token's signature check gives the same answer every time: remember recent ones
        # (failures are never cached); the kid is looked up in the current JWKS on every use.
        self._signed = functools.lru_cache(maxsize=VERIFIED_CACHE_SIZE)(self._check_signature)

    def verify(self, token: str, *, kinds: tuple[str, ...] = (IDENTITY,)) -> Session:
        """A valid identity session signed by a key the JWKS publishes now, or Unauthorized."""
        self._refresh_if_due()
        session = self._signed(token)
        check_current(session, now=self.clock(), kinds=kinds)
        # A key that leaves the JWKS ends its tokens, even ones whose check is cached.
        if session.kid not in self._keys:
            raise Unauthorized("The bearer token was signed with a key that is no longer valid.")
        return session

    def _check_signature(self, token: str) -> Session:
        return decode_session(token, self._key, issuer=self.issuer)

    def _key(self, kid: str) -> Any | None:
        if kid not in self._keys:
            self._refresh()  # a rotated-in key; _refresh limits the rate
        return self._keys.get(kid)

    def _refresh_if_due(self) -> None:
        fetched = self._fetched_at
        if fetched is None or self.clock() - fetched >= REFRESH_SECONDS:
            self._refresh()
        fetched = self._fetched_at
        # Without fresh keys a removed key would verify for ever: fail closed after a while.
        if fetched is None or self.clock() - fetched > MAX_STALE_SECONDS:
            raise SessionKeysUnavailable(
                "The signer cannot fetch the session keys (AGENTKEYS_SESSION_JWKS_URL); "
                "try again later."
            )

    def _refresh(self) -> None:
        with self._lock:
            now = self.clock()
            # At most one fetch a minute, whatever the callers send: unknown kids are free to make.
            if self._tried_at is not None and now - self._tried_at < REFRESH_SECONDS:
                return
            self._tried_at = now
            try:
                keys = parse_jwks(self.fetch(self.url))
            except (OSError, ValueError, jwt.PyJWTError) as exc:
                log.warning("session JWKS fetch from %s failed: %s", self.url, type(exc).__name__)
                return
            self._keys, self._fetched_at = keys, now
