"""The broker's OpenAPI 3.1 document at GET /openapi.json, built by apispec from the marshmallow
schemas: the request schemas beside their views, the response schemas in schemas.py. It names
every URL rule of the app (a test holds that) and every error status each one answers."""

from __future__ import annotations

from collections.abc import Collection
from http import HTTPStatus
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Response, current_app, jsonify
from marshmallow import Schema

from agentkeys.blueprints import schemas
from agentkeys.blueprints.auth import (
    ApprovalRequest,
    EmailRequest,
    OAuth2StartRequest,
    TokenRequest,
)
from agentkeys.blueprints.http import services
from agentkeys.blueprints.identities import LinkRequest
from agentkeys.blueprints.signer import DeriveAddressRequest, SignMessageRequest
from agentkeys.blueprints.wallet import (
    REQUEST_ID,
    WalletLinkRequest,
    WalletStartRequest,
    WalletVerifyRequest,
)

VERSION = "1.1"  # spec/PROTOCOL.md
IDENTITY, WALLET, POLL = "identitySession", "walletSession", "pollToken"
HTML = {"text/html": {"schema": {"type": "string"}}}
# What every JSON body can be refused with (§4): size, then content type, then syntax/fields.
BODY_ERRORS = (400, 413, 415)
# Every operation that reads the database (or the rate-limit store) answers 503 in an outage.
OUTAGE = 503
# Operations only some apps serve: /metrics exists with AGENTKEYS_METRICS=on.
OPTIONAL = {"metrics.scrape"}

# The error codes each status carries, for the descriptions of the shared responses.
ERROR_CODES = {
    400: "invalid_json, invalid_request, or the field's own code (invalid_email, "
    "invalid_address, invalid_signature, invalid_omni_account, invalid_message_hex, "
    "invalid_token, unknown_provider, chain_not_allowed, …)",
    401: "unauthorized, challenge_used, challenge_expired, invalid_signature",
    403: "forbidden, message_not_allowed, wallet_session_required",
    404: "unknown_request, not_found",
    409: "identity_already_linked, identity_conflict, anchor_identity, last_identity",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    502: "oauth2_failed (the provider's discovery or token endpoint failed)",
    503: "database_unavailable, limits_unavailable (with Retry-After), not_ready, "
    "signer_disabled, mail_failed",
}
HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}},
    429: {"Retry-After": {"schema": {"type": "string", "pattern": "^[0-9]+$"}, "required": True}},
}
BEARERS = {
    IDENTITY: "An identity session (email or OAuth2 sign-in, §6.3).",
    WALLET: "A wallet session (SIWE sign-in, §6.4): mints OIDC tokens and reads identities.",
    POLL: "The poll token of the sign-in request (§6.1).",
}


def problem_name(status: int) -> str:
    return HTTPStatus(status).phrase.replace(" ", "").replace("-", "")


def json_body(schema: type[Schema] | str) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def operation(
    endpoint: str,
    summary: str,
    ok: dict[int, dict[str, Any]],
    errors: tuple[int, ...] = (),
    *,
    body: type[Schema] | None = None,
    security: list[dict[str, list[str]]] | None = None,
    parameters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """An operation object: success bodies by status, then the shared problem responses."""
    responses: dict[str, Any] = {
        str(status): {"description": HTTPStatus(status).phrase, **response}
        for status, response in ok.items()
    }
    responses |= {str(status): problem_name(status) for status in sorted(errors)}
    found: dict[str, Any] = {"operationId": endpoint, "summary": summary, "responses": responses}
    if body is not None:
        found["requestBody"] = {"required": True, "content": json_body(body)}
    if security is not None:
        found["security"] = security
    if parameters:
        found["parameters"] = parameters
    return found


def content(schema: type[Schema] | str) -> dict[str, Any]:
    return {"content": json_body(schema)}


def path_parameter(name: str, **schema: Any) -> dict[str, Any]:
    return {"in": "path", "name": name, "required": True, "schema": {"type": "string", **schema}}


def query_parameter(name: str) -> dict[str, Any]:
    return {"in": "query", "name": name, "required": False, "schema": {"type": "string"}}


def bearer(*names: str, optional: bool = False) -> list[dict[str, list[str]]]:
    """Alternatives of security requirements; `optional` also allows none."""
    return ([{}] if optional else []) + [{name: []} for name in names]


def paths() -> dict[str, dict[str, dict[str, Any]]]:
    """Every operation by path and method (§5, §6), with Flask's endpoint as its operationId."""
    poll = bearer(POLL)
    request_id = [path_parameter("request_id", **REQUEST_ID)]
    sign_in_status = content("SignInStatus")
    jwks = content(schemas.JWKS)
    return {
        "/healthz": {
            "get": operation(
                "health.healthz", "Liveness: the process answers.", {200: content(schemas.Health)}
            )
        },
        "/readyz": {
            "get": operation(
                "health.readyz",
                "Readiness: the database answers at the current schema revision.",
                {200: content(schemas.Ready)},
                (OUTAGE,),
            )
        },
        "/openapi.json": {
            "get": operation(
                "openapi.document",
                "This document.",
                {200: {"content": {"application/json": {"schema": {"type": "object"}}}}},
            )
        },
        "/static/{filename}": {
            "get": operation(
                "static",
                "Flask's static route; the broker ships no static files, so it answers 404.",
                {},
                (404,),
                parameters=[path_parameter("filename")],
            )
        },
        "/metrics": {
            "get": operation(
                "metrics.scrape",
                "Prometheus counts by endpoint and outcome; only with AGENTKEYS_METRICS=on.",
                {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
            )
        },
        "/v1/auth/email/request": {
            "post": operation(
                "auth.email_request",
                "Start an email sign-in: mails a magic link (§6.1).",
                {202: content(schemas.SignInStarted)},
                (*BODY_ERRORS, 429, OUTAGE),
                body=EmailRequest,
            )
        },
        "/auth/email/landing": {
            "get": operation(
                "auth.email_landing",
                "The magic link's page: an Approve button that posts the fragment token.",
                {200: {"content": HTML}},
            )
        },
        "/v1/auth/email/verify": {
            "post": operation(
                "auth.email_verify",
                "Approve an email sign-in with the magic-link token.",
                {200: content(schemas.Approved)},
                (*BODY_ERRORS, 429, OUTAGE),
                body=TokenRequest,
            )
        },
        "/v1/auth/email/status/{request_id}": {
            "get": operation(
                "auth.email_status",
                "Poll an email sign-in; the session is handed out once.",
                {200: sign_in_status},
                (401, 404, OUTAGE),
                security=poll,
                parameters=request_id,
            )
        },
        "/v1/auth/oauth2/start": {
            "post": operation(
                "auth.oauth2_start",
                "Start an OAuth2/OIDC sign-in (authorization code + PKCE S256, §6.2).",
                {200: content(schemas.OAuth2Started)},
                (*BODY_ERRORS, 429, 502, OUTAGE),
                body=OAuth2StartRequest,
            )
        },
        "/auth/oauth2/callback": {
            "get": operation(
                "auth.oauth2_callback",
                "The provider's redirect: an Approve page, or a page saying why not.",
                {200: {"content": HTML}, 400: {"content": HTML}, 502: {"content": HTML}},
                (OUTAGE,),
                parameters=[
                    query_parameter(name)
                    for name in ("state", "code", "error", "error_description")
                ],
            )
        },
        "/v1/auth/oauth2/approve": {
            "post": operation(
                "auth.oauth2_approve",
                "Approve an OAuth2 sign-in with the callback page's one-time token.",
                {200: content(schemas.Approved)},
                (*BODY_ERRORS, 429, OUTAGE),
                body=ApprovalRequest,
            )
        },
        "/v1/auth/oauth2/status/{request_id}": {
            "get": operation(
                "auth.oauth2_status",
                "Poll an OAuth2 sign-in; the session is handed out once.",
                {200: sign_in_status},
                (401, 404, OUTAGE),
                security=poll,
                parameters=request_id,
            )
        },
        "/v1/identities": {
            "get": operation(
                "identities.list_identities",
                "The account's identities: linked ones, then wallets waiting for their proof.",
                {200: content(schemas.IdentityList)},
                (401, OUTAGE),
                security=bearer(IDENTITY, WALLET),
            )
        },
        "/v1/identities/link": {
            "post": operation(
                "identities.link",
                "Link another identity by a fresh, single-use session of it (its proof).",
                {200: content(schemas.IdentityLinked)},
                (*BODY_ERRORS, 401, 409, OUTAGE),
                body=LinkRequest,
                security=bearer(IDENTITY),
            )
        },
        "/v1/identities/{identity_type}/{identity_value}": {
            "delete": operation(
                "identities.unlink",
                "Unlink an identity; never the anchor identity nor the last sign-in identity.",
                {204: {}},
                (400, 401, 404, 409, OUTAGE),
                security=bearer(IDENTITY),
                parameters=[
                    path_parameter("identity_type", pattern=r"^(email|evm|oauth2_[a-z0-9]+)$"),
                    path_parameter("identity_value"),
                ],
            )
        },
        "/v1/sessions/revoke": {
            "post": operation(
                "identities.revoke_sessions",
                "Sign out everywhere: revoke every session of the account so far.",
                {204: {}},
                (401, OUTAGE),
                security=bearer(IDENTITY),
            )
        },
        "/v1/session-keys": {
            "get": operation(
                "identities.session_keys",
                "The session JWKS, for a signer running elsewhere (§6.3).",
                {200: jwks},
                (OUTAGE,),
            )
        },
        "/v1/wallet/link": {
            "post": operation(
                "wallet.wallet_link",
                "Ask to link a wallet; it is confirmed by a bound SIWE sign-in.",
                {200: content(schemas.WalletLinked), 202: content(schemas.WalletLinkPending)},
                (*BODY_ERRORS, 401, 409, OUTAGE),
                body=WalletLinkRequest,
                security=bearer(IDENTITY),
            )
        },
        "/v1/auth/wallet/start": {
            "post": operation(
                "wallet.wallet_start",
                "A SIWE challenge: bound to the account with an identity bearer, plain without.",
                {200: content(schemas.WalletChallenge)},
                (*BODY_ERRORS, 401, 409, 429, OUTAGE),
                body=WalletStartRequest,
                security=bearer(IDENTITY, optional=True),
            )
        },
        "/v1/auth/wallet/verify": {
            "post": operation(
                "wallet.wallet_verify",
                "Verify the signed challenge: a wallet session.",
                {200: content(schemas.WalletSession)},
                (*BODY_ERRORS, 401, 404, 409, 429, OUTAGE),
                body=WalletVerifyRequest,
            )
        },
        "/v1/mint-oidc-jwt": {
            "post": operation(
                "wallet.mint_oidc_jwt",
                "Mint an OIDC token for AWS STS (§6.5); wallet sessions only.",
                {200: content(schemas.MintedToken)},
                (401, 403, OUTAGE),
                security=bearer(WALLET, IDENTITY),
            )
        },
        "/.well-known/openid-configuration": {
            "get": operation(
                "wallet.openid_configuration",
                "OIDC discovery for the minted tokens.",
                {200: content(schemas.OpenIDConfiguration)},
            )
        },
        "/.well-known/jwks.json": {
            "get": operation(
                "wallet.jwks", "The keys that sign the minted OIDC tokens.", {200: jwks}, (OUTAGE,)
            )
        },
        "/dev/derive-address": {
            "post": operation(
                "dev_key_service.derive_address",
                "DEV ONLY: the wallet address of the bearer's account (§5).",
                {200: content(schemas.DerivedAddress)},
                (*BODY_ERRORS, 401, 403, OUTAGE),
                body=DeriveAddressRequest,
                security=bearer(IDENTITY),
            )
        },
        "/dev/sign-message": {
            "post": operation(
                "dev_key_service.sign_message",
                "DEV ONLY: EIP-191 signature of a bound SIWE challenge of the bearer's account.",
                {200: content(schemas.SignedMessage)},
                (*BODY_ERRORS, 401, 403, OUTAGE),
                body=SignMessageRequest,
                security=bearer(IDENTITY),
            )
        },
    }


def served_by_default() -> set[str]:
    """The operations of an app with the default settings: all but the OPTIONAL ones."""
    return {found["operationId"] for ops in paths().values() for found in ops.values()} - OPTIONAL


def build_document(issuer: str, endpoints: Collection[str]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a broker at `issuer` that serves `endpoints`."""
    spec = APISpec(
        title="AgentKeys broker",
        version=VERSION,
        openapi_version="3.1.0",
        plugins=[MarshmallowPlugin()],
        servers=[{"url": issuer}],
    )
    spec.components.schema("Problem", schema=schemas.Problem)
    for status in sorted(ERROR_CODES):
        spec.components.response(
            problem_name(status),
            {
                "description": f"{HTTPStatus(status).phrase}: {ERROR_CODES[status]}.",
                "content": {"application/problem+json": {"schema": "Problem"}},
                **({"headers": HEADERS[status]} if status in HEADERS else {}),
            },
        )
    for name, description in BEARERS.items():
        spec.components.security_scheme(
            name, {"type": "http", "scheme": "bearer", "description": description}
        )
    for status_schema in schemas.SIGN_IN_STATUSES:
        spec.components.schema(status_schema.__name__, schema=status_schema)
    spec.components.schema(
        "SignInStatus",
        {"oneOf": [status_schema.__name__ for status_schema in schemas.SIGN_IN_STATUSES]},
    )
    for path, operations in paths().items():
        kept = {m: found for m, found in operations.items() if found["operationId"] in endpoints}
        if kept:
            spec.path(path=path, operations=kept)
    return spec.to_dict()


def create_blueprint() -> Blueprint:
    bp = Blueprint("openapi", __name__)
    built: dict[str, dict[str, Any]] = {}

    @bp.get("/openapi.json")
    def document() -> Response:
        """Built on first use, once the app has all its routes; then kept."""
        if "document" not in built:
            issuer = services().settings.issuer
            built["document"] = build_document(issuer, current_app.view_functions)
        return jsonify(built["document"])

    return bp
