"""Wallet linking and SIWE sign-in (§6.4), OIDC minting and discovery (§6.5)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request
from marshmallow import Schema, fields, validate

from agentkeys.blueprints.http import (
    bearer_session,
    client_ip,
    json_object,
    load,
    rate_limit,
    services,
)
from agentkeys.broker.keys import JWKS_MAX_AGE
from agentkeys.broker.oidc import JWKS_PATH, discovery_document
from agentkeys.crypto import normalize_address, to_checksum_address
from agentkeys.errors import InvalidRequest, WalletSessionRequired
from agentkeys.identity import EVM, Identity
from agentkeys.sessions import IDENTITY, WALLET
from agentkeys.timefmt import rfc3339

CACHE = f"public, max-age={JWKS_MAX_AGE}"
# For the OpenAPI document only (the views check these with their own error codes): §3's three
# forms of an address (a mixed-case one must also be EIP-55) and a 65-byte signature.
ADDRESS = {"pattern": "^0x([0-9a-f]{40}|[0-9A-F]{40}|[0-9a-fA-F]{40})$"}
SIGNATURE = {"pattern": "^(0x)?[0-9a-fA-F]{130}$"}
REQUEST_ID = {"pattern": "^[A-Za-z0-9_-]{16,64}$"}  # login.REQUEST_ID: the ids this service issues


class WalletLinkRequest(Schema):
    identity_type = fields.String(required=True, metadata={"enum": [EVM]})
    identity_value = fields.String(required=True, metadata=ADDRESS)


class WalletStartRequest(Schema):
    address = fields.String(required=True, metadata=ADDRESS)
    chain_id = fields.Integer(strict=True, validate=validate.Range(min=1))


class WalletVerifyRequest(Schema):
    request_id = fields.String(required=True, metadata=REQUEST_ID)
    signature = fields.String(required=True, metadata=SIGNATURE)


def create_blueprint() -> Blueprint:
    bp = Blueprint("wallet", __name__)
    link_schema, start_schema = WalletLinkRequest(), WalletStartRequest()
    verify_schema = WalletVerifyRequest()

    @bp.post("/v1/wallet/link")
    def wallet_link() -> tuple[dict[str, str], int]:
        session = bearer_session()
        body = load(link_schema, json_object())
        if body["identity_type"] != EVM:
            raise InvalidRequest("Only identity_type evm is linked here.")
        address = normalize_address(body["identity_value"])
        status = services().store.request_wallet_link(session.account, address)
        return {"status": status}, 200 if status == "linked" else 202

    @bp.post("/v1/auth/wallet/start")
    def wallet_start() -> dict[str, Any]:
        body = json_object()
        # With an identity bearer the challenge is bound to that account; without, plain.
        session = bearer_session() if "Authorization" in request.headers else None
        data = load(start_schema, body)
        address = normalize_address(data["address"])
        rate_limit("start_ip", client_ip())
        challenge = services().wallet.start(address, data.get("chain_id"), session)
        return {
            "request_id": challenge.request_id,
            "siwe_message": challenge.message,
            "nonce": challenge.nonce,
            "expires_at": rfc3339(challenge.expires_at),
        }

    @bp.post("/v1/auth/wallet/verify")
    def wallet_verify() -> dict[str, Any]:
        data = load(verify_schema, json_object())
        rate_limit("verify_ip", client_ip())
        svc = services()
        signed_in = svc.wallet.verify(data["request_id"], data["signature"])
        identity = Identity(EVM, signed_in.address)
        token, session = svc.sessions.mint(
            signed_in.account, identity, kind=WALLET, wallet=signed_in.address
        )
        return {
            "session_jwt": token,
            "expires_at": rfc3339(session.expires_at),
            "account": signed_in.account,
            "omni_account": session.omni_account,
            "wallet_address": to_checksum_address(signed_in.address),
        }

    @bp.post("/v1/mint-oidc-jwt")
    def mint_oidc_jwt() -> dict[str, Any]:
        session = bearer_session(kinds=(IDENTITY, WALLET))
        # Only a wallet session, short and mint-only, may turn into AWS credentials.
        if session.kind != WALLET or session.wallet_address is None:
            raise WalletSessionRequired("Sign in with the wallet (SIWE) to mint a token.")
        token, expires_at = services().oidc.mint(session)
        return {
            "jwt": token,
            "expires_at": rfc3339(expires_at),
            "wallet_address": to_checksum_address(session.wallet_address),
        }

    @bp.get("/.well-known/openid-configuration")
    def openid_configuration() -> Response:
        response = jsonify(discovery_document(services().settings.issuer))
        response.headers["Cache-Control"] = CACHE
        return response

    @bp.get(JWKS_PATH)
    def jwks() -> Response:
        response = jsonify(services().oidc_keys.jwks())
        response.headers["Cache-Control"] = CACHE
        return response

    return bp
