"""Where the time goes: server CPU per request by stage (parse, auth, policy, crypto, database,
serialisation, framework) for /healthz and each endpoint bench.run measures.

Serves the broker as bench.run does (2 workers, the Procfile's settings) with a CPU sampler in
each worker (bench/sampler.py, loaded by bench/gunicorn_profile.py), drives one endpoint at a
time with wrk while the samplers run, and sorts the samples into stages (bench/stages.py). Each
stage's µs are its share of the samples times the server CPU per request measured in the same
run (the sampler's own cost left out of the shares).

    .venv/bin/python -m bench.profile [--database sqlite|postgresql] [--limits database|redis]
                                      [--seconds 10] [--connections 8] [--save DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.load import have_wrk, run_wrk
from bench.run import (
    BENCH_REDIS_URL,
    ENDPOINTS,
    SIGN,
    VERIFY,
    WARM_UP_SECONDS,
    VerifyBudget,
    Workload,
    measure,
)
from bench.sampler import PROFILE_DIR_VAR
from bench.server import BenchBroker, database
from bench.stages import Frame, cost_table, tally, top_frames

PROFILE_CONFIG = "bench/gunicorn_profile.py"
DUMP_TIMEOUT = 30  # seconds for an idle worker to notice the signal (its loop wakes each second)

Samples = list[tuple[int, tuple[Frame, ...]]]


class Profiled:
    """The samplers of a broker's workers, switched together."""

    def __init__(self, broker: BenchBroker, folder: Path) -> None:
        self.broker, self.folder, self.dumps = broker, folder, 0

    def toggle(self) -> None:
        for pid in self.broker.worker_pids():
            os.kill(pid, signal.SIGUSR2)

    def collect(self) -> Samples:
        """Stop the samplers and merge what each worker wrote."""
        pids = self.broker.worker_pids()
        self.toggle()
        self.dumps += 1
        paths = [self.folder / f"{pid}-{self.dumps}.json" for pid in pids]
        deadline = time.monotonic() + DUMP_TIMEOUT
        while not all(path.exists() for path in paths):
            if time.monotonic() > deadline:
                raise SystemExit("bench: a worker wrote no profile (did it restart?)")
            time.sleep(0.1)
        merged: Counter[tuple[Frame, ...]] = Counter()
        for path in paths:
            for record in json.loads(path.read_text()):
                merged[tuple((file, name) for file, name in record["stack"])] += record["count"]
        return [(count, stack) for stack, count in merged.items()]


def profile(
    kind: str, limits: str, seconds: int, connections: int
) -> dict[str, tuple[Samples, float]]:
    """Per endpoint: its samples and the server CPU µs per request in the profiled run."""
    found: dict[str, tuple[Samples, float]] = {}
    with tempfile.TemporaryDirectory() as tmp, database(kind, Path(tmp)) as database_url:
        folder = Path(tmp)
        (folder / "profiles").mkdir()
        extra = {PROFILE_DIR_VAR: str(folder / "profiles")}
        if limits == "redis":
            extra["AGENTKEYS_REDIS_URL"] = BENCH_REDIS_URL
        broker = BenchBroker(database_url, config=PROFILE_CONFIG, extra_env=extra)
        broker.release()
        work = Workload(broker, folder, connections)
        budget = VerifyBudget()
        with broker.serving():
            work.prepare()
            for endpoint in ENDPOINTS:  # warm-up, unprofiled
                measure(broker, work, endpoint, budget, WARM_UP_SECONDS, connections)
            profiled = Profiled(broker, folder / "profiles")
            for endpoint in ENDPOINTS:
                broker.settle()
                script, args = work.script(endpoint, budget.bodies(seconds))
                profiled.toggle()
                before = broker.cpu_seconds()
                run = run_wrk(
                    broker.base + endpoint, script, seconds, connections, script_args=args
                )
                cpu_us = (broker.cpu_seconds() - before) / run.requests * 1e6
                budget.saw(endpoint, run.rps)
                broker.settle()
                found[endpoint] = (profiled.collect(), cpu_us)
                print(
                    f"  {kind} {endpoint}: {run.rps:,.0f} req/s profiled, {cpu_us:.0f} µs CPU/req",
                    file=sys.stderr,
                )
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--limits", choices=("database", "redis"), default="database")
    parser.add_argument("--seconds", type=int, default=10, help="length of one profiled run")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections")
    parser.add_argument("--save", type=Path, help="a folder for each endpoint's raw samples")
    args = parser.parse_args()
    if not have_wrk():
        print("bench: needs wrk (Debian: apt-get install -y wrk)", file=sys.stderr)
        return 2
    found = profile(args.database, args.limits, args.seconds, args.connections)
    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
        for endpoint, (samples, cpu) in found.items():
            name = endpoint.strip("/").replace("/", "-") + ".json"
            (args.save / name).write_text(json.dumps({"cpu_us": cpu, "samples": samples}))
    print(
        f"{args.database}, abuse limits counted in {args.limits}: server µs CPU per request by "
        "stage (share of samples)\n"
    )
    columns = {endpoint: (tally(samples), cpu) for endpoint, (samples, cpu) in found.items()}
    print("\n".join(cost_table(columns)))
    for endpoint in (SIGN, VERIFY):
        print(f"\n{endpoint}: innermost frames with the most samples")
        print("\n".join(top_frames(found[endpoint][0], 12)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
