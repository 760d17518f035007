"""DEV ONLY — replace with TEE. The development signer at /dev (PROTOCOL §5), on the signer
surface it shares with the TEE worker; without a master secret every route answers 503."""

from __future__ import annotations

from flask import Blueprint

from agentkeys.blueprints import signer
from agentkeys.blueprints.http import bearer_session
from agentkeys.broker.dev_key_service import DevKeyService
from agentkeys.settings import MASTER_SECRET_VAR


def create_blueprint(service: DevKeyService | None) -> Blueprint:
    """DEV ONLY — replace with TEE. A fresh blueprint: real views when `service` exists."""
    return signer.create_blueprint(
        "dev_key_service",
        "/dev",
        service,
        bearer_session,
        disabled_detail=f"The dev signer is disabled: set {MASTER_SECRET_VAR} to enable it.",
    )
