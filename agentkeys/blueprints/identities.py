"""IdentityLinkStore over HTTP (§6.4): list, link with proof, unlink; the session JWKS (§6.3)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify
from marshmallow import Schema, fields

from agentkeys.blueprints.http import bearer_session, json_object, load, services
from agentkeys.broker.keys import JWKS_MAX_AGE
from agentkeys.errors import Unauthorized
from agentkeys.identity import canonical_identity
from agentkeys.sessions import IDENTITY, WALLET
from agentkeys.timefmt import rfc3339

PROOF_MAX_AGE = 600  # a link proof is a session minted at most 10 minutes ago


class LinkRequest(Schema):
    proof = fields.String(required=True)


def create_blueprint() -> Blueprint:
    bp = Blueprint("identities", __name__)
    link_schema = LinkRequest()

    @bp.get("/v1/identities")
    def list_identities() -> dict[str, Any]:
        session = bearer_session(kinds=(IDENTITY, WALLET))
        linked = services().store.identities(session.account)
        return {
            "account": session.account,
            "identities": [
                {
                    "identity_type": item.identity.type,
                    "identity_value": item.identity.value,
                    "linked_at": rfc3339(item.linked_at),
                    "status": item.status,
                }
                for item in linked
            ],
        }

    @bp.post("/v1/identities/link")
    def link() -> dict[str, Any]:
        session = bearer_session()
        proof_token = load(link_schema, json_object())["proof"]
        svc = services()
        try:
            proof = svc.sessions.verify(proof_token)
        except Unauthorized as exc:
            raise Unauthorized(f"The proof is not valid: {exc.detail}") from None
        # A fresh proof only: an old session lying around must not be enough to link.
        if svc.sessions.clock() - proof.issued_at > PROOF_MAX_AGE:
            raise Unauthorized("The proof is older than 10 minutes; sign in with it again.")
        if not svc.store.spend(proof.jti, proof.expires_at):
            raise Unauthorized("The proof has already been used.")
        linked = svc.store.merge(session.account, proof.account, proof.omni_account)
        return {
            "account": session.account,
            "identity_type": linked.identity.type,
            "identity_value": linked.identity.value,
            "linked_at": rfc3339(linked.linked_at),
        }

    @bp.delete("/v1/identities/<identity_type>/<path:identity_value>")
    def unlink(identity_type: str, identity_value: str) -> tuple[str, int]:
        session = bearer_session()
        services().store.unlink(session.account, canonical_identity(identity_type, identity_value))
        return "", 204

    @bp.post("/v1/sessions/revoke")
    def revoke_sessions() -> tuple[str, int]:
        """Sign out everywhere: every session of the account so far, this one included."""
        services().store.revoke_sessions(bearer_session().account)
        return "", 204

    @bp.get("/v1/session-keys")
    def session_keys() -> Response:
        response = jsonify(services().session_keys.jwks())
        response.headers["Cache-Control"] = f"public, max-age={JWKS_MAX_AGE}"
        return response

    return bp
