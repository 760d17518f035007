"""The client's settings (PROTOCOL §8, daemon): flags override the environment. Standard library
only, so a warm `agentkeys credentials` stays cheap."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentkeys.client.cache import SESSION, Home, credentials_name
from agentkeys.client.errors import AttestationFailed, NotSignedIn

DEFAULT_BROKER = "http://127.0.0.1:8000"
SESSION_LEEWAY = 60  # a session this close to its end is not started on
ATTESTATION = "attestation"
ROOT_CERT, PCR0, ALLOW_DEBUG = (
    "AGENTKEYS_TEE_ROOT_CERT",
    "AGENTKEYS_TEE_PCR0",
    "AGENTKEYS_TEE_ALLOW_DEBUG",
)
PCR0_HEX = re.compile(r"[0-9a-f]{96}")  # a SHA-384 measurement


@dataclass(frozen=True)
class TeePolicy:
    """What the TEE signer must prove before the daemon sends it anything (PROTOCOL §7)."""

    root_cert: Path
    pcr0: frozenset[str]  # lowercase hex
    allow_debug: bool


@dataclass(frozen=True)
class ClientConfig:
    broker_url: str
    signer_url: str
    home: Home
    role_arn: str | None = None
    region: str | None = None
    sts_endpoint_url: str | None = None
    # As given; parsed by tee_policy() when a client is built, so a bad value fails with exit 8.
    tee_root_cert: str | None = None
    tee_pcr0: str | None = None
    tee_allow_debug: str | None = None

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
            tee_root_cert=pick("tee_root_cert", ROOT_CERT),
            tee_pcr0=pick("tee_pcr0", PCR0),
            tee_allow_debug=pick("tee_allow_debug", ALLOW_DEBUG),
        )

    def tee_policy(self) -> TeePolicy | None:
        """The signer's attestation policy, None when no root is pinned (no attestation); any
        unusable setting raises AttestationFailed."""
        from agentkeys.errors import ConfigError
        from agentkeys.settings import parse_bool

        try:
            allow_debug = parse_bool(ALLOW_DEBUG, self.tee_allow_debug or "false")
        except ConfigError as exc:
            raise AttestationFailed(ATTESTATION, exc.detail) from None
        pcr0 = frozenset(_pcr0_list(self.tee_pcr0 or ""))
        if self.tee_root_cert is None:
            if pcr0:
                raise AttestationFailed(
                    ATTESTATION, f"{PCR0} is set but {ROOT_CERT} is not: nothing would check it"
                )
            return None
        # A pinned root alone would trust whatever image that platform runs, attacker's included.
        if not pcr0:
            raise AttestationFailed(
                ATTESTATION, f"{ROOT_CERT} is set but {PCR0} is not: pin the worker's image too"
            )
        return TeePolicy(Path(self.tee_root_cert).expanduser(), pcr0, allow_debug)

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


def _pcr0_list(raw: str) -> list[str]:
    """A comma list of 96-hex PCR0 values, any case; lowercased."""
    values = [item.strip().lower() for item in raw.split(",")] if raw.strip() else []
    for value in values:
        if not PCR0_HEX.fullmatch(value):
            raise AttestationFailed(
                ATTESTATION, f"{PCR0} holds {value!r}, not 96 hex digits (a SHA-384 PCR0)"
            )
    return values
