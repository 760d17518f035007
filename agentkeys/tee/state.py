"""The worker's sealed state: the master secret, born inside on first boot, and the audit log's
head. Sealed by the platform with associated data binding the key version and the release
identity, not the code hash, so an upgrade keeps every wallet and another release opens nothing."""

from __future__ import annotations

import secrets
from pathlib import Path

from agentkeys.settings import Secret
from agentkeys.tee.audit import EMPTY_HEAD, AuditError, AuditHead
from agentkeys.tee.files import create_once, write_replace
from agentkeys.tee.platform import Platform, SealError

MASTER_FILE = "master.sealed"
HEAD_FILE = "audit-head.sealed"
MAGIC = b"agentkeys-sealed-v1\n"
KEY_VERSION = 1
MASTER_BYTES = 32  # PROTOCOL §2: HKDF's IKM is 32 bytes


class StateError(RuntimeError):
    """The sealed state is missing, tampered with, truncated, foreign, or already there."""


class SealedState:
    """Files in the state folder, each sealed to this platform and release."""

    def __init__(self, platform: Platform, state_dir: Path, release: str) -> None:
        self.platform, self.state_dir, self.release = platform, Path(state_dir), release
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    @property
    def master_path(self) -> Path:
        return self.state_dir / MASTER_FILE

    def is_sealed(self) -> bool:
        return self.master_path.exists()

    def master(self) -> Secret:
        """The master secret: unsealed, or generated and sealed on first boot.

        Generated here with `secrets`, never read from the environment; concurrent first boots
        agree on one file (create_once), and the value returned is the one that was sealed."""
        if not self.is_sealed():
            create_once(self.master_path, self._seal("master", secrets.token_bytes(MASTER_BYTES)))
        return Secret(self._unseal_master(self.master_path.read_bytes()))

    def import_master(self, master: bytes) -> None:
        """Seal an existing master secret (a dev one) once, before first boot."""
        if len(master) != MASTER_BYTES:
            raise StateError(f"a master secret is {MASTER_BYTES} bytes (64 hex characters)")
        if self.is_sealed():
            raise StateError(f"{self.master_path} already holds a sealed master secret")
        sealed = self._seal("master", master)
        # create_once keeps a file another process sealed first: check which one won.
        if create_once(self.master_path, sealed) != sealed:
            raise StateError(f"{self.master_path} already holds a sealed master secret")

    def audit_head(self) -> AuditHead:
        """The sealed audit head; the empty one before the first operation."""
        path = self.state_dir / HEAD_FILE
        if not path.exists():
            return EMPTY_HEAD
        try:
            return AuditHead.from_bytes(self._unseal("audit-head", path.read_bytes(), path))
        except AuditError as exc:
            raise StateError(f"{path} holds no audit head: {exc}") from None

    def save_audit_head(self, head: AuditHead) -> None:
        write_replace(self.state_dir / HEAD_FILE, self._seal("audit-head", head.to_bytes()))

    def _aad(self, kind: str) -> bytes:
        # The release identity and key version, never the code hash: upgrades keep the secret.
        return f"agentkeys-tee:{kind}:key-version={KEY_VERSION}:release={self.release}".encode()

    def _seal(self, kind: str, plaintext: bytes) -> bytes:
        return MAGIC + self.platform.seal(plaintext, self._aad(kind))

    def _unseal(self, kind: str, sealed: bytes, path: Path) -> bytes:
        if not sealed.startswith(MAGIC):
            raise StateError(f"{path} is not a sealed AgentKeys file (foreign or truncated)")
        try:
            return self.platform.unseal(sealed[len(MAGIC) :], self._aad(kind))
        except SealError as exc:
            raise StateError(
                f"{path} does not unseal: tampered, truncated, sealed on another platform or "
                f"for another release than {self.release!r} ({exc})"
            ) from None

    def _unseal_master(self, sealed: bytes) -> bytes:
        master = self._unseal("master", sealed, self.master_path)
        if len(master) != MASTER_BYTES:
            raise StateError(f"{self.master_path} does not hold a {MASTER_BYTES}-byte secret")
        return master
