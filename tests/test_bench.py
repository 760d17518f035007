"""The benchmarks' own parts, the ones that could be wrong without anyone noticing: the
reference path, the wrk script that must send each pre-signed challenge once, the challenges
themselves, the stage classifier and sampler, the arithmetic of ratios and tables, and the
bulk load. No benchmark runs here."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import flask
import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import agentkeys.sessions
from agentkeys.broker.factory import create_app
from agentkeys.broker.store import LINKED, IdentityLinkStore
from agentkeys.crypto import derive_wallet, omni
from agentkeys.identity import EMAIL, EVM, Identity
from agentkeys.settings import Settings
from agentkeys.siwe import SiweMessage
from bench.client import STEPS, TimedApi, shares
from bench.identities import bulk_load, bulk_rows, stored_identities
from bench.load import BODIES_LUA, LoadError, have_wrk, parse_wrk, ratios, write_bodies, wrk_script
from bench.run import HEALTHZ, VERIFY, VerifyBudget, ecdsa_derive_and_sign, siwe_message
from bench.sampler import Sampler, short_path
from bench.server import BenchBroker, parse_rss_kib
from bench.stages import (
    AUTH,
    CRYPTO,
    DATABASE,
    FRAMEWORK,
    PARSE,
    POLICY,
    PROFILER,
    SERIALISATION,
    Frame,
    cost_table,
    stage_of,
    tally,
)
from tests.conftest import services_of


@settings(max_examples=10, deadline=None)
@given(master=st.binary(min_size=32, max_size=32), anchor=st.binary(min_size=32, max_size=32))
def test_ecdsa_reference_matches_coincurve(master: bytes, anchor: bytes) -> None:
    wallet = derive_wallet(master, anchor.hex())
    message = siwe_message(wallet.address, "127.0.0.1:8000", anchor.hex())
    SiweMessage.parse(message)  # the benchmark signs a message the policy can accept
    expected = (wallet.address, wallet.sign_personal(message.encode()))
    assert ecdsa_derive_and_sign(master, anchor.hex(), message.encode()) == expected


def test_wrk_script_posts_json() -> None:
    script = wrk_script({"omni_account": "ab"}, "tok")
    assert script.splitlines() == [
        'wrk.method = "POST"',
        'wrk.headers["Content-Type"] = "application/json"',
        'wrk.body = "{\\"omni_account\\": \\"ab\\"}"',
        'wrk.headers["Authorization"] = "Bearer tok"',
    ]
    body = json.loads(json.loads(script.splitlines()[2].removeprefix("wrk.body = ")))
    assert body == {"omni_account": "ab"}
    assert wrk_script(None) == ""
    assert wrk_script(None, "tok", method="POST").splitlines() == [
        'wrk.method = "POST"',
        'wrk.headers["Authorization"] = "Bearer tok"',
    ]


def test_cold_mint_shares_cover_every_step() -> None:
    rounds = [dict.fromkeys(STEPS, 0.001) | {"STS": 0.004}, dict.fromkeys(STEPS, 0.003)]
    split = shares(rounds)
    assert list(split) == list(STEPS)
    assert split["STS"] == pytest.approx((3.5, 3.5 / 13.5))  # median in ms, share of the sum
    assert sum(share for _, share in split.values()) == pytest.approx(1)


# -- the wrk script that sends each pre-signed challenge once ---------------------------------


class Recorder(BaseHTTPRequestHandler):
    """Answers POST /v1/verify 200 and anything else 404, keeping what it was sent."""

    protocol_version = "HTTP/1.1"  # keep-alive, as wrk expects
    seen: list[tuple[str, str, str | None, str]]
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        self._answer("POST", body, 200 if self.path == "/v1/verify" else 404)

    def do_GET(self) -> None:
        self._answer("GET", "", 404)

    def _answer(self, method: str, body: str, status: int) -> None:
        with self.lock:
            self.seen.append((method, self.path, self.headers.get("Content-Type"), body))
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[tuple[str, str, str | None, str]]]]:
    seen: list[tuple[str, str, str | None, str]] = []
    handler = type("Handler", (Recorder,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()
    server.server_close()


def test_timed_api_adds_each_steps_time(
    recorder: tuple[str, list[tuple[str, str, str | None, str]]],
) -> None:
    base, seen = recorder
    spent: dict[str, float] = {}
    api = TimedApi(base, spent)
    assert api.post("verify", "/v1/verify", {"a": "b"}) == {}
    assert api.post("verify", "/v1/verify", {"a": "c"}) == {}
    assert api.call("other", "POST", "/v1/verify", {}) == {}
    assert [path for _, path, _, _ in seen] == ["/v1/verify"] * 3
    assert set(spent) == {"verify", "other"}
    assert all(seconds > 0 for seconds in spent.values())


@pytest.mark.skipif(not have_wrk(), reason="needs Debian's wrk (apt-get install -y wrk)")
def test_bodies_script_sends_each_body_at_most_once_then_fails_loudly(
    recorder: tuple[str, list[tuple[str, str, str | None, str]]], tmp_path: Path
) -> None:
    base, seen = recorder
    bodies = [{"request_id": f"r{n}", "signature": "0x00"} for n in range(40)]
    path = write_bodies(tmp_path / "bodies.txt", bodies)
    command = ["wrk", "-t2", "-c4", "-d1s", "-s", str(BODIES_LUA), f"{base}/v1/verify"]
    output = subprocess.run(
        [*command, "--", str(path), "2"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    posts = [(ctype, json.loads(body)) for method, url, ctype, body in seen if method == "POST"]
    # wrk calls request() once on thread 0 to check it before the run: line 0 is taken, unsent.
    assert sorted(posts, key=lambda p: int(p[1]["request_id"][1:])) == [
        ("application/json", body) for body in bodies[1:]
    ]
    others = [(method, url) for method, url, _, _ in seen if method != "POST"]
    assert set(others) == {("GET", "/bench/exhausted")}
    counted = re.search(r"bench-bodies: taken (\d+) exhausted (\d+)", output)
    assert counted is not None, output
    # Every sentinel that arrived was counted; wrk's stop may cut the last ones it made.
    assert int(counted.group(1)) == 40 and int(counted.group(2)) >= len(others)
    with pytest.raises(LoadError, match="ran out of pre-made bodies \\(40 used\\)"):
        parse_wrk(f"{base}/v1/verify", output)


WRK_OUTPUT = """\
Running 5s test @ http://127.0.0.1:8000/v1/identities
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.04ms    2.30ms  30.11ms   90.00%
    Req/Sec   201.32     20.10   240.00     70.00%
  Latency Distribution
     50%    4.50ms
     75%    5.20ms
     90%    6.90ms
     99%  850.00us
  1003 requests in 5.01s, 500.00KB read
Requests/sec:    200.20
Transfer/sec:     99.80KB
bench-bodies: taken 1004 exhausted 0
"""


def test_parse_wrk_reads_counts_latency_and_bodies() -> None:
    run = parse_wrk("u", WRK_OUTPUT)
    assert (run.requests, run.rps, run.bodies_taken, run.bodies_exhausted) == (1003, 200.2, 1004, 0)
    assert run.p50_ms == 4.5
    assert run.p99_ms == pytest.approx(0.85)  # 850us


@pytest.mark.parametrize(
    "line",
    [
        "  Non-2xx or 3xx responses: 3",
        "  Socket errors: connect 0, read 0, write 0, timeout 2",
        "bench-bodies: taken 10 exhausted 1",
    ],
)
def test_parse_wrk_refuses_runs_with_errors(line: str) -> None:
    with pytest.raises(LoadError):
        parse_wrk("u", WRK_OUTPUT.replace("Requests/sec:", line + "\nRequests/sec:"))


# -- pre-signed challenges verify through the real broker -------------------------------------


def test_presigned_challenges_verify_once_through_the_broker(
    any_database_url: str, tmp_path: Path
) -> None:
    broker = BenchBroker(any_database_url)
    alice, bob = broker.account("alice@example.com"), broker.account("bob@example.com")
    bodies = broker.presigned([alice, bob], 4)
    assert len({body["request_id"] for body in bodies}) == 4
    app = create_app(Settings.from_env(broker.env), instance_path=str(tmp_path / "instance"))
    try:
        client = app.test_client()
        answer = client.post("/v1/auth/wallet/verify", json=bodies[1])
        assert answer.status_code == 200, answer.get_data(as_text=True)
        found = answer.get_json()
        assert set(found) == {
            "session_jwt",
            "expires_at",
            "account",
            "omni_account",
            "wallet_address",
        }
        assert (found["account"], found["wallet_address"]) == (bob.anchor, bob.address)
        assert found["omni_account"] == omni(EVM, bob.address.lower())
        claims = jwt.decode(found["session_jwt"], options={"verify_signature": False})
        assert (claims["kind"], claims["wallet_address"]) == ("wallet", bob.address.lower())
        again = client.post("/v1/auth/wallet/verify", json=bodies[1])
        assert (again.status_code, again.get_json()["error"]) == (401, "challenge_used")
        other = client.post("/v1/auth/wallet/verify", json=bodies[2])
        assert (other.status_code, other.get_json()["account"]) == (200, alice.anchor)
        # The signed message is the broker's own challenge, bound to the account.
        store = services_of(app).store
        assert [i.identity for i in store.identities(bob.anchor)] == [
            Identity(EMAIL, "bob@example.com"),
            Identity(EVM, bob.address.lower()),
        ]
    finally:
        services_of(app).engine.dispose()
        broker.services.engine.dispose()


# -- the sampler and the stage classifier ------------------------------------------------------

VIEW = ("agentkeys/blueprints/signer.py", "sign_message")
FLASK = [("flask/app.py", "dispatch_request"), ("flask/app.py", "wsgi_app")]
GUNICORN = [("gunicorn/workers/base_async.py", "handle_request"), ("gevent/greenlet.py", "run")]
REQUEST = [VIEW, *FLASK, *GUNICORN]


@pytest.mark.parametrize(
    ("stack", "stage"),
    [
        ([("json/decoder.py", "decode"), ("json/__init__.py", "loads"),
          ("agentkeys/blueprints/parsing.py", "json_object"), *REQUEST], PARSE),
        ([("marshmallow/schema.py", "_deserialize"), ("agentkeys/blueprints/parsing.py", "load"),
          *REQUEST], PARSE),
        ([("agentkeys/signer.py", "parse_message_hex"), *REQUEST], PARSE),
        ([("json/decoder.py", "decode"), ("jwt/api_jws.py", "_load"),
          ("agentkeys/sessions.py", "decode_session"), ("agentkeys/blueprints/http.py",
          "bearer_session"), *REQUEST], AUTH),
        ([("agentkeys/broker/keys.py", "public_key"), ("agentkeys/sessions.py", "_check_signature"),
          *REQUEST], AUTH),
        ([("agentkeys/blueprints/parsing.py", "bearer_token"), *REQUEST], AUTH),
        ([("agentkeys/siwe.py", "parse"), ("agentkeys/signer.py", "check"), *REQUEST], POLICY),
        ([("hashlib.py", "__hash_new"), ("agentkeys/broker/ratelimit.py", "hit"),
          ("agentkeys/blueprints/http.py", "rate_limit"), *REQUEST], POLICY),
        ([("agentkeys/blueprints/signer.py", "own_anchor"), *REQUEST], POLICY),
        ([("coincurve/keys.py", "sign_recoverable"), ("agentkeys/crypto.py", "sign_personal"),
          ("agentkeys/signer.py", "sign_message"), *REQUEST], CRYPTO),
        ([("cryptography/hazmat/primitives/asymmetric/ec.py", "sign"),
          ("jwt/algorithms.py", "sign"), ("jwt/api_jws.py", "encode"),
          ("agentkeys/broker/oidc.py", "mint"), *REQUEST], CRYPTO),
        ([("sqlalchemy/engine/default.py", "do_execute"), ("agentkeys/broker/ratelimit.py", "incr"),
          ("agentkeys/broker/ratelimit.py", "hit"), ("agentkeys/blueprints/http.py", "rate_limit"),
          *REQUEST], DATABASE),
        ([("gevent/select.py", "poll"), ("psycopg/waiting.py", "wait_poll"),
          ("agentkeys/broker/store.py", "session_generation"), ("agentkeys/sessions.py", "verify"),
          *REQUEST], DATABASE),
        ([("agentkeys/broker/store.py", "session_generation"), ("agentkeys/sessions.py", "verify"),
          *REQUEST], DATABASE),
        ([("json/encoder.py", "iterencode"), ("flask/json/provider.py", "dumps"), *FLASK,
          *GUNICORN], SERIALISATION),
        ([("jwt/api_jws.py", "encode"), ("agentkeys/broker/oidc.py", "mint"), *REQUEST],
         SERIALISATION),
        ([("agentkeys/sessions.py", "mint"), ("agentkeys/blueprints/wallet.py", "wallet_verify"),
          *FLASK], SERIALISATION),
        ([("agentkeys/timefmt.py", "rfc3339"), *REQUEST], SERIALISATION),
        ([VIEW, *FLASK, *GUNICORN], SERIALISATION),
        ([("werkzeug/local.py", "__get__"), ("agentkeys/blueprints/parsing.py", "json_object"),
          *REQUEST], FRAMEWORK),
        ([("gevent/_socketcommon.py", "send"), *GUNICORN], FRAMEWORK),
        ([("secrets.py", "token_hex"), ("agentkeys/requestid.py", "new_request_id"),
          ("agentkeys/blueprints/metrics.py", "_start"), *FLASK], FRAMEWORK),
        ([("gevent/hub.py", "run")], FRAMEWORK),
        ([("<frozen importlib._bootstrap>", "_find_and_load")], FRAMEWORK),
        ([], FRAMEWORK),
        ([("bench/sampler.py", "_sample"), ("coincurve/keys.py", "sign")], PROFILER),
    ],
)  # fmt: skip
def test_stage_of_sample(stack: list[Frame], stage: str) -> None:
    assert stage_of(stack) == stage


def test_short_paths_are_what_the_rules_name() -> None:
    assert short_path(flask.app.__file__ or "") == "flask/app.py"
    assert short_path(json.decoder.__file__ or "") == "json/decoder.py"
    assert short_path(agentkeys.sessions.__file__ or "") == "agentkeys/sessions.py"
    assert short_path(__file__) == "tests/test_bench.py"


def test_sampler_counts_cpu_time_in_the_interrupted_stack(tmp_path: Path) -> None:
    """The sampler run for real in this process: a loop of wallet derivations and signatures
    must come out almost all crypto (the loop's own lines are the rest)."""
    sampler = Sampler(tmp_path)
    previous = signal.getsignal(signal.SIGPROF)
    sampler.start()
    try:
        while sum(sampler.stacks.values()) < 40:
            derive_wallet(b"\x01" * 32, "ab" * 32).sign_personal(b"message")
    finally:
        sampler.stop()
        signal.signal(signal.SIGPROF, previous)
    records = json.loads((tmp_path / f"{os.getpid()}-1.json").read_text())
    samples = [(r["count"], [tuple(frame) for frame in r["stack"]]) for r in records]
    counts = tally(samples)
    assert sum(counts.values()) >= 40
    assert counts[CRYPTO] >= 0.8 * sum(counts.values()), counts
    assert any(("tests/test_bench.py", "test_sampler_counts_cpu_time_in_the_interrupted_stack")
               in stack for _, stack in samples)  # fmt: skip


# -- arithmetic ---------------------------------------------------------------------------------


def test_ratios_are_medians_of_each_rounds_ratio() -> None:
    rounds = [
        {HEALTHZ: 100.0, "sign": 90.0},
        {HEALTHZ: 200.0, "sign": 60.0},
        {HEALTHZ: 50.0, "sign": 40.0},
    ]
    # 0.9, 0.3, 0.8 in the rounds: the median 0.8, where the ratio of the medians is 0.6.
    assert ratios(rounds, HEALTHZ) == {HEALTHZ: 1.0, "sign": pytest.approx(0.8)}


def test_verify_budget_starts_from_healthz_then_follows_verify() -> None:
    budget = VerifyBudget()
    budget.saw(HEALTHZ, 1000.0)
    assert budget.bodies(5) == 1000 * 5 * 3 // 2 + 100
    budget.saw(VERIFY, 100.0)
    budget.saw(VERIFY, 50.0)  # the fastest seen counts
    assert budget.bodies(5) == 100 * 5 * 4 + 200
    budget.saw(VERIFY, 900.0)
    assert budget.bodies(5) == 7600  # never more than /healthz could take


def test_cost_table_splits_measured_cpu_by_share() -> None:
    lines = cost_table(
        {
            "/healthz": ({FRAMEWORK: 10}, 200.0),
            "/sign": ({CRYPTO: 6, FRAMEWORK: 3, PROFILER: 1}, 1000.0),
        }
    )
    assert lines == [
        "| stage | /healthz | /sign |",
        "|---|---:|---:|",
        "| parse | 0 (0%) | 0 (0%) |",
        "| auth | 0 (0%) | 0 (0%) |",
        "| policy | 0 (0%) | 0 (0%) |",
        "| crypto | 0 (0%) | 600 (60%) |",
        "| database | 0 (0%) | 0 (0%) |",
        "| serialisation | 0 (0%) | 0 (0%) |",
        "| framework | 200 (100%) | 300 (30%) |",
        "| profiler | 0 (0%) | 100 (10%) |",
        "| **total** | **200** | **1,000** |",
        "| samples | 10 | 10 |",
    ]


def test_parse_rss() -> None:
    assert parse_rss_kib("Name:\tpython\nVmPeak:\t  9000 kB\nVmRSS:\t   90368 kB\n") == 90368


# -- the bulk load of bench.identities --------------------------------------------------------


def test_bulk_rows_are_accounts_as_sign_ins_leave_them() -> None:
    accounts, identities = (list(rows) for rows in bulk_rows(5, "agentkeys", 1700))
    anchors = [omni(EMAIL, f"person{n}@bulk.example.com") for n in range(3)]
    assert accounts == [
        (a, 1700, 0, EMAIL, f"person{n}@bulk.example.com") for n, a in enumerate(anchors)
    ]
    assert [(kind, account) for kind, _, account, _, _ in identities] == [
        (EMAIL, anchors[0]), (EVM, anchors[0]), (EMAIL, anchors[1]), (EVM, anchors[1]),
        (EMAIL, anchors[2]),
    ]  # fmt: skip


def test_bulk_load_copies_identities_the_store_reads(postgres_url: str) -> None:
    assert bulk_load(postgres_url, 7, "agentkeys") >= 0
    assert stored_identities(postgres_url) == 7
    broker = BenchBroker(postgres_url)
    store: IdentityLinkStore = broker.services.store
    try:
        anchor = omni(EMAIL, "person2@bulk.example.com")
        assert store.resolve(Identity(EMAIL, "person2@bulk.example.com")) == anchor
        linked = store.identities(anchor)
        assert [(i.identity.type, i.status) for i in linked] == [(EMAIL, LINKED), (EVM, LINKED)]
        assert store.session_generation(anchor) == 0
        assert store.sign_in(Identity(EMAIL, "person2@bulk.example.com")) == anchor
    finally:
        broker.services.engine.dispose()
