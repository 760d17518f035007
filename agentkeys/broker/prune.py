"""Delete the rows no flow can use any more: expired wallet challenges and sign-in requests,
spent token ids whose tokens can no longer verify, and rate-limit windows that have ended.

Each table is pruned in small batches, each its own short transaction, so a hot path waits at
most one batch for the database (SQLite's write lock) and never for the whole prune."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import Column, ColumnElement, Engine, Table, delete, or_, select

from agentkeys.broker.db import login_requests, rate_limits, siwe_challenges, spent_tokens
from agentkeys.broker.store import SPENT_GRACE_SECONDS
from agentkeys.settings import DEFAULT_LIMITS, Limit

# Expired challenges and sign-in requests are kept an hour longer: until then a late verify or
# poll still gets its documented answer (401 challenge_expired or challenge_used, status
# failed/expired or consumed) rather than 404 unknown_request.
KEEP_EXPIRED_SECONDS = 3600
# parse_limits allows windows of at most a day: a row whose window began a day ago has ended
# under any configuration, whatever limit its key belongs to.
LONGEST_WINDOW = 86400


def prune(
    engine: Engine,
    now: int,
    *,
    batch: int = 1000,
    limits: Mapping[str, Limit] = DEFAULT_LIMITS,
) -> dict[str, int]:
    """Delete what no flow needs at `now`; the rows deleted per table."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    kept_until = now - KEEP_EXPIRED_SECONDS
    # No flow takes a challenge or sign-in request from its expires_at on (wallet.verify,
    # login.approve/take_state/pickup all check it); past that only the answer a late
    # caller gets depends on the row, hence the extra hour.
    rules: list[tuple[Table, Column[str], ColumnElement[bool]]] = [
        (siwe_challenges, siwe_challenges.c.request_id, siwe_challenges.c.expires_at < kept_until),
        (login_requests, login_requests.c.request_id, login_requests.c.expires_at < kept_until),
        # A spent id must outlive every moment its token still verifies (store.spend's rule).
        (
            spent_tokens,
            spent_tokens.c.jti,
            spent_tokens.c.expires_at < now - SPENT_GRACE_SECONDS,
        ),
        (rate_limits, rate_limits.c.key, _window_ended(now, limits)),
    ]
    return {
        table.name: _delete_in_batches(engine, table, key, expired, batch)
        for table, key, expired in rules
    }


def _window_ended(now: int, limits: Mapping[str, Limit]) -> ColumnElement[bool]:
    """A counter whose fixed window [start, start + seconds) is over: the next hit restarts it
    at 1 anyway (ratelimit.SqlCounter), so deleting it changes no count. Keys are `name:…`."""
    start, key = rate_limits.c.window_start, rate_limits.c.key
    ended = [start <= now - LONGEST_WINDOW]
    for name, limit in limits.items():
        # autoescape: the "_" in the names is a LIKE wildcard otherwise.
        ended.append(key.startswith(f"{name}:", autoescape=True) & (start <= now - limit.seconds))
    return or_(*ended)


def _delete_in_batches(
    engine: Engine, table: Table, key: Column[str], expired: ColumnElement[bool], batch: int
) -> int:
    """DELETE … WHERE key IN (the first `batch` expired keys), one transaction per batch, until a
    batch comes up short."""
    # SKIP LOCKED (PostgreSQL; SQLite has no row locks and renders none): a row a hot path holds
    # right now (a verify consuming a late challenge, a limiter restarting a window) is left for
    # the next run instead of making the prune, and every request queued behind it, wait.
    doomed = select(key).where(expired).limit(batch).with_for_update(skip_locked=True)
    total = 0
    while True:
        with engine.begin() as conn:
            deleted = conn.execute(delete(table).where(key.in_(doomed))).rowcount
        total += deleted
        if deleted < batch:
            return total
