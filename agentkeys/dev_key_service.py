"""DEV ONLY — replace with TEE. The development signer: derives wallets from a master secret
held in plain process memory and signs what the signing policy allows.

It exists only when DEV_KEY_SERVICE_MASTER_SECRET is set, and production settings refuse it.
The TEE worker keeps the same wire surface (PROTOCOL §5) with the secret sealed in an enclave.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime

from agentkeys.crypto import Wallet, derive_wallet
from agentkeys.settings import Secret, Settings
from agentkeys.signer import SigningPolicy

WALLET_CACHE_SIZE = 4096
DEV_ONLY_WARNING = (
    "DEV ONLY — replace with TEE: dev_key_service is enabled and holds the master secret in "
    "process memory; production builds reject it"
)


@dataclass(frozen=True)
class DerivedAddress:
    address: str
    key_version: int


@dataclass(frozen=True)
class SignedMessage:
    signature: str
    address: str
    key_version: int


class DevKeyService:
    """DEV ONLY — replace with TEE. Derives per-account wallets and signs allowed SIWE messages."""

    def __init__(self, master: Secret, settings: Settings) -> None:
        """DEV ONLY — replace with TEE. Keeps the master secret for the life of the process."""
        self._master = master
        self._policy = SigningPolicy.from_settings(settings)
        # Derived keys live no longer than the master they come from (this process), so keeping
        # recent ones adds no exposure and spares the HKDF and a scalar multiplication per call.
        self._wallet = functools.lru_cache(maxsize=WALLET_CACHE_SIZE)(self._derive)

    def __repr__(self) -> str:
        return "DevKeyService(master=Secret('**********'))"

    def _derive(self, anchor: str) -> Wallet:
        return derive_wallet(self._master.reveal(), anchor)

    def derive_address(self, anchor: str) -> DerivedAddress:
        """DEV ONLY — replace with TEE. The EIP-55 address of an account anchor's wallet."""
        wallet = self._wallet(anchor)
        return DerivedAddress(wallet.address, wallet.key_version)

    def sign_message(
        self, anchor: str, message: bytes, *, now: datetime | None = None
    ) -> SignedMessage:
        """DEV ONLY — replace with TEE. EIP-191 signature of a message the policy allows."""
        wallet = self._wallet(anchor)
        self._policy.check(
            message, address=wallet.address, account=anchor, now=now or datetime.now(UTC)
        )
        return SignedMessage(wallet.sign_personal(message), wallet.address, wallet.key_version)
