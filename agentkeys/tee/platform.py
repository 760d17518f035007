"""The worker's platform: seal, unseal and attest, on a Nitro enclave or, in development only, a
simulated one that issues documents in the Nitro format so the daemon runs one verification path."""

from __future__ import annotations

import ctypes
import datetime as dt
import fcntl
import hashlib
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID

from agentkeys.tee.files import create_once, write_replace

__all__ = [
    "SIMULATED_WARNING",
    "NitroPlatform",
    "Platform",
    "PlatformError",
    "SealError",
    "SimulatedPlatform",
    "code_measurement",
    "platform_from_name",
]

SIMULATED_WARNING = (
    "DEV ONLY — simulated TEE, no hardware protection: keys sit in plain files on this host"
)
PLATFORM_SETTING = "AGENTKEYS_TEE_PLATFORM"
NSM_DEVICE = Path("/dev/nsm")
ROOT_FILE = "simulated-root.pem"
SEALING_KEY_FILE = "sealing.key"
CHAIN_FILE = "attestation-chain.pem"
SEALING_KEY_BYTES = 32  # AES-256-GCM
SEAL_NONCE_BYTES = 12  # the GCM standard nonce; random per seal
# Every agentkeys module the worker runs besides tee/ (a test holds this list to what it loads).
MEASURED_FILES = (
    "__init__.py",
    "attestation.py",
    "blueprints/__init__.py",
    "blueprints/parsing.py",
    "blueprints/problems.py",
    "blueprints/signer.py",
    "crypto.py",
    "errors.py",
    "identity.py",
    "observability.py",
    "requestid.py",
    "sessions.py",
    "settings.py",
    "signer.py",
    "siwe.py",
)
PCR_COUNT = 16
CHAIN_VALIDITY = dt.timedelta(days=3650)
CLOCK_SKEW = dt.timedelta(days=1)
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----\n?", re.DOTALL)

log = logging.getLogger(__name__)


class PlatformError(RuntimeError):
    """The platform cannot be chosen, created or used."""


class SealError(RuntimeError):
    """A sealed blob was tampered with, truncated, bound to other data, or sealed elsewhere."""


class Platform(Protocol):
    """What the worker needs from the machine it runs on."""

    name: str

    def seal(self, plaintext: bytes, aad: bytes) -> bytes: ...

    def unseal(self, blob: bytes, aad: bytes) -> bytes: ...

    def attest(
        self, *, nonce: bytes, public_key: bytes | None, user_data: bytes | None = None
    ) -> bytes: ...


def code_measurement(package_dir: Path | None = None) -> bytes:
    """SHA-384 over the worker's code: its relative paths and contents, in sorted order."""
    root = package_dir if package_dir is not None else Path(__file__).resolve().parent.parent
    names = sorted([f"tee/{p.name}" for p in (root / "tee").glob("*.py")] + list(MEASURED_FILES))
    digest = hashlib.sha384()
    for relative in names:
        name, content = relative.encode(), (root / relative).read_bytes()
        # Length prefixes, so moving bytes between a name and a content changes the digest.
        for part in (name, content):
            digest.update(len(part).to_bytes(8, "big") + part)
    return digest.digest()


class SimulatedPlatform:
    """DEV ONLY — simulated TEE, no hardware protection.

    A local attestation CA (root -> intermediate -> leaf, P-384) issues documents in exactly the
    Nitro format; the sealing key is a 0600 file. Anyone with this host's files can forge both."""

    name = "simulated"

    def __init__(self, state_dir: Path, *, pcr0: bytes | None = None) -> None:
        log.warning(SIMULATED_WARNING)
        self.pcr0 = pcr0 if pcr0 is not None else code_measurement()
        if len(self.pcr0) != 48:
            raise PlatformError("pcr0 must be 48 bytes (a SHA-384 digest)")
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)  # the sealing and leaf keys live here
        self._aead = AESGCM(self._sealing_key())
        self._leaf_key, self._chain = self._attestation_chain()
        write_replace(self.state_dir / ROOT_FILE, _pem(self._chain[0]), mode=0o644)

    @property
    def root_der(self) -> bytes:
        return self._chain[0].public_bytes(serialization.Encoding.DER)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = secrets.token_bytes(SEAL_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def unseal(self, blob: bytes, aad: bytes) -> bytes:
        if len(blob) < SEAL_NONCE_BYTES + 16:  # nonce plus the 16-byte GCM tag
            raise SealError("sealed blob is too short")
        try:
            return self._aead.decrypt(blob[:SEAL_NONCE_BYTES], blob[SEAL_NONCE_BYTES:], aad)
        except InvalidTag as exc:
            raise SealError("sealed blob does not open with this platform's key and aad") from exc

    def attest(
        self, *, nonce: bytes, public_key: bytes | None, user_data: bytes | None = None
    ) -> bytes:
        root, intermediate, leaf = self._chain
        pcrs = {i: bytes(48) for i in range(PCR_COUNT)}
        pcrs |= {
            0: self.pcr0,
            1: hashlib.sha384(b"agentkeys-simulated-kernel").digest(),
            2: hashlib.sha384(b"agentkeys-simulated-app").digest(),
        }
        fields: dict[str, Any] = {
            "module_id": "agentkeys-simulated",
            "digest": "SHA384",
            "timestamp": int(time.time() * 1000),
            "pcrs": pcrs,
            "certificate": _der(leaf),
            "cabundle": [_der(root), _der(intermediate)],
            "public_key": public_key,
            "user_data": user_data,
            "nonce": nonce,
        }
        # COSE_Sign1 with ES384, as Nitro signs: the signature is raw r||s over Sig_structure.
        protected, payload = cbor2.dumps({1: -35}), cbor2.dumps(fields)
        signed = cbor2.dumps(["Signature1", protected, b"", payload])
        r, s = decode_dss_signature(self._leaf_key.sign(signed, ec.ECDSA(hashes.SHA384())))
        signature = r.to_bytes(48, "big") + s.to_bytes(48, "big")
        return cbor2.dumps([protected, {}, payload, signature])

    def _sealing_key(self) -> bytes:
        path = self.state_dir / SEALING_KEY_FILE
        key = create_once(path, secrets.token_bytes(SEALING_KEY_BYTES))
        if len(key) != SEALING_KEY_BYTES:
            raise PlatformError(f"{path} is not a {SEALING_KEY_BYTES}-byte key")
        return key

    def _attestation_chain(self) -> tuple[ec.EllipticCurvePrivateKey, list[x509.Certificate]]:
        """The leaf key and [root, intermediate, leaf], made once and kept in one 0600 file."""
        path = self.state_dir / CHAIN_FILE
        blocks = [m.group(0) for m in _PEM_BLOCK.finditer(create_once(path, _new_chain()))]
        if len(blocks) != 4:
            raise PlatformError(f"{path} does not hold a leaf key and three certificates")
        key = serialization.load_pem_private_key(blocks[0], password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PlatformError(f"{path} does not start with an EC private key")
        return key, [x509.load_pem_x509_certificate(block) for block in blocks[1:]]


class NitroPlatform:
    """The AWS Nitro Enclaves platform, through the Nitro Secure Module (/dev/nsm).

    Untested here (no NSM on this host). `attest` sends the NSM driver's Attestation request;
    sealing is refused: an enclave has no sealing key of its own, and the AWS KMS path (a key
    policy bound to the attestation, reached through a vsock proxy) is not built."""

    name = "nitro"

    def __init__(self, device: Path = NSM_DEVICE, *, ioctl: Callable[..., Any] = fcntl.ioctl):
        if not device.exists():
            raise PlatformError(
                f"the Nitro Secure Module ({device}) is not present: run inside a Nitro enclave, "
                f"or use {PLATFORM_SETTING}=simulated in development"
            )
        self.device, self._ioctl = device, ioctl

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        raise PlatformError(NITRO_NO_SEALING)

    def unseal(self, blob: bytes, aad: bytes) -> bytes:
        raise PlatformError(NITRO_NO_SEALING)

    def attest(
        self, *, nonce: bytes, public_key: bytes | None, user_data: bytes | None = None
    ) -> bytes:
        """An attestation document from the NSM, binding `nonce` and `public_key`."""
        answer = self._request(
            {"Attestation": {"user_data": user_data, "nonce": nonce, "public_key": public_key}}
        )
        document = (
            answer.get("Attestation", {}).get("document") if isinstance(answer, dict) else None
        )
        if not isinstance(document, bytes):
            raise PlatformError(f"the NSM refused the attestation request: {answer!r:.200}")
        return document

    def _request(self, message: dict[str, Any]) -> Any:
        """One NSM request: CBOR in, CBOR out, through the driver's ioctl (linux/nsm.h)."""
        request = cbor2.dumps(message)
        if len(request) > NSM_REQUEST_MAX:
            raise PlatformError("the NSM request is too large")
        request_buffer = ctypes.create_string_buffer(request, len(request))
        response_buffer = ctypes.create_string_buffer(NSM_RESPONSE_MAX)
        raw = _NsmRaw(
            _NsmIovec(ctypes.addressof(request_buffer), len(request)),
            _NsmIovec(ctypes.addressof(response_buffer), NSM_RESPONSE_MAX),
        )
        try:
            with self.device.open("rb+", buffering=0) as nsm:
                self._ioctl(nsm.fileno(), NSM_IOCTL_RAW, raw)
        except OSError as exc:
            raise PlatformError(f"the NSM request failed: {exc.strerror or exc}") from None
        if not 0 < raw.response.len <= NSM_RESPONSE_MAX:
            raise PlatformError("the NSM answered nothing")
        try:
            return cbor2.loads(response_buffer.raw[: raw.response.len])
        except (cbor2.CBORError, ValueError) as exc:
            raise PlatformError("the NSM answered something that is not CBOR") from exc


class _NsmIovec(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _NsmRaw(ctypes.Structure):
    _fields_ = [("request", _NsmIovec), ("response", _NsmIovec)]


# linux/nsm.h: _IOWR(NSM_MAGIC 0x0A, 0, struct nsm_raw), with sizes of the kernel's buffers.
NSM_IOCTL_RAW = (3 << 30) | (ctypes.sizeof(_NsmRaw) << 16) | (0x0A << 8)
NSM_REQUEST_MAX, NSM_RESPONSE_MAX = 0x1000, 0x3000
NITRO_NO_SEALING = (
    "sealing on Nitro needs AWS KMS with an attestation-bound key policy, which this build "
    "does not have: the nitro platform can attest but cannot hold the master secret yet"
)


def platform_from_name(name: str, state_dir: Path, *, production: bool) -> Platform:
    """The platform named by AGENTKEYS_TEE_PLATFORM."""
    if name == "simulated":
        # Its keys and attestation CA are plain files: production must never trust them.
        if production:
            raise PlatformError(f"{PLATFORM_SETTING}=simulated is refused in production")
        return SimulatedPlatform(state_dir)
    if name == "nitro":
        return NitroPlatform()
    raise PlatformError(f"{PLATFORM_SETTING} must be 'nitro' or 'simulated', not {name!r}")


def _new_chain() -> bytes:
    """A fresh leaf key and chain; the root and intermediate keys are dropped once used."""
    keys = [ec.generate_private_key(ec.SECP384R1()) for _ in range(3)]
    root = _certificate("AgentKeys simulated root", keys[0], None, keys[0], path_length=1)
    middle = _certificate("AgentKeys simulated intermediate", keys[1], root, keys[0], path_length=0)
    leaf = _certificate("AgentKeys simulated leaf", keys[2], middle, keys[1], path_length=None)
    key_pem = keys[2].private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem + b"".join(_pem(cert) for cert in (root, middle, leaf))


def _certificate(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    path_length: int | None,
) -> x509.Certificate:
    """A certificate signed with ecdsa-with-SHA384; a CA when `path_length` is not None."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = path_length is not None
    start = dt.datetime.now(dt.UTC) - CLOCK_SKEW
    usage = dict.fromkeys(_KEY_USAGES, False)
    usage |= {"key_cert_sign": ca, "crl_sign": ca, "digital_signature": not ca}
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + CHAIN_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(**usage), critical=True)
        .sign(issuer_key, hashes.SHA384())
    )


_KEY_USAGES = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)
