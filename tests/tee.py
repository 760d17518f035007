"""Helpers for TEE worker tests: a worker app whose session keys come from a broker app."""

from __future__ import annotations

import base64
import dataclasses
import time
from pathlib import Path
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from agentkeys.attestation import (
    RESPONSE_SIGNATURE_HEADER,
    verify_attestation,
    verify_response_signature,
)
from agentkeys.tee.app import create_app
from agentkeys.tee.platform import SimulatedPlatform
from agentkeys.tee.settings import WorkerSettings
from agentkeys.tee.state import SealedState

NONCE = "ab" * 32
BASE_WORKER = WorkerSettings(env="development", issuer="http://127.0.0.1:8000")


def worker_settings(state_dir: Path, **overrides: Any) -> WorkerSettings:
    return dataclasses.replace(BASE_WORKER, state_dir=state_dir, **overrides)


def worker_app(
    broker: Flask, state_dir: Path, master: bytes | None = None, **overrides: Any
) -> Flask:
    """A worker on `state_dir` (its master imported first when given), trusting `broker`'s
    session keys, fetched through the broker's test client."""
    settings = worker_settings(state_dir, **overrides)
    if master is not None and not (state_dir / "master.sealed").exists():
        platform = SimulatedPlatform(state_dir)
        SealedState(platform, state_dir, settings.release).import_master(master)
    jwks = broker.test_client()

    def fetch(url: str) -> bytes:
        assert url == settings.session_jwks_url
        data: bytes = jwks.get("/v1/session-keys").data
        return data

    app = create_app(settings, fetch_jwks=fetch)
    app.config["TESTING"] = True
    return app


def response_key(client: FlaskClient, state_dir: Path, nonce: str = NONCE) -> bytes:
    """The worker's attested response key, checked as the daemon checks it."""
    answer = client.get(f"/tee/attestation?nonce={nonce}")
    assert answer.status_code == 200, answer.json
    root = SimulatedPlatform(state_dir).root_der
    document = base64.b64decode(answer.json["document"])  # type: ignore[index]

    attested = verify_attestation(
        document,
        root_der=root,
        now=time.time(),
        nonce=bytes.fromhex(nonce),
        allowed_pcr0=None,
        allow_debug=False,
    )
    assert attested.public_key is not None
    check_signed(attested.public_key, answer, "GET", f"/tee/attestation?nonce={nonce}", b"")
    return attested.public_key


def check_signed(key: bytes, response: TestResponse, method: str, path: str, body: bytes) -> None:
    verify_response_signature(
        key,
        response.headers.get(RESPONSE_SIGNATURE_HEADER),
        method=method,
        path_with_query=path,
        status=response.status_code,
        request_body=body,
        response_body=response.get_data(),
    )
