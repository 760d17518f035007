"""Abuse limits (§6.7): fixed-window counters in Redis or the database, never in process
memory, so they hold across gunicorn workers and instances."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Protocol

from sqlalchemy import Engine, case
from sqlalchemy.dialects import postgresql, sqlite

from agentkeys.db import rate_limits
from agentkeys.errors import ConfigError
from agentkeys.settings import Limit


class Counter(Protocol):
    def incr(self, key: str, window_start: int, seconds: int) -> int:
        """Count one hit in the window starting at `window_start`; the hits so far."""


class RateLimiter:
    def __init__(self, counter: Counter, clock: Callable[[], float] = time.time) -> None:
        self.counter, self.clock = counter, clock

    def hit(self, name: str, subject: str, limit: Limit) -> int | None:
        """Count a hit; None while within the limit, else the seconds until the window ends."""
        now = int(self.clock())
        window_start = now - now % limit.seconds
        # Hashed: a fixed-length key fits its column for any subject, and the counters table
        # holds no addresses.
        digest = hashlib.sha256(subject.encode()).hexdigest()
        hits = self.counter.incr(f"{name}:{digest}", window_start, limit.seconds)
        if hits <= limit.count:
            return None
        return max(1, window_start + limit.seconds - now)


class SqlCounter:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = postgresql if engine.dialect.name == "postgresql" else sqlite

    def incr(self, key: str, window_start: int, seconds: int) -> int:
        insert = self.dialect.insert(rate_limits).values(key=key, window_start=window_start, hits=1)
        # One atomic upsert: a new window restarts the count, the same window adds one.
        same_window = rate_limits.c.window_start == insert.excluded.window_start
        statement = insert.on_conflict_do_update(
            index_elements=[rate_limits.c.key],
            set_={
                "hits": case((same_window, rate_limits.c.hits + 1), else_=1),
                "window_start": insert.excluded.window_start,
            },
        ).returning(rate_limits.c.hits)
        with self.engine.begin() as conn:
            return int(conn.execute(statement).scalar_one())


class RedisCounter:
    def __init__(self, url: str) -> None:
        import redis

        try:
            self.redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        except ValueError:  # its message can quote the URL: an unencoded "/" makes a "port"
            raise ConfigError(
                "AGENTKEYS_REDIS_URL must be redis:// or rediss:// "
                "[user:password@]host[:port][/db] (user and password percent-encoded)"
            ) from None

    def incr(self, key: str, window_start: int, seconds: int) -> int:
        name = f"agentkeys:limit:{key}:{window_start}"
        with self.redis.pipeline() as pipe:
            pipe.incr(name)
            pipe.expire(name, seconds + 5)
            hits, _ = pipe.execute()
        return int(hits)
