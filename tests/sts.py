"""What AWS STS checks before AssumeRoleWithWebIdentity accepts a token, fetched over HTTP from
the running issuer the way STS does. moto's STS accepts any string, so tests run this first."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jwt
import requests

ALGORITHMS = {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512"}
MAX_TOKEN_CHARS = 20_000
MAX_TAGS, MAX_TAG_KEY, MAX_TAG_VALUE = 50, 128, 256
TAGS_CLAIM = "https://aws.amazon.com/tags"


class Rejected(Exception):
    """STS would answer InvalidIdentityToken (or a tag error) for this token."""


def fetch_json(url: str) -> Any:
    return requests.get(url, timeout=5).json()


def check(
    token: str,
    *,
    provider_url: str,
    client_ids: list[str],
    now: float | None = None,
    get_json: Callable[[str], Any] = fetch_json,
) -> dict[str, Any]:
    """The token's claims if STS would accept it from the OIDC provider at `provider_url`.
    `get_json` fetches a URL (over HTTP unless a test serves the app in-process)."""
    if len(token) > MAX_TOKEN_CHARS:
        raise Rejected(f"token is longer than {MAX_TOKEN_CHARS} characters")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise Rejected(f"not a JWT: {exc}") from None
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise Rejected(f"alg {alg!r} is not one STS accepts")
    discovery = get_json(provider_url + "/.well-known/openid-configuration")
    if discovery.get("issuer") != provider_url:
        raise Rejected("discovery issuer does not match the provider URL")
    keys = get_json(discovery["jwks_uri"]).get("keys", [])
    kid = header.get("kid")
    matching = (
        [k for k in keys if k.get("kid") == kid] if kid else keys[:1] if len(keys) == 1 else []
    )
    if not matching:
        raise Rejected(f"no key {kid!r} in the provider's JWKS")
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            jwt.PyJWK(matching[0], algorithm=alg).key,
            algorithms=[alg],
            options={
                "verify_aud": False,
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
    except jwt.PyJWTError as exc:
        raise Rejected(f"signature or format: {exc}") from None
    if claims.get("iss") != provider_url:
        raise Rejected("iss does not match the provider URL exactly")
    audiences = claims.get("aud")
    audiences = [audiences] if isinstance(audiences, str) else audiences or []
    if not any(aud in client_ids for aud in audiences):
        raise Rejected("aud is not one of the provider's client ids")
    for name in ("iat", "exp", "nbf"):
        if name in claims and type(claims[name]) is not int:
            raise Rejected(f"{name} must be an integer")
    if "iat" not in claims or "exp" not in claims or not claims.get("sub"):
        raise Rejected("iat, exp and sub are required")
    moment = time.time() if now is None else now
    if claims["exp"] <= moment:
        raise Rejected("token is expired")
    if claims.get("nbf", 0) > moment + 60:
        raise Rejected("token is not yet valid")
    check_tags(claims.get(TAGS_CLAIM))
    return claims


def check_tags(tags: Any) -> None:
    """Session tags as STS reads them from the token."""
    if tags is None:
        return
    if not isinstance(tags, dict) or not isinstance(tags.get("principal_tags"), dict):
        raise Rejected("tags claim must hold a principal_tags object")
    principal = tags["principal_tags"]
    if len(principal) > MAX_TAGS:
        raise Rejected(f"more than {MAX_TAGS} session tags")
    for key, values in principal.items():
        if not 1 <= len(key) <= MAX_TAG_KEY:
            raise Rejected(f"tag key longer than {MAX_TAG_KEY} characters")
        if not (isinstance(values, list) and len(values) == 1 and isinstance(values[0], str)):
            raise Rejected(f"tag {key} must be a list of one string")
        if len(values[0]) > MAX_TAG_VALUE:
            raise Rejected(f"tag {key} value longer than {MAX_TAG_VALUE} characters")
    transitive = tags.get("transitive_tag_keys", [])
    if not isinstance(transitive, list) or not set(transitive) <= set(principal):
        raise Rejected("transitive_tag_keys must name principal tags")


class CheckingSts:
    """moto's STS behind this checker, on loopback: AssumeRoleWithWebIdentity reaches moto only
    with a token STS itself would accept from `provider_url`; otherwise InvalidIdentityToken,
    as STS answers. Every other call passes through. `checked` counts the tokens it passed."""

    def __init__(self, moto_url: str, provider_url: str) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs

        checker = self
        self.checked = 0
        self.tokens: list[str] = []  # every web identity token it was sent

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                form = parse_qs(body.decode())
                if form.get("Action") == ["AssumeRoleWithWebIdentity"]:
                    checker.tokens.append(form.get("WebIdentityToken", [""])[0])
                    try:
                        check(
                            form.get("WebIdentityToken", [""])[0],
                            provider_url=provider_url,
                            client_ids=["sts.amazonaws.com"],
                        )
                    except Rejected as exc:
                        return self.reply(400, _sts_error("InvalidIdentityToken", str(exc)))
                    checker.checked += 1
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                answer = requests.post(moto_url + self.path, data=body, headers=headers, timeout=30)
                self.reply(answer.status_code, answer.content)

            def reply(self, status: int, content: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _sts_error(code: str, message: str) -> bytes:
    from xml.sax.saxutils import escape

    return (
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error>'
        f"<Type>Sender</Type><Code>{code}</Code><Message>{escape(message)}</Message>"
        "</Error><RequestId>checker</RequestId></ErrorResponse>"
    ).encode()
