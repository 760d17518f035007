"""The README's run command on a copy of the checkout: a newcomer's first sign-in.

It makes a 0600 master secret on first run, migrates SQLite in instance/, prints the sign-in
mail to the console, and the session from that mail gets the account's wallet address.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import requests

from agentkeys.crypto import derive_wallet, omni
from tests.live import ROOT, clean_env, free_port, wait_until_up

EMAIL = "newcomer@example.com"


def checkout_copy(target: Path) -> Path:
    """The files git would hand a newcomer, with this checkout's installed .venv.

    bin/setup runs here first, so the copy finds the venv up to date and never reinstalls the
    shared venv from its temporary folder.
    """
    subprocess.run(["bash", "-c", "source bin/setup"], cwd=ROOT, check=True)
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    (target / ".venv").symlink_to(ROOT / ".venv")
    return target


def sign_in_and_derive(repo: Path) -> str:
    """Run bin/dev, sign in by email through the console mail, derive the account's address."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = clean_env(PORT=str(port), PYTHONUNBUFFERED="1")
    with subprocess.Popen(
        [str(repo / "bin" / "dev")], cwd=repo, env=env, stdout=subprocess.PIPE, text=True
    ) as process:
        lines: queue.Queue[str] = queue.Queue()
        assert process.stdout is not None
        stdout = process.stdout

        def pump() -> None:
            for line in stdout:
                lines.put(line)

        threading.Thread(target=pump, daemon=True).start()
        try:
            wait_until_up(base + "/healthz", process)
            started = requests.post(
                base + "/v1/auth/email/request", json={"email": EMAIL}, timeout=10
            )
            assert started.status_code == 202, started.text
            token = None
            while token is None:
                match = re.search(r"/auth/email/landing#t=([A-Za-z0-9_-]+)", lines.get(timeout=10))
                token = match and match.group(1)
            verified = requests.post(
                base + "/v1/auth/email/verify", json={"token": token}, timeout=10
            )
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
        finally:
            process.terminate()
            process.wait(timeout=30)


def test_bin_dev_first_sign_in(tmp_path: Path) -> None:
    repo = checkout_copy(tmp_path / "main")
    address = sign_in_and_derive(repo)

    secret_file = repo / "instance" / "dev-master-secret"
    assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
    master = bytes.fromhex(secret_file.read_text().strip())
    assert len(master) == 32
    assert address == derive_wallet(master, omni("email", EMAIL)).address
    assert (repo / "instance" / "agentkeys.sqlite3").exists()

    # A second run keeps the secret and the database: the same person gets the same wallet.
    assert sign_in_and_derive(repo) == address
    assert bytes.fromhex(secret_file.read_text().strip()) == master
