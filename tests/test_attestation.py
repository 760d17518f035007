"""The Nitro attestation verifier against AWS's real sample, broken variants of it, and documents
signed by a chain made here the way the simulated platform will make them."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from agentkeys.attestation import Attestation, verify_attestation
from agentkeys.errors import AgentKeysError, AttestationError
from tests.live import ROOT

FIXTURES = ROOT.parent / "shared" / "fixtures" / "nitro"  # ../shared beside the checkout
NOW = 1725911352  # 2024-09-09T19:49:12Z, inside the sample's 3-hour chain window
ZERO_PCR = bytes(48)


def _b64(name: str) -> bytes:
    text = (FIXTURES / name).read_text().strip()
    return base64.b64decode(text + "=" * (-len(text) % 4))


SAMPLE = _b64("example_attestation.b64")
ROOT_DER = x509.load_pem_x509_certificate(
    (FIXTURES / "aws_nitro_root_g1.pem").read_bytes()
).public_bytes(serialization.Encoding.DER)


def verify(document: bytes, **overrides: Any) -> Attestation:
    options: dict[str, Any] = {
        "root_der": ROOT_DER,
        "now": NOW,
        "nonce": None,
        "allowed_pcr0": None,
        "allow_debug": True,
    }
    return verify_attestation(document, **(options | overrides))


def refused(document: bytes, **overrides: Any) -> str:
    with pytest.raises(AttestationError) as caught:
        verify(document, **overrides)
    assert caught.value.code == "attestation_invalid"
    return caught.value.detail


def edited(payload_edit: Any = None, **parts: Any) -> bytes:
    """The real sample re-encoded with its payload map or COSE parts changed (not re-signed)."""
    protected, unprotected, payload, signature = cbor2.loads(SAMPLE)
    if payload_edit is not None:
        fields = cbor2.loads(payload)
        payload_edit(fields)
        payload = cbor2.dumps(fields)
    items = {"protected": protected, "payload": payload, "signature": signature} | parts
    return cbor2.dumps([items["protected"], unprotected, items["payload"], items["signature"]])


# A chain and documents made here, as the simulated platform will make them.

START = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
MADE_NOW = START.timestamp() + 3600


def make_cert(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(START)
        .not_valid_after(START + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA384())
    )


def make_chain(middle_is_ca: bool = True) -> tuple[list[bytes], bytes, ec.EllipticCurvePrivateKey]:
    """cabundle [root, intermediate], the leaf and its key, all P-384."""
    keys = [ec.generate_private_key(ec.SECP384R1()) for _ in range(3)]
    root = make_cert("root", keys[0], None, keys[0], ca=True)
    middle = make_cert("intermediate", keys[1], root, keys[0], ca=middle_is_ca)
    leaf = make_cert("leaf", keys[2], middle, keys[1], ca=False)
    der = [c.public_bytes(serialization.Encoding.DER) for c in (root, middle, leaf)]
    return der[:2], der[2], keys[2]


def make_document(fields: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> bytes:
    protected, payload = cbor2.dumps({1: -35}), cbor2.dumps(fields)
    der = key.sign(cbor2.dumps(["Signature1", protected, b"", payload]), ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(der)
    return cbor2.dumps([protected, {}, payload, r.to_bytes(48, "big") + s.to_bytes(48, "big")])


def made_fields(cabundle: list[bytes], leaf: bytes, public_key: bytes) -> dict[str, Any]:
    return {
        "module_id": "i-simulated-enc0000000000000001",
        "digest": "SHA384",
        "timestamp": int(MADE_NOW * 1000) - 5000,
        "pcrs": {i: bytes([i + 1]) * 48 for i in range(16)},
        "certificate": leaf,
        "cabundle": cabundle,
        "public_key": public_key,
        "user_data": None,
        "nonce": b"n" * 32,
    }


def test_the_real_sample_verifies_at_the_pinned_time() -> None:
    result = verify(SAMPLE)
    assert result.module_id == "i-0bbf1bfe232b8c2ce-enc0191ba35c9d1b77a"
    assert result.digest == "SHA384"
    assert result.timestamp == 1725911352400
    assert len(result.pcrs) == 16
    assert len(result.pcrs[0]) == 48
    assert result.pcrs[0] == ZERO_PCR
    assert result.pcrs[3].hex().startswith("671ca1e328f75015")
    assert result.public_key == b"dummy"
    assert result.nonce == bytes.fromhex("00" * 19 + "01")
    assert result.user_data is not None and len(result.user_data) == 68


def test_the_real_sample_verifies_with_its_own_nonce_and_tagged() -> None:
    assert verify(SAMPLE, nonce=bytes.fromhex("00" * 19 + "01")).nonce
    assert verify(cbor2.dumps(cbor2.CBORTag(18, cbor2.loads(SAMPLE)))).digest == "SHA384"
    assert verify(SAMPLE, allowed_pcr0=["00" * 48]).pcr0 == "00" * 48


def test_the_invalid_sample_is_refused_for_its_signature() -> None:
    document = _b64("invalid_attestation.b64")
    issued = cbor2.loads(cbor2.loads(document)[2])["timestamp"] / 1000
    assert "COSE signature does not verify" in refused(document, now=issued)


def _flip_pcr3(payload: bytes) -> bytes:
    at = payload.index(bytes.fromhex("671ca1e328f75015")) + 3
    return payload[:at] + bytes([payload[at] ^ 1]) + payload[at + 1 :]


def _other_root() -> bytes:
    key = ec.generate_private_key(ec.SECP384R1())
    return make_cert("other root", key, None, key, ca=True).public_bytes(serialization.Encoding.DER)


def _drop(name: str) -> Any:
    return lambda fields: fields.pop(name)


def _set(name: str, value: Any) -> Any:
    return lambda fields: fields.__setitem__(name, value)


def _without_intermediate(fields: dict[str, Any]) -> None:
    del fields["cabundle"][2]


def _sample_parts() -> list[Any]:
    return list(cbor2.loads(SAMPLE))


PAYLOAD = _sample_parts()[2]
SIGNATURE = _sample_parts()[3]
TIMESTAMP = 1725911352.4


@pytest.mark.parametrize(
    ("document", "overrides", "reason"),
    [
        (edited(payload=_flip_pcr3(PAYLOAD)), {}, "COSE signature does not verify"),
        (edited(signature=SIGNATURE[:-1] + bytes([SIGNATURE[-1] ^ 1])), {}, "COSE signature"),
        (edited(protected=cbor2.dumps({1: -7})), {}, "protected header is not {alg: ES384}"),
        (edited(protected=cbor2.dumps({1: -35, 4: b"k"})), {}, "protected header is not"),
        (edited(signature=SIGNATURE[:64]), {}, "signature is 64 bytes"),
        (edited(_set("cabundle", [_other_root()])), {}, "cabundle[0] is not the pinned root"),
        (edited(_without_intermediate), {}, "cabundle[2] is not issued by cabundle[1]"),
        (SAMPLE, {"now": 2_000_000_000}, "cabundle[1] is not valid at 2033"),
        (SAMPLE, {"now": NOW - 10}, "leaf certificate is not valid at"),
        (SAMPLE, {"now": TIMESTAMP + 301}, "document is stale: issued 301s before now"),
        (SAMPLE, {"allow_debug": False}, "debug-mode enclave (PCR0-2 are zero)"),
        (SAMPLE, {"nonce": bytes(20)}, "nonce does not match the challenge"),
        (SAMPLE, {"nonce": b"\x01"}, "nonce does not match the challenge"),
        (SAMPLE, {"allowed_pcr0": ["ab" * 48]}, "PCR0 " + "00" * 48 + " is not in the allowed"),
        (SAMPLE, {"allowed_pcr0": []}, "is not in the allowed list"),
        (edited(_drop("digest")), {}, "payload lacks digest"),
        (edited(_drop("cabundle")), {}, "payload lacks cabundle"),
        (edited(_set("digest", "SHA256")), {}, "digest is not SHA384"),
        (edited(_set("timestamp", "now")), {}, "timestamp is not a positive integer"),
        (edited(_set("pcrs", {0: b"\x00" * 32})), {}, "PCR0 is not 48 bytes"),
        (edited(_set("pcrs", {3: ZERO_PCR})), {}, "pcrs lacks PCR0, PCR1 or PCR2"),
        (edited(_set("nonce", "text")), {}, "nonce is not null or a bstr"),
        (edited(_set("certificate", b"not der")), {}, "leaf certificate is not a DER"),
        (edited(_set("cabundle", [])), {}, "cabundle is not a non-empty array"),
        (b"", {}, "document is empty"),
        (b"\xff\xfe garbage", {}, "document is not valid CBOR"),
        (b"not cbor", {}, "document is not valid CBOR"),
        (SAMPLE + b"\x00", {}, "document has trailing bytes"),
        (cbor2.dumps([1, 2, 3]), {}, "not a COSE_Sign1 array of 4 items"),
        (cbor2.dumps({"a": 1}), {}, "not a COSE_Sign1 array of 4 items"),
        (cbor2.dumps(cbor2.CBORTag(98, cbor2.loads(SAMPLE))), {}, "CBOR tag 98"),
        (edited(payload=b"\xa0\xa0"), {}, "payload has trailing bytes"),
        (edited(payload=cbor2.dumps([1])), {}, "payload is not a map"),
    ],
)
def test_a_broken_document_is_refused(document: bytes, overrides: Any, reason: str) -> None:
    assert reason in refused(document, **overrides)


def test_attestation_error_is_a_domain_error() -> None:
    assert issubclass(AttestationError, AgentKeysError)


def test_a_document_made_here_verifies_strictly() -> None:
    cabundle, leaf, key = make_chain()
    response_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    spki = response_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    document = make_document(made_fields(cabundle, leaf, spki), key)
    result = verify(
        document,
        root_der=cabundle[0],
        now=MADE_NOW,
        nonce=b"n" * 32,
        allowed_pcr0=[("01" * 48).upper()],
        allow_debug=False,
    )
    assert result.public_key == spki
    loaded = serialization.load_der_public_key(result.public_key)
    assert isinstance(loaded, ec.EllipticCurvePublicKey)
    assert loaded.public_numbers() == response_key.public_numbers()
    assert result.pcr0 == "01" * 48
    assert result.user_data is None
    assert "cabundle[0] is not the pinned root" in refused(document, now=MADE_NOW)


def test_a_chain_through_a_non_ca_is_refused() -> None:
    cabundle, leaf, key = make_chain(middle_is_ca=False)
    document = make_document(made_fields(cabundle, leaf, b""), key)
    reason = refused(document, root_der=cabundle[0], now=MADE_NOW)
    assert reason == "cabundle[1] is not a CA certificate"


def test_a_document_signed_by_another_key_is_refused() -> None:
    cabundle, leaf, _ = make_chain()
    other = ec.generate_private_key(ec.SECP384R1())
    document = make_document(made_fields(cabundle, leaf, b""), other)
    reason = refused(document, root_der=cabundle[0], now=MADE_NOW)
    assert reason == "COSE signature does not verify with the leaf key"


def test_a_document_from_the_future_is_refused() -> None:
    cabundle, leaf, key = make_chain()
    fields = made_fields(cabundle, leaf, b"") | {"timestamp": int(MADE_NOW * 1000) + 120_000}
    reason = refused(make_document(fields, key), root_der=cabundle[0], now=MADE_NOW)
    assert reason == "document is from the future: issued 120s ahead"
