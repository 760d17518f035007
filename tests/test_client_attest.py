"""The daemon's attestation of a TEE signer (PROTOCOL §7) against a worker stand-in on loopback:
a simulated platform attests an ephemeral P-256 key, every /tee response is signed with it, every
request is recorded, and the stand-in misbehaves on cue. A signer that fails is sent nothing, and
each failure is one line on stderr and exit 8."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import cbor2
import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from agentkeys.attestation import RESPONSE_SIGNATURE_HEADER, response_signing_input
from agentkeys.client.cache import SESSION, Home
from agentkeys.client.cli import main
from agentkeys.client.config import ClientConfig
from agentkeys.client.errors import (
    EXIT_CODES,
    AttestationFailed,
    ClientError,
    Refused,
    Unreachable,
)
from agentkeys.client.flow import Client
from agentkeys.tee.platform import SimulatedPlatform
from tests.live import ROOT, clean_env, free_port
from tests.vectors import VECTOR_ADDRESS, VECTOR_ANCHOR

ROOT_VAR, PCR0_VAR, DEBUG_VAR = (
    "AGENTKEYS_TEE_ROOT_CERT",
    "AGENTKEYS_TEE_PCR0",
    "AGENTKEYS_TEE_ALLOW_DEBUG",
)
EMAIL = "agent-owner@example.com"
ATTEST, DERIVE = "/tee/attestation", "/tee/derive-address"
ZERO_PCR = bytes(48)
Env = dict[str, str | None]


@dataclasses.dataclass(frozen=True)
class Reply:
    """One answer of the stand-in, before it is sent."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    signed: bool = True
    tampered: bool = False  # one byte changed after signing


Edit = Callable[[Reply], Reply]


def unsigned(reply: Reply) -> Reply:
    return dataclasses.replace(reply, signed=False)


def tampered(reply: Reply) -> Reply:
    return dataclasses.replace(reply, tampered=True)


PROBLEM = {"error": "unavailable", "detail": "the worker is busy"}


def failing(
    status: int, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> Edit:
    """An error answer: a problem body unless `body` is given."""
    answer, extra = PROBLEM if body is None else body, headers or {}
    return lambda reply: dataclasses.replace(reply, status=status, body=answer, headers=extra)


class Worker:
    """A TEE worker stand-in: /tee/attestation, /tee/derive-address, and the broker's
    /v1/identities (unsigned: the broker is not attested)."""

    def __init__(self, platform: SimulatedPlatform, base: str = "") -> None:
        self.platform, self.base = platform, base
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.signing_key = self.key  # the key responses are signed with
        self.attested_key: bytes | None = _der(self.key.public_key())  # the document's public_key
        self.echo_nonce: bytes | None = None  # a nonce to put in the document instead of ours
        self.edit_document: Callable[[dict[str, Any]], None] | None = None
        self.fields: dict[str, Any] = {}  # overrides of the attestation answer's JSON
        self.edits: dict[str, list[Edit]] = {}  # per path, for the next requests, in order
        self.seen: list[tuple[str, str, bytes]] = []

    def on(self, path: str, *edits: Edit) -> None:
        self.edits.setdefault(path, []).extend(edits)

    def requests(self) -> list[tuple[str, str]]:
        """Method and path (no query) of every request received."""
        return [(method, urlsplit(target).path) for method, target, _ in self.seen]

    def reply(self, method: str, target: str) -> Reply:
        url = urlsplit(target)
        if (method, url.path) == ("GET", ATTEST):
            [nonce] = parse_qs(url.query)["nonce"]
            reply = Reply(200, self.attestation(bytes.fromhex(nonce)))
        elif (method, url.path) == ("POST", DERIVE):
            reply = Reply(200, {"address": VECTOR_ADDRESS, "key_version": 1})
        elif (method, url.path) == ("GET", "/v1/identities"):
            identity = {"identity_type": "email", "identity_value": EMAIL, "status": "verified"}
            reply = Reply(200, {"account": VECTOR_ANCHOR, "identities": [identity]}, signed=False)
        else:
            reply = Reply(404, {"error": "not_found", "detail": "no such endpoint"})
        queued = self.edits.get(url.path)
        return queued.pop(0)(reply) if queued else reply

    def attestation(self, nonce: bytes) -> dict[str, Any]:
        document = self.platform.attest(
            nonce=self.echo_nonce if self.echo_nonce is not None else nonce,
            public_key=self.attested_key,
        )
        if self.edit_document is not None:
            document = resigned(self.platform, document, self.edit_document)
        answer = {
            "format": "aws-nitro-v1",
            "platform": "simulated",
            "document": base64.b64encode(document).decode(),
            "key_version": 1,
        }
        return answer | self.fields

    def signature(self, method: str, target: str, status: int, body: bytes, raw: bytes) -> str:
        signed = response_signing_input(method, target, status, body, raw)
        return base64.b64encode(self.signing_key.sign(signed, ec.ECDSA(hashes.SHA256()))).decode()


def resigned(
    platform: SimulatedPlatform, document: bytes, edit: Callable[[dict[str, Any]], None]
) -> bytes:
    """The document with its payload edited and signed again by the platform's own leaf: what a
    genuine platform would issue with those contents."""
    protected, unprotected, payload, _ = cbor2.loads(document)
    fields = cbor2.loads(payload)
    edit(fields)
    payload = cbor2.dumps(fields)
    to_sign = cbor2.dumps(["Signature1", protected, b"", payload])
    leaf_key: ec.EllipticCurvePrivateKey = platform._leaf_key  # the test plays the platform
    r, s = decode_dss_signature(leaf_key.sign(to_sign, ec.ECDSA(hashes.SHA384())))
    return cbor2.dumps(
        [protected, unprotected, payload, r.to_bytes(48, "big") + s.to_bytes(48, "big")]
    )


def _der(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def serve(worker: Worker) -> Iterator[Worker]:
    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            worker.seen.append((self.command, self.path, body))
            reply = worker.reply(self.command, self.path)
            raw = json.dumps(reply.body).encode()
            headers = dict(reply.headers)
            if reply.signed:
                headers[RESPONSE_SIGNATURE_HEADER] = worker.signature(
                    self.command, self.path, reply.status, body, raw
                )
            if reply.tampered:
                assert b" " in raw  # so that one byte does change
                raw = raw.replace(b" ", b"\t", 1)  # the same JSON to a parser
            self.send_response(reply.status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_GET = do_POST = answer

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    worker.base = f"http://127.0.0.1:{httpd.server_port}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        httpd.shutdown()
        thread.join(timeout=10)
        httpd.server_close()


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    yield from serve(Worker(SimulatedPlatform(tmp_path / "tee")))


@pytest.fixture
def debug_worker(tmp_path: Path) -> Iterator[Worker]:
    """A worker whose documents have PCR0-2 all zero, as Nitro's debug mode issues them."""
    found = Worker(SimulatedPlatform(tmp_path / "tee", pcr0=ZERO_PCR))
    found.edit_document = lambda fields: fields["pcrs"].update({1: ZERO_PCR, 2: ZERO_PCR})
    yield from serve(found)


def root_file(worker: Worker) -> Path:
    return worker.platform.state_dir / "simulated-root.pem"


def settings(worker: Worker, tmp_path: Path, **overrides: str | None) -> Env:
    """The daemon's environment for this worker, attested; None unsets a variable."""
    env: Env = {
        "AGENTKEYS_BROKER_URL": worker.base,
        "AGENTKEYS_SIGNER_URL": f"{worker.base}/tee",
        "AGENTKEYS_HOME": str(tmp_path / "home"),
        ROOT_VAR: str(root_file(worker)),
        PCR0_VAR: worker.platform.pcr0.hex(),
        DEBUG_VAR: None,
    }
    return env | overrides


def client(env: Env) -> Client:
    environ = {k: v for k, v in env.items() if v is not None}
    return Client(ClientConfig.from_env(environ=environ), sleep=lambda _: None)


def derive(env: Env) -> str:
    return client(env).derive_address("identity-session-jwt", VECTOR_ANCHOR)


def refused(env: Env) -> str:
    with pytest.raises(AttestationFailed) as caught:
        derive(env)
    assert caught.value.exit_code == 8
    return caught.value.line()


def sign_in(env: Env) -> None:
    """A stored identity session, so whoami gets as far as the signer."""
    Home(str(env["AGENTKEYS_HOME"])).write(
        SESSION,
        {
            "broker_url": env["AGENTKEYS_BROKER_URL"],
            "session_jwt": "identity-session-jwt",
            "expires_at": int(time.time()) + 3600,
            "account": VECTOR_ANCHOR,
            "omni_account": VECTOR_ANCHOR,
            "identity_type": "email",
            "wallet": VECTOR_ADDRESS,
        },
    )


def whoami(env: Env, *flags: str) -> Result:
    sign_in(env)
    return CliRunner().invoke(main, [*flags, "whoami"], env=env)


# -- a good worker ------------------------------------------------------------------------------


def test_a_good_worker_is_attested_once_then_every_answer_is_checked(
    worker: Worker, tmp_path: Path
) -> None:
    signer = client(settings(worker, tmp_path))
    assert signer.derive_address("identity-session-jwt", VECTOR_ANCHOR) == VECTOR_ADDRESS
    assert signer.derive_address("identity-session-jwt", VECTOR_ANCHOR) == VECTOR_ADDRESS
    assert worker.requests() == [("GET", ATTEST), ("POST", DERIVE), ("POST", DERIVE)]
    _, target, body = worker.seen[0]
    assert re.fullmatch(r"/tee/attestation\?nonce=[0-9a-f]{64}", target) and body == b""
    assert json.loads(worker.seen[1][2]) == {"omni_account": VECTOR_ANCHOR}

    worker.on(DERIVE, tampered)  # a later answer, after the attestation passed
    with pytest.raises(AttestationFailed) as caught:
        signer.derive_address("identity-session-jwt", VECTOR_ANCHOR)
    assert caught.value.line() == (
        "agentkeys: attestation: the response signature does not verify "
        "(POST /tee/derive-address, HTTP 200)"
    )


def test_each_attestation_has_its_own_nonce(worker: Worker, tmp_path: Path) -> None:
    derive(settings(worker, tmp_path))
    derive(settings(worker, tmp_path))
    nonces = [target for method, target, _ in worker.seen if method == "GET"]
    assert len(nonces) == 2 and nonces[0] != nonces[1]


@pytest.mark.parametrize(
    ("status", "body", "error", "line"),
    [
        (403, PROBLEM, Refused, "agentkeys: step 2 (derive): the worker is busy (unavailable)"),
        (500, PROBLEM, Refused, "agentkeys: step 2 (derive): the worker is busy (unavailable)"),
        (
            502,
            {"proxy": "bad gateway"},
            Unreachable,
            "agentkeys: step 2 (derive): the server failed with HTTP 502",
        ),
    ],
)
def test_error_answers_are_checked_before_they_are_read(
    worker: Worker,
    tmp_path: Path,
    status: int,
    body: dict[str, Any],
    error: type[ClientError],
    line: str,
) -> None:
    env = settings(worker, tmp_path)
    edit = failing(status, body)
    worker.on(DERIVE, edit)
    with pytest.raises(error) as signed:
        derive(env)
    assert signed.value.line() == line

    worker.on(DERIVE, lambda reply: tampered(edit(reply)))
    assert refused(env) == (
        "agentkeys: attestation: the response signature does not verify "
        f"(POST /tee/derive-address, HTTP {status})"
    )


def test_each_retried_answer_is_checked(worker: Worker, tmp_path: Path) -> None:
    env = settings(worker, tmp_path)
    worker.on(DERIVE, failing(503, headers={"Retry-After": "1"}))
    assert derive(env) == VECTOR_ADDRESS
    assert worker.requests() == [("GET", ATTEST), ("POST", DERIVE), ("POST", DERIVE)]

    worker.seen.clear()
    worker.on(DERIVE, lambda reply: unsigned(failing(503, headers={"Retry-After": "1"})(reply)))
    assert refused(env) == (
        "agentkeys: attestation: the response carries no AgentKeys-Response-Signature "
        "(POST /tee/derive-address, HTTP 503)"
    )
    assert worker.requests() == [("GET", ATTEST), ("POST", DERIVE)]  # not sent again


def test_a_signed_redirect_is_not_followed(worker: Worker, tmp_path: Path) -> None:
    moved = {"Location": f"{worker.base}/tee/elsewhere"}
    worker.on(DERIVE, lambda reply: dataclasses.replace(reply, status=307, headers=moved))
    with pytest.raises(Refused) as caught:
        derive(settings(worker, tmp_path))
    assert caught.value.line() == "agentkeys: step 2 (derive): unexpected answer, HTTP 307"
    assert worker.requests() == [("GET", ATTEST), ("POST", DERIVE)]


@pytest.mark.parametrize("allow", ["true", "On", "1"])
def test_a_debug_document_passes_only_when_allowed(
    debug_worker: Worker, tmp_path: Path, allow: str
) -> None:
    env = settings(debug_worker, tmp_path)
    assert env[PCR0_VAR] == "0" * 96
    assert refused(env) == (
        "agentkeys: attestation: debug-mode enclave (PCR0-2 are zero) is not allowed"
    )
    assert derive(env | {DEBUG_VAR: allow}) == VECTOR_ADDRESS
    assert refused(env | {DEBUG_VAR: "false"}) == (
        "agentkeys: attestation: debug-mode enclave (PCR0-2 are zero) is not allowed"
    )


def test_pcr0_is_a_comma_list_in_any_case(worker: Worker, tmp_path: Path) -> None:
    listed = f"{'ab' * 48}, {worker.platform.pcr0.hex().upper()}"
    assert derive(settings(worker, tmp_path, **{PCR0_VAR: listed})) == VECTOR_ADDRESS


def test_a_der_root_file_is_pinned_too(worker: Worker, tmp_path: Path) -> None:
    der = tmp_path / "root.der"
    der.write_bytes(worker.platform.root_der)
    assert derive(settings(worker, tmp_path, **{ROOT_VAR: str(der)})) == VECTOR_ADDRESS
    assert worker.requests()[0] == ("GET", ATTEST)


def test_without_a_root_nothing_is_attested_nor_checked(worker: Worker, tmp_path: Path) -> None:
    worker.on(DERIVE, unsigned)
    env = settings(worker, tmp_path, **{ROOT_VAR: None, PCR0_VAR: None})
    assert derive(env) == VECTOR_ADDRESS
    assert worker.requests() == [("POST", DERIVE)]


# -- refusals: after the attestation GET, nothing is posted ---------------------------------------

Setup = Callable[[Worker, Path], Env]


def with_env(**overrides: str | None) -> Setup:
    return lambda worker, tmp_path: settings(worker, tmp_path, **overrides)


def with_worker(change: Callable[[Worker], None]) -> Setup:
    def setup(worker: Worker, tmp_path: Path) -> Env:
        change(worker)
        return settings(worker, tmp_path)

    return setup


def foreign_root(worker: Worker, tmp_path: Path) -> Env:
    other = SimulatedPlatform(tmp_path / "other-tee")
    return settings(worker, tmp_path, **{ROOT_VAR: str(other.state_dir / "simulated-root.pem")})


def not_a_worker(worker: Worker, tmp_path: Path) -> Env:
    return settings(worker, tmp_path, AGENTKEYS_SIGNER_URL=f"{worker.base}/dev")


def stale(fields: dict[str, Any]) -> None:
    fields["timestamp"] -= 900_000  # 15 minutes ago, in milliseconds


def p384_key(worker: Worker) -> None:
    worker.attested_key = _der(ec.generate_private_key(ec.SECP384R1()).public_key())


def ed25519_key(worker: Worker) -> None:
    worker.attested_key = _der(ed25519.Ed25519PrivateKey.generate().public_key())


def another_signer(worker: Worker) -> None:
    worker.signing_key = ec.generate_private_key(ec.SECP256R1())


def fields(**changed: Any) -> Callable[[Worker], None]:
    return lambda worker: worker.fields.update(changed)


REFUSED_AFTER_THE_GET: dict[str, tuple[Setup, str | re.Pattern[str]]] = {
    "wrong PCR0": (
        with_env(**{PCR0_VAR: "ab" * 48}),
        "agentkeys: attestation: PCR0 {pcr0} is not in AGENTKEYS_TEE_PCR0",
    ),
    "foreign root": (
        foreign_root,
        "agentkeys: attestation: cabundle[0] is not the pinned root certificate",
    ),
    "stale document": (
        with_worker(lambda w: setattr(w, "edit_document", stale)),
        re.compile(r"agentkeys: attestation: document is stale: issued 90\ds before now"),
    ),
    "nonce mismatch": (
        with_worker(lambda w: setattr(w, "echo_nonce", bytes(32))),
        "agentkeys: attestation: nonce does not match the challenge",
    ),
    "no signature": (
        with_worker(lambda w: w.on(ATTEST, unsigned)),
        "agentkeys: attestation: the response carries no AgentKeys-Response-Signature "
        "(GET /tee/attestation, HTTP 200)",
    ),
    "signed by another key": (
        with_worker(another_signer),
        "agentkeys: attestation: the response signature does not verify "
        "(GET /tee/attestation, HTTP 200)",
    ),
    "one byte tampered": (
        with_worker(lambda w: w.on(ATTEST, tampered)),
        "agentkeys: attestation: the response signature does not verify "
        "(GET /tee/attestation, HTTP 200)",
    ),
    "P-384 public_key": (
        with_worker(p384_key),
        "agentkeys: attestation: the attested public_key is not a P-256 key",
    ),
    "Ed25519 public_key": (
        with_worker(ed25519_key),
        "agentkeys: attestation: the attested public_key is not a P-256 key",
    ),
    "no public_key": (
        with_worker(lambda w: setattr(w, "attested_key", None)),
        "agentkeys: attestation: the document carries no public_key",
    ),
    "not a TEE worker": (
        not_a_worker,
        "agentkeys: attestation: {base}/dev/attestation answered HTTP 404, not an attestation",
    ),
    "wrong format": (
        with_worker(fields(format="aws-nitro-v2")),
        "agentkeys: attestation: the attestation format is not aws-nitro-v1",
    ),
    "wrong platform": (
        with_worker(fields(platform="sgx")),
        "agentkeys: attestation: the attestation platform is not nitro/simulated",
    ),
    "key_version true": (
        with_worker(fields(key_version=True)),
        "agentkeys: attestation: the attestation key_version is not 1",
    ),
    "document not base64": (
        with_worker(fields(document="not base64!")),
        "agentkeys: attestation: the attestation document is not base64",
    ),
    "document not CBOR": (
        with_worker(fields(document=base64.b64encode(b"\xff\x00").decode())),
        "agentkeys: attestation: document is not valid CBOR",
    ),
}


def matches(line: str | re.Pattern[str], worker: Worker, shown: str) -> bool:
    """The whole line, with {pcr0} and {base} filled in; a pattern must match all of it."""
    if isinstance(line, re.Pattern):
        return line.fullmatch(shown) is not None
    return shown == line.replace("{pcr0}", worker.platform.pcr0.hex()).replace(
        "{base}", worker.base
    )


@pytest.mark.parametrize("case", REFUSED_AFTER_THE_GET)
def test_a_refused_attestation_posts_nothing(worker: Worker, tmp_path: Path, case: str) -> None:
    setup, line = REFUSED_AFTER_THE_GET[case]
    env = setup(worker, tmp_path)
    shown = refused(env)
    assert matches(line, worker, shown), shown
    attestation = urlsplit(str(env["AGENTKEYS_SIGNER_URL"])).path + "/attestation"
    assert worker.requests() == [("GET", attestation)]


@pytest.mark.parametrize("case", REFUSED_AFTER_THE_GET)
def test_whoami_exits_8_on_a_refused_attestation(worker: Worker, tmp_path: Path, case: str) -> None:
    setup, line = REFUSED_AFTER_THE_GET[case]
    result = whoami(setup(worker, tmp_path))
    assert result.exit_code == 8, result.output
    assert result.stdout == ""
    [shown] = result.stderr.splitlines()
    assert matches(line, worker, shown), shown


def test_a_failed_attestation_is_never_skipped_later(worker: Worker, tmp_path: Path) -> None:
    signer = client(settings(worker, tmp_path))
    worker.echo_nonce = bytes(32)
    for _ in range(2):
        with pytest.raises(AttestationFailed):
            signer.derive_address("identity-session-jwt", VECTOR_ANCHOR)
    assert worker.requests() == [("GET", ATTEST), ("GET", ATTEST)]
    worker.echo_nonce = None
    assert signer.derive_address("identity-session-jwt", VECTOR_ANCHOR) == VECTOR_ADDRESS
    assert worker.requests()[2:] == [("GET", ATTEST), ("POST", DERIVE)]


def test_an_unanswered_attestation_is_unreachable(worker: Worker, tmp_path: Path) -> None:
    env = settings(worker, tmp_path)
    worker.on(ATTEST, *[failing(502)] * 4)
    with pytest.raises(Unreachable) as caught:
        derive(env)
    assert caught.value.exit_code == 5
    assert caught.value.line() == (
        f"agentkeys: attestation: {worker.base}/tee/attestation failed with HTTP 502"
    )
    assert worker.requests() == [("GET", ATTEST)] * 4  # retried, as GETs are; no POST

    closed = f"http://127.0.0.1:{free_port()}/tee"  # nothing listens here
    with pytest.raises(Unreachable) as caught:
        derive(env | {"AGENTKEYS_SIGNER_URL": closed})
    assert caught.value.line() == (
        f"agentkeys: attestation: {closed} did not answer (connection failed)"
    )


# -- refusals of the settings: nothing is sent at all ----------------------------------------------

BAD_SETTINGS: dict[str, tuple[Setup, str]] = {
    "PCR0 unset": (
        with_env(**{PCR0_VAR: None}),
        "agentkeys: attestation: AGENTKEYS_TEE_ROOT_CERT is set but AGENTKEYS_TEE_PCR0 is not: "
        "pin the worker's image too",
    ),
    "PCR0 blank": (
        with_env(**{PCR0_VAR: "  "}),
        "agentkeys: attestation: AGENTKEYS_TEE_ROOT_CERT is set but AGENTKEYS_TEE_PCR0 is not: "
        "pin the worker's image too",
    ),
    "PCR0 not hex": (
        with_env(**{PCR0_VAR: "xyz"}),
        "agentkeys: attestation: AGENTKEYS_TEE_PCR0 holds 'xyz', not 96 hex digits "
        "(a SHA-384 PCR0)",
    ),
    "PCR0 too short": (
        with_env(**{PCR0_VAR: "ab" * 47}),
        f"agentkeys: attestation: AGENTKEYS_TEE_PCR0 holds '{'ab' * 47}', not 96 hex digits "
        "(a SHA-384 PCR0)",
    ),
    "PCR0 with an empty item": (
        with_env(**{PCR0_VAR: f"{'ab' * 48},,"}),
        "agentkeys: attestation: AGENTKEYS_TEE_PCR0 holds '', not 96 hex digits (a SHA-384 PCR0)",
    ),
    "PCR0 without a root": (
        with_env(**{ROOT_VAR: None}),
        "agentkeys: attestation: AGENTKEYS_TEE_PCR0 is set but AGENTKEYS_TEE_ROOT_CERT is not: "
        "nothing would check it",
    ),
    "allow debug maybe": (
        with_env(**{DEBUG_VAR: "maybe"}),
        "agentkeys: attestation: AGENTKEYS_TEE_ALLOW_DEBUG must be one of "
        "true/false/1/0/yes/no/on/off",
    ),
    "allow debug 2, without a root": (
        with_env(**{DEBUG_VAR: "2", ROOT_VAR: None, PCR0_VAR: None}),
        "agentkeys: attestation: AGENTKEYS_TEE_ALLOW_DEBUG must be one of "
        "true/false/1/0/yes/no/on/off",
    ),
    "root missing": (
        lambda worker, tmp_path: settings(worker, tmp_path, **{ROOT_VAR: str(tmp_path / "no")}),
        "agentkeys: attestation: cannot read AGENTKEYS_TEE_ROOT_CERT {tmp}/no: "
        "No such file or directory",
    ),
    "root is a folder": (
        lambda worker, tmp_path: settings(worker, tmp_path, **{ROOT_VAR: str(tmp_path)}),
        "agentkeys: attestation: cannot read AGENTKEYS_TEE_ROOT_CERT {tmp}: Is a directory",
    ),
}


def garbage_root(worker: Worker, tmp_path: Path) -> Env:
    path = tmp_path / "root.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    return settings(worker, tmp_path, **{ROOT_VAR: str(path)})


def two_roots(worker: Worker, tmp_path: Path) -> Env:
    other = SimulatedPlatform(tmp_path / "other-tee")
    path = tmp_path / "roots.pem"
    path.write_bytes(
        root_file(worker).read_bytes() + (other.state_dir / "simulated-root.pem").read_bytes()
    )
    return settings(worker, tmp_path, **{ROOT_VAR: str(path)})


BAD_SETTINGS |= {
    "root is garbage": (
        garbage_root,
        "agentkeys: attestation: AGENTKEYS_TEE_ROOT_CERT {tmp}/root.pem is not a PEM or DER "
        "certificate",
    ),
    "two roots": (
        two_roots,
        "agentkeys: attestation: AGENTKEYS_TEE_ROOT_CERT {tmp}/roots.pem holds 2 certificates, "
        "not one",
    ),
}


@pytest.mark.parametrize("case", BAD_SETTINGS)
def test_bad_settings_are_refused_before_anything_is_sent(
    worker: Worker, tmp_path: Path, case: str
) -> None:
    setup, line = BAD_SETTINGS[case]
    assert refused(setup(worker, tmp_path)) == line.replace("{tmp}", str(tmp_path))
    assert worker.seen == []


@pytest.mark.parametrize("case", ["PCR0 unset", "allow debug maybe", "root missing"])
def test_whoami_exits_8_on_bad_settings(worker: Worker, tmp_path: Path, case: str) -> None:
    setup, line = BAD_SETTINGS[case]
    result = whoami(setup(worker, tmp_path))
    assert result.exit_code == 8, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines() == [line.replace("{tmp}", str(tmp_path))]
    assert worker.seen == []  # not even the broker: the client is refused as it is built


# -- whoami ---------------------------------------------------------------------------------------


def whoami_lines(env: Env) -> list[str]:
    stored = Home(str(env["AGENTKEYS_HOME"])).read(SESSION)
    assert stored is not None
    ends = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stored["expires_at"]))
    return [
        f"account  {VECTOR_ANCHOR}",
        f"wallet   {VECTOR_ADDRESS}",
        f"session  email, until {ends}",
        f"  email            {EMAIL}  verified",
    ]


def test_whoami_prints_the_attested_signer(worker: Worker, tmp_path: Path) -> None:
    env = settings(worker, tmp_path)
    result = whoami(env)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        *whoami_lines(env),
        f"signer   {worker.base}/tee  attested simulated, PCR0 {worker.platform.pcr0.hex()}",
    ]
    assert worker.requests() == [("GET", "/v1/identities"), ("GET", ATTEST)]


def test_whoami_takes_the_root_and_pcr0_as_flags(worker: Worker, tmp_path: Path) -> None:
    env = settings(worker, tmp_path, **{ROOT_VAR: None, PCR0_VAR: None})
    flags = ["--tee-root-cert", str(root_file(worker)), "--tee-pcr0", worker.platform.pcr0.hex()]
    result = whoami(env, *flags)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == (
        f"signer   {worker.base}/tee  attested simulated, PCR0 {worker.platform.pcr0.hex()}"
    )

    flags[-1] = "cd" * 48  # the flag wins over the environment
    result = whoami(env | {PCR0_VAR: worker.platform.pcr0.hex()}, *flags)
    assert result.exit_code == 8
    assert result.stderr.splitlines() == [
        f"agentkeys: attestation: PCR0 {worker.platform.pcr0.hex()} is not in AGENTKEYS_TEE_PCR0"
    ]


def test_whoami_says_when_the_signer_is_not_attested(worker: Worker, tmp_path: Path) -> None:
    env = settings(worker, tmp_path, **{ROOT_VAR: None, PCR0_VAR: None})
    result = whoami(env)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        *whoami_lines(env),
        f"signer   {worker.base}/tee  (not attested: AGENTKEYS_TEE_ROOT_CERT is unset)",
    ]
    assert worker.requests() == [("GET", "/v1/identities")]


def test_the_command_exits_8_as_a_process(worker: Worker, tmp_path: Path) -> None:
    env = settings(worker, tmp_path, **{PCR0_VAR: "ab" * 48})
    sign_in(env)
    result = subprocess.run(
        [sys.executable, "-m", "agentkeys.client.cli", "whoami"],
        env=clean_env(**{k: v for k, v in env.items() if v is not None}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 8, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"agentkeys: attestation: PCR0 {worker.platform.pcr0.hex()} is not in AGENTKEYS_TEE_PCR0"
    ]


def test_exit_code_8_is_documented() -> None:
    assert "8 the signer failed attestation" in EXIT_CODES
    assert AttestationFailed.exit_code == 8
