"""Verification of AWS Nitro Enclaves attestation documents: COSE_Sign1 (ES384) signed by a leaf
that chains to a pinned root, fresh, for the expected nonce and enclave image. Pure code."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import SignatureAlgorithmOID

from agentkeys.errors import AttestationError

__all__ = [
    "RESPONSE_SIGNATURE_HEADER",
    "Attestation",
    "AttestationError",
    "response_signing_input",
    "verify_attestation",
    "verify_response_signature",
]

COSE_SIGN1_TAG = 18
ES384 = -35
PROTECTED_ES384 = {1: ES384}
SIGNATURE_BYTES = 96  # raw r||s, 48 bytes each on P-384
PCR_BYTES = 48  # SHA-384 measurements
MAX_PCRS = 32
MAX_DOCUMENT_BYTES = 64 * 1024  # real documents are about 5 KiB; bounds the CBOR decoder's work
MAX_FIELD_BYTES = 1024  # public_key, user_data and nonce limits of the Nitro spec
FUTURE_SKEW_SECONDS = 60
RESPONSE_SIGNATURE_HEADER = "AgentKeys-Response-Signature"


@dataclass(frozen=True)
class Attestation:
    """The verified contents of an attestation document; `timestamp` is in milliseconds."""

    module_id: str
    digest: str
    timestamp: int
    pcrs: dict[int, bytes]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None

    @property
    def pcr0(self) -> str:
        return self.pcrs[0].hex()


def verify_attestation(
    document: bytes,
    *,
    root_der: bytes,
    now: float,
    nonce: bytes | None,
    allowed_pcr0: Collection[str] | None,
    allow_debug: bool,
    max_age_seconds: int = 300,
) -> Attestation:
    """Return the document's contents if every check passes, else raise AttestationError.

    `allowed_pcr0` None skips the image check; an empty collection allows no image."""
    protected, payload, signature = _cose_sign1(document)
    fields = _decode(payload, "payload")
    attestation, leaf_der, cabundle = _payload(fields)
    leaf_key = _verify_chain(cabundle, leaf_der, root_der, now)
    _verify_signature(leaf_key, protected, payload, signature)

    issued = attestation.timestamp / 1000
    if now - issued > max_age_seconds:
        raise AttestationError(f"document is stale: issued {now - issued:.0f}s before now")
    if issued - now > FUTURE_SKEW_SECONDS:
        raise AttestationError(f"document is from the future: issued {issued - now:.0f}s ahead")
    # Constant time: the nonce binds the document to this challenge.
    if nonce is not None and not hmac.compare_digest(attestation.nonce or b"", nonce):
        raise AttestationError("nonce does not match the challenge")
    # Nitro zeroes PCR0-2 in debug mode, where the host can read enclave memory.
    if not allow_debug and all(attestation.pcrs[i] == bytes(PCR_BYTES) for i in (0, 1, 2)):
        raise AttestationError("debug-mode enclave (PCR0-2 are zero) is not allowed")
    if allowed_pcr0 is not None and attestation.pcr0 not in {p.lower() for p in allowed_pcr0}:
        raise AttestationError(f"PCR0 {attestation.pcr0} is not in the allowed list")
    return attestation


def response_signing_input(
    method: str, path_with_query: str, status: int, request_body: bytes, response_body: bytes
) -> bytes:
    """What the worker's response key signs for every /tee response (PROTOCOL §7)."""
    request_hash = hashlib.sha256(request_body).hexdigest()
    response_hash = hashlib.sha256(response_body).hexdigest()
    text = f"{method} {path_with_query}\n{status}\n{request_hash}\n{response_hash}"
    return text.encode()


def verify_response_signature(
    public_key_der: bytes,
    signature_b64: str | None,
    *,
    method: str,
    path_with_query: str,
    status: int,
    request_body: bytes,
    response_body: bytes,
) -> None:
    """Check a §7 response signature with the attested P-256 key; AttestationError if not."""
    if not signature_b64:
        raise AttestationError(f"the response carries no {RESPONSE_SIGNATURE_HEADER}")
    try:
        key = serialization.load_der_public_key(public_key_der)
        signature = base64.b64decode(signature_b64, validate=True)
    except ValueError as exc:
        raise AttestationError("the response key or signature is malformed") from exc
    # Pinned to P-256 ECDSA with SHA-256: no other key type can stand in for the attested one.
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise AttestationError("the attested response key is not a P-256 key")
    signed = response_signing_input(method, path_with_query, status, request_body, response_body)
    try:
        key.verify(signature, signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise AttestationError("the response signature does not verify") from exc


def _decode(data: bytes, what: str) -> Any:
    """One CBOR item filling all of `data`."""
    stream = io.BytesIO(data)
    try:
        item = cbor2.CBORDecoder(stream).decode()
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise AttestationError(f"{what} is not valid CBOR") from exc
    if stream.tell() != len(data):
        raise AttestationError(f"{what} has trailing bytes after its CBOR item")
    return item


def _cose_sign1(document: bytes) -> tuple[bytes, bytes, bytes]:
    """The protected header, payload and signature of a COSE_Sign1 pinned to ES384."""
    if not isinstance(document, bytes) or not document:
        raise AttestationError("document is empty or not bytes")
    if len(document) > MAX_DOCUMENT_BYTES:
        raise AttestationError(f"document is larger than {MAX_DOCUMENT_BYTES} bytes")
    item = _decode(document, "document")
    if isinstance(item, cbor2.CBORTag):
        if item.tag != COSE_SIGN1_TAG:
            raise AttestationError(f"document has CBOR tag {item.tag}, not COSE_Sign1 (18)")
        item = item.value
    if not isinstance(item, list | tuple) or len(item) != 4:
        raise AttestationError("document is not a COSE_Sign1 array of 4 items")
    protected, unprotected, payload, signature = item
    if not isinstance(protected, bytes) or not isinstance(unprotected, Mapping):
        raise AttestationError("COSE headers are not a bstr and a map")
    if not isinstance(payload, bytes) or not isinstance(signature, bytes):
        raise AttestationError("COSE payload or signature is not a bstr")
    # Pinned to ES384, the only algorithm Nitro uses: no negotiation, no "none".
    if _decode(protected, "protected header") != PROTECTED_ES384:
        raise AttestationError("protected header is not {alg: ES384}")
    if len(signature) != SIGNATURE_BYTES:
        raise AttestationError(f"signature is {len(signature)} bytes, not {SIGNATURE_BYTES}")
    return protected, payload, signature


def _payload(fields: Any) -> tuple[Attestation, bytes, list[bytes]]:
    """The typed attestation, the leaf certificate and the CA bundle, per the Nitro spec."""
    if not isinstance(fields, dict):
        raise AttestationError("payload is not a map")
    missing = {"module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle"} - set(fields)
    if missing:
        raise AttestationError(f"payload lacks {', '.join(sorted(missing))}")
    module_id, digest, timestamp = fields["module_id"], fields["digest"], fields["timestamp"]
    if not isinstance(module_id, str) or not module_id:
        raise AttestationError("module_id is not a non-empty text string")
    if digest != "SHA384":
        raise AttestationError("digest is not SHA384")
    if not isinstance(timestamp, int) or isinstance(timestamp, bool) or timestamp <= 0:
        raise AttestationError("timestamp is not a positive integer")
    pcrs = fields["pcrs"]
    if not isinstance(pcrs, dict) or not 0 < len(pcrs) <= MAX_PCRS:
        raise AttestationError(f"pcrs is not a map of 1 to {MAX_PCRS} entries")
    for index, value in pcrs.items():
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < MAX_PCRS:
            raise AttestationError(f"pcrs has an invalid index {index!r}")
        if not isinstance(value, bytes) or len(value) != PCR_BYTES:
            raise AttestationError(f"PCR{index} is not {PCR_BYTES} bytes")
    if not {0, 1, 2} <= set(pcrs):
        raise AttestationError("pcrs lacks PCR0, PCR1 or PCR2")
    certificate, cabundle = fields["certificate"], fields["cabundle"]
    if not isinstance(certificate, bytes):
        raise AttestationError("certificate is not a bstr")
    if not isinstance(cabundle, list | tuple) or not cabundle:
        raise AttestationError("cabundle is not a non-empty array")
    if not all(isinstance(cert, bytes) for cert in cabundle):
        raise AttestationError("cabundle holds something other than bstr certificates")
    optional = {name: fields.get(name) for name in ("public_key", "user_data", "nonce")}
    for name, value in optional.items():
        if value is not None and (not isinstance(value, bytes) or len(value) > MAX_FIELD_BYTES):
            raise AttestationError(f"{name} is not null or a bstr of at most {MAX_FIELD_BYTES}")
    attestation = Attestation(
        module_id=module_id,
        digest=digest,
        timestamp=timestamp,
        pcrs=dict(pcrs),
        public_key=optional["public_key"],
        user_data=optional["user_data"],
        nonce=optional["nonce"],
    )
    return attestation, certificate, list(cabundle)


def _verify_chain(
    cabundle: list[bytes], leaf_der: bytes, root_der: bytes, now: float
) -> ec.EllipticCurvePublicKey:
    """Walk root -> intermediates -> leaf by hand and return the leaf's P-384 key.

    cryptography's strict verifier wants an AuthorityKeyIdentifier, which AWS's leaf lacks."""
    # Trust comes only from the pinned root's exact bytes, never from the document.
    if cabundle[0] != root_der:
        raise AttestationError("cabundle[0] is not the pinned root certificate")
    when = datetime.fromtimestamp(now, UTC)
    chain = [_certificate(der, f"cabundle[{i}]") for i, der in enumerate(cabundle)]
    chain.append(_certificate(leaf_der, "leaf certificate"))
    names = [f"cabundle[{i}]" for i in range(len(cabundle))] + ["leaf certificate"]
    for position, (cert, name) in enumerate(zip(chain, names, strict=True)):
        if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
            raise AttestationError(f"{name} is not valid at {when.isoformat()}")
        if position == 0:
            continue
        issuer, issuer_name = chain[position - 1], names[position - 1]
        _require_ca(issuer, issuer_name, below=len(chain) - 1 - position)
        if cert.issuer != issuer.subject:
            raise AttestationError(f"{name} is not issued by {issuer_name}: names differ")
        _verify_issued_by(cert, name, issuer, issuer_name)
    key = chain[-1].public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise AttestationError("leaf certificate key is not P-384")
    return key


def _certificate(der: bytes, name: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise AttestationError(f"{name} is not a DER certificate") from exc


def _require_ca(cert: x509.Certificate, name: str, below: int) -> None:
    """An issuer must be a CA whose path length allows the `below` CAs under it."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    # Without this a leaf could sign a certificate of its own choosing.
    if constraints is None or not constraints.ca:
        raise AttestationError(f"{name} is not a CA certificate")
    if constraints.path_length is not None and constraints.path_length < below:
        raise AttestationError(f"{name} path length {constraints.path_length} is exceeded")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise AttestationError(f"{name} may not sign certificates (keyUsage)")


def _verify_issued_by(
    cert: x509.Certificate, name: str, issuer: x509.Certificate, issuer_name: str
) -> None:
    # Pinned to ECDSA with SHA-384, what every certificate in the Nitro chain uses.
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA384:
        raise AttestationError(f"{name} is not signed with ecdsa-with-SHA384")
    key = issuer.public_key()
    algorithm = cert.signature_hash_algorithm
    if not isinstance(key, ec.EllipticCurvePublicKey) or algorithm is None:
        raise AttestationError(f"{issuer_name} key is not an EC key")
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
    except InvalidSignature as exc:
        raise AttestationError(f"{name} signature does not verify with {issuer_name}") from exc


def _verify_signature(
    key: ec.EllipticCurvePublicKey, protected: bytes, payload: bytes, signature: bytes
) -> None:
    """The COSE signature over Sig_structure; COSE carries r||s, cryptography wants DER."""
    signed = cbor2.dumps(["Signature1", protected, b"", payload])
    half = SIGNATURE_BYTES // 2
    r = int.from_bytes(signature[:half], "big")
    s = int.from_bytes(signature[half:], "big")
    try:
        key.verify(encode_dss_signature(r, s), signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature as exc:
        raise AttestationError("COSE signature does not verify with the leaf key") from exc
