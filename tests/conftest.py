"""Apps are built through the factory per test: `make_app(**settings_overrides)`."""

from __future__ import annotations

import dataclasses
import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, insert, select

from agentkeys.blueprints.http import SERVICES_KEY
from agentkeys.broker.db import accounts, identities, make_engine
from agentkeys.broker.factory import create_app
from agentkeys.broker.migrate import upgrade
from agentkeys.broker.services import Services
from agentkeys.identity import EMAIL, Identity
from agentkeys.observability import Observability
from agentkeys.settings import Secret, Settings
from tests.vectors import VECTOR_ADDRESS, VECTOR_ANCHOR, VECTOR_MASTER

pytest_plugins = ["tests.smtp"]  # the smtp_server fixture

BASE_SETTINGS = Settings(
    env="development",
    issuer="http://127.0.0.1:8000",
    dev_master_secret=Secret(VECTOR_MASTER),
)

MakeApp = Callable[..., Flask]


POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _admin(statement: str) -> None:
    engine = make_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(statement)
    engine.dispose()


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[str]:
    """A migrated PostgreSQL database made for this run (127.0.0.1:5432), dropped at the end."""
    name = f"agentkeys_tpl_{secrets.token_hex(4)}"
    _admin(f'CREATE DATABASE "{name}"')
    engine = make_engine(POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
    upgrade(engine)
    engine.dispose()
    yield name
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url(postgres_template: str) -> Iterator[str]:
    """A fresh migrated PostgreSQL database for one test, copied from the run's template."""
    name = f"agentkeys_t_{secrets.token_hex(4)}"
    _admin(f'CREATE DATABASE "{name}" TEMPLATE "{postgres_template}"')
    yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A migrated SQLite database of this test's own."""
    url = f"sqlite:///{tmp_path / 'agentkeys.sqlite3'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs once on SQLite and once on PostgreSQL."""
    url: str = request.getfixturevalue(f"{request.param}_url".replace("postgresql", "postgres"))
    return url


@pytest.fixture
def engine(any_database_url: str) -> Iterator[Engine]:
    """An engine on a fresh migrated database: once SQLite, once PostgreSQL."""
    engine = make_engine(any_database_url)
    yield engine
    engine.dispose()


T0 = 1_700_000_000
T = TypeVar("T")


def race(threads: int, call: Callable[[], T]) -> list[T]:
    """Run `call` in `threads` threads released together by a barrier."""
    barrier = threading.Barrier(threads)

    def run() -> T:
        barrier.wait()
        return call()

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(run) for _ in range(threads)]
        return [f.result() for f in futures]


class Clock:
    """A settable clock of whole Unix seconds, for code that takes `clock=`."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """The database of apps built with make_app: SQLite of this test's own."""
    return sqlite_url


@pytest.fixture
def make_app(tmp_path: Path, database_url: str) -> Iterator[MakeApp]:
    apps: list[Flask] = []

    def build(observability: Observability | None = None, **overrides: Any) -> Flask:
        settings = dataclasses.replace(BASE_SETTINGS, database_url=database_url, **overrides)
        app = create_app(
            settings, instance_path=str(tmp_path / "instance"), observability=observability
        )
        app.config["TESTING"] = True
        apps.append(app)
        return app

    yield build
    for app in apps:
        services_of(app).engine.dispose()


def services_of(app: Flask) -> Services:
    found: Services = app.extensions[SERVICES_KEY]
    return found


def bearer_for(app: Flask, email: str = "onboard@example.com") -> dict[str, str]:
    """An Authorization header with an identity session for `email` (signing it in)."""
    svc = services_of(app)
    identity = Identity(EMAIL, email)
    token, _ = svc.sessions.mint(svc.store.sign_in(identity), identity)
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def app(make_app: MakeApp) -> Flask:
    return make_app()


def siwe_text(
    address: str = VECTOR_ADDRESS,
    *,
    domain: str = "127.0.0.1:8000",
    scheme: str | None = None,
    chain_id: int = 1,
    expires_in: timedelta | None = timedelta(minutes=10),
    not_before: datetime | None = None,
    resources: tuple[str, ...] | None = None,
) -> str:
    """A SIWE message as the broker issues them (bound to the vector account unless
    `resources` says otherwise), with knobs for the policy tests."""
    if resources is None:
        resources = (f"urn:agentkeys:account:{VECTOR_ANCHOR}",)
    now = datetime.now(UTC).replace(microsecond=0)
    origin = f"{scheme}://{domain}" if scheme else domain
    lines = [
        f"{origin} wants you to sign in with your Ethereum account:",
        address,
        "",
        "Sign in to AgentKeys.",
        "",
        "URI: http://127.0.0.1:8000",
        "Version: 1",
        f"Chain ID: {chain_id}",
        "Nonce: abcdef0123456789",
        f"Issued At: {_rfc3339(now)}",
    ]
    if expires_in is not None:
        lines.append(f"Expiration Time: {_rfc3339(now + expires_in)}")
    if not_before is not None:
        lines.append(f"Not Before: {_rfc3339(not_before)}")
    if resources:
        lines.append("Resources:")
        lines.extend(f"- {r}" for r in resources)
    return "\n".join(lines)


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def bearer_for_account(app: Flask, anchor: str, kind: str = "identity") -> dict[str, str]:
    """An Authorization header for a session of the account `anchor` (created if absent)."""
    svc = services_of(app)
    identity = Identity(EMAIL, f"vector-{anchor[:8]}@example.com")
    with svc.engine.begin() as conn:
        if conn.execute(select(accounts).where(accounts.c.anchor == anchor)).first() is None:
            conn.execute(insert(accounts).values(anchor=anchor, created_at=0))
            conn.execute(
                insert(identities).values(
                    identity_type=identity.type,
                    identity_value=identity.value,
                    account=anchor,
                    status="linked",
                    linked_at=0,
                )
            )
        row = conn.execute(select(identities).where(identities.c.account == anchor)).first()
        assert row is not None
    linked = Identity(row.identity_type, row.identity_value)
    token, _ = svc.sessions.mint(anchor, linked, kind=kind)
    return {"Authorization": f"Bearer {token}"}


def signer_client(app: Flask, anchor: str = VECTOR_ANCHOR) -> FlaskClient:
    """A test client whose every request carries an identity bearer for `anchor`."""
    client = app.test_client()
    header = bearer_for_account(app, anchor)["Authorization"]
    client.environ_base["HTTP_AUTHORIZATION"] = header
    return client
