"""Benchmark: identity lookup and wallet verify latency with 10^3 versus 10^6 stored identities
on PostgreSQL (bench only, not CI; target: the 10^6 median at most 1.5x the 10^3 one).

Two PostgreSQL databases on 127.0.0.1:5432, made for the run and dropped after it, are
bulk-loaded with COPY, then VACUUM (ANALYZE): half as many accounts as identities, each with an
email and a wallet, as sign-ins would leave them (anchors are the identities' real omni). A
broker (gunicorn, 2 workers, the Procfile's config) serves each, both at once; `wrk --latency`
at one connection (latency, not throughput) alternates between them over rounds: GET
/v1/identities with an identity session, then POST /v1/auth/wallet/verify with a different
pre-signed challenge per request. Each ratio is the median over rounds of large / small in the
same round.

    .venv/bin/python -m bench.identities [--small 1000] [--large 1000000] [--seconds 5]
                                         [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

from agentkeys.broker.store import LINKED
from agentkeys.crypto import omni
from agentkeys.identity import EMAIL, EVM
from bench.load import BODIES_LUA, have_wrk, medians, ratios, run_wrk, write_bodies, wrk_script
from bench.run import VERIFY, VERIFY_MARGIN
from bench.server import Account, BenchBroker, database

LOOKUP = "/v1/identities"
TARGET_RATIO = 1.5
WARM_UP_SECONDS = 2


def bulk_rows(
    count: int, client_id: str, now: int
) -> tuple[Iterator[tuple[object, ...]], Iterator[tuple[object, ...]]]:
    """Rows of `accounts` and `identities` for `count` identities: ceil(count / 2) accounts,
    each anchored at its email's omni, and a wallet for as many as make up `count`."""
    people = math.ceil(count / 2)
    wallets = count - people

    def email(n: int) -> str:
        return f"person{n}@bulk.example.com"

    def accounts() -> Iterator[tuple[object, ...]]:
        for n in range(people):
            yield (omni(EMAIL, email(n), client_id), now, 0, EMAIL, email(n))

    def identities() -> Iterator[tuple[object, ...]]:
        for n in range(people):
            anchor = omni(EMAIL, email(n), client_id)
            yield (EMAIL, email(n), anchor, LINKED, now)
            if n < wallets:
                wallet = "0x" + hashlib.sha256(f"bulk wallet {n}".encode()).hexdigest()[:40]
                yield (EVM, wallet, anchor, LINKED, now)

    return accounts(), identities()


def bulk_load(database_url: str, count: int, client_id: str) -> float:
    """COPY `count` identities into a migrated database, then VACUUM (ANALYZE); seconds taken."""
    start = time.perf_counter()
    accounts, identities = bulk_rows(count, client_id, int(time.time()))
    with psycopg.connect(database_url) as conn:
        with conn.cursor() as cursor:
            columns = "anchor, created_at, session_generation, anchor_type, anchor_value"
            with cursor.copy(f"COPY accounts ({columns}) FROM STDIN") as copy:
                for row in accounts:
                    copy.write_row(row)
            columns = "identity_type, identity_value, account, status, linked_at"
            with cursor.copy(f"COPY identities ({columns}) FROM STDIN") as copy:
                for row in identities:
                    copy.write_row(row)
        conn.commit()
        conn.autocommit = True
        # As a long-lived database is: vacuumed, so no autovacuum of the fresh rows runs during
        # the measurement on one side only, and with planner statistics.
        conn.execute("VACUUM (ANALYZE) accounts")
        conn.execute("VACUUM (ANALYZE) identities")
    return time.perf_counter() - start


def stored_identities(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM identities").fetchone()
    return int(row[0]) if row else 0


class Side:
    """One database size: its broker, person and lookup script."""

    def __init__(self, count: int, broker: BenchBroker, folder: Path) -> None:
        self.count, self.name, self.broker, self.folder = count, f"{count:,}", broker, folder
        self.person: Account = broker.account("bench@example.com")
        self.lookup = folder / f"lookup-{count}.lua"
        self.lookup.write_text(wrk_script(None, self.person.token))

    def verify_args(self, bodies: int) -> list[str]:
        """Arguments of BODIES_LUA for one thread: `bodies` new pre-signed challenges."""
        path = self.folder / f"verify-{self.count}.txt"
        write_bodies(path, self.broker.presigned([self.person], bodies))
        return [str(path), "1"]


def latency_benchmark(
    small: int, large: int, seconds: int, rounds: int
) -> tuple[dict[str, int], list[dict[str, float]], list[dict[str, float]]]:
    """Stored identities per side, and per round the p50 and p99 in ms per (endpoint, side)."""
    p50s: list[dict[str, float]] = []
    p99s: list[dict[str, float]] = []
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        sides: list[Side] = []
        stored: dict[str, int] = {}
        for count in (small, large):
            name = f"{count:,}"
            url = stack.enter_context(database("postgresql", folder, f"_{count}"))
            broker = BenchBroker(url)
            broker.release()
            took = bulk_load(url, count, broker.services.settings.client_id)
            stored[name] = stored_identities(url)
            print(f"  {name}: COPY and VACUUM (ANALYZE) in {took:.1f} s", file=sys.stderr)
            sides.append(Side(count, broker, folder))
        for side in sides:
            stack.enter_context(side.broker.serving())
        lookup_rps: dict[str, float] = {}
        for side in sides:  # warm-up; the first verify links the wallet
            run = run_wrk(side.broker.base + LOOKUP, side.lookup, WARM_UP_SECONDS, 1, threads=1)
            lookup_rps[side.name] = run.rps
            args = side.verify_args(_bodies(run.rps, WARM_UP_SECONDS))
            run_wrk(
                side.broker.base + VERIFY,
                BODIES_LUA,
                WARM_UP_SECONDS,
                1,
                threads=1,
                script_args=args,
            )
        for number in range(1, rounds + 1):
            order = sides if number % 2 else sides[::-1]  # neither side always goes first
            p50: dict[str, float] = {}
            p99: dict[str, float] = {}
            for endpoint in (LOOKUP, VERIFY):
                for side in order:
                    side.broker.settle()
                    if endpoint == LOOKUP:
                        script, args = side.lookup, []
                    else:
                        script = BODIES_LUA
                        args = side.verify_args(_bodies(lookup_rps[side.name], seconds))
                    run = run_wrk(
                        side.broker.base + endpoint,
                        script,
                        seconds,
                        1,
                        threads=1,
                        script_args=args,
                        latency=True,
                    )
                    if run.p50_ms is None or run.p99_ms is None:
                        raise SystemExit("bench: wrk printed no latency distribution")
                    if endpoint == LOOKUP:
                        lookup_rps[side.name] = max(lookup_rps[side.name], run.rps)
                    key = f"{endpoint} {side.name}"
                    p50[key], p99[key] = run.p50_ms, run.p99_ms
                    print(
                        f"  round {number}/{rounds} {key}: p50 {run.p50_ms:.2f} ms, "
                        f"p99 {run.p99_ms:.2f} ms, {run.rps:,.0f} req/s",
                        file=sys.stderr,
                    )
            p50s.append(p50)
            p99s.append(p99)
    return stored, p50s, p99s


def _bodies(lookup_rps: float, seconds: float) -> int:
    """Verifies one connection can make in `seconds`: fewer than lookups, which write nothing."""
    return math.ceil(lookup_rps * seconds * VERIFY_MARGIN) + 100


def table(
    stored: dict[str, int], p50s: list[dict[str, float]], p99s: list[dict[str, float]]
) -> list[str]:
    small, large = list(stored)
    p50, p99 = medians(p50s), medians(p99s)
    lines = [
        "| stored identities | lookup p50 ms | lookup p99 ms | verify p50 ms | verify p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for side in (small, large):
        cells = [f"{stored[side]:,}"]
        for endpoint in (LOOKUP, VERIFY):
            key = f"{endpoint} {side}"
            cells += [f"{p50[key]:.2f}", f"{p99[key]:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    cells = [f"{large} / {small}"]
    for endpoint in (LOOKUP, VERIFY):
        base, key = f"{endpoint} {small}", f"{endpoint} {large}"
        ratio50, ratio99 = ratios(p50s, base)[key], ratios(p99s, base)[key]
        verdict = "meets" if ratio50 <= TARGET_RATIO else "MISSES"
        cells += [f"**{ratio50:.2f}** ({verdict} ≤ {TARGET_RATIO})", f"{ratio99:.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--small", type=int, default=1000, help="identities in the small one")
    parser.add_argument("--large", type=int, default=1_000_000, help="identities in the large")
    parser.add_argument("--seconds", type=int, default=5, help="length of one wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians kept")
    args = parser.parse_args()
    if not have_wrk():
        print("bench: needs wrk (Debian: apt-get install -y wrk)", file=sys.stderr)
        return 2
    stored, p50s, p99s = latency_benchmark(args.small, args.large, args.seconds, args.rounds)
    print(
        f"PostgreSQL; gunicorn -w 2 per database, both serving; wrk -t1 -c1 -d{args.seconds}s "
        f"--latency; {args.rounds} rounds (medians)\n"
    )
    print("\n".join(table(stored, p50s, p99s)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
