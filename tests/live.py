"""Helpers for tests that run the real entry points as processes on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
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
    with subprocess.Popen(command, cwd=ROOT, env=dict(env), stderr=subprocess.PIPE) as process:
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(base + "/healthz", process)
            yield base
        finally:
            process.terminate()
            process.wait(timeout=30)
