"""A CPU-time stack sampler inside a gunicorn worker, for bench.profile (bench only).

ITIMER_PROF fires SIGPROF every INTERVAL of the process's own CPU time (user + system), so idle
waits are never sampled and the samples add up to the server CPU that bench.run reports. The
handler counts the interrupted Python stack (a C call is counted in the frame that called it).
SIGUSR2 starts sampling; the next SIGUSR2 stops it and writes `<pid>-<n>.json` to the folder
named by PROFILE_DIR_VAR.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import sysconfig
from collections import Counter
from pathlib import Path
from types import FrameType

PROFILE_DIR_VAR = "AGENTKEYS_BENCH_PROFILE_DIR"
INTERVAL = 0.001  # seconds of CPU; the kernel's tick (often 4 ms) may make it coarser
ROOT = Path(__file__).resolve().parent.parent
_PREFIXES = (str(ROOT), sysconfig.get_paths()["stdlib"])  # after site-packages


def short_path(filename: str) -> str:
    """`flask/app.py`, `agentkeys/sessions.py`, `json/decoder.py`: the path below its root."""
    if "site-packages/" in filename:
        return filename.rsplit("site-packages/", 1)[1]
    for prefix in _PREFIXES:
        if filename.startswith(prefix + os.sep):
            return filename[len(prefix) + 1 :]
    return filename


class Sampler:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.stacks: Counter[tuple[tuple[str, str], ...]] = Counter()
        self.running = False
        self.dumps = 0

    def toggle(self, _signum: int, _frame: FrameType | None) -> None:
        if self.running:
            self.stop()
        else:
            self.start()

    def start(self) -> None:
        self.stacks.clear()
        signal.signal(signal.SIGPROF, self._sample)
        signal.siginterrupt(signal.SIGPROF, False)  # restart system calls it interrupts
        signal.setitimer(signal.ITIMER_PROF, INTERVAL, INTERVAL)
        self.running = True

    def stop(self) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        # Not SIG_IGN: a SIGPROF already pending would then raise OSError in whatever runs next.
        signal.signal(signal.SIGPROF, _ignore)
        self.running = False
        self.dumps += 1
        records = [
            {"count": count, "stack": [[short_path(file), name] for file, name in stack]}
            for stack, count in self.stacks.items()
        ]
        path = self.folder / f"{os.getpid()}-{self.dumps}.json"
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(records))
        partial.rename(path)  # whole or absent for the benchmark that waits for it

    def _sample(self, _signum: int, frame: FrameType | None) -> None:
        stack = []
        while frame is not None:
            stack.append((frame.f_code.co_filename, frame.f_code.co_name))
            frame = frame.f_back
        self.stacks[tuple(stack)] += 1


def _ignore(_signum: int, _frame: FrameType | None) -> None:
    pass


def install() -> None:
    """In a worker (gunicorn's post_worker_init): SIGUSR2 toggles sampling."""
    folder = os.environ.get(PROFILE_DIR_VAR)
    if not folder:
        sys.exit(f"bench: {PROFILE_DIR_VAR} is not set")
    sampler = Sampler(Path(folder))
    signal.signal(signal.SIGUSR2, sampler.toggle)
