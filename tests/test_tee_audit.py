"""The worker's audit log on real files: the hash chain recomputed here with hashlib and json,
every kind of tampering found at its first bad line, the sealed head catching a cut tail and a
rewritten chain, boot-time reconciliation after a crash, and appends from many threads."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from agentkeys.tee import audit
from agentkeys.tee.audit import (
    EMPTY_HEAD,
    GENESIS,
    AuditError,
    AuditFailure,
    AuditHead,
    AuditLog,
    canonical,
    record_hash,
    verify_file,
    verify_lines,
)

OMNI = hashlib.sha256(b"agentkeysemailalice@example.com").hexdigest()
ADDRESS = to_checksum_address("0x" + "ab" * 20)  # EIP-55 by a library nobody here wrote
MESSAGE = b"transfer 100 to bob"
KECCAK = keccak(MESSAGE).hex()
NOW = datetime(2026, 12, 1, 11, 34, 40, 123000, tzinfo=UTC).timestamp()
HINT = "python -m agentkeys.tee audit verify"


def clock() -> float:
    return NOW


def ours(record: dict[str, Any]) -> bytes:
    """The canonical JSON of PROTOCOL §7, written here independently of the module."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def their_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(ours({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def sealed_line(record: dict[str, Any]) -> bytes:
    """A line as a forger who knows the format would write it: with its own hash recomputed."""
    record = dict(record, hash=their_hash(record))
    return ours(record) + b"\n"


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in read_lines(path)]


def append(log: AuditLog, number: int, **fields: Any) -> dict[str, Any]:
    """Odd numbers derive, even numbers sign."""
    options: dict[str, Any] = {
        "op": "derive" if number % 2 else "sign",
        "omni_account": OMNI,
        "address": ADDRESS,
        "request_id": f"req-{number}",
    }
    if options["op"] == "sign":
        options["message_keccak"] = KECCAK
    return log.append(**(options | fields))


class Heads:
    """A save_head that records every head it is given."""

    def __init__(self) -> None:
        self.saved: list[AuditHead] = []

    def __call__(self, head: AuditHead) -> None:
        self.saved.append(head)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


def write_log(path: Path, count: int = 5) -> tuple[AuditHead, list[AuditHead]]:
    """A log of `count` appends; its head and every head saved on the way."""
    heads = Heads()
    log = AuditLog.open(path, EMPTY_HEAD, heads, clock=clock)
    for number in range(1, count + 1):
        append(log, number)
    return log.head, heads.saved


# -- the chain as written -------------------------------------------------------------------------


def test_a_chain_of_appends_verifies(path: Path) -> None:
    heads = Heads()
    log = AuditLog.open(path, EMPTY_HEAD, heads, clock=clock)
    returned = [append(log, n) for n in range(1, 6)]
    assert records(path) == returned
    assert log.head == AuditHead(5, returned[-1]["hash"])
    assert heads.saved == [AuditHead(n, r["hash"]) for n, r in enumerate(returned, start=1)]
    assert verify_file(path) is None
    assert verify_file(path, log.head) is None
    assert verify_lines(read_lines(path), log.head) is None


def test_each_hash_is_sha256_of_the_canonical_record(path: Path) -> None:
    write_log(path)
    previous = "0" * 64
    for line in read_lines(path):
        record = json.loads(line)
        assert record["prev_hash"] == previous
        assert record["hash"] == their_hash(record) == record_hash(record)
        assert line == ours(record) + b"\n"  # the line is the canonical JSON of the whole record
        previous = record["hash"]


def test_the_fields_of_derive_and_sign(path: Path) -> None:
    write_log(path, 2)
    derive, sign = records(path)
    base = {"ts", "op", "omni_account", "address", "request_id", "prev_hash", "hash"}
    assert set(derive) == base
    assert set(sign) == base | {"message_keccak"}
    assert derive["ts"] == sign["ts"] == "2026-12-01T11:34:40.123Z"
    assert (derive["op"], sign["op"]) == ("derive", "sign")
    assert sign["message_keccak"] == KECCAK
    assert (sign["omni_account"], sign["address"], sign["request_id"]) == (OMNI, ADDRESS, "req-2")
    assert derive["prev_hash"] == GENESIS


@pytest.mark.parametrize(
    ("seconds", "ts"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (NOW, "2026-12-01T11:34:40.123Z"),
        (NOW + 0.377, "2026-12-01T11:34:40.500Z"),
        (NOW + 0.8769, "2026-12-01T11:34:41.000Z"),  # rounds into the next second
    ],
)
def test_ts_is_rfc3339_utc_with_milliseconds(path: Path, seconds: float, ts: str) -> None:
    log = AuditLog.open(path, EMPTY_HEAD, Heads(), clock=lambda: seconds)
    assert append(log, 1)["ts"] == ts
    assert verify_file(path, log.head) is None


def test_canonical_form_keeps_unicode_as_utf8(path: Path) -> None:
    assert canonical({"b": "é", "a": "☃"}) == '{"a":"☃","b":"é"}'.encode()
    log = AuditLog.open(path, EMPTY_HEAD, Heads(), clock=clock)
    record = append(log, 1, request_id="réq-☃")
    assert "☃".encode() in path.read_bytes() and b"\\u" not in path.read_bytes()
    assert record["hash"] == their_hash(record)
    assert verify_file(path, log.head) is None


def test_no_record_holds_the_message(path: Path) -> None:
    log = AuditLog.open(path, EMPTY_HEAD, Heads(), clock=clock)
    record = append(log, 2, message_keccak=KECCAK)
    line = path.read_bytes()
    assert MESSAGE not in line and MESSAGE.hex().encode() not in line
    # Every run of hex in the line is one of the record's hash-like fields, nothing else.
    runs = set(re.findall(rb"[0-9a-fA-F]{16,}", line))
    fields = {OMNI, KECCAK, GENESIS, record["hash"], ADDRESS[2:]}
    assert runs == {field.encode() for field in fields}


def test_a_new_log_is_0600_whatever_the_umask(path: Path) -> None:
    previous = os.umask(0)  # with no umask, only the code decides the mode
    try:
        append(AuditLog.open(path, EMPTY_HEAD, Heads(), clock=clock), 1)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"op": "export"}, "op must be"),
        ({"op": "sign"}, "message_keccak"),  # a sign with no keccak
        ({"message_keccak": KECCAK}, "message_keccak"),  # a derive with one
        ({"op": "sign", "message_keccak": "0x" + KECCAK}, "message_keccak"),
        ({"op": "sign", "message_keccak": KECCAK.upper()}, "message_keccak"),
        ({"omni_account": OMNI.upper()}, "omni_account"),
        ({"omni_account": OMNI[:-1]}, "omni_account"),
        ({"address": ADDRESS.lower()}, "EIP-55"),
        ({"request_id": 7}, "not a string"),
    ],
)
def test_append_refuses_a_bad_record(path: Path, fields: dict[str, Any], match: str) -> None:
    heads = Heads()
    log = AuditLog.open(path, EMPTY_HEAD, heads, clock=clock)
    with pytest.raises(ValueError, match=match):
        append(log, 1, **fields)
    assert not path.exists() and heads.saved == [] and log.head == EMPTY_HEAD


# -- tampering, found at the first bad line -------------------------------------------------------

Edit = Callable[[list[bytes]], list[bytes]]


def change(number: int, rehash: bool = False, **fields: Any) -> Edit:
    """Set (or, with None, delete) fields of line `number`, keeping the JSON valid."""

    def edit(lines: list[bytes]) -> list[bytes]:
        record = json.loads(lines[number - 1])
        record.update(fields)
        record = {k: v for k, v in record.items() if v is not None}
        lines[number - 1] = sealed_line(record) if rehash else ours(record) + b"\n"
        return lines

    return edit


def replace(number: int, line: bytes) -> Edit:
    def edit(lines: list[bytes]) -> list[bytes]:
        lines[number - 1] = line
        return lines

    return edit


def respell(number: int, spell: Callable[[dict[str, Any]], str]) -> Edit:
    """Line `number` as the same record written another way (same hash, other bytes)."""

    def edit(lines: list[bytes]) -> list[bytes]:
        lines[number - 1] = spell(json.loads(lines[number - 1])).encode() + b"\n"
        return lines

    return edit


def ascii_escapes(lines: list[bytes]) -> list[bytes]:
    """Line 3 with a non-ASCII request_id, its hash right, but written with \\u escapes."""
    lines = change(3, rehash=True, request_id="réq")(lines)
    return respell(3, lambda r: json.dumps(r, sort_keys=True, separators=(",", ":")))(lines)


def lone_surrogate(record: dict[str, Any]) -> str:
    """Line 2 with a request_id JSON can spell (\\ud800) but UTF-8 cannot: it has no hash."""
    return json.dumps(dict(record, request_id="\ud800"), sort_keys=True, separators=(",", ":"))


def duplicate_key(record: dict[str, Any]) -> str:
    """The record with a leading "op":"export" that the real, later "op" overrides."""
    return '{"op":"export",' + ours(record).decode()[1:]


TAMPERING: dict[str, tuple[Edit, int, str]] = {
    "a field of line 3 edited": (change(3, request_id="req-x"), 3, "line 3 was edited"),
    "line 3 edited and its own hash recomputed": (
        change(3, rehash=True, request_id="req-x"),
        4,
        "line 4 does not chain to line 3: a line was removed or reordered",
    ),
    "prev_hash of line 3 edited": (change(3, prev_hash="1" * 64), 3, "edited"),
    "hash of line 3 edited": (change(3, hash="1" * 64), 3, "its hash does not match"),
    "line 2 removed": (lambda lines: lines[:1] + lines[2:], 2, "removed or reordered"),
    "line 1 removed": (lambda lines: lines[1:], 1, "the start of the log"),
    "lines 2 and 3 swapped": (
        lambda lines: [lines[0], lines[2], lines[1], *lines[3:]],
        2,
        "removed or reordered",
    ),
    "a line repeated": (lambda lines: lines[:3] + lines[2:], 4, "removed or reordered"),
    "line 3 with spaces": (respell(3, lambda r: json.dumps(r, sort_keys=True)), 3, "canonical"),
    "line 3 keys unsorted": (
        respell(3, lambda r: json.dumps(dict(reversed(r.items())), separators=(",", ":"))),
        3,
        "canonical",
    ),
    "line 3 with ascii escapes": (ascii_escapes, 3, "line 3 was edited: it is not in canonical"),
    "line 3 with a duplicate key": (respell(3, duplicate_key), 3, "canonical"),
    "line 3 with CRLF": (lambda lines: replace(3, lines[2][:-1] + b"\r\n")(lines), 3, "canonical"),
    "line 2 not JSON": (replace(2, b"hello\n"), 2, "line 2 is not an audit record"),
    "line 2 empty": (replace(2, b"\n"), 2, "not an audit record"),
    "line 2 not UTF-8": (replace(2, b'{"op":"\xff"}\n'), 2, "not UTF-8 JSON"),
    "line 2 a list": (replace(2, b"[1,2]\n"), 2, "not a JSON object"),
    "line 2 deeply nested": (
        replace(2, b"[" * 100_000 + b"]" * 100_000 + b"\n"),
        2,
        "longer than any audit record",
    ),
    "request_id removed": (change(2, True, request_id=None), 2, "missing request_id"),
    "a message field added": (change(2, True, message="hi"), 2, "unexpected message"),
    "request_id a number": (change(2, True, request_id=7), 2, "not a string"),
    "message_keccak on a derive": (change(1, True, message_keccak=KECCAK), 1, "unexpected"),
    "message_keccak gone from a sign": (change(2, True, message_keccak=None), 2, "missing"),
    "op unknown": (change(2, True, op="export"), 2, "op is missing or not one of"),
    "omni_account uppercase": (change(2, True, omni_account=OMNI.upper()), 2, "omni_account"),
    "message_keccak with 0x": (change(2, True, message_keccak="0x" + KECCAK), 2, "keccak"),
    "address not EIP-55": (change(2, True, address=ADDRESS.lower()), 2, "EIP-55"),
    "ts without milliseconds": (change(2, True, ts="2026-12-01T11:34:40Z"), 2, "ts is not"),
    "a lone surrogate": (respell(2, lone_surrogate), 2, "not valid Unicode"),
    "last line torn": (lambda lines: [*lines[:4], lines[4][:-1]], 5, "torn write"),
    "last line half written": (lambda lines: [*lines[:4], lines[4][:40]], 5, "torn write"),
}


@pytest.mark.parametrize(("edit", "line", "reason"), TAMPERING.values(), ids=TAMPERING.keys())
def test_tampering_is_found_at_its_first_bad_line(
    path: Path, edit: Edit, line: int, reason: str
) -> None:
    head, _ = write_log(path)
    path.write_bytes(b"".join(edit(read_lines(path))))
    for sealed in (None, head):
        failure = verify_file(path, sealed)
        assert failure is not None, sealed
        assert failure.line == line
        assert reason in failure.reason
        assert str(failure).startswith(f"line {line} ")


def test_every_single_byte_change_is_caught(path: Path) -> None:
    """Each byte of a five-line log, flipped two ways: not one change goes unnoticed."""
    write_log(path)
    data = path.read_bytes()
    for index in range(len(data)):
        for flip in (0x01, 0x20):
            changed = data[:index] + bytes([data[index] ^ flip]) + data[index + 1 :]
            assert verify_lines(changed.splitlines(keepends=True)) is not None, (index, flip)


# -- the sealed head ------------------------------------------------------------------------------


def test_a_cut_tail_is_found_only_with_the_head(path: Path) -> None:
    head, _ = write_log(path)
    path.write_bytes(b"".join(read_lines(path)[:3]))
    assert verify_file(path) is None  # what is left is a perfect chain
    failure = verify_file(path, head)
    assert failure is not None and failure.line == 4
    assert "the sealed head counts 5 lines, the file has 3" in failure.reason


def test_a_whole_chain_rewrite_is_found_only_with_the_head(path: Path) -> None:
    head, _ = write_log(path)
    forged, previous = [], GENESIS
    for number, record in enumerate(records(path), start=1):
        if number == 2:
            record["request_id"] = "req-forged"
        line = sealed_line(dict(record, prev_hash=previous))
        forged.append(line)
        previous = json.loads(line)["hash"]
    path.write_bytes(b"".join(forged))
    assert verify_file(path) is None  # sha256 has no key: a forger can recompute every hash
    failure = verify_file(path, head)
    assert failure is not None and failure.line == 5
    assert failure.reason == "line 5 does not match the sealed head: the chain was rewritten"


@pytest.mark.parametrize("sealed_count", [0, 1, 3, 4])
def test_lines_past_the_head_are_not_covered(path: Path, sealed_count: int) -> None:
    _, saved = write_log(path)
    sealed = saved[sealed_count - 1] if sealed_count else EMPTY_HEAD
    assert verify_file(path, saved[-1]) is None
    failure = verify_file(path, sealed)
    assert failure is not None and failure.line == sealed_count + 1
    assert f"not covered by the sealed head, which counts {sealed_count} lines" in failure.reason


def test_a_bad_line_past_the_head_is_named_for_what_it_is(path: Path) -> None:
    _, saved = write_log(path)
    path.write_bytes(b"".join(read_lines(path)[:4]) + b"junk\n")
    failure = verify_file(path, saved[3])
    assert failure is not None and failure.line == 5 and "not an audit record" in failure.reason


def test_a_bad_line_before_the_heads_line_is_reported_first(path: Path) -> None:
    head, _ = write_log(path)
    path.write_bytes(b"".join(change(2, request_id="req-x")(read_lines(path))))
    assert verify_file(path, head) == verify_file(path)
    assert (failure := verify_file(path, head)) is not None and failure.line == 2


def test_the_empty_log(path: Path) -> None:
    assert verify_file(path) is None  # missing
    assert verify_file(path, EMPTY_HEAD) is None
    path.write_bytes(b"")
    assert verify_file(path, EMPTY_HEAD) is None
    assert verify_lines([], EMPTY_HEAD) is None
    failure = verify_file(path, AuditHead(2, "a" * 64))
    assert failure is not None and failure.line == 1 and "counts 2 lines" in failure.reason


def test_a_head_round_trips_through_bytes() -> None:
    head = AuditHead(5, "ab" * 32)
    assert head.to_bytes() == b'{"count":5,"hash":"' + b"ab" * 32 + b'"}'
    assert AuditHead.from_bytes(head.to_bytes()) == head
    assert AuditHead.from_bytes(EMPTY_HEAD.to_bytes()) == EMPTY_HEAD == AuditHead(0, "0" * 64)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff",
        b"not json",
        b"[5]",
        b'{"count":5}',
        b'{"count":5,"hash":"' + b"ab" * 32 + b'","extra":1}',
        b'{"count":-1,"hash":"' + b"ab" * 32 + b'"}',
        b'{"count":true,"hash":"' + b"ab" * 32 + b'"}',
        b'{"count":"5","hash":"' + b"ab" * 32 + b'"}',
        b'{"count":5.0,"hash":"' + b"ab" * 32 + b'"}',
        b'{"count":5,"hash":"' + b"AB" * 32 + b'"}',
        b'{"count":5,"hash":"abab"}',
        b'{"count":5,"hash":5}',
        b'{"count":0,"hash":"' + b"ab" * 32 + b'"}',
        b'{"count":5,"hash":"' + b"0" * 64 + b'"}',
    ],
)
def test_a_malformed_head_is_refused(data: bytes) -> None:
    with pytest.raises(AuditError):
        AuditHead.from_bytes(data)


def test_a_failure_reads_as_one_line() -> None:
    assert str(AuditFailure(3, "line 3 was edited: x")) == "line 3 was edited: x"
    assert str(AuditFailure(2, "something")) == "line 2: something"


# -- open(): reconciling the file with the sealed head at boot ------------------------------------


def test_open_adopts_lines_a_crash_left_past_the_head(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, saved = write_log(path)
    heads = Heads()
    with caplog.at_level(logging.WARNING, logger=audit.__name__):
        log = AuditLog.open(path, saved[3], heads, clock=clock)  # the head of line 5 never saved
    assert heads.saved == [saved[4]] and log.head == saved[4]
    assert "adopted 1 line(s)" in caplog.text
    append(log, 6)
    assert verify_file(path, log.head) is None and log.head.count == 6


def test_open_adopts_several_lines_past_the_head(path: Path) -> None:
    _, saved = write_log(path)
    heads = Heads()
    assert AuditLog.open(path, saved[1], heads).head == saved[4]
    assert heads.saved == [saved[4]]


def test_open_leaves_an_intact_log_alone(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    head, _ = write_log(path)
    before, heads = path.read_bytes(), Heads()
    with caplog.at_level(logging.WARNING, logger=audit.__name__):
        assert AuditLog.open(path, head, heads).head == head
    assert heads.saved == [] and path.read_bytes() == before and caplog.text == ""


@pytest.mark.parametrize("sealed_count", [5, 4])
def test_open_drops_a_torn_last_line(
    path: Path, caplog: pytest.LogCaptureFixture, sealed_count: int
) -> None:
    _, saved = write_log(path)
    whole = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"address":"0xAB')  # the first bytes of a line the crash cut short
    heads = Heads()
    with caplog.at_level(logging.WARNING, logger=audit.__name__):
        log = AuditLog.open(path, saved[sealed_count - 1], heads, clock=clock)
    assert path.read_bytes() == whole
    assert "dropped a torn last line" in caplog.text
    assert log.head == saved[4]
    assert heads.saved == ([] if sealed_count == 5 else [saved[4]])
    append(log, 6)
    assert verify_file(path, log.head) is None


def test_open_on_a_missing_file(path: Path) -> None:
    assert AuditLog.open(path, EMPTY_HEAD, Heads()).head == EMPTY_HEAD
    assert not path.exists()  # nothing is written until the first record
    with pytest.raises(AuditError, match="line 1 is missing"):
        AuditLog.open(path, AuditHead(1, "a" * 64), Heads())


REFUSED: dict[str, tuple[Edit, int, int]] = {
    # edit, the count of the sealed head, the line named
    "an edited line": (change(3, request_id="req-x"), 5, 3),
    "a cut tail": (lambda lines: lines[:3], 5, 4),
    "a torn line the head covers": (lambda lines: [*lines[:4], lines[4][:-1]], 5, 5),
    "a line past the head that does not chain": (
        lambda lines: [*lines, sealed_line(dict(json.loads(lines[1]), request_id="req-6"))],
        5,
        6,
    ),
    "junk past the head": (lambda lines: [*lines, b"junk\n"], 5, 6),
    "the head's own line rewritten": (change(4, rehash=True, request_id="req-x"), 4, 4),
}


@pytest.mark.parametrize(("edit", "sealed", "line"), REFUSED.values(), ids=REFUSED.keys())
def test_open_refuses_a_log_that_was_tampered_with(
    path: Path, edit: Edit, sealed: int, line: int
) -> None:
    _, saved = write_log(path)
    path.write_bytes(b"".join(edit(read_lines(path))))
    before, heads = path.read_bytes(), Heads()
    with pytest.raises(AuditError) as caught:
        AuditLog.open(path, saved[sealed - 1], heads)
    assert f"line {line} " in str(caught.value) and HINT in str(caught.value)
    assert path.read_bytes() == before and heads.saved == []  # the evidence is left as it was


def test_a_rewritten_chain_is_refused_even_with_lines_past_the_head(path: Path) -> None:
    """Lines past the head are adopted only when the head's own line still matches it."""
    _, saved = write_log(path)
    lines = read_lines(path)
    forged, previous = [], GENESIS
    for line in lines:
        record = dict(json.loads(line), prev_hash=previous, request_id="req-forged")
        forged.append(sealed_line(record))
        previous = json.loads(forged[-1])["hash"]
    path.write_bytes(b"".join(forged))
    with pytest.raises(AuditError, match="line 3 does not match the sealed head"):
        AuditLog.open(path, saved[2], Heads())


# -- append under failure and under load ----------------------------------------------------------


def test_appends_from_eight_threads_make_one_chain(path: Path) -> None:
    heads = Heads()
    log = AuditLog.open(path, EMPTY_HEAD, heads, clock=clock)
    start = threading.Barrier(8)

    def worker(thread: int) -> None:
        start.wait()
        for n in range(25):
            append(log, thread * 100 + n)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log.head.count == 200 and verify_file(path, log.head) is None
    assert [h.count for h in heads.saved] == list(range(1, 201))  # strictly increasing, no gaps
    ids = [r["request_id"] for r in records(path)]
    assert sorted(ids) == sorted(f"req-{t * 100 + n}" for t in range(8) for n in range(25))


class FailingSave(Heads):
    """A save_head that fails on the calls numbered in `failures`."""

    def __init__(self, *failures: int) -> None:
        super().__init__()
        self.failures, self.calls = set(failures), 0

    def __call__(self, head: AuditHead) -> None:
        self.calls += 1
        if self.calls in self.failures:
            raise OSError("sealing failed")
        super().__call__(head)


def test_a_failed_save_head_propagates_and_the_chain_goes_on(path: Path) -> None:
    heads = FailingSave(3)
    log = AuditLog.open(path, EMPTY_HEAD, heads, clock=clock)
    append(log, 1)
    append(log, 2)
    with pytest.raises(OSError, match="sealing failed"):
        append(log, 3)
    assert log.head == heads.saved[-1] and log.head.count == 2  # the head last sealed
    assert len(read_lines(path)) == 3  # the line stays: the next boot adopts it
    append(log, 4)
    assert log.head.count == 4 and [h.count for h in heads.saved] == [1, 2, 4]
    assert verify_file(path, log.head) is None  # line 4 chained onto the unsealed line 3


def test_open_reconciles_after_a_failed_save_head(path: Path) -> None:
    heads = FailingSave(3, 4)
    log = AuditLog.open(path, EMPTY_HEAD, heads, clock=clock)
    append(log, 1)
    append(log, 2)
    for number in (3, 4):
        with pytest.raises(OSError):
            append(log, number)
    sealed = heads.saved[-1]
    assert sealed.count == 2 and verify_file(path, sealed) is not None
    rebooted = Heads()
    log = AuditLog.open(path, sealed, rebooted, clock=clock)
    assert log.head.count == 4 and rebooted.saved == [log.head]
    assert verify_file(path, log.head) is None


def fail_next_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next os.write writes half its bytes and then fails, as a full disk does."""
    real = os.write

    def write(fd: int, data: bytes) -> int:
        monkeypatch.setattr(os, "write", real)
        real(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", write)


def test_a_failed_write_propagates_and_is_undone(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    heads = Heads()
    log = AuditLog.open(path, EMPTY_HEAD, heads, clock=clock)
    append(log, 1)
    before = path.read_bytes()
    fail_next_write(monkeypatch)
    with pytest.raises(OSError, match="No space"):
        append(log, 2)
    assert path.read_bytes() == before and log.head.count == 1 and len(heads.saved) == 1
    append(log, 3)
    assert verify_file(path, log.head) is None and log.head.count == 2


def test_a_short_write_is_a_failure(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog.open(path, EMPTY_HEAD, Heads(), clock=clock)
    append(log, 1)
    before, real = path.read_bytes(), os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, data[:10]))
    with pytest.raises(OSError, match="short write"):
        append(log, 2)
    assert path.read_bytes() == before and log.head.count == 1


def test_a_failed_fsync_is_undone(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog.open(path, EMPTY_HEAD, Heads(), clock=clock)
    append(log, 1)
    before, real = path.read_bytes(), os.fsync

    def fsync(fd: int) -> None:
        monkeypatch.setattr(os, "fsync", real)
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="I/O error"):
        append(log, 2)
    assert path.read_bytes() == before and log.head.count == 1
    append(log, 3)
    assert verify_file(path, log.head) is None


def test_a_write_that_cannot_be_undone_stops_all_appends(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def ftruncate(fd: int, length: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    log = AuditLog.open(path, EMPTY_HEAD, Heads(), clock=clock)
    fail_next_write(monkeypatch)
    monkeypatch.setattr(os, "ftruncate", ftruncate)
    with pytest.raises(OSError, match="No space"):
        append(log, 1)
    torn = path.read_bytes()
    assert torn and not torn.endswith(b"\n")
    with pytest.raises(AuditError, match="not undone"):
        append(log, 2)  # fail closed: no line may follow the torn one
    assert path.read_bytes() == torn
    monkeypatch.undo()
    log = AuditLog.open(path, EMPTY_HEAD, Heads())  # a restart drops the torn line
    assert path.read_bytes() == b"" and log.head == EMPTY_HEAD


ROOT = Path(__file__).resolve().parent.parent


def test_a_deeply_nested_line_cannot_crash_the_verifier(tmp_path: Path) -> None:
    """Under a raised recursion limit (py_ecc, which eth-account loads, sets 100000) a nested
    line used to reach the JSON parser and overflow the C stack; run where a crash is visible."""
    log = tmp_path / "audit.jsonl"
    log.write_bytes(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    code = (
        "import sys; sys.setrecursionlimit(100_000)\n"
        "from pathlib import Path\n"
        "from agentkeys.tee.audit import verify_file\n"
        f"print(verify_file(Path({str(log)!r})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "line 1 is longer than any audit record (1024 bytes)"


def test_an_endless_line_is_one_failure_and_never_truncated_as_torn(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    head, _ = write_log(log, 2)
    with log.open("ab") as f:
        f.write(b"x" * 5_000_000)  # no newline: not a torn record, just not one
    saved: list[AuditHead] = []
    with pytest.raises(AuditError, match="line 3 is longer than any audit record"):
        AuditLog.open(log, head, saved.append)
    assert log.stat().st_size > 5_000_000 and saved == []
