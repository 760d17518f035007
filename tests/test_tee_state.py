"""The worker's master secret, born inside and sealed: restarts and upgrades keep every wallet,
another release or a tampered, truncated or foreign file opens nothing, and an existing dev
master is imported once, before first boot. Plus the operator commands and the boot refusals."""

from __future__ import annotations

import dataclasses
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from flask import Flask

from agentkeys.crypto import derive_wallet
from agentkeys.errors import ConfigError
from agentkeys.tee.app import create_app
from agentkeys.tee.audit import AuditError
from agentkeys.tee.platform import PlatformError, SimulatedPlatform
from agentkeys.tee.settings import WorkerSettings
from agentkeys.tee.state import MASTER_FILE, SealedState, StateError
from tests.conftest import MakeApp, bearer_for_account
from tests.live import ROOT, clean_env, free_port
from tests.tee import worker_app, worker_settings
from tests.vectors import VECTOR_ADDRESS, VECTOR_ANCHOR, VECTOR_MASTER

RELEASE = "agentkeys-development"
TEE = [sys.executable, "-m", "agentkeys.tee"]


@pytest.fixture
def broker(make_app: MakeApp) -> Flask:
    return make_app()


def address(worker: Flask, broker: Flask, anchor: str = VECTOR_ANCHOR) -> str:
    response = worker.test_client().post(
        "/tee/derive-address",
        json={"omni_account": anchor},
        headers=bearer_for_account(broker, anchor),
    )
    assert response.status_code == 200, response.json
    return str(response.json["address"])  # type: ignore[index]


def state(state_dir: Path, release: str = RELEASE, **platform: bytes) -> SealedState:
    return SealedState(SimulatedPlatform(state_dir, **platform), state_dir, release)


def test_the_master_is_born_inside_and_kept_across_restarts(broker: Flask, tmp_path: Path) -> None:
    state_dir = tmp_path / "tee"
    first = address(worker_app(broker, state_dir), broker)
    sealed = state_dir / MASTER_FILE
    assert stat.S_IMODE(sealed.stat().st_mode) == 0o600
    assert first != VECTOR_ADDRESS  # a fresh random master, not the vector's
    master = state(state_dir).master().reveal()
    assert master not in sealed.read_bytes() and master.hex().encode() not in sealed.read_bytes()
    assert derive_wallet(master, VECTOR_ANCHOR).address == first
    assert address(worker_app(broker, state_dir), broker) == first  # restart: same wallet


def test_concurrent_first_boots_agree_on_one_master(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    state_dir = tmp_path / "tee"
    SimulatedPlatform(state_dir)  # the platform's own files first, as one boot makes them
    with ThreadPoolExecutor(8) as pool:
        masters = list(pool.map(lambda _: state(state_dir).master().reveal(), range(8)))
    assert len(set(masters)) == 1
    assert sorted(p.name for p in state_dir.iterdir() if p.name.startswith(".")) == []


def test_an_upgrade_keeps_the_master_and_another_release_does_not(tmp_path: Path) -> None:
    state_dir = tmp_path / "tee"
    master = state(state_dir).master().reveal()
    upgraded = state(state_dir, pcr0=b"\x01" * 48)  # new code, new PCR0, same release
    assert upgraded.master().reveal() == master
    with pytest.raises(StateError, match="for another release than 'agentkeys-other'"):
        state(state_dir, release="agentkeys-other").master()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "does not unseal"),
        (lambda b: b[: len(b) // 2], "does not unseal"),
        (lambda b: b[:10], "not a sealed AgentKeys file"),
        (lambda b: b"", "not a sealed AgentKeys file"),
    ],
    ids=["tampered", "truncated", "cut-magic", "empty"],
)
def test_a_damaged_master_refuses_to_boot(
    broker: Flask, tmp_path: Path, damage: object, message: str
) -> None:
    state_dir = tmp_path / "tee"
    worker_app(broker, state_dir)
    sealed = state_dir / MASTER_FILE
    sealed.write_bytes(damage(sealed.read_bytes()))  # type: ignore[operator]
    with pytest.raises(StateError, match=message):
        worker_app(broker, state_dir)


def test_a_foreign_master_refuses_to_boot(broker: Flask, tmp_path: Path) -> None:
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    worker_app(broker, mine)
    worker_app(broker, theirs)
    shutil.copy(theirs / MASTER_FILE, mine / MASTER_FILE)
    with pytest.raises(StateError, match="sealed on another platform"):
        worker_app(broker, mine)


def test_no_environment_variable_carries_the_master(
    broker: Flask, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEV_KEY_SERVICE_MASTER_SECRET", VECTOR_MASTER.hex())
    settings = WorkerSettings.from_env(
        {"AGENTKEYS_ENV": "development", "DEV_KEY_SERVICE_MASTER_SECRET": VECTOR_MASTER.hex()},
        instance_path=tmp_path,
    )
    assert not any("master" in f.name for f in dataclasses.fields(settings))
    assert address(worker_app(broker, tmp_path / "tee"), broker) != VECTOR_ADDRESS


def run_tee(*args: str, state_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = clean_env(
        AGENTKEYS_ENV="development", AGENTKEYS_TEE_STATE_DIR=str(state_dir), **env
    )
    return subprocess.run(
        [*TEE, *args], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60
    )


def test_import_master_once_then_dev_and_tee_agree(broker: Flask, tmp_path: Path) -> None:
    state_dir, secret = tmp_path / "tee", tmp_path / "dev-master-secret"
    secret.write_text(VECTOR_MASTER.hex() + "\n")
    done = run_tee("import-master", "--file", str(secret), state_dir=state_dir)
    assert done.returncode == 0, done.stderr
    assert VECTOR_MASTER.hex() not in done.stdout + done.stderr
    again = run_tee("import-master", "--file", str(secret), state_dir=state_dir)
    assert again.returncode == 1
    assert "already holds a sealed master secret" in again.stderr
    worker = worker_app(broker, state_dir)
    for anchor in (VECTOR_ANCHOR, "cd" * 32, "0f" * 32):
        dev = broker.test_client().post(
            "/dev/derive-address",
            json={"omni_account": anchor},
            headers=bearer_for_account(broker, anchor),
        )
        assert dev.json["address"] == address(worker, broker, anchor)  # type: ignore[index]
    assert address(worker, broker) == VECTOR_ADDRESS


def test_import_master_is_refused_after_first_boot(broker: Flask, tmp_path: Path) -> None:
    state_dir, secret = tmp_path / "tee", tmp_path / "secret"
    worker_app(broker, state_dir)
    secret.write_text(VECTOR_MASTER.hex())
    refused = run_tee("import-master", "--file", str(secret), state_dir=state_dir)
    assert refused.returncode == 1 and "already holds a sealed master secret" in refused.stderr


@pytest.mark.parametrize("content", ["", "zz" * 32, "ab" * 31, "ab" * 33])
def test_import_master_refuses_what_is_not_a_secret(tmp_path: Path, content: str) -> None:
    secret = tmp_path / "secret"
    secret.write_text(content)
    refused = run_tee("import-master", "--file", str(secret), state_dir=tmp_path / "tee")
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"Error: {secret} does not hold 64 hex characters"
    assert not (tmp_path / "tee" / MASTER_FILE).exists()


def test_audit_verify_with_the_sealed_head_finds_a_cut_tail(broker: Flask, tmp_path: Path) -> None:
    state_dir = tmp_path / "tee"
    worker = worker_app(broker, state_dir)
    for _ in range(4):
        address(worker, broker)
    log = state_dir / "audit.jsonl"
    intact = run_tee("audit", "verify", str(log), "--state", str(state_dir), state_dir=state_dir)
    assert intact.returncode == 0, intact.stderr
    assert intact.stdout.strip() == f"{log}: intact, 4 covered by the sealed head"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:3]))
    plain = run_tee("audit", "verify", str(log), state_dir=state_dir)
    assert plain.returncode == 0  # the chain alone cannot see a cut tail…
    cut = run_tee("audit", "verify", str(log), "--state", str(state_dir), state_dir=state_dir)
    assert cut.returncode == 1  # …the sealed head can
    assert cut.stderr.splitlines()[-1].startswith(f"{log}: line 4 is missing")
    with pytest.raises(AuditError, match="line 4 is missing"):
        worker_app(broker, state_dir)  # and the worker refuses to boot on it


def test_settings_refuse_what_production_must_not_run(tmp_path: Path) -> None:
    production = {
        "AGENTKEYS_ENV": "production",
        "AGENTKEYS_ISSUER": "https://keys.example",
        "AGENTKEYS_SESSION_JWKS_URL": "https://keys.example/v1/session-keys",
        "AGENTKEYS_TEE_RELEASE": "agentkeys-prod",
    }
    assert WorkerSettings.from_env(production, instance_path=tmp_path).platform == "nitro"
    refusals = {
        "AGENTKEYS_TEE_PLATFORM": ("simulated", "simulated is refused in production"),
        "AGENTKEYS_SESSION_JWKS_URL": ("http://keys.example/jwks", "must be https in production"),
        "AGENTKEYS_TEE_RELEASE": ("", "AGENTKEYS_TEE_RELEASE is required in production"),
        "AGENTKEYS_TEE_RATE_LIMIT": ("10", "AGENTKEYS_TEE_RATE_LIMIT takes count/seconds"),
    }
    for name, (value, message) in refusals.items():
        with pytest.raises(ConfigError, match=message):
            WorkerSettings.from_env(production | {name: value}, instance_path=tmp_path)
    with pytest.raises(ConfigError, match="AGENTKEYS_TEE_RELEASE must be"):
        WorkerSettings.from_env(
            {"AGENTKEYS_ENV": "development", "AGENTKEYS_TEE_RELEASE": "a:b"},
            instance_path=tmp_path,
        )


def test_nitro_without_the_device_refuses_with_one_line(tmp_path: Path) -> None:
    settings = worker_settings(tmp_path / "tee", platform="nitro")
    with pytest.raises(PlatformError, match="Nitro Secure Module"):
        create_app(settings)


@pytest.mark.parametrize("broken", ["tampered", "config"])
def test_gunicorn_refuses_to_start_with_one_line(tmp_path: Path, broken: str) -> None:
    state_dir = tmp_path / "tee"
    env = clean_env(AGENTKEYS_ENV="development", AGENTKEYS_TEE_STATE_DIR=str(state_dir))
    if broken == "tampered":
        state(state_dir).master()
        sealed = state_dir / MASTER_FILE
        sealed.write_bytes(sealed.read_bytes()[:-1] + b"\0")
        expected = "agentkeys-tee: refusing to start:"
    else:
        env["AGENTKEYS_TEE_PLATFORM"] = "sgx"
        expected = "agentkeys-tee: configuration error: AGENTKEYS_TEE_PLATFORM must be one of"
    command = [sys.executable, "-m", "gunicorn", "-w", "1", "--threads", "8"]
    command += ["--bind", f"127.0.0.1:{free_port()}", "agentkeys.tee.wsgi:app"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("agentkeys-tee:")]
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ("edited", "line 2 was edited: its hash does not match its contents"),
        ("removed", "line 2 does not chain to line 1: a line was removed or reordered before it"),
        ("reordered", "line 2 does not chain to line 1: a line was removed or reordered before it"),
    ],
)
def test_audit_verify_names_the_first_bad_line(
    broker: Flask, tmp_path: Path, edit: str, expected: str
) -> None:
    state_dir = tmp_path / "tee"
    worker = worker_app(broker, state_dir)
    for anchor in (VECTOR_ANCHOR, "cd" * 32, "0f" * 32):
        address(worker, broker, anchor)
    log = state_dir / "audit.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    if edit == "edited":
        lines[1] = lines[1].replace("cd" * 32, "ce" * 32)
    elif edit == "removed":
        del lines[1]
    else:
        lines[1], lines[2] = lines[2], lines[1]
    log.write_text("".join(lines))
    found = run_tee("audit", "verify", str(log), state_dir=state_dir)
    assert found.returncode == 1
    assert found.stderr.splitlines()[-1] == f"{log}: {expected}"
