"""Seed steps 3-7 end to end under `gunicorn -w 4`, on SQLite and on PostgreSQL: derive, link,
start, sign through /dev, verify, mint, the STS conformance check, and moto's credentials."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from agentkeys.crypto import derive_wallet, omni
from agentkeys.siwe import SiweMessage
from tests import sts
from tests.broker import Broker, broker_env
from tests.live import free_port, gunicorn
from tests.smtp import StartServer
from tests.vectors import VECTOR_MASTER

EMAIL = "agent-owner@example.com"
ROLE = "arn:aws:iam::123456789012:role/agentkeys-agent"


@pytest.fixture
def moto_sts() -> Iterator[Any]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield boto3.client(
        "sts",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    server.stop()


def test_wallet_to_aws_credentials(
    any_database_url: str, smtp_server: StartServer, moto_sts: Any
) -> None:
    mailbox = smtp_server()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = broker_env(base, any_database_url, mailbox, AGENTKEYS_RATE_LIMITS="verify_ip=1000/60")
    with gunicorn(env, workers=4, port=port):
        broker = Broker(base, mailbox)
        identity, _ = broker.email_sign_in(EMAIL)
        account, session = identity["account"], identity["session_jwt"]
        assert account == omni("email", EMAIL)

        derived = broker.post("/dev/derive-address", {"omni_account": account}, session).json()
        address = derived["address"]
        assert address == derive_wallet(VECTOR_MASTER, account).address
        link = broker.post(
            "/v1/wallet/link", {"identity_type": "evm", "identity_value": address}, session
        )
        assert link.status_code == 202 and link.json() == {"status": "pending_proof"}

        challenge = broker.post("/v1/auth/wallet/start", {"address": address}, session).json()
        assert SiweMessage.parse(challenge["siwe_message"]).resources == (
            f"urn:agentkeys:account:{account}",
        )
        signed = broker.post(
            "/dev/sign-message",
            {"omni_account": account, "message_hex": challenge["siwe_message"].encode().hex()},
            session,
        ).json()

        # 50 simultaneous verifies of one signed challenge: exactly one wins.
        body = {"request_id": challenge["request_id"], "signature": signed["signature"]}
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            results = list(
                pool.map(lambda _: broker.post("/v1/auth/wallet/verify", body), range(50))
            )
        codes = [r.status_code for r in results]
        assert codes.count(200) == 1 and codes.count(401) == 49, codes
        assert {r.json()["error"] for r in results if r.status_code == 401} == {"challenge_used"}
        wallet_session = next(r.json() for r in results if r.status_code == 200)
        assert wallet_session["account"] == account and wallet_session["wallet_address"] == address

        minted = broker.post("/v1/mint-oidc-jwt", token=wallet_session["session_jwt"]).json()
        claims = sts.check(minted["jwt"], provider_url=base, client_ids=["sts.amazonaws.com"])
        assert claims["sub"] == f"agentkeys:wallet:{address.lower()}"
        # Deliberately broken tokens fail the same check.
        for broken in (minted["jwt"][:-4] + "AAAA", minted["jwt"] + "x" * 20_000):
            with pytest.raises(sts.Rejected):
                sts.check(broken, provider_url=base, client_ids=["sts.amazonaws.com"])
        with pytest.raises(sts.Rejected, match="aud"):
            sts.check(minted["jwt"], provider_url=base, client_ids=["another-client"])
        with pytest.raises(sts.Rejected, match="issuer"):
            sts.check(minted["jwt"], provider_url=base + "/", client_ids=["sts.amazonaws.com"])

        credentials = moto_sts.assume_role_with_web_identity(
            RoleArn=ROLE, RoleSessionName="agentkeys", WebIdentityToken=minted["jwt"]
        )["Credentials"]
        assert (
            credentials["AccessKeyId"]
            and credentials["SecretAccessKey"]
            and credentials["SessionToken"]
        )


def test_challenge_started_on_one_instance_verifies_on_another(
    postgres_url: str, smtp_server: StartServer
) -> None:
    """Two broker instances sharing PostgreSQL: a challenge started on one verifies on the other."""
    mailbox = smtp_server()
    first, second = free_port(), free_port()
    issuer = f"http://127.0.0.1:{first}"  # one public issuer in front of both instances
    env = broker_env(issuer, postgres_url, mailbox, AGENTKEYS_RATE_LIMITS="verify_ip=1000/60")
    with gunicorn(env, workers=2, port=first), gunicorn(env, workers=2, port=second):
        a = Broker(f"http://127.0.0.1:{first}", mailbox)
        b = Broker(f"http://127.0.0.1:{second}", mailbox)
        identity, _ = a.email_sign_in(EMAIL)
        account, session = identity["account"], identity["session_jwt"]
        address = b.post("/dev/derive-address", {"omni_account": account}, session).json()[
            "address"
        ]
        challenge = a.post("/v1/auth/wallet/start", {"address": address}, session).json()
        signed = b.post(
            "/dev/sign-message",
            {"omni_account": account, "message_hex": challenge["siwe_message"].encode().hex()},
            session,
        ).json()
        verified = b.post(
            "/v1/auth/wallet/verify",
            {"request_id": challenge["request_id"], "signature": signed["signature"]},
        )
        assert verified.status_code == 200, verified.text
        again = a.post(
            "/v1/auth/wallet/verify",
            {"request_id": challenge["request_id"], "signature": signed["signature"]},
        )
        assert again.status_code == 401 and again.json()["error"] == "challenge_used"
        minted = a.post("/v1/mint-oidc-jwt", token=verified.json()["session_jwt"])
        assert minted.status_code == 200
        sts.check(minted.json()["jwt"], provider_url=issuer, client_ids=["sts.amazonaws.com"])
