"""The README's operator commands and its quick start, run as written (a checkout, its venv,
development mode)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from agentkeys.crypto import derive_wallet, omni
from tests.conftest import MakeApp, bearer_for_account
from tests.live import ROOT, bin_dev, checkout_copy, clean_env, free_port
from tests.tee import worker_app
from tests.vectors import VECTOR_ADDRESS, VECTOR_ANCHOR, VECTOR_MASTER


def production_blocks() -> list[str]:
    """The shell blocks of the README's Production section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Production\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)


def quick_start() -> tuple[list[str], str]:
    """The shell blocks and the profile of the README's quick start."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Quick start: AWS credentials on one machine\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)
    [profile] = re.findall(r"```ini\n(.*?)```", section, flags=re.DOTALL)
    return blocks, profile


def shell(script: str, cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    """`script` in bash from `cwd`, with no venv on PATH: only what the README says to do."""
    path = os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if not p.rstrip("/").endswith(".venv/bin")
    )
    env = clean_env(PATH=path, **extra)
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_operator_commands_run_in_development(tmp_path: Path) -> None:
    """The Production block minus its servers (the entry-point tests run those), in order."""
    commands = production_blocks()[0]
    script = "\n".join(
        line for line in commands.splitlines() if not line.lstrip().startswith("gunicorn ")
    )
    assert "flask --app app keys list" in script and ". .venv/bin/activate" in script
    database = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    result = shell(script, ROOT, AGENTKEYS_ENV="development", DATABASE_URL=database)
    assert result.returncode == 0, result.stderr
    assert "database migrated; signing keys present" in result.stdout
    assert "published session key" in result.stdout
    listed = re.findall(r"^(session|oidc) +\S+  signs from", result.stdout, flags=re.MULTILINE)
    assert sorted(listed) == ["oidc", "session", "session"]  # the rotated-in key is published


def test_operator_commands_on_bin_dev_database(tmp_path: Path) -> None:
    repo = checkout_copy(tmp_path / "main")
    with bin_dev(repo):
        pass
    # Without the key-encryption key: one line that says which variable to set.
    refused = shell(
        ". .venv/bin/activate\nflask --app app keys list", repo, AGENTKEYS_ENV="development"
    )
    assert refused.returncode != 0
    assert refused.stderr.strip().splitlines() == [
        "agentkeys: the session signing keys are sealed: set AGENTKEYS_KEY_ENCRYPTION_KEY"
    ]
    result = shell(production_blocks()[1], repo)
    assert result.returncode == 0, result.stderr
    assert {line.split()[0] for line in result.stdout.splitlines()} == {"session", "oidc"}


def test_quick_start_walk_as_written(tmp_path: Path) -> None:
    """The quick start as a newcomer types it, on bin/dev's own ports and with a fresh home: the
    exports are the ones bin/dev prints, and `aws` gets this account's role session."""
    [start, sign_in, call], profile = quick_start()
    assert start == "bin/dev\n"
    repo = checkout_copy(tmp_path / "main")
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "config").write_text(profile)
    sts_port = free_port()
    with bin_dev(repo, AGENTKEYS_DEV_STS_PORT=str(sts_port)) as run:
        run.stderr_line("aws sts get-caller-identity")

        def here(text: str) -> str:
            text = text.replace("127.0.0.1:8000", f"127.0.0.1:{run.port}")
            return text.replace("127.0.0.1:8001", f"127.0.0.1:{sts_port}")

        printed = [line.strip() for line in run.stderr]
        for line in (sign_in + profile + call).splitlines():
            if not line.startswith(". "):  # bin/dev prints the venv's absolute path
                assert here(line) in printed, line
        aws = {
            "HOME": str(home),
            "AWS_CONFIG_FILE": str(home / ".aws" / "config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / ".aws" / "credentials"),
        }
        with ThreadPoolExecutor(1) as pool:
            walked = pool.submit(shell, here(sign_in + call), repo, **aws)
            token = run.magic_link(timeout=60).split("#t=", 1)[1]
            approved = requests.post(
                run.base + "/v1/auth/email/verify", json={"token": token}, timeout=10
            )
            assert approved.status_code == 200, approved.text
            result = walked.result(timeout=150)
    assert result.returncode == 0, result.stderr
    master = bytes.fromhex((repo / "instance" / "dev-master-secret").read_text().strip())
    wallet = derive_wallet(master, omni("email", "me@example.com")).address
    identity = json.loads(result.stdout[result.stdout.index("{") :])
    assert identity["Arn"] == (
        f"arn:aws:sts::123456789012:assumed-role/agentkeys-dev/agentkeys-{wallet.lower()[2:]}"
    )
    assert (home / ".agentkeys" / "session.json").exists()


def test_tee_commands_run_as_written(tmp_path: Path, make_app: MakeApp) -> None:
    """The TEE worker block: import the dev master, serve (here in-process), verify the log."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## TEE worker\n", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)
    lines = block.splitlines()
    served = next(i for i, line in enumerate(lines) if line.startswith("gunicorn "))
    assert lines[served].startswith(
        "gunicorn --config config/tee.gunicorn.conf.py agentkeys.tee.wsgi:app"
    )
    assert lines[0].startswith(". .venv/bin/activate")
    assert lines[1].startswith("export AGENTKEYS_ENV=development")
    # The venv and mode lines, then either what comes before the server or what comes after.
    setup, commands = lines[:2], lines[2:served]
    before, after = "\n".join(setup + commands), "\n".join(setup + lines[served + 1 :])
    repo = checkout_copy(tmp_path / "main")
    (repo / "instance").mkdir()
    (repo / "instance" / "dev-master-secret").write_text(VECTOR_MASTER.hex() + "\n")
    imported = shell(before, repo)
    assert imported.returncode == 0, imported.stderr
    assert "sealed the master secret" in imported.stdout

    broker = make_app()
    worker = worker_app(broker, repo / "instance" / "tee")
    derived = worker.test_client().post(
        "/tee/derive-address",
        json={"omni_account": VECTOR_ANCHOR},
        headers=bearer_for_account(broker, VECTOR_ANCHOR),
    )
    assert derived.json == {"address": VECTOR_ADDRESS, "key_version": 1}  # the imported master

    verified = shell(after, repo)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.strip().endswith("intact, 1 covered by the sealed head")
