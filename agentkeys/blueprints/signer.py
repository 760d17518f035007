"""The signer's HTTP surface (PROTOCOL §5), one for /dev and /tee: the same JSON, bearer check,
order of checks and signing policy. Each app passes its own signer and its own session check."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from flask import Blueprint, g
from marshmallow import Schema, fields

from agentkeys.blueprints.parsing import json_object, load
from agentkeys.errors import Forbidden, SignerDisabled
from agentkeys.sessions import Session
from agentkeys.signer import Signer, parse_anchor, parse_message_hex

# For the OpenAPI document only: the views check these with their own error codes (§5).
ANCHOR = {"pattern": "^[0-9a-fA-F]{64}$"}
MESSAGE_HEX = {"pattern": "^(0[xX])?([0-9a-fA-F]{2})*$"}


class DeriveAddressRequest(Schema):
    omni_account = fields.String(required=True, metadata=ANCHOR)


class SignMessageRequest(Schema):
    omni_account = fields.String(required=True, metadata=ANCHOR)
    message_hex = fields.String(required=True, metadata=MESSAGE_HEX)


def create_blueprint(
    name: str,
    url_prefix: str,
    signer: Signer | None,
    authenticate: Callable[[], Session],
    *,
    disabled_detail: str = "",
) -> Blueprint:
    """A fresh blueprint with the real views, or, without a signer, one that answers 503
    signer_disabled after the body checks on the same URL rules (the order of checks, §5)."""
    bp = Blueprint(name, __name__, url_prefix=url_prefix)
    if signer is None:
        _register_disabled(bp, disabled_detail)
        return bp
    derive_schema, sign_schema = DeriveAddressRequest(), SignMessageRequest()

    @bp.post("/derive-address")
    def derive_address() -> dict[str, Any]:
        body = json_object()
        session = authenticate()
        anchor = own_anchor(load(derive_schema, body)["omni_account"], session.account)
        derived = signer.derive_address(anchor, request_id=_request_id())
        return {"address": derived.address, "key_version": derived.key_version}

    @bp.post("/sign-message")
    def sign_message() -> dict[str, Any]:
        body = json_object()
        session = authenticate()
        data = load(sign_schema, body)
        message = parse_message_hex(data["message_hex"])
        anchor = own_anchor(data["omni_account"], session.account)
        signed = signer.sign_message(anchor, message, request_id=_request_id())
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


def _request_id() -> str:
    return str(g.get("request_id", ""))


def _register_disabled(bp: Blueprint, detail: str) -> None:
    def disabled() -> NoReturn:
        json_object()
        raise SignerDisabled(detail)

    # The enabled views' endpoint names, so the OpenAPI document and metrics name one operation.
    for rule, endpoint in (
        ("/derive-address", "derive_address"),
        ("/sign-message", "sign_message"),
    ):
        bp.add_url_rule(rule, endpoint, disabled, methods=["POST"])
