"""Faults (issue 10): `kill -9` under load loses nothing acknowledged; a database or Redis outage
answers 503 with Retry-After (never a 500 or a traceback), readiness follows it, a worker that
boots during the outage comes up and answers, and service resumes by itself. Outages come from
loopback proxies (tests/proxy.py) that are cut or hung, never from the shared servers."""

from __future__ import annotations

import contextlib
import email
import email.policy
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from flask.testing import FlaskClient
from sqlalchemy import func, select, text

from agentkeys.broker.db import make_engine, signing_keys
from agentkeys.broker.factory import APP_LOAD_ERROR, app_from_env
from agentkeys.settings import DEFAULT_LIMITS, Limit
from tests.broker import Broker, broker_env
from tests.conftest import MakeApp, bearer_for
from tests.live import clean_env, free_port, gunicorn, serving
from tests.proxy import Proxy
from tests.smtp import Server, StartServer, magic_link_token
from tests.vectors import VECTOR_ADDRESS, VECTOR_ANCHOR

PASSWORD = "pw-faults-marker"  # PostgreSQL's trust auth ignores it; it must never be shown
REDIS_URL = "redis://127.0.0.1:6379/13"  # a database no other test uses; counters expire
BOOTED_IN_OUTAGE = "the database is unavailable at boot (OperationalError): serving 503s"
GUNICORN = [sys.executable, "-m", "gunicorn", "--config", "config/gunicorn.conf.py"]
HIGH = "email_ip=100000/60,start_ip=100000/60,verify_ip=100000/60"  # load from one address
# Shaped as the broker's ids (token_urlsafe(16)), so its status is looked up in the database.
UNKNOWN_POLL = "/v1/auth/email/status/AAAAAAAAAAAAAAAAAAAAAA"
HIGH_LIMITS = DEFAULT_LIMITS | {
    name: Limit(100000, 60) for name in ("email_ip", "start_ip", "verify_ip")
}


def unavailable(code: str, detail: str) -> dict[str, Any]:
    return {
        "type": f"urn:agentkeys:problem:{code}",
        "title": "Service Unavailable",
        "status": 503,
        "detail": detail,
        "error": code,
    }


DATABASE_DOWN = unavailable(
    "database_unavailable", "The database is unavailable; try again shortly."
)
LIMITS_DOWN = unavailable(
    "limits_unavailable", "The rate-limit store is unavailable; try again shortly."
)
NOT_READY_DATABASE = unavailable("not_ready", "The database is unreachable or not migrated.")
NOT_READY_LIMITS = unavailable("not_ready", "The rate-limit store is unreachable.")


def with_password(url: str) -> str:
    return url.replace("postgres@", f"postgres:{PASSWORD}@", 1)


def unique_email(tag: str) -> str:
    return f"{tag}-{secrets.token_hex(4)}@example.com"


@pytest.fixture
def pg_proxy() -> Iterator[Proxy]:
    with Proxy(5432) as proxy:
        yield proxy


@pytest.fixture
def database_url(postgres_url: str, pg_proxy: Proxy) -> str:
    """make_app's database: this test's own PostgreSQL database, through the proxy."""
    return with_password(pg_proxy.url(postgres_url))


def answer(client: FlaskClient, method: str, path: str, **kwargs: Any) -> tuple[Any, ...]:
    """Status, problem body, Retry-After and content type: what a client sees of an error."""
    response = client.open(path, method=method, **kwargs)
    retry_after = response.headers.get("Retry-After")
    return response.status_code, response.json, retry_after, response.content_type


def warnings_of(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


# --- the database, in process -----------------------------------------------------------------


def test_database_outage_answers_503_and_recovers_alone(
    make_app: MakeApp, pg_proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(rate_limits=HIGH_LIMITS)
    client = app.test_client()
    bearer = bearer_for(app, "outage@example.com")
    listed = client.get("/v1/identities", headers=bearer)
    assert listed.status_code == 200 and listed.json is not None

    pg_proxy.cut()
    caplog.clear()
    caplog.set_level(logging.INFO)
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/v1/identities", {"headers": bearer}),
        ("POST", "/v1/auth/email/request", {"json": {"email": "outage@example.com"}}),
        ("POST", "/v1/auth/email/verify", {"json": {"token": "x" * 43}}),
        ("GET", UNKNOWN_POLL, {"headers": {"Authorization": "Bearer x"}}),
        ("POST", "/v1/auth/wallet/start", {"json": {"address": VECTOR_ADDRESS}}),
        ("POST", "/v1/sessions/revoke", {"headers": bearer}),
        (
            "POST",
            "/dev/derive-address",
            {"json": {"omni_account": VECTOR_ANCHOR}, "headers": bearer},
        ),
    ]
    for method, path, kwargs in calls:
        got = answer(client, method, path, **kwargs)
        assert got == (503, DATABASE_DOWN, "5", "application/problem+json"), path
    assert answer(client, "GET", "/readyz") == (
        503,
        NOT_READY_DATABASE,
        "5",
        "application/problem+json",
    )
    assert client.get("/healthz").json == {"status": "ok"}

    # One warning line per refused request, naming the failure; no traceback, no password.
    lines = warnings_of(caplog, "agentkeys.blueprints.problems")
    assert len(lines) == len(calls)
    for line, (method, path, _) in zip(lines, calls, strict=True):
        # psycopg's error, wrapped by SQLAlchemy or (on a reconnect after a failed pre-ping) not
        wrapped = "sqlalchemy.exc.OperationalError: (psycopg.OperationalError)"
        cause = f"(?:{re.escape(wrapped)}|psycopg.OperationalError:)"
        assert re.match(
            rf"database_unavailable on {method} {path}: {cause} connection failed: ", line
        ), line
        assert "\n" not in line
    assert all(r.exc_info is None and r.levelno < logging.ERROR for r in caplog.records)
    assert PASSWORD not in caplog.text

    pg_proxy.restore()
    assert client.get("/readyz").json == {"status": "ready"}
    again = client.get("/v1/identities", headers=bearer)
    assert (again.status_code, again.json) == (200, listed.json)
    started = client.post("/v1/auth/email/request", json={"email": "outage@example.com"})
    assert started.status_code == 202


def test_a_database_that_never_answers_is_a_503_after_the_connect_timeout(
    make_app: MakeApp, pg_proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    """libpq's own connect timeout is for ever: without make_engine's, this request would hang."""
    app = make_app()
    client = app.test_client()
    bearer = bearer_for(app)
    pg_proxy.hang()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(answer, client, "GET", "/v1/identities", headers=bearer)
        try:
            got = pending.result(timeout=60)  # a liveness bound, 12 times the 5 s timeout
        finally:
            pg_proxy.restore()  # closes the silent connection, should the request still wait
    assert got == (503, DATABASE_DOWN, "5", "application/problem+json")
    (line,) = warnings_of(caplog, "agentkeys.blueprints.problems")
    assert line in (
        "database_unavailable on GET /v1/identities: psycopg.errors.ConnectionTimeout: "
        "connection timeout expired",
        "database_unavailable on GET /v1/identities: sqlalchemy.exc.OperationalError: "
        "(psycopg.errors.ConnectionTimeout) connection timeout expired",
    )
    assert client.get("/v1/identities", headers=bearer).status_code == 200


def test_a_connection_broken_mid_statement_goes_back_to_the_pool_quietly(
    database_url: str, pg_proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection that loses its server mid-statement on a raw cursor (the session
    generation), or just before it goes back: SQLAlchemy's own rollback on return would fail
    and log a traceback; a healthy one is still rolled back."""
    engine = make_engine(database_url)
    raw = engine.raw_connection()
    cursor = raw.cursor()
    backend = cursor.execute("SELECT pg_backend_pid()").fetchone()
    cursor.execute("CREATE TEMP TABLE uncommitted (x int)")
    raw.close()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT pg_backend_pid()")).one() == backend
        assert conn.execute(text("SELECT to_regclass('pg_temp.uncommitted')")).scalar() is None

    raw = engine.raw_connection()
    pg_proxy.cut()
    with pytest.raises(psycopg.OperationalError):
        raw.cursor().execute("SELECT 1")
    raw.close()  # known broken: not rolled back
    pg_proxy.restore()
    raw = engine.raw_connection()
    raw.cursor().execute("SELECT 1")
    pg_proxy.cut()
    raw.close()  # lost just before its return: the rollback fails
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    pg_proxy.restore()
    with engine.connect() as conn:  # the pre-ping replaced the broken connections
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    engine.dispose()


def test_boot_needs_no_database_and_only_a_configuration_error_exits_4(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A worker that raised at boot would exit 3 or 4, and gunicorn's master halts on both."""
    for name in set(os.environ) - set(clean_env()):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AGENTKEYS_ENV", "development")
    monkeypatch.setenv("AGENTKEYS_KEY_ENCRYPTION_KEY", "4b" * 32)
    down = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/none"
    monkeypatch.setenv("DATABASE_URL", down)
    client = app_from_env().test_client()
    assert client.get("/healthz").json == {"status": "ok"}
    assert answer(client, "GET", "/readyz")[:2] == (503, NOT_READY_DATABASE)
    email = {"email": "boot@example.com"}
    assert answer(client, "POST", "/v1/auth/email/request", json=email)[:2] == (
        503,
        DATABASE_DOWN,
    )
    boot = [r.getMessage() for r in caplog.records if r.name == "agentkeys"]
    assert BOOTED_IN_OUTAGE in boot
    assert PASSWORD not in caplog.text

    capsys.readouterr()
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:pw@x:notaport/keys")
    with pytest.raises(SystemExit) as refused:
        app_from_env()
    assert refused.value.code == APP_LOAD_ERROR == 4
    assert capsys.readouterr().err == (
        "agentkeys: configuration error: DATABASE_URL must be sqlite:///path or "
        "postgresql://user:password@host[:port]/database (user and password percent-encoded)\n"
    )


# --- Redis -------------------------------------------------------------------------------------


def test_redis_outage_fails_closed_and_recovers_alone(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    with Proxy(6379) as cache:
        app = make_app(redis_url=cache.url(REDIS_URL), rate_limits=HIGH_LIMITS)
        client = app.test_client()
        bearer = bearer_for(app)
        email = unique_email("limits")
        assert client.post("/v1/auth/email/request", json={"email": email}).status_code == 202
        assert client.get("/readyz").json == {"status": "ready"}

        cache.cut()
        caplog.clear()
        limited = [
            ("POST", "/v1/auth/email/request", {"json": {"email": email}}),
            ("POST", "/v1/auth/email/verify", {"json": {"token": "x" * 43}}),
            ("POST", "/v1/auth/wallet/start", {"json": {"address": VECTOR_ADDRESS}}),
        ]
        for method, path, kwargs in limited:
            got = answer(client, method, path, **kwargs)
            assert got == (503, LIMITS_DOWN, "5", "application/problem+json"), path
        # What no limit guards still works: Redis holds nothing else.
        assert client.get("/v1/identities", headers=bearer).status_code == 200
        ready = answer(client, "GET", "/readyz")
        assert ready == (503, NOT_READY_LIMITS, "5", "application/problem+json")
        lines = warnings_of(caplog, "agentkeys.broker.ratelimit")
        assert len(lines) == len(limited) + 1  # the readiness ping too
        for line in lines:
            assert line.startswith("limits_unavailable: redis.exceptions.ConnectionError: "), line
        assert all(r.exc_info is None for r in caplog.records)

        cache.restore()
        assert client.get("/readyz").json == {"status": "ready"}
        assert client.post("/v1/auth/email/request", json={"email": email}).status_code == 202


# --- gunicorn: boot during an outage, load across a cut ------------------------------------------


def children(pid: int) -> set[int]:
    """The live child processes of `pid`, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rpartition(")")[2].split()[:2]  # the name may hold ") "
        if int(ppid) == pid and state != "Z":
            found.add(int(entry.name))
    return found


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.05)
    raise TimeoutError(what)


def workers_of(master: int, count: int, gone: frozenset[int] = frozenset()) -> set[int]:
    """The master's `count` workers once it has that many, none of them in `gone`."""

    def ready() -> set[int] | None:
        kids = children(master)
        return kids if len(kids) == count and not kids & gone else None

    found: set[int] = wait_for(ready, f"{count} workers of {master}")
    return found


def take_mail(mailbox: Server, address: str, timeout: float = 10) -> str:
    """The magic-link token of the mail to `address` (removed, as other threads read too)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for envelope in list(mailbox.recorder.envelopes):
            if envelope.rcpt_tos == [address]:
                mailbox.recorder.envelopes.remove(envelope)
                assert isinstance(envelope.content, bytes)
                message = email.message_from_bytes(envelope.content, policy=email.policy.default)
                assert isinstance(message, EmailMessage)
                return magic_link_token(message)
        time.sleep(0.02)
    raise TimeoutError(f"no mail to {address}")


@dataclass
class Tally:
    """What load threads saw: answers by status (and error code), and connection failures."""

    seen: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, what: str) -> None:
        with self.lock:
            self.seen[what] += 1

    def count(self, what: str) -> int:
        with self.lock:
            return self.seen[what]


@dataclass
class Load:
    """`threads` threads calling `step` until stopped; what a step raised is kept."""

    step: Callable[[], None]
    threads: int
    stop: threading.Event = field(default_factory=threading.Event)
    failures: list[BaseException] = field(default_factory=list)
    _running: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for _ in range(self.threads):
            thread = threading.Thread(target=self._loop, daemon=True)
            thread.start()
            self._running.append(thread)
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self._running:
            thread.join(timeout=60)

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.step()
            except Exception as exc:  # kept: the test asserts there were none
                self.failures.append(exc)


def kill_instance(master: int) -> None:
    """kill -9 of the master and every worker; stopped first, so it forks no replacement."""
    os.kill(master, signal.SIGSTOP)
    for worker in children(master):
        os.kill(worker, signal.SIGKILL)
    os.kill(master, signal.SIGKILL)


def session_keys(database_url: str) -> int:
    engine = make_engine(database_url)
    with engine.connect() as conn:
        count: int = conn.execute(
            select(func.count()).where(signing_keys.c.purpose == "session")
        ).scalar_one()
    engine.dispose()
    return count


def test_gunicorn_boots_during_an_outage_and_resumes_alone(
    postgres_url: str, smtp_server: StartServer, tmp_path: Path
) -> None:
    """Both workers boot with the database and Redis cut, one is killed and reboots during the
    outage, and the master carries on; then the service resumes by itself, in stages."""
    mailbox = smtp_server()
    port = free_port()
    pidfile, log = tmp_path / "gunicorn.pid", tmp_path / "stderr"
    command = [*GUNICORN, "--bind", f"127.0.0.1:{port}", "--workers", "2", "wsgi:app"]
    assert session_keys(postgres_url) == 0  # migrated, no key yet: development makes them

    def booted_in_outage() -> int:
        return log.read_text().count(BOOTED_IN_OUTAGE)

    with Proxy(5432) as pg, Proxy(6379) as cache:
        env = broker_env(
            f"http://127.0.0.1:{port}",
            with_password(pg.url(postgres_url)),
            mailbox,
            AGENTKEYS_REDIS_URL=cache.url(REDIS_URL),
            AGENTKEYS_RATE_LIMITS=HIGH,
            GUNICORN_CMD_ARGS=f"--pid {pidfile}",
        )
        pg.cut()
        cache.cut()
        with log.open("w") as err, serving(command, env, port, stderr=err) as base:
            broker = Broker(base, mailbox)
            master = int(pidfile.read_text())
            first = workers_of(master, 2)
            wait_for(lambda: booted_in_outage() == 2, "both workers booted")
            poll = broker.get(UNKNOWN_POLL, "x")
            assert (poll.status_code, poll.json(), poll.headers["Retry-After"]) == (
                503,
                DATABASE_DOWN,
                "5",
            )
            limited = broker.post("/v1/auth/email/request", {"email": "boot@example.com"})
            assert (limited.status_code, limited.json()) == (503, LIMITS_DOWN)
            assert broker.get("/readyz").json() == NOT_READY_DATABASE

            # A worker that crashes during the outage is replaced, and its successor boots.
            os.kill(min(first), signal.SIGKILL)
            second = workers_of(master, 2, gone=frozenset({min(first)}))
            wait_for(lambda: booted_in_outage() == 3, "the new worker booted")
            for _ in range(4):
                assert broker.get("/readyz").json() == NOT_READY_DATABASE
            assert broker.get("/healthz").json() == {"status": "ok"}

            # The database returns, then Redis: each is picked up with no restart.
            pg.restore()
            assert broker.get("/readyz").json() == NOT_READY_LIMITS
            poll = broker.get(UNKNOWN_POLL, "x")
            assert (poll.status_code, poll.json()["error"]) == (404, "unknown_request")
            cache.restore()
            assert broker.get("/readyz").json() == {"status": "ready"}
            email = unique_email("resumed")
            status, _ = broker.email_sign_in(email)
            session = status["session_jwt"]
            listed = broker.get("/v1/identities", session).json()
            assert [(i["identity_type"], i["identity_value"]) for i in listed["identities"]] == [
                ("email", email)
            ]

            # Requests in flight when the database goes: 503s, never a 500; then 200s again.
            tally = Tally()

            def list_identities() -> None:
                try:
                    response = broker.get("/v1/identities", session)
                except requests.RequestException:
                    tally.add("no answer")
                    return
                if response.status_code == 200:
                    tally.add("200")
                elif (response.status_code, response.json()) == (503, DATABASE_DOWN):
                    tally.add("503 database_unavailable")
                else:
                    tally.add(f"{response.status_code} {response.text}")

            with Load(list_identities, threads=3) as load:
                wait_for(lambda: tally.count("200") >= 10, "answers before the cut")
                pg.cut()
                wait_for(lambda: tally.count("503 database_unavailable") >= 10, "503s")
                pg.restore()
                resumed = tally.count("200")
                wait_for(lambda: tally.count("200") >= resumed + 10, "answers after the cut")
            assert load.failures == []
            assert set(tally.seen) == {"200", "503 database_unavailable"}, tally.seen
            assert children(master) == second  # no worker died of it
            kill_instance(master)  # quicker than a graceful stop; nothing more to see
    logged = log.read_text()
    assert session_keys(postgres_url) == 1  # made on first use, once
    assert logged.count(BOOTED_IN_OUTAGE) == 3
    assert f"database_unavailable on GET {UNKNOWN_POLL}:" in logged
    assert "limits_unavailable: redis.exceptions.ConnectionError:" in logged
    assert "Worker failed to boot" not in logged and "App failed to load" not in logged
    assert "Traceback" not in logged and "internal_error" not in logged
    assert PASSWORD not in logged
    print(f"outage under load: {dict(tally.seen)}")


# --- kill -9 under load ------------------------------------------------------------------------


@dataclass
class Acknowledged:
    """A verified sign-in the broker answered 2xx for, and the wallet it linked, if it did."""

    email: str
    account: str
    session: str
    wallet: str | None = None


class Abandoned(Exception):
    """A step got no 2xx (the worker died under it): the chain stops there."""


def expect(tally: Tally, send: Callable[[], requests.Response], status: int) -> dict[str, Any]:
    try:
        response = send()
    except requests.RequestException:
        tally.add("no answer")
        raise Abandoned from None
    tally.add(str(response.status_code))
    if response.status_code != status:
        raise Abandoned(response.text)
    body: dict[str, Any] = response.json()
    return body


def sign_in_and_link(broker: Broker, tally: Tally, acked: list[Acknowledged]) -> None:
    """Email sign-in and poll (a session), then a bound SIWE challenge signed by /dev (a linked
    wallet); each acknowledged step is recorded before the next is sent."""
    email = unique_email("load")
    started = expect(tally, lambda: broker.post("/v1/auth/email/request", {"email": email}), 202)
    token = take_mail(broker.mailbox, email)
    expect(tally, lambda: broker.post("/v1/auth/email/verify", {"token": token}), 200)
    status = expect(tally, lambda: broker.get(started["poll_url"], started["poll_token"]), 200)
    session, account = status["session_jwt"], status["account"]
    item = Acknowledged(email, account, session)
    acked.append(item)
    derive = {"omni_account": account}
    address = expect(tally, lambda: broker.post("/dev/derive-address", derive, session), 200)
    wallet = {"address": address["address"]}
    challenge = expect(tally, lambda: broker.post("/v1/auth/wallet/start", wallet, session), 200)
    message = {"omni_account": account, "message_hex": challenge["siwe_message"].encode().hex()}
    signed = expect(tally, lambda: broker.post("/dev/sign-message", message, session), 200)
    proof = {"request_id": challenge["request_id"], "signature": signed["signature"]}
    expect(tally, lambda: broker.post("/v1/auth/wallet/verify", proof), 200)
    item.wallet = address["address"].lower()


def test_kill_9_under_load_loses_nothing_acknowledged(
    postgres_url: str, smtp_server: StartServer, tmp_path: Path
) -> None:
    """Four threads sign in and link wallets against `gunicorn -w 4` on PostgreSQL; one worker
    is killed -9 mid-load, then the whole instance; after a restart every sign-in and link that
    got a 2xx is read back."""
    mailbox = smtp_server()
    port = free_port()
    pidfile = tmp_path / "gunicorn.pid"
    base = f"http://127.0.0.1:{port}"
    env = broker_env(
        base,
        postgres_url,
        mailbox,
        AGENTKEYS_RATE_LIMITS=HIGH,
        GUNICORN_CMD_ARGS=f"--pid {pidfile}",
    )
    broker = Broker(base, mailbox)
    tally, acked = Tally(), list[Acknowledged]()

    def step() -> None:
        with contextlib.suppress(Abandoned):
            sign_in_and_link(broker, tally, acked)

    def linked() -> int:
        return sum(item.wallet is not None for item in list(acked))

    with gunicorn(env, workers=4, port=port):
        master = int(pidfile.read_text())
        victim = min(workers_of(master, 4))
        with Load(step, threads=4) as load:
            wait_for(lambda: linked() >= 8, "wallets linked before the worker kill")
            os.kill(victim, signal.SIGKILL)
            before = linked()
            workers_of(master, 4, gone=frozenset({victim}))  # the master replaced it
            wait_for(lambda: linked() >= before + 8, "wallets linked after the worker kill")
            kill_instance(master)
            load.stop.set()
    assert load.failures == []
    answers = {k: v for k, v in tally.seen.items() if k != "no answer"}
    assert set(answers) == {"200", "202"}, tally.seen  # only the kills broke chains

    # The instance again, on the same port and database (two workers: only reads are left).
    command = [*GUNICORN, "--bind", f"127.0.0.1:{port}", "--workers", "2", "wsgi:app"]
    with serving(command, env, port, stderr=subprocess.DEVNULL):
        checked = 0
        for item in acked:
            listed = broker.get("/v1/identities", item.session)
            assert listed.status_code == 200, (item, listed.text)
            body = listed.json()
            assert body["account"] == item.account
            found = {
                (i["identity_type"], i["identity_value"], i["status"]) for i in body["identities"]
            }
            assert ("email", item.email, "linked") in found
            if item.wallet is not None:
                assert ("evm", item.wallet, "linked") in found
            checked += 1
        kill_instance(int(pidfile.read_text()))
    assert checked == len(acked) >= 16
    print(
        f"kill -9: {len(acked)} sign-ins and {linked()} wallet links acknowledged, all read back "
        f"after the restart; {tally.seen['no answer']} requests got no answer; {dict(tally.seen)}"
    )
