"""Load from Debian's `wrk`: request scripts, one run, and what its output says."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

BODIES_LUA = Path(__file__).with_name("challenges.lua")
WRK_THREADS = 2
# A loaded 2-core machine stalls some requests past wrk's default 2 s; a timeout is an error.
WRK_TIMEOUT = "10s"
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


class LoadError(SystemExit):
    """A wrk run that saw errors or printed something unreadable: the benchmark stops."""


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def wrk_script(
    body: dict[str, str] | None, bearer: str | None = None, *, method: str | None = None
) -> str:
    """A static wrk script: the same request every time (a GET unless a body or `method`)."""
    script = f'wrk.method = "{method}"\n' if method is not None else ""
    if body is not None:
        script += (
            'wrk.method = "POST"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = {json.dumps(json.dumps(body))}\n"
        )
    if bearer is not None:
        script += f'wrk.headers["Authorization"] = "Bearer {bearer}"\n'
    return script


def write_bodies(path: Path, bodies: Sequence[Mapping[str, str]]) -> Path:
    """One JSON body per line, for BODIES_LUA (which sends each at most once)."""
    path.write_text("".join(json.dumps(body, separators=(",", ":")) + "\n" for body in bodies))
    return path


@dataclass(frozen=True)
class WrkRun:
    requests: int
    rps: float
    p50_ms: float | None = None  # with latency=True
    p99_ms: float | None = None
    bodies_taken: int | None = None  # with BODIES_LUA
    bodies_exhausted: int | None = None


def run_wrk(
    url: str,
    script: Path,
    seconds: int,
    connections: int,
    *,
    threads: int = WRK_THREADS,
    script_args: Sequence[str] = (),
    latency: bool = False,
) -> WrkRun:
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s"]
    command += ["--timeout", WRK_TIMEOUT, "-s", str(script)]
    command += ["--latency"] if latency else []
    command += [url, *(["--", *script_args] if script_args else [])]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LoadError(f"bench: wrk failed on {url}:\n{done.stdout}{done.stderr}")
    return parse_wrk(url, done.stdout)


def parse_wrk(url: str, output: str) -> WrkRun:
    """Requests and requests/s, latency percentiles and body counts if printed; any non-2xx
    answer, socket error or exhausted body list is an error."""
    bodies = re.search(r"bench-bodies: taken (\d+) exhausted (\d+)", output)
    if bodies and int(bodies.group(2)):
        raise LoadError(
            f"bench: {url} ran out of pre-made bodies ({bodies.group(1)} used): make more\n{output}"
        )
    if "Non-2xx" in output or "Socket errors" in output:
        raise LoadError(f"bench: errors while loading {url}:\n{output}")
    count = re.search(r"(\d+) requests in", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not count or not rate:
        raise LoadError(f"bench: could not read wrk output:\n{output}")
    return WrkRun(
        requests=int(count.group(1)),
        rps=float(rate.group(1)),
        p50_ms=_percentile(output, "50"),
        p99_ms=_percentile(output, "99"),
        bodies_taken=int(bodies.group(1)) if bodies else None,
        bodies_exhausted=int(bodies.group(2)) if bodies else None,
    )


def _percentile(output: str, percent: str) -> float | None:
    found = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
    return float(found.group(1)) * _UNITS[found.group(2)] if found else None


def ratios(rounds: Sequence[Mapping[str, float]], base: str) -> dict[str, float]:
    """Per name, the median over rounds of its value over `base`'s value in the same round:
    interleaved rounds, so each ratio compares runs made moments apart on the same machine."""
    return {name: statistics.median(one[name] / one[base] for one in rounds) for name in rounds[0]}


def medians(rounds: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {name: statistics.median(one[name] for one in rounds) for name in rounds[0]}
