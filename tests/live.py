"""Helpers for tests that run the real entry points as processes on loopback."""

from __future__ import annotations

import hashlib
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent


def clean_env(**extra: str) -> dict[str, str]:
    """The process environment without any AgentKeys variable, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AGENTKEYS_", "DEV_KEY_SERVICE_", "DATABASE_URL", "PORT", "WEB_CONC"))
    }
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_up(url: str, process: subprocess.Popen[Any], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            requests.get(url, timeout=1)
            return
        except (requests.ConnectionError, requests.Timeout):
            time.sleep(0.1)
    raise TimeoutError(url)


def release(env: Mapping[str, str]) -> None:
    """The Procfile's release step: validate, migrate, create the first keys."""
    subprocess.run(
        [sys.executable, "-m", "agentkeys.release"],
        cwd=ROOT,
        env=dict(env),
        check=True,
        timeout=120,
    )


@contextmanager
def gunicorn(env: Mapping[str, str], workers: int = 2, port: int | None = None) -> Iterator[str]:
    """Release, then run `gunicorn wsgi:app` with the Procfile's config on loopback (a free
    port unless given: pass one when AGENTKEYS_ISSUER must name it)."""
    release(env)
    port = port or free_port()
    command = [sys.executable, "-m", "gunicorn", "--config", "config/gunicorn.conf.py"]
    command += ["--bind", f"127.0.0.1:{port}", "--workers", str(workers), "wsgi:app"]
    with serving(command, env, port, stderr=subprocess.PIPE) as base:
        yield base


@contextmanager
def serving(command: list[str], env: Mapping[str, str], port: int, **popen: Any) -> Iterator[str]:
    """Run a server on 127.0.0.1:port until it answers /healthz; stop it afterwards."""
    with subprocess.Popen(command, env=dict(env), **({"cwd": ROOT} | popen)) as process:
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(base + "/healthz", process)
            yield base
        finally:
            process.terminate()
            process.wait(timeout=30)


def checkout_copy(target: Path, *, venv: bool = True) -> Path:
    """The files git would hand a newcomer, with this checkout's .venv (or none).

    The copy's .venv links to the shared venv's parts and carries its own up-to-date mark, so
    bin/setup in the copy never reinstalls (nor repoints) the shared venv, and nothing here runs
    bin/setup in this checkout either.
    """
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    if venv:
        (target / ".venv").mkdir()
        for part in (ROOT / ".venv").iterdir():
            if not part.name.startswith(".installed-"):
                (target / ".venv" / part.name).symlink_to(part)
        # bin/setup's mark: what the venv was installed from (pyproject.toml and the locks).
        inputs = ("pyproject.toml", "requirements.lock", "bin/uv.lock")
        digest = hashlib.sha256(b"".join((target / n).read_bytes() for n in inputs)).hexdigest()
        digest = digest[:16]
        (target / ".venv" / f".installed-{digest}").touch()
    return target


@dataclass
class DevRun:
    """A running `bin/dev`: its base URL and what it has printed so far."""

    base: str
    port: int
    stdout: queue.Queue[str] = field(default_factory=queue.Queue)
    stderr: list[str] = field(default_factory=list)

    def magic_link(self, timeout: float = 10) -> str:
        """The next sign-in link the console mail printed."""
        while True:
            match = re.search(
                r"\S+/auth/email/landing#t=[A-Za-z0-9_-]+", self.stdout.get(timeout=timeout)
            )
            if match:
                return match.group(0)

    def stderr_line(self, needle: str, timeout: float = 10) -> int:
        """The index of the first stderr line containing `needle`, once it is printed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((i for i, line in enumerate(list(self.stderr)) if needle in line), None)
            if found is not None:
                return found
            time.sleep(0.05)
        raise TimeoutError(f"{needle!r} not in bin/dev's stderr:\n{''.join(self.stderr)}")


@contextmanager
def bin_dev(
    repo: Path,
    port: int | None = None,
    umask: int = 0o022,
    args: tuple[str, ...] = (),
    **extra: str,
) -> Iterator[DevRun]:
    """Run `PORT=<port> bin/dev [args]` in `repo` (with a permissive umask, as a login shell
    has) until /healthz answers; stop it on exit."""
    run = DevRun(base="", port=port or free_port())
    run.base = f"http://127.0.0.1:{run.port}"
    env = clean_env(PORT=str(run.port), PYTHONUNBUFFERED="1", **extra)
    with subprocess.Popen(
        [str(repo / "bin" / "dev"), *args],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        umask=umask,
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        stdout, stderr = process.stdout, process.stderr

        def pump_stdout() -> None:
            for line in stdout:
                run.stdout.put(line)

        def pump_stderr() -> None:
            for line in stderr:
                run.stderr.append(line)

        threading.Thread(target=pump_stdout, daemon=True).start()
        threading.Thread(target=pump_stderr, daemon=True).start()
        try:
            wait_until_up(run.base + "/healthz", process)
            yield run
        finally:
            process.terminate()
            process.wait(timeout=30)


def run_bounded(
    command: list[str], cwd: Path, env: Mapping[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """subprocess.run in a session of its own: on timeout the whole process group is killed."""
    with subprocess.Popen(
        command,
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
        return subprocess.CompletedProcess(command, process.returncode, out, err)
