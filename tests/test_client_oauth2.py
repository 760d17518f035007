"""`agentkeys init --provider`: the URL to open is printed (no browser with --no-browser), the
person signs in at the provider, and init ends signed in; a refusal there ends it at once."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from agentkeys.crypto import derive_wallet, omni
from tests.live import ROOT
from tests.oidc_provider import OIDCProvider
from tests.smtp import StartServer
from tests.test_client_e2e import AGENTKEYS, Local, running
from tests.vectors import VECTOR_MASTER


@contextmanager
def with_provider(
    sqlite_url: str, smtp_server: StartServer, tmp_path: Path
) -> Iterator[tuple[Local, OIDCProvider]]:
    with (
        OIDCProvider() as provider,
        running(
            sqlite_url,
            smtp_server,
            tmp_path,
            AGENTKEYS_OAUTH2_TESTIDP_ISSUER=provider.issuer,
            AGENTKEYS_OAUTH2_TESTIDP_CLIENT_ID=provider.client_id,
            AGENTKEYS_OAUTH2_TESTIDP_CLIENT_SECRET=provider.client_secret or "",
        ) as local,
    ):
        provider.redirect_uris = (f"{local.base}/auth/oauth2/callback",)
        yield local, provider


def init_at_the_provider(local: Local) -> subprocess.CompletedProcess[str]:
    """Run init, take the URL it prints, and go through the provider as a browser would."""
    command = [*AGENTKEYS, "init", "--provider", "testidp", "--no-browser"]
    env = local.env | {"DISPLAY": ":0"}  # a display, but --no-browser: nothing is opened
    with subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stderr is not None
        shown: list[str] = []
        deadline = time.monotonic() + 30
        while not shown or not shown[-1].startswith("  http"):
            assert time.monotonic() < deadline, shown
            shown.append(process.stderr.readline())
        url = shown[-1].strip()
        to_callback = requests.get(url, allow_redirects=False, timeout=10)
        page = requests.get(to_callback.headers["Location"], timeout=10)
        if page.status_code == 200:
            approval = page.text.split('id="approval-token" value="')[1].split('"')[0]
            approved = requests.post(
                f"{local.base}/v1/auth/oauth2/approve",
                json={"approval_token": approval},
                timeout=10,
            )
            assert approved.status_code == 200, approved.text
        out, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(command, process.returncode, out, "".join(shown) + err)


def test_init_with_an_oauth2_provider(
    sqlite_url: str, smtp_server: StartServer, tmp_path: Path
) -> None:
    with with_provider(sqlite_url, smtp_server, tmp_path) as (local, provider):
        signed_in = init_at_the_provider(local)
    assert signed_in.returncode == 0, signed_in.stderr
    account = omni("oauth2_testidp", provider.sub)
    assert f"account  {account}" in signed_in.stdout
    assert f"wallet   {derive_wallet(VECTOR_MASTER, account).address}" in signed_in.stdout
    assert "Your code: " in signed_in.stderr and "Open this URL to sign in:" in signed_in.stderr


def test_a_refusal_at_the_provider_ends_init_at_once(
    sqlite_url: str, smtp_server: StartServer, tmp_path: Path
) -> None:
    with with_provider(sqlite_url, smtp_server, tmp_path) as (local, provider):
        provider.deny = True
        started = time.monotonic()
        refused = init_at_the_provider(local)
        took = time.monotonic() - started
    assert refused.returncode == 4, refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        "agentkeys: step 1 (sign-in): The provider refused: access_denied "
        "(The user denied access) (provider_error)"
    )
    assert took < 30  # the request's 10 minutes were not waited out
    assert not (local.home / "session.json").exists()
