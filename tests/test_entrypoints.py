"""The real entry points: gunicorn (Procfile web), the release step, the import rules."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from agentkeys.broker.db import make_engine, signing_keys
from agentkeys.broker.factory import create_app
from agentkeys.settings import Settings
from tests.conftest import BASE_SETTINGS, bearer_for_account, services_of
from tests.live import (
    ROOT,
    clean_env,
    free_port,
    gunicorn,
    release,
    run_bounded,
    serving,
    wait_until_up,
)
from tests.vectors import VECTOR_ADDRESS, VECTOR_ANCHOR, VECTOR_MASTER

GUNICORN = [sys.executable, "-m", "gunicorn", "--config", "config/gunicorn.conf.py", "wsgi:app"]
DEV = {"AGENTKEYS_ENV": "development"}
KEK = "5e" * 32
PROD = {
    "AGENTKEYS_ISSUER": "https://keys.example.com",
    "AGENTKEYS_MAIL_URL": "smtp://mx:25",
    "AGENTKEYS_KEY_ENCRYPTION_KEY": KEK,
}
BAD_SECRET = "ab" * 31 + "zz"


def test_gunicorn_serves_vector_address(tmp_path: Path) -> None:
    """Keys live in the database: a session minted by another process verifies in every worker."""
    env = clean_env(
        **DEV,
        DEV_KEY_SERVICE_MASTER_SECRET=VECTOR_MASTER.hex(),
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        AGENTKEYS_KEY_ENCRYPTION_KEY=KEK,
    )
    with gunicorn(env) as base:
        assert requests.get(base + "/healthz", timeout=5).json() == {"status": "ok"}
        assert requests.get(base + "/readyz", timeout=5).json() == {"status": "ready"}
        app = create_app(Settings.from_env(env))
        headers = bearer_for_account(app, VECTOR_ANCHOR)
        for _ in range(4):  # reach both workers
            response = requests.post(
                base + "/dev/derive-address",
                json={"omni_account": VECTOR_ANCHOR},
                headers=headers,
                timeout=5,
            )
            assert response.json() == {"address": VECTOR_ADDRESS, "key_version": 1}
        services_of(app).engine.dispose()


def test_readyz_reports_unmigrated_database(tmp_path: Path) -> None:
    app = create_app(
        dataclasses.replace(BASE_SETTINGS, database_url=f"sqlite:///{tmp_path / 'empty.db'}")
    )
    response = app.test_client().get("/readyz")
    assert response.status_code == 503 and response.json is not None
    assert response.json["error"] == "not_ready"


def test_gunicorn_without_secret_answers_503(tmp_path: Path) -> None:
    env = clean_env(**DEV, DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}")
    with gunicorn(env) as base:
        response = requests.post(base + "/dev/sign-message", json={}, timeout=5)
        assert response.status_code == 503
        assert response.headers["Content-Type"] == "application/problem+json"
        assert "DEV_KEY_SERVICE_MASTER_SECRET" in response.json()["detail"]


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        (
            {**DEV, "DEV_KEY_SERVICE_MASTER_SECRET": BAD_SECRET},
            "DEV_KEY_SERVICE_MASTER_SECRET must",
        ),
        ({**PROD, "DEV_KEY_SERVICE_MASTER_SECRET": "0x" + "ab" * 32}, "production builds reject"),
        ({}, "AGENTKEYS_ISSUER is required in production"),
    ],
    ids=["malformed-secret", "production-secret", "production-no-issuer"],
)
@pytest.mark.parametrize(
    "command",
    [
        GUNICORN,
        [sys.executable, "-m", "agentkeys.release"],
        [sys.executable, "-m", "flask", "--app", "app", "routes"],
    ],
    ids=["gunicorn", "release", "flask"],
)
def test_refuses_to_start(command: list[str], env: dict[str, str], needle: str) -> None:
    result = subprocess.run(
        command, cwd=ROOT, env=clean_env(**env), capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert lines[0].startswith("agentkeys: configuration error: ")
    assert "ab" * 31 not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({**DEV, "DEV_KEY_SERVICE_MASTER_SECRET": BAD_SECRET}, "DEV_KEY_SERVICE_MASTER_SECRET"),
        (
            {**PROD, "DEV_KEY_SERVICE_MASTER_SECRET": "0x" + "ab" * 32},
            "DEV_KEY_SERVICE_MASTER_SECRET",
        ),
        ({}, "AGENTKEYS_ISSUER"),
    ],
    ids=["malformed-secret", "production-secret", "production-no-issuer"],
)
def test_plain_gunicorn_exits_on_bad_configuration(env: dict[str, str], variable: str) -> None:
    """`gunicorn wsgi:app` with no config file: the master only learns of the bad configuration
    from its worker, which must make it halt rather than respawn the worker forever."""
    command = [sys.executable, "-m", "gunicorn", "wsgi:app", "--bind", f"127.0.0.1:{free_port()}"]
    result = run_bounded(command, cwd=ROOT, env=clean_env(**env), timeout=20)
    assert result.returncode != 0
    naming = [line for line in result.stderr.splitlines() if variable in line]
    assert len(naming) == 1, result.stderr
    assert naming[0].startswith("agentkeys: configuration error: "), result.stderr
    assert "ab" * 31 not in result.stderr + result.stdout


@pytest.mark.parametrize("arguments", [["--help"], ["-h"], ["--no-such-option"]])
def test_release_arguments_touch_no_database(tmp_path: Path, arguments: list[str]) -> None:
    database = tmp_path / "db.sqlite3"
    result = run_release(clean_env(**DEV, DATABASE_URL=f"sqlite:///{database}"), *arguments)
    if arguments[0].startswith("--no"):
        assert result.returncode == 2 and "usage: python -m agentkeys.release" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: python -m agentkeys.release")
        assert "AGENTKEYS_KEY_ENCRYPTION_KEY" in result.stdout
    assert not database.exists()


def run_release(env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "agentkeys.release", *arguments]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_release_seals_keys_stored_unsealed(tmp_path: Path) -> None:
    """A development database made without a key-encryption key gets its keys sealed in place
    once one is set: the same kids, so the tokens they signed stay valid."""
    database = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    release(clean_env(**DEV, DATABASE_URL=database))
    engine = make_engine(database)
    with engine.connect() as conn:
        before = dict(conn.execute(select(signing_keys.c.kid, signing_keys.c.public_jwk)).all())
        assert conn.execute(select(signing_keys.c.sealed)).scalars().all() == [0, 0]
    env = clean_env(**DEV, DATABASE_URL=database, AGENTKEYS_KEY_ENCRYPTION_KEY=KEK)
    result = run_release(env)
    assert result.returncode == 0, result.stderr
    assert "sealed 2 signing keys" in result.stdout
    with engine.connect() as conn:
        rows = conn.execute(select(signing_keys)).all()
    engine.dispose()
    assert {row.kid: row.public_jwk for row in rows} == before
    assert all(row.sealed == 1 and b"\x30\x81" not in row.private_key[:16] for row in rows)
    # The sealed keys open under the KEK and still sign; a second release has nothing to seal.
    app = create_app(Settings.from_env(env))
    assert services_of(app).session_keys.signing_key().kid in before
    services_of(app).engine.dispose()
    again = run_release(env)
    assert again.returncode == 0 and "sealed" not in again.stdout, again.stderr


def test_release_accepts_valid_production(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    result = run_release(clean_env(**PROD, DATABASE_URL=database))
    assert result.returncode == 0, result.stderr
    assert "configuration ok (AGENTKEYS_ENV=production)" in result.stdout
    assert "database migrated; signing keys present" in result.stdout
    # Production keys are sealed under the KEK: no PKCS#8 plaintext in the database.
    with make_engine(database).connect() as conn:
        rows = conn.execute(select(signing_keys.c.sealed, signing_keys.c.private_key)).all()
    assert rows and all(row.sealed == 1 and b"\x30\x81" not in row.private_key[:16] for row in rows)


def test_procfile_process_types() -> None:
    lines = dict(
        line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line
    )
    assert lines["web"] == "gunicorn --config config/gunicorn.conf.py wsgi:app"
    assert lines["release"] == "python -m agentkeys.release"
    assert lines["tee"] == "gunicorn --config config/tee.gunicorn.conf.py agentkeys.tee.wsgi:app"


def test_pure_modules_import_no_flask() -> None:
    """The core stays plain Python: only blueprints and the factory import Flask."""
    code = (
        "import sys\n"
        "import agentkeys, agentkeys.crypto, agentkeys.siwe, agentkeys.signer\n"
        "import agentkeys.settings, agentkeys.broker.dev_key_service, agentkeys.errors\n"
        "leaked = sorted(m for m in ('flask', 'werkzeug', 'requests') if m in sys.modules)\n"
        "print(leaked)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stderr


def test_access_log_has_paths_but_no_query_strings(tmp_path: Path) -> None:
    env = clean_env(**DEV, DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}")
    log = tmp_path / "access.log"
    port = free_port()
    command = [
        *GUNICORN[:-1],
        "--bind",
        f"127.0.0.1:{port}",
        "--access-logfile",
        str(log),
        "wsgi:app",
    ]
    release(env)
    with subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.DEVNULL) as server:
        try:
            wait_until_up(f"http://127.0.0.1:{port}/healthz", server)
            secret = "oauth-code-" + "7" * 20
            requests.get(
                f"http://127.0.0.1:{port}/auth/oauth2/callback?code={secret}&state=s", timeout=5
            )
        finally:
            server.terminate()
            server.wait(timeout=30)
    lines = log.read_text()
    assert '"GET /auth/oauth2/callback HTTP/1.1" 400' in lines
    assert secret not in lines and "state=" not in lines


@pytest.mark.parametrize("how", [["--debug"], []])
def test_the_debugger_is_refused_outside_development(tmp_path: Path, how: list[str]) -> None:
    """werkzeug's debugger is a Python console in the browser: production refuses it, by the
    flag or by FLASK_DEBUG; development still has it."""
    database = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    assert run_release(clean_env(**PROD, DATABASE_URL=database)).returncode == 0
    port = free_port()
    command = [sys.executable, "-m", "flask", "--app", "app", *how, "run", "--port", str(port)]
    debug = {} if how else {"FLASK_DEBUG": "1"}
    refused = subprocess.run(
        command,
        cwd=ROOT,
        env=clean_env(**PROD, DATABASE_URL=database, **debug),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 4
    assert (
        "agentkeys: configuration error: the debugger (FLASK_DEBUG, flask --debug) is refused "
        "in production"
    ) in refused.stderr.splitlines()
    dev = clean_env(**DEV, DATABASE_URL=database, AGENTKEYS_KEY_ENCRYPTION_KEY=KEK, **debug)
    with serving(command, dev, port, stderr=subprocess.PIPE) as base:
        assert requests.get(base + "/healthz", timeout=10).json() == {"status": "ok"}
