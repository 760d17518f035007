"""The `agentkeys` command end to end, as a person runs it: the broker under `gunicorn -w 4`, a
real SMTP server (the test reads the mail and approves), moto's STS on loopback, and boto3
taking the credentials through a `credential_process` profile it runs itself."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from moto.server import ThreadedMotoServer

from agentkeys.crypto import derive_wallet, omni
from tests.broker import broker_env
from tests.live import ROOT, clean_env, free_port, gunicorn
from tests.smtp import Server, StartServer, magic_link_token
from tests.sts import CheckingSts
from tests.vectors import VECTOR_MASTER

EMAIL = "agent-owner@example.com"
ROLE = "arn:aws:iam::123456789012:role/agentkeys-agent"
AGENTKEYS = [sys.executable, "-m", "agentkeys.client.cli"]


@dataclass
class Local:
    """A broker, a mailbox, moto's STS and the environment the client runs with."""

    base: str
    mailbox: Server
    sts_url: str
    env: dict[str, str]
    home: Path
    sts: CheckingSts

    def run(
        self, *args: str, timeout: float = 60, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*AGENTKEYS, *args],
            env=self.env | extra,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def init(self, email: str = EMAIL) -> subprocess.CompletedProcess[str]:
        """`agentkeys init --email`, approving the mail as the person would."""
        return self.approving("init", "--email", email)

    def approving(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a command that waits for a magic link, approving the mail as the person would."""
        self.mailbox.recorder.envelopes.clear()
        with subprocess.Popen(
            [*AGENTKEYS, *args],
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as process:
            token = wait_for_mail(self.mailbox)
            approved = requests.post(
                self.base + "/v1/auth/email/verify", json={"token": token}, timeout=10
            )
            assert approved.status_code == 200, approved.text
            out, err = process.communicate(timeout=60)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def wait_for_mail(mailbox: Server, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while not mailbox.recorder.envelopes:
        assert time.monotonic() < deadline, "no sign-in mail arrived"
        time.sleep(0.05)
    return magic_link_token(mailbox.recorder.message())


@contextmanager
def running(
    database_url: str, smtp_server: StartServer, tmp_path: Path, **broker: str
) -> Iterator[Local]:
    """The broker under gunicorn -w 4 and moto's STS behind the STS conformance check."""
    mailbox = smtp_server()
    port, sts_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=sts_port, verbose=False)
    moto.start()
    checking = CheckingSts(f"http://127.0.0.1:{sts_port}", provider_url=base)
    home = tmp_path / "agentkeys-home"
    client_env = clean_env(
        AGENTKEYS_BROKER_URL=base,
        AGENTKEYS_HOME=str(home),
        AGENTKEYS_ROLE_ARN=ROLE,
        AGENTKEYS_STS_ENDPOINT_URL=checking.url,
        AWS_REGION="us-east-1",
        AWS_CONFIG_FILE=str(tmp_path / "aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "aws-credentials"),
    )
    limits = {"AGENTKEYS_RATE_LIMITS": "verify_ip=1000/60"}
    env = broker_env(base, database_url, mailbox, **(limits | broker))
    try:
        with gunicorn(env, workers=4, port=port):
            yield Local(base, mailbox, checking.url, client_env, home, checking)
    finally:
        checking.stop()
        moto.stop()


@pytest.fixture
def local(sqlite_url: str, smtp_server: StartServer, tmp_path: Path) -> Iterator[Local]:
    with running(sqlite_url, smtp_server, tmp_path) as found:
        yield found


@pytest.fixture
def local_any(any_database_url: str, smtp_server: StartServer, tmp_path: Path) -> Iterator[Local]:
    """The same on SQLite and on PostgreSQL."""
    with running(any_database_url, smtp_server, tmp_path) as found:
        yield found


def caller_identity(local: Local, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """boto3 (nobody here wrote it) runs our credential_process itself and calls STS."""
    command = " ".join([*AGENTKEYS, "credentials", "--role-arn", ROLE])
    Path(local.env["AWS_CONFIG_FILE"]).write_text(
        f"[profile agent]\ncredential_process = {command}\nregion = us-east-1\n"
    )
    for name, value in local.env.items():
        monkeypatch.setenv(name, value)
    session = boto3.Session(profile_name="agent")
    identity: dict[str, Any] = session.client(
        "sts", endpoint_url=local.sts_url
    ).get_caller_identity()
    return identity


def test_init_then_credentials_into_boto3(
    local_any: Local, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = local_any
    signed_in = local.init()
    assert signed_in.returncode == 0, signed_in.stderr
    account = omni("email", EMAIL)
    wallet = derive_wallet(VECTOR_MASTER, account).address
    assert f"account  {account}" in signed_in.stdout
    assert f"wallet   {wallet}" in signed_in.stdout
    assert "Your code: " in signed_in.stderr and EMAIL in signed_in.stderr
    session_file = local.home / "session.json"
    assert stat.S_IMODE(local.home.stat().st_mode) == 0o700
    assert stat.S_IMODE(session_file.stat().st_mode) == 0o600
    stored = json.loads(session_file.read_text())
    assert (stored["account"], stored["wallet"]) == (account, wallet)
    assert stored["session_jwt"] not in signed_in.stdout + signed_in.stderr  # never printed

    # The wallet is linked and proved: the broker lists it for the account.
    listed = requests.get(
        local.base + "/v1/identities",
        headers={"Authorization": f"Bearer {stored['session_jwt']}"},
        timeout=10,
    ).json()["identities"]
    assert ("evm", wallet.lower(), "linked") in [
        (i["identity_type"], i["identity_value"], i["status"]) for i in listed
    ]

    identity = caller_identity(local, monkeypatch)
    assert local.sts.checked == 1  # the minted token passed the checks STS itself makes
    assert identity["Arn"].endswith(f"/agentkeys-{wallet.lower()[2:]}")
    assert EMAIL not in identity["Arn"]  # the session name comes from the wallet, never the email

    printed = local.run("credentials")
    assert printed.returncode == 0, printed.stderr
    body = json.loads(printed.stdout)
    assert set(body) == {"Version", "AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration"}
    assert body["Version"] == 1 and body["Expiration"].endswith("Z")
    [cache] = (local.home / "credentials").glob("*.json")
    assert {stat.S_IMODE(p.stat().st_mode) for p in cache.parent.iterdir()} == {0o600}


def test_parallel_credentials_mint_once(local: Local) -> None:
    assert local.init().returncode == 0
    with ThreadPoolExecutor(20) as pool:
        runs = list(pool.map(lambda _: local.run("credentials", timeout=120), range(20)))
    assert [r.returncode for r in runs] == [0] * 20, [r.stderr for r in runs if r.returncode]
    keys = {json.loads(r.stdout)["AccessKeyId"] for r in runs}
    assert len(keys) == 1  # each mint gets a fresh key from STS: one key, one mint


def test_exec_passes_credentials_and_exit_code(local: Local) -> None:
    assert local.init().returncode == 0
    shown = local.run(
        "exec",
        "--",
        sys.executable,
        "-c",
        "import os, sys; print(os.environ['AWS_ACCESS_KEY_ID'], os.environ['AWS_REGION']); "
        "print(os.environ['AWS_CREDENTIAL_EXPIRATION']); sys.exit(7)",
    )
    assert shown.returncode == 7, shown.stderr
    key, region = shown.stdout.split()[:2]
    assert key.startswith(("ASIA", "AKIA")) and region == "us-east-1"
    assert shown.stdout.split()[2].endswith("Z")


def test_a_revoked_session_says_run_init_again(local: Local) -> None:
    assert local.init().returncode == 0
    assert local.run("logout", "--everywhere").returncode == 0
    assert not (local.home / "session.json").exists()
    refused = local.run("credentials")
    assert refused.returncode == 3
    assert refused.stderr.strip().splitlines() == [
        "agentkeys: session: not signed in to " + local.base + "; run `agentkeys init`"
    ]


def test_a_session_revoked_elsewhere_is_one_line_and_exit_3(local: Local) -> None:
    assert local.init().returncode == 0
    stored = json.loads((local.home / "session.json").read_text())
    requests.post(
        local.base + "/v1/sessions/revoke",
        headers={"Authorization": f"Bearer {stored['session_jwt']}"},
        timeout=10,
    )
    refused = local.run("credentials")
    assert refused.returncode == 3, refused.stderr
    [line] = refused.stderr.strip().splitlines()
    assert "run `agentkeys init` again" in line and "step 4" in line


def test_whoami_link_and_unlink(local: Local) -> None:
    assert local.init().returncode == 0
    account = omni("email", EMAIL)
    wallet = derive_wallet(VECTOR_MASTER, account).address

    shown = local.run("whoami")
    assert shown.returncode == 0, shown.stderr
    assert f"account  {account}" in shown.stdout and f"wallet   {wallet}" in shown.stdout
    assert "session  email, until " in shown.stdout and wallet.lower() in shown.stdout

    backup = "backup@example.com"
    linked = local.approving("identities", "link", "--email", backup)
    assert linked.returncode == 0, linked.stderr
    assert linked.stdout.strip() == f"linked email {backup} to {account}"
    assert backup in local.run("whoami").stdout

    # Recovery: signing in with the backup address gives the same account and wallet.
    again = local.init(backup)
    assert again.returncode == 0, again.stderr
    assert f"account  {account}" in again.stdout and f"wallet   {wallet}" in again.stdout

    unlinked = local.run("identities", "unlink", "email", backup)
    assert unlinked.returncode == 0, unlinked.stderr
    assert "every session was revoked" in unlinked.stderr
    assert local.run("whoami").returncode == 3  # unlinking revoked this session too


def test_a_token_sts_would_refuse_is_exit_6(
    sqlite_url: str, smtp_server: StartServer, tmp_path: Path
) -> None:
    with running(
        sqlite_url, smtp_server, tmp_path, AGENTKEYS_OIDC_AUDIENCE="not-sts.example"
    ) as local:
        assert local.init().returncode == 0
        refused = local.run("credentials")
    assert refused.returncode == 6, refused.stderr
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith("agentkeys: STS: ") and line.endswith("(InvalidIdentityToken)")
    assert local.sts.checked == 0
