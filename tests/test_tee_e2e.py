"""The daemon's whole `init` + `credentials` flow against /dev and against the TEE worker
(simulated) under `gunicorn -w 1 --threads 8`, with only AGENTKEYS_SIGNER_URL and the attestation
settings changed; a wrong PCR0 or a foreign root is refused before anything is sent; restarts and
upgrades keep addresses."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from agentkeys.crypto import derive_wallet, omni
from agentkeys.tee.platform import ROOT_FILE, SimulatedPlatform, code_measurement
from agentkeys.tee.state import SealedState
from tests.live import checkout_copy, clean_env, free_port, serving
from tests.smtp import StartServer
from tests.test_client_e2e import EMAIL, Local, running
from tests.vectors import VECTOR_MASTER

RELEASE = "agentkeys-e2e"
ACCOUNT = omni("email", EMAIL)
WALLET = derive_wallet(VECTOR_MASTER, ACCOUNT).address


@contextmanager
def worker(
    broker: str,
    state_dir: Path,
    port: int | None = None,
    repo: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    **popen: Any,
) -> Iterator[str]:
    """The worker as the Procfile runs it, trusting `broker`'s session keys: its /tee URL."""
    port = port or free_port()
    environ = clean_env(
        AGENTKEYS_ENV="development",
        AGENTKEYS_ISSUER=broker,
        AGENTKEYS_TEE_STATE_DIR=str(state_dir),
        AGENTKEYS_TEE_RELEASE=RELEASE,
        **(env or {}),
    )
    command = [sys.executable, "-m", "gunicorn", "--config", "config/tee.gunicorn.conf.py"]
    command += ["--bind", f"127.0.0.1:{port}", "agentkeys.tee.wsgi:app"]
    if repo is not None:
        popen["cwd"] = repo  # else this checkout
    with serving(command, environ, port, **popen) as base:
        yield base + "/tee"


def import_vector_master(state_dir: Path) -> None:
    """What `python -m agentkeys.tee import-master` does: the /dev master, sealed before boot."""
    SealedState(SimulatedPlatform(state_dir), state_dir, RELEASE).import_master(VECTOR_MASTER)


def attested(signer: str, state_dir: Path, pcr0: str | None = None) -> dict[str, str]:
    return {
        "AGENTKEYS_SIGNER_URL": signer,
        "AGENTKEYS_TEE_ROOT_CERT": str(state_dir / ROOT_FILE),
        "AGENTKEYS_TEE_PCR0": pcr0 or code_measurement().hex(),
    }


def audit(state_dir: Path) -> list[dict[str, str]]:
    path = state_dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def fresh_home(local: Local) -> None:
    subprocess.run(["rm", "-rf", str(local.home)], check=True)


@pytest.fixture
def local(sqlite_url: str, smtp_server: StartServer, tmp_path: Path) -> Iterator[Local]:
    with running(sqlite_url, smtp_server, tmp_path) as found:
        yield found


def test_the_same_flow_against_dev_and_tee(local: Local, tmp_path: Path) -> None:
    dev_init = local.init()
    assert dev_init.returncode == 0, dev_init.stderr
    dev_credentials = local.run("credentials")
    assert dev_credentials.returncode == 0, dev_credentials.stderr

    state_dir = tmp_path / "tee"
    import_vector_master(state_dir)
    with worker(local.base, state_dir) as signer:
        fresh_home(local)
        local.env |= attested(signer, state_dir)
        tee_init = local.init()
        assert tee_init.returncode == 0, tee_init.stderr
        assert f"wallet   {WALLET}" in tee_init.stdout  # the same wallet as on /dev
        tee_credentials = local.run("credentials")
        assert tee_credentials.returncode == 0, tee_credentials.stderr
        assert json.loads(tee_credentials.stdout)["AccessKeyId"]
        shown = local.run("whoami")
        assert shown.returncode == 0, shown.stderr
        assert f"signer   {signer}  attested simulated, PCR0 {code_measurement().hex()}" in (
            shown.stdout
        )
    ops = [(line["op"], line["omni_account"], line["address"]) for line in audit(state_dir)]
    # init: derive, then one sign (the wallet proof); credentials: one more sign.
    derive, sign = ("derive", ACCOUNT, WALLET), ("sign", ACCOUNT, WALLET)
    assert ops == [derive, sign, sign]
    assert local.sts.checked == 2  # both minted tokens passed STS's own checks


@pytest.mark.parametrize("wrong", ["pcr0", "root"])
def test_an_unattested_worker_is_sent_nothing(local: Local, tmp_path: Path, wrong: str) -> None:
    state_dir, stranger = tmp_path / "tee", tmp_path / "stranger"
    import_vector_master(state_dir)
    SimulatedPlatform(stranger)  # another simulated CA: its root is not this worker's
    with worker(local.base, state_dir) as signer:
        local.env |= attested(signer, state_dir)
        if wrong == "pcr0":
            local.env["AGENTKEYS_TEE_PCR0"] = "ab" * 48
            expected = f"agentkeys: attestation: PCR0 {code_measurement().hex()} is not in"
        else:
            local.env["AGENTKEYS_TEE_ROOT_CERT"] = str(stranger / ROOT_FILE)
            expected = "agentkeys: attestation: cabundle[0] is not the pinned root certificate"
        refused = local.init()
        assert refused.returncode == 8, refused.stderr
        assert refused.stderr.strip().splitlines()[-1].startswith(expected)
        assert audit(state_dir) == []  # the worker saw no derive and no sign
        assert not (local.home / "session.json").exists()


def test_restart_and_upgrade_keep_the_wallet(local: Local, tmp_path: Path) -> None:
    state_dir = tmp_path / "tee"
    port = free_port()
    with worker(local.base, state_dir, port) as signer:  # a master born inside
        local.env |= attested(signer, state_dir)
        first = local.init()
        assert first.returncode == 0, first.stderr
    wallet = audit(state_dir)[0]["address"]
    assert wallet != WALLET  # not the /dev master: its own

    with worker(local.base, state_dir, port) as signer:  # restarted
        assert local.run("credentials").returncode == 0
    assert {line["address"] for line in audit(state_dir)} == {wallet}

    upgraded = checkout_copy(tmp_path / "upgraded")
    with (upgraded / "agentkeys" / "tee" / "service.py").open("a") as f:
        f.write("\n# the next release\n")
    new_pcr0 = code_measurement(upgraded / "agentkeys").hex()
    assert new_pcr0 != code_measurement().hex()
    with worker(local.base, state_dir, port, repo=upgraded) as signer:
        fresh_home(local)
        old_image = local.init()  # the daemon still pins the old image: refused
        assert old_image.returncode == 8 and new_pcr0 in old_image.stderr
        local.env["AGENTKEYS_TEE_PCR0"] = f"{code_measurement().hex()},{new_pcr0}"
        again = local.init()
        assert again.returncode == 0, again.stderr
        assert f"wallet   {wallet}" in again.stdout  # the new code unsealed the same master


def test_the_worker_logs_json_lines_with_request_ids(tmp_path: Path) -> None:
    """As the broker's: JSON access, error and app lines, each request's with its id, and paths
    without their query strings."""
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    nonce = "5e" * 32
    with (
        out.open("w") as stdout,
        err.open("w") as stderr,
        worker(
            f"http://127.0.0.1:{free_port()}",  # no broker: its session keys cannot be fetched
            tmp_path / "tee",
            env={"AGENTKEYS_LOG_FORMAT": "json"},
            stdout=stdout,
            stderr=stderr,
        ) as signer,
    ):
        attestation = requests.get(
            f"{signer}/attestation?nonce={nonce}", headers={"X-Request-ID": "tee-1"}, timeout=15
        )
        refused = requests.post(
            f"{signer}/derive-address",
            json={"omni_account": ACCOUNT},
            headers={"Authorization": "Bearer not-a-session", "X-Request-ID": "tee-2"},
            timeout=15,
        )
    assert attestation.status_code == 200 and refused.status_code == 503  # no session keys
    access = [json.loads(line) for line in out.read_text().splitlines()]
    other = [json.loads(line) for line in err.read_text().splitlines()]  # each line is JSON
    by_id = {line["request_id"]: line for line in access}
    assert {line["logger"] for line in access} == {"gunicorn.access"}
    assert (by_id["tee-1"]["method"], by_id["tee-1"]["path"]) == ("GET", "/tee/attestation")
    assert by_id["tee-1"]["status"] == 200
    assert (by_id["tee-2"]["path"], by_id["tee-2"]["status"]) == ("/tee/derive-address", 503)
    # The app's own line about the refused request names that request.
    [fetch] = [line for line in other if line["logger"] == "agentkeys.tee.sessions"]
    assert (fetch["level"], fetch["request_id"]) == ("WARNING", "tee-2")
    assert any(line["message"].startswith("Booting worker") for line in other)
    assert nonce not in out.read_text() + err.read_text()
