"""Abuse limits (PROTOCOL §6.7): parse_limits, and RateLimiter over the database and Redis."""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from sqlalchemy import Engine, select

from agentkeys.broker.db import make_engine, rate_limits
from agentkeys.broker.ratelimit import Counter, RateLimiter, RedisCounter, SqlCounter
from agentkeys.errors import ConfigError
from agentkeys.settings import LIMITS_VAR, Limit, parse_limits

REDIS_URL = "redis://127.0.0.1:6379/0"
WINDOW_START = 1_700_000_040  # a multiple of 60: a fresh one-minute window begins here


class Clock:
    def __init__(self, now: float = WINDOW_START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- configuration ------------------------------------------------------------------------

# §6.7: email requests 5 per address per 15 min and 60 per IP per minute; OAuth2 and wallet
# starts 60 per IP per minute; verify endpoints 120 per IP per minute.
PROTOCOL_DEFAULTS = {
    "email_address": Limit(5, 900),
    "email_ip": Limit(60, 60),
    "start_ip": Limit(60, 60),
    "verify_ip": Limit(120, 60),
}


@pytest.mark.parametrize(
    ("raw", "overrides"),
    [
        (None, {}),
        ("", {}),
        (" , ,", {}),
        ("email_address=3/600", {"email_address": Limit(3, 600)}),
        (
            " email_ip=1/1 , verify_ip=500/86400,",
            {"email_ip": Limit(1, 1), "verify_ip": Limit(500, 86400)},
        ),
        ("start_ip=60/60,start_ip=10/30", {"start_ip": Limit(10, 30)}),  # the last one wins
    ],
)
def test_parse_limits(raw: str | None, overrides: dict[str, Limit]) -> None:
    assert parse_limits(raw) == {**PROTOCOL_DEFAULTS, **overrides}


@pytest.mark.parametrize(
    "raw",
    [
        "nope=1/60",
        "EMAIL_ADDRESS=3/60",
        "email_address",
        "email_address=",
        "email_address=3",
        "email_address=3/",
        "email_address=/60",
        "email_address=x/60",
        "email_address=3/1m",
        "email_address=-1/60",
        "email_address=+3/60",
        "email_address=3.5/60",
        "email_address= 3/60",
        "email_address =3/60",
        "email_address=3/60/5",
        "email_address=3/60;email_ip=1/1",
        "email_address=0/60",
        "email_address=3/0",
        "email_address=3/86401",
        "email_address=\u00b2/60",  # SUPERSCRIPT TWO: isdigit() but not int()
        "email_address=\uff13/60",  # FULLWIDTH DIGIT THREE
        "email_address=3/\u0666\u0660",  # ARABIC-INDIC 60
        "email_address=3/600,bogus",
    ],
)
def test_parse_limits_refuses_bad_specs(raw: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_limits(raw)
    assert raised.value.code == "config_error"
    assert LIMITS_VAR == "AGENTKEYS_RATE_LIMITS"
    assert LIMITS_VAR in raised.value.detail


# --- counters: SQLite, PostgreSQL (the any_database_url pair) and Redis ------------------

NewCounter = Callable[[], Counter]


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def new_counter(request: pytest.FixtureRequest) -> Iterator[NewCounter]:
    """Builds counters on separate engines or connections to one store, as workers would."""
    engines: list[Engine] = []
    counters: list[RedisCounter] = []
    if request.param == "redis":

        def build() -> Counter:
            counter = RedisCounter(REDIS_URL)
            counters.append(counter)
            return counter

    else:
        url: str = request.getfixturevalue(request.param.replace("postgresql", "postgres") + "_url")

        def build() -> Counter:
            engines.append(make_engine(url))
            return SqlCounter(engines[-1])

    yield build
    for engine in engines:
        engine.dispose()
    for counter in counters:
        counter.redis.close()


@pytest.fixture
def subject() -> Iterator[str]:
    """A subject (client IP or address) of this test's own; its Redis keys go at the end."""
    subject = f"test-{secrets.token_hex(8)}"
    yield subject
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"agentkeys:limit:*{subject}*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_the_hit_over_the_limit_waits_for_the_window_to_end(
    new_counter: NewCounter, subject: str
) -> None:
    clock = Clock(WINDOW_START + 15)
    limiter = RateLimiter(new_counter(), clock=clock)
    limit = Limit(3, 60)

    assert [limiter.hit("email_ip", subject, limit) for _ in range(3)] == [None] * 3
    assert limiter.hit("email_ip", subject, limit) == 45  # seconds left in this window
    clock.now = WINDOW_START + 50.7
    assert limiter.hit("email_ip", subject, limit) == 10
    clock.now = WINDOW_START + 59.9
    assert limiter.hit("email_ip", subject, limit) == 1
    # Other names and subjects count on their own.
    assert limiter.hit("verify_ip", subject, limit) is None
    assert limiter.hit("email_ip", subject + "-other", limit) is None

    clock.now = WINDOW_START + 60  # a new window starts from zero
    assert [limiter.hit("email_ip", subject, limit) for _ in range(3)] == [None] * 3
    assert limiter.hit("email_ip", subject, limit) == 60
    clock.now = WINDOW_START + 185  # and so does a later one, skipping empty windows
    assert limiter.hit("email_ip", subject, limit) is None


def test_counters_are_shared_by_limiters_on_separate_connections(
    new_counter: NewCounter, subject: str
) -> None:
    clock = Clock(WINDOW_START + 30)
    first, second = RateLimiter(new_counter(), clock), RateLimiter(new_counter(), clock)
    limit = Limit(3, 60)

    assert first.hit("start_ip", subject, limit) is None
    assert second.hit("start_ip", subject, limit) is None
    assert first.hit("start_ip", subject, limit) is None
    assert second.hit("start_ip", subject, limit) == 30
    assert first.hit("start_ip", subject, limit) == 30


def test_concurrent_hits_allow_exactly_the_limit(new_counter: NewCounter, subject: str) -> None:
    clock = Clock(WINDOW_START + 1)  # fixed: the race must not straddle two windows
    limiter = RateLimiter(new_counter(), clock)
    limit = Limit(50, 60)
    barrier = threading.Barrier(8)

    def worker() -> list[int | None]:
        barrier.wait()
        return [limiter.hit("verify_ip", subject, limit) for _ in range(10)]

    with ThreadPoolExecutor(8) as pool:
        results = [r for f in [pool.submit(worker) for _ in range(8)] for r in f.result()]

    assert results.count(None) == 50
    assert results.count(59) == 30


def test_sql_counter_keeps_one_row_per_key(sqlite_url: str, subject: str) -> None:
    engine = make_engine(sqlite_url)
    clock = Clock()
    limiter = RateLimiter(SqlCounter(engine), clock)
    for minute in range(3):
        clock.now = WINDOW_START + 60 * minute
        limiter.hit("email_ip", subject, Limit(1, 60))
        limiter.hit("email_ip", subject, Limit(1, 60))
    with engine.connect() as conn:
        stored = conn.execute(select(rate_limits)).all()
    engine.dispose()
    digest = hashlib.sha256(subject.encode()).hexdigest()
    assert [tuple(r) for r in stored] == [(f"email_ip:{digest}", WINDOW_START + 120, 2)]


def test_redis_counter_keys_expire_after_their_window(subject: str) -> None:
    counter = RedisCounter(REDIS_URL)
    RateLimiter(counter, Clock()).hit("email_address", subject, Limit(5, 900))
    digest = hashlib.sha256(subject.encode()).hexdigest()
    key = f"agentkeys:limit:email_address:{digest}:{WINDOW_START - WINDOW_START % 900}"
    ttl = counter.redis.ttl(key)
    counter.redis.close()
    assert isinstance(ttl, int)
    assert 900 <= ttl <= 905
