"""Wallet link, SIWE sign-in and OIDC minting over HTTP (§6.4, §6.5)."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from flask import Flask
from flask.testing import FlaskClient

from agentkeys.crypto import SECP256K1_N, derive_wallet, omni
from agentkeys.siwe import SiweMessage
from tests import sts
from tests.conftest import MakeApp, bearer_for, services_of
from tests.sts import Rejected, check_tags
from tests.vectors import VECTOR_MASTER

ALICE = "alice@example.com"


def json_of(response: Any) -> dict[str, Any]:
    body: dict[str, Any] = response.get_json()
    return body


def alice(app: Flask) -> tuple[dict[str, str], str, str]:
    """Alice's identity bearer, her account and her derived wallet (lowercase)."""
    headers = bearer_for(app, ALICE)
    account = omni("email", ALICE)
    return headers, account, derive_wallet(VECTOR_MASTER, account).address.lower()


def start(
    client: FlaskClient, address: str, headers: dict[str, str] | None = None, **extra: Any
) -> dict[str, Any]:
    """A challenge; every issued message must parse back as strict EIP-4361, exactly."""
    response = client.post(
        "/v1/auth/wallet/start", json={"address": address, **extra}, headers=headers or {}
    )
    assert response.status_code == 200, response.get_json()
    challenge = json_of(response)
    assert SiweMessage.parse(challenge["siwe_message"]).format() == challenge["siwe_message"]
    return challenge


def in_process(client: FlaskClient) -> Any:
    """Fetch the issuer's URLs from the app itself (for the STS checker in tests/sts.py)."""

    def get_json(url: str) -> Any:
        return client.get(url.removeprefix("http://127.0.0.1:8000")).get_json()

    return get_json


def dev_sign(client: FlaskClient, headers: dict[str, str], account: str, message: str) -> str:
    body = {"omni_account": account, "message_hex": message.encode().hex()}
    response = client.post("/dev/sign-message", json=body, headers=headers)
    assert response.status_code == 200, response.get_json()
    signature: str = json_of(response)["signature"]
    return signature


def local_sign(key: Any, message: str) -> str:
    """A power user's own key, signing with a library nobody here wrote."""
    return "0x" + bytes(Account.sign_message(encode_defunct(text=message), key.key).signature).hex()


def verify(client: FlaskClient, request_id: str, signature: str) -> Any:
    return client.post(
        "/v1/auth/wallet/verify", json={"request_id": request_id, "signature": signature}
    )


def test_link_start_sign_verify_mint(app: Flask) -> None:
    client = app.test_client()
    headers, account, wallet = alice(app)
    linked = client.post(
        "/v1/wallet/link",
        json={"identity_type": "evm", "identity_value": wallet.upper().replace("0X", "0x")},
        headers=headers,
    )
    assert linked.status_code == 202 and linked.get_json() == {"status": "pending_proof"}
    listed = json_of(client.get("/v1/identities", headers=headers))["identities"]
    assert {
        "identity_type": "evm",
        "identity_value": wallet,
        "status": "pending_proof",
    }.items() <= listed[-1].items()

    challenge = start(client, wallet, headers)
    assert set(challenge) == {"request_id", "siwe_message", "nonce", "expires_at"}
    message = SiweMessage.parse(challenge["siwe_message"])
    assert message.format() == challenge["siwe_message"]
    assert message.domain == "127.0.0.1:8000" and message.uri == "http://127.0.0.1:8000"
    assert message.address == derive_wallet(VECTOR_MASTER, account).address
    assert (message.version, message.chain_id, message.nonce) == ("1", "1", challenge["nonce"])
    assert len(message.nonce) >= 16 and message.nonce.isalnum()
    assert message.resources == (f"urn:agentkeys:account:{account}",)
    assert message.expiration_datetime is not None
    lifetime = message.expiration_datetime - message.issued_at_datetime
    assert lifetime.total_seconds() == 600
    assert challenge["expires_at"] == message.expiration_time

    signature = dev_sign(client, headers, account, challenge["siwe_message"])
    verified = verify(client, challenge["request_id"], signature)
    assert verified.status_code == 200, verified.get_json()
    body = json_of(verified)
    assert set(body) == {"session_jwt", "expires_at", "account", "omni_account", "wallet_address"}
    assert body["account"] == account and body["omni_account"] == omni("evm", wallet)
    assert body["wallet_address"] == derive_wallet(VECTOR_MASTER, account).address
    claims = jwt.decode(body["session_jwt"], options={"verify_signature": False})
    assert claims["kind"] == "wallet" and claims["wallet_address"] == wallet
    assert claims["exp"] - claims["iat"] == 900

    listed = json_of(client.get("/v1/identities", headers=headers))["identities"]
    assert [(i["identity_type"], i["status"]) for i in listed] == [
        ("email", "linked"),
        ("evm", "linked"),
    ]
    again = client.post(
        "/v1/wallet/link", json={"identity_type": "evm", "identity_value": wallet}, headers=headers
    )
    assert again.status_code == 200 and again.get_json() == {"status": "linked"}

    wallet_bearer = {"Authorization": f"Bearer {body['session_jwt']}"}
    minted = client.post("/v1/mint-oidc-jwt", headers=wallet_bearer)
    assert minted.status_code == 200, minted.get_json()
    token = json_of(minted)
    assert token["wallet_address"] == body["wallet_address"] and token["expires_at"].endswith("Z")
    jwks = json_of(client.get("/.well-known/jwks.json"))
    kid = jwt.get_unverified_header(token["jwt"])["kid"]
    key = jwt.PyJWKSet.from_dict(jwks)[kid].key
    oidc = jwt.decode(
        token["jwt"],
        key,
        algorithms=["ES256"],
        audience="sts.amazonaws.com",
        issuer="http://127.0.0.1:8000",
    )
    assert oidc["sub"] == f"agentkeys:wallet:{wallet}"
    assert oidc["exp"] - oidc["iat"] == 300 and oidc["nbf"] == oidc["iat"]
    assert oidc["https://aws.amazon.com/tags"] == {
        "principal_tags": {"agentkeys_wallet": [wallet], "agentkeys_account": [account]},
        "transitive_tag_keys": ["agentkeys_wallet", "agentkeys_account"],
    }
    assert len(token["jwt"]) < 20_000
    checked = sts.check(
        token["jwt"],
        provider_url="http://127.0.0.1:8000",
        client_ids=["sts.amazonaws.com"],
        get_json=in_process(client),
    )
    assert checked == oidc
    # The OIDC key is not the session key: a session JWKS cannot verify minted tokens.
    assert kid not in {k["kid"] for k in json_of(client.get("/v1/session-keys"))["keys"]}


def test_power_user_plain_sign_in_with_own_key(app: Flask) -> None:
    client = app.test_client()
    key = Account.create()
    challenge = start(client, key.address)
    message = SiweMessage.parse(challenge["siwe_message"])
    assert message.resources is None and message.address == key.address
    body = json_of(
        verify(client, challenge["request_id"], local_sign(key, challenge["siwe_message"]))
    )
    assert body["account"] == omni("evm", key.address.lower())
    # A second plain sign-in with the same wallet lands in the same account.
    second = start(client, key.address.lower())
    body2 = json_of(verify(client, second["request_id"], local_sign(key, second["siwe_message"])))
    assert body2["account"] == body["account"]


def test_signature_forms(app: Flask) -> None:
    client = app.test_client()
    key = Account.create()

    def fresh() -> tuple[str, bytes]:
        challenge = start(client, key.address)
        return challenge["request_id"], bytes.fromhex(
            local_sign(key, challenge["siwe_message"])[2:]
        )

    request_id, raw = fresh()  # v 0/1 instead of 27/28, without 0x
    assert verify(client, request_id, (raw[:64] + bytes([raw[64] - 27])).hex()).status_code == 200

    request_id, raw = fresh()  # the malleable high-s twin is refused as malformed
    s = int.from_bytes(raw[32:64], "big")
    high = raw[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - raw[64]])
    refused = verify(client, request_id, "0x" + high.hex())
    assert refused.status_code == 400 and json_of(refused)["error"] == "invalid_signature"
    assert json_of(verify(client, request_id, "0x" + raw.hex()))["error"] == "challenge_used"


def test_verify_errors(make_app: MakeApp) -> None:
    app = make_app(siwe_chain_ids=(1, 10))
    client = app.test_client()
    key, other = Account.create(), Account.create()

    challenge = start(client, key.address)
    wrong = verify(client, challenge["request_id"], local_sign(other, challenge["siwe_message"]))
    assert wrong.status_code == 401 and json_of(wrong) == {
        "type": "urn:agentkeys:problem:invalid_signature",
        "title": "Unauthorized",
        "status": 401,
        "detail": "The signature is not by the challenge's address.",
        "error": "invalid_signature",
    }
    # The first verify consumed the challenge whatever its outcome.
    reused = verify(client, challenge["request_id"], local_sign(key, challenge["siwe_message"]))
    assert reused.status_code == 401 and json_of(reused)["error"] == "challenge_used"

    unknown = verify(client, "no-such-challenge", "0x" + "11" * 65)
    assert unknown.status_code == 404 and json_of(unknown)["error"] == "unknown_request"

    for malformed in ("0x1234", "zz" * 65, "0x" + "11" * 64 + "1d"):
        challenge = start(client, key.address)
        response = verify(client, challenge["request_id"], malformed)
        assert response.status_code == 400 and json_of(response)["error"] == "invalid_signature"

    challenge = start(client, key.address)
    services_of(app).wallet.clock = lambda: int(time.time()) + 600 + 31  # past expiry and skew
    expired = verify(client, challenge["request_id"], local_sign(key, challenge["siwe_message"]))
    assert expired.status_code == 401 and json_of(expired)["error"] == "challenge_expired"
    services_of(app).wallet.clock = lambda: int(time.time()) + 600 + 29  # within the skew
    challenge = start(client, key.address)
    services_of(app).wallet.clock = lambda: int(time.time())
    assert (
        verify(
            client, challenge["request_id"], local_sign(key, challenge["siwe_message"])
        ).status_code
        == 200
    )


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"address": "0x1234"}, 400, "invalid_address"),
        (
            {"address": "0x52908400098527886E0F7030069857D2E4169EE7".lower()[:-1] + "G"},
            400,
            "invalid_address",
        ),
        ({"address": "0x52908400098527886e0F7030069857D2E4169EE7"}, 400, "invalid_address"),
        (
            {"address": "0x52908400098527886E0F7030069857D2E4169EE7", "chain_id": 5},
            400,
            "chain_not_allowed",
        ),
        (
            {"address": "0x52908400098527886E0F7030069857D2E4169EE7", "chain_id": "1"},
            400,
            "invalid_request",
        ),
        (
            {"address": "0x52908400098527886E0F7030069857D2E4169EE7", "extra": 1},
            400,
            "invalid_request",
        ),
        ({}, 400, "invalid_request"),
    ],
)
def test_start_errors(app: Flask, body: dict[str, Any], status: int, error: str) -> None:
    response = app.test_client().post("/v1/auth/wallet/start", json=body)
    assert response.status_code == status and json_of(response)["error"] == error


def test_chain_ids_from_settings(make_app: MakeApp) -> None:
    client = make_app(siwe_chain_ids=(10, 1)).test_client()
    address = Account.create().address
    assert SiweMessage.parse(start(client, address)["siwe_message"]).chain_id == "10"
    assert SiweMessage.parse(start(client, address, chain_id=1)["siwe_message"]).chain_id == "1"


def test_plain_sign_in_never_confirms_another_accounts_pending_link(app: Flask) -> None:
    client = app.test_client()
    headers, account, _ = alice(app)
    key = Account.create()  # someone else's wallet that Alice asks to link
    pending = client.post(
        "/v1/wallet/link",
        json={"identity_type": "evm", "identity_value": key.address},
        headers=headers,
    )
    assert pending.status_code == 202
    challenge = start(client, key.address)
    body = json_of(
        verify(client, challenge["request_id"], local_sign(key, challenge["siwe_message"]))
    )
    assert body["account"] == omni("evm", key.address.lower()) != account
    listed = json_of(client.get("/v1/identities", headers=headers))["identities"]
    assert [(i["identity_type"], i["status"]) for i in listed] == [
        ("email", "linked"),
        ("evm", "pending_proof"),
    ]
    # That wallet now belongs to its own account: Alice can neither link it nor bind it.
    conflict = client.post(
        "/v1/wallet/link",
        json={"identity_type": "evm", "identity_value": key.address},
        headers=headers,
    )
    assert conflict.status_code == 409 and json_of(conflict)["error"] == "identity_already_linked"
    bound = client.post("/v1/auth/wallet/start", json={"address": key.address}, headers=headers)
    assert bound.status_code == 409


def test_bound_verify_refuses_wallet_confirmed_elsewhere_meanwhile(app: Flask) -> None:
    client = app.test_client()
    headers, _, _ = alice(app)
    key = Account.create()
    bound = start(client, key.address, headers)
    plain = start(client, key.address)
    assert (
        verify(client, plain["request_id"], local_sign(key, plain["siwe_message"])).status_code
        == 200
    )
    late = verify(client, bound["request_id"], local_sign(key, bound["siwe_message"]))
    assert late.status_code == 409 and json_of(late)["error"] == "identity_already_linked"


def test_wallet_link_errors(app: Flask) -> None:
    client = app.test_client()
    headers, _, wallet = alice(app)
    other_type = client.post(
        "/v1/wallet/link",
        json={"identity_type": "email", "identity_value": "x@example.com"},
        headers=headers,
    )
    assert other_type.status_code == 400 and json_of(other_type)["error"] == "invalid_request"
    assert (
        client.post(
            "/v1/wallet/link", json={"identity_type": "evm", "identity_value": wallet}
        ).status_code
        == 401
    )
    bad = client.post(
        "/v1/wallet/link", json={"identity_type": "evm", "identity_value": "0xabc"}, headers=headers
    )
    assert json_of(bad)["error"] == "invalid_address"


def test_start_with_a_bad_or_wallet_bearer_is_401(app: Flask) -> None:
    client = app.test_client()
    key = Account.create()
    assert (
        client.post(
            "/v1/auth/wallet/start",
            json={"address": key.address},
            headers={"Authorization": "Bearer nope"},
        ).status_code
        == 401
    )
    challenge = start(client, key.address)
    body = json_of(
        verify(client, challenge["request_id"], local_sign(key, challenge["siwe_message"]))
    )
    wallet_bearer = {"Authorization": f"Bearer {body['session_jwt']}"}
    assert (
        client.post(
            "/v1/auth/wallet/start", json={"address": key.address}, headers=wallet_bearer
        ).status_code
        == 401
    )


def test_mint_requires_a_wallet_session(app: Flask) -> None:
    client = app.test_client()
    headers, _, _ = alice(app)
    identity = client.post("/v1/mint-oidc-jwt", headers=headers)
    assert identity.status_code == 403 and json_of(identity) == {
        "type": "urn:agentkeys:problem:wallet_session_required",
        "title": "Forbidden",
        "status": 403,
        "detail": "Sign in with the wallet (SIWE) to mint a token.",
        "error": "wallet_session_required",
    }
    assert client.post("/v1/mint-oidc-jwt").status_code == 401


def test_discovery_document(app: Flask) -> None:
    response = app.test_client().get("/.well-known/openid-configuration")
    assert response.headers["Cache-Control"] == "public, max-age=300"
    assert json_of(response) == {
        "issuer": "http://127.0.0.1:8000",
        "jwks_uri": "http://127.0.0.1:8000/.well-known/jwks.json",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "claims_supported": [
            "iss",
            "sub",
            "aud",
            "iat",
            "nbf",
            "exp",
            "jti",
            "https://aws.amazon.com/tags",
        ],
    }
    jwks = app.test_client().get("/.well-known/jwks.json")
    assert jwks.headers["Cache-Control"] == "public, max-age=300"
    assert [set(k) for k in json_of(jwks)["keys"]] == [
        {"kty", "crv", "x", "y", "kid", "use", "alg"}
    ]


@pytest.mark.parametrize(
    ("tags", "reason"),
    [
        ({"principal_tags": {f"k{i}": ["v"] for i in range(51)}}, "more than 50"),
        ({"principal_tags": {"k" * 129: ["v"]}}, "key longer"),
        ({"principal_tags": {"k": ["v" * 257]}}, "value longer"),
        ({"principal_tags": {"k": "v"}}, "list of one string"),
        ({"principal_tags": {"k": ["v"]}, "transitive_tag_keys": ["x"]}, "transitive"),
        ({"tags": {}}, "principal_tags"),
    ],
)
def test_sts_checker_refuses_bad_tags(tags: dict[str, Any], reason: str) -> None:
    with pytest.raises(Rejected, match=reason):
        check_tags(tags)
    check_tags({"principal_tags": {"k" * 128: ["v" * 256]}, "transitive_tag_keys": ["k" * 128]})


def test_nonces_are_unique(app: Flask) -> None:
    client = app.test_client()
    address = Account.create().address
    nonces = {start(client, address)["nonce"] for _ in range(20)}
    assert len(nonces) == 20
