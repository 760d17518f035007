"""DEV ONLY — replace with TEE. The development signer: derives wallets from a master secret
held in plain process memory and signs what the signing policy allows.

It exists only when DEV_KEY_SERVICE_MASTER_SECRET is set, and production settings refuse it.
The TEE worker keeps the same wire surface (PROTOCOL §5) with the secret sealed in an enclave.
"""

from __future__ import annotations

from agentkeys.settings import Secret, Settings
from agentkeys.signer import Signer, SigningPolicy

DEV_ONLY_WARNING = (
    "DEV ONLY — replace with TEE: dev_key_service is enabled and holds the master secret in "
    "process memory; production builds reject it"
)


class DevKeyService(Signer):
    """DEV ONLY — replace with TEE. The shared Signer, with the master secret from the
    environment in plain process memory; it keeps no audit log and no limits."""

    def __init__(self, master: Secret, settings: Settings) -> None:
        """DEV ONLY — replace with TEE. Keeps the master secret for the life of the process."""
        super().__init__(master, SigningPolicy.from_settings(settings))
