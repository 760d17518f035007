"""The /dev signer over HTTP: vectors, the 503 gate, bad input and the signing policy."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from agentkeys.crypto import derive_secret, recover_personal
from tests.conftest import MakeApp, bearer_for_account, signer_client, siwe_text
from tests.vectors import VECTOR_ADDRESS, VECTOR_ANCHOR, VECTOR_MASTER

DERIVE = "/dev/derive-address"
SIGN = "/dev/sign-message"


def problem(status: int, code: str, detail: str) -> dict[str, Any]:
    from http import HTTPStatus

    return {
        "type": f"urn:agentkeys:problem:{code}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "error": code,
    }


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return signer_client(app)


def sign_body(text: str, anchor: str = VECTOR_ANCHOR) -> dict[str, str]:
    return {"omni_account": anchor, "message_hex": "0x" + text.encode().hex()}


def test_derive_address_vector(client: FlaskClient) -> None:
    response = client.post(DERIVE, json={"omni_account": VECTOR_ANCHOR.upper()})
    assert response.status_code == 200
    assert response.json == {"address": VECTOR_ADDRESS, "key_version": 1}


def test_sign_message_signs_allowed_siwe(client: FlaskClient) -> None:
    text = siwe_text()
    response = client.post(SIGN, json=sign_body(text))
    assert response.status_code == 200, response.json
    body = response.json
    assert body is not None and set(body) == {"signature", "address", "key_version"}
    assert body["address"] == VECTOR_ADDRESS and body["key_version"] == 1
    assert body["signature"][-2:] in ("1b", "1c") and len(body["signature"]) == 132
    assert recover_personal(text.encode(), body["signature"]) == VECTOR_ADDRESS


def test_message_hex_without_prefix(client: FlaskClient) -> None:
    text = siwe_text()
    response = client.post(
        SIGN, json={"omni_account": VECTOR_ANCHOR, "message_hex": text.encode().hex()}
    )
    assert response.status_code == 200


BAD_INPUT = [
    pytest.param(
        DERIVE,
        {"data": "{}", "content_type": "text/plain"},
        problem(415, "unsupported_media_type", "Send the body as application/json."),
        id="415",
    ),
    pytest.param(
        DERIVE,
        {"data": "{", "content_type": "application/json"},
        problem(400, "invalid_json", "The body is not valid JSON."),
        id="bad-json",
    ),
    pytest.param(
        DERIVE,
        {"data": "[" * 500 + "]" * 500, "content_type": "application/json"},
        problem(400, "invalid_json", "The body must be a JSON object."),
        id="deep-array",
    ),
    pytest.param(
        DERIVE,
        {"data": "[" * 60000, "content_type": "application/json"},
        problem(400, "invalid_json", "The body is not valid JSON."),
        id="recursion",
    ),
    pytest.param(
        DERIVE,
        {"data": '{"omni_account": NaN}', "content_type": "application/json"},
        problem(400, "invalid_json", "The body is not valid JSON."),
        id="nan",
    ),
    pytest.param(
        DERIVE,
        {"data": b'{"omni_account": "\xff"}', "content_type": "application/json"},
        problem(400, "invalid_json", "The body is not valid JSON."),
        id="not-utf8",
    ),
    pytest.param(
        DERIVE,
        {"json": ["x"]},
        problem(400, "invalid_json", "The body must be a JSON object."),
        id="array",
    ),
    pytest.param(
        DERIVE,
        {"json": {}},
        problem(400, "invalid_request", "Invalid or missing fields: omni_account."),
        id="missing",
    ),
    pytest.param(
        DERIVE,
        {"json": {"omni_account": VECTOR_ANCHOR, "extra": 1}},
        problem(400, "invalid_request", "Invalid or missing fields: extra."),
        id="unknown",
    ),
    pytest.param(
        DERIVE,
        {"json": {"omni_account": 12}},
        problem(400, "invalid_request", "Invalid or missing fields: omni_account."),
        id="type",
    ),
    *[
        pytest.param(
            DERIVE,
            {"json": {"omni_account": value}},
            problem(
                400, "invalid_omni_account", "omni_account must be 64 hex characters without 0x"
            ),
            id=f"omni-{name}",
        )
        for name, value in [
            ("0x", "0x" + VECTOR_ANCHOR),
            ("short", VECTOR_ANCHOR[:-2]),
            ("long", VECTOR_ANCHOR + "a"),
            ("non-hex", "zz" * 32),
            ("empty", ""),
            ("newline", VECTOR_ANCHOR + "\n"),
        ]
    ],
    *[
        pytest.param(
            SIGN,
            {"json": {"omni_account": VECTOR_ANCHOR, "message_hex": value}},
            problem(
                400, "invalid_message_hex", "message_hex must be an even number of hex characters"
            ),
            id=f"hex-{name}",
        )
        for name, value in [
            ("odd", "0xabc"),
            ("non-hex", "0xzz"),
            ("space", "ab cd"),
            ("0x0x", "0x0xab"),
        ]
    ],
    pytest.param(
        SIGN,
        {"json": {"omni_account": VECTOR_ANCHOR}},
        problem(400, "invalid_request", "Invalid or missing fields: message_hex."),
        id="sign-missing",
    ),
    pytest.param(
        SIGN,
        {"json": {"omni_account": "0x12", "message_hex": None}},
        problem(400, "invalid_request", "Invalid or missing fields: message_hex."),
        id="sign-null",
    ),
]


@pytest.mark.parametrize(("path", "kwargs", "expected"), BAD_INPUT)
def test_bad_input(
    client: FlaskClient, path: str, kwargs: dict[str, Any], expected: dict[str, Any]
) -> None:
    response = client.post(path, **kwargs)
    assert response.status_code == expected["status"]
    assert response.mimetype == "application/problem+json"
    assert response.json == expected


def test_body_too_large(make_app: MakeApp) -> None:
    client = signer_client(make_app(max_body_bytes=1024))
    response = client.post(DERIVE, json={"omni_account": "a" * 2000}, content_type="text/plain")
    assert response.json == problem(
        413, "payload_too_large", "The request body is larger than the server accepts."
    )


def test_wrong_method_and_unknown_path(client: FlaskClient) -> None:
    response = client.get(SIGN)
    assert response.status_code == 405 and "POST" in response.headers["Allow"]
    assert response.json == problem(
        405, "method_not_allowed", "GET is not allowed on this endpoint."
    )
    assert client.get("/dev/nothing").json == problem(404, "not_found", "No such endpoint.")


def test_empty_message_not_allowed(client: FlaskClient) -> None:
    response = client.post(SIGN, json={"omni_account": VECTOR_ANCHOR, "message_hex": ""})
    assert response.status_code == 403
    assert response.json is not None and response.json["error"] == "message_not_allowed"


OTHER_ANCHOR = "cd" * 32


def _policy_cases() -> list[Any]:
    """Messages are made when each test runs: their times are relative to now."""
    lower = VECTOR_ADDRESS.lower()
    return [
        pytest.param(lambda: b"hello", "not strict EIP-4361", id="plain-text"),
        pytest.param(lambda: b"\xff\xfe", "not UTF-8", id="binary"),
        pytest.param(
            lambda: siwe_text().replace("Version: 1", "Version: 2").encode(),
            "not strict EIP-4361",
            id="version",
        ),
        pytest.param(
            lambda: siwe_text(lower).encode(), "not strict EIP-4361", id="lowercase-address"
        ),
        pytest.param(
            lambda: siwe_text(domain="evil.example").encode(), "domain 'evil.example'", id="domain"
        ),
        pytest.param(lambda: siwe_text(domain="127.0.0.1:8001").encode(), "domain", id="port"),
        pytest.param(
            lambda: siwe_text(scheme="https").encode(), "scheme must be 'http'", id="scheme"
        ),
        pytest.param(
            lambda: siwe_text("0x0000000000000000000000000000000000000001").encode(),
            "address is not the wallet",
            id="other-address",
        ),
        pytest.param(
            lambda: siwe_text(chain_id=5).encode(), "chain id 5 is not allowed", id="chain"
        ),
        pytest.param(
            lambda: siwe_text(expires_in=None).encode(), "Expiration Time is required", id="no-exp"
        ),
        pytest.param(
            lambda: siwe_text(expires_in=timedelta(seconds=-5)).encode(), "has passed", id="expired"
        ),
        pytest.param(
            lambda: siwe_text(expires_in=timedelta(minutes=61)).encode(),
            "more than 1 hour",
            id="too-long",
        ),
        pytest.param(
            lambda: siwe_text(not_before=datetime.now(UTC) + timedelta(minutes=2)).encode(),
            "Not Before is in the future",
            id="not-before",
        ),
        pytest.param(
            lambda: siwe_text(resources=(f"urn:agentkeys:account:{OTHER_ANCHOR}",)).encode(),
            "bound to another account",
            id="other-account",
        ),
        # RFC 8141: scheme and NID are case-insensitive, so this names the other account too.
        pytest.param(
            lambda: siwe_text(resources=(f"URN:AgentKeys:account:{OTHER_ANCHOR}",)).encode(),
            "bound to another account",
            id="other-account-urn-case",
        ),
        pytest.param(
            lambda: siwe_text(
                resources=(
                    f"urn:agentkeys:account:{VECTOR_ANCHOR}",
                    f"URN:agentkeys:account:{OTHER_ANCHOR}",
                )
            ).encode(),
            "bound to another account",
            id="own-and-other-account",
        ),
        pytest.param(
            lambda: siwe_text(
                resources=(f"urn:agentkeys:account:{VECTOR_ANCHOR.upper()}",)
            ).encode(),
            "bound to another account",
            id="own-anchor-in-upper-case",
        ),
        # Only bound challenges are signed (PROTOCOL v1.1 §5): a plain sign-in message is not.
        pytest.param(
            lambda: siwe_text(resources=()).encode(), "not bound to this account", id="unbound"
        ),
        pytest.param(
            lambda: siwe_text(resources=("https://example.com/x",)).encode(),
            "not bound to this account",
            id="unbound-other-resource",
        ),
    ]


@pytest.mark.parametrize(("make", "reason"), _policy_cases())
def test_signing_policy_refuses(
    client: FlaskClient, make: Callable[[], bytes], reason: str
) -> None:
    message = make()
    response = client.post(SIGN, json={"omni_account": VECTOR_ANCHOR, "message_hex": message.hex()})
    assert response.status_code == 403
    body = response.json
    assert body is not None and body["error"] == "message_not_allowed" and body["status"] == 403
    assert reason in body["detail"]


def test_signing_policy_allows_bound_and_not_before(client: FlaskClient) -> None:
    text = siwe_text(
        not_before=datetime.now(UTC) - timedelta(minutes=1),
        resources=(f"urn:agentkeys:account:{VECTOR_ANCHOR}", "https://example.com/x"),
    )
    assert client.post(SIGN, json=sign_body(text)).status_code == 200


def test_signing_policy_reads_the_urn_case_insensitively(client: FlaskClient) -> None:
    text = siwe_text(resources=(f"URN:AgentKeys:account:{VECTOR_ANCHOR}",))
    assert client.post(SIGN, json=sign_body(text)).status_code == 200


def test_allowed_domains_and_chain_ids_from_settings(make_app: MakeApp) -> None:
    client = signer_client(
        make_app(signer_allowed_domains=("agent.example",), siwe_chain_ids=(10, 1))
    )
    assert (
        client.post(
            SIGN, json=sign_body(siwe_text(domain="agent.example", chain_id=10))
        ).status_code
        == 200
    )
    assert client.post(SIGN, json=sign_body(siwe_text())).status_code == 403


def test_other_anchor_gets_other_wallet(app: Flask) -> None:
    other = signer_client(app, OTHER_ANCHOR)
    response = other.post(DERIVE, json={"omni_account": OTHER_ANCHOR})
    assert response.status_code == 200
    assert response.json is not None and response.json["address"] != VECTOR_ADDRESS
    # The vector wallet's message is refused for another anchor: its address does not match.
    refused = other.post(SIGN, json=sign_body(siwe_text(), OTHER_ANCHOR))
    assert refused.status_code == 403
    assert refused.json is not None and refused.json["error"] == "message_not_allowed"


@pytest.mark.parametrize("path", [DERIVE, SIGN])
def test_another_accounts_bearer_is_forbidden(app: Flask, path: str) -> None:
    other = signer_client(app, OTHER_ANCHOR)
    response = other.post(
        path, json=sign_body(siwe_text()) if path == SIGN else {"omni_account": VECTOR_ANCHOR}
    )
    assert response.json == problem(
        403, "forbidden", "The bearer's session is for another account."
    )


@pytest.mark.parametrize("path", [DERIVE, SIGN])
def test_signer_requires_identity_bearer(app: Flask, path: str) -> None:
    body = sign_body(siwe_text())
    anonymous = app.test_client()
    expected = problem(401, "unauthorized", "Send Authorization: Bearer <session token>.")
    response = anonymous.post(path, json=body)
    assert response.json == expected
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="agentkeys"'
    assert anonymous.post(path, json=body, headers={"Authorization": "Basic eA=="}).json == expected
    garbage = anonymous.post(path, json=body, headers={"Authorization": "Bearer x.y.z"})
    assert garbage.status_code == 401
    # Wallet sessions may only mint: the signer refuses them.
    wallet = bearer_for_account(app, VECTOR_ANCHOR, kind="wallet")
    response = anonymous.post(path, json=body, headers=wallet)
    assert response.json == problem(401, "unauthorized", "This needs a session of kind identity.")


def test_order_of_checks(app: Flask) -> None:
    """§5: body checks, then 401, then field codes, then 403 for another account."""
    anonymous = app.test_client()
    assert anonymous.post(SIGN, data="{", content_type="application/json").status_code == 400
    assert anonymous.post(SIGN, json={"omni_account": "0x"}).status_code == 401
    other = signer_client(app, OTHER_ANCHOR)
    bad_field = other.post(SIGN, json={"omni_account": VECTOR_ANCHOR, "message_hex": "zz"})
    assert bad_field.json is not None and bad_field.json["error"] == "invalid_message_hex"
    forbidden = other.post(SIGN, json={"omni_account": VECTOR_ANCHOR, "message_hex": "00"})
    assert forbidden.json is not None and forbidden.json["error"] == "forbidden"


# --- the gate -------------------------------------------------------------------------------

DISABLED_DETAIL = "The dev signer is disabled: set DEV_KEY_SERVICE_MASTER_SECRET to enable it."


@pytest.mark.parametrize("path", [DERIVE, SIGN])
def test_disabled_answers_503(make_app: MakeApp, path: str) -> None:
    app = make_app(dev_master_secret=None)
    client = app.test_client()
    response = client.post(path, json={"omni_account": VECTOR_ANCHOR, "message_hex": "00"})
    assert response.status_code == 503
    assert response.json == problem(503, "signer_disabled", DISABLED_DETAIL)
    # Body checks come first (PROTOCOL §5 order), and the URL rules are the same as enabled.
    assert client.post(path, data="x", content_type="text/plain").status_code == 415
    assert client.post(path, data="{", content_type="application/json").status_code == 400
    assert client.get(path).status_code == 405
    assert client.get("/dev/other").status_code == 404


def test_disabled_holds_no_service_or_secret(make_app: MakeApp) -> None:
    import gc

    from agentkeys.broker.dev_key_service import DevKeyService
    from agentkeys.settings import Secret

    gc.collect()
    before = sum(isinstance(o, DevKeyService | Secret) for o in gc.get_objects())
    make_app(dev_master_secret=None)
    gc.collect()
    assert sum(isinstance(o, DevKeyService | Secret) for o in gc.get_objects()) == before
    enabled = make_app()
    gc.collect()
    assert sum(isinstance(o, DevKeyService) for o in gc.get_objects()) >= 1
    assert enabled.url_map  # keep it alive until here


def test_same_rules_both_modes(make_app: MakeApp) -> None:
    """Same rules, methods and endpoint names: the OpenAPI document names one operation."""

    def rules(app: Any) -> set[tuple[str, str, frozenset[str]]]:
        return {(r.rule, r.endpoint, frozenset(r.methods or ())) for r in app.url_map.iter_rules()}

    assert rules(make_app()) == rules(make_app(dev_master_secret=None))


def test_many_apps_fresh_blueprints(make_app: MakeApp) -> None:
    apps = [make_app(), make_app(dev_master_secret=None), make_app()]
    assert [
        signer_client(a).post(DERIVE, json={"omni_account": VECTOR_ANCHOR}).status_code
        for a in apps
    ] == [
        200,
        503,
        200,
    ]


def test_production_app_refuses_master_secret(make_app: MakeApp) -> None:
    from agentkeys.errors import ConfigError

    with pytest.raises(ConfigError, match="production builds reject"):
        make_app(env="production", issuer="https://keys.example.com", mail_url="smtp://mx")


# --- secrets never logged -------------------------------------------------------------------


def test_no_secret_in_logs(make_app: MakeApp, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    app = make_app()
    for anchor in (VECTOR_ANCHOR, OTHER_ANCHOR):
        client = signer_client(app, anchor)
        assert client.post(DERIVE, json={"omni_account": anchor}).status_code == 200
        client.post(SIGN, json=sign_body(siwe_text(), anchor))
    client.post(SIGN, json={"omni_account": VECTOR_ANCHOR, "message_hex": "zz"})
    logged = caplog.text.lower()
    assert "DEV ONLY — replace with TEE" in caplog.text  # the start-up warning did run
    forbidden = [VECTOR_MASTER.hex()] + [
        derive_secret(VECTOR_MASTER, a).hex() for a in (VECTOR_ANCHOR, OTHER_ANCHOR)
    ]
    assert not [f for f in forbidden if f in logged]
    assert caplog.records  # something was logged, so the check above looked at real output


def test_dev_only_marks() -> None:
    import inspect

    from agentkeys.blueprints import dev_key_service as dev_bp
    from agentkeys.broker import dev_key_service

    for module in (dev_key_service, dev_bp):
        assert (module.__doc__ or "").startswith("DEV ONLY — replace with TEE")
    public = [
        dev_key_service.DevKeyService,
        dev_key_service.DevKeyService.__init__,
        dev_bp.create_blueprint,
    ]
    for function in public:
        assert "DEV ONLY — replace with TEE" in (inspect.getdoc(function) or ""), function
