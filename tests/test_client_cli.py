"""`agentkeys` as a command: usage errors exit 2, every command has --help with the exit codes,
nothing prompts, and the cache survives a kill -9 in the middle of a write."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from agentkeys.client.cache import Home, credentials_name
from agentkeys.client.cli import main
from agentkeys.client.credentials import Credentials
from agentkeys.client.errors import EXIT_CODES
from tests.live import ROOT

COMMANDS = [
    [],
    ["init"],
    ["credentials"],
    ["exec"],
    ["whoami"],
    ["logout"],
    ["serve"],
    ["identities"],
    ["identities", "link"],
    ["identities", "unlink"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "agentkeys")
def test_every_command_has_help_with_the_exit_codes(command: list[str]) -> None:
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output
    assert " ".join(EXIT_CODES.split()) in " ".join(result.output.split())


@pytest.mark.parametrize(
    "arguments",
    [
        ["init", "--mock-token", "x"],  # PROTOCOL §6.6: the CLI has no --mock-token
        ["init"],
        ["init", "--email", "a@example.com", "--provider", "google"],
        ["credentials", "--format", "yaml"],
        ["credentials", "--duration", "899"],
        ["credentials", "--duration", "43201"],
        ["exec"],
        ["identities", "unlink", "email"],
        ["no-such-command"],
    ],
    ids=lambda a: " ".join(a),
)
def test_usage_errors_exit_2(arguments: list[str], tmp_path: Path) -> None:
    env = {"AGENTKEYS_HOME": str(tmp_path), "AGENTKEYS_ROLE_ARN": "arn:aws:iam::1:role/r"}
    result = CliRunner().invoke(main, arguments, env=env)
    assert result.exit_code == 2, result.output


def test_credentials_without_a_role_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["credentials"], env={"AGENTKEYS_HOME": str(tmp_path), "AGENTKEYS_ROLE_ARN": ""}
    )
    assert result.exit_code == 2 and "--role-arn" in result.output


def test_not_signed_in_is_one_line_and_exit_3_without_reading_stdin(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "AGENTKEYS_HOME": str(tmp_path / "home"),
        "AGENTKEYS_ROLE_ARN": "arn:aws:iam::123456789012:role/r",
        "AGENTKEYS_BROKER_URL": "http://127.0.0.1:9",
    }
    for command in (["credentials"], ["whoami"], ["logout", "--everywhere"]):
        result = subprocess.run(
            [sys.executable, "-m", "agentkeys.client.cli", *command],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.PIPE,  # held open and never written: a prompt would hang here
        )
        assert result.returncode == 3, result.stderr
        assert result.stdout == ""
        assert result.stderr.strip().splitlines() == [
            f"agentkeys: {command[0]}: not signed in to http://127.0.0.1:9; run `agentkeys init`"
            if command[0] != "credentials"
            else "agentkeys: session: not signed in to http://127.0.0.1:9; run `agentkeys init`"
        ]


def test_a_warm_cache_answers_without_the_network(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    role, broker = "arn:aws:iam::123456789012:role/r", "http://127.0.0.1:9"  # nothing listens
    later = int(time.time()) + 3000
    home.write(credentials_name(broker, role, 3600), Credentials("AK", "SK", "ST", later).to_json())
    env = {
        "AGENTKEYS_HOME": str(home.path),
        "AGENTKEYS_ROLE_ARN": role,
        "AGENTKEYS_BROKER_URL": broker,
    }
    expectations: list[tuple[str, dict[str, object]]] = [
        ("credential-process", {"Version": 1, "AccessKeyId": "AK", "SecretAccessKey": "SK"}),
        ("json", {"AccessKeyId": "AK", "SessionToken": "ST"}),
    ]
    for fmt, expected in expectations:
        result = CliRunner().invoke(main, ["credentials", "--format", fmt], env=env)
        assert result.exit_code == 0, result.output
        body = json.loads(result.output)
        assert expected.items() <= body.items() and body["Expiration"].endswith("Z")
    shown = CliRunner().invoke(main, ["credentials", "--format", "env"], env=env).output
    assert "export AWS_ACCESS_KEY_ID=AK\n" in shown and "export AWS_SESSION_TOKEN=ST" in shown


WRITER = """
import sys
from agentkeys.client.cache import Home
home, big = Home(sys.argv[1]), "x" * 2_000_000
for i in range(10**6):
    home.write("credentials/c.json", {"n": i, "pad": big})
"""


def test_the_cache_survives_kill_9_mid_write(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.write("credentials/c.json", {"n": -1, "pad": ""})
    for round_ in range(8):
        with subprocess.Popen([sys.executable, "-c", WRITER, str(home.path)], cwd=ROOT) as writer:
            time.sleep(0.3 + 0.07 * round_)  # somewhere inside a write of 2 MB
            writer.send_signal(signal.SIGKILL)
            writer.wait()
        stored = home.read("credentials/c.json")
        assert stored is not None and isinstance(stored["n"], int)  # the old or the new, whole
    target = home.path / "credentials" / "c.json"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.path.stat().st_mode) == 0o700
