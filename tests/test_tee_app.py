"""The TEE worker over HTTP (Flask's test client): the same signer surface as /dev, attestation,
signed responses, sessions from the broker's JWKS, the per-account limit and the audit log."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask
from flask.testing import FlaskClient

from agentkeys.attestation import verify_attestation
from agentkeys.crypto import keccak256, recover_personal
from agentkeys.errors import AttestationError
from agentkeys.settings import Limit
from agentkeys.tee.audit import verify_file
from agentkeys.tee.platform import SimulatedPlatform, code_measurement
from agentkeys.tee.state import SealedState
from tests.conftest import MakeApp, bearer_for_account, siwe_text
from tests.tee import check_signed, response_key, worker_app
from tests.test_dev_key_service import BAD_INPUT, problem, sign_body
from tests.vectors import VECTOR_ADDRESS, VECTOR_ANCHOR, VECTOR_MASTER

DERIVE, SIGN = "/tee/derive-address", "/tee/sign-message"
OTHER_ANCHOR = "cd" * 32


@pytest.fixture
def broker(make_app: MakeApp) -> Flask:
    return make_app()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "tee"


@pytest.fixture
def worker(broker: Flask, state_dir: Path) -> Flask:
    return worker_app(broker, state_dir, master=VECTOR_MASTER)


def bearer(broker: Flask, anchor: str = VECTOR_ANCHOR, kind: str = "identity") -> dict[str, str]:
    return bearer_for_account(broker, anchor, kind)


@pytest.fixture
def client(worker: Flask, broker: Flask) -> FlaskClient:
    client = worker.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = bearer(broker)["Authorization"]
    return client


def audit_lines(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_the_vectors_match_the_dev_signer(client: FlaskClient, broker: Flask) -> None:
    """The same master gives the same wallet and signature on /tee as on /dev."""
    derived = client.post(DERIVE, json={"omni_account": VECTOR_ANCHOR.upper()})
    assert derived.status_code == 200
    assert derived.json == {"address": VECTOR_ADDRESS, "key_version": 1}
    dev = broker.test_client().post(
        "/dev/derive-address", json={"omni_account": VECTOR_ANCHOR}, headers=bearer(broker)
    )
    assert dev.json == derived.json
    text = siwe_text()
    signed = client.post(SIGN, json=sign_body(text))
    assert signed.status_code == 200, signed.json
    assert recover_personal(text.encode(), signed.json["signature"]) == VECTOR_ADDRESS  # type: ignore[index]


@pytest.mark.parametrize(("path", "kwargs", "expected"), BAD_INPUT)
def test_bad_input_is_answered_as_on_dev(
    client: FlaskClient, path: str, kwargs: dict[str, Any], expected: dict[str, Any]
) -> None:
    response = client.post(path.replace("/dev/", "/tee/"), **kwargs)
    assert response.status_code == expected["status"]
    assert response.mimetype == "application/problem+json"
    assert response.json == expected


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        (lambda: "hello", "message is not strict EIP-4361: "),
        (lambda: siwe_text(resources=()), "message is not bound to this account"),
        (
            lambda: siwe_text(domain="evil.example"),
            "domain 'evil.example' is not one this signer signs",
        ),
    ],
    ids=["plain", "unbound", "domain"],
)
def test_the_signing_policy_is_the_dev_signers(
    client: FlaskClient, state_dir: Path, text: Callable[[], str], detail: str
) -> None:
    # Made when the test runs: a message made at collection could expire in a slow run.
    response = client.post(SIGN, json=sign_body(text()))
    assert response.status_code == 403
    assert response.json["error"] == "message_not_allowed"  # type: ignore[index]
    assert response.json["detail"].startswith(detail)  # type: ignore[index]
    assert audit_lines(state_dir) == []  # nothing signed, nothing logged


def forged_session(broker: Flask, kid: str) -> dict[str, str]:
    """The broker's own session claims, signed by a key the broker never had."""
    real = bearer(broker)["Authorization"].split()[1]
    claims = jwt.decode(real, options={"verify_signature": False})
    key = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})
    return {"Authorization": f"Bearer {token}"}


def test_sessions_are_checked_against_the_broker_keys(worker: Flask, broker: Flask) -> None:
    client = worker.test_client()
    body = {"omni_account": VECTOR_ANCHOR}
    assert client.post(DERIVE, json=body).json == problem(
        401, "unauthorized", "Send Authorization: Bearer <session token>."
    )
    wallet = client.post(DERIVE, json=body, headers=bearer(broker, kind="wallet"))
    assert wallet.json == problem(401, "unauthorized", "This needs a session of kind identity.")
    other = client.post(DERIVE, json=body, headers=bearer(broker, OTHER_ANCHOR))
    assert other.json == problem(403, "forbidden", "The bearer's session is for another account.")
    foreign = client.post(DERIVE, json=body, headers=forged_session(broker, "stranger"))
    assert foreign.json == problem(
        401, "unauthorized", "The bearer token was signed with an unknown key."
    )
    real_kid = jwt.get_unverified_header(bearer(broker)["Authorization"].split()[1])["kid"]
    forged = client.post(DERIVE, json=body, headers=forged_session(broker, real_kid))
    assert forged.json == problem(401, "unauthorized", "The bearer token is not a valid session.")


def test_every_response_is_signed_by_the_attested_key(
    client: FlaskClient, broker: Flask, state_dir: Path
) -> None:
    key = response_key(client, state_dir)
    derive = json.dumps({"omni_account": VECTOR_ANCHOR}).encode()
    cases: list[tuple[str, str, bytes, dict[str, str], int]] = [
        ("POST", DERIVE, derive, {}, 200),
        ("POST", SIGN, json.dumps(sign_body("hello")).encode(), {}, 403),
        ("POST", DERIVE, b"{", {}, 400),
        ("POST", DERIVE, derive, {"Authorization": "Bearer x"}, 401),
        ("POST", DERIVE, b"x" * 70000, {}, 413),
        ("GET", DERIVE, b"", {}, 405),
        ("GET", "/tee/nowhere?x=1", b"", {}, 404),
        ("GET", "/tee/attestation?nonce=00", b"", {}, 400),
    ]
    for method, path, body, headers, status in cases:
        response = client.open(
            path, method=method, data=body, content_type="application/json", headers=headers
        )
        assert response.status_code == status, (path, response.json)
        # A body over the limit is never read: its 413 is signed over the empty body.
        check_signed(key, response, method, path, b"" if status == 413 else body)
    tampered = client.post(DERIVE, data=derive, content_type="application/json")
    with pytest.raises(AttestationError, match="does not verify"):
        check_signed(key, tampered, "POST", DERIVE, derive + b" ")


@pytest.mark.parametrize(
    "nonce", ["", "ab" * 15, "ab" * 65, "abc", "zz" * 16, "0x" + "ab" * 16, "ab" * 16 + "\n"]
)
def test_attestation_needs_a_nonce_of_16_to_64_bytes(client: FlaskClient, nonce: str) -> None:
    response = client.get("/tee/attestation", query_string={"nonce": nonce})
    assert response.json == problem(400, "invalid_nonce", "nonce must be 16 to 64 bytes of hex.")


def test_attestation_binds_the_nonce_and_names_the_platform(
    client: FlaskClient, state_dir: Path
) -> None:
    body = client.get(f"/tee/attestation?nonce={'cd' * 16}").json
    assert body is not None and body["format"] == "aws-nitro-v1"
    assert body["platform"] == "simulated" and body["key_version"] == 1
    options: dict[str, Any] = {
        "root_der": SimulatedPlatform(state_dir).root_der,
        "now": time.time(),
        "allowed_pcr0": [code_measurement().hex()],
        "allow_debug": False,
    }
    document = base64.b64decode(body["document"])
    attested = verify_attestation(document, nonce=bytes.fromhex("cd" * 16), **options)
    assert attested.pcr0 == code_measurement().hex()
    assert attested.public_key == response_key(client, state_dir)  # one key per process
    with pytest.raises(AttestationError, match="nonce does not match"):
        verify_attestation(document, nonce=bytes.fromhex("ef" * 16), **options)


def test_the_limit_is_per_account_with_retry_after(broker: Flask, state_dir: Path) -> None:
    worker = worker_app(broker, state_dir, master=VECTOR_MASTER, rate_limit=Limit(3, 60))
    client = worker.test_client()
    mine, other = bearer(broker), bearer(broker, OTHER_ANCHOR)
    for _ in range(3):
        ok = client.post(DERIVE, json={"omni_account": VECTOR_ANCHOR}, headers=mine)
        assert ok.status_code == 200
    limited = client.post(DERIVE, json={"omni_account": VECTOR_ANCHOR}, headers=mine)
    assert limited.status_code == 429 and limited.json["error"] == "rate_limited"  # type: ignore[index]
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    signing = client.post(SIGN, json=sign_body(siwe_text()), headers=mine)
    assert signing.status_code == 429  # derive and sign share the account's count
    assert (
        client.post(DERIVE, json={"omni_account": OTHER_ANCHOR}, headers=other).status_code == 200
    )
    assert len(audit_lines(state_dir)) == 4  # refused operations are not logged


def test_the_audit_log_records_each_operation_and_no_message(
    client: FlaskClient, state_dir: Path
) -> None:
    text = siwe_text()
    client.post(DERIVE, json={"omni_account": VECTOR_ANCHOR}, headers={"X-Request-ID": "req-1"})
    signed = client.post(SIGN, json=sign_body(text), headers={"X-Request-ID": "bad id!"})
    assert signed.status_code == 200
    derive, sign = audit_lines(state_dir)
    assert derive["op"] == "derive" and derive["request_id"] == "req-1"
    assert "message_keccak" not in derive
    assert sign["op"] == "sign" and sign["message_keccak"] == keccak256(text.encode()).hex()
    assert sign["request_id"] == signed.headers["X-Request-ID"] != "bad id!"
    assert sign["omni_account"] == VECTOR_ANCHOR and sign["address"] == VECTOR_ADDRESS
    raw = (state_dir / "audit.jsonl").read_text()
    assert "Sign in to AgentKeys" not in raw and text.encode().hex()[:40] not in raw
    assert signed.json["signature"][2:] not in raw  # type: ignore[index]
    head = SealedState(SimulatedPlatform(state_dir), state_dir, "agentkeys-development")
    assert head.audit_head().count == 2
    assert verify_file(state_dir / "audit.jsonl", head.audit_head()) is None


def test_no_signature_leaves_without_its_audit_line(client: FlaskClient, state_dir: Path) -> None:
    log = state_dir / "audit.jsonl"
    assert client.post(DERIVE, json={"omni_account": VECTOR_ANCHOR}).status_code == 200
    log.rename(state_dir / "kept.jsonl")
    log.mkdir()  # the log cannot be appended to (as root, a read-only mode would not stop it)
    response = client.post(SIGN, json=sign_body(siwe_text()))
    assert response.json == problem(
        503, "audit_unavailable", "The signer cannot write its audit log; try again later."
    )
    assert response.headers["Retry-After"] == "30"
    log.rmdir()
    (state_dir / "kept.jsonl").rename(log)
    assert client.post(SIGN, json=sign_body(siwe_text())).status_code == 200
    assert [line["op"] for line in audit_lines(state_dir)] == ["derive", "sign"]
