"""Benchmark: the `agentkeys` command, warm and cold.

Warm: `agentkeys credentials --format credential-process` on a cache hit, as a ratio to
`python -c pass` on the same interpreter, interleaved over runs (goal ≤ 3x: the hit imports
neither boto3 nor requests). Cold: a mint (steps 4-7, then STS) against the broker under
gunicorn and moto's STS on loopback, in ms with each step's share, in-process and as the command.

    .venv/bin/python -m bench.client [--warm-runs 30] [--cold-rounds 10]
"""

from __future__ import annotations

import argparse
import logging
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests
from moto.server import ThreadedMotoServer

from agentkeys.broker.services import Services
from agentkeys.client import flow
from agentkeys.client.cache import Home, credentials_name
from agentkeys.client.config import ClientConfig
from agentkeys.client.credentials import Credentials
from agentkeys.client.http import Api
from agentkeys.identity import EMAIL, Identity
from agentkeys.settings import Settings
from tests.live import ROOT, clean_env, free_port, gunicorn

ROLE = "arn:aws:iam::123456789012:role/agentkeys-bench"
TARGET_WARM_RATIO = 3.0
UNUSED_BROKER = "http://127.0.0.1:9"  # the warm path never contacts the broker
STEPS = (flow.CHALLENGE, flow.SIGN, flow.VERIFY, flow.MINT, flow.STS, "client checks")
COMMANDS = {
    "console script": [str(Path(sys.executable).with_name("agentkeys"))],
    "python -m": [sys.executable, "-m", "agentkeys.client.cli"],
}


def run_seconds(command: list[str], env: Mapping[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=dict(env), check=True, capture_output=True)
    return time.perf_counter() - start


def warm_benchmark(runs: int, home: Path) -> dict[str, list[float]]:
    """Seconds per run of `python -c pass` and of each form of the command on a cache hit."""
    stored = Credentials("ASIABENCHWARM0000001", "s" * 40, "t" * 400, int(time.time()) + 3600)
    Home(home).write(credentials_name(UNUSED_BROKER, ROLE, 3600), stored.to_json())
    env = clean_env(
        AGENTKEYS_HOME=str(home), AGENTKEYS_ROLE_ARN=ROLE, AGENTKEYS_BROKER_URL=UNUSED_BROKER
    )
    credentials = ["credentials", "--format", "credential-process"]
    for command in COMMANDS.values():  # a hit, and the files in the page cache
        printed = subprocess.run([*command, *credentials], env=env, capture_output=True, text=True)
        if stored.access_key_id not in printed.stdout:
            raise SystemExit(f"bench: the cache was not hit: {printed.stderr}")
    timings: dict[str, list[float]] = {"python -c pass": [], **{name: [] for name in COMMANDS}}
    for _ in range(runs):
        timings["python -c pass"].append(run_seconds([sys.executable, "-c", "pass"], env))
        for name, command in COMMANDS.items():
            timings[name].append(run_seconds([*command, *credentials], env))
    return timings


class TimedApi(Api):
    """An Api that adds each request's wall time, retries included, to `spent` under its
    step name."""

    def __init__(self, base: str, spent: dict[str, float], **options: Any) -> None:
        super().__init__(base, **options)
        self.spent = spent

    def send(self, step: str, *args: Any, **kwargs: Any) -> requests.Response:
        start = time.perf_counter()
        try:
            return super().send(step, *args, **kwargs)
        finally:
            self.spent[step] = self.spent.get(step, 0.0) + time.perf_counter() - start


def timed_mint(config: ClientConfig, session: dict[str, Any]) -> dict[str, float]:
    """One cold mint as `agentkeys credentials` does it (a new client, so new connections):
    seconds per step; what the client does between calls is `client checks`."""
    spent: dict[str, float] = {}
    client = flow.Client(config)
    client.broker = TimedApi(config.broker_url, spent)
    client.signer = TimedApi(config.signer_url, spent, session=client.broker.http)
    start = time.perf_counter()
    token = client.oidc_token(session)
    sts = time.perf_counter()
    flow.assume_role(config, token, role_arn=ROLE, duration=3600, wallet=session["wallet"])
    spent[flow.STS] = time.perf_counter() - sts
    spent["client checks"] = time.perf_counter() - start - sum(spent.values())
    return spent


def shares(rounds: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """Per step: the median in ms and its share of the sum of the medians."""
    medians = {step: statistics.median(r[step] for r in rounds) * 1000 for step in rounds[0]}
    total = sum(medians.values())
    return {step: (ms, ms / total) for step, ms in medians.items()}


def sign_in(config: ClientConfig, env: Mapping[str, str]) -> dict[str, Any]:
    """A person signed in (as the broker would after the magic link), their wallet derived and
    linked, kept as `agentkeys init` keeps it: the stored session."""
    services = Services.build(Settings.from_env(env))
    identity = Identity(EMAIL, "bench@example.com")
    account = services.store.sign_in(identity)
    token, session = services.sessions.mint(account, identity)
    services.engine.dispose()
    status = {
        "session_jwt": token,
        "expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(session.expires_at)),
        "account": account,
        "omni_account": session.omni_account,
        "identity_type": session.identity_type,
    }
    client = flow.Client(config)
    wallet = client.derive_address(token, account)
    client.link_wallet(token, wallet)
    flow.save_session(config, status, wallet)
    return config.session()


def cold_benchmark(rounds: int, tmp: Path) -> tuple[list[dict[str, float]], list[float]]:
    """Per-step seconds of in-process mints, and seconds of whole `agentkeys credentials` runs
    with nothing cached (interleaved)."""
    port, sts_port = free_port(), free_port()
    base, sts_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{sts_port}"
    env = clean_env(
        AGENTKEYS_ENV="development",
        AGENTKEYS_ISSUER=base,
        AGENTKEYS_ACCESS_LOG="off",
        AGENTKEYS_RATE_LIMITS="start_ip=100000/60,verify_ip=100000/60",
        DEV_KEY_SERVICE_MASTER_SECRET=secrets.token_hex(32),
        DATABASE_URL=f"sqlite:///{tmp / 'bench.sqlite3'}",
    )
    client_env = clean_env(
        AGENTKEYS_BROKER_URL=base,
        AGENTKEYS_HOME=str(tmp / "home"),
        AGENTKEYS_ROLE_ARN=ROLE,
        AGENTKEYS_STS_ENDPOINT_URL=sts_url,
        AWS_REGION="us-east-1",
        AWS_CONFIG_FILE=str(tmp / "aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp / "aws-credentials"),
    )
    config = ClientConfig.from_env(environ=client_env)
    cache = config.home.path / config.credentials_name(ROLE, 3600)
    command = [*COMMANDS["console script"], "credentials"]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=sts_port, verbose=False)
    moto.start()
    try:
        with gunicorn(env, workers=2, port=port):
            session = sign_in(config, env)
            timed_mint(config, session)  # proves the wallet; imports boto3 once
            steps, whole = [], []
            for number in range(1, rounds + 1):
                steps.append(timed_mint(config, session))
                cache.unlink(missing_ok=True)
                whole.append(run_seconds(command, client_env))
                print(
                    f"  round {number}/{rounds}: in-process {sum(steps[-1].values()) * 1000:.0f}"
                    f" ms, command {whole[-1] * 1000:.0f} ms",
                    file=sys.stderr,
                )
    finally:
        moto.stop()
    return steps, whole


def import_ms(module: str) -> float:
    """What importing `module` costs a fresh interpreter (a cold command pays it)."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(found.stdout) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--warm-runs", type=int, default=30, help="interleaved runs; medians kept")
    parser.add_argument("--cold-rounds", type=int, default=10, help="mints; medians kept")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        warm = warm_benchmark(args.warm_runs, Path(tmp, "warm"))
        steps, whole = cold_benchmark(args.cold_rounds, Path(tmp))
    base = statistics.median(warm["python -c pass"])
    print(f"warm `agentkeys credentials --format credential-process`, {args.warm_runs} runs")
    for name, runs in warm.items():
        ms = statistics.median(runs) * 1000
        print(f"  {name:<16}{ms:>8.1f} ms{statistics.median(runs) / base:>7.2f}x")
    ratio = statistics.median(warm["console script"]) / base
    verdict = "meets" if ratio <= TARGET_WARM_RATIO else "MISSES"
    print(f"console script / python -c pass = {ratio:.2f}x ({verdict} the ≤ 3x goal)")
    print(f"cold mint, {args.cold_rounds} rounds (medians)")
    split = shares(steps)
    for step in STEPS:
        ms, share = split[step]
        print(f"  {step:<20}{ms:>8.1f} ms{share:>7.0%}")
    print(f"  {'in-process total':<20}{sum(ms for ms, _ in split.values()):>8.1f} ms")
    print(f"  {'whole command':<20}{statistics.median(whole) * 1000:>8.1f} ms")
    print(
        f"a cold command also imports requests ({import_ms('requests'):.0f} ms) "
        f"and boto3 ({import_ms('boto3'):.0f} ms) in a fresh interpreter"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
