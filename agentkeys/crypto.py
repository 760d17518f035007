"""Wallet derivation, keccak, EIP-55 and EIP-191 signatures (PROTOCOL §1-§3). Pure: no Flask.

secp256k1 runs on coincurve (libsecp256k1): constant-time signing, RFC 6979 nonces and low-s.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field

import sha3
from coincurve import PrivateKey, PublicKey
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agentkeys.errors import InvalidAddress, InvalidSignature

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
KEY_VERSION = 1
DERIVATION_INFO = b"agentkeys-evm-wallet-v1:"
_RETRY_SUFFIXES = [b""] + [bytes([c]) for c in range(1, 256)]

_HEX40 = re.compile(r"0x[0-9a-fA-F]{40}\Z")
_ANCHOR = re.compile(r"[0-9a-f]{64}\Z")


def omni(identity_type: str, identity_value: str, client_id: str = "agentkeys") -> str:
    """The omni account of an identity: sha256(client_id ‖ type ‖ value) as lowercase hex."""
    data = f"{client_id}{identity_type}{identity_value}".encode()
    return hashlib.sha256(data).hexdigest()


def keccak256(data: bytes) -> bytes:
    digest: bytes = sha3.keccak_256(data).digest()
    return digest


@functools.lru_cache(maxsize=4096)  # a pure function of public data; the same wallets recur
def to_checksum_address(address: str) -> str:
    """EIP-55 form of a `0x` + 40 hex address given in any case."""
    if not _HEX40.match(address):
        raise InvalidAddress("address must be 0x followed by 40 hex characters")
    lower = address[2:].lower()
    digest = keccak256(lower.encode("ascii")).hex()
    # Hex digits 8-f compare >= "8" in ASCII: uppercase the address character there.
    return "0x" + "".join(
        c.upper() if d >= "8" else c for c, d in zip(lower, digest[:40], strict=True)
    )


def is_checksum_address(address: str) -> bool:
    """True only for the exact EIP-55 spelling (what EIP-4361 requires inside message text)."""
    return bool(_HEX40.match(address)) and to_checksum_address(address) == address


def normalize_address(address: str) -> str:
    """Lowercase form of a JSON-input address: all-lower, all-upper or exact EIP-55 (§3)."""
    if not _HEX40.match(address):
        raise InvalidAddress("address must be 0x followed by 40 hex characters")
    body = address[2:]
    if body != body.lower() and body != body.upper() and not is_checksum_address(address):
        raise InvalidAddress("mixed-case address with a wrong EIP-55 checksum")
    return "0x" + body.lower()


def address_of(public_key: PublicKey) -> str:
    """EIP-55 address: the last 20 bytes of keccak256(X ‖ Y)."""
    return to_checksum_address(
        "0x" + keccak256(public_key.format(compressed=False)[1:])[-20:].hex()
    )


def personal_digest(message: bytes) -> bytes:
    """EIP-191 version 0x45 (personal_sign) digest."""
    return keccak256(b"\x19Ethereum Signed Message:\n" + str(len(message)).encode() + message)


@dataclass(frozen=True)
class Wallet:
    """A derived wallet; its private key never leaves this object and never shows in repr."""

    address: str
    _key: PrivateKey = field(repr=False, compare=False)
    key_version: int = KEY_VERSION

    def sign_personal(self, message: bytes) -> str:
        """EIP-191 personal_sign: `0x` + r ‖ s ‖ v with v in {27, 28}, RFC 6979 and low-s."""
        sig = self._key.sign_recoverable(personal_digest(message), hasher=None)
        return "0x" + sig[:64].hex() + format(sig[64] + 27, "02x")


def derive_secret(master: bytes, anchor: str) -> bytes:
    """The wallet scalar of PROTOCOL §2: HKDF-SHA256, with a counter byte while out of range."""
    if len(master) != 32:
        raise ValueError("master secret must be 32 bytes")
    if not _ANCHOR.match(anchor):
        raise ValueError("anchor must be 64 lowercase hex characters")
    info = DERIVATION_INFO + anchor.encode("ascii")
    for suffix in _RETRY_SUFFIXES:
        secret = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info + suffix).derive(
            master
        )
        if 1 <= int.from_bytes(secret, "big") < SECP256K1_N:
            return secret
    raise ValueError("no valid scalar in 256 attempts")  # probability about 2**-32000


def derive_wallet(master: bytes, anchor: str) -> Wallet:
    """The deterministic wallet of an account anchor under a master secret."""
    key = PrivateKey(derive_secret(master, anchor))
    return Wallet(address=address_of(key.public_key), _key=key)


def parse_signature(signature: str) -> bytes:
    """A well-formed 65-byte r ‖ s ‖ v signature (optional 0x), v as the recovery id 0/1."""
    body = signature[2:] if signature[:2] in ("0x", "0X") else signature
    try:
        raw = bytes.fromhex(body)
    except ValueError:
        raise InvalidSignature("signature must be hex") from None
    if len(raw) != 65:
        raise InvalidSignature("signature must be 65 bytes: r ‖ s ‖ v")
    r, s, v = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:64], "big"), raw[64]
    if v not in (0, 1, 27, 28):
        raise InvalidSignature("signature v must be 0, 1, 27 or 28")
    if not (1 <= r < SECP256K1_N and 1 <= s < SECP256K1_N):
        raise InvalidSignature("signature r or s out of range")
    # Malleability: only the low-s form is accepted, as Ethereum does since EIP-2.
    if s > SECP256K1_N // 2:
        raise InvalidSignature("signature s is in the upper half of the curve order")
    return raw[:64] + bytes([v % 27])


def recover_personal(message: bytes, signature: str) -> str:
    """EIP-55 address that produced an EIP-191 signature; v in {0, 1, 27, 28}, high-s refused."""
    raw = parse_signature(signature)
    try:
        public_key = PublicKey.from_signature_and_message(
            raw, personal_digest(message), hasher=None
        )
    except Exception:  # libsecp256k1 raises plain Exception when no point recovers
        raise InvalidSignature("signature does not recover to a public key") from None
    return address_of(public_key)
