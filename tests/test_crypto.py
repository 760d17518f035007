"""Derivation and signatures against PROTOCOL vectors and libraries nobody here wrote."""

from __future__ import annotations

import hashlib

import ecdsa
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils.address import to_checksum_address as eth_checksum
from hypothesis import given, settings
from hypothesis import strategies as st

from agentkeys import crypto
from agentkeys.errors import InvalidAddress, InvalidSignature
from tests.vectors import (
    HELLO_SIGNATURE,
    OMNI_ONBOARD,
    VECTOR_ADDRESS,
    VECTOR_ANCHOR,
    VECTOR_MASTER,
)

N = crypto.SECP256K1_N

masters = st.binary(min_size=32, max_size=32)
anchors = st.binary(min_size=32, max_size=32).map(bytes.hex)
messages = st.binary(max_size=300)


def test_omni_vector() -> None:
    assert crypto.omni("email", "onboard@example.com") == OMNI_ONBOARD
    assert crypto.omni("email", "onboard@example.com", client_id="other") != OMNI_ONBOARD


def test_derivation_vector() -> None:
    secret = crypto.derive_secret(VECTOR_MASTER, VECTOR_ANCHOR)
    assert secret.hex() == "aa24a9d0a99437729180bcb5d7e15db1c4fed5a41abdf0865a4fcac067e6b1bc"
    assert crypto.derive_wallet(VECTOR_MASTER, VECTOR_ANCHOR).address == VECTOR_ADDRESS


def test_signature_vector() -> None:
    wallet = crypto.derive_wallet(VECTOR_MASTER, VECTOR_ANCHOR)
    assert wallet.sign_personal(b"hello") == HELLO_SIGNATURE
    assert crypto.recover_personal(b"hello", HELLO_SIGNATURE) == VECTOR_ADDRESS


def test_wallet_repr_hides_key() -> None:
    wallet = crypto.derive_wallet(VECTOR_MASTER, VECTOR_ANCHOR)
    secret_hex = crypto.derive_secret(VECTOR_MASTER, VECTOR_ANCHOR).hex()
    assert secret_hex not in repr(wallet) and "_key" not in repr(wallet)


def test_out_of_range_scalar_retries_with_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a tiny group order nearly every candidate is out of range: the counter rule decides."""
    monkeypatch.setattr(crypto, "SECP256K1_N", 2**250)
    info = crypto.DERIVATION_INFO + VECTOR_ANCHOR.encode()
    candidates = [
        HKDF(hashes.SHA256(), 32, None, info + suffix).derive(VECTOR_MASTER)
        for suffix in [b""] + [bytes([c]) for c in range(1, 256)]
    ]
    first_valid = next(c for c in candidates if 1 <= int.from_bytes(c, "big") < 2**250)
    assert candidates[0] != first_valid  # the vector's first candidate is out of range here
    assert crypto.derive_secret(VECTOR_MASTER, VECTOR_ANCHOR) == first_valid


@pytest.mark.parametrize("anchor", ["AB" * 32, "ab" * 31, "0x" + "ab" * 31, "zz" * 32])
def test_derive_rejects_non_canonical_anchor(anchor: str) -> None:
    with pytest.raises(ValueError):
        crypto.derive_secret(VECTOR_MASTER, anchor)


@settings(max_examples=300, deadline=None)
@given(master=masters, anchor=anchors, message=messages)
def test_matches_eth_account_and_ecdsa(master: bytes, anchor: str, message: bytes) -> None:
    secret = crypto.derive_secret(master, anchor)
    wallet = crypto.derive_wallet(master, anchor)
    reference = Account.from_key(secret)
    assert wallet.address == reference.address

    signature = wallet.sign_personal(message)
    expected = reference.sign_message(encode_defunct(primitive=message)).signature
    assert signature == "0x" + bytes(expected).hex()
    assert Account.recover_message(encode_defunct(primitive=message), signature=signature) == (
        wallet.address
    )

    # The pure-Python ecdsa package verifies r ‖ s over the EIP-191 digest, and s is low.
    raw = bytes.fromhex(signature[2:])
    verifier = ecdsa.SigningKey.from_string(secret, curve=ecdsa.SECP256k1).get_verifying_key()
    assert verifier.verify_digest(raw[:64], crypto.personal_digest(message))
    assert int.from_bytes(raw[32:64], "big") <= N // 2
    assert raw[64] in (27, 28)


@settings(max_examples=100, deadline=None)
@given(master=masters, anchor=anchors, message=messages)
def test_recover_accepts_v_0_1_and_rejects_high_s(
    master: bytes, anchor: str, message: bytes
) -> None:
    wallet = crypto.derive_wallet(master, anchor)
    raw = bytes.fromhex(wallet.sign_personal(message)[2:])
    low_v = raw[:64] + bytes([raw[64] - 27])
    assert crypto.recover_personal(message, low_v.hex()) == wallet.address

    s = int.from_bytes(raw[32:64], "big")
    high_s = raw[:32] + (N - s).to_bytes(32, "big") + bytes([55 - raw[64]])
    # The malleable twin is a valid ECDSA signature for ecdsa, but we refuse it.
    secret = crypto.derive_secret(master, anchor)
    verifier = ecdsa.SigningKey.from_string(secret, curve=ecdsa.SECP256k1).get_verifying_key()
    assert verifier.verify_digest(high_s[:64], crypto.personal_digest(message))
    with pytest.raises(InvalidSignature, match="upper half"):
        crypto.recover_personal(message, "0x" + high_s.hex())


@pytest.mark.parametrize(
    ("signature", "reason"),
    [
        ("0x" + "11" * 64, "65 bytes"),
        ("0x" + "11" * 66, "65 bytes"),
        ("0x" + "zz" * 65, "hex"),
        ("0x" + "11" * 64 + "1d", "v must be"),
        ("0x" + "00" * 32 + "11" * 32 + "1b", "out of range"),
        ("0x" + "11" * 32 + "00" * 32 + "1b", "out of range"),
        ("0x" + "ff" * 32 + "11" * 32 + "1b", "out of range"),
    ],
)
def test_recover_rejects_malformed(signature: str, reason: str) -> None:
    with pytest.raises(InvalidSignature, match=reason):
        crypto.recover_personal(b"hello", signature)


def test_recover_wrong_message_gives_other_address() -> None:
    assert crypto.recover_personal(b"hellO", HELLO_SIGNATURE) != VECTOR_ADDRESS


@given(st.binary(min_size=20, max_size=20))
def test_checksum_matches_eth_utils(raw: bytes) -> None:
    lower = "0x" + raw.hex()
    checksummed = crypto.to_checksum_address(lower)
    assert checksummed == eth_checksum(lower)
    assert crypto.is_checksum_address(checksummed)
    assert crypto.normalize_address(checksummed) == lower
    assert crypto.normalize_address("0x" + raw.hex().upper()) == lower


@pytest.mark.parametrize(
    "address",
    [
        "0x210d945def7419683f33b4fC1FDdB7Cedf5c4573",  # mixed case, wrong checksum
        "210d945deF7419683f33b4fC1FDdB7Cedf5c4573",
        "0x210d945deF7419683f33b4fC1FDdB7Cedf5c457",
        "0x210d945deF7419683f33b4fC1FDdB7Cedf5c4573aa",
        "0xg10d945deF7419683f33b4fC1FDdB7Cedf5c4573",
    ],
)
def test_normalize_address_rejects(address: str) -> None:
    with pytest.raises(InvalidAddress):
        crypto.normalize_address(address)


def test_personal_digest_prefix() -> None:
    expected = crypto.keccak256(b"\x19Ethereum Signed Message:\n5hello")
    assert crypto.personal_digest(b"hello") == expected
    assert crypto.keccak256(b"") == bytes.fromhex(
        "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    )
    assert hashlib.sha3_256(b"").digest() != crypto.keccak256(b"")  # keccak, not NIST SHA-3
