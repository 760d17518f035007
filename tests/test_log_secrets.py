"""The whole flow with every logger at DEBUG, broker and client in this process: email and OAuth2
sign-in, linking, the wallet, minting and the client's `credentials` through STS. No log line
and nothing the client prints to stderr holds the master secret, a derived private key, a
magic-link token, an OAuth2 code or state, a session or OIDC JWT, or an AWS secret."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from werkzeug.serving import make_server

from agentkeys.broker.factory import create_app
from agentkeys.client.cli import main
from agentkeys.crypto import derive_secret, omni
from agentkeys.settings import OAuth2Provider, Secret
from tests.conftest import BASE_SETTINGS, services_of
from tests.live import ROOT, clean_env, free_port
from tests.oidc_provider import OIDCProvider
from tests.smtp import StartServer, magic_link_token
from tests.sts import CheckingSts
from tests.test_log_hygiene import log_everything
from tests.vectors import VECTOR_MASTER

EMAIL = "hygiene@example.com"
ROLE = "arn:aws:iam::123456789012:role/agentkeys-agent"
KEK = "6b" * 32
# A browser, apart from this process: the callback URL it follows carries the code and state,
# which its own HTTP library would log here at DEBUG.
BROWSER = """
import json, sys, requests
to_callback = requests.get(sys.argv[1], allow_redirects=False, timeout=10)
location = to_callback.headers["Location"]
page = requests.get(location, timeout=10)
approval = page.text.split('id="approval-token" value="')[1].split('"')[0]
print(json.dumps({"callback": location, "approval": approval}))
"""


@pytest.fixture
def moto_sts(tmp_path: Path) -> Iterator[str]:
    """moto's STS in a process of its own: what a stand-in logs is not ours to judge."""
    port = free_port()
    code = (
        "import time\nfrom moto.server import ThreadedMotoServer\n"
        f"ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False).start()\n"
        "time.sleep(3600)\n"
    )
    command = [sys.executable, "-c", code]
    process = subprocess.Popen(command, cwd=ROOT, env=clean_env(), stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(base, timeout=1)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "moto did not start"
                time.sleep(0.1)
        yield base
    finally:
        process.kill()
        process.wait(timeout=10)


def test_no_secret_reaches_a_log_line(
    sqlite_url: str,
    smtp_server: StartServer,
    moto_sts: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log_everything(caplog)
    wallet_sessions = record_wallet_sessions(monkeypatch)
    mailbox = smtp_server()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with OIDCProvider(redirect_uris=(f"{base}/auth/oauth2/callback",)) as provider:
        settings = dataclasses.replace(
            BASE_SETTINGS,
            issuer=base,
            database_url=sqlite_url,
            mail_url=f"smtp://127.0.0.1:{mailbox.port}",
            key_encryption_key=Secret(bytes.fromhex(KEK)),
            oauth2_providers=(
                OAuth2Provider(
                    "testidp",
                    provider.issuer,
                    provider.client_id,
                    Secret((provider.client_secret or "").encode()),
                ),
            ),
        )
        app = create_app(settings, instance_path=str(tmp_path / "instance"))
        server = make_server("127.0.0.1", port, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        sts = CheckingSts(moto_sts, provider_url=base)
        try:
            secrets = run_the_flow(base, mailbox, provider, sts, tmp_path / "home")
            secrets |= {f"wallet session {i}": jwt for i, jwt in enumerate(wallet_sessions)}
        finally:
            sts.stop()
            server.shutdown()
            services_of(app).engine.dispose()
    shown = caplog.text + "\n".join(record.getMessage() for record in caplog.records)
    assert len(caplog.records) > 50  # DEBUG was on: requests, SMTP, the dev signer, STS
    assert {"urllib3.connectionpool", "werkzeug"} <= {r.name for r in caplog.records}
    leaked = sorted(name for name, value in secrets.items() if value in shown)
    assert leaked == []
    assert all(len(value) >= 16 for value in secrets.values()), secrets.keys()


def record_wallet_sessions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The client keeps its wallet sessions to itself: note each one it is given."""
    from agentkeys.client import flow

    seen: list[str] = []
    original = flow.Client.wallet_session

    def noting(self: flow.Client, *args: Any) -> dict[str, Any]:
        verified = original(self, *args)
        seen.append(str(verified["session_jwt"]))
        return verified

    monkeypatch.setattr(flow.Client, "wallet_session", noting)
    return seen


def run_the_flow(
    base: str, mailbox: object, provider: OIDCProvider, sts: CheckingSts, home: Path
) -> dict[str, str]:
    """Sign in by email, link an OAuth2 identity, get credentials twice; every secret seen."""
    runner = CliRunner()  # stdout and stderr apart
    env = {
        "AGENTKEYS_BROKER_URL": base,
        "AGENTKEYS_HOME": str(home),
        "AGENTKEYS_ROLE_ARN": ROLE,
        "AGENTKEYS_STS_ENDPOINT_URL": sts.url,
        "AWS_REGION": "us-east-1",
    }
    secrets: dict[str, str] = {"master secret": VECTOR_MASTER.hex(), "KEK": KEK}
    printed: list[str] = []

    def approve_mail() -> None:
        deadline = time.monotonic() + 30
        while not mailbox.recorder.envelopes:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        token = magic_link_token(mailbox.recorder.message())  # type: ignore[attr-defined]
        secrets["magic-link token"] = token
        requests.post(base + "/v1/auth/email/verify", json={"token": token}, timeout=10)

    approver = threading.Thread(target=approve_mail)
    approver.start()
    signed_in = runner.invoke(main, ["init", "--email", EMAIL], env=env)
    approver.join()
    assert signed_in.exit_code == 0, signed_in.output
    printed.append(signed_in.stderr)
    session = json.loads((home / "session.json").read_text())
    account = session["account"]
    secrets["identity session"] = session["session_jwt"]
    secrets["derived private key"] = derive_secret(VECTOR_MASTER, account).hex()

    started = requests.post(
        base + "/v1/auth/oauth2/start", json={"provider": "testidp"}, timeout=10
    ).json()
    browser = subprocess.run(
        [sys.executable, "-c", BROWSER, started["authorization_url"]],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    seen = json.loads(browser.stdout)
    query = dict(part.split("=", 1) for part in seen["callback"].split("?", 1)[1].split("&"))
    secrets |= {"OAuth2 code": query["code"], "OAuth2 state": query["state"]}
    secrets["approval token"] = seen["approval"]
    requests.post(
        base + "/v1/auth/oauth2/approve", json={"approval_token": seen["approval"]}, timeout=10
    )
    status = requests.get(
        base + started["poll_url"],
        headers={"Authorization": f"Bearer {started['poll_token']}"},
        timeout=10,
    ).json()
    assert status["status"] == "verified", status
    secrets["OAuth2 session"] = status["session_jwt"]
    secrets["poll token"] = started["poll_token"]
    secrets["derived private key (OAuth2 account)"] = derive_secret(
        VECTOR_MASTER, omni("oauth2_testidp", provider.sub)
    ).hex()

    for _ in range(2):  # a mint, then the cache
        credentials = runner.invoke(main, ["credentials"], env=env)
        assert credentials.exit_code == 0, credentials.output
        printed.append(credentials.stderr)
    body = json.loads(credentials.stdout)
    secrets |= {
        "AWS secret key": body["SecretAccessKey"],
        "AWS session token": body["SessionToken"],
    }
    [oidc] = sts.tokens
    secrets["OIDC token"] = oidc
    leaked = sorted(name for name, value in secrets.items() if value in "".join(printed))
    assert leaked == [], "the client printed secrets on stderr"
    return secrets
