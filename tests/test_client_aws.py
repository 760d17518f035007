"""`agentkeys.client.aws_session`: a boto3 session that takes and refreshes its credentials
through the CLI's per-role cache and lock, against a real broker under gunicorn and moto's STS."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agentkeys.client import aws_session
from agentkeys.client.cache import Home, credentials_name
from agentkeys.client.errors import NotSignedIn
from agentkeys.crypto import derive_wallet, omni
from tests.live import ROOT
from tests.smtp import StartServer
from tests.test_client_e2e import EMAIL, ROLE, Local, running
from tests.vectors import VECTOR_MASTER


@pytest.fixture
def signed_in(
    sqlite_url: str, smtp_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Local]:
    """A person signed in with `agentkeys init`, and this process in the client's environment."""
    with running(sqlite_url, smtp_server, tmp_path) as local:
        initialised = local.init()
        assert initialised.returncode == 0, initialised.stderr
        for name, value in local.env.items():
            monkeypatch.setenv(name, value)
        yield local


def cache_name(local: Local) -> str:
    env = local.env
    return credentials_name(
        env["AGENTKEYS_BROKER_URL"], ROLE, 3600, env["AGENTKEYS_STS_ENDPOINT_URL"]
    )


def role_session_arn_tail() -> str:
    """The assumed role's session name: the wallet's hex, never the email."""
    return "/agentkeys-" + derive_wallet(VECTOR_MASTER, omni("email", EMAIL)).address.lower()[2:]


def printed_key(local: Local) -> str:
    printed = local.run("credentials")
    assert printed.returncode == 0, printed.stderr
    key: str = json.loads(printed.stdout)["AccessKeyId"]
    return key


def signing_keys(client: Any) -> list[str]:
    """The access key each request the client sends is signed with, as it goes out."""
    keys: list[str] = []

    def record(request: Any, **_: Any) -> None:
        header = request.headers["Authorization"]
        header = header.decode() if isinstance(header, bytes) else header
        keys.append(header.split("Credential=", 1)[1].split("/", 1)[0])

    client.meta.events.register("before-send", record)
    return keys


def test_session_assumes_the_role_and_shares_the_cache(signed_in: Local) -> None:
    local = signed_in
    first = aws_session(role_arn=ROLE)
    identity = first.client("sts", endpoint_url=local.sts_url).get_caller_identity()
    assert identity["Arn"].endswith(role_session_arn_tail())
    key = first.get_credentials().get_frozen_credentials().access_key

    # Each mint gets a fresh key from STS: the same key means the second session minted nothing.
    second = aws_session()  # the role from AGENTKEYS_ROLE_ARN
    assert second.get_credentials().get_frozen_credentials().access_key == key
    assert second.region_name == "us-east-1"
    assert printed_key(local) == key  # the CLI reads the same cache
    assert (Home(local.home).read(cache_name(local)) or {})["access_key_id"] == key


def test_botocore_refreshes_through_the_cache(signed_in: Local) -> None:
    local = signed_in
    session = aws_session(role_arn=ROLE)
    old = session.get_credentials().get_frozen_credentials().access_key

    # Five minutes left, both in the cache file and in botocore's copy: inside the refresh window.
    near = int(time.time()) + 300
    home = Home(local.home)
    cached = home.read(cache_name(local))
    assert cached is not None and cached["access_key_id"] == old
    home.write(cache_name(local), cached | {"expiration": near})
    session.get_credentials()._expiry_time = datetime.fromtimestamp(near, UTC)  # no public setter

    client = session.client("sts", endpoint_url=local.sts_url)
    sent = signing_keys(client)
    assert client.get_caller_identity()["Arn"].endswith(role_session_arn_tail())
    [new] = sent
    assert new != old  # botocore asked our refresh function, which minted under the lock
    assert (home.read(cache_name(local)) or {})["access_key_id"] == new
    assert printed_key(local) == new
    left = session.get_credentials()._expiry_time - datetime.now(UTC)
    assert left > timedelta(minutes=50)


def test_refuses_without_a_role_or_a_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENTKEYS_ROLE_ARN", raising=False)
    home = str(tmp_path / "home")
    with pytest.raises(ValueError, match="no role"):
        aws_session(home=home)
    with pytest.raises(ValueError, match="duration"):
        aws_session(ROLE, duration=60, home=home)
    with pytest.raises(TypeError, match="brokr_url"):
        aws_session(ROLE, brokr_url="http://127.0.0.1:1")
    with pytest.raises(NotSignedIn) as refused:  # never a prompt, and no request is sent
        aws_session(ROLE, home=home, broker_url="http://127.0.0.1:1")
    assert refused.value.line() == (
        "agentkeys: session: not signed in to http://127.0.0.1:1; run `agentkeys init`"
    )


def test_importing_the_client_loads_no_boto3() -> None:
    code = (
        "import sys, agentkeys.client as c\n"
        "before = 'boto3' in sys.modules\n"
        "c.aws_session\n"
        "print(before, 'boto3' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.split() == ["False", "True"], result.stderr
