"""OIDC key rotation under load (§6.5): a rotated-in key is published before it signs, and
tokens minted before the rotation keep verifying against the published JWKS until they expire."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
import requests
from eth_account import Account
from eth_account.messages import encode_defunct
from flask import Flask
from werkzeug.serving import make_server

from agentkeys.broker.keys import JWKS_MAX_AGE
from tests import sts
from tests.conftest import services_of


@pytest.fixture
def served(app: Flask) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def wallet_session(base: str) -> str:
    key = Account.create()
    challenge = requests.post(
        base + "/v1/auth/wallet/start", json={"address": key.address}, timeout=10
    ).json()
    signature = Account.sign_message(
        encode_defunct(text=challenge["siwe_message"]), key.key
    ).signature
    verified = requests.post(
        base + "/v1/auth/wallet/verify",
        json={"request_id": challenge["request_id"], "signature": "0x" + bytes(signature).hex()},
        timeout=10,
    ).json()
    token: str = verified["session_jwt"]
    return token


def test_rotation_under_load(app: Flask, served: str) -> None:
    ring = services_of(app).oidc_keys
    offset = [0.0]
    ring.clock = lambda: (
        time.time() + offset[0]
    )  # the key ring's view of time; tokens use real time
    session = wallet_session(served)
    minted: list[str] = []
    stop = threading.Event()
    errors: list[Any] = []

    def mint_forever() -> None:
        while not stop.is_set():
            response = requests.post(
                served + "/v1/mint-oidc-jwt",
                headers={"Authorization": f"Bearer {session}"},
                timeout=10,
            )
            if response.status_code != 200:
                errors.append(response.text)
            else:
                minted.append(response.json()["jwt"])

    workers = [threading.Thread(target=mint_forever) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        while len(minted) < 20:
            time.sleep(0.01)
        old = ring.signing_key().kid
        result = app.test_cli_runner().invoke(args=["keys", "rotate", "--purpose", "oidc"])
        assert result.exit_code == 0, result.output
        new = next(k.kid for k in ring.published() if k.kid != old)
        published = {
            k["kid"]
            for k in requests.get(served + "/.well-known/jwks.json", timeout=10).json()["keys"]
        }
        assert published == {old, new}  # the new key is out before it signs anything
        before = len(minted)
        time.sleep(0.2)
        assert all(jwt.get_unverified_header(t)["kid"] == old for t in minted)
        offset[0] = JWKS_MAX_AGE + 1  # one cache max-age later the new key signs
        time.sleep(0.2)
        count_at_switch = len(minted)
        while len(minted) < count_at_switch + 20:
            time.sleep(0.01)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert not errors
    kids = [jwt.get_unverified_header(t)["kid"] for t in minted]
    assert kids[:before] == [old] * before and kids[-20:] == [new] * 20

    # Every token, minted before or after the rotation, verifies against the published JWKS;
    # a sample from both sides passes what STS checks (the issuer is served on a loopback port).
    def get_json(url: str) -> Any:
        return requests.get(url.replace("http://127.0.0.1:8000", served), timeout=10).json()

    for token in minted[:10] + minted[-10:]:
        sts.check(
            token,
            provider_url="http://127.0.0.1:8000",
            client_ids=["sts.amazonaws.com"],
            get_json=get_json,
        )
    client = jwt.PyJWKClient(served + "/.well-known/jwks.json")
    for token in minted:
        key = client.get_signing_key_from_jwt(token)
        jwt.decode(
            token,
            key.key,
            algorithms=["ES256"],
            audience="sts.amazonaws.com",
            issuer="http://127.0.0.1:8000",
        )
