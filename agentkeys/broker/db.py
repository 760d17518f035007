"""Persistence: SQLAlchemy Core tables and the engine. SQLite by default, PostgreSQL (psycopg 3)
for several workers or instances. Times are integer Unix seconds, the same on both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from agentkeys.errors import ConfigError, DatabaseUnavailable

# Seconds. libpq waits for ever on a server that takes the TCP connection and never answers (a
# hung host, a half-open proxy), and SQLAlchemy waits 30 s for a free pooled connection: an
# outage must become a 503 in a few seconds instead, not park every request (and under gevent
# every greenlet) until the client gives up. DATABASE_URL's `?connect_timeout=` wins.
CONNECT_TIMEOUT = 5
POOL_TIMEOUT = 10
OUTAGE_RETRY_AFTER = 5

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

accounts = Table(
    "accounts",
    metadata,
    Column("anchor", String(64), primary_key=True),
    Column("created_at", BigInteger, nullable=False),
    # Sessions carry the generation they were minted in; unlink, merge and sign-out-everywhere
    # add one, so every older session is refused exactly, whatever second it was minted in.
    Column("session_generation", BigInteger, nullable=False, server_default="0"),
    Column("merged_into", String(64), nullable=True),
    # The identity whose omni is the anchor: omni has no separators, so another (type, value)
    # may hash to the same anchor and must never be let into this account.
    Column("anchor_type", String(64), nullable=True),
    Column("anchor_value", String(320), nullable=True),
)

identities = Table(
    "identities",
    metadata,
    Column("identity_type", String(64), primary_key=True),
    Column("identity_value", String(320), primary_key=True),
    Column("account", String(64), ForeignKey("accounts.anchor"), nullable=False, index=True),
    Column("status", String(16), nullable=False),  # linked | pending_proof
    Column("linked_at", BigInteger, nullable=False),
)

login_requests = Table(
    "login_requests",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),  # email | oauth2
    Column("provider", String(64), nullable=True),
    Column("poll_token_hash", LargeBinary(32), nullable=False),
    Column("user_code", String(16), nullable=False),
    Column("identity_type", String(64), nullable=True),
    Column("identity_value", String(320), nullable=True),
    Column("status", String(16), nullable=False),  # pending | verified | consumed | failed
    Column("error", String(64), nullable=True),
    Column("reason", String(500), nullable=True),
    # Only hashes of the bearer secrets (magic link, approval token, state) are stored.
    Column("approve_token_hash", LargeBinary(32), nullable=True, unique=True),
    Column("state_hash", LargeBinary(32), nullable=True, unique=True),
    Column("nonce", String(128), nullable=True),
    Column("code_verifier", String(128), nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
)

spent_tokens = Table(
    "spent_tokens",
    metadata,
    Column("jti", String(64), primary_key=True),
    Column("expires_at", BigInteger, nullable=False, index=True),
)

signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("purpose", String(16), nullable=False, index=True),  # session | oidc
    # First-run generation races between workers end on this unique slot.
    Column("slot", String(64), nullable=True, unique=True),
    Column(
        "private_key", LargeBinary, nullable=False
    ),  # AES-GCM sealed PKCS#8 DER, or plain DER in development
    Column("sealed", Integer, nullable=False),
    Column("public_jwk", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("signs_from", BigInteger, nullable=False),
    Column("retire_at", BigInteger, nullable=True),
)

siwe_challenges = Table(
    "siwe_challenges",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("address", String(42), nullable=False),  # lowercase
    Column("account", String(64), nullable=True),  # the bound account, or NULL (plain sign-in)
    # A bound challenge lives only as long as the session that started it (§6.4).
    Column("session_generation", BigInteger, nullable=True),
    Column("session_expires_at", BigInteger, nullable=True),
    Column("message", Text, nullable=False),
    Column("status", String(16), nullable=False),  # pending | used
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False, index=True),
)

# A wallet an account asked to link, until a bound SIWE signature proves it (§6.4).
wallet_links = Table(
    "wallet_links",
    metadata,
    Column("account", String(64), ForeignKey("accounts.anchor"), primary_key=True),
    Column("address", String(42), primary_key=True),
    Column("requested_at", BigInteger, nullable=False),
)

rate_limits = Table(
    "rate_limits",
    metadata,
    Column("key", String(255), primary_key=True),
    Column("window_start", BigInteger, nullable=False),
    Column("hits", Integer, nullable=False),
)


_BAD_URL = (
    "DATABASE_URL must be sqlite:///path or postgresql://user:password@host[:port]/database "
    "(user and password percent-encoded)"
)


def engine_url(url: str) -> str:
    """Heroku's `postgres://` and plain `postgresql://` both mean psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine that never logs SQL parameters (they hold token hashes and identities)."""
    try:
        parsed = make_url(engine_url(url))
    except (ArgumentError, ValueError):  # a bad port: int() would quote part of the URL
        raise ConfigError(_BAD_URL) from None
    if "@" in (parsed.host or ""):
        # An unencoded "@" in the password: the rest would become the host, shown in errors.
        raise ConfigError(_BAD_URL)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, hide_parameters=True, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate)
        return engine
    if "connect_timeout" not in parsed.query:
        kwargs["connect_args"] = {
            "connect_timeout": CONNECT_TIMEOUT,
            **kwargs.get("connect_args", {}),
        }
    kwargs.setdefault("pool_timeout", POOL_TIMEOUT)
    engine = create_engine(
        parsed, hide_parameters=True, pool_pre_ping=True, pool_reset_on_return=None, **kwargs
    )
    event.listen(engine, "reset", _rollback_unless_broken)
    return engine


def _rollback_unless_broken(dbapi_connection: Any, _record: Any, state: Any) -> None:
    """The pool's rollback on return (it replaces SQLAlchemy's own, switched off above)."""
    # A connection that lost its server (mid-statement on a raw cursor, or just now) cannot be
    # rolled back; SQLAlchemy would try, fail and log a traceback for an outage. psycopg knows
    # it is broken: leave it, and the next checkout's pre-ping replaces it.
    if not state.asyncio_safe or state.transaction_was_reset or dbapi_connection.broken:
        return
    try:
        dbapi_connection.rollback()
    except psycopg.OperationalError:
        if not dbapi_connection.broken:
            raise  # alive but failing: SQLAlchemy logs it and discards the connection


def outage(exc: BaseException) -> DatabaseUnavailable | None:
    """The 503 for a database failure that is an outage rather than a bug, else None."""
    # OperationalError wraps psycopg's (and sqlite3's) refused, reset, timed-out and shut-down
    # connections; PoolTimeout is the wait for a free connection; a connection that broke
    # mid-statement is marked invalidated whatever DBAPI class its error came as. psycopg's own
    # error escapes unwrapped when the reconnect after a failed pre-ping fails too.
    invalidated = isinstance(exc, DBAPIError) and exc.connection_invalidated
    failures = OperationalError | DisconnectionError | PoolTimeout | psycopg.OperationalError
    if isinstance(exc, failures) or invalidated:
        detail = "The database is unavailable; try again shortly."
        return DatabaseUnavailable(detail, retry_after=OUTAGE_RETRY_AFTER)
    return None


def read_only(engine: Engine) -> Engine:
    """The same engine and pool for work that only reads. SQLite: a plain BEGIN, which takes no
    write lock. PostgreSQL: autocommit, which saves the BEGIN and ROLLBACK round trips and
    changes nothing else, as READ COMMITTED gives each statement its own snapshot anyway."""
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    return engine.execution_options(agentkeys_read_only=True)


def one_statement(engine: Engine) -> Engine:
    """The same engine and pool for a write that is one statement, atomic by itself. On
    PostgreSQL it runs in autocommit: one round trip instead of BEGIN, the statement and
    COMMIT. SQLite keeps its BEGIN IMMEDIATE (see _sqlite_begin_immediate)."""
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    return engine


def _sqlite_begin_immediate(connection: Any) -> None:
    if connection.get_execution_options().get("agentkeys_read_only"):
        connection.exec_driver_sql("BEGIN")
        return
    # Take the write lock when the transaction starts: a deferred transaction that later
    # upgrades to writing can fail at once with "database is locked" under concurrency.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    connection.isolation_level = None  # pysqlite must not issue its own BEGIN (see above)
    # WAL lets readers and one writer work at once across gunicorn workers; writers wait
    # for each other (busy timeout) instead of failing with "database is locked".
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
