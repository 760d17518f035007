"""The README's run command on a copy of the checkout: a newcomer's first sign-in.

It makes a 0600 master secret and key-encryption key on first run, keeps instance/ private,
migrates SQLite there with sealed signing keys, prints the sign-in mail to the console, and the
session from that mail gets the account's wallet address. PORT moves the whole service.
"""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from agentkeys.crypto import derive_wallet, omni
from tests.live import bin_dev, checkout_copy, clean_env, run_bounded

EMAIL = "newcomer@example.com"


def sign_in_and_derive(repo: Path) -> str:
    """Run bin/dev, sign in by email through the console mail, derive the account's address."""
    with bin_dev(repo) as run:
        base = run.base
        started = requests.post(base + "/v1/auth/email/request", json={"email": EMAIL}, timeout=10)
        assert started.status_code == 202, started.text
        token = run.magic_link().split("#t=", 1)[1]
        verified = requests.post(base + "/v1/auth/email/verify", json={"token": token}, timeout=10)
        assert verified.json() == {"ok": True, "user_code": started.json()["user_code"]}
        status = requests.get(
            base + started.json()["poll_url"],
            headers={"Authorization": f"Bearer {started.json()['poll_token']}"},
            timeout=10,
        ).json()
        assert status["status"] == "verified" and status["account"] == omni("email", EMAIL)
        response = requests.post(
            base + "/dev/derive-address",
            json={"omni_account": status["account"]},
            headers={"Authorization": f"Bearer {status['session_jwt']}"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        address: str = response.json()["address"]
        return address


def signing_keys(database: Path) -> dict[str, tuple[str, int]]:
    """kid -> (purpose, sealed) of every signing key in a SQLite database."""
    with sqlite3.connect(database) as conn:
        rows = conn.execute("SELECT kid, purpose, sealed FROM signing_keys").fetchall()
    return {kid: (purpose, sealed) for kid, purpose, sealed in rows}


def test_bin_dev_first_sign_in(tmp_path: Path) -> None:
    repo = checkout_copy(tmp_path / "main")
    address = sign_in_and_derive(repo)

    secret_file = repo / "instance" / "dev-master-secret"
    kek_file = repo / "instance" / "dev-key-encryption-key"
    assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
    master = bytes.fromhex(secret_file.read_text().strip())
    assert len(master) == 32
    assert address == derive_wallet(master, omni("email", EMAIL)).address
    assert (repo / "instance" / "agentkeys.sqlite3").exists()
    kek = kek_file.read_text()

    # A second run keeps both secrets and the database: the same person gets the same wallet.
    assert sign_in_and_derive(repo) == address
    assert bytes.fromhex(secret_file.read_text().strip()) == master
    assert kek_file.read_text() == kek


def leave_an_older_instance(repo: Path) -> dict[str, tuple[str, int]]:
    """What bin/dev left before instance/ was private: world-readable files, and signing keys
    stored unsealed because no key-encryption key was set."""
    instance = repo / "instance"
    instance.mkdir(mode=0o755)
    (instance / "dev-master-secret").write_text("ab" * 32 + "\n")
    (instance / "dev-master-secret").chmod(0o644)
    subprocess.run(
        [sys.executable, "-m", "agentkeys.release"],
        cwd=repo,
        env=clean_env(AGENTKEYS_ENV="development"),
        check=True,
        capture_output=True,
        umask=0o022,
    )
    database = instance / "agentkeys.sqlite3"
    assert stat.S_IMODE(database.stat().st_mode) == 0o644
    keys = signing_keys(database)
    assert keys and all(sealed == 0 for _, sealed in keys.values())
    return keys


@pytest.mark.parametrize("older", [False, True], ids=["fresh", "older-instance"])
def test_bin_dev_instance_is_private(tmp_path: Path, older: bool) -> None:
    repo = checkout_copy(tmp_path / "main")
    instance = repo / "instance"
    before = leave_an_older_instance(repo) if older else {}
    with bin_dev(repo, umask=0o022) as run:
        started = requests.post(
            run.base + "/v1/auth/email/request", json={"email": EMAIL}, timeout=10
        )
        assert started.status_code == 202, started.text
        run.magic_link()
        modes = {
            path.name: (path.is_dir(), stat.S_IMODE(path.lstat().st_mode))
            for path in [instance, *instance.rglob("*")]
        }
    # The database's WAL and shared-memory files exist while it serves: check them too.
    assert {"agentkeys.sqlite3", "agentkeys.sqlite3-wal", "agentkeys.sqlite3-shm"} <= set(modes)
    assert {"dev-master-secret", "dev-key-encryption-key"} <= set(modes)
    loose = {name: oct(mode) for name, (is_dir, mode) in modes.items() if mode & 0o077}
    assert not loose, loose
    assert all(mode == (0o700 if is_dir else 0o600) for is_dir, mode in modes.values()), modes

    kek = (instance / "dev-key-encryption-key").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", kek)
    keys = signing_keys(instance / "agentkeys.sqlite3")
    assert {purpose for purpose, _ in keys.values()} == {"session", "oidc"}
    assert all(sealed == 1 for _, sealed in keys.values()), keys
    if older:
        assert set(keys) == set(before)  # the same keys, sealed in place: tokens stay valid


def test_bin_dev_follows_port(tmp_path: Path) -> None:
    repo = checkout_copy(tmp_path / "main")
    with bin_dev(repo) as run:
        discovery = requests.get(run.base + "/.well-known/openid-configuration", timeout=10)
        assert discovery.json()["issuer"] == run.base
        assert discovery.json()["jwks_uri"].startswith(run.base + "/")
        started = requests.post(
            run.base + "/v1/auth/email/request", json={"email": EMAIL}, timeout=10
        )
        assert started.status_code == 202, started.text
        assert run.magic_link().startswith(run.base + "/auth/email/landing#t=")
        challenge = requests.post(
            run.base + "/v1/auth/wallet/start", json={"address": "0x" + "11" * 20}, timeout=10
        )
        assert challenge.status_code == 200, challenge.text
        first_line = challenge.json()["siwe_message"].splitlines()[0]
        assert first_line.startswith(f"127.0.0.1:{run.port} wants you to sign in")

        # Once it is up, it says where the mails appear and what to run next, on this port.
        up = run.stderr_line("Running on")
        mails = run.stderr_line("sign-in mails")
        curl = run.stderr_line(f"curl -s {run.base}/v1/auth/email/request")
        assert up < mails < curl
        assert "this terminal" in run.stderr[mails]


def test_bin_dev_keeps_a_given_issuer(tmp_path: Path) -> None:
    repo = checkout_copy(tmp_path / "main")
    with bin_dev(repo, AGENTKEYS_ISSUER="http://localhost:8123") as run:
        discovery = requests.get(run.base + "/.well-known/openid-configuration", timeout=10)
        assert discovery.json()["issuer"] == "http://localhost:8123"


@pytest.mark.parametrize("script", ["dev", "test"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_bin_help_runs_nothing(tmp_path: Path, script: str, flag: str) -> None:
    repo = checkout_copy(tmp_path / "main", venv=False)
    result = run_bounded([f"bin/{script}", flag], cwd=repo, env=clean_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: bin/{script}"), result.stdout
    assert result.stderr == ""
    if script == "test":
        assert "pytest" in result.stdout
    else:
        assert "PORT" in result.stdout
    # Nothing ran: no venv was made, no server or release step touched instance/.
    assert not (repo / ".venv").exists() and not (repo / "instance").exists()
