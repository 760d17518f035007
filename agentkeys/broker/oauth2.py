"""OAuth2/OIDC client for provider sign-in: authorization code + PKCE S256, state, nonce (§6.2).

Pure protocol code: no Flask, and outbound HTTP through the standard library (no `requests`).
Every failure the provider or the user's browser can cause raises `OAuth2Error`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import re
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_plus, urlencode, urlsplit, urlunsplit

import jwt
from jwt.exceptions import InvalidSubjectError

from agentkeys.errors import OAuth2Error
from agentkeys.settings import OAuth2Provider

# why: only asymmetric algorithms; HS* would let anyone holding the public JWKS forge tokens.
ALLOWED_ID_TOKEN_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256")
ID_TOKEN_LEEWAY_SECONDS = 60
MAX_RESPONSE_BYTES = 1024 * 1024
MAX_SUB_LENGTH = 255
SCOPE = "openid email"

_PKCE_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}\Z")
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")
_REASON_LENGTH = 200


def pkce_challenge(verifier: str) -> str:
    """BASE64URL(SHA256(verifier)) without padding: the S256 code_challenge (RFC 7636 §4.2)."""
    if not _PKCE_VERIFIER.match(verifier):
        raise ValueError("a PKCE code_verifier is 43 to 128 unreserved characters")
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def new_pkce() -> tuple[str, str]:
    """A fresh (code_verifier, code_challenge) pair; the verifier carries 512 random bits."""
    verifier = secrets.token_urlsafe(64)  # 86 chars of [A-Za-z0-9_-], within RFC 7636's 43-128
    return verifier, pkce_challenge(verifier)


def new_state() -> str:
    """An unguessable `state` (256 bits, url-safe) binding the callback to its request."""
    return secrets.token_urlsafe(32)


def new_nonce() -> str:
    """An unguessable `nonce` (256 bits, url-safe) binding the id_token to its request."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ProviderMetadata:
    """The parts of a provider's discovery document this client uses, already checked."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    id_token_algorithms: tuple[str, ...]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are errors: discovery, JWKS and the token endpoint are called directly."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class OIDCClient:
    """Protocol client for one provider; discovery and JWKS are cached per instance."""

    def __init__(
        self,
        provider: OAuth2Provider,
        *,
        redirect_uri: str,
        http_timeout: float = 10.0,
        jwks_min_refetch_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.provider = provider
        self.redirect_uri = redirect_uri
        self._http_timeout = http_timeout
        self._jwks_min_refetch = jwks_min_refetch_seconds
        self._clock = clock
        self._opener = urllib.request.build_opener(_NoRedirect())
        self._metadata: ProviderMetadata | None = None
        self._metadata_lock = threading.Lock()
        # kid -> JWK; replaced wholesale under the lock, so readers may use a snapshot unlocked.
        self._jwks: Mapping[str, dict[str, Any]] | None = None
        self._jwks_fetched_at = 0.0
        self._jwks_lock = threading.Lock()

    # -- discovery -------------------------------------------------------------------------

    def discovery(self) -> ProviderMetadata:
        """Fetch `{issuer}/.well-known/openid-configuration` once, check it and cache it."""
        metadata = self._metadata
        if metadata is not None:
            return metadata
        with self._metadata_lock:
            if self._metadata is None:
                url = self.provider.issuer.rstrip("/") + "/.well-known/openid-configuration"
                self._metadata = self._parse_discovery(self._get_json(url, "discovery"))
            return self._metadata

    def _parse_discovery(self, document: dict[str, Any]) -> ProviderMetadata:
        issuer = self.provider.issuer
        # why: exact match (OIDC Discovery §4.3) so one provider cannot pose as another (mix-up).
        if document.get("issuer") != issuer:
            raise OAuth2Error("the provider's discovery document names a different issuer")
        endpoints = {}
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            value = document.get(name)
            if not isinstance(value, str) or not _is_http_url(value):
                raise OAuth2Error(f"the provider's discovery document lacks a valid {name}")
            # why: an https issuer must not hand us plain-http endpoints to downgrade to.
            if issuer.startswith("https://") and not value.startswith("https://"):
                raise OAuth2Error(f"the provider's {name} is not https")
            endpoints[name] = value
        advertised = document.get("id_token_signing_alg_values_supported", ["RS256"])
        if not isinstance(advertised, list):
            advertised = []
        algorithms = tuple(alg for alg in ALLOWED_ID_TOKEN_ALGORITHMS if alg in advertised)
        if not algorithms:
            raise OAuth2Error("the provider signs id_tokens with no algorithm we accept")
        return ProviderMetadata(
            issuer=issuer,
            authorization_endpoint=endpoints["authorization_endpoint"],
            token_endpoint=endpoints["token_endpoint"],
            jwks_uri=endpoints["jwks_uri"],
            id_token_algorithms=algorithms,
        )

    # -- authorization request and code exchange --------------------------------------------

    def authorization_url(self, *, state: str, nonce: str, code_challenge: str) -> str:
        """The provider URL the user's browser opens (RFC 6749 §4.1.1 + RFC 7636 + OIDC)."""
        params = urlencode(
            {
                "response_type": "code",
                "scope": SCOPE,
                "client_id": self.provider.client_id,
                "redirect_uri": self.redirect_uri,
                "state": state,
                "nonce": nonce,
                "code_challenge": code_challenge,
                "code_challenge_method": "S256",
            },
            quote_via=quote,
        )
        parts = urlsplit(self.discovery().authorization_endpoint)
        query = f"{parts.query}&{params}" if parts.query else params
        return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))

    def exchange_code(self, code: str, code_verifier: str) -> str:
        """Trade an authorization code for tokens at the token endpoint; return the id_token."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": code_verifier,
        }
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        secret = self.provider.client_secret
        if secret is not None:
            # client_secret_basic: each part form-urlencoded before Base64 (RFC 6749 §2.3.1).
            user = quote_plus(self.provider.client_id)
            password = quote_plus(secret.reveal().decode())
            basic = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            headers["Authorization"] = f"Basic {basic}"
        else:
            form["client_id"] = self.provider.client_id  # a public client names itself
        hidden = [code, code_verifier] + ([secret.reveal().decode()] if secret else [])
        request = urllib.request.Request(  # noqa: S310  (scheme checked in _is_http_url)
            self.discovery().token_endpoint,
            data=urlencode(form).encode("ascii"),
            headers=headers,
            method="POST",
        )
        body = self._fetch_json(request, "token endpoint", hidden)
        id_token = body.get("id_token")
        if not isinstance(id_token, str) or not id_token:
            raise OAuth2Error("the provider's token response has no id_token")
        return id_token

    # -- id_token verification --------------------------------------------------------------

    def verify_id_token(self, id_token: str, *, nonce: str) -> dict[str, Any]:
        """Check signature (provider JWKS), iss, aud/azp, exp, iat, nonce and sub; the claims."""
        metadata = self.discovery()
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.PyJWTError:
            raise OAuth2Error("the id_token is not a well-formed JWT") from None
        alg = header.get("alg")
        # why: algorithms are pinned by us, never taken from the token (RFC 8725 §2.1, §3.1).
        if alg not in metadata.id_token_algorithms:
            raise OAuth2Error("the id_token is signed with an algorithm we do not accept")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise OAuth2Error("the id_token header names no key (kid)")
        jwk = self._jwk(kid)
        if jwk.get("alg", alg) != alg:
            raise OAuth2Error("the id_token algorithm does not match its key")
        try:
            key = jwt.PyJWK(jwk, algorithm=alg)
            claims = jwt.decode(
                id_token,
                key=key,
                algorithms=list(metadata.id_token_algorithms),
                audience=self.provider.client_id,
                issuer=metadata.issuer,  # why: exact string match, never a prefix or normalized
                leeway=ID_TOKEN_LEEWAY_SECONDS,
                options={"require": ["iss", "sub", "aud", "exp", "iat", "nonce"]},
            )
        except jwt.PyJWTError as error:
            raise OAuth2Error(_id_token_reason(error)) from None
        self._check_claims(claims, nonce)
        return claims

    def _check_claims(self, claims: dict[str, Any], nonce: str) -> None:
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        azp = claims.get("azp")
        if (len(audiences) > 1 or azp is not None) and azp != self.provider.client_id:
            raise OAuth2Error("the id_token was issued to another party (azp)")
        token_nonce = claims["nonce"]
        # why: constant time, so response timing does not reveal how much of the nonce matched.
        if not isinstance(token_nonce, str) or not hmac.compare_digest(
            token_nonce.encode(), nonce.encode()
        ):
            raise OAuth2Error("the id_token nonce does not match this sign-in")
        sub = claims["sub"]
        if not isinstance(sub, str) or not 0 < len(sub) <= MAX_SUB_LENGTH:
            raise OAuth2Error("the id_token sub is not a 1 to 255 character string")

    def _jwk(self, kid: str) -> dict[str, Any]:
        """The provider's signing key `kid`; an unknown kid refetches the JWKS (rate limited)."""
        keys = self._jwks
        if keys is not None and kid in keys:
            return dict(keys[kid])
        with self._jwks_lock:
            keys = self._jwks
            if keys is None or kid not in keys:
                now = self._clock()
                # why: unknown kids are attacker-chosen; at most one refetch per interval.
                if keys is not None and now - self._jwks_fetched_at < self._jwks_min_refetch:
                    raise OAuth2Error(
                        "the id_token is signed with a key the provider does not list"
                    )
                self._jwks_fetched_at = now
                document = self._get_json(self.discovery().jwks_uri, "JWKS")
                keys = self._jwks = _signing_keys(document)
            if kid not in keys:
                raise OAuth2Error("the id_token is signed with a key the provider does not list")
            return dict(keys[kid])

    # -- HTTP --------------------------------------------------------------------------------

    def _get_json(self, url: str, what: str) -> dict[str, Any]:
        if not _is_http_url(url):
            raise OAuth2Error(f"the provider's {what} URL is not http(s)")
        request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
        return self._fetch_json(request, what, [])

    def _fetch_json(
        self, request: urllib.request.Request, what: str, hidden: list[str]
    ) -> dict[str, Any]:
        """Send `request`; a JSON object from a 2xx answer, else OAuth2Error with a safe reason."""
        if not _is_http_url(request.full_url):
            raise OAuth2Error(f"the provider's {what} URL is not http(s)")
        request.add_header("Accept", "application/json")
        try:
            status, raw = self._send(request)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
            reason = getattr(error, "reason", None) or type(error).__name__
            raise OAuth2Error(
                _redact(f"could not reach the provider's {what}: {reason}", hidden)
            ) from None
        if len(raw) > MAX_RESPONSE_BYTES:
            raise OAuth2Error(f"the provider's {what} answer is too large")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            body = None
        if isinstance(body, dict) and "error" in body:
            raise OAuth2Error(_redact(_provider_error(what, body), hidden))
        if not 200 <= status < 300:
            raise OAuth2Error(f"the provider's {what} answered HTTP {status}")
        if not isinstance(body, dict):
            raise OAuth2Error(f"the provider's {what} did not answer with a JSON object")
        return body

    def _send(self, request: urllib.request.Request) -> tuple[int, bytes]:
        """(status, at most MAX_RESPONSE_BYTES + 1 body bytes); non-2xx answers are not raised."""
        try:
            response: http.client.HTTPResponse = self._opener.open(
                request, timeout=self._http_timeout
            )
        except urllib.error.HTTPError as error:
            with error:
                return error.code, error.read(MAX_RESPONSE_BYTES + 1)
        with response:
            return response.status, response.read(MAX_RESPONSE_BYTES + 1)


def _is_http_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _signing_keys(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """kid -> JWK for the signature keys of a JWKS document (the first of a repeated kid)."""
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise OAuth2Error("the provider's JWKS has no keys")
    keys: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if (
            isinstance(entry, dict)
            and isinstance(entry.get("kid"), str)
            and entry.get("use", "sig") == "sig"
        ):
            keys.setdefault(entry["kid"], entry)
    return keys


def _provider_error(what: str, body: dict[str, Any]) -> str:
    """`error` (and a short `error_description`) of an RFC 6749 §5.2 answer, as plain text."""
    code = body.get("error")
    code_text = code if isinstance(code, str) and _ERROR_CODE.match(code) else "error"
    reason = f"the provider's {what} refused: {code_text}"
    description = body.get("error_description")
    if isinstance(description, str):
        printable = "".join(c for c in description if c.isprintable())[:_REASON_LENGTH]
        reason += f" ({printable})" if printable else ""
    return reason


def _redact(text: str, hidden: list[str]) -> str:
    """`text` with every secret value of the request blanked, in case the provider echoed one."""
    for value in hidden:
        for form in {value, quote_plus(value), quote(value, safe="")}:
            if form:
                text = text.replace(form, "[redacted]")
    return text


def _id_token_reason(error: jwt.PyJWTError) -> str:
    """A short human reason for a pyjwt failure (no token content)."""
    if isinstance(error, jwt.ExpiredSignatureError):
        return "the id_token has expired"
    if isinstance(error, jwt.ImmatureSignatureError):
        return "the id_token is issued in the future"
    if isinstance(error, jwt.InvalidIssuerError):
        return "the id_token was issued by another issuer"
    if isinstance(error, jwt.MissingRequiredClaimError):
        return f"the id_token lacks the {error.claim} claim"
    if isinstance(error, InvalidSubjectError):
        return "the id_token sub is not a 1 to 255 character string"
    if isinstance(error, jwt.InvalidAudienceError):
        return "the id_token is for another client (aud)"
    if isinstance(error, jwt.InvalidSignatureError):
        return "the id_token signature does not verify"
    if isinstance(error, (jwt.InvalidKeyError, jwt.PyJWKError)):
        return "the provider's key for the id_token is unusable"
    if isinstance(error, jwt.InvalidAlgorithmError):
        return "the id_token is signed with an algorithm we do not accept"
    return "the id_token is invalid"
