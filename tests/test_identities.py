"""Identity links over HTTP (§6.4): recovery by any linked identity, proofs, unlink rules."""

from __future__ import annotations

import time
from typing import Any

from flask import Flask

from agentkeys.crypto import derive_wallet, omni
from tests.conftest import MakeApp, bearer_for, bearer_for_account, services_of
from tests.vectors import VECTOR_MASTER

A, B, C = "alice@example.com", "alice.backup@example.com", "carol@example.com"


def session_token(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


def derive(app: Flask, headers: dict[str, str], anchor: str) -> Any:
    client = app.test_client()
    return client.post("/dev/derive-address", json={"omni_account": anchor}, headers=headers)


def test_link_then_recover_with_either_identity(app: Flask) -> None:
    client = app.test_client()
    alice = bearer_for(app, A)
    backup = bearer_for(app, B)  # a separate account until linked
    linked = client.post(
        "/v1/identities/link", json={"proof": session_token(backup)}, headers=alice
    )
    assert linked.status_code == 200, linked.json
    body = linked.json
    assert body is not None and body["account"] == omni("email", A)
    assert (body["identity_type"], body["identity_value"]) == ("email", B)
    assert body["linked_at"].endswith("Z")

    listed = client.get("/v1/identities", headers=alice).json
    assert listed is not None and listed["account"] == omni("email", A)
    assert [
        (i["identity_type"], i["identity_value"], i["status"]) for i in listed["identities"]
    ] == [
        ("email", A, "linked"),
        ("email", B, "linked"),
    ]

    # Recovery: a fresh sign-in with the linked identity lands in the same account and wallet.
    fresh = bearer_for(app, B)
    address = derive(app, fresh, omni("email", A)).json
    assert address == {
        "address": derive_wallet(VECTOR_MASTER, omni("email", A)).address,
        "key_version": 1,
    }
    assert derive(app, alice, omni("email", A)).json == address
    # The merged account's own sessions are revoked.
    assert client.get("/v1/identities", headers=backup).status_code == 401


def test_proof_is_single_use_and_fresh(app: Flask) -> None:
    client = app.test_client()
    alice, carol = bearer_for(app, A), bearer_for(app, C)
    proof = session_token(bearer_for(app, B))
    assert (
        client.post("/v1/identities/link", json={"proof": proof}, headers=alice).status_code == 200
    )
    replay = client.post("/v1/identities/link", json={"proof": proof}, headers=carol)
    assert replay.status_code == 401

    old = session_token(bearer_for(app, "old@example.com"))
    sessions = services_of(app).sessions
    sessions.clock = lambda: time.time() + 601
    stale = client.post("/v1/identities/link", json={"proof": old}, headers=alice)
    assert stale.status_code == 401 and stale.json is not None
    assert "older than 10 minutes" in stale.json["detail"]


def test_link_conflicts_disclose_nothing(app: Flask) -> None:
    client = app.test_client()
    alice, carol = bearer_for(app, A), bearer_for(app, C)
    proof = session_token(bearer_for(app, B))
    assert (
        client.post("/v1/identities/link", json={"proof": proof}, headers=carol).status_code == 200
    )
    # B now belongs to Carol's account, which holds more than B: Alice cannot take it.
    again = session_token(bearer_for(app, B))
    conflict = client.post("/v1/identities/link", json={"proof": again}, headers=alice)
    assert conflict.json == {
        "type": "urn:agentkeys:problem:identity_already_linked",
        "title": "Conflict",
        "status": 409,
        "detail": "That identity is already linked to another account.",
        "error": "identity_already_linked",
    }
    # Proving an identity that is already ours changes nothing.
    own = session_token(bearer_for(app, A))
    same = client.post("/v1/identities/link", json={"proof": own}, headers=alice)
    assert same.status_code == 200 and same.json is not None
    assert same.json["account"] == omni("email", A)


def test_link_needs_identity_bearer_and_valid_proof(app: Flask) -> None:
    client = app.test_client()
    alice = bearer_for(app, A)
    proof = session_token(bearer_for(app, B))
    assert client.post("/v1/identities/link", json={"proof": proof}).status_code == 401
    wallet = bearer_for_account(app, omni("email", A), kind="wallet")
    assert (
        client.post("/v1/identities/link", json={"proof": proof}, headers=wallet).status_code == 401
    )
    garbage = client.post("/v1/identities/link", json={"proof": "x.y.z"}, headers=alice)
    assert garbage.status_code == 401
    missing = client.post("/v1/identities/link", json={}, headers=alice)
    assert missing.status_code == 400


def test_unlink_rules(app: Flask) -> None:
    client = app.test_client()
    alice = bearer_for(app, A)
    path_b = f"/v1/identities/email/{B}"
    assert client.delete(path_b, headers=alice).status_code == 404  # not linked (yet)
    only = client.delete(f"/v1/identities/email/{A}", headers=alice)
    assert (
        only.status_code == 409 and only.json is not None and only.json["error"] == "last_identity"
    )

    proof = session_token(bearer_for(app, B))
    assert (
        client.post("/v1/identities/link", json={"proof": proof}, headers=alice).status_code == 200
    )
    anchor = client.delete(f"/v1/identities/email/{A.upper()}", headers=alice)
    assert anchor.status_code == 409 and anchor.json is not None
    assert anchor.json["error"] == "anchor_identity"

    time.sleep(1.01)  # sessions are revoked by the second; a session from before the unlink dies
    removed = client.delete(path_b, headers=alice)
    assert removed.status_code == 204 and removed.data == b""
    assert client.get("/v1/identities", headers=alice).status_code == 401
    fresh = bearer_for(app, A)
    listed = client.get("/v1/identities", headers=fresh).json
    assert listed is not None and [i["identity_value"] for i in listed["identities"]] == [A]
    bad = client.delete("/v1/identities/email/not-an-email", headers=fresh)
    assert bad.status_code == 400 and bad.json is not None and bad.json["error"] == "invalid_email"


def test_wallet_session_may_list_identities(make_app: MakeApp) -> None:
    app = make_app()
    bearer_for(app, A)
    wallet = bearer_for_account(app, omni("email", A), kind="wallet")
    response = app.test_client().get("/v1/identities", headers=wallet)
    assert response.status_code == 200 and response.json is not None
    assert response.json["account"] == omni("email", A)


def test_session_keys_published(app: Flask) -> None:
    response = app.test_client().get("/v1/session-keys")
    assert response.headers["Cache-Control"] == "public, max-age=300"
    keys = response.json
    assert keys is not None and len(keys["keys"]) == 1
    assert set(keys["keys"][0]) == {"kty", "crv", "x", "y", "kid", "use", "alg"}
