"""The client's settings (PROTOCOL §8, daemon): flags override the environment. Standard library
only, so a warm `agentkeys credentials` stays cheap."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agentkeys.client.cache import SESSION, Home, credentials_name
from agentkeys.client.errors import NotSignedIn

DEFAULT_BROKER = "http://127.0.0.1:8000"
SESSION_LEEWAY = 60  # a session this close to its end is not started on


@dataclass(frozen=True)
class ClientConfig:
    broker_url: str
    signer_url: str
    home: Home
    role_arn: str | None = None
    region: str | None = None
    sts_endpoint_url: str | None = None

    @classmethod
    def from_env(
        cls,
        flags: Mapping[str, str | None] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> ClientConfig:
        """Settings from flags (None: not given), else the environment, else the defaults."""
        env = os.environ if environ is None else environ
        given = flags or {}

        def pick(flag: str, variable: str, default: str | None = None) -> str | None:
            value = given.get(flag) or env.get(variable, "").strip()
            return value or default

        broker = (pick("broker_url", "AGENTKEYS_BROKER_URL", DEFAULT_BROKER) or "").rstrip("/")
        return cls(
            broker_url=broker,
            signer_url=(pick("signer_url", "AGENTKEYS_SIGNER_URL") or f"{broker}/dev").rstrip("/"),
            home=Home(pick("home", "AGENTKEYS_HOME", "~/.agentkeys") or "~/.agentkeys"),
            role_arn=pick("role_arn", "AGENTKEYS_ROLE_ARN"),
            region=pick("region", "AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            sts_endpoint_url=pick("sts_endpoint_url", "AGENTKEYS_STS_ENDPOINT_URL"),
        )

    def credentials_name(self, role_arn: str, duration: int) -> str:
        """The cache file of this role's credentials, from this broker and this STS."""
        return credentials_name(self.broker_url, role_arn, duration, self.sts_endpoint_url)

    def session(self, step: str = "session") -> dict[str, Any]:
        """The stored identity session for this broker, or NotSignedIn (never a prompt)."""
        stored = self.home.read(SESSION)
        if stored is None or stored.get("broker_url") != self.broker_url:
            raise NotSignedIn(step, f"not signed in to {self.broker_url}; run `agentkeys init`")
        if int(stored.get("expires_at", 0)) <= time.time() + SESSION_LEEWAY:
            raise NotSignedIn(step, "the session has expired; run `agentkeys init` again")
        return stored
