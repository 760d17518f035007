"""Migration 0003 on a database that already holds accounts, on SQLite and on PostgreSQL."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, text

from agentkeys.broker.db import make_engine
from agentkeys.broker.migrate import alembic_config, is_current, upgrade
from agentkeys.crypto import omni
from tests.conftest import POSTGRES_ADMIN_URL, _admin

CLIENT_ID = "tenant-7"  # not the default: the backfill must use the deployment's own


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on a database with no tables at all."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'old.sqlite3'}")
        yield engine
        engine.dispose()
        return
    name = f"agentkeys_m_{secrets.token_hex(4)}"
    _admin(f'CREATE DATABASE "{name}"')
    engine = make_engine(POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
    yield engine
    engine.dispose()
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def migrate_to(engine: Engine, revision: str, *, down: bool = False) -> None:
    config = alembic_config(engine, CLIENT_ID)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, revision)


def test_0003_names_anchor_identities_and_retires_bound_challenges(empty_engine: Engine) -> None:
    migrate_to(empty_engine, "0002")
    alice, backup = ("email", "alice@example.com"), ("email", "backup@example.com")
    anchor = omni(*alice, CLIENT_ID)
    orphan = "0f" * 32  # an account whose anchor identity is linked nowhere any more
    with empty_engine.begin() as conn:
        for account in (anchor, orphan):
            conn.execute(
                text(
                    "INSERT INTO accounts (anchor, created_at, sessions_valid_after) "
                    "VALUES (:a, 1, 5)"
                ),
                {"a": account},
            )
        for kind, value in (alice, backup):
            conn.execute(
                text("INSERT INTO identities VALUES (:t, :v, :a, 'linked', 1)"),
                {"t": kind, "v": value, "a": anchor},
            )
        for request_id, bound in (("bound", anchor), ("plain", None)):
            conn.execute(
                text(
                    "INSERT INTO siwe_challenges (request_id, address, account, message, "
                    "status, created_at, expires_at) VALUES (:r, '0x00', :a, 'm', 'pending', 1, "
                    "9999999999)"
                ),
                {"r": request_id, "a": bound},
            )

    upgrade(empty_engine, CLIENT_ID)

    assert is_current(empty_engine)
    with empty_engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT anchor, anchor_type, anchor_value, session_generation FROM accounts "
                "ORDER BY anchor"
            )
        ).all()
        found = conn.execute(text("SELECT request_id, status FROM siwe_challenges")).all()
    challenges = {str(r.request_id): str(r.status) for r in found}
    assert sorted(tuple(r) for r in rows) == sorted([(anchor, *alice, 0), (orphan, None, None, 0)])
    # A challenge bound under the old rules carries no session generation: it may link nothing.
    assert challenges == {"bound": "used", "plain": "pending"}

    migrate_to(empty_engine, "0002", down=True)
    migrate_to(empty_engine, "head")
    assert is_current(empty_engine)
