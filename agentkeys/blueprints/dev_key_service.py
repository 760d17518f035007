"""DEV ONLY — replace with TEE. HTTP surface of the development signer at /dev (PROTOCOL §5).

The same URL rules are registered whether or not the signer is enabled; disabled, every route
answers 503 signer_disabled after the body checks, as the order of checks requires.
"""

from __future__ import annotations

from typing import Any, NoReturn

from flask import Blueprint
from marshmallow import Schema, fields

from agentkeys.blueprints.http import bearer_session, json_object, load
from agentkeys.dev_key_service import DevKeyService
from agentkeys.errors import Forbidden, SignerDisabled
from agentkeys.settings import MASTER_SECRET_VAR
from agentkeys.signer import parse_anchor, parse_message_hex


class DeriveAddressRequest(Schema):
    omni_account = fields.String(required=True)


class SignMessageRequest(Schema):
    omni_account = fields.String(required=True)
    message_hex = fields.String(required=True)


def create_blueprint(service: DevKeyService | None) -> Blueprint:
    """DEV ONLY — replace with TEE. A fresh blueprint: real views when `service` exists."""
    bp = Blueprint("dev_key_service", __name__, url_prefix="/dev")
    if service is None:
        _register_disabled(bp)
        return bp
    derive_schema, sign_schema = DeriveAddressRequest(), SignMessageRequest()

    @bp.post("/derive-address")
    def derive_address() -> dict[str, Any]:
        """DEV ONLY — replace with TEE."""
        body = json_object()
        session = bearer_session()
        anchor = own_anchor(load(derive_schema, body)["omni_account"], session.account)
        derived = service.derive_address(anchor)
        return {"address": derived.address, "key_version": derived.key_version}

    @bp.post("/sign-message")
    def sign_message() -> dict[str, Any]:
        """DEV ONLY — replace with TEE."""
        body = json_object()
        session = bearer_session()
        data = load(sign_schema, body)
        message = parse_message_hex(data["message_hex"])
        anchor = own_anchor(data["omni_account"], session.account)
        signed = service.sign_message(anchor, message)
        return {
            "signature": signed.signature,
            "address": signed.address,
            "key_version": signed.key_version,
        }

    return bp


def own_anchor(omni_account: str, account: str) -> str:
    """The requested anchor, which must be the bearer's own account (claim `account`)."""
    anchor = parse_anchor(omni_account)
    # Constant-time is not needed (anchors are not secret), equality is: one account, one wallet.
    if anchor != account:
        raise Forbidden("The bearer's session is for another account.")
    return anchor


def _register_disabled(bp: Blueprint) -> None:
    def disabled() -> NoReturn:
        json_object()
        raise SignerDisabled(f"The dev signer is disabled: set {MASTER_SECRET_VAR} to enable it.")

    for rule in ("/derive-address", "/sign-message"):
        bp.add_url_rule(rule, rule.strip("/"), disabled, methods=["POST"])
