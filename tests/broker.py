"""A client of a broker running under gunicorn on loopback, for the end-to-end tests."""

from __future__ import annotations

from typing import Any

import requests

from tests.live import clean_env
from tests.smtp import Server, magic_link_token
from tests.vectors import VECTOR_MASTER


def broker_env(base: str, database_url: str, mailbox: Server, **extra: str) -> dict[str, str]:
    """A development broker at `base` mailing through `mailbox`, with the vector master."""
    return clean_env(
        AGENTKEYS_ENV="development",
        AGENTKEYS_ISSUER=base,
        DATABASE_URL=database_url,
        AGENTKEYS_MAIL_URL=f"smtp://127.0.0.1:{mailbox.port}",
        DEV_KEY_SERVICE_MASTER_SECRET=VECTOR_MASTER.hex(),
        AGENTKEYS_KEY_ENCRYPTION_KEY="4b" * 32,
        **extra,
    )


class Broker:
    def __init__(self, base: str, mailbox: Server) -> None:
        self.base, self.mailbox = base, mailbox

    def post(
        self, path: str, body: dict[str, Any] | None = None, token: str | None = None
    ) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.post(self.base + path, json=body, headers=headers, timeout=15)

    def get(self, path: str, token: str | None = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(self.base + path, headers=headers, timeout=15)

    def email_sign_in(self, email: str) -> tuple[dict[str, Any], str]:
        """The whole magic-link dance: the verified status body and the magic-link token."""
        self.mailbox.recorder.envelopes.clear()
        started = self.post("/v1/auth/email/request", {"email": email})
        assert started.status_code == 202, started.text
        body = started.json()
        token = magic_link_token(self.mailbox.recorder.message())
        assert self.post("/v1/auth/email/verify", {"token": token}).json()["ok"] is True
        status: dict[str, Any] = self.get(body["poll_url"], body["poll_token"]).json()
        assert status["status"] == "verified", status
        return status, token

    def wallet_sign_in(self, identity_token: str, account: str) -> str:
        """A bound challenge for the account's derived wallet, signed by /dev: a wallet session."""
        address = self.post("/dev/derive-address", {"omni_account": account}, identity_token)
        challenge = self.post(
            "/v1/auth/wallet/start", {"address": address.json()["address"]}, identity_token
        ).json()
        message_hex = challenge["siwe_message"].encode().hex()
        signed = self.post(
            "/dev/sign-message",
            {"omni_account": account, "message_hex": message_hex},
            identity_token,
        ).json()
        verified = self.post(
            "/v1/auth/wallet/verify",
            {"request_id": challenge["request_id"], "signature": signed["signature"]},
        )
        assert verified.status_code == 200, verified.text
        token: str = verified.json()["session_jwt"]
        return token
