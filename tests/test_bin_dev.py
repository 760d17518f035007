"""The README's run command on a copy of the checkout: first run makes a 0600 master secret."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import requests

from agentkeys.crypto import derive_wallet
from tests.live import ROOT, clean_env, free_port, wait_until_up
from tests.vectors import VECTOR_ANCHOR


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


def run_dev_and_derive(repo: Path) -> str:
    port = free_port()
    env = clean_env(PORT=str(port))
    with subprocess.Popen([str(repo / "bin" / "dev")], cwd=repo, env=env) as process:
        try:
            base = f"http://127.0.0.1:{port}"
            wait_until_up(base + "/healthz", process)
            response = requests.post(
                base + "/dev/derive-address", json={"omni_account": VECTOR_ANCHOR}, timeout=5
            )
            assert response.status_code == 200, response.text
            address: str = response.json()["address"]
            return address
        finally:
            process.terminate()
            process.wait(timeout=30)


def test_bin_dev_creates_secret_and_serves(tmp_path: Path) -> None:
    repo = checkout_copy(tmp_path / "main")
    address = run_dev_and_derive(repo)

    secret_file = repo / "instance" / "dev-master-secret"
    assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
    master = bytes.fromhex(secret_file.read_text().strip())
    assert len(master) == 32
    assert address == derive_wallet(master, VECTOR_ANCHOR).address

    # A second run keeps the same secret, hence the same wallets.
    assert run_dev_and_derive(repo) == address
    assert bytes.fromhex(secret_file.read_text().strip()) == master
