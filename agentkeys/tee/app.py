"""The TEE worker's app factory: the signer surface at /tee (PROTOCOL §5) with the master secret
sealed inside, attestation (§7), an audit log and a per-account limit. No database: sessions are
checked against the broker's published keys. Served as one process, so the attested response
key, the audit chain and the limits are one (config/tee.gunicorn.conf.py)."""

from __future__ import annotations

import base64
import io
import logging
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Blueprint, Flask, g, request

from agentkeys.attestation import RESPONSE_SIGNATURE_HEADER, response_signing_input
from agentkeys.blueprints import signer as signer_blueprint
from agentkeys.blueprints.parsing import bearer_token
from agentkeys.blueprints.problems import Problem, register_error_handlers
from agentkeys.errors import AttestationUnavailable, ConfigError
from agentkeys.observability import current_request_id
from agentkeys.requestid import REQUEST_ID_HEADER, request_id_from
from agentkeys.sessions import Session
from agentkeys.signer import SigningPolicy
from agentkeys.tee.audit import AuditError, AuditLog
from agentkeys.tee.platform import Platform, PlatformError, platform_from_name
from agentkeys.tee.service import AccountLimiter, TeeSigner
from agentkeys.tee.sessions import JwksSessions, fetch_url
from agentkeys.tee.settings import WorkerSettings
from agentkeys.tee.state import SealedState, StateError

FORMAT = "aws-nitro-v1"
KEY_VERSION = 1
MIN_NONCE_BYTES, MAX_NONCE_BYTES = 16, 64
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+\Z")

log = logging.getLogger("agentkeys.tee")


def create_app(
    settings: WorkerSettings | None = None,
    *,
    platform: Platform | None = None,
    fetch_jwks: Callable[[str], bytes] = fetch_url,
) -> Flask:
    """Boot the worker: unseal (or create) the master secret, reconcile the audit log with its
    sealed head, make this process's response key. Refuses to start if any of it fails."""
    settings = settings or WorkerSettings.from_env()
    settings.validate()
    if platform is None:
        platform = platform_from_name(
            settings.platform, settings.state_dir, production=settings.is_production
        )
    state = SealedState(platform, settings.state_dir, settings.release)
    master = state.master()
    audit = AuditLog.open(settings.audit_path, state.audit_head(), state.save_audit_head)
    # Ephemeral: made at boot and never stored, so only this attested process can sign answers.
    response_key = ec.generate_private_key(ec.SECP256R1())
    sessions = JwksSessions(settings.session_jwks_url, issuer=settings.issuer, fetch=fetch_jwks)
    policy = SigningPolicy.for_issuer(
        settings.issuer, settings.allowed_signing_domains, settings.siwe_chain_ids
    )
    signer = TeeSigner(master, policy, audit, AccountLimiter(settings.rate_limit))

    app = Flask("agentkeys.tee")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["agentkeys.tee"] = signer
    register_error_handlers(app)
    register_request_ids(app)

    def authenticate() -> Session:
        return sessions.verify(bearer_token())

    app.register_blueprint(signer_blueprint.create_blueprint("tee", "/tee", signer, authenticate))
    app.register_blueprint(attestation_blueprint(platform, response_key))
    app.add_url_rule("/healthz", "healthz", lambda: {"status": "ok", "platform": platform.name})
    app.wsgi_app = SignedResponses(  # type: ignore[method-assign]
        app.wsgi_app, response_key, settings.max_body_bytes
    )
    return app


def register_request_ids(app: Flask) -> None:
    """Each request's id for the audit log and the log lines: the caller's X-Request-ID if
    well-formed, else ours."""

    @app.before_request
    def _take() -> None:
        g.request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
        current_request_id.set(g.request_id)

    @app.after_request
    def _echo(response: Any) -> Any:
        response.headers[REQUEST_ID_HEADER] = g.get("request_id", "")
        return response

    @app.teardown_request
    def _forget(_exc: BaseException | None) -> None:
        current_request_id.set(None)  # the thread serves its next request afresh


def attestation_blueprint(
    platform: Platform, response_key: ec.EllipticCurvePrivateKey
) -> Blueprint:
    bp = Blueprint("tee_attestation", __name__, url_prefix="/tee")
    public_key = response_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    @bp.get("/attestation")
    def attestation() -> dict[str, Any]:
        """A document binding the caller's nonce and this process's response key (§7)."""
        raw = request.args.get("nonce", "")
        if not _HEX.match(raw) or not MIN_NONCE_BYTES <= len(raw) // 2 <= MAX_NONCE_BYTES:
            raise Problem(400, "invalid_nonce", "nonce must be 16 to 64 bytes of hex.")
        try:
            document = platform.attest(nonce=bytes.fromhex(raw), public_key=public_key)
        except PlatformError as exc:
            raise AttestationUnavailable(f"The platform cannot attest: {exc}") from None
        return {
            "format": FORMAT,
            "platform": platform.name,
            "document": base64.b64encode(document).decode(),
            "key_version": KEY_VERSION,
        }

    return bp


class SignedResponses:
    """WSGI middleware signing every response, errors and 404s included, with the response key
    (§7): over the method, path with query, status and the hashes of both bodies."""

    def __init__(self, app: Any, key: ec.EllipticCurvePrivateKey, max_body: int) -> None:
        self.app, self.key, self.max_body = app, key, max_body

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        body = self._read_body(environ)
        answer: dict[str, Any] = {}
        chunks: list[bytes] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            answer.update(status=status, headers=headers, exc_info=exc_info)
            return chunks.append

        result = self.app(environ, capture)
        try:
            chunks.extend(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        content = b"".join(chunks)
        status = answer["status"]
        signed = response_signing_input(
            environ["REQUEST_METHOD"],
            _path_with_query(environ),
            int(status.split()[0]),
            body,
            content,
        )
        signature = base64.b64encode(self.key.sign(signed, ec.ECDSA(hashes.SHA256()))).decode()
        drop = {RESPONSE_SIGNATURE_HEADER.lower(), "content-length"}
        headers = [(k, v) for k, v in answer["headers"] if k.lower() not in drop]
        headers += [(RESPONSE_SIGNATURE_HEADER, signature), ("Content-Length", str(len(content)))]
        start_response(status, headers, answer["exc_info"])
        return [content]

    def _read_body(self, environ: dict[str, Any]) -> bytes:
        """The whole request body, once, for the signature; the app reads it again from memory.
        A declared body over the limit is not read (the app answers 413, signed over b"")."""
        declared = environ.get("CONTENT_LENGTH") or ""
        stream = environ["wsgi.input"]
        body: bytes
        if declared.isdigit():
            if int(declared) > self.max_body:
                environ["wsgi.input"] = io.BytesIO()
                return b""
            body = stream.read(int(declared))
        elif environ.get("wsgi.input_terminated"):
            body = stream.read(self.max_body + 1)  # a chunked body; over the limit is 413
        else:
            body = b""
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        return body


def _path_with_query(environ: dict[str, Any]) -> str:
    """The request target as the client sent it (gunicorn and werkzeug keep it raw)."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return str(raw)
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    query = environ.get("QUERY_STRING", "")
    return f"{path}?{query}" if query else path


# gunicorn's arbiter halts when a worker exits with this code (see agentkeys.broker.factory).
APP_LOAD_ERROR = 4


def app_from_env() -> Flask:
    """The worker for gunicorn: a bad configuration or sealed state exits with one line."""
    try:
        return create_app()
    except ConfigError as exc:
        refusal = f"agentkeys-tee: configuration error: {exc.detail}"
    except (PlatformError, StateError, AuditError) as exc:
        refusal = f"agentkeys-tee: refusing to start: {exc}"
    print(refusal, file=sys.stderr, flush=True)
    raise SystemExit(APP_LOAD_ERROR)
