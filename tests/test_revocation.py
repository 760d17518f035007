"""Exact revocation (§6.3) and challenges that die with their session (§6.4), on SQLite and on
PostgreSQL: in process, and under `gunicorn -w 4` where workers could have cached the old state."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
import requests
from eth_account import Account
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import update

from agentkeys.broker.db import siwe_challenges
from agentkeys.crypto import derive_wallet, omni
from agentkeys.identity import EVM, Identity
from tests.broker import Broker, broker_env
from tests.conftest import bearer_for, race, services_of
from tests.live import free_port, gunicorn
from tests.smtp import StartServer
from tests.test_wallet import dev_sign, local_sign, start, verify
from tests.vectors import VECTOR_MASTER

ALICE, BACKUP, CAROL = "alice@example.com", "alice.backup@example.com", "carol@example.com"
REVOKED = "The session that started this challenge has been revoked; sign in again."


@pytest.fixture
def database_url(any_database_url: str) -> str:
    return any_database_url


def token_of(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


def link(client: FlaskClient, caller: dict[str, str], proof: dict[str, str]) -> None:
    linked = client.post("/v1/identities/link", json={"proof": token_of(proof)}, headers=caller)
    assert linked.status_code == 200, linked.get_json()


def evm_identities(app: Flask, account: str) -> list[str]:
    """The wallets linked to or pending for `account`, read from the store itself."""
    listed = services_of(app).store.identities(account)
    return [i.identity.value for i in listed if i.identity.type == EVM]


def alice_with_backup(app: Flask) -> tuple[FlaskClient, dict[str, str], dict[str, str]]:
    """Alice's account holding her backup address too, with a session of each."""
    client = app.test_client()
    alice = bearer_for(app, ALICE)
    link(client, alice, bearer_for(app, BACKUP))
    return client, alice, bearer_for(app, BACKUP)


# -- a wallet challenge dies with the session that started it ----------------------------------


def test_a_challenge_started_before_an_unlink_links_nothing_after_it(app: Flask) -> None:
    client, alice, backup = alice_with_backup(app)
    account = omni("email", ALICE)
    wallet = derive_wallet(VECTOR_MASTER, account).address
    # The backup address's holder starts a bound challenge and has it signed...
    challenge = start(client, wallet, backup)
    signature = dev_sign(client, backup, account, challenge["siwe_message"])
    # ...then Alice removes that address from her account.
    assert client.delete(f"/v1/identities/email/{BACKUP}", headers=alice).status_code == 204

    late = verify(client, challenge["request_id"], signature)

    assert late.status_code == 401 and late.get_json()["detail"] == REVOKED
    assert late.headers["WWW-Authenticate"] == 'Bearer realm="agentkeys"'
    assert evm_identities(app, account) == []
    assert verify(client, challenge["request_id"], signature).get_json()["error"] == (
        "challenge_used"
    )


def test_a_challenge_of_an_account_merged_away_links_nothing(app: Flask) -> None:
    client = app.test_client()
    alice, carol = bearer_for(app, ALICE), bearer_for(app, CAROL)
    key = Account.create()
    challenge = start(client, key.address, carol)  # bound to Carol's own account
    link(client, alice, carol)  # Carol's account is merged into Alice's and retired

    late = verify(client, challenge["request_id"], local_sign(key, challenge["siwe_message"]))

    assert late.status_code == 401 and late.get_json()["detail"] == REVOKED
    assert services_of(app).store.resolve(Identity(EVM, key.address.lower())) is None
    assert evm_identities(app, omni("email", ALICE)) == []


def test_sign_out_everywhere_ends_sessions_and_their_challenges(app: Flask) -> None:
    client = app.test_client()
    alice = bearer_for(app, ALICE)
    key = Account.create()
    challenge = start(client, key.address, alice)

    assert client.post("/v1/sessions/revoke", headers=alice).status_code == 204

    assert client.get("/v1/identities", headers=alice).status_code == 401
    late = verify(client, challenge["request_id"], local_sign(key, challenge["siwe_message"]))
    assert late.status_code == 401 and late.get_json()["detail"] == REVOKED
    fresh = bearer_for(app, ALICE)  # signing in again works, and finds no wallet linked
    assert client.get("/v1/identities", headers=fresh).status_code == 200
    assert evm_identities(app, omni("email", ALICE)) == []
    assert client.post("/v1/sessions/revoke").status_code == 401


def test_a_challenge_outliving_its_session_links_nothing(app: Flask) -> None:
    client = app.test_client()
    alice = bearer_for(app, ALICE)
    key = Account.create()
    challenge = start(client, key.address, alice)
    svc = services_of(app)
    with svc.engine.begin() as conn:  # the starting session expired a moment ago
        conn.execute(
            update(siwe_challenges)
            .where(siwe_challenges.c.request_id == challenge["request_id"])
            .values(session_expires_at=int(time.time()) - 1)
        )

    late = verify(client, challenge["request_id"], local_sign(key, challenge["siwe_message"]))

    assert late.status_code == 401
    assert late.get_json()["detail"] == "The session that started this challenge has expired."
    assert evm_identities(app, omni("email", ALICE)) == []


@pytest.mark.parametrize(("after", "status"), [(-1, 200), (0, 401), (1, 401)])
def test_no_grace_after_the_messages_expiration_time(app: Flask, after: int, status: int) -> None:
    client = app.test_client()
    key = Account.create()
    challenge = start(client, key.address)
    wallet = services_of(app).wallet
    expires = wallet.clock() + 600
    wallet.clock = lambda: expires + after

    response = verify(client, challenge["request_id"], local_sign(key, challenge["siwe_message"]))

    assert response.status_code == status
    if status == 401:
        assert response.get_json()["error"] == "challenge_expired"


def test_two_accounts_binding_one_wallet_at_once_get_200_and_409(app: Flask) -> None:
    client = app.test_client()
    key = Account.create()
    people = [bearer_for(app, f"p{i}@example.com") for i in range(2)]
    signed = []
    for headers in people:
        challenge = start(client, key.address, headers)
        signed.append((challenge["request_id"], local_sign(key, challenge["siwe_message"])))
    turn = iter(signed)

    def attempt() -> int:
        request_id, signature = next(turn)
        status: int = verify(app.test_client(), request_id, signature).status_code
        return status

    assert sorted(race(2, attempt)) == [200, 409]


# -- under gunicorn -w 4: every worker honours a revocation at once ----------------------------


def spread(base: str, path: str, token: str, count: int = 12) -> list[int]:
    """`count` requests on fresh connections, so they land on the workers in turn."""
    return [
        requests.get(
            base + path,
            headers={"Authorization": f"Bearer {token}", "Connection": "close"},
            timeout=15,
        ).status_code
        for _ in range(count)
    ]


def link_backup(broker: Broker, alice_token: str) -> None:
    backup: dict[str, Any] = broker.email_sign_in(BACKUP)[0]
    linked = broker.post("/v1/identities/link", {"proof": backup["session_jwt"]}, alice_token)
    assert linked.status_code == 200, linked.text


def issued_at(token: str) -> int:
    iat: int = jwt.decode(token, options={"verify_signature": False})["iat"]
    return iat


def test_revocation_is_exact_across_four_workers(
    any_database_url: str, smtp_server: StartServer
) -> None:
    mailbox = smtp_server()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = broker_env(base, any_database_url, mailbox)
    with gunicorn(env, workers=4, port=port):
        broker = Broker(base, mailbox)
        alice: dict[str, Any] = broker.email_sign_in(ALICE)[0]
        link_backup(broker, alice["session_jwt"])
        wallet = broker.wallet_sign_in(alice["session_jwt"], alice["account"])
        assert spread(base, "/v1/identities", wallet) == [200] * 12

        for _ in range(3):  # mint, let every worker check it, unlink: all in one second
            time.sleep(1 - time.time() % 1 + 0.01)
            session: str = broker.email_sign_in(ALICE)[0]["session_jwt"]
            warm = spread(base, "/v1/identities", session)
            unlinked = requests.delete(
                f"{base}/v1/identities/email/{BACKUP}",
                headers={"Authorization": f"Bearer {session}"},
                timeout=15,
            )
            assert (warm, unlinked.status_code) == ([200] * 12, 204), unlinked.text
            if int(time.time()) == issued_at(session):
                break
            link_backup(broker, broker.email_sign_in(ALICE)[0]["session_jwt"])
        else:
            pytest.fail("could not mint and unlink within one second")

        assert spread(base, "/v1/identities", session) == [401] * 12
        assert spread(base, "/v1/identities", alice["session_jwt"]) == [401] * 12
        assert spread(base, "/v1/identities", wallet) == [401] * 12
        again: str = broker.email_sign_in(ALICE)[0]["session_jwt"]
        assert spread(base, "/v1/identities", again) == [200] * 12
