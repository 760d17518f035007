"""The AWS CLI (nobody here wrote it) takes its credentials from `agentkeys credentials` through
a `credential_process` profile, and shows the client's one line when it cannot."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkeys.crypto import derive_wallet, omni
from tests.live import ROOT
from tests.smtp import StartServer
from tests.test_client_e2e import EMAIL, Local, running
from tests.vectors import VECTOR_MASTER

BIN = Path(sys.prefix) / "bin"  # the venv the tests run in: its console scripts


@pytest.fixture
def local(sqlite_url: str, smtp_server: StartServer, tmp_path: Path) -> Iterator[Local]:
    with running(sqlite_url, smtp_server, tmp_path) as found:
        yield found


def aws_caller_identity(local: Local) -> subprocess.CompletedProcess[str]:
    """`aws sts get-caller-identity` through the profile, at moto's STS only."""
    Path(local.env["AWS_CONFIG_FILE"]).write_text(
        "[profile agentkeys]\n"
        f"credential_process = {BIN / 'agentkeys'} credentials\n"
        "region = us-east-1\n"
    )
    # No credentials from the outer environment: only the profile can supply them.
    ignored = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"}
    env = {k: v for k, v in local.env.items() if k not in ignored}
    command = [str(BIN / "aws"), "sts", "get-caller-identity", "--profile", "agentkeys"]
    command += ["--endpoint-url", local.sts_url, "--output", "json"]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_aws_cli_gets_credentials_through_the_profile(local: Local) -> None:
    assert local.init().returncode == 0
    wallet = derive_wallet(VECTOR_MASTER, omni("email", EMAIL)).address

    called = aws_caller_identity(local)
    assert called.returncode == 0, called.stderr
    identity = json.loads(called.stdout)
    # moto names the assumed role's session; unknown keys would come back as user/moto.
    assert identity["Arn"] == (
        f"arn:aws:sts::123456789012:assumed-role/agentkeys-agent/agentkeys-{wallet.lower()[2:]}"
    )
    assert identity["Account"] == "123456789012"

    # Signed out, the CLI fails and shows the client's one line saying what to run.
    assert local.run("logout").returncode == 0
    refused = aws_caller_identity(local)
    assert refused.returncode != 0
    assert (
        f"agentkeys: session: not signed in to {local.base}; run `agentkeys init`" in refused.stderr
    )
