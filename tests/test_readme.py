"""The README's operator commands, run as written (a checkout, its venv, development mode)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.live import ROOT, bin_dev, checkout_copy, clean_env


def production_blocks() -> list[str]:
    """The shell blocks of the README's Production section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Production\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)


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
