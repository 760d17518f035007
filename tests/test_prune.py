"""Pruning (agentkeys/broker/prune.py) on SQLite and PostgreSQL: what goes and what stays, to
the second; batches; rows a hot path holds are skipped, not waited for; the live flows keep
working."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from flask import Flask
from sqlalchemy import Column, Engine, Table, event, insert, select
from sqlalchemy.exc import OperationalError

from agentkeys.broker.db import (
    login_requests,
    make_engine,
    rate_limits,
    siwe_challenges,
    spent_tokens,
)
from agentkeys.broker.login import CONSUMED, REQUEST_TTL, VERIFIED, LoginRequests
from agentkeys.broker.prune import KEEP_EXPIRED_SECONDS, LONGEST_WINDOW, prune
from agentkeys.broker.ratelimit import RateLimiter, SqlCounter
from agentkeys.broker.store import SPENT_GRACE_SECONDS, IdentityLinkStore
from agentkeys.broker.wallet import CHALLENGE_TTL, WalletChallenges
from agentkeys.identity import EMAIL, EVM, Identity
from agentkeys.settings import DEFAULT_LIMITS, Limit
from agentkeys.timefmt import now_seconds
from tests.conftest import Clock, services_of

NOW = 1_700_006_400  # a multiple of 86400, so of every default window too
CUTOFF = NOW - KEEP_EXPIRED_SECONDS  # challenges and sign-in requests expiring before this go
TABLES = ("siwe_challenges", "login_requests", "spent_tokens", "rate_limits")
KEYS: dict[str, tuple[Table, Column[str]]] = {
    "siwe_challenges": (siwe_challenges, siwe_challenges.c.request_id),
    "login_requests": (login_requests, login_requests.c.request_id),
    "spent_tokens": (spent_tokens, spent_tokens.c.jti),
    "rate_limits": (rate_limits, rate_limits.c.key),
}


def counts(**deleted: int) -> dict[str, int]:
    return {name: deleted.get(name, 0) for name in TABLES}


def remaining(engine: Engine, name: str) -> set[str]:
    key = KEYS[name][1]
    with engine.connect() as conn:
        return set(conn.execute(select(key)).scalars())


def row(name: str, key: str, at: int) -> dict[str, Any]:
    """A row of table `name` whose expiry (a rate limit: window start) is `at`."""
    if name == "siwe_challenges":
        return {
            "request_id": key,
            "address": "0x" + "ab" * 20,
            "message": "m",
            "status": "pending",
            "created_at": at - CHALLENGE_TTL,
            "expires_at": at,
        }
    if name == "login_requests":
        return {
            "request_id": key,
            "kind": "email",
            "poll_token_hash": secrets.token_bytes(32),
            "user_code": "BCDF-GHJK",
            "status": "pending",
            "created_at": at - REQUEST_TTL,
            "expires_at": at,
        }
    if name == "spent_tokens":
        return {"jti": key, "expires_at": at}
    return {"key": key, "window_start": at, "hits": 1}


def add(engine: Engine, name: str, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        conn.execute(insert(KEYS[name][0]), rows)


@pytest.fixture
def store(engine: Engine, clock: Clock) -> IdentityLinkStore:
    return IdentityLinkStore(engine, "agentkeys", clock=clock)


@pytest.fixture
def logins(engine: Engine, clock: Clock) -> LoginRequests:
    return LoginRequests(engine, clock=clock)


@pytest.fixture
def wallet(engine: Engine, store: IdentityLinkStore, clock: Clock) -> WalletChallenges:
    return WalletChallenges(
        engine, store, issuer="http://127.0.0.1:8000", chain_ids=(1,), clock=clock
    )


def sign(key: Any, message: str) -> str:
    return "0x" + bytes(Account.sign_message(encode_defunct(text=message), key.key).signature).hex()


def test_each_table_keeps_what_a_flow_can_still_use_to_the_second(
    engine: Engine,
    clock: Clock,
    logins: LoginRequests,
    wallet: WalletChallenges,
    store: IdentityLinkStore,
) -> None:
    """Rows written by the real code paths, their expiry one second either side of each rule."""
    ids: dict[str, str] = {}

    def login(name: str, expires_at: int, *, consume: bool = False) -> None:
        clock.now = expires_at - REQUEST_TTL
        started = logins.start_email(Identity(EMAIL, f"{name}@example.com"))
        if consume:  # approved and picked up, as the poll that hands out the session does
            assert started.approve_token is not None
            assert logins.approve(started.approve_token) == started.user_code
            assert logins.pickup(started.request_id) is True
        ids[name] = started.request_id

    def challenge(name: str, expires_at: int, *, use: bool = False) -> None:
        clock.now = expires_at - CHALLENGE_TTL
        key = Account.create()
        started = wallet.start(key.address.lower(), None, None)
        if use:
            assert wallet.verify(started.request_id, sign(key, started.message)).address
        ids[name] = started.request_id

    login("login_gone", CUTOFF - 1)
    login("login_consumed_gone", CUTOFF - 1, consume=True)
    login("login_at_cutoff", CUTOFF)
    login("login_expired_recently", NOW - 1)
    login("login_consumed_live", NOW + 1, consume=True)  # a second poll still gets "consumed"
    login("login_live", NOW + REQUEST_TTL - 1)
    challenge("challenge_gone", CUTOFF - 1)
    challenge("challenge_used_gone", CUTOFF - 1, use=True)
    challenge("challenge_at_cutoff", CUTOFF)
    challenge("challenge_used_live", NOW + 1, use=True)  # a replay still gets challenge_used
    challenge("challenge_live", NOW + CHALLENGE_TTL - 1)
    clock.now = NOW - 7200  # spend() prunes nothing of these on its own
    for jti, expires_at in [
        ("spent_gone", NOW - SPENT_GRACE_SECONDS - 1),
        ("spent_at_grace", NOW - SPENT_GRACE_SECONDS),  # its token verifies until exp + leeway
        ("spent_live", NOW + 300),
    ]:
        assert store.spend(jti, expires_at) is True
    digest = "0" * 64
    add(
        engine,
        "rate_limits",
        [
            row("rate_limits", f"email_ip:{digest}", NOW - 60),  # [NOW-60, NOW): over at NOW
            row("rate_limits", f"verify_ip:{digest}", NOW - 59),  # over at NOW+1
            row("rate_limits", f"email_address:{digest}", NOW - 900),
            row("rate_limits", f"email_address:{'f' * 64}", NOW - 899),
            row("rate_limits", f"retired_name:{digest}", NOW - LONGEST_WINDOW),
            row("rate_limits", f"retired_other:{digest}", NOW - LONGEST_WINDOW + 1),
        ],
    )

    assert prune(engine, NOW) == counts(
        siwe_challenges=2, login_requests=2, spent_tokens=1, rate_limits=3
    )
    assert remaining(engine, "login_requests") == {
        ids[name]
        for name in (
            "login_at_cutoff",
            "login_expired_recently",
            "login_consumed_live",
            "login_live",
        )
    }
    assert remaining(engine, "siwe_challenges") == {
        ids[name] for name in ("challenge_at_cutoff", "challenge_used_live", "challenge_live")
    }
    assert remaining(engine, "spent_tokens") == {"spent_at_grace", "spent_live"}
    assert remaining(engine, "rate_limits") == {
        f"verify_ip:{digest}",
        f"email_address:{'f' * 64}",
        f"retired_other:{digest}",
    }
    assert prune(engine, NOW) == counts()
    # One second later each boundary row has gone past its rule.
    assert prune(engine, NOW + 1) == counts(
        siwe_challenges=1, login_requests=1, spent_tokens=1, rate_limits=3
    )


def test_the_configured_windows_are_the_ones_that_end(engine: Engine) -> None:
    digest = "1" * 64
    add(
        engine,
        "rate_limits",
        [
            row("rate_limits", f"email_ip:{digest}", NOW - 30),
            row("rate_limits", f"email_ip:{'2' * 64}", NOW - 29),
            row("rate_limits", f"email_address:{digest}", NOW - 3600),
            row("rate_limits", f"email_address:{'2' * 64}", NOW - 3599),
        ],
    )
    limits = {**DEFAULT_LIMITS, "email_ip": Limit(60, 30), "email_address": Limit(5, 3600)}
    assert prune(engine, NOW, limits=limits) == counts(rate_limits=2)
    assert remaining(engine, "rate_limits") == {f"email_ip:{'2' * 64}", f"email_address:{'2' * 64}"}


@pytest.mark.parametrize(("expired", "statements"), [(0, 1), (4, 2), (25, 7)])
def test_batches_loop_until_a_short_one_each_its_own_transaction(
    engine: Engine, expired: int, statements: int
) -> None:
    add(engine, "spent_tokens", [row("spent_tokens", f"old-{i}", NOW - 3600) for i in range(25)])
    add(engine, "spent_tokens", [row("spent_tokens", "live", NOW + 60)])
    with engine.begin() as conn:  # keep only `expired` of the old ones
        conn.execute(
            spent_tokens.delete().where(
                spent_tokens.c.jti.in_([f"old-{i}" for i in range(expired, 25)])
            )
        )
    deletes: list[str] = []
    commits: list[int] = []

    def on_execute(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("DELETE FROM "):
            deletes.append(statement.split()[2])

    event.listen(engine, "before_cursor_execute", on_execute)
    event.listen(engine, "commit", lambda _conn: commits.append(1))
    try:
        assert prune(engine, NOW, batch=4) == counts(spent_tokens=expired)
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)
    assert deletes == ["siwe_challenges", "login_requests"] + ["spent_tokens"] * statements + [
        "rate_limits"
    ]
    assert len(commits) == len(deletes)
    assert remaining(engine, "spent_tokens") == {"live"}


def test_batch_must_be_positive(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    with pytest.raises(ValueError, match="batch must be at least 1"):
        prune(engine, NOW, batch=0)
    engine.dispose()


@pytest.fixture
def pg_engines(postgres_url: str) -> Iterator[tuple[Engine, Engine]]:
    """A plain engine and the pruner's, whose every lock wait fails after 2 s instead of hanging
    the test: a prune that waited on a held row would raise, not return."""
    plain = make_engine(postgres_url)
    pruner = make_engine(postgres_url, connect_args={"options": "-c lock_timeout=2s"})
    yield plain, pruner
    plain.dispose()
    pruner.dispose()


@pytest.mark.parametrize("name", TABLES)
def test_a_row_a_hot_path_holds_is_skipped_not_waited_for(
    pg_engines: tuple[Engine, Engine], name: str
) -> None:
    plain, pruner = pg_engines
    key = KEYS[name][1]
    old = NOW - 2 * LONGEST_WINDOW  # past every rule
    add(plain, name, [row(name, f"email_ip:held-{i}", old) for i in range(3)])
    held = "email_ip:held-1"
    with plain.connect() as hot_path:
        transaction = hot_path.begin()
        hot_path.execute(select(key).where(key == held).with_for_update())
        # The lock is real: another transaction asking for the row without waiting is refused.
        with plain.connect() as other, pytest.raises(OperationalError, match="could not obtain"):
            other.execute(select(key).where(key == held).with_for_update(nowait=True))
        assert prune(pruner, NOW) == counts(**{name: 2})
        assert remaining(plain, name) == {held}
        transaction.commit()  # the hot path moves on; the next run takes the row
    assert prune(pruner, NOW) == counts(**{name: 1})
    assert remaining(plain, name) == set()


def test_the_live_flows_keep_working_after_a_prune(
    engine: Engine,
    clock: Clock,
    logins: LoginRequests,
    wallet: WalletChallenges,
    store: IdentityLinkStore,
) -> None:
    at = NOW + 450  # inside the 900 s email_address window that began at NOW
    limit = Limit(3, 900)
    limiter = RateLimiter(SqlCounter(engine), clock=clock)
    # Yesterday's leftovers, one of each, through the same code paths.
    clock.now = at - 86400
    logins.start_email(Identity(EMAIL, "yesterday@example.com"))
    wallet.start(Account.create().address.lower(), None, None)
    assert limiter.hit("email_address", "yesterday@example.com", limit) is None
    # Live ones, started five minutes ago.
    clock.now = at - 300
    approved = logins.start_email(Identity(EMAIL, "approved@example.com"))
    waiting = logins.start_email(Identity(EMAIL, "waiting@example.com"))
    assert approved.approve_token is not None and waiting.approve_token is not None
    assert logins.approve(approved.approve_token) == approved.user_code  # not picked up yet
    key = Account.create()
    challenge = wallet.start(key.address.lower(), None, None)
    assert store.spend("live", at + 600) is True
    assert limiter.hit("email_address", "live@example.com", limit) is None
    assert limiter.hit("email_address", "live@example.com", limit) is None
    clock.now = at - 86400  # after the live spend, whose own clean-up would have taken it
    assert store.spend("yesterday", at - 86400 + 300) is True

    clock.now = at
    assert prune(engine, at, limits={**DEFAULT_LIMITS, "email_address": limit}) == counts(
        siwe_challenges=1, login_requests=1, spent_tokens=1, rate_limits=1
    )

    # The request verified before the prune is picked up within its window, once.
    status = logins.status(approved.request_id, approved.poll_token)
    assert (status.status, status.identity) == (VERIFIED, Identity(EMAIL, "approved@example.com"))
    assert logins.pickup(approved.request_id) is True
    assert logins.status(approved.request_id, approved.poll_token).status == CONSUMED
    # The one still pending is approved and picked up.
    assert logins.approve(waiting.approve_token) == waiting.user_code
    assert logins.pickup(waiting.request_id) is True
    # The live challenge verifies; the spent id stays single use; the window keeps its count.
    signed_in = wallet.verify(challenge.request_id, sign(key, challenge.message))
    assert signed_in.address == key.address.lower()
    assert store.resolve(Identity(EVM, signed_in.address)) == signed_in.account
    assert store.spend("live", at + 600) is False
    assert limiter.hit("email_address", "live@example.com", limit) is None  # the third
    assert limiter.hit("email_address", "live@example.com", limit) == NOW + 900 - at
    # New flows start as before.
    assert logins.start_email(Identity(EMAIL, "new@example.com")).expires_at == at + REQUEST_TTL


def test_prune_command_prints_the_counts(app: Flask) -> None:
    engine = services_of(app).engine
    now = now_seconds()
    gone, live = now - 10 * LONGEST_WINDOW, now + 3600
    for name in TABLES:
        add(engine, name, [row(name, f"start_ip:gone-{i}", gone) for i in range(3)])
        add(engine, name, [row(name, "start_ip:live", live)])
    with engine.begin() as conn:  # one fewer spent id, so each count is its table's own
        conn.execute(spent_tokens.delete().where(spent_tokens.c.jti == "start_ip:gone-2"))
    result = app.test_cli_runner().invoke(args=["prune", "--batch", "2"])
    assert result.exit_code == 0, result.output
    assert result.output == (
        "pruned 3 siwe_challenges\npruned 3 login_requests\npruned 2 spent_tokens\n"
        "pruned 3 rate_limits\n"
    )
    for name in TABLES[:3]:
        assert remaining(engine, name) == {"start_ip:live"}
    # The rate-limit row "start_ip:live" is a window that starts in an hour: not over.
    assert remaining(engine, "rate_limits") == {"start_ip:live"}
    again = app.test_cli_runner().invoke(args=["prune"])
    assert again.output == (
        "pruned 0 siwe_challenges\npruned 0 login_requests\npruned 0 spent_tokens\n"
        "pruned 0 rate_limits\n"
    )


def test_prune_command_refuses_an_empty_batch(app: Flask) -> None:
    result = app.test_cli_runner().invoke(args=["prune", "--batch", "0"])
    assert result.exit_code == 2
    assert "Invalid value for '--batch': 0 is not in the range x>=1." in result.output
