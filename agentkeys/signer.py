"""The signer shared by dev_key_service and the TEE worker (PROTOCOL §2, §5): request parsing,
the signing policy, and derivation and signing from a master secret. Pure: no Flask."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from agentkeys.crypto import Wallet, derive_wallet
from agentkeys.errors import InvalidMessageHex, InvalidOmniAccount, MessageNotAllowed, SiweError
from agentkeys.settings import Secret, Settings
from agentkeys.siwe import SiweMessage

ACCOUNT_RESOURCE_PREFIX = "urn:agentkeys:account:"
MAX_SIGNABLE_VALIDITY = timedelta(hours=1)
WALLET_CACHE_SIZE = 4096

_ANCHOR = re.compile(r"[0-9a-fA-F]{64}\Z")


def parse_anchor(value: str) -> str:
    """An account anchor as sent: 64 hex in any case, no `0x`; returned lowercase."""
    if not _ANCHOR.match(value):
        raise InvalidOmniAccount("omni_account must be 64 hex characters without 0x")
    return value.lower()


def parse_message_hex(value: str) -> bytes:
    """Message bytes from hex with an optional `0x` prefix."""
    body = value[2:] if value[:2] in ("0x", "0X") else value
    try:
        message = bytes.fromhex(body)
    except ValueError:
        message = None
    # fromhex skips ASCII whitespace between bytes: the length check refuses it.
    if message is None or 2 * len(message) != len(body):
        raise InvalidMessageHex("message_hex must be an even number of hex characters")
    return message


@dataclass(frozen=True)
class SigningPolicy:
    """What the signer agrees to sign: only a strict EIP-4361 sign-in for the caller's own wallet.

    The signer carries the wallet's EIP-4361 duties; it must never be a general signing oracle.
    """

    allowed_domains: tuple[str, ...]
    issuer_scheme: str
    chain_ids: tuple[int, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> SigningPolicy:
        return cls.for_issuer(
            settings.issuer, settings.allowed_signing_domains, settings.siwe_chain_ids
        )

    @classmethod
    def for_issuer(
        cls, issuer: str, allowed_domains: tuple[str, ...], chain_ids: tuple[int, ...]
    ) -> SigningPolicy:
        return cls(allowed_domains, issuer.split("://", 1)[0], chain_ids)

    def check(self, message: bytes, *, address: str, account: str, now: datetime) -> SiweMessage:
        """Return the parsed message if it may be signed by `address` for `account`, else raise."""
        try:
            siwe = SiweMessage.parse(message.decode("utf-8"))
        except UnicodeDecodeError:
            raise MessageNotAllowed("message is not UTF-8 text") from None
        except SiweError as exc:
            raise MessageNotAllowed(f"message is not strict EIP-4361: {exc.detail}") from None
        # Phishing defence: a signature for one site must not be usable to sign in to another.
        if "@" in siwe.domain or siwe.domain not in self.allowed_domains:
            raise MessageNotAllowed(f"domain {siwe.domain!r} is not one this signer signs for")
        if siwe.scheme is not None and siwe.scheme != self.issuer_scheme:
            raise MessageNotAllowed(f"scheme must be {self.issuer_scheme!r}")
        if siwe.address != address:
            raise MessageNotAllowed("address is not the wallet of this account")
        if siwe.chain_id_int not in self.chain_ids:
            raise MessageNotAllowed(f"chain id {siwe.chain_id} is not allowed")
        # A signature that never expires would be a standing credential: require a short one.
        expires = siwe.expiration_datetime
        if expires is None:
            raise MessageNotAllowed("Expiration Time is required")
        if expires <= now:
            raise MessageNotAllowed("Expiration Time has passed")
        if expires > now + MAX_SIGNABLE_VALIDITY:
            raise MessageNotAllowed("Expiration Time is more than 1 hour away")
        not_before = siwe.not_before_datetime
        if not_before is not None and not_before > now:
            raise MessageNotAllowed("Not Before is in the future")
        # Only bound challenges: the broker issues and verifies those only for a live session,
        # so a signature is worth nothing outside one (a signer without a database relies on it).
        own = f"{ACCOUNT_RESOURCE_PREFIX}{account}"
        bound = False
        for resource in siwe.resources or ():
            scheme, _, rest = resource.partition(":")
            nid, _, nss = rest.partition(":")
            # RFC 8141: the scheme and the NID compare case-insensitively, the rest exactly.
            if (scheme.lower(), nid.lower()) != ("urn", "agentkeys"):
                continue
            if f"urn:agentkeys:{nss}" != own:
                raise MessageNotAllowed("message is bound to another account")
            bound = True
        if not bound:
            raise MessageNotAllowed(f"message is not bound to this account (resource {own})")
        return siwe


@dataclass(frozen=True)
class DerivedAddress:
    address: str
    key_version: int


@dataclass(frozen=True)
class SignedMessage:
    signature: str
    address: str
    key_version: int


class Signer:
    """Per-account wallets derived from a master secret (§2), signing what the policy allows."""

    def __init__(self, master: Secret, policy: SigningPolicy) -> None:
        self._master, self.policy = master, policy
        # Derived keys live no longer than the master they come from (this process), so keeping
        # recent ones adds no exposure and spares the HKDF and a scalar multiplication per call.
        self._wallet = functools.lru_cache(maxsize=WALLET_CACHE_SIZE)(self._derive)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(master=Secret('**********'))"

    def _derive(self, anchor: str) -> Wallet:
        return derive_wallet(self._master.reveal(), anchor)

    def derive_address(self, anchor: str, *, request_id: str = "") -> DerivedAddress:
        """The EIP-55 address of an account anchor's wallet."""
        wallet = self._wallet(anchor)
        return DerivedAddress(wallet.address, wallet.key_version)

    def sign_message(
        self, anchor: str, message: bytes, *, request_id: str = "", now: datetime | None = None
    ) -> SignedMessage:
        """EIP-191 signature of a message the policy allows, by the anchor's wallet."""
        wallet = self._wallet(anchor)
        self.policy.check(
            message, address=wallet.address, account=anchor, now=now or datetime.now(UTC)
        )
        return SignedMessage(wallet.sign_personal(message), wallet.address, wallet.key_version)
