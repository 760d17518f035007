"""Benchmark: the broker's hot endpoints and whole client flows, as ratios to /healthz.

Starts gunicorn (2 workers, the Procfile's config) on loopback on a new SQLite file and/or a new
PostgreSQL database, drives it with Debian's `wrk` (a Python load generator on the same cores
would hide the server's cost) and interleaves /healthz, derive, sign, wallet start, wallet
verify (a different pre-signed challenge per request) and mint over several rounds, so machine
noise hits all of them alike; then complete client flows (agentkeys.client.flow.Client, steps
2-7 without STS) from one process per connection. Each is reported as req/s (flows/s), its
ratio to /healthz in the same round (median over rounds), the server CPU per request and the
workers' resident memory. The abuse limits count in the database (the default) or in Redis
(`--limits redis`, its database 12). Last, derive+sign in-process on coincurve against the
pure-Python `ecdsa`. Where a target is missed, `python -m bench.profile` shows where the time
goes.

    .venv/bin/python -m bench.run [--database sqlite|postgresql|both]
                                  [--limits database|redis|both] [--seconds 5] [--rounds 3]
                                  [--connections 8]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import secrets
import sys
import tempfile
import time
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
from bench.flows import FlowClients
from bench.load import (
    BODIES_LUA,
    WRK_THREADS,
    have_wrk,
    medians,
    ratios,
    run_wrk,
    write_bodies,
    wrk_script,
)
from bench.server import Account, BenchBroker, database

ANCHOR = "ab" * 32
HEALTHZ, DERIVE, SIGN = "/healthz", "/dev/derive-address", "/dev/sign-message"
START, VERIFY, MINT = "/v1/auth/wallet/start", "/v1/auth/wallet/verify", "/v1/mint-oidc-jwt"
ENDPOINTS = (HEALTHZ, DERIVE, SIGN, START, VERIFY, MINT)
FLOWS = "client flows (steps 2-7)"
TARGETS = {SIGN: 0.8, VERIFY: 0.5}
# A verify costs more than /healthz: its rate times this bounds any verify run's.
VERIFY_MARGIN = 1.5
WARM_UP_SECONDS = 1
DATABASES = {"sqlite": ("sqlite",), "postgresql": ("postgresql",), "both": ("sqlite", "postgresql")}
LIMITS = {"database": ("database",), "redis": ("redis",), "both": ("database", "redis")}
# A Redis database no test uses (they take 0, 13, 14 and 15): the bench's counters, which
# expire with their window, never meet a test's.
BENCH_REDIS_URL = "redis://127.0.0.1:6379/12"


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


class Workload:
    """What each endpoint is sent: one person's static requests, and fresh pre-signed verifies
    spread over as many accounts as connections (a daemon signs in as its own account)."""

    def __init__(self, broker: BenchBroker, folder: Path, connections: int) -> None:
        self.broker, self.folder = broker, folder
        self.main = broker.account("bench@example.com")
        self.signers = [broker.account(f"bench-verify-{n}@example.com") for n in range(connections)]
        self.flow_accounts: list[Account] = [
            broker.account(f"bench-flow-{n}@example.com") for n in range(connections)
        ]
        self.scripts: dict[str, Path] = {}

    def prepare(self) -> None:
        """The static scripts, made afresh (a new challenge to sign, a new wallet session)."""
        main, broker = self.main, self.broker
        message = broker.challenge_message(main)
        texts = {
            HEALTHZ: wrk_script(None),
            DERIVE: wrk_script({"omni_account": main.anchor}, main.token),
            SIGN: wrk_script(
                {"omni_account": main.anchor, "message_hex": message.encode().hex()}, main.token
            ),
            START: wrk_script({"address": main.address}, main.token),
            MINT: wrk_script(None, broker.wallet_session(main), method="POST"),
        }
        for number, (endpoint, text) in enumerate(texts.items()):
            self.scripts[endpoint] = self.folder / f"{number}.lua"
            self.scripts[endpoint].write_text(text)

    def script(self, endpoint: str, bodies: int) -> tuple[Path, list[str]]:
        """The wrk script and its arguments; for verify, `bodies` new pre-signed challenges."""
        if endpoint != VERIFY:
            return self.scripts[endpoint], []
        path = write_bodies(self.folder / "verify.txt", self.broker.presigned(self.signers, bodies))
        return BODIES_LUA, [str(path), str(WRK_THREADS)]


@dataclass
class VerifyBudget:
    """How many pre-signed challenges a verify run gets: 4x the fastest verify rate seen so far
    (the warm-up's at first), never more than /healthz could take at its fastest. Running out
    is an error (a 404 from the script), never a repeated challenge."""

    healthz_rps: float = 0.0
    verify_rps: float = 0.0

    def bodies(self, seconds: float) -> int:
        ceiling = math.ceil(self.healthz_rps * seconds * VERIFY_MARGIN) + 100
        if not self.verify_rps:
            return ceiling
        return min(ceiling, math.ceil(self.verify_rps * seconds * 4) + 200)

    def saw(self, endpoint: str, rps: float) -> None:
        if endpoint == HEALTHZ:
            self.healthz_rps = max(self.healthz_rps, rps)
        if endpoint == VERIFY:
            self.verify_rps = max(self.verify_rps, rps)


@dataclass(frozen=True)
class Measured:
    """One run of one endpoint (or of the flows)."""

    rate: float  # requests (flows) per second
    cpu_us: float  # server CPU per request (flow)
    busy: float  # the workers' CPU time over their wall time: near 1, bound by CPU; low, waits


def measure(
    broker: BenchBroker, work: Workload, endpoint: str, budget: VerifyBudget, seconds: int, c: int
) -> Measured:
    """One wrk run on an idle server."""
    broker.settle()
    script, args = work.script(endpoint, budget.bodies(seconds))
    before, start = broker.cpu_seconds(), time.perf_counter()
    run = run_wrk(broker.base + endpoint, script, seconds, c, script_args=args)
    cpu, wall = broker.cpu_seconds() - before, time.perf_counter() - start
    budget.saw(endpoint, run.rps)
    return Measured(run.rps, cpu / run.requests * 1e6, cpu / wall / broker.workers)


def flow_run(broker: BenchBroker, flows: FlowClients, seconds: int) -> Measured:
    """Flows for `seconds`; the flows that ran past the end count for the CPU per flow."""
    before: list[float] = []
    run = flows.run(seconds, started=lambda: before.append(broker.cpu_seconds()))
    cpu = broker.cpu_seconds() - before[0]
    return Measured(
        run.flows / seconds, cpu / run.finished * 1e6, cpu / run.elapsed / broker.workers
    )


@dataclass
class Results:
    database: str
    limits: str
    rounds: list[dict[str, Measured]] = field(default_factory=list)
    rss_warm: list[float] = field(default_factory=list)  # MiB per worker
    rss_end: list[float] = field(default_factory=list)


def http_benchmark(kind: str, limits: str, seconds: int, rounds: int, connections: int) -> Results:
    """Every endpoint and the flows, interleaved over `rounds`, on a new database of `kind`,
    with the abuse-limit counters in the database or in Redis (`limits`)."""
    results = Results(kind, limits)
    with (
        tempfile.TemporaryDirectory() as tmp,
        database(kind, Path(tmp)) as database_url,
    ):
        folder = Path(tmp)
        extra = {"AGENTKEYS_REDIS_URL": BENCH_REDIS_URL} if limits == "redis" else {}
        broker = BenchBroker(database_url, extra_env=extra)
        broker.release()
        work = Workload(broker, folder, connections)
        clients = [(account.anchor, account.token) for account in work.flow_accounts]
        budget = VerifyBudget()
        with broker.serving(), FlowClients(broker.base, clients, folder / "homes") as flows:
            work.prepare()
            for endpoint in ENDPOINTS:  # warm-up: pools, caches, the verify wallets linked
                measure(broker, work, endpoint, budget, WARM_UP_SECONDS, connections)
            flows.run(WARM_UP_SECONDS)
            broker.settle()
            results.rss_warm = broker.rss_mib()
            label = f"{kind}, limits in {limits}"
            for number in range(1, rounds + 1):
                work.prepare()
                found: dict[str, Measured] = {}
                for endpoint in ENDPOINTS:
                    found[endpoint] = measure(broker, work, endpoint, budget, seconds, connections)
                    _progress(label, number, rounds, endpoint, found[endpoint])
                broker.settle()
                found[FLOWS] = flow_run(broker, flows, seconds)
                _progress(label, number, rounds, FLOWS, found[FLOWS])
                results.rounds.append(found)
            broker.settle()
            results.rss_end = broker.rss_mib()
    return results


def _progress(label: str, number: int, rounds: int, name: str, found: Measured) -> None:
    print(
        f"  {label} round {number}/{rounds} {name}: {found.rate:,.0f}/s, "
        f"server {found.cpu_us:.0f} µs CPU each, workers {found.busy:.0%} busy",
        file=sys.stderr,
    )


def table(results: Results) -> list[str]:
    """The results as a Markdown table, then the workers' memory."""
    rates = [{name: m.rate for name, m in one.items()} for one in results.rounds]
    rate, ratio = medians(rates), ratios(rates, HEALTHZ)
    cpu = medians([{name: m.cpu_us for name, m in one.items()} for one in results.rounds])
    busy = medians([{name: m.busy for name, m in one.items()} for one in results.rounds])
    lines = [
        "| endpoint | req/s | ratio to /healthz | server µs CPU/req | workers busy | target |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name in rate:
        target = TARGETS.get(name)
        verdict = "" if target is None else f"≥ {target}: {_verdict(ratio[name], target)}"
        unit = " flows/s" if name == FLOWS else ""
        cells = [name, f"{rate[name]:,.0f}{unit}", f"{ratio[name]:.2f}", f"{cpu[name]:,.0f}"]
        lines.append("| " + " | ".join([*cells, f"{busy[name]:.0%}", verdict]) + " |")
    warm = ", ".join(f"{mib:.1f}" for mib in results.rss_warm)
    end = ", ".join(f"{mib:.1f}" for mib in results.rss_end)
    lines.append("")
    lines.append(
        f"Resident memory per worker (VmRSS): {warm} MiB after warm-up, {end} MiB at the end."
    )
    return lines


def _verdict(ratio: float, target: float) -> str:
    return "meets" if ratio >= target else "MISSES"


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
    parser.add_argument("--database", choices=sorted(DATABASES), default="sqlite")
    parser.add_argument(
        "--limits", choices=sorted(LIMITS), default="database", help="where the limits count"
    )
    parser.add_argument("--seconds", type=int, default=5, help="length of one wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians kept")
    parser.add_argument(
        "--connections", type=int, default=8, help="wrk connections, and flow client processes"
    )
    args = parser.parse_args()
    if not have_wrk():
        print("bench: needs wrk (Debian: apt-get install -y wrk)", file=sys.stderr)
        return 2
    print(
        f"bench: {os.cpu_count()} cores; gunicorn -w 2 on loopback; wrk -t{WRK_THREADS} "
        f"-c{args.connections} -d{args.seconds}s; {args.rounds} rounds; "
        f"{args.connections} flow clients"
    )
    missed = False
    for kind in DATABASES[args.database]:
        for limits in LIMITS[args.limits]:
            results = http_benchmark(kind, limits, args.seconds, args.rounds, args.connections)
            print(f"\n{kind}, abuse limits counted in {limits}:\n")
            print("\n".join(table(results)))
            rates = [{name: m.rate for name, m in one.items()} for one in results.rounds]
            ratio = ratios(rates, HEALTHZ)
            missed = missed or any(ratio[name] < target for name, target in TARGETS.items())
    if missed:
        print("\na target is missed: `python -m bench.profile` shows where the time goes")
    cost = in_process_benchmark()
    print(
        f"\nderive+sign in-process: coincurve {cost['coincurve_us']:.0f} µs, "
        f"ecdsa {cost['ecdsa_us']:.0f} µs, ecdsa/coincurve = {cost['speedup']:.1f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
