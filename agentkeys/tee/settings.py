"""The TEE worker's settings, read once from the environment (PROTOCOL §7, §8): the signer's
variables, its platform and state folder. It needs no database, mail or broker key."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from agentkeys.errors import ConfigError
from agentkeys.settings import (
    DEVELOPMENT,
    PRODUCTION,
    EnvReader,
    Limit,
    check_issuer,
)

RELEASE_VAR = "AGENTKEYS_TEE_RELEASE"
RATE_LIMIT_VAR = "AGENTKEYS_TEE_RATE_LIMIT"
SESSION_KEYS_PATH = "/v1/session-keys"
DEFAULT_RATE_LIMIT = Limit(120, 60)  # derives and signs per account
_RELEASE = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")


@dataclass(frozen=True)
class WorkerSettings:
    env: str = DEVELOPMENT
    issuer: str = "http://127.0.0.1:8000"
    signer_allowed_domains: tuple[str, ...] = ()
    siwe_chain_ids: tuple[int, ...] = (1,)
    session_jwks_url: str = "http://127.0.0.1:8000/v1/session-keys"
    max_body_bytes: int = 65536
    platform: str = "simulated"
    state_dir: Path = Path("instance/tee")
    audit_log: Path | None = None
    release: str = "agentkeys-development"
    rate_limit: Limit = DEFAULT_RATE_LIMIT

    @property
    def is_production(self) -> bool:
        return self.env == PRODUCTION

    @property
    def allowed_signing_domains(self) -> tuple[str, ...]:
        return self.signer_allowed_domains or (urlsplit(self.issuer).netloc,)

    @property
    def audit_path(self) -> Path:
        return self.audit_log or self.state_dir / "audit.jsonl"

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, instance_path: str | Path = "instance"
    ) -> WorkerSettings:
        """Build and validate; ConfigError names the variable, never its value."""
        env = EnvReader(os.environ if environ is None else environ)
        mode = env.choice("AGENTKEYS_ENV", (DEVELOPMENT, PRODUCTION), PRODUCTION)
        prod = mode == PRODUCTION
        issuer = env.text("AGENTKEYS_ISSUER", None if prod else "http://127.0.0.1:8000")
        audit = env.optional("AGENTKEYS_TEE_AUDIT_LOG")
        settings = cls(
            env=mode,
            issuer=issuer,
            signer_allowed_domains=env.text_list("AGENTKEYS_SIGNER_ALLOWED_DOMAINS"),
            siwe_chain_ids=env.int_list("AGENTKEYS_SIWE_CHAIN_IDS", (1,)),
            session_jwks_url=env.text(
                "AGENTKEYS_SESSION_JWKS_URL", None if prod else issuer + SESSION_KEYS_PATH
            ),
            max_body_bytes=env.integer("AGENTKEYS_MAX_BODY_BYTES", 65536, 1024, 16 * 1024 * 1024),
            platform=env.choice(
                "AGENTKEYS_TEE_PLATFORM", ("nitro", "simulated"), "nitro" if prod else "simulated"
            ),
            state_dir=Path(
                env.text("AGENTKEYS_TEE_STATE_DIR", str(Path(instance_path).resolve() / "tee"))
            ),
            audit_log=Path(audit) if audit else None,
            release=env.text(RELEASE_VAR, None if prod else "agentkeys-development"),
            rate_limit=_limit(env.optional(RATE_LIMIT_VAR)),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        """Cross-field rules; production refuses the simulated platform and plain http."""
        check_issuer(self.issuer, self.is_production)
        if not _RELEASE.match(self.release):
            raise ConfigError(f"{RELEASE_VAR} must be 1 to 64 of A-Z a-z 0-9 . _ -")
        if not self.session_jwks_url.startswith(("https://", "http://")):
            raise ConfigError("AGENTKEYS_SESSION_JWKS_URL must be an http(s) URL")
        # Session keys fetched in the clear could be swapped for an attacker's in transit.
        if self.is_production and not self.session_jwks_url.startswith("https://"):
            raise ConfigError("AGENTKEYS_SESSION_JWKS_URL must be https in production")
        # Its keys and attestation CA are plain files on the host: never a production trust root.
        if self.is_production and self.platform == "simulated":
            raise ConfigError("AGENTKEYS_TEE_PLATFORM=simulated is refused in production")


def _limit(raw: str | None) -> Limit:
    """`count/seconds`, e.g. `120/60`."""
    if raw is None:
        return DEFAULT_RATE_LIMIT
    count, _, seconds = raw.partition("/")
    digits = raw.isascii() and count.isdigit() and seconds.isdigit()
    if not digits or int(count) < 1 or not 1 <= int(seconds) <= 86400:
        raise ConfigError(f"{RATE_LIMIT_VAR} takes count/seconds (count ≥ 1, 1 to 86400 seconds)")
    return Limit(int(count), int(seconds))
