"""The broker under gunicorn for the benchmarks: a per-run database, signed-in accounts, wallet
challenges signed in advance, and the workers' CPU time and memory from /proc."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import requests
from sqlalchemy import Connection, Engine

from agentkeys.broker.db import make_engine
from agentkeys.broker.services import Services
from agentkeys.broker.store import IdentityLinkStore
from agentkeys.broker.wallet import WalletChallenges
from agentkeys.crypto import Wallet, derive_wallet
from agentkeys.identity import EMAIL, Identity
from agentkeys.sessions import Session
from agentkeys.settings import Settings
from tests.live import ROOT, clean_env, free_port, release, wait_until_up

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PROCFILE_CONFIG = "config/gunicorn.conf.py"
# Every request still counts against its limit (an upsert in the database); none is reached.
RATE_LIMITS = "start_ip=1000000000/60,verify_ip=1000000000/60"
SETTLE_SECONDS = 0.2


def admin(statement: str) -> None:
    engine = make_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(statement)
    engine.dispose()


@contextlib.contextmanager
def database(kind: str, folder: Path, suffix: str = "") -> Iterator[str]:
    """A new empty database for one run: a SQLite file in `folder`, or a PostgreSQL database on
    127.0.0.1:5432 created here and dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / f'bench{suffix}.sqlite3'}"
        return
    if kind != "postgresql":
        raise ValueError(kind)
    name = f"agentkeys_bench_{secrets.token_hex(4)}{suffix}"
    admin(f'CREATE DATABASE "{name}"')
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass(frozen=True)
class Account:
    """A signed-in person: their anchor, identity session and derived wallet."""

    anchor: str
    token: str
    session: Session
    wallet: Wallet

    @property
    def address(self) -> str:
        return self.wallet.address


class _OneTransaction:
    """Stands in for an engine whose every `begin()` is one open transaction: thousands of
    challenges commit at once, where a commit each would take longer than the run itself."""

    def __init__(self, conn: Connection) -> None:
        self.conn, self.dialect = conn, conn.dialect

    def begin(self) -> contextlib.nullcontext[Connection]:
        return contextlib.nullcontext(self.conn)

    def execution_options(self, **_options: object) -> _OneTransaction:
        return self  # db.one_statement's autocommit: here every statement joins the one


class _Checked:
    """The store, for challenges of wallets checked linkable once up front (a query each would
    make preparing a run slower than the run)."""

    def __init__(self, store: IdentityLinkStore, accounts: Sequence[Account]) -> None:
        for account in accounts:
            store.check_wallet_linkable(account.anchor, account.address.lower())

    def check_wallet_linkable(self, account: str, address: str) -> None:
        pass


class BenchBroker:
    """A development broker (the dev signer on, all checks on) on a loopback port."""

    def __init__(
        self,
        database_url: str,
        *,
        workers: int = 2,
        config: str = PROCFILE_CONFIG,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.master = secrets.token_bytes(32)
        self.port = free_port()
        self.domain = f"127.0.0.1:{self.port}"
        self.base = f"http://{self.domain}"
        self.workers, self.config = workers, config
        self.env = clean_env(
            AGENTKEYS_ENV="development",
            AGENTKEYS_ISSUER=self.base,
            AGENTKEYS_ACCESS_LOG="off",
            AGENTKEYS_RATE_LIMITS=RATE_LIMITS,
            AGENTKEYS_KEY_ENCRYPTION_KEY=secrets.token_hex(32),
            DEV_KEY_SERVICE_MASTER_SECRET=self.master.hex(),
            DATABASE_URL=database_url,
            **(extra_env or {}),
        )
        self.process: subprocess.Popen[bytes] | None = None
        self._services: Services | None = None

    @property
    def services(self) -> Services:
        """The broker's services in this process, to sign people in and start challenges."""
        if self._services is None:
            self._services = Services.build(Settings.from_env(self.env))
        return self._services

    def release(self) -> None:
        """The Procfile's release step: migrate, make the first keys (sealed)."""
        release(self.env)

    def account(self, email: str) -> Account:
        svc = self.services
        identity = Identity(EMAIL, email)
        anchor = svc.store.sign_in(identity)
        token, session = svc.sessions.mint(anchor, identity)
        return Account(anchor, token, session, derive_wallet(self.master, anchor))

    def presigned(self, accounts: Sequence[Account], count: int) -> list[dict[str, str]]:
        """`count` verify bodies: bound challenges made by the broker's own WalletChallenges
        (round robin over `accounts`), each signed by its account's wallet."""
        svc = self.services
        bodies = []
        with svc.engine.begin() as conn:
            maker = WalletChallenges(
                cast(Engine, _OneTransaction(conn)),
                cast(IdentityLinkStore, _Checked(svc.store, accounts)),
                issuer=svc.settings.issuer,
                chain_ids=svc.settings.siwe_chain_ids,
            )
            for number in range(count):
                account = accounts[number % len(accounts)]
                challenge = maker.start(account.address.lower(), None, account.session)
                signature = account.wallet.sign_personal(challenge.message.encode())
                bodies.append({"request_id": challenge.request_id, "signature": signature})
        return bodies

    def challenge_message(self, account: Account) -> str:
        """A bound challenge for `account` as the broker issues it (for /dev/sign-message)."""
        svc = self.services
        challenge = svc.wallet.start(account.address.lower(), None, account.session)
        return challenge.message

    def wallet_session(self, account: Account) -> str:
        """A wallet session for `account`, by a verify over HTTP."""
        (body,) = self.presigned([account], 1)
        answer = requests.post(f"{self.base}/v1/auth/wallet/verify", json=body, timeout=30)
        answer.raise_for_status()
        token: str = answer.json()["session_jwt"]
        return token

    @contextlib.contextmanager
    def serving(self) -> Iterator[str]:
        """gunicorn with `config` (the Procfile's unless told) and `workers` workers."""
        command = [sys.executable, "-m", "gunicorn", "--config", self.config]
        command += ["--bind", self.domain, "--workers", str(self.workers), "wsgi:app"]
        with subprocess.Popen(command, cwd=ROOT, env=self.env) as process:
            self.process = process
            try:
                wait_until_up(f"{self.base}/healthz", process)
                yield self.base
            finally:
                process.terminate()
                process.wait(timeout=60)
                self.process = None
                if self._services is not None:
                    self._services.engine.dispose()

    def settle(self, timeout: float = 30) -> None:
        """Wait until the workers are idle (requests left over from the last run are done)."""
        deadline = time.monotonic() + timeout
        last = self.cpu_seconds()
        while time.monotonic() < deadline:
            time.sleep(SETTLE_SECONDS)
            now = self.cpu_seconds()
            if now - last < SETTLE_SECONDS * 0.05:
                return
            last = now

    def worker_pids(self) -> list[int]:
        """The gunicorn workers: the master's children, from /proc."""
        if self.process is None:
            raise RuntimeError("not serving")
        master = self.process.pid
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        return [int(pid) for pid in children]

    def cpu_seconds(self) -> float:
        """User + system CPU time of the workers so far."""
        return sum(cpu_seconds(pid) for pid in self.worker_pids())

    def rss_mib(self) -> list[float]:
        """Resident memory of each worker (VmRSS), in MiB."""
        return [rss_kib(pid) / 1024 for pid in self.worker_pids()]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def rss_kib(pid: int) -> int:
    return parse_rss_kib(Path(f"/proc/{pid}/status").read_text())


def parse_rss_kib(status: str) -> int:
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError("no VmRSS line")
