"""`agentkeys serve` as a real process after `agentkeys init`: boto3 takes credentials from its
endpoint, or calls moto's STS itself with its web identity token file; the endpoint wants its
token and listens on 127.0.0.1 only; it keeps serving while the broker is down and stops on
SIGTERM with exit 0. No token, session or AWS secret ever reaches its stderr."""

from __future__ import annotations

import base64
import json
import queue
import re
import shlex
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
import requests
from click.testing import CliRunner

from agentkeys.client.cli import main
from agentkeys.client.errors import EXIT_CODES, Untrusted
from agentkeys.client.serve import token_times
from agentkeys.crypto import derive_wallet, omni
from tests import sts
from tests.live import ROOT
from tests.smtp import StartServer
from tests.test_client_e2e import AGENTKEYS, EMAIL, ROLE, Local, running
from tests.vectors import VECTOR_MASTER

SESSION_NAME = "agentkeys-" + derive_wallet(VECTOR_MASTER, omni("email", EMAIL)).address.lower()[2:]
LOOPBACK_V4 = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it
CLOSED = "http://127.0.0.1:9"  # nothing listens: a request that slips through fails at once


@dataclass
class Daemon:
    """A running `agentkeys serve`: what it told us to export and what it has logged."""

    process: subprocess.Popen[str]
    exports: dict[str, str]
    lines: list[str] = field(default_factory=list)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for_log(self, pattern: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log)
            if found:
                return found.group(0)
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not in serve's stderr:\n{self.log}")


@contextmanager
def serving(local: Local, *args: str) -> Iterator[Daemon]:
    """Run `agentkeys serve ARGS` until it prints its export lines; stop it afterwards."""
    process = subprocess.Popen(
        [*AGENTKEYS, "serve", *args],
        env=local.env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    stdout, stderr = process.stdout, process.stderr
    printed: queue.Queue[str] = queue.Queue()
    daemon = Daemon(process, {})

    def pump_stdout() -> None:
        for line in stdout:
            printed.put(line)
        printed.put("")

    def pump_stderr() -> None:
        for line in stderr:
            daemon.lines.append(line)

    threading.Thread(target=pump_stdout, daemon=True).start()
    threading.Thread(target=pump_stderr, daemon=True).start()
    expected = (0 if "--no-container" in args else 2) + (3 * ("--web-identity-token-file" in args))
    try:
        while len(daemon.exports) < expected:
            line = printed.get(timeout=60)
            assert line, f"serve ended with {process.wait(10)}:\n{daemon.log}"
            [assignment] = shlex.split(line.removeprefix("export "))
            name, value = assignment.split("=", 1)
            daemon.exports[name] = value
        yield daemon
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=10)
        stdout.close()
        stderr.close()


@pytest.fixture
def local(sqlite_url: str, smtp_server: StartServer, tmp_path: Path) -> Iterator[Local]:
    with running(sqlite_url, smtp_server, tmp_path) as found:
        assert found.init().returncode == 0
        yield found


def aws_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, local: Local, **variables: str
) -> None:
    """Only `variables` tell boto3 where credentials are: no profile, keys, files or IMDS, and
    a proxy on a closed port for anything that is not 127.0.0.1."""
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_CREDENTIAL_EXPIRATION",
        "AWS_ROLE_ARN",
        "AWS_ROLE_SESSION_NAME",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
        "AWS_ENDPOINT_URL",
    ):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        empty = tmp_path / f"empty-{name.lower()}"
        empty.write_text("")
        monkeypatch.setenv(name, str(empty))
    base = {
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL_STS": local.sts_url,  # the STS that boto3's own providers call
        "HTTP_PROXY": CLOSED,
        "HTTPS_PROXY": CLOSED,
        "NO_PROXY": "127.0.0.1",
    }
    for name, value in (base | variables).items():
        monkeypatch.setenv(name, value)


def caller_arn(local: Local) -> str:
    """boto3 (nobody here wrote it) finds credentials the way the environment says and calls
    moto's STS with them."""
    sts_client = boto3.Session().client("sts", endpoint_url=local.sts_url, region_name="us-east-1")
    arn: str = sts_client.get_caller_identity()["Arn"]
    return arn


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a listening TCP socket on `port`, from the kernel's tables."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local_address, state = row.split()[1], row.split()[3]
            address, hex_port = local_address.rsplit(":", 1)
            if int(hex_port, 16) == port and state == "0A":  # 0A: LISTEN
                found.add(address)
    return found


def assert_private(path: Path) -> bytes:
    """0600, one line with no newline (botocore refuses CR or LF in a token): the content."""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = path.read_bytes()
    assert raw and b"\n" not in raw and b"\r" not in raw
    return raw


def assert_no_secrets(log: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret and secret not in log


def session_jwt(local: Local) -> str:
    token: str = json.loads((local.home / "session.json").read_text())["session_jwt"]
    return token


def test_boto3_takes_credentials_from_the_endpoint(
    local: Local, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with serving(local) as daemon:
        uri = daemon.exports["AWS_CONTAINER_CREDENTIALS_FULL_URI"]
        token_file = Path(daemon.exports["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"])
        assert set(daemon.exports) == {
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
        }
        parts = urlsplit(uri)
        assert (parts.scheme, parts.hostname, parts.path) == ("http", "127.0.0.1", "/credentials")
        assert token_file.parent == local.home
        token = assert_private(token_file).decode()

        aws_environment(monkeypatch, tmp_path, local, **daemon.exports)
        assert caller_arn(local).endswith(f"/{SESSION_NAME}")

        # The token, verbatim, and nothing else.
        for header in (
            {},
            {"Authorization": "x" * len(token)},
            {"Authorization": f"Bearer {token}"},
        ):
            refused = requests.get(uri, headers=header, timeout=5)
            assert (refused.status_code, refused.json()) == (
                401,
                {"message": "send the token from AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"},
            )
        answer = requests.get(uri, headers={"Authorization": token}, timeout=5)
        assert answer.status_code == 200 and answer.headers["Cache-Control"] == "no-store"
        body = answer.json()
        assert set(body) == {"AccessKeyId", "SecretAccessKey", "Token", "Expiration", "RoleArn"}
        assert body["RoleArn"] == ROLE and body["Expiration"].endswith("Z")
        assert (
            requests.get(uri + "x", headers={"Authorization": token}, timeout=5).status_code == 404
        )

        # Listening on 127.0.0.1 and nowhere else (not 0.0.0.0, not ::).
        assert listening_addresses(parts.port or 0) == {LOOPBACK_V4}

        assert f"got credentials for {ROLE}, expire {body['Expiration']}" in daemon.log
        assert "refused a request without the endpoint's token" in daemon.log
        secrets = [token, body["SecretAccessKey"], body["Token"], session_jwt(local)]
        assert_no_secrets(daemon.log, *secrets)


def test_web_identity_token_file_for_boto3_renewed_ahead_of_expiry(
    local: Local, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "web-identity-token"
    # 2% of a 300 s token: renewed after 6 s.
    args = ["--no-container", "--web-identity-token-file", str(path), "--refresh-at", "0.02"]
    with serving(local, *args) as daemon:
        assert daemon.exports == {
            "AWS_WEB_IDENTITY_TOKEN_FILE": str(path),
            "AWS_ROLE_ARN": ROLE,
            "AWS_ROLE_SESSION_NAME": SESSION_NAME,
        }
        first = assert_private(path).decode()
        # moto's STS accepts any string: check the token as AWS STS would, over HTTP.
        claims = sts.check(first, provider_url=local.base, client_ids=["sts.amazonaws.com"])
        assert claims["exp"] - claims["iat"] == 300

        aws_environment(monkeypatch, tmp_path, local, **daemon.exports)
        assert caller_arn(local).endswith(f"/{SESSION_NAME}")

        daemon.wait_for_log(r"refreshed the web identity token in \S+, expires \S+Z", timeout=20)
        second = assert_private(path).decode()
        assert second != first
        sts.check(second, provider_url=local.base, client_ids=["sts.amazonaws.com"])
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".web-identity")] == []
        assert_no_secrets(daemon.log, first, second, session_jwt(local))


def test_keeps_serving_while_the_broker_is_down_then_stops_on_sigterm(
    sqlite_url: str, smtp_server: StartServer, tmp_path: Path
) -> None:
    with ExitStack() as stack:
        with running(sqlite_url, smtp_server, tmp_path) as local:
            assert local.init().returncode == 0
            # 0.1% of 3600 s: the endpoint's credentials are due for renewal after 3.6 s.
            daemon = stack.enter_context(serving(local, "--refresh-at", "0.001"))
        # The broker and STS are stopped now.
        uri = daemon.exports["AWS_CONTAINER_CREDENTIALS_FULL_URI"]
        token_file = Path(daemon.exports["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"])
        token = token_file.read_text()
        before = requests.get(uri, headers={"Authorization": token}, timeout=5).json()
        line = daemon.wait_for_log(r"agentkeys serve: could not refresh credentials .*\n")
        assert re.fullmatch(
            r"agentkeys serve: could not refresh credentials \(step 4 \(challenge\): "
            r"http://127\.0\.0\.1:\d+ did not answer \(connection failed\)\); retrying in 1 s, "
            rf"keeping the current one \(expires {before['Expiration']}\)\n",
            line,
        )
        after = requests.get(uri, headers={"Authorization": token}, timeout=5)
        assert after.status_code == 200 and after.json() == before

        asked = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(timeout=10) == 0
        assert time.monotonic() - asked < 3
        assert daemon.log.endswith("agentkeys serve: stopping\n")
        assert not token_file.exists()
        secrets = [token, before["SecretAccessKey"], before["Token"], session_jwt(local)]
        assert_no_secrets(daemon.log, *secrets)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["serve"], "no role"),
        (["serve", "--no-container"], "nothing to serve"),
        (["serve", "--web-identity-token-file", "/no/such/folder/token"], "no folder"),
        (["serve", "--refresh-at", "0.95"], "0.95"),
        (["serve", "--port", "65536"], "65536"),
    ],
)
def test_serve_usage_errors_exit_2(arguments: list[str], message: str, tmp_path: Path) -> None:
    role = "" if message == "no role" else ROLE
    env = {"AGENTKEYS_HOME": str(tmp_path), "AGENTKEYS_ROLE_ARN": role}
    result = CliRunner().invoke(main, arguments, env=env)
    assert result.exit_code == 2 and message in result.output, result.output


def test_serve_help_says_what_to_export() -> None:
    result = CliRunner().invoke(main, ["serve", "--help"])
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and " ".join(EXIT_CODES.split()) in text
    for name in (
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_ROLE_SESSION_NAME",
    ):
        assert name in text


def jwt_of(claims: Any) -> str:
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"e30.{body}.c2ln"


@pytest.mark.parametrize(
    "token",
    ["", "no-dots", "a.!!!.c", jwt_of([1]), jwt_of({"exp": 5}), jwt_of({"iat": 9, "exp": 9})],
)
def test_a_token_without_a_lifetime_is_untrusted(token: str) -> None:
    with pytest.raises(Untrusted):
        token_times(token)


def test_token_times_reads_iat_and_exp() -> None:
    assert token_times(jwt_of({"iat": 100, "exp": 400, "sub": "x"})) == (100, 400)
