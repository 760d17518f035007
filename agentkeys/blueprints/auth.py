"""Sign-in (§6.1 email magic link, §6.2 OAuth2/OIDC): requests, approval pages, status polls."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, render_template, request
from marshmallow import Schema, fields

from agentkeys.blueprints.http import (
    bearer_token,
    client_ip,
    json_object,
    load,
    rate_limit,
    services,
)
from agentkeys.broker.login import CONSUMED, VERIFIED, Started
from agentkeys.broker.mail import build_sign_in_mail
from agentkeys.broker.oauth2 import new_nonce, new_pkce, new_state
from agentkeys.errors import InvalidRequest, OAuth2Error
from agentkeys.identity import EMAIL, OAUTH2_PREFIX, Identity, canonical_email, mailbox
from agentkeys.timefmt import rfc3339


class EmailRequest(Schema):
    email = fields.String(required=True, metadata={"format": "email", "maxLength": 254})


class TokenRequest(Schema):
    token = fields.String(required=True)


class OAuth2StartRequest(Schema):
    provider = fields.String(required=True, metadata={"pattern": "^[a-z0-9]+$"})


class ApprovalRequest(Schema):
    approval_token = fields.String(required=True)


BAD_STATE = "This sign-in page is invalid, was already used or has expired. Start again."


class InvalidToken(InvalidRequest):
    code = "invalid_token"


def page(template: str, status: int = 200, **context: Any) -> Response:
    """An HTML page with strict headers: nothing external, nothing cached, no referrer."""
    nonce = secrets.token_urlsafe(16)
    response = Response(render_template(template, nonce=nonce, **context), status)
    response.headers["Content-Security-Policy"] = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    return response


def started_body(started: Started, kind: str) -> dict[str, Any]:
    return {
        "request_id": started.request_id,
        "poll_token": started.poll_token,
        "poll_url": f"/v1/auth/{kind}/status/{started.request_id}",
        "user_code": started.user_code,
        "expires_in_seconds": started.expires_at - services().logins.clock(),
    }


def poll_status(request_id: str) -> dict[str, Any]:
    """§6.1 status: a verified request hands out its session once, at this pickup."""
    svc = services()
    status = svc.logins.status(request_id, bearer_token())
    if status.status == VERIFIED and status.identity is not None:
        account = svc.store.sign_in(status.identity)
        token, session = svc.sessions.mint(account, status.identity)
        if not svc.logins.pickup(request_id):  # another poll handed it out first
            return {"status": CONSUMED}
        return {
            "status": VERIFIED,
            "session_jwt": token,
            "expires_at": rfc3339(session.expires_at),
            "account": account,
            "omni_account": session.omni_account,
            "identity_type": session.identity_type,
        }
    body: dict[str, Any] = {"status": status.status}
    if status.error is not None:
        body.update(error=status.error, reason=status.reason)
    return body


def approve(token: str) -> dict[str, Any]:
    rate_limit("verify_ip", client_ip())
    user_code = services().logins.approve(token)
    if user_code is None:
        raise InvalidToken("This sign-in link is invalid, expired or already used.")
    return {"ok": True, "user_code": user_code}


def create_blueprint() -> Blueprint:
    bp = Blueprint("auth", __name__)
    email_schema, token_schema = EmailRequest(), TokenRequest()
    start_schema, approval_schema = OAuth2StartRequest(), ApprovalRequest()

    @bp.post("/v1/auth/email/request")
    def email_request() -> tuple[dict[str, Any], int]:
        body = load(email_schema, json_object())
        rate_limit("email_ip", client_ip())
        email = Identity(EMAIL, canonical_email(body["email"]))
        # One counter per mailbox: subaddresses (`+tag`) must not multiply the mail limit.
        rate_limit("email_address", mailbox(email.value))
        svc = services()
        started = svc.logins.start_email(email)
        link = f"{svc.settings.issuer}/auth/email/landing#t={started.approve_token}"
        message = build_sign_in_mail(
            to=email.value,
            sender=svc.settings.mail_from,
            link=link,
            user_code=started.user_code,
            expires_at=datetime.fromtimestamp(started.expires_at, UTC),
            issuer=svc.settings.issuer,
        )
        try:
            svc.mailer.send(message)
        except Exception:
            svc.logins.fail(
                started.request_id, "mail_failed", "The sign-in mail could not be sent."
            )
            raise
        return started_body(started, "email"), 202

    @bp.get("/auth/email/landing")
    def email_landing() -> Response:
        return page("approve.html", endpoint="/v1/auth/email/verify", field="token")

    @bp.post("/v1/auth/email/verify")
    def email_verify() -> dict[str, Any]:
        return approve(load(token_schema, json_object())["token"])

    @bp.get("/v1/auth/email/status/<request_id>")
    def email_status(request_id: str) -> dict[str, Any]:
        return poll_status(request_id)

    @bp.post("/v1/auth/oauth2/start")
    def oauth2_start() -> dict[str, Any]:
        name = load(start_schema, json_object())["provider"]
        rate_limit("start_ip", client_ip())
        svc = services()
        client = svc.oidc_client(name)
        verifier, challenge = new_pkce()
        state, nonce = new_state(), new_nonce()
        url = client.authorization_url(state=state, nonce=nonce, code_challenge=challenge)
        started = svc.logins.start_oauth2(name, state, nonce, verifier)
        return {**started_body(started, "oauth2"), "authorization_url": url}

    @bp.get("/auth/oauth2/callback")
    def oauth2_callback() -> Response:
        svc = services()
        pending = svc.logins.take_state(request.args.get("state", ""))
        if pending is None:
            return page("message.html", 400, title="Sign-in link expired", message=BAD_STATE)
        if "error" in request.args:
            reason = f"The provider refused: {request.args['error'][:100]}"
            if request.args.get("error_description"):
                reason += f" ({request.args['error_description'][:200]})"
            svc.logins.fail(pending.request_id, "provider_error", reason)
            return page("message.html", 400, title="Sign-in failed", message=reason)
        try:
            client = svc.oidc_client(pending.provider)
            id_token = client.exchange_code(request.args.get("code", ""), pending.code_verifier)
            claims = client.verify_id_token(id_token, nonce=pending.nonce)
        except OAuth2Error as exc:
            svc.logins.fail(pending.request_id, exc.code, exc.detail)
            return page("message.html", 502, title="Sign-in failed", message=exc.detail)
        identity = Identity(OAUTH2_PREFIX + pending.provider, str(claims["sub"]))
        approval_token = svc.logins.identified(pending.request_id, identity)
        return page(
            "approve.html",
            user_code=pending.user_code,
            approval_token=approval_token,
            endpoint="/v1/auth/oauth2/approve",
            field="approval_token",
        )

    @bp.post("/v1/auth/oauth2/approve")
    def oauth2_approve() -> dict[str, Any]:
        return approve(load(approval_schema, json_object())["approval_token"])

    @bp.get("/v1/auth/oauth2/status/<request_id>")
    def oauth2_status(request_id: str) -> dict[str, Any]:
        return poll_status(request_id)

    return bp
