"""The client's own checks (steps 4-6) against the real broker on loopback, behind a proxy that
can tamper with one answer: a signer that answers for another address, a broker that issues a
challenge for another domain, another address or without our account, revoked and expired
sessions. Nothing is signed or verified after a check fails."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.serving import make_server

from agentkeys.client.cache import SESSION, Home
from agentkeys.client.config import ClientConfig
from agentkeys.client.errors import NotSignedIn, Untrusted
from agentkeys.client.flow import CHALLENGE, SIGN, Client, check_challenge
from agentkeys.crypto import derive_wallet, omni
from agentkeys.siwe import SiweMessage
from tests.conftest import MakeApp, bearer_for, services_of
from tests.live import free_port
from tests.vectors import VECTOR_MASTER

EMAIL = "agent-owner@example.com"
Rewrite = Callable[[dict[str, Any]], dict[str, Any]]


class Tamper:
    """WSGI in front of the app: records every path and rewrites the JSON of chosen ones."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.seen: list[str] = []
        self.rewrites: dict[str, Rewrite] = {}

    def __call__(self, environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        self.seen.append(path)
        captured: dict[str, Any] = {}

        def keep(status: str, headers: list[tuple[str, str]], *rest: Any) -> Any:
            captured.update(status=status, headers=headers)
            return lambda _data: None

        body = b"".join(self.app.wsgi_app(environ, keep))
        if path in self.rewrites:
            body = json.dumps(self.rewrites[path](json.loads(body))).encode()
        headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
        start(captured["status"], [*headers, ("Content-Length", str(len(body)))])
        return [body]


@dataclasses.dataclass
class Rig:
    tamper: Tamper
    client: Client
    session: str
    account: str
    wallet: str


@pytest.fixture
def rig(make_app: MakeApp, tmp_path: Path) -> Iterator[Rig]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    app = make_app(issuer=base)
    tamper = Tamper(app)
    server = make_server("127.0.0.1", port, tamper, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = ClientConfig.from_env({"broker_url": base, "home": str(tmp_path / "home")}, environ={})
    account = omni("email", EMAIL)
    session = bearer_for(app, EMAIL)["Authorization"].removeprefix("Bearer ")
    wallet = derive_wallet(VECTOR_MASTER, account).address
    try:
        yield Rig(tamper, Client(config, sleep=lambda _: None), session, account, wallet)
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


def test_the_untampered_flow_signs_in_the_wallet(rig: Rig) -> None:
    assert rig.client.derive_address(rig.session, rig.account) == rig.wallet
    verified = rig.client.wallet_session(rig.session, rig.account, rig.wallet)
    assert verified["account"] == rig.account
    assert rig.tamper.seen[-3:] == [
        "/v1/auth/wallet/start",
        "/dev/sign-message",
        "/v1/auth/wallet/verify",
    ]


def reissued(**changes: Any) -> Rewrite:
    """The broker's challenge with some fields changed (still strict EIP-4361)."""

    def rewrite(body: dict[str, Any]) -> dict[str, Any]:
        message = SiweMessage.parse(body["siwe_message"])
        return body | {"siwe_message": dataclasses.replace(message, **changes).format()}

    return rewrite


OTHER = "0x" + "11" * 20
BAD_CHALLENGES = [
    pytest.param(reissued(domain="evil.example"), "not this broker", id="other-domain"),
    pytest.param(
        reissued(address="0x1111111111111111111111111111111111111111"),
        "another address",
        id="other-address",
    ),
    pytest.param(reissued(resources=None), "not bound to this account", id="no-account"),
    pytest.param(
        reissued(resources=(f"urn:agentkeys:account:{'cd' * 32}",)),
        "not bound to this account",
        id="another-account",
    ),
    pytest.param(
        lambda body: body | {"siwe_message": "Sign this please"}, "not EIP-4361", id="plain-text"
    ),
]


@pytest.mark.parametrize(("rewrite", "reason"), BAD_CHALLENGES)
def test_a_bad_challenge_is_refused_before_anything_signs_it(
    rig: Rig, rewrite: Rewrite, reason: str
) -> None:
    rig.tamper.rewrites["/v1/auth/wallet/start"] = rewrite
    with pytest.raises(Untrusted) as refused:
        rig.client.wallet_session(rig.session, rig.account, rig.wallet)
    assert refused.value.step == CHALLENGE and reason in refused.value.message
    assert refused.value.exit_code == 7
    assert "/dev/sign-message" not in rig.tamper.seen  # the signer was never asked


def test_a_challenge_that_expires_too_late_is_refused() -> None:
    broker = "http://127.0.0.1:8000"
    account, wallet = "ab" * 32, derive_wallet(VECTOR_MASTER, "ab" * 32).address
    stamp = "%Y-%m-%dT%H:%M:%SZ"
    later = time.strftime(stamp, time.gmtime(time.time() + 2 * 3600))
    message = SiweMessage(
        scheme=None,
        domain="127.0.0.1:8000",
        address=wallet,
        statement="Link this wallet.",
        uri=broker,
        version="1",
        chain_id="1",
        nonce="abcdef0123456789",
        issued_at=time.strftime(stamp, time.gmtime()),
        expiration_time=later,
        resources=(f"urn:agentkeys:account:{account}",),
    ).format()
    with pytest.raises(Untrusted, match="within the hour"):
        check_challenge(message, broker_url=broker, address=wallet, account=account)


def test_a_signer_answering_for_another_address_is_not_verified(rig: Rig) -> None:
    rig.tamper.rewrites["/dev/sign-message"] = lambda body: body | {"address": OTHER}
    with pytest.raises(Untrusted) as refused:
        rig.client.wallet_session(rig.session, rig.account, rig.wallet)
    assert refused.value.step == SIGN and "another address" in refused.value.message
    assert "/v1/auth/wallet/verify" not in rig.tamper.seen


def test_a_revoked_session_is_not_signed_in(rig: Rig) -> None:
    services_of(rig.tamper.app).store.revoke_sessions(rig.account)
    with pytest.raises(NotSignedIn) as refused:
        rig.client.wallet_session(rig.session, rig.account, rig.wallet)
    assert refused.value.step == CHALLENGE and refused.value.exit_code == 3
    assert "run `agentkeys init` again" in refused.value.line()


def test_an_expired_stored_session_is_not_used(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    config = ClientConfig.from_env({"home": str(home.path)}, environ={})
    home.write(SESSION, {"broker_url": config.broker_url, "expires_at": int(time.time()) - 1})
    with pytest.raises(NotSignedIn, match="expired; run `agentkeys init` again"):
        config.session()
    home.write(SESSION, {"broker_url": "https://other.example", "expires_at": 2**40})
    with pytest.raises(NotSignedIn, match=re.escape("not signed in to http://127.0.0.1:8000")):
        config.session()
