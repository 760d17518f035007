"""The TEE signer's attestation (PROTOCOL §7): before the daemon's first request to it, a fresh
Nitro document for our own nonce, chained to the pinned root, of a pinned image, naming a P-256
response key; then that key's signature on every response before anything of it is used.
Imported from the flow only when a root is pinned, never on the warm path."""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agentkeys.attestation import (
    RESPONSE_SIGNATURE_HEADER,
    verify_attestation,
    verify_response_signature,
)
from agentkeys.client.config import ATTESTATION, PCR0, ROOT_CERT, TeePolicy
from agentkeys.client.errors import AttestationFailed, Unreachable
from agentkeys.client.http import Api
from agentkeys.errors import AttestationError

NONCE_BYTES = 32  # the worker takes 16-64
FORMAT = "aws-nitro-v1"
PLATFORMS = ("nitro", "simulated")
KEY_VERSION = 1


@dataclass(frozen=True)
class Attested:
    """What the signer proved: where it runs, the image it runs, and the key it answers with."""

    platform: str
    pcr0: str
    module_id: str
    public_key: bytes  # DER SubjectPublicKeyInfo, P-256


class Attestor:
    """Attests the signer once (again after a failure), then checks each response's signature."""

    def __init__(self, policy: TeePolicy, api: Api) -> None:
        """`api` is the signer's base URL with no check of its own: it fetches the document."""
        self.policy, self.api = policy, api
        self.root_der = load_root(policy.root_cert)
        self.attested: Attested | None = None

    def attest(self) -> Attested:
        if self.attested is None:
            self.attested = self._attest()
        return self.attested

    def check(self, response: requests.Response) -> None:
        """Refuse a signer response that the attested key did not sign."""
        if self.attested is None:
            raise AttestationFailed(ATTESTATION, "a signer response came before the attestation")
        _verify_signed(self.attested.public_key, response)

    def _attest(self) -> Attested:
        nonce = secrets.token_bytes(NONCE_BYTES)
        response = self.api.send(ATTESTATION, "GET", f"/attestation?nonce={nonce.hex()}")
        document, platform = self._document(response)
        try:
            found = verify_attestation(
                document,
                root_der=self.root_der,
                now=time.time(),
                nonce=nonce,
                allowed_pcr0=None,  # checked just below, to name the setting in the refusal
                allow_debug=self.policy.allow_debug,
            )
        except AttestationError as exc:
            raise AttestationFailed(ATTESTATION, exc.detail) from None
        if found.pcr0 not in self.policy.pcr0:
            raise AttestationFailed(ATTESTATION, f"PCR0 {found.pcr0} is not in {PCR0}")
        if found.public_key is None:
            raise AttestationFailed(ATTESTATION, "the document carries no public_key")
        _require_p256(found.public_key)
        # The key comes from the body, so this response is checked once the document is.
        _verify_signed(found.public_key, response)
        return Attested(platform, found.pcr0, found.module_id, found.public_key)

    def _document(self, response: requests.Response) -> tuple[bytes, str]:
        """The document and platform of a §7 attestation answer."""
        where = f"{self.api.base}/attestation"
        if response.status_code >= 500:
            raise Unreachable(ATTESTATION, f"{where} failed with HTTP {response.status_code}")
        if response.status_code != 200:
            # Never skipped for a missing endpoint: a signer that cannot attest is refused.
            raise AttestationFailed(
                ATTESTATION, f"{where} answered HTTP {response.status_code}, not an attestation"
            )
        try:
            fields = response.json()
        except ValueError:
            fields = None
        if not isinstance(fields, dict):
            raise AttestationFailed(ATTESTATION, f"{where} answered something other than JSON")
        if fields.get("format") != FORMAT:
            raise AttestationFailed(ATTESTATION, f"the attestation format is not {FORMAT}")
        platform = fields.get("platform")
        if platform not in PLATFORMS:
            raise AttestationFailed(ATTESTATION, "the attestation platform is not nitro/simulated")
        version = fields.get("key_version")
        if isinstance(version, bool) or version != KEY_VERSION:
            raise AttestationFailed(
                ATTESTATION, f"the attestation key_version is not {KEY_VERSION}"
            )
        encoded = fields.get("document")
        try:
            document = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else b""
        except binascii.Error:
            document = b""
        if not document:
            raise AttestationFailed(ATTESTATION, "the attestation document is not base64")
        return document, str(platform)


def load_root(path: Path) -> bytes:
    """The pinned root certificate's DER, from a PEM (one certificate) or DER file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AttestationFailed(
            ATTESTATION, f"cannot read {ROOT_CERT} {path}: {exc.strerror or type(exc).__name__}"
        ) from None
    try:
        if b"-----BEGIN" in data:
            certificates = x509.load_pem_x509_certificates(data)
        else:
            certificates = [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise AttestationFailed(
            ATTESTATION, f"{ROOT_CERT} {path} is not a PEM or DER certificate"
        ) from None
    if len(certificates) != 1:
        raise AttestationFailed(
            ATTESTATION, f"{ROOT_CERT} {path} holds {len(certificates)} certificates, not one"
        )
    return certificates[0].public_bytes(serialization.Encoding.DER)


def _require_p256(public_key: bytes) -> None:
    # Pinned to P-256, what §7 signs responses with: no other key type may stand in for it.
    try:
        key = serialization.load_der_public_key(public_key)
    except (ValueError, UnsupportedAlgorithm):
        raise AttestationFailed(ATTESTATION, "the attested public_key is not a DER key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise AttestationFailed(ATTESTATION, "the attested public_key is not a P-256 key")


def _verify_signed(public_key: bytes, response: requests.Response) -> None:
    """The §7 signature over what was actually sent and received, or AttestationFailed."""
    request = response.request
    method, path = request.method or "", request.path_url
    where = f"{method} {urlsplit(path).path}, HTTP {response.status_code}"
    if response.history:
        # The signer's API never redirects; following one would act on an unchecked answer.
        raise AttestationFailed(ATTESTATION, f"the signer redirected the request ({where})")
    body = request.body.encode() if isinstance(request.body, str) else request.body or b""
    if not isinstance(body, bytes):
        raise AttestationFailed(ATTESTATION, f"the request body was not bytes ({where})")
    try:
        verify_response_signature(
            public_key,
            response.headers.get(RESPONSE_SIGNATURE_HEADER),
            method=method,
            path_with_query=path,
            status=response.status_code,
            request_body=body,
            response_body=response.content,
        )
    except AttestationError as exc:
        raise AttestationFailed(ATTESTATION, f"{exc.detail} ({where})") from None
