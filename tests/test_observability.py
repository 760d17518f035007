"""Request ids, JSON logs and /metrics: in process, and under real gunicorn (4 workers summed
by prometheus_client's multiprocess mode, JSON and text log lines, the access log off)."""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask, request
from prometheus_client import mmap_dict
from prometheus_client.parser import text_string_to_metric_families

from agentkeys import requestid
from agentkeys.crypto import derive_wallet, to_checksum_address
from agentkeys.errors import ConfigError
from agentkeys.observability import (
    SIGN_IN_STEPS,
    SIGNER_OPERATIONS,
    JsonFormatter,
    Observability,
    outcome,
)
from agentkeys.settings import DEFAULT_LIMITS, Limit
from agentkeys.tee import app as tee_app
from tests.broker import Broker, broker_env
from tests.conftest import MakeApp, bearer_for_account
from tests.live import ROOT, clean_env, free_port, gunicorn, release, serving
from tests.smtp import StartServer
from tests.vectors import VECTOR_ANCHOR, VECTOR_MASTER

GUNICORN = [sys.executable, "-m", "gunicorn", "--config", "config/gunicorn.conf.py"]
TEE_GUNICORN = [sys.executable, "-m", "gunicorn", "--config", "config/tee.gunicorn.conf.py"]
DEV = {"AGENTKEYS_ENV": "development"}
FRESH_ID = re.compile(r"[0-9a-f]{32}\Z")
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
DOMAIN = ("agentkeys_sign_ins_total", "agentkeys_signatures_total", "agentkeys_mints_total")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
Mmap: Any = mmap_dict.MmapedDict  # the workers' metric files (untyped)


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def samples(text: str) -> Samples:
    """Every sample of an exposition, read by prometheus_client's own parser."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[key(sample.name, **sample.labels)] = sample.value
    return found


def moved(before: Samples, after: Samples) -> Samples:
    """The domain counters that changed, by how much."""
    return {
        k: after[k] - before.get(k, 0.0)
        for k in after
        if k[0] in DOMAIN and after[k] != before.get(k, 0.0)
    }


@pytest.fixture
def observed(make_app: MakeApp) -> Callable[..., Flask]:
    """Apps with metrics on (a plain registry each, as under `flask run`)."""

    def build(metrics: bool = True, **overrides: Any) -> Flask:
        return make_app(observability=Observability(metrics=metrics), **overrides)

    return build


def scrape(app: Flask) -> Samples:
    response = app.test_client().get("/metrics")
    assert response.status_code == 200
    assert response.content_type == "text/plain; version=0.0.4; charset=utf-8"
    return samples(response.get_data(as_text=True))


# --- request ids ---------------------------------------------------------------------------


GOOD_IDS = ["a", "A" * 128, "req-1.2:3_x", "0f8fad5b-d9cb-469f-a165-70867728950e"]
BAD_IDS = ["", " ", "a" * 129, "has space", 'quo"te', "semi;colon", "sl/ash", "ünï", "tab\tx"]


@pytest.mark.parametrize("given", GOOD_IDS)
def test_a_well_formed_request_id_is_echoed(given: str, observed: Callable[..., Flask]) -> None:
    client = observed().test_client()
    for path in ("/healthz", "/no/such/path"):
        response = client.get(path, headers={"X-Request-ID": given})
        assert response.headers["X-Request-ID"] == given
    problem = client.post(
        "/v1/auth/email/request",
        data="{",
        content_type="application/json",
        headers={"X-Request-ID": given},
    )
    assert problem.status_code == 400 and problem.headers["X-Request-ID"] == given


@pytest.mark.parametrize("given", BAD_IDS)
def test_a_malformed_request_id_is_replaced(given: str, observed: Callable[..., Flask]) -> None:
    response = observed().test_client().get("/healthz", headers={"X-Request-ID": given})
    assert response.status_code == 200
    assert FRESH_ID.match(response.headers["X-Request-ID"])
    assert response.headers["X-Request-ID"] != given.strip()


def test_every_response_gets_a_fresh_id_without_one(observed: Callable[..., Flask]) -> None:
    client = observed(metrics=False).test_client()
    ids = {client.get("/healthz").headers["X-Request-ID"] for _ in range(20)}
    ids.add(client.delete("/healthz").headers["X-Request-ID"])  # 405
    assert len(ids) == 21 and all(FRESH_ID.match(i) for i in ids)


@pytest.mark.parametrize(
    ("value", "ok"),
    [(g, True) for g in GOOD_IDS]
    + [(b, False) for b in BAD_IDS]
    + [("a\n", False), ("a\nb", False)],
)
def test_one_request_id_shape_for_broker_and_tee(value: str, ok: bool) -> None:
    assert requestid.is_well_formed(value) is ok
    assert (requestid.request_id_from(value) == value) is ok
    # The TEE worker uses this very definition, not a copy of its own.
    assert vars(tee_app)["request_id_from"] is requestid.request_id_from
    assert not hasattr(tee_app, "_REQUEST_ID")


# --- JSON logs, in process ------------------------------------------------------------------


@contextmanager
def json_lines(logger: str = "agentkeys") -> Iterator[list[dict[str, Any]]]:
    """The JSON lines written under `logger` meanwhile, each parsed."""
    stream, lines = io.StringIO(), list[dict[str, Any]]()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logging.getLogger(logger).addHandler(handler)
    try:
        yield lines
    finally:
        logging.getLogger(logger).removeHandler(handler)
        lines.extend(json.loads(line) for line in stream.getvalue().splitlines())


def test_app_log_lines_carry_their_request_ids(observed: Callable[..., Flask]) -> None:
    """16 requests at once on 8 threads: each line names the request it was logged in."""
    app = observed(metrics=False)

    def view() -> str:
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("agentkeys.test").exception("served %s", request.args["n"])
        return "ok"

    app.add_url_rule("/test/log", "test_log", view)

    def call(n: int) -> str:
        response = app.test_client().get(
            f"/test/log?n={n}&code=CODE-marker", headers={"X-Request-ID": f"obs.{n}:a_b-c"}
        )
        assert response.status_code == 200
        return response.headers["X-Request-ID"]

    with json_lines() as lines, ThreadPoolExecutor(8) as pool:
        assert list(pool.map(call, range(16))) == [f"obs.{n}:a_b-c" for n in range(16)]
    call(99)  # on this thread: its id is gone once the request is
    with json_lines() as after:
        logging.getLogger("agentkeys.test").error("outside a request")
    assert len(lines) == 16
    for line in lines:
        n = line["message"].removeprefix("served ")
        assert "ValueError: boom" in line.pop("exc_info") and TS.match(line.pop("ts"))
        assert line == {
            "level": "ERROR",
            "logger": "agentkeys.test",
            "message": f"served {n}",
            "request_id": f"obs.{n}:a_b-c",
        }
    assert [line["request_id"] for line in after] == [None]


def test_a_json_line_is_one_line_whatever_the_message() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "a\nb\x1b[31m %s", ("c",), None)
    line = JsonFormatter().format(record)
    assert "\n" not in line and "\x1b" not in line
    assert json.loads(line)["message"] == "a\nb\x1b[31m c"


# --- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "production", "expected"),
    [
        ({}, True, Observability("json", False)),
        ({}, False, Observability("text", False)),
        ({"AGENTKEYS_LOG_FORMAT": "text"}, True, Observability("text", False)),
        ({"AGENTKEYS_LOG_FORMAT": " json "}, False, Observability("json", False)),
        ({"AGENTKEYS_METRICS": "on"}, True, Observability("json", True)),
        ({"AGENTKEYS_METRICS": "0"}, False, Observability("text", False)),
    ],
)
def test_observability_settings(
    environ: dict[str, str], production: bool, expected: Observability
) -> None:
    assert Observability.from_env(environ, production=production) == expected


@pytest.mark.parametrize(
    ("environ", "detail"),
    [
        ({"AGENTKEYS_LOG_FORMAT": "JSON"}, "AGENTKEYS_LOG_FORMAT must be one of: json, text"),
        ({"AGENTKEYS_LOG_FORMAT": "yaml"}, "AGENTKEYS_LOG_FORMAT must be one of: json, text"),
        (
            {"AGENTKEYS_METRICS": "False!"},
            "AGENTKEYS_METRICS must be one of true/false/1/0/yes/no/on/off",
        ),
        (
            {"AGENTKEYS_METRICS": "enabled"},
            "AGENTKEYS_METRICS must be one of true/false/1/0/yes/no/on/off",
        ),
    ],
)
def test_observability_settings_are_strict(environ: dict[str, str], detail: str) -> None:
    with pytest.raises(ConfigError) as info:
        Observability.from_env(environ, production=True)
    assert info.value.detail == detail


REFUSALS = {
    "log-format": (
        {"AGENTKEYS_LOG_FORMAT": "yaml"},
        "AGENTKEYS_LOG_FORMAT must be one of: json, text",
    ),
    "metrics": (
        {"AGENTKEYS_METRICS": "sure"},
        "AGENTKEYS_METRICS must be one of true/false/1/0/yes/no/on/off",
    ),
    "access-log": (
        {"AGENTKEYS_ACCESS_LOG": "quiet"},
        "AGENTKEYS_ACCESS_LOG must be one of true/false/1/0/yes/no/on/off",
    ),
    "metrics-dir": (
        {"AGENTKEYS_METRICS": "on", "PROMETHEUS_MULTIPROC_DIR": "/nonexistent/metrics"},
        "PROMETHEUS_MULTIPROC_DIR must be an existing directory",
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_gunicorn_refuses_bad_observability_settings(case: str, tmp_path: Path) -> None:
    extra, detail = REFUSALS[case]
    env = clean_env(**DEV, DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}", **extra)
    assert_refused([*GUNICORN, "wsgi:app"], env, detail)


def assert_refused(command: list[str], env: dict[str, str], detail: str) -> None:
    """gunicorn exits 1 with the configuration error as its one line."""
    result = subprocess.run(
        [*command, "--bind", f"127.0.0.1:{free_port()}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr == f"agentkeys: configuration error: {detail}\n"


TEE_REFUSALS = {name: REFUSALS[name] for name in ("log-format", "access-log")} | {
    "worker-setting": (
        {"AGENTKEYS_TEE_RATE_LIMIT": "many"},
        "AGENTKEYS_TEE_RATE_LIMIT takes count/seconds (count ≥ 1, 1 to 86400 seconds)",
    ),
}


@pytest.mark.parametrize("case", TEE_REFUSALS)
def test_the_tee_config_refuses_bad_settings_in_one_line(case: str, tmp_path: Path) -> None:
    extra, detail = TEE_REFUSALS[case]
    env = clean_env(**DEV, AGENTKEYS_TEE_STATE_DIR=str(tmp_path / "tee"), **extra)
    assert_refused([*TEE_GUNICORN, "agentkeys.tee.wsgi:app"], env, detail)
    assert not (tmp_path / "tee").exists()  # refused in the master, before the worker booted


def test_flask_refuses_a_bad_log_format(tmp_path: Path) -> None:
    env = clean_env(
        **DEV, DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}", AGENTKEYS_LOG_FORMAT="xml"
    )
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "routes"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 4
    assert (
        result.stderr
        == "agentkeys: configuration error: AGENTKEYS_LOG_FORMAT must be one of: json, text\n"
    )


# --- metrics, in process --------------------------------------------------------------------


def test_metrics_are_off_unless_enabled(observed: Callable[..., Flask]) -> None:
    response = observed(metrics=False).test_client().get("/metrics")
    assert response.status_code == 404 and response.json == {
        "type": "urn:agentkeys:problem:not_found",
        "title": "Not Found",
        "status": 404,
        "detail": "No such endpoint.",
        "error": "not_found",
    }


def test_requests_are_counted_by_endpoint_method_and_status(
    observed: Callable[..., Flask],
) -> None:
    app = observed()
    client = app.test_client()
    for _ in range(3):
        assert client.get("/healthz").status_code == 200
    assert client.post("/healthz").status_code == 405
    found = scrape(app)
    assert (
        found[
            key(
                "agentkeys_http_requests_total",
                endpoint="health.healthz",
                method="GET",
                status="200",
            )
        ]
        == 3
    )
    assert (
        found[
            key("agentkeys_http_requests_total", endpoint="unmatched", method="POST", status="405")
        ]
        == 1
    )
    assert (
        found[
            key(
                "agentkeys_http_request_duration_seconds_count",
                endpoint="health.healthz",
                method="GET",
            )
        ]
        == 3
    )
    assert (
        found[
            key(
                "agentkeys_http_request_duration_seconds_bucket",
                endpoint="health.healthz",
                method="GET",
                le="+Inf",
            )
        ]
        == 3
    )


def test_unknown_paths_and_methods_make_no_new_series(observed: Callable[..., Flask]) -> None:
    """A path or a method is never a label value: 40 random 404s are one series."""
    app = observed()
    client = app.test_client()
    paths = [f"/probe-{secrets.token_hex(8)}" for _ in range(40)]
    for path in paths:
        assert client.get(path).status_code == 404
    assert client.open("/healthz", method="BREW").status_code == 405
    text = app.test_client().get("/metrics").get_data(as_text=True)
    found = samples(text)
    requests_total = {k: v for k, v in found.items() if k[0] == "agentkeys_http_requests_total"}
    assert requests_total == {
        key("agentkeys_http_requests_total", endpoint="unmatched", method="GET", status="404"): 40,
        key("agentkeys_http_requests_total", endpoint="unmatched", method="other", status="405"): 1,
    }
    assert not any(path in text for path in paths) and "BREW" not in text


def test_domain_counters_move_by_each_outcome(observed: Callable[..., Flask]) -> None:
    limits = dict(DEFAULT_LIMITS, verify_ip=Limit(1, 60))
    app = observed(rate_limits=limits)
    client = app.test_client()
    identity = bearer_for_account(app, VECTOR_ANCHOR)
    before = scrape(app)
    # Every known series is there from zero, before its first event.
    assert {k: v for k, v in before.items() if k[0] in DOMAIN} == {
        **{
            key("agentkeys_sign_ins_total", method=method, outcome=name): 0
            for method, success in SIGN_IN_STEPS.values()
            for name in (success, "failed", "rate_limited", "error")
        },
        **{
            key("agentkeys_signatures_total", signer="dev", operation=op, outcome=name): 0
            for op in ("derive", "sign")
            for name in ("ok", "failed", "rate_limited", "error")
        },
        **{
            key("agentkeys_mints_total", outcome=name): 0
            for name in ("ok", "failed", "rate_limited", "error")
        },
    }
    calls = [
        (client.post("/v1/auth/email/request", json={"email": "a@example.com"}), 202),
        (client.post("/v1/auth/email/verify", json={"token": "t" * 43}), 400),
        (client.post("/v1/auth/email/verify", json={"token": "t" * 43}), 429),
        (client.get("/auth/oauth2/callback?state=nope&code=c"), 400),
        (client.post("/v1/auth/wallet/start", json={"address": "0x12"}), 400),
        (
            client.post(
                "/dev/derive-address", json={"omni_account": VECTOR_ANCHOR}, headers=identity
            ),
            200,
        ),
        (
            client.post(
                "/dev/sign-message", json={"omni_account": VECTOR_ANCHOR, "message_hex": "00"}
            ),
            401,
        ),
        (client.post("/v1/mint-oidc-jwt", headers=identity), 403),
    ]
    assert [r.status_code for r, _ in calls] == [status for _, status in calls]
    assert moved(before, scrape(app)) == {
        key("agentkeys_sign_ins_total", method="email", outcome="started"): 1,
        key("agentkeys_sign_ins_total", method="email", outcome="failed"): 1,
        key("agentkeys_sign_ins_total", method="email", outcome="rate_limited"): 1,
        key("agentkeys_sign_ins_total", method="oauth2", outcome="failed"): 1,
        key("agentkeys_sign_ins_total", method="wallet", outcome="failed"): 1,
        key("agentkeys_signatures_total", signer="dev", operation="derive", outcome="ok"): 1,
        key("agentkeys_signatures_total", signer="dev", operation="sign", outcome="failed"): 1,
        key("agentkeys_mints_total", outcome="failed"): 1,
    }


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, "done"),
        (202, "done"),
        (400, "failed"),
        (401, "failed"),
        (403, "failed"),
        (404, "failed"),
        (429, "rate_limited"),
        (500, "error"),
        (502, "error"),
        (503, "error"),
    ],
)
def test_outcome_of_a_status(status: int, expected: str) -> None:
    assert outcome(status, "done") == expected


def test_domain_metrics_name_real_endpoints(observed: Callable[..., Flask]) -> None:
    """A renamed view would silently stop its counter: each table entry must be a route."""
    app = observed()
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()}
    assert {*SIGN_IN_STEPS, *SIGNER_OPERATIONS, "wallet.mint_oidc_jwt"} <= endpoints


def test_a_disabled_signer_counts_no_signatures(observed: Callable[..., Flask]) -> None:
    app = observed(dev_master_secret=None)
    before = scrape(app)
    assert not [k for k in before if k[0] == "agentkeys_signatures_total"]
    body = {"omni_account": VECTOR_ANCHOR, "message_hex": "00"}
    assert app.test_client().post("/dev/sign-message", json=body).status_code == 503
    after = scrape(app)
    assert moved(before, after) == {}
    assert (
        after[
            key(
                "agentkeys_http_requests_total",
                endpoint="dev_key_service.sign_message",
                method="POST",
                status="503",
            )
        ]
        == 1
    )


# --- metrics under gunicorn, 4 workers ---------------------------------------------------------


def per_worker(directory: Path, endpoint: str) -> dict[str, float]:
    """Requests to `endpoint` per worker pid, read from the workers' own metric files."""
    counts: dict[str, float] = {}
    for path in directory.glob("counter_*.db"):
        pid = path.stem.split("_", 1)[1]
        for name, value, _, _ in Mmap.read_all_values_from_file(str(path)):
            _, sample, labels, _ = json.loads(name)
            if sample == "agentkeys_http_requests_total" and labels["endpoint"] == endpoint:
                counts[pid] = counts.get(pid, 0) + value
    return counts


def test_metrics_sum_over_gunicorn_workers(
    postgres_url: str, smtp_server: StartServer, tmp_path: Path
) -> None:
    mailbox, port = smtp_server(), free_port()
    base = f"http://127.0.0.1:{port}"
    directory = tmp_path / "metrics"
    directory.mkdir()
    # A previous run's file: if the start did not wipe the directory, its 1000 would be summed.
    stale = Mmap(str(directory / "counter_999999.db"))
    labels = ["endpoint", "method", "status"]
    stale.write_value(
        mmap_dict.mmap_key(
            "agentkeys_http_requests",
            "agentkeys_http_requests_total",
            labels,
            ["health.healthz", "GET", "200"],
            "stale",
        ),
        1000.0,
        0.0,
    )
    stale.close()
    env = broker_env(
        base, postgres_url, mailbox, AGENTKEYS_METRICS="on", PROMETHEUS_MULTIPROC_DIR=str(directory)
    )

    def metrics() -> tuple[str, Samples]:
        response = requests.get(base + "/metrics", timeout=15)
        assert response.status_code == 200
        return response.text, samples(response.text)

    with gunicorn(env, workers=4, port=port):
        assert not (directory / "counter_999999.db").exists()
        broker = Broker(base, mailbox)
        _, before = metrics()
        ready = key(
            "agentkeys_http_requests_total", endpoint="health.readyz", method="GET", status="200"
        )
        start = before.get(ready, 0.0)  # a series made on first use

        # Sign-ins, signatures and mints, each counted once, however the workers share them.
        email = "metrics-owner@example.com"
        identity, _ = broker.email_sign_in(email)
        account, session = identity["account"], identity["session_jwt"]
        wallet = broker.wallet_sign_in(session, account)
        assert broker.post("/v1/mint-oidc-jwt", token=wallet).status_code == 200
        assert broker.post("/v1/mint-oidc-jwt", token=session).status_code == 403
        other = {"omni_account": VECTOR_ANCHOR, "message_hex": "00"}
        assert broker.post("/dev/sign-message", other, session).status_code == 403
        _, after = metrics()
        assert moved(before, after) == {
            key("agentkeys_sign_ins_total", method="email", outcome="started"): 1,
            key("agentkeys_sign_ins_total", method="email", outcome="verified"): 1,
            key("agentkeys_sign_ins_total", method="wallet", outcome="started"): 1,
            key("agentkeys_sign_ins_total", method="wallet", outcome="verified"): 1,
            key("agentkeys_signatures_total", signer="dev", operation="derive", outcome="ok"): 1,
            key("agentkeys_signatures_total", signer="dev", operation="sign", outcome="ok"): 1,
            key("agentkeys_signatures_total", signer="dev", operation="sign", outcome="failed"): 1,
            key("agentkeys_mints_total", outcome="ok"): 1,
            key("agentkeys_mints_total", outcome="failed"): 1,
        }

        # N requests on fresh connections from 8 threads, until at least 3 workers served some.
        # /readyz, which nothing else calls: the start-up wait polls /healthz, and a poll that
        # timed out on the client side may still be counted after the first scrape.
        sent = 0
        with ThreadPoolExecutor(8) as pool:
            while sent < 2000 and len(per_worker(directory, "health.readyz")) < 3:
                codes = list(
                    pool.map(
                        lambda _: requests.get(base + "/readyz", timeout=15).status_code, range(40)
                    )
                )
                assert codes == [200] * 40
                sent += 40
        spread = per_worker(directory, "health.readyz")
        assert len(spread) >= 3, spread
        assert sum(spread.values()) == start + sent

        # Every scrape sums all workers, whichever answers: the same N each time, and each
        # scrape sees every scrape before it, wherever that one was served.
        scrapes = key(
            "agentkeys_http_requests_total", endpoint="metrics.scrape", method="GET", status="200"
        )
        count = key(
            "agentkeys_http_request_duration_seconds_count", endpoint="health.readyz", method="GET"
        )
        texts: list[str] = []
        # At least 8 scrapes, and on until 3 workers have answered some.
        while len(texts) < 8 or len(per_worker(directory, "metrics.scrape")) < 3:
            assert len(texts) < 200, per_worker(directory, "metrics.scrape")
            text, found = metrics()
            texts.append(text)
            assert found[ready] == found[count] == start + sent
            assert found[scrapes] == sum(per_worker(directory, "metrics.scrape").values()) - 1

    # No identity, address, session or message in any scrape.
    address = derive_wallet(VECTOR_MASTER, account).address
    for text in texts:
        for secret in (
            email,
            account,
            address.lower(),
            to_checksum_address(address),
            session,
            wallet,
        ):
            assert secret not in text


# --- log lines under gunicorn ---------------------------------------------------------------

PASSWORD = "pw-obs-marker"


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite database through the release step, for the log tests to copy."""
    path = tmp_path_factory.mktemp("released") / "db.sqlite3"
    release(clean_env(**DEV, DATABASE_URL=f"sqlite:///{path}"))
    return path


@contextmanager
def logged_gunicorn(env: dict[str, str], logs: Path, released: Path) -> Iterator[str]:
    """One gunicorn worker with the Procfile's config on a copy of the released database,
    stdout and stderr to files."""
    shutil.copy(released, logs / "db.sqlite3")
    env = env | {"DATABASE_URL": f"sqlite:///{logs / 'db.sqlite3'}"}
    port = free_port()
    command = [*GUNICORN, "--bind", f"127.0.0.1:{port}", "--workers", "1", "wsgi:app"]
    with (
        (logs / "stdout").open("w") as out,
        (logs / "stderr").open("w") as err,
        serving(command, env, port, stdout=out, stderr=err) as base,
    ):
        yield base


def test_gunicorn_json_lines(tmp_path: Path, released: Path) -> None:
    env = clean_env(
        **DEV,
        AGENTKEYS_LOG_FORMAT="json",
        # A closed port: the request fails and the app logs it, within the request.
        AGENTKEYS_REDIS_URL=f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/15",
    )
    with logged_gunicorn(env, tmp_path, released) as base:
        failed = requests.post(
            base + "/v1/auth/email/request?code=CODE-marker&state=STATE-marker",
            json={"email": "alice@example.com"},
            headers={"X-Request-ID": "obs-json.1"},
            timeout=15,
        )
        fresh = requests.get(base + "/healthz?x=1", timeout=15)
        forged = requests.get(base + "/x%0Aforged", headers={"X-Request-ID": "bad id"}, timeout=15)
    assert failed.status_code >= 500 and failed.headers["X-Request-ID"] == "obs-json.1"
    assert fresh.status_code == 200 and forged.status_code == 404
    out, err = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    # Every line of both streams is one JSON object.
    access = [json.loads(line) for line in out.splitlines()]
    other = [json.loads(line) for line in err.splitlines()]
    assert {line["logger"] for line in access} == {"gunicorn.access"}
    by_id = {line.pop("request_id"): line for line in access}
    for line in by_id.values():
        assert TS.match(line.pop("ts")) and line.pop("duration_ms") >= 0
    status = failed.status_code
    assert by_id["obs-json.1"] == {
        "level": "INFO",
        "logger": "gunicorn.access",
        "message": f"POST /v1/auth/email/request {status}",
        "method": "POST",
        "path": "/v1/auth/email/request",
        "status": status,
        "remote": "127.0.0.1",
    }
    assert by_id[fresh.headers["X-Request-ID"]]["path"] == "/healthz"
    assert by_id[forged.headers["X-Request-ID"]]["message"] == "GET /x\nforged 404"
    assert FRESH_ID.match(forged.headers["X-Request-ID"])
    # The app's own line about the failed request names that request.
    mine = [line for line in other if line["request_id"] == "obs-json.1"]
    assert mine and all(line["logger"].startswith("agentkeys") for line in mine)
    assert {line["level"] for line in mine} <= {"WARNING", "ERROR"}
    assert any(line["message"].startswith("Booting worker") for line in other)
    for marker in ("CODE-marker", "STATE-marker", "x=1", PASSWORD):
        assert marker not in out + err


def test_gunicorn_json_access_log_off_and_private_metrics_dir(
    tmp_path: Path, released: Path
) -> None:
    """AGENTKEYS_ACCESS_LOG=off holds in JSON too; without PROMETHEUS_MULTIPROC_DIR the master
    makes a private one of its own and removes it when it exits."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = clean_env(
        **DEV,
        AGENTKEYS_LOG_FORMAT="json",
        AGENTKEYS_ACCESS_LOG="off",
        AGENTKEYS_METRICS="on",
        TMPDIR=str(temp),
    )
    with logged_gunicorn(env, tmp_path, released) as base:
        for path in ("/healthz", "/readyz", "/nowhere"):
            requests.get(base + path, timeout=15)
        found = samples(requests.get(base + "/metrics", timeout=15).text)
        [directory] = temp.iterdir()
        assert directory.name.startswith("agentkeys-metrics-")
        assert directory.stat().st_mode & 0o777 == 0o700
        assert [p.name.split("_")[0] for p in directory.glob("*.db")].count("counter") == 1
    ready = key(
        "agentkeys_http_requests_total", endpoint="health.readyz", method="GET", status="200"
    )
    assert found[ready] == 1
    assert list(temp.iterdir()) == []
    assert (tmp_path / "stdout").read_text() == ""
    errors = [json.loads(line) for line in (tmp_path / "stderr").read_text().splitlines()]
    assert any(line["message"].startswith("Booting worker") for line in errors)
    assert not any(line["logger"] == "gunicorn.access" for line in errors)


def test_gunicorn_text_access_lines(tmp_path: Path, released: Path) -> None:
    """Development's default: the familiar line, with the request id, and a path's control
    characters escaped so that it cannot start a forged line."""
    env = clean_env(**DEV)
    with logged_gunicorn(env, tmp_path, released) as base:
        forged = requests.get(
            base + "/x%0Aforged%20line?code=CODE-marker",
            headers={"X-Request-ID": "text.1"},
            timeout=15,
        )
        fresh = requests.get(base + "/healthz", timeout=15)
    assert forged.status_code == 404
    lines = (tmp_path / "stdout").read_text().splitlines()
    [line] = [line for line in lines if "/x" in line]
    assert '"GET /x\\x0aforged line HTTP/1.1" 404 ' in line and line.endswith("ms text.1")
    assert not any(line.startswith("forged") for line in lines)
    assert any(line.endswith(" " + fresh.headers["X-Request-ID"]) for line in lines)
    assert "CODE-marker" not in "\n".join(lines)
