"""The worker's audit log (PROTOCOL §7): one JSON line per derive or sign, in a sha256 hash chain
whose head (count and last hash) the worker keeps in its sealed state, so a cut tail shows."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agentkeys.crypto import is_checksum_address
from agentkeys.tee.files import sync_folder

__all__ = [
    "EMPTY_HEAD",
    "GENESIS",
    "OPS",
    "AuditError",
    "AuditFailure",
    "AuditHead",
    "AuditLog",
    "canonical",
    "record_hash",
    "verify_file",
    "verify_lines",
]

GENESIS = "0" * 64
# Records are under 700 bytes; longer lines are refused before parsing, so no line can make the
# JSON parser recurse deep enough to overflow the C stack (some libraries raise the limit).
MAX_LINE_BYTES = 1024
OPS = ("derive", "sign")
VERIFY_HINT = "run `python -m agentkeys.tee audit verify FILE --state DIR` for the first bad line"
_BASE_FIELDS = frozenset({"ts", "op", "omni_account", "address", "request_id", "prev_hash", "hash"})
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_TS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z\Z")
# O_APPEND: every write lands at the end, whatever else has the file open.
_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT

log = logging.getLogger(__name__)


class AuditError(RuntimeError):
    """The audit log does not match its chain or its sealed head."""


@dataclass(frozen=True)
class AuditHead:
    """How many lines the sealed state vouches for, and the hash of the last of them."""

    count: int
    hash: str

    def __post_init__(self) -> None:
        if type(self.count) is not int or self.count < 0:
            raise ValueError("an audit head's count must be a non-negative int")
        if not isinstance(self.hash, str) or not _HEX64.match(self.hash):
            raise ValueError("an audit head's hash must be 64 lowercase hex characters")
        if (self.count == 0) != (self.hash == GENESIS):
            raise ValueError("an audit head has the genesis hash exactly when its count is 0")

    def to_bytes(self) -> bytes:
        """Compact JSON, for sealing."""
        return canonical({"count": self.count, "hash": self.hash})

    @classmethod
    def from_bytes(cls, data: bytes) -> AuditHead:
        """The head `to_bytes` wrote; AuditError on anything else."""
        try:
            value = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise AuditError("the sealed audit head is not JSON") from exc
        if not isinstance(value, dict) or set(value) != {"count", "hash"}:
            raise AuditError("the sealed audit head is not an object of count and hash")
        try:
            return cls(value["count"], value["hash"])
        except ValueError as exc:
            raise AuditError(f"the sealed audit head is malformed: {exc}") from exc


EMPTY_HEAD = AuditHead(0, GENESIS)


@dataclass(frozen=True)
class AuditFailure:
    """The first bad line of a log (for a cut tail: the first missing one) and why."""

    line: int
    reason: str  # one sentence that names the line, e.g. "line 3 was edited: ..."

    def __str__(self) -> str:
        if self.reason.startswith(f"line {self.line} "):
            return self.reason
        return f"line {self.line}: {self.reason}"


def canonical(record: Mapping[str, Any]) -> bytes:
    """Sorted keys, no spaces, UTF-8: the bytes that are hashed and the bytes of a line."""
    text = json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def record_hash(record: Mapping[str, Any]) -> str:
    """sha256 hex of the canonical JSON of `record` without its "hash"."""
    body = {key: value for key, value in record.items() if key != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def verify_lines(lines: Iterable[bytes], head: AuditHead | None = None) -> AuditFailure | None:
    """The first bad line of a log read as lines (each with its b"\\n"), or None when intact;
    with `head`, also a cut tail, a rewritten chain and lines the sealed head does not cover."""
    walk = _walk(lines, head.count if head else 0)
    return walk.failure if head is None else _judge(walk, head)


def verify_file(path: Path, head: AuditHead | None = None) -> AuditFailure | None:
    """`verify_lines` over a file; a missing file is an empty log."""
    try:
        with open(path, "rb") as f:
            return verify_lines(f, head)
    except FileNotFoundError:
        return verify_lines([], head)


class AuditLog:
    """Appends records to the log and saves the new head after each, one thread at a time.

    One writer process per file: the lock orders this process's threads, not other processes.

    Trusts that `path` matches `head`: at boot use `open`, which checks and reconciles them."""

    def __init__(
        self,
        path: Path,
        head: AuditHead,
        save_head: Callable[[AuditHead], None],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self._save_head = save_head
        self._clock = clock
        self._lock = threading.Lock()
        self._head = head  # what the sealed state holds, as far as we know
        self._tail = head  # the last line in the file: what the next line chains to
        try:
            self._size = self.path.stat().st_size
        except FileNotFoundError:
            self._size = 0
        self._broken = False

    @classmethod
    def open(
        cls,
        path: Path,
        head: AuditHead,
        save_head: Callable[[AuditHead], None],
        *,
        clock: Callable[[], float] = time.time,
    ) -> AuditLog:
        """The log at `path` checked against the sealed `head`, reconciled after a crash.

        A crash can leave lines the head does not cover yet (written, head not saved) and a torn
        last line (half written): those are repaired; anything else raises AuditError."""
        path = Path(path)
        walk = _walk_file(path, head.count)
        # A torn line past the sealed head was never acknowledged (no head, so no signature went
        # out): drop it, but only when what comes before it agrees with the head.
        if walk.torn and walk.good.count >= head.count and walk.at_sealed == head.hash:
            os.truncate(path, walk.offset)
            log.warning("audit log %s: dropped a torn last line (a crash mid-write)", path)
            walk = _walk_file(path, head.count)
        failure = _judge(walk, head)
        if failure is not None:
            # Lines past the head that chain onto it are a crash between writing a line and
            # saving the head, or a save_head that failed: adopt them. They can only add records,
            # never hide one, and the warning says how many.
            adoptable = walk.failure is None and walk.good.count > head.count
            if not (adoptable and walk.at_sealed == head.hash):
                raise AuditError(f"audit log {path}: {failure}; {VERIFY_HINT}")
            save_head(walk.good)
            log.warning(
                "audit log %s: adopted %d line(s) past the sealed head (a crash before the head "
                "was saved)",
                path,
                walk.good.count - head.count,
            )
            head = walk.good
        return cls(path, head, save_head, clock=clock)

    @property
    def head(self) -> AuditHead:
        """The head last saved by `save_head`."""
        return self._head

    def append(
        self,
        *,
        op: str,
        omni_account: str,
        address: str,
        request_id: str,
        message_keccak: str | None = None,
    ) -> dict[str, Any]:
        """Write one record, fsync it, save the new head, and return the record (with hash).

        Raises what the write or `save_head` raises: the caller must then not release the
        signature. Never give it a message body, a key or a secret: only these fields."""
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, not {op!r}")
        if (message_keccak is not None) != (op == "sign"):
            raise ValueError("message_keccak is required for sign and refused for derive")
        with self._lock:
            if self._broken:
                raise AuditError(f"audit log {self.path}: a failed write was not undone; restart")
            record: dict[str, Any] = {
                "ts": _timestamp(self._clock()),
                "op": op,
                "omni_account": omni_account,
                "address": address,
                "request_id": request_id,
                "prev_hash": self._tail.hash,
            }
            if message_keccak is not None:
                record["message_keccak"] = message_keccak
            digest = record["hash"] = record_hash(record)
            # The same check the verifier makes, so a bad argument can never write a line that
            # makes the next boot refuse the log.
            problem = _shape_problem(record)
            if problem is not None:
                raise ValueError(f"not a valid audit record: {problem}")
            line = canonical(record) + b"\n"
            if len(line) > MAX_LINE_BYTES:
                raise ValueError(f"an audit record is at most {MAX_LINE_BYTES} bytes")
            self._write(line)
            self._size += len(line)
            new = AuditHead(self._tail.count + 1, digest)
            # The line is on disk before save_head runs. If save_head fails, the file runs past
            # the sealed head, which `open` adopts at the next boot (and the next save_head here
            # covers): so the next line chains to this one (the tail moves on) while `head`
            # stays what was last saved.
            self._tail = new
            self._save_head(new)
            self._head = new
            return record

    def _write(self, line: bytes) -> None:
        """One os.write and an fsync; on failure, cut the file back to its last whole line."""
        fd = os.open(self.path, _APPEND, 0o600)  # 0600 when created; an existing mode is kept
        try:
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(errno.EIO, f"short write to the audit log: {written} bytes")
                os.fsync(fd)
                if self._size == 0:
                    sync_folder(self.path.parent)  # so a new file's name survives a crash
            except BaseException:
                self._roll_back(fd)
                raise
        finally:
            os.close(fd)

    def _roll_back(self, fd: int) -> None:
        # A half-written line followed by more lines would break the chain for good: remove it,
        # and if even that fails, refuse every later append (fail closed) until a restart.
        try:
            os.ftruncate(fd, self._size)
            os.fsync(fd)
        except OSError:
            self._broken = True
            log.exception("audit log %s: a failed write could not be rolled back", self.path)


@dataclass(frozen=True)
class _Walk:
    """What one pass over the lines found."""

    failure: AuditFailure | None  # the first line that breaks the chain on its own
    torn: bool  # that line is a torn write
    good: AuditHead  # the chain of the lines before it
    offset: int  # their length in bytes
    at_sealed: str | None  # the hash of line `sealed` (the head's count), once reached


def _walk(lines: Iterable[bytes], sealed: int) -> _Walk:
    """Check the lines in order until the first bad one."""
    count, last, offset = 0, GENESIS, 0
    at_sealed = GENESIS if sealed == 0 else None
    for number, raw in enumerate(lines, start=1):
        checked = _check_line(number, raw, last)
        if isinstance(checked, AuditFailure):
            torn = not raw.endswith(b"\n") and len(raw) <= MAX_LINE_BYTES
            return _Walk(checked, torn, AuditHead(count, last), offset, at_sealed)
        count, last, offset = number, checked, offset + len(raw)
        if number == sealed:
            at_sealed = last
    return _Walk(None, False, AuditHead(count, last), offset, at_sealed)


def _walk_file(path: Path, sealed: int) -> _Walk:
    try:
        with open(path, "rb") as f:
            # Bounded reads: a line too long to be a record is one failure, never all in memory.
            return _walk(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), sealed)
    except FileNotFoundError:
        return _walk([], sealed)


def _check_line(number: int, raw: bytes, prev_hash: str) -> AuditFailure | str:
    """Why line `number` is bad, or its hash when it is good and follows `prev_hash`."""
    if len(raw) > MAX_LINE_BYTES:
        reason = f"line {number} is longer than any audit record ({MAX_LINE_BYTES} bytes)"
        return AuditFailure(number, reason)
    if not raw.endswith(b"\n"):
        return AuditFailure(number, f"line {number} has no trailing newline: a torn write")
    body = raw[:-1]
    not_a_record = f"line {number} is not an audit record"
    try:
        record = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return AuditFailure(number, f"{not_a_record}: not UTF-8 JSON")
    if (problem := _shape_problem(record)) is not None:
        return AuditFailure(number, f"{not_a_record}: {problem}")
    try:
        digest = record_hash(record)
    except ValueError:  # a lone surrogate (JSON allows \ud800) has no UTF-8 form
        return AuditFailure(number, f"{not_a_record}: a field is not valid Unicode")
    if digest != record["hash"]:
        reason = f"line {number} was edited: its hash does not match its contents"
        return AuditFailure(number, reason)
    # Another spelling of the same record (spaces, key order, escapes, a duplicate key) hashes
    # the same, yet it is not the line the worker wrote.
    if canonical(record) != body:
        return AuditFailure(number, f"line {number} was edited: it is not in canonical form")
    if record["prev_hash"] != prev_hash:
        before = f"line {number - 1}" if number > 1 else "the start of the log"
        reason = f"line {number} does not chain to {before}: a line was removed or reordered"
        return AuditFailure(number, f"{reason} before it")
    return digest


def _shape_problem(record: object) -> str | None:
    """What makes `record` not an audit record (fields, types, formats), or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("op") not in OPS:
        return f"op is missing or not one of {', '.join(OPS)}"
    expected = _BASE_FIELDS | ({"message_keccak"} if record["op"] == "sign" else set())
    if missing := expected - set(record):
        return f"missing {', '.join(sorted(missing))}"
    if extra := set(record) - expected:
        return f"unexpected {', '.join(sorted(extra))}"
    if not all(isinstance(value, str) for value in record.values()):
        return "a field is not a string"
    if not _TS.match(record["ts"]):
        return "ts is not RFC 3339 UTC with milliseconds"
    hex_fields = expected - {"ts", "op", "address", "request_id"}
    if bad := sorted(key for key in hex_fields if not _HEX64.match(record[key])):
        return f"{', '.join(bad)} not 64 lowercase hex characters"
    if not is_checksum_address(record["address"]):
        return "address is not an EIP-55 address"
    return None


def _judge(walk: _Walk, head: AuditHead) -> AuditFailure | None:
    """The first failure of a walk, taking the sealed head into account."""
    first_bad = walk.good.count + 1  # the first line that is bad or missing
    if head.count >= first_bad:
        if walk.failure is not None:
            return walk.failure
        reason = (
            f"line {first_bad} is missing: the sealed head counts {head.count} lines, "
            f"the file has {walk.good.count} (the log was cut)"
        )
        return AuditFailure(first_bad, reason)
    # sha256 has no key: whoever can write the file can rewrite a line and recompute every hash
    # after it into a valid chain. Only the sealed head, out of their reach, catches that.
    if walk.at_sealed != head.hash:
        reason = f"line {head.count} does not match the sealed head: the chain was rewritten"
        return AuditFailure(head.count, reason)
    if first_bad > head.count + 1:
        reason = (
            f"line {head.count + 1} is not covered by the sealed head, "
            f"which counts {head.count} lines"
        )
        return AuditFailure(head.count + 1, reason)
    return walk.failure  # the line just past the head is bad on its own, or None: intact


def _timestamp(seconds: float) -> str:
    """RFC 3339 UTC with milliseconds, e.g. 2026-12-01T11:34:40.123Z."""
    whole, millis = divmod(round(seconds * 1000), 1000)
    return f"{datetime.fromtimestamp(whole, UTC):%Y-%m-%dT%H:%M:%S}.{millis:03d}Z"
