"""The worker's signer: the shared Signer (PROTOCOL §2, §5) with a per-account limit and every
derive and sign written to the audit log before its answer leaves."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime

from agentkeys.crypto import keccak256
from agentkeys.errors import AuditUnavailable, RateLimited
from agentkeys.settings import Limit, Secret
from agentkeys.signer import DerivedAddress, SignedMessage, Signer, SigningPolicy
from agentkeys.tee.audit import AuditError, AuditLog

MAX_TRACKED_ACCOUNTS = 100_000  # past this, windows that have ended are dropped


class AccountLimiter:
    """Fixed-window counts per account in this process's memory: the worker is one process
    (gunicorn -w 1), so this count is the whole count."""

    def __init__(self, limit: Limit, clock: Callable[[], float] = time.time) -> None:
        self.limit, self.clock = limit, clock
        self._windows: dict[str, tuple[int, int]] = {}  # account -> (window start, hits)
        self._lock = threading.Lock()

    def hit(self, account: str) -> None:
        """Count one operation; RateLimited with the seconds left once over the limit."""
        now = int(self.clock())
        start = now - now % self.limit.seconds
        with self._lock:
            if len(self._windows) >= MAX_TRACKED_ACCOUNTS:
                self._windows = {a: w for a, w in self._windows.items() if w[0] == start}
            window_start, hits = self._windows.get(account, (start, 0))
            hits = hits + 1 if window_start == start else 1
            self._windows[account] = (start, hits)
        if hits > self.limit.count:
            retry_after = max(1, start + self.limit.seconds - now)
            raise RateLimited(
                "Too many signer requests for this account; try again later.", retry_after
            )


class TeeSigner(Signer):
    """Derives and signs inside the worker: limited per account, and audited."""

    def __init__(
        self, master: Secret, policy: SigningPolicy, audit: AuditLog, limiter: AccountLimiter
    ) -> None:
        super().__init__(master, policy)
        self.audit, self.limiter = audit, limiter

    def derive_address(self, anchor: str, *, request_id: str = "") -> DerivedAddress:
        self.limiter.hit(anchor)
        derived = super().derive_address(anchor)
        self._record("derive", anchor, derived.address, request_id)
        return derived

    def sign_message(
        self,
        anchor: str,
        message: bytes,
        *,
        request_id: str = "",
        now: datetime | None = None,
    ) -> SignedMessage:
        self.limiter.hit(anchor)
        signed = super().sign_message(anchor, message, now=now)
        self._record("sign", anchor, signed.address, request_id, keccak256(message).hex())
        return signed

    def _record(
        self, op: str, anchor: str, address: str, request_id: str, keccak: str | None = None
    ) -> None:
        try:
            self.audit.append(
                op=op,
                omni_account=anchor,
                address=address,
                request_id=request_id,
                message_keccak=keccak,
            )
        except (OSError, AuditError):
            # No line, no answer: an operation the log does not show must not have happened.
            raise AuditUnavailable(
                "The signer cannot write its audit log; try again later."
            ) from None
