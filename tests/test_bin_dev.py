"""The README's run command on a copy of the checkout: a newcomer's first sign-in.

It makes a 0600 master secret and key-encryption key on first run, keeps instance/ private,
migrates SQLite there with sealed signing keys, prints the sign-in mail to the console, and the
session from that mail gets the account's wallet address. PORT moves the whole service. Beside
it, a loopback-only STS stand-in turns that sign-in into credentials and stops with it.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agentkeys.attestation import verify_attestation
from agentkeys.crypto import derive_wallet, omni
from tests.live import bin_dev, checkout_copy, clean_env, free_port, run_bounded

EMAIL = "newcomer@example.com"
DEV_ROLE = "arn:aws:iam::123456789012:role/agentkeys-dev"


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


def listening(port: int) -> set[str]:
    """The addresses a socket listens on at `port`, read from /proc/net (no traffic sent)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)  # 32-bit words in host byte order
                if sys.byteorder == "little":
                    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(str(ipaddress.ip_address(raw)))
    return found


def closed(port: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while listening(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def printed_exports(stderr: list[str]) -> dict[str, str]:
    return dict(re.findall(r"^  export (AGENTKEYS_\w+)=(\S+)$", "".join(stderr), flags=re.M))


def test_bin_dev_sts_stand_in_end_to_end(tmp_path: Path) -> None:
    """The printed exports, as a newcomer pastes them: `agentkeys init` approved through the
    console mail, then `agentkeys credentials` from the stand-in, for this account's wallet."""
    repo = checkout_copy(tmp_path / "main")
    sts_port = free_port()
    sts = f"http://127.0.0.1:{sts_port}"
    with bin_dev(repo, AGENTKEYS_DEV_STS_PORT=str(sts_port)) as run:
        run.stderr_line("aws sts get-caller-identity")
        printed = "".join(run.stderr)
        exports = printed_exports(run.stderr)
        assert exports == {
            "AGENTKEYS_BROKER_URL": run.base,
            "AGENTKEYS_STS_ENDPOINT_URL": sts,
            "AGENTKEYS_ROLE_ARN": DEV_ROLE,
        }
        assert f"dev: DEV ONLY STS stand-in on {sts}: moto's server, NOT AWS." in printed
        assert "  agentkeys init --email me@example.com\n" in printed
        assert "  credential_process = agentkeys credentials\n" in printed
        command = f"  aws sts get-caller-identity --profile agentkeys --endpoint-url {sts}\n"
        assert command in printed
        assert listening(sts_port) == {"127.0.0.1"}  # loopback only, and not on every address

        agentkeys = str(repo / ".venv" / "bin" / "agentkeys")
        env = clean_env(
            **exports,
            AGENTKEYS_HOME=str(tmp_path / "agentkeys-home"),
            AWS_CONFIG_FILE=str(tmp_path / "aws-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "aws-credentials"),
        )
        with subprocess.Popen(
            [agentkeys, "init", "--email", EMAIL],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as init:
            token = run.magic_link(timeout=30).split("#t=", 1)[1]
            approved = requests.post(
                run.base + "/v1/auth/email/verify", json={"token": token}, timeout=10
            )
            assert approved.status_code == 200, approved.text
            out, err = init.communicate(timeout=60)
        assert init.returncode == 0, err
        master = bytes.fromhex((repo / "instance" / "dev-master-secret").read_text().strip())
        wallet = derive_wallet(master, omni("email", EMAIL)).address
        assert f"wallet   {wallet}" in out

        given = run_bounded([agentkeys, "credentials"], cwd=repo, env=env, timeout=60)
        assert given.returncode == 0, given.stderr
        body = json.loads(given.stdout)
        # The stand-in knows these keys: they are the role session it made for this wallet.
        identity = boto3.client(
            "sts",
            region_name="us-east-1",
            endpoint_url=sts,
            aws_access_key_id=body["AccessKeyId"],
            aws_secret_access_key=body["SecretAccessKey"],
            aws_session_token=body["SessionToken"],
        ).get_caller_identity()
        session_name = f"agentkeys-{wallet.lower()[2:]}"
        assert (
            identity["Arn"]
            == f"arn:aws:sts::123456789012:assumed-role/agentkeys-dev/{session_name}"
        )


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_bin_dev_takes_the_stand_in_with_it(tmp_path: Path, stop: str) -> None:
    """Ctrl-C in a terminal signals the whole foreground group; a supervisor sends SIGTERM to
    bin/dev alone. Either way the stand-in's port closes with the server's."""
    repo = checkout_copy(tmp_path / "main")
    port, sts_port = free_port(), free_port()
    log = tmp_path / "bin-dev.stderr"
    env = clean_env(PORT=str(port), AGENTKEYS_DEV_STS_PORT=str(sts_port), PYTHONUNBUFFERED="1")
    with (
        log.open("w") as stderr,
        subprocess.Popen(
            [str(repo / "bin" / "dev")],
            cwd=repo,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        ) as process,
    ):
        try:
            deadline = time.monotonic() + 60
            while "aws sts get-caller-identity" not in log.read_text():
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            assert listening(sts_port) == {"127.0.0.1"}
            if stop == "ctrl-c":
                os.killpg(process.pid, signal.SIGINT)
            else:
                process.terminate()
            process.wait(timeout=30)
            assert closed(sts_port) and closed(port), log.read_text()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


def test_bin_dev_runs_without_the_stand_in_when_its_port_is_taken(tmp_path: Path) -> None:
    repo = checkout_copy(tmp_path / "main")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        sts_port = taken.getsockname()[1]
        with bin_dev(repo, AGENTKEYS_DEV_STS_PORT=str(sts_port)) as run:
            line = run.stderr[run.stderr_line("STS stand-in")]
            assert line == (
                f"dev: NO STS stand-in: 127.0.0.1:{sts_port} is taken;"
                " set AGENTKEYS_DEV_STS_PORT.\n"
            )
            assert printed_exports(run.stderr) == {}
            assert requests.get(run.base + "/healthz", timeout=10).json() == {"status": "ok"}


@pytest.mark.parametrize("value", ["sts", "0", "010", "65536", "same"])
def test_bin_dev_refuses_a_bad_sts_port(tmp_path: Path, value: str) -> None:
    repo = checkout_copy(tmp_path / "main")
    port = str(free_port())
    env = clean_env(PORT=port, AGENTKEYS_DEV_STS_PORT=port if value == "same" else value)
    result = run_bounded(["bin/dev"], cwd=repo, env=env, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "dev: AGENTKEYS_DEV_STS_PORT must be a port (1-65535) other than PORT"
    )


def test_bin_dev_tee_runs_the_simulated_worker_the_client_can_attest(tmp_path: Path) -> None:
    """`bin/dev --tee`: the worker beside the broker, the dev master imported on first run (same
    wallets on /dev and /tee), and printed settings with which the attestation verifies."""
    repo = checkout_copy(tmp_path / "main")
    port = free_port()
    tee_port = free_port()
    with bin_dev(repo, port=port, args=("--tee",), AGENTKEYS_DEV_TEE_PORT=str(tee_port)) as run:
        run.stderr_line("AGENTKEYS_TEE_PCR0=", timeout=60)
        printed = dict(
            line.strip().removeprefix("export ").split("=", 1)
            for line in run.stderr
            if line.strip().startswith("export AGENTKEYS_")
        )
        signer = f"http://127.0.0.1:{tee_port}/tee"
        assert printed["AGENTKEYS_SIGNER_URL"] == signer
        assert "DEV ONLY simulated TEE worker" in "".join(run.stderr)
        nonce = os.urandom(32)
        answer = requests.get(f"{signer}/attestation?nonce={nonce.hex()}", timeout=10).json()
        root = Path(printed["AGENTKEYS_TEE_ROOT_CERT"]).read_bytes()
        attested = verify_attestation(
            base64.b64decode(answer["document"]),
            root_der=x509.load_pem_x509_certificate(root).public_bytes(Encoding.DER),
            now=time.time(),
            nonce=nonce,
            allowed_pcr0=[printed["AGENTKEYS_TEE_PCR0"]],
            allow_debug=False,
        )
        assert answer["platform"] == "simulated" and attested.public_key is not None

        started = requests.post(
            run.base + "/v1/auth/email/request", json={"email": EMAIL}, timeout=10
        ).json()
        token = run.magic_link().split("#t=", 1)[1]
        requests.post(run.base + "/v1/auth/email/verify", json={"token": token}, timeout=10)
        status = requests.get(
            run.base + started["poll_url"],
            headers={"Authorization": f"Bearer {started['poll_token']}"},
            timeout=10,
        ).json()
        bearer = {"Authorization": f"Bearer {status['session_jwt']}"}
        body = {"omni_account": status["account"]}
        addresses = {
            where: requests.post(f"{where}/derive-address", json=body, headers=bearer, timeout=10)
            .json()
            .get("address")
            for where in (run.base + "/dev", signer)
        }
        master = bytes.fromhex((repo / "instance" / "dev-master-secret").read_text().strip())
        assert set(addresses.values()) == {derive_wallet(master, status["account"]).address}
        assert (repo / "instance" / "tee" / "audit.jsonl").read_text().count('"derive"') == 1
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # the worker stops with bin/dev
        with contextlib.suppress(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{tee_port}/healthz", timeout=1)
            time.sleep(0.2)
            continue
        break
    else:
        raise AssertionError("the TEE worker outlived bin/dev")
