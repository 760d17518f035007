"""No password from DATABASE_URL, AGENTKEYS_MAIL_URL or AGENTKEYS_REDIS_URL in any log line or
error (in process and from the real entry points), and no query string in `flask run`'s
request log. Each test provokes the failure for real: closed ports, the real PostgreSQL and
Redis on loopback, a real SMTP server that refuses the login."""

from __future__ import annotations

import dataclasses
import logging
import re
import socket
import subprocess
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from aiosmtpd.smtp import AuthResult

from agentkeys.broker.db import make_engine
from agentkeys.broker.factory import create_app
from agentkeys.errors import ConfigError
from tests.conftest import BASE_SETTINGS, MakeApp, services_of
from tests.live import ROOT, clean_env, free_port, serving
from tests.smtp import StartServer
from tests.test_mail import accept_only

PASSWORD = "pw-s3cr3t-marker"
MAIL_USER = "mailer"
PG = "127.0.0.1:5432"  # the real PostgreSQL; trust auth accepts any password
REDIS = "127.0.0.1:6379"  # the real Redis; its default user has no password and accepts any
DEV = {"AGENTKEYS_ENV": "development"}
GUNICORN = [sys.executable, "-m", "gunicorn", "--config", "config/gunicorn.conf.py"]


def log_everything(caplog: pytest.LogCaptureFixture) -> None:
    """Capture every logger at DEBUG (SQLAlchemy's set WARNING on themselves)."""
    for name in [None, *logging.root.manager.loggerDict]:
        caplog.set_level(logging.DEBUG, logger=name)


def shown(error: BaseException) -> str:
    """All an error can show: its chain of messages and the traceback."""
    return "".join(traceback.format_exception(error))


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90, check=False
    )


# --- DATABASE_URL ---------------------------------------------------------------------------

BROKEN_DATABASES = {
    "closed-port": lambda: f"postgresql://app:{PASSWORD}@127.0.0.1:{free_port()}/keys",
    "unknown-role": lambda: f"postgresql://nobody_here:{PASSWORD}@{PG}/postgres",
    "unknown-database": lambda: f"postgres://postgres:{PASSWORD}@{PG}/no_such_database",
}


@pytest.mark.parametrize("kind", BROKEN_DATABASES)
def test_database_errors_show_no_password(
    kind: str, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Development boots without its database (it is an outage) and answers 503s meanwhile."""
    log_everything(caplog)
    settings = dataclasses.replace(BASE_SETTINGS, database_url=BROKEN_DATABASES[kind]())
    app = create_app(settings, instance_path=str(tmp_path))
    client = app.test_client()
    response = client.post("/v1/auth/email/request", json={"email": "alice@example.com"})
    assert response.status_code == 503 and response.json is not None
    assert response.json["error"] == "database_unavailable"
    assert client.get("/readyz").status_code == 503
    assert "OperationalError" in caplog.text  # the warning names the class
    assert PASSWORD not in caplog.text + response.get_data(as_text=True)
    services_of(app).engine.dispose()


@pytest.mark.parametrize("kind", BROKEN_DATABASES)
def test_the_release_step_shows_no_database_password(kind: str) -> None:
    result = run(
        [sys.executable, "-m", "agentkeys.release"],
        clean_env(**DEV, DATABASE_URL=BROKEN_DATABASES[kind]()),
    )
    assert result.returncode != 0
    assert result.stderr == "agentkeys: database error: OperationalError\n"
    assert PASSWORD not in result.stdout + result.stderr


@pytest.mark.parametrize("kind", BROKEN_DATABASES)
@pytest.mark.parametrize("server", ["flask", "gunicorn"])
def test_servers_up_without_their_database_show_no_password(
    kind: str, server: str, tmp_path: Path
) -> None:
    """A server started during an outage comes up, answers 503 and logs no password."""
    port = free_port()
    if server == "flask":
        command = [sys.executable, "-m", "flask", "--app", "app", "run", "--port", str(port)]
    else:
        command = [*GUNICORN, "--log-level", "debug", "--workers", "1"]
        command += ["--bind", f"127.0.0.1:{port}", "wsgi:app"]
    env = clean_env(**DEV, DATABASE_URL=BROKEN_DATABASES[kind]())
    log = tmp_path / "server.log"
    with log.open("w") as out, serving(command, env, port, stdout=out, stderr=out) as base:
        ready = requests.get(base + "/readyz", timeout=30)
        refused = requests.post(
            base + "/v1/auth/email/request", json={"email": "alice@example.com"}, timeout=30
        )
    assert ready.status_code == 503 and ready.json()["error"] == "not_ready"
    assert refused.status_code == 503 and refused.json()["error"] == "database_unavailable"
    shown = log.read_text()
    assert "OperationalError" in shown  # the outage was logged…
    assert PASSWORD not in shown + ready.text + refused.text  # …without the password


@pytest.mark.parametrize(
    "url",
    [
        # An unencoded "@" in the password: the rest would become the host name, which
        # SQLAlchemy's URL repr and psycopg's "failed to resolve host" message show.
        f"postgresql://app:pw@{PASSWORD}@{PG}/keys",
        # ... or the port, which int() quotes.
        f"postgresql://app:pw@x:{PASSWORD}@{PG}/keys",
    ],
)
def test_malformed_database_url_refused_without_echo(url: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        make_engine(url)
    assert "DATABASE_URL" in info.value.detail and PASSWORD not in shown(info.value)
    result = run(
        [sys.executable, "-m", "flask", "--app", "app", "routes"],
        clean_env(**DEV, DATABASE_URL=url),
    )
    assert result.returncode != 0 and PASSWORD not in result.stdout + result.stderr
    assert result.stderr.startswith("agentkeys: configuration error: DATABASE_URL")


# --- AGENTKEYS_REDIS_URL ------------------------------------------------------------------


BROKEN_REDIS = {
    "closed-port": lambda: f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/15",
    "wrong-user": lambda: f"redis://nobody:{PASSWORD}@{REDIS}/15",
}


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("closed-port", "redis.exceptions.ConnectionError"),
        ("wrong-user", "redis.exceptions.AuthenticationError"),
    ],
)
def test_redis_errors_show_no_password(
    kind: str, error: str, make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    log_everything(caplog)
    client = make_app(redis_url=BROKEN_REDIS[kind]()).test_client()
    response = client.post("/v1/auth/email/request", json={"email": "alice@example.com"})
    assert response.status_code == 503 and response.json is not None
    assert response.json["error"] == "limits_unavailable"  # fail closed, never a 500
    assert error.rsplit(".", 1)[1] in caplog.text  # the warning names the class
    assert PASSWORD not in caplog.text + response.get_data(as_text=True)


def test_malformed_redis_url_refused_without_echo(make_app: MakeApp) -> None:
    # An unencoded "/" ends urllib's netloc: the password's start would be quoted as a port.
    with pytest.raises(ConfigError) as info:
        make_app(redis_url=f"redis://:{PASSWORD}/x@{REDIS}/15")
    assert "AGENTKEYS_REDIS_URL" in info.value.detail and PASSWORD not in shown(info.value)


# --- AGENTKEYS_MAIL_URL -------------------------------------------------------------------


def refuse_everyone(*_: Any) -> AuthResult:
    return AuthResult(success=False, handled=False)  # aiosmtpd replies 535


@pytest.mark.parametrize(
    ("login", "status"),
    [("accepted", 202), ("refused", 503), ("closed-port", 503)],
)
def test_mail_logs_show_no_password(
    login: str,
    status: int,
    smtp_server: StartServer,
    make_app: MakeApp,
    caplog: pytest.LogCaptureFixture,
) -> None:
    authenticator = accept_only(MAIL_USER, PASSWORD) if login == "accepted" else refuse_everyone
    server = smtp_server(authenticator=authenticator, auth_require_tls=False)
    port = free_port() if login == "closed-port" else server.port
    log_everything(caplog)
    client = make_app(mail_url=f"smtp://{MAIL_USER}:{PASSWORD}@127.0.0.1:{port}").test_client()
    response = client.post("/v1/auth/email/request", json={"email": "alice@example.com"})
    assert response.status_code == status
    assert server.recorder.authenticated == ([True] if login == "accepted" else [])
    assert "sends the SMTP password unencrypted" in caplog.text
    assert PASSWORD not in caplog.text + response.get_data(as_text=True)


# --- every URL with a password --------------------------------------------------------------


def test_services_repr_shows_no_password(postgres_url: str, tmp_path: Path) -> None:
    settings = dataclasses.replace(
        BASE_SETTINGS,
        database_url=postgres_url.replace("postgres@", f"postgres:{PASSWORD}@", 1),
        mail_url=f"smtp+starttls://{MAIL_USER}:{PASSWORD}@127.0.0.1:587",
        redis_url=f"redis://:{PASSWORD}@{REDIS}/15",
    )
    services = services_of(create_app(settings, instance_path=str(tmp_path)))
    shown = repr(services)  # the settings, the engine, the stores, ...
    services.engine.dispose()
    assert "postgres:***@" in shown and "smtp+starttls://mailer:***@" in shown
    assert "redis://:***@" in shown and PASSWORD not in shown


# --- the real processes, every URL with a password -----------------------------------------


@contextmanager
def logged(command: list[str], env: dict[str, str], port: int, logs: Path) -> Iterator[str]:
    """Run a server on 127.0.0.1:port with its stdout and stderr in files under `logs`."""
    with (
        (logs / "stdout").open("w") as out,
        (logs / "stderr").open("w") as err,
        serving(command, env, port, stdout=out, stderr=err) as base,
    ):
        yield base


def test_gunicorn_logs_show_no_url_password(
    postgres_url: str, smtp_server: StartServer, tmp_path: Path
) -> None:
    mailbox = smtp_server(authenticator=refuse_everyone, auth_require_tls=False)
    env = clean_env(
        **DEV,
        DATABASE_URL=postgres_url.replace("postgres@", f"postgres:{PASSWORD}@", 1),
        AGENTKEYS_MAIL_URL=f"smtp://{MAIL_USER}:{PASSWORD}@127.0.0.1:{mailbox.port}",
        AGENTKEYS_REDIS_URL=f"redis://:{PASSWORD}@{REDIS}/15",
    )
    released = run([sys.executable, "-m", "agentkeys.release"], env)
    assert released.returncode == 0, released.stderr
    port = free_port()
    command = [*GUNICORN, "--log-level", "debug", "--bind", f"127.0.0.1:{port}", "wsgi:app"]
    with logged(command, env, port, tmp_path) as base:
        assert requests.get(base + "/readyz", timeout=5).status_code == 200
        response = requests.post(
            base + "/v1/auth/email/request", json={"email": "hygiene@example.com"}, timeout=15
        )
        assert response.status_code == 503 and response.json()["error"] == "mail_failed"
    out, err = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert "Booting worker" in err and "sends the SMTP password unencrypted" in err
    assert '"POST /v1/auth/email/request HTTP/1.1" 503' in out
    assert PASSWORD not in released.stdout + released.stderr + out + err


# --- flask run's request log --------------------------------------------------------------


def test_flask_run_request_log_has_paths_but_no_query_strings(tmp_path: Path) -> None:
    env = clean_env(**DEV, DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}")
    assert run([sys.executable, "-m", "agentkeys.release"], env).returncode == 0
    port = free_port()
    command = [sys.executable, "-m", "flask", "--app", "app", "run", "--port", str(port)]
    with logged(command, env, port, tmp_path) as base:
        callback = "/auth/oauth2/callback?code=CODE-marker&state=STATE-marker"
        assert requests.get(base + callback, timeout=5).status_code == 400
        assert requests.get(base + "/healthz?x=1", timeout=5).status_code == 200
        # A request line werkzeug cannot parse is logged twice: an error quoting it, the line.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(b"GET /healthz?code=CODE-marker junk HTTP/1.1\r\n\r\n")
            assert b" 400 " in raw.recv(4096)
    err = re.sub(r"\x1b\[[0-9;]*m", "", (tmp_path / "stderr").read_text())  # werkzeug's colours
    assert '"GET /auth/oauth2/callback HTTP/1.1" 400 -' in err
    assert '"GET /healthz HTTP/1.1" 200 -' in err
    assert "Bad request syntax ('GET /healthz junk HTTP/1.1')" in err
    assert "CODE-marker" not in err and "STATE-marker" not in err and "x=1" not in err
