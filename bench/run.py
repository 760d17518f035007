"""Benchmark: /healthz, /dev/derive-address and /dev/sign-message in one run, as ratios.

Starts gunicorn (2 workers, the Procfile's config) on loopback, drives it with Debian's `wrk`
(a Python load generator on the same cores would hide the server's cost), and interleaves the
endpoints over several rounds so machine noise hits all of them alike. Then compares the
in-process cost of derive+sign on coincurve with the same work on the pure-Python `ecdsa`.

    .venv/bin/python -m bench.run [--seconds 5] [--rounds 3] [--connections 8]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import timeit
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agentkeys.crypto import (
    derive_secret,
    derive_wallet,
    keccak256,
    personal_digest,
    to_checksum_address,
)
from agentkeys.identity import EMAIL, Identity
from agentkeys.services import Services
from agentkeys.settings import Settings
from tests.live import ROOT, clean_env, free_port, wait_until_up

ANCHOR = "ab" * 32
TARGET_SIGN_RATIO = 0.8


def siwe_message(address: str, domain: str, anchor: str) -> str:
    """A challenge as the broker binds it to the account `anchor` (the signer signs no other)."""
    now = datetime.now(UTC).replace(microsecond=0)
    stamp = "%Y-%m-%dT%H:%M:%SZ"
    return (
        f"{domain} wants you to sign in with your Ethereum account:\n{address}\n\n"
        f"Sign in to AgentKeys.\n\nURI: http://{domain}\nVersion: 1\nChain ID: 1\n"
        f"Nonce: {secrets.token_hex(8)}\nIssued At: {now.strftime(stamp)}\n"
        f"Expiration Time: {(now + timedelta(minutes=30)).strftime(stamp)}\n"
        f"Resources:\n- urn:agentkeys:account:{anchor}"
    )


def wrk_script(body: dict[str, str] | None, bearer: str | None = None) -> str:
    if body is None:
        return ""
    script = (
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(json.dumps(body))}\n"
    )
    if bearer is not None:
        script += f'wrk.headers["Authorization"] = "Bearer {bearer}"\n'
    return script


def signed_in_account(env: dict[str, str]) -> tuple[str, str]:
    """Release the database, sign a person in, and return their anchor and session token."""
    subprocess.run([sys.executable, "-m", "agentkeys.release"], cwd=ROOT, env=env, check=True)
    services = Services.build(Settings.from_env(env))
    identity = Identity(EMAIL, "bench@example.com")
    anchor = services.store.sign_in(identity)
    token, _ = services.sessions.mint(anchor, identity)
    services.engine.dispose()
    return anchor, token


def server_cpu_seconds(master_pid: int) -> float:
    """User + system CPU time of the gunicorn workers (children of the master), from /proc."""
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()
    ticks = 0
    for pid in children:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def run_wrk(url: str, script: Path, seconds: int, connections: int) -> tuple[int, float]:
    """Requests completed and requests/s."""
    command = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in output or ("Socket errors" in output and "timeout" in output):
        raise SystemExit(f"bench: errors while loading {url}:\n{output}")
    count = re.search(r"(\d+) requests in", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not count or not rate:
        raise SystemExit(f"bench: could not read wrk output:\n{output}")
    return int(count.group(1)), float(rate.group(1))


@dataclass
class Measured:
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # server CPU per request


def http_benchmark(
    seconds: int, rounds: int, connections: int, database_url: str
) -> dict[str, Measured]:
    master = secrets.token_bytes(32)
    port = free_port()
    domain = f"127.0.0.1:{port}"
    env = clean_env(
        AGENTKEYS_ENV="development",
        AGENTKEYS_ISSUER=f"http://{domain}",
        AGENTKEYS_ACCESS_LOG="off",
        DEV_KEY_SERVICE_MASTER_SECRET=master.hex(),
        DATABASE_URL=database_url,
    )
    anchor, bearer = signed_in_account(env)
    address = derive_wallet(master, anchor).address
    bodies: dict[str, dict[str, str] | None] = {
        "/healthz": None,
        "/dev/derive-address": {"omni_account": anchor},
        "/dev/sign-message": {
            "omni_account": anchor,
            "message_hex": siwe_message(address, domain, anchor).encode().hex(),
        },
    }
    command = [sys.executable, "-m", "gunicorn", "--config", "config/gunicorn.conf.py"]
    command += ["--bind", domain, "--workers", "2", "wsgi:app"]
    results = {path: Measured() for path in bodies}
    with (
        tempfile.TemporaryDirectory() as tmp,
        subprocess.Popen(command, cwd=ROOT, env=env) as server,
    ):
        try:
            wait_until_up(f"http://{domain}/healthz", server)
            scripts = {}
            for index, (path, body) in enumerate(bodies.items()):
                scripts[path] = Path(tmp, f"{index}.lua")
                scripts[path].write_text(wrk_script(body, bearer))
            for number in range(1, rounds + 1):
                for path in bodies:
                    cpu_before = server_cpu_seconds(server.pid)
                    count, rps = run_wrk(
                        f"http://{domain}{path}", scripts[path], seconds, connections
                    )
                    cpu_us = (server_cpu_seconds(server.pid) - cpu_before) / count * 1e6
                    results[path].rps.append(rps)
                    results[path].cpu_us.append(cpu_us)
                    print(
                        f"  round {number}/{rounds} {path}: {rps:,.0f} req/s, "
                        f"server {cpu_us:.0f} µs CPU/request",
                        file=sys.stderr,
                    )
        finally:
            server.terminate()
            server.wait(timeout=30)
    return results


def ecdsa_derive_and_sign(master: bytes, anchor: str, message: bytes) -> tuple[str, str]:
    """The same derive+sign on the pure-Python `ecdsa` package, for the in-process ratio."""
    import ecdsa
    from ecdsa.util import sigencode_string_canonize

    key = ecdsa.SigningKey.from_string(derive_secret(master, anchor), curve=ecdsa.SECP256k1)
    public = key.get_verifying_key()
    address = keccak256(public.to_string())[-20:]
    digest = personal_digest(message)
    signature = key.sign_digest_deterministic(
        digest, hashfunc=hashlib.sha256, sigencode=sigencode_string_canonize
    )
    candidates = ecdsa.VerifyingKey.from_public_key_recovery_with_digest(
        signature, digest, curve=ecdsa.SECP256k1
    )
    v = 27 + [c.to_string() for c in candidates].index(public.to_string())
    return to_checksum_address("0x" + address.hex()), "0x" + signature.hex() + format(v, "02x")


def per_call_seconds(function: Callable[[], object], minimum: float = 1.0) -> float:
    timer = timeit.Timer(function)
    number, _ = timer.autorange()
    number = max(number, int(number * minimum / 0.2))
    return min(timer.repeat(repeat=3, number=number)) / number


def in_process_benchmark() -> dict[str, float]:
    master, message = secrets.token_bytes(32), siwe_message("0x" + "00" * 20, "x", ANCHOR).encode()

    def ours_derive_and_sign() -> tuple[str, str]:
        wallet = derive_wallet(master, ANCHOR)
        return wallet.address, wallet.sign_personal(message)

    if ours_derive_and_sign() != ecdsa_derive_and_sign(master, ANCHOR, message):
        raise SystemExit("bench: coincurve and ecdsa disagree")
    ours = per_call_seconds(ours_derive_and_sign)
    pure = per_call_seconds(lambda: ecdsa_derive_and_sign(master, ANCHOR, message))
    return {"coincurve_us": ours * 1e6, "ecdsa_us": pure * 1e6, "speedup": pure / ours}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=int, default=5, help="length of one wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians kept")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections")
    parser.add_argument("--database-url", help="default: a new SQLite file")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("bench: needs wrk (Debian: apt-get install -y wrk)", file=sys.stderr)
        return 2
    print(f"bench: {os.cpu_count()} cores; gunicorn -w 2 on loopback; wrk -t2 -c{args.connections}")
    with tempfile.TemporaryDirectory() as tmp:
        database_url = args.database_url or f"sqlite:///{tmp}/bench.sqlite3"
        results = http_benchmark(args.seconds, args.rounds, args.connections, database_url)
    rps = {path: statistics.median(m.rps) for path, m in results.items()}
    cpu = {path: statistics.median(m.cpu_us) for path, m in results.items()}
    base = rps["/healthz"]
    print(f"{'endpoint':<22}{'req/s':>10}{'ratio':>8}{'server µs CPU/req':>20}")
    for path, value in rps.items():
        print(f"{path:<22}{value:>10,.0f}{value / base:>8.2f}{cpu[path]:>20.0f}")
    sign_ratio = rps["/dev/sign-message"] / base
    verdict = "meets" if sign_ratio >= TARGET_SIGN_RATIO else "MISSES"
    print(f"sign-message/healthz = {sign_ratio:.2f} ({verdict} the {TARGET_SIGN_RATIO} target)")
    cost = in_process_benchmark()
    print(
        f"derive+sign in-process: coincurve {cost['coincurve_us']:.0f} µs, "
        f"ecdsa {cost['ecdsa_us']:.0f} µs, ecdsa/coincurve = {cost['speedup']:.1f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
