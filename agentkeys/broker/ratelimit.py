"""Abuse limits (§6.7): fixed-window counters in Redis or the database, never in process
memory, so they hold across gunicorn workers and instances."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from sqlalchemy import Engine, bindparam, case
from sqlalchemy.dialects import postgresql, sqlite

from agentkeys.broker.db import one_statement, rate_limits
from agentkeys.errors import ConfigError, LimitsUnavailable
from agentkeys.settings import Limit

log = logging.getLogger(__name__)
LIMITS_RETRY_AFTER = 5  # seconds


class Counter(Protocol):
    def incr(self, key: str, window_start: int, seconds: int) -> int:
        """Count one hit in the window starting at `window_start`; the hits so far."""

    def ping(self) -> None:
        """Raise LimitsUnavailable unless the store answers (readiness)."""


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

    def ping(self) -> None:
        self.counter.ping()


class SqlCounter:
    def __init__(self, engine: Engine) -> None:
        self.engine = one_statement(engine)
        dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
        insert = dialect.insert(rate_limits).values(
            key=bindparam("key"), window_start=bindparam("window_start"), hits=1
        )
        # One atomic upsert: a new window restarts the count, the same window adds one. Built
        # once: building it again on every hit cost more than the database's work.
        same_window = rate_limits.c.window_start == insert.excluded.window_start
        self._upsert = insert.on_conflict_do_update(
            index_elements=[rate_limits.c.key],
            set_={
                "hits": case((same_window, rate_limits.c.hits + 1), else_=1),
                "window_start": insert.excluded.window_start,
            },
        ).returning(rate_limits.c.hits)

    def incr(self, key: str, window_start: int, seconds: int) -> int:
        with self.engine.begin() as conn:
            hits = conn.execute(self._upsert, {"key": key, "window_start": window_start})
            return int(hits.scalar_one())

    def ping(self) -> None:
        """Nothing of its own: readiness checks this same database first."""


class RedisCounter:
    def __init__(self, url: str) -> None:
        import redis

        self._errors = redis.RedisError
        try:
            self.redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        except ValueError:  # its message can quote the URL: an unencoded "/" makes a "port"
            raise ConfigError(
                "AGENTKEYS_REDIS_URL must be redis:// or rediss:// "
                "[user:password@]host[:port][/db] (user and password percent-encoded)"
            ) from None

    def incr(self, key: str, window_start: int, seconds: int) -> int:
        name = f"agentkeys:limit:{key}:{window_start}"
        # Fail closed: a hit that cannot be counted is refused. Failing open would lift every
        # abuse limit at once for as long as Redis is down, and anyone who can exhaust or cut
        # it could then send mail and guess codes unlimited.
        with self._unavailable_on_error(), self.redis.pipeline() as pipe:
            pipe.incr(name)
            pipe.expire(name, seconds + 5)
            hits, _ = pipe.execute()
        return int(hits)

    def ping(self) -> None:
        with self._unavailable_on_error():
            self.redis.ping()

    @contextlib.contextmanager
    def _unavailable_on_error(self) -> Iterator[None]:
        try:
            yield
        except self._errors as exc:
            # One line: the class and redis-py's first line name host and port, never a password.
            first = str(exc).partition("\n")[0][:300]
            log.warning(
                "limits_unavailable: %s.%s: %s", type(exc).__module__, type(exc).__qualname__, first
            )
            raise LimitsUnavailable(
                "The rate-limit store is unavailable; try again shortly.", LIMITS_RETRY_AFTER
            ) from exc
