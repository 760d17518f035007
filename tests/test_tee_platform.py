"""The worker's platforms through their interface: sealing, the simulated attestation CA checked
by the daemon's own verifier, the code measurement, and the choice by name."""

from __future__ import annotations

import ctypes
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agentkeys.attestation import Attestation, verify_attestation
from agentkeys.errors import AttestationError
from agentkeys.tee.platform import (
    MEASURED_FILES,
    NSM_DEVICE,
    SIMULATED_WARNING,
    NitroPlatform,
    Platform,
    PlatformError,
    SealError,
    SimulatedPlatform,
    code_measurement,
    platform_from_name,
)

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "agentkeys"
NONCE = b"n" * 32
PUBLIC_KEY = b"worker public key"


def root_der(state_dir: Path) -> bytes:
    pem = (state_dir / "simulated-root.pem").read_bytes()
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def verify(document: bytes, state_dir: Path, **overrides: Any) -> Attestation:
    options: dict[str, Any] = {
        "root_der": root_der(state_dir),
        "now": time.time(),
        "nonce": NONCE,
        "allowed_pcr0": [code_measurement().hex()],
        "allow_debug": False,
    }
    return verify_attestation(document, **(options | overrides))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def platform(state_dir: Path) -> SimulatedPlatform:
    return SimulatedPlatform(state_dir)


def test_seal_and_unseal_round_trip(platform: SimulatedPlatform) -> None:
    blob = platform.seal(b"secret", b"aad")
    assert b"secret" not in blob
    assert platform.unseal(blob, b"aad") == b"secret"
    assert platform.seal(b"secret", b"aad") != blob  # a fresh nonce each time
    assert platform.unseal(platform.seal(b"", b""), b"") == b""


def test_unseal_refuses_what_this_platform_did_not_seal(
    platform: SimulatedPlatform, tmp_path: Path
) -> None:
    blob = platform.seal(b"secret", b"aad")
    other = SimulatedPlatform(tmp_path / "other")
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    for bad, aad in [
        (tampered, b"aad"),
        (blob[:27], b"aad"),
        (blob[:-1], b"aad"),
        (b"", b"aad"),
        (blob, b"other aad"),
        (other.seal(b"secret", b"aad"), b"aad"),
    ]:
        with pytest.raises(SealError):
            platform.unseal(bad, aad)


def test_state_files_are_private(platform: SimulatedPlatform, state_dir: Path) -> None:
    assert mode(state_dir) == 0o700
    assert mode(state_dir / "sealing.key") == 0o600
    assert len((state_dir / "sealing.key").read_bytes()) == 32
    assert mode(state_dir / "attestation-chain.pem") == 0o600
    assert b"PRIVATE KEY" in (state_dir / "attestation-chain.pem").read_bytes()
    assert b"PRIVATE KEY" not in (state_dir / "simulated-root.pem").read_bytes()
    assert not [p for p in state_dir.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_an_existing_state_dir_is_tightened(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    SimulatedPlatform(loose)
    assert mode(loose) == 0o700


def test_a_restart_keeps_the_keys_and_the_root(
    platform: SimulatedPlatform, state_dir: Path
) -> None:
    blob, root = platform.seal(b"secret", b"aad"), root_der(state_dir)
    restarted = SimulatedPlatform(state_dir)
    assert restarted.unseal(blob, b"aad") == b"secret"
    assert root_der(state_dir) == root == restarted.root_der
    verify(restarted.attest(nonce=NONCE, public_key=PUBLIC_KEY), state_dir, root_der=root)


def test_the_simulated_document_passes_the_daemon_verifier(
    platform: SimulatedPlatform, state_dir: Path
) -> None:
    document = platform.attest(nonce=NONCE, public_key=PUBLIC_KEY, user_data=b"user")
    result = verify(document, state_dir)
    assert result.public_key == PUBLIC_KEY
    assert result.user_data == b"user"
    assert result.nonce == NONCE
    assert result.module_id == "agentkeys-simulated"
    assert result.pcr0 == code_measurement().hex()
    assert sorted(result.pcrs) == list(range(16))
    bare = platform.attest(nonce=NONCE, public_key=None)
    assert verify(bare, state_dir).public_key is None


def test_the_simulated_document_has_the_nitro_shape(platform: SimulatedPlatform) -> None:
    protected, unprotected, payload, signature = cbor2.loads(
        platform.attest(nonce=NONCE, public_key=PUBLIC_KEY)
    )
    assert cbor2.loads(protected) == {1: -35}
    assert unprotected == {}
    assert len(signature) == 96
    fields = cbor2.loads(payload)
    assert set(fields) == {
        "module_id",
        "digest",
        "timestamp",
        "pcrs",
        "certificate",
        "cabundle",
        "public_key",
        "user_data",
        "nonce",
    }
    assert fields["digest"] == "SHA384"
    assert len(fields["cabundle"]) == 2
    assert all(len(fields["pcrs"][i]) == 48 for i in range(16))


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"nonce": b"m" * 32}, "nonce does not match the challenge"),
        ({"allowed_pcr0": ["ab" * 48]}, "is not in the allowed list"),
        ({"allowed_pcr0": []}, "is not in the allowed list"),
    ],
)
def test_the_simulated_document_is_refused_for_the_wrong_challenge_or_image(
    platform: SimulatedPlatform, state_dir: Path, overrides: dict[str, Any], reason: str
) -> None:
    document = platform.attest(nonce=NONCE, public_key=PUBLIC_KEY)
    with pytest.raises(AttestationError, match=reason):
        verify(document, state_dir, **overrides)


def test_another_simulated_ca_is_not_trusted(state_dir: Path, tmp_path: Path) -> None:
    SimulatedPlatform(state_dir)
    stranger = SimulatedPlatform(tmp_path / "stranger")
    document = stranger.attest(nonce=NONCE, public_key=PUBLIC_KEY)
    with pytest.raises(AttestationError, match="cabundle\\[0\\] is not the pinned root"):
        verify(document, state_dir)


def test_an_explicit_pcr0_is_attested(state_dir: Path) -> None:
    platform = SimulatedPlatform(state_dir, pcr0=b"\x07" * 48)
    document = platform.attest(nonce=NONCE, public_key=None)
    assert verify(document, state_dir, allowed_pcr0=["07" * 48]).pcr0 == "07" * 48
    with pytest.raises(PlatformError, match="48 bytes"):
        SimulatedPlatform(state_dir, pcr0=b"short")


def test_the_simulated_platform_is_labelled(
    state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    SimulatedPlatform(state_dir)
    assert SIMULATED_WARNING.startswith("DEV ONLY — simulated TEE, no hardware protection")
    assert (SimulatedPlatform.__doc__ or "").startswith(
        "DEV ONLY — simulated TEE, no hardware protection"
    )
    assert SIMULATED_WARNING in caplog.text


def copy_of_worker_code(target: Path) -> Path:
    (target / "tee").mkdir(parents=True)
    (target / "blueprints").mkdir()
    for path in (PACKAGE / "tee").glob("*.py"):
        shutil.copy(path, target / "tee" / path.name)
    for name in MEASURED_FILES:
        shutil.copy(PACKAGE / name, target / name)
    return target


def test_the_measurement_covers_every_module_the_worker_loads() -> None:
    code = (
        "import sys, agentkeys.tee.app, agentkeys.tee.__main__\n"
        "print('\\n'.join(sorted(m.__file__ for n, m in sys.modules.items()\n"
        "    if n.startswith('agentkeys') and getattr(m, '__file__', None))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    loaded = {str(Path(p).relative_to(PACKAGE)) for p in result.stdout.split()}
    measured = set(MEASURED_FILES) | {f"tee/{p.name}" for p in (PACKAGE / "tee").glob("*.py")}
    assert "tee/app.py" in loaded and "signer.py" in loaded
    assert loaded <= measured, sorted(loaded - measured)


def test_code_measurement_covers_the_worker_code(tmp_path: Path) -> None:
    copy = copy_of_worker_code(tmp_path / "agentkeys")
    measured = code_measurement(copy)
    assert len(measured) == 48
    assert measured == code_measurement() == code_measurement(PACKAGE)
    (copy / "unmeasured.py").write_text("x = 1\n")
    assert code_measurement(copy) == measured
    for name in ("signer.py", "tee/platform.py"):
        original = (copy / name).read_bytes()
        (copy / name).write_bytes(original + b"\n")
        assert code_measurement(copy) != measured
        (copy / name).write_bytes(original)
    (copy / "tee" / "extra.py").write_text("")
    assert code_measurement(copy) != measured


def test_platform_from_name_gives_the_simulated_platform_outside_production(
    state_dir: Path,
) -> None:
    platform: Platform = platform_from_name("simulated", state_dir, production=False)
    assert platform.name == "simulated"
    assert platform.unseal(platform.seal(b"s", b"a"), b"a") == b"s"


@pytest.mark.parametrize(
    ("name", "production", "reason"),
    [
        ("simulated", True, "AGENTKEYS_TEE_PLATFORM=simulated is refused in production"),
        ("", False, "AGENTKEYS_TEE_PLATFORM must be 'nitro' or 'simulated', not ''"),
        ("Simulated", False, "AGENTKEYS_TEE_PLATFORM must be 'nitro' or 'simulated'"),
        ("sgx", True, "AGENTKEYS_TEE_PLATFORM must be 'nitro' or 'simulated', not 'sgx'"),
    ],
)
def test_platform_from_name_refuses(
    state_dir: Path, name: str, production: bool, reason: str
) -> None:
    with pytest.raises(PlatformError) as caught:
        platform_from_name(name, state_dir, production=production)
    assert str(caught.value).startswith(reason)
    assert not state_dir.exists()  # nothing was made for a refused platform


NO_NSM = (
    "the Nitro Secure Module (/dev/nsm) is not present: run inside a Nitro enclave, "
    "or use AGENTKEYS_TEE_PLATFORM=simulated in development"
)


@pytest.mark.skipif(NSM_DEVICE.exists(), reason="this host has a Nitro Secure Module")
@pytest.mark.parametrize("production", [True, False])
def test_nitro_without_the_device_says_so(state_dir: Path, production: bool) -> None:
    with pytest.raises(PlatformError) as caught:
        platform_from_name("nitro", state_dir, production=production)
    assert str(caught.value) == NO_NSM


def test_nitro_refuses_to_seal(tmp_path: Path) -> None:
    device = tmp_path / "nsm"
    device.touch()
    nitro = NitroPlatform(device)
    with pytest.raises(PlatformError, match="sealing on Nitro needs AWS KMS"):
        nitro.seal(b"", b"")
    with pytest.raises(PlatformError, match="sealing on Nitro needs AWS KMS"):
        nitro.unseal(b"", b"")


class FakeNsm:
    """Plays the NSM driver's ioctl: reads the CBOR request from the caller's buffer and writes
    `answer` (CBOR) into its response buffer, as linux/nsm.h describes."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.requests: list[Any] = []
        self.commands: list[int] = []

    def __call__(self, fd: int, command: int, raw: Any) -> int:
        self.commands.append(command)
        self.requests.append(cbor2.loads(ctypes.string_at(raw.request.addr, raw.request.len)))
        data = cbor2.dumps(self.answer)
        assert len(data) <= raw.response.len
        ctypes.memmove(raw.response.addr, data, len(data))
        raw.response.len = len(data)
        return 0


def test_nitro_attest_sends_the_nsm_attestation_request(tmp_path: Path) -> None:
    device = tmp_path / "nsm"
    device.touch()
    fake = FakeNsm({"Attestation": {"document": b"a document"}})
    nitro = NitroPlatform(device, ioctl=fake)
    assert nitro.attest(nonce=NONCE, public_key=PUBLIC_KEY) == b"a document"
    assert fake.requests == [
        {"Attestation": {"user_data": None, "nonce": NONCE, "public_key": PUBLIC_KEY}}
    ]
    assert fake.commands == [0xC0200A00]  # _IOWR(0x0A, 0, 32-byte struct nsm_raw)
    refusing = NitroPlatform(device, ioctl=FakeNsm({"Error": "InvalidArgument"}))
    with pytest.raises(PlatformError, match="the NSM refused the attestation request"):
        refusing.attest(nonce=NONCE, public_key=None)


def test_nitro_attest_reports_a_failing_device(tmp_path: Path) -> None:
    device = tmp_path / "nsm"
    device.touch()

    def broken(fd: int, command: int, raw: Any) -> int:
        raise OSError(25, "Inappropriate ioctl for device")

    with pytest.raises(PlatformError, match="the NSM request failed: Inappropriate ioctl"):
        NitroPlatform(device, ioctl=broken).attest(nonce=NONCE, public_key=None)
    # The real ioctl on a file that is not the NSM fails the same way, with one clear line.
    with pytest.raises(PlatformError, match="the NSM request failed"):
        NitroPlatform(device).attest(nonce=NONCE, public_key=None)
