"""The real entry points: gunicorn (Procfile web), the release step, the import rules."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from tests.live import ROOT, clean_env, gunicorn
from tests.vectors import VECTOR_ADDRESS, VECTOR_ANCHOR, VECTOR_MASTER

GUNICORN = [sys.executable, "-m", "gunicorn", "--config", "config/gunicorn.conf.py", "wsgi:app"]
DEV = {"AGENTKEYS_ENV": "development"}
PROD = {"AGENTKEYS_ISSUER": "https://keys.example.com", "AGENTKEYS_MAIL_URL": "smtp://mx:25"}
BAD_SECRET = "ab" * 31 + "zz"


def test_gunicorn_serves_vector_address(tmp_path) -> None:
    env = clean_env(**DEV, DEV_KEY_SERVICE_MASTER_SECRET=VECTOR_MASTER.hex())
    with gunicorn(env) as base:
        assert requests.get(base + "/healthz", timeout=5).json() == {"status": "ok"}
        assert requests.get(base + "/readyz", timeout=5).json() == {"status": "ready"}
        for _ in range(4):  # reach both workers
            response = requests.post(
                base + "/dev/derive-address", json={"omni_account": VECTOR_ANCHOR}, timeout=5
            )
            assert response.json() == {"address": VECTOR_ADDRESS, "key_version": 1}


def test_gunicorn_without_secret_answers_503() -> None:
    with gunicorn(clean_env(**DEV)) as base:
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


def test_release_accepts_valid_production() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agentkeys.release"],
        cwd=ROOT,
        env=clean_env(**PROD),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "configuration ok (AGENTKEYS_ENV=production)" in result.stdout


def test_procfile_process_types() -> None:
    lines = dict(
        line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line
    )
    assert lines["web"] == "gunicorn --config config/gunicorn.conf.py wsgi:app"
    assert lines["release"] == "python -m agentkeys.release"


def test_pure_modules_import_no_flask() -> None:
    """The core stays plain Python: only blueprints and the factory import Flask."""
    code = (
        "import sys\n"
        "import agentkeys, agentkeys.crypto, agentkeys.siwe, agentkeys.signer\n"
        "import agentkeys.settings, agentkeys.dev_key_service, agentkeys.errors\n"
        "leaked = sorted(m for m in ('flask', 'werkzeug', 'requests') if m in sys.modules)\n"
        "print(leaked)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stderr
