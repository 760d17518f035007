"""A real OIDC provider on loopback for tests: discovery, /authorize, /token (PKCE), /jwks.

`with OIDCProvider() as provider:` serves a small Flask app on 127.0.0.1:<free port> from a
background thread. Attributes the tests set change how it behaves (deny, bad claims, key
rotation, ...); counters record what clients fetched.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus, urlencode

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask, Response, jsonify, redirect, request
from flask.typing import ResponseReturnValue
from jwt.algorithms import RSAAlgorithm
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

DEFAULT_REDIRECT_URI = "http://127.0.0.1:8000/auth/oauth2/callback"

TokenResponder = Callable[[dict[str, str]], tuple[int, str]]


@functools.cache
def _rsa_key(index: int) -> rsa.RSAPrivateKey:
    """Key number `index`, generated once per test session (RSA generation is slow)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: rsa.RSAPrivateKey

    @property
    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "alg": "RS256", "use": "sig"}


@dataclass
class _Grant:
    client_id: str
    redirect_uri: str
    code_challenge: str
    nonce: str | None
    sub: str
    email: str


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


class OIDCProvider:
    """An OIDC provider with knobs; use as a context manager (starts and stops the server)."""

    def __init__(
        self,
        *,
        client_id: str = "agentkeys-test-client",
        client_secret: str | None = "test-client-secret",  # noqa: S107
        redirect_uris: tuple[str, ...] = (DEFAULT_REDIRECT_URI,),
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uris = redirect_uris
        # Knobs --------------------------------------------------------------------------------
        self.sub = "248289761001"  # the user who "logs in"
        self.email = "jane@example.com"
        self.deny = False  # /authorize redirects back with error=access_denied
        self.id_token_overrides: dict[str, Any] = {}  # claims to change; None removes one
        self.sign_with_unknown_key = False  # sign with a key the JWKS does not publish
        self.discovery_overrides: dict[str, Any] = {}  # e.g. {"issuer": "..."}; None removes
        self.authorization_endpoint_query = ""  # a query the authorization endpoint carries
        self.token_responder: TokenResponder | None = None  # replaces /token's answer
        self.response_delay = 0.0  # seconds discovery, /jwks and /token wait before answering
        # Records ------------------------------------------------------------------------------
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        self.token_client_auth: list[str] = []  # "basic" | "post" | "none" per /token call
        self._lock = threading.Lock()
        self._key_counter = 0
        self._keys = [self._new_key()]
        self._unknown_key = self._new_key()
        self._grants: dict[str, _Grant] = {}
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.issuer = ""

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> OIDCProvider:
        self._server = make_server(
            "127.0.0.1", 0, self._app(), threaded=True, request_handler=_QuietHandler
        )
        self.issuer = f"http://127.0.0.1:{self._server.server_port}"
        server = self._server  # a short poll interval keeps shutdown (per test) fast
        self._thread = threading.Thread(target=lambda: server.serve_forever(0.01), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> OIDCProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- keys and tokens ----------------------------------------------------------------------

    @property
    def current_key(self) -> SigningKey:
        return self._keys[-1]

    @property
    def unknown_key(self) -> SigningKey:
        """A key the JWKS never publishes."""
        return self._unknown_key

    def rotate_key(self) -> SigningKey:
        """Sign with a new RS256 key and a new kid from now on; the JWKS publishes both."""
        key = self._new_key()
        self._keys.append(key)
        return key

    def _new_key(self) -> SigningKey:
        self._key_counter += 1
        return SigningKey(kid=secrets.token_hex(8), private_key=_rsa_key(self._key_counter))

    def claims(self, *, nonce: str | None) -> dict[str, Any]:
        """The id_token claims for the current user, after `id_token_overrides`."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": self.sub,
            "aud": self.client_id,
            "exp": now + 300,
            "iat": now,
            "email": self.email,
            "email_verified": True,
        }
        if nonce is not None:
            claims["nonce"] = nonce
        for name, value in self.id_token_overrides.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def mint_id_token(self, *, nonce: str | None, key: SigningKey | None = None) -> str:
        """An RS256 id_token with header kid, signed as the knobs say."""
        if key is None:
            key = self.unknown_key if self.sign_with_unknown_key else self.current_key
        return jwt.encode(
            self.claims(nonce=nonce), key.private_key, algorithm="RS256", headers={"kid": key.kid}
        )

    # -- the Flask app ------------------------------------------------------------------------

    def _app(self) -> Flask:
        app = Flask("oidc_provider")
        app.add_url_rule("/.well-known/openid-configuration", view_func=self._discovery)
        app.add_url_rule("/authorize", view_func=self._authorize)
        app.add_url_rule("/token", view_func=self._token, methods=["POST"])
        app.add_url_rule("/jwks", view_func=self._jwks)
        return app

    def _discovery(self) -> Response:
        with self._lock:
            self.discovery_fetches += 1
        time.sleep(self.response_delay)
        endpoint = f"{self.issuer}/authorize"
        if self.authorization_endpoint_query:
            endpoint += "?" + self.authorization_endpoint_query
        document: dict[str, Any] = {
            "issuer": self.issuer,
            "authorization_endpoint": endpoint,
            "token_endpoint": f"{self.issuer}/token",
            "jwks_uri": f"{self.issuer}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "none"],
            "scopes_supported": ["openid", "email"],
        }
        for name, value in self.discovery_overrides.items():
            if value is None:
                document.pop(name, None)
            else:
                document[name] = value
        return jsonify(document)

    def _jwks(self) -> Response:
        with self._lock:
            self.jwks_fetches += 1
        time.sleep(self.response_delay)
        return jsonify({"keys": [key.jwk() for key in self._keys]})

    def _authorize(self) -> ResponseReturnValue:
        args = request.args
        redirect_uri = args.get("redirect_uri", "")
        # Never redirect to an unregistered URI (RFC 6749 §4.1.2.1): answer the browser directly.
        if args.get("client_id") != self.client_id or redirect_uri not in self.redirect_uris:
            return "unknown client or redirect_uri", 400
        state = args.get("state", "")

        def back(**params: str) -> ResponseReturnValue:
            query = urlencode({**params, **({"state": state} if state else {})})
            return redirect(f"{redirect_uri}?{query}", code=302)

        if args.get("response_type") != "code":
            return back(error="unsupported_response_type")
        if args.get("code_challenge_method") != "S256" or not args.get("code_challenge"):
            return back(error="invalid_request", error_description="PKCE S256 is required")
        if "openid" not in args.get("scope", "").split():
            return back(error="invalid_scope")
        if self.deny:
            return back(error="access_denied", error_description="The user denied access")
        code = secrets.token_urlsafe(32)
        with self._lock:
            self._grants[code] = _Grant(
                client_id=self.client_id,
                redirect_uri=redirect_uri,
                code_challenge=args["code_challenge"],
                nonce=args.get("nonce"),
                sub=self.sub,
                email=self.email,
            )
        return back(code=code)

    def _token(self) -> tuple[Response, int]:
        time.sleep(self.response_delay)
        form = request.form.to_dict()
        if self.token_responder is not None:
            status, raw = self.token_responder(form)
            return Response(raw, content_type="application/json"), status
        client_error = self._authenticate_client(form)
        if client_error is not None:
            return jsonify(error="invalid_client"), 401
        if form.get("grant_type") != "authorization_code":
            return jsonify(error="unsupported_grant_type"), 400
        with self._lock:
            grant = self._grants.pop(form.get("code", ""), None)  # single use, even on failure
        if grant is None or grant.redirect_uri != form.get("redirect_uri"):
            return jsonify(error="invalid_grant"), 400
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        if not hmac.compare_digest(challenge.rstrip(b"=").decode(), grant.code_challenge):
            return jsonify(error="invalid_grant", error_description="PKCE verification failed"), 400
        id_token = self.mint_id_token(nonce=grant.nonce)
        body = {
            "access_token": secrets.token_urlsafe(32),
            "token_type": "Bearer",
            "expires_in": 3600,
            "id_token": id_token,
        }
        return jsonify(body), 200

    def _authenticate_client(self, form: dict[str, str]) -> str | None:
        """None when the client authenticated as registered, else a reason."""
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            self.token_client_auth.append("basic")
            try:
                decoded = base64.b64decode(header[6:], validate=True).decode()
            except ValueError:
                return "bad basic header"
            raw_id, _, raw_secret = decoded.partition(":")
            # RFC 6749 §2.3.1: both parts are form-urlencoded before Base64.
            client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
            if client_id != self.client_id or self.client_secret is None:
                return "unknown client"
            if not hmac.compare_digest(secret.encode(), self.client_secret.encode()):
                return "wrong secret"
            return None
        if "client_secret" in form:
            self.token_client_auth.append("post")
            if self.client_secret is None or not hmac.compare_digest(
                form["client_secret"].encode(), self.client_secret.encode()
            ):
                return "wrong secret"
            return None if form.get("client_id") == self.client_id else "unknown client"
        self.token_client_auth.append("none")
        if self.client_secret is not None:
            return "this client must authenticate"
        return None if form.get("client_id") == self.client_id else "unknown client"
