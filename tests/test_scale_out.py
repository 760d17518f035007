"""Scale-out (issue 10): two broker instances, each the Procfile's web process with 4 gevent
workers, on one PostgreSQL database and one Redis. Whatever starts on one completes on the
other; limits, single use and revocation hold across both."""

from __future__ import annotations

import email
import email.policy
import hashlib
import itertools
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import pytest
import redis
import requests
from aiosmtpd.controller import Controller
from eth_account import Account
from sqlalchemy import func, select

from agentkeys.broker.db import make_engine, rate_limits
from agentkeys.crypto import derive_wallet, omni
from agentkeys.identity import mailbox as mailbox_of
from tests.broker import Broker, broker_env
from tests.conftest import POSTGRES_ADMIN_URL, _admin, race
from tests.live import free_port, gunicorn
from tests.smtp import Recorder, Server, magic_link_token
from tests.test_wallet import local_sign
from tests.vectors import VECTOR_MASTER

# A Redis database no other test uses; every subject counted in it (an address, this run's
# loopback IP under limits no run reaches) is this run's own, so parallel runs never collide.
REDIS_URL = "redis://127.0.0.1:6379/14"
ADDRESS_LIMIT = 3
# A day's window for the limit under test, so none ends mid-test; the IP limits out of reach
# (every request here comes from 127.0.0.1, as do those of any other run sharing this Redis).
LIMITS = (
    f"email_address={ADDRESS_LIMIT}/86400,"
    "email_ip=1000000/60,start_ip=1000000/60,verify_ip=1000000/60"
)
RUN = secrets.token_hex(4)
RACERS = 50


def problem(status: int, code: str, detail: str) -> dict[str, Any]:
    titles = {400: "Bad Request", 401: "Unauthorized", 409: "Conflict", 429: "Too Many Requests"}
    return {
        "type": f"urn:agentkeys:problem:{code}",
        "title": titles[status],
        "status": status,
        "detail": detail,
        "error": code,
    }


REVOKED = problem(401, "unauthorized", "The session has been revoked; sign in again.")
CHALLENGE_REVOKED = problem(
    401, "unauthorized", "The session that started this challenge has been revoked; sign in again."
)
CHALLENGE_USED = problem(401, "challenge_used", "This challenge was already used; start a new one.")
WALLET_TAKEN = problem(
    409, "identity_already_linked", "That wallet is already linked to another account."
)


@dataclass
class Pair:
    """Two instances behind one issuer, as a load balancer would put them."""

    a: Broker
    b: Broker
    mailbox: Server
    database_url: str

    def by_name(self, name: str) -> Broker:
        return {"a": self.a, "b": self.b}[name]

    def alternate(self) -> Iterator[Broker]:
        return itertools.cycle((self.a, self.b))


@pytest.fixture(scope="module")
def mailbox() -> Iterator[Server]:
    """A real SMTP server on loopback for both instances (one per module, as the brokers)."""
    recorder, port = Recorder(), free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=port, server_hostname="localhost")
    controller.start()
    yield Server(port, recorder)
    controller.stop()


@pytest.fixture(scope="module")
def shared_database(postgres_template: str) -> Iterator[str]:
    """One fresh migrated PostgreSQL database for both instances, copied from the run's template."""
    name = f"agentkeys_scale_{secrets.token_hex(4)}"
    _admin(f'CREATE DATABASE "{name}" TEMPLATE "{postgres_template}"')
    yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def pair(shared_database: str, mailbox: Server) -> Iterator[Pair]:
    """Both instances, started once for the module: two times 4 workers is heavy on two cores."""
    # The public issuer is the balancer's address in front of both (nothing listens there: the
    # API calls here never fetch it). Tokens and SIWE domains agree because both share it.
    issuer = f"http://127.0.0.1:{free_port()}"
    env = broker_env(
        issuer,
        shared_database,
        mailbox,
        AGENTKEYS_REDIS_URL=REDIS_URL,
        AGENTKEYS_RATE_LIMITS=LIMITS,
        AGENTKEYS_ACCESS_LOG="off",
    )
    with gunicorn(env, workers=4) as a, gunicorn(env, workers=4) as b:
        yield Pair(Broker(a, mailbox), Broker(b, mailbox), mailbox, shared_database)
    client = redis.Redis.from_url(REDIS_URL)
    for address in USED:
        for key in address_counters(client, address):
            client.delete(key)
    client.close()


USED: list[str] = []  # the addresses this module signs in: their Redis counters go at the end


def new_email(name: str) -> str:
    address = f"{name}-{secrets.token_hex(4)}-{RUN}@example.com"
    USED.append(address)
    return address


def address_counters(client: redis.Redis, address: str) -> list[bytes]:
    digest = hashlib.sha256(mailbox_of(address).encode()).hexdigest()
    return list(client.scan_iter(match=f"agentkeys:limit:email_address:{digest}:*"))


def mails_to(mailbox: Server, address: str) -> list[EmailMessage]:
    """Every mail the server accepted for `address` (the SMTP reply comes after the handler,
    so a mail is here once its 202 has returned)."""
    found = []
    for envelope in list(mailbox.recorder.envelopes):
        if envelope.rcpt_tos == [address]:
            assert isinstance(envelope.content, bytes)
            parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            found.append(parsed)
    return found


def request_link(broker: Broker, address: str) -> dict[str, Any]:
    started = broker.post("/v1/auth/email/request", {"email": address})
    assert started.status_code == 202, started.text
    body: dict[str, Any] = started.json()
    assert sorted(body) == [
        "expires_in_seconds",
        "poll_token",
        "poll_url",
        "request_id",
        "user_code",
    ]
    assert body["poll_url"] == f"/v1/auth/email/status/{body['request_id']}"
    return body


def only_token(mailbox: Server, address: str) -> str:
    (mail,) = mails_to(mailbox, address)
    return magic_link_token(mail)


def sign_in(start: Broker, finish: Broker, address: str) -> dict[str, Any]:
    """A magic link requested and polled on `start`, approved on `finish`: the verified status."""
    before = len(mails_to(start.mailbox, address))
    started = request_link(start, address)
    mails = mails_to(start.mailbox, address)
    assert len(mails) == before + 1
    approved = finish.post("/v1/auth/email/verify", {"token": magic_link_token(mails[-1])})
    assert approved.json() == {"ok": True, "user_code": started["user_code"]}, approved.text
    status: dict[str, Any] = start.get(started["poll_url"], started["poll_token"]).json()
    assert status["status"] == "verified", status
    return status


VERIFIED_KEYS = ["account", "expires_at", "identity_type", "omni_account", "session_jwt", "status"]


def identities_of(broker: Broker, token: str) -> list[tuple[str, str, str]]:
    listed = broker.get("/v1/identities", token)
    assert listed.status_code == 200, listed.text
    return [
        (item["identity_type"], item["identity_value"], item["status"])
        for item in listed.json()["identities"]
    ]


def spread(broker: Broker, token: str, count: int = 8) -> list[tuple[int, Any]]:
    """`count` reads of /v1/identities, each on a new connection, so they reach several workers."""
    answers = []
    for _ in range(count):
        response = requests.get(
            broker.base + "/v1/identities",
            headers={"Authorization": f"Bearer {token}", "Connection": "close"},
            timeout=15,
        )
        body = response.json()
        answers.append((response.status_code, body if response.status_code != 200 else None))
    return answers


def bound_challenge(broker: Broker, token: str, address: str) -> dict[str, Any]:
    started = broker.post("/v1/auth/wallet/start", {"address": address}, token)
    assert started.status_code == 200, started.text
    challenge: dict[str, Any] = started.json()
    return challenge


def dev_signature(broker: Broker, token: str, account: str, message: str) -> str:
    signed = broker.post(
        "/dev/sign-message", {"omni_account": account, "message_hex": message.encode().hex()}, token
    )
    assert signed.status_code == 200, signed.text
    signature: str = signed.json()["signature"]
    return signature


def wallet_verify(broker: Broker, request_id: str, signature: str) -> requests.Response:
    return broker.post("/v1/auth/wallet/verify", {"request_id": request_id, "signature": signature})


def in_turn(pair: Pair) -> Callable[[], Broker]:
    """A thread-safe supplier of A, B, A, B, … for racing threads."""
    lock = threading.Lock()
    brokers = pair.alternate()

    def next_broker() -> Broker:
        with lock:
            return next(brokers)

    return next_broker


# -- started on one, completed on the other ------------------------------------------------


@pytest.mark.parametrize(("first", "second"), [("a", "b"), ("b", "a")])
def test_a_magic_link_started_on_one_instance_completes_on_the_other(
    pair: Pair, first: str, second: str
) -> None:
    start, finish = pair.by_name(first), pair.by_name(second)
    address = new_email("magic")
    started = request_link(start, address)
    token = only_token(pair.mailbox, address)
    assert finish.get(started["poll_url"], started["poll_token"]).json() == {"status": "pending"}

    approved = finish.post("/v1/auth/email/verify", {"token": token})
    picked = start.get(started["poll_url"], started["poll_token"])

    assert approved.json() == {"ok": True, "user_code": started["user_code"]}
    status = picked.json()
    assert picked.status_code == 200 and sorted(status) == VERIFIED_KEYS, status
    assert status["account"] == status["omni_account"] == omni("email", address)
    assert (status["status"], status["identity_type"]) == ("verified", "email")
    assert finish.get(started["poll_url"], started["poll_token"]).json() == {"status": "consumed"}
    for broker in (start, finish):
        assert identities_of(broker, status["session_jwt"]) == [("email", address, "linked")]


@pytest.mark.parametrize(("first", "second"), [("a", "b"), ("b", "a")])
def test_a_siwe_challenge_started_on_one_instance_verifies_on_the_other(
    pair: Pair, first: str, second: str
) -> None:
    start, finish = pair.by_name(first), pair.by_name(second)
    address = new_email("siwe")
    identity = sign_in(start, finish, address)
    account, session = identity["account"], identity["session_jwt"]
    wallet = derive_wallet(VECTOR_MASTER, account).address
    challenge = bound_challenge(start, session, wallet)
    signature = dev_signature(finish, session, account, challenge["siwe_message"])

    verified = wallet_verify(finish, challenge["request_id"], signature)

    assert verified.status_code == 200, verified.text
    body = verified.json()
    assert sorted(body) == [
        "account",
        "expires_at",
        "omni_account",
        "session_jwt",
        "wallet_address",
    ]
    assert (body["account"], body["wallet_address"]) == (account, wallet)
    assert body["omni_account"] == omni("evm", wallet.lower())
    assert identities_of(start, body["session_jwt"]) == [
        ("email", address, "linked"),
        ("evm", wallet.lower(), "linked"),
    ]
    again = wallet_verify(start, challenge["request_id"], signature)
    assert (again.status_code, again.json()) == (401, CHALLENGE_USED)


# -- limits and single use hold across both -------------------------------------------------


def test_an_address_limit_holds_across_both_instances(pair: Pair) -> None:
    address = new_email("limited")
    brokers = in_turn(pair)
    answers = race(10, lambda: brokers().post("/v1/auth/email/request", {"email": address}))

    statuses = sorted(r.status_code for r in answers)
    assert statuses == [202] * ADDRESS_LIMIT + [429] * (10 - ADDRESS_LIMIT)
    for refused in (r for r in answers if r.status_code == 429):
        assert refused.json() == problem(429, "rate_limited", "Too many requests; try again later.")
        assert 1 <= int(refused.headers["Retry-After"]) <= 86400
    assert len(mails_to(pair.mailbox, address)) == ADDRESS_LIMIT
    # The counter is in Redis, one for both instances; none is in the database.
    client = redis.Redis.from_url(REDIS_URL)
    (key,) = address_counters(client, address)
    assert client.get(key) == b"10"
    client.close()
    engine = make_engine(pair.database_url)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(rate_limits)).scalar_one() == 0
    engine.dispose()


def test_fifty_verifies_of_one_signed_challenge_give_exactly_one_session(pair: Pair) -> None:
    identity_email = new_email("race-siwe")
    identity = sign_in(pair.a, pair.b, identity_email)
    account, session = identity["account"], identity["session_jwt"]
    wallet = derive_wallet(VECTOR_MASTER, account).address
    challenge = bound_challenge(pair.a, session, wallet)
    signature = dev_signature(pair.b, session, account, challenge["siwe_message"])
    brokers = in_turn(pair)

    answers = race(RACERS, lambda: wallet_verify(brokers(), challenge["request_id"], signature))

    won = [r for r in answers if r.status_code == 200]
    assert len(won) == 1, [r.text for r in answers if r.status_code != 401]
    assert [r.json() for r in answers if r.status_code != 200] == [CHALLENGE_USED] * (RACERS - 1)
    assert identities_of(pair.b, won[0].json()["session_jwt"]) == [
        ("email", identity_email, "linked"),
        ("evm", wallet.lower(), "linked"),
    ]


def test_fifty_uses_of_one_magic_link_give_exactly_one_session(pair: Pair) -> None:
    address = new_email("race-magic")  # a first sign-in: the account is created in the race too
    started = request_link(pair.a, address)
    token = only_token(pair.mailbox, address)
    brokers = in_turn(pair)

    approvals = race(RACERS, lambda: brokers().post("/v1/auth/email/verify", {"token": token}))
    polls = race(RACERS, lambda: brokers().get(started["poll_url"], started["poll_token"]))

    approved = [r.json() for r in approvals if r.status_code == 200]
    assert approved == [{"ok": True, "user_code": started["user_code"]}]
    refused = problem(
        400, "invalid_token", "This sign-in link is invalid, expired or already used."
    )
    assert [r.json() for r in approvals if r.status_code != 200] == [refused] * (RACERS - 1)
    assert [r.status_code for r in polls] == [200] * RACERS
    handed_out = [r.json() for r in polls if r.json()["status"] != "consumed"]
    assert len(handed_out) == 1, handed_out
    (status,) = handed_out
    assert sorted(status) == VERIFIED_KEYS and status["status"] == "verified"
    assert status["account"] == omni("email", address)
    for broker in (pair.a, pair.b):
        assert identities_of(broker, status["session_jwt"]) == [("email", address, "linked")]


# The losing insert overlaps the winning one only in some rounds (in others the loser already
# sees the winner's link): enough rounds that both ways to lose are taken.
@pytest.mark.parametrize("round_", range(6))
def test_two_accounts_racing_to_link_one_address_one_wins(pair: Pair, round_: int) -> None:
    """Both hold valid proofs (a key of their own signing their own bound challenge)."""
    key = Account.create()
    people = [sign_in(pair.a, pair.b, new_email(f"p{i}-r{round_}")) for i in range(2)]
    attempts = []
    for person, broker in zip(people, (pair.a, pair.b), strict=True):
        challenge = bound_challenge(broker, person["session_jwt"], key.address)
        attempts.append((challenge["request_id"], local_sign(key, challenge["siwe_message"])))
    # Each challenge verified on the instance that did not start it.
    turns = iter(zip(attempts, (pair.b, pair.a), strict=True))
    lock = threading.Lock()

    def attempt() -> requests.Response:
        with lock:
            (request_id, signature), broker = next(turns)
        return wallet_verify(broker, request_id, signature)

    answers = race(2, attempt)

    assert sorted(r.status_code for r in answers) == [200, 409], [r.text for r in answers]
    refused = next(r for r in answers if r.status_code == 409)
    assert refused.json() == WALLET_TAKEN
    won = next(r for r in answers if r.status_code == 200).json()
    (winner,) = [p for p in people if p["account"] == won["account"]]
    (loser,) = [p for p in people if p is not winner]
    assert won["wallet_address"] == key.address
    address = key.address.lower()
    winner_email = identities_of(pair.a, winner["session_jwt"])[0]
    assert identities_of(pair.b, winner["session_jwt"]) == [
        winner_email,
        ("evm", address, "linked"),
    ]
    assert [i[0] for i in identities_of(pair.a, loser["session_jwt"])] == ["email"]
    link = {"identity_type": "evm", "identity_value": key.address}
    relinked = pair.b.post("/v1/wallet/link", link, winner["session_jwt"])
    assert (relinked.status_code, relinked.json()) == (200, {"status": "linked"})
    for broker in (pair.a, pair.b):
        taken = broker.post("/v1/wallet/link", link, loser["session_jwt"])
        assert (taken.status_code, taken.json()) == (409, WALLET_TAKEN)
        retry = broker.post("/v1/auth/wallet/start", {"address": key.address}, loser["session_jwt"])
        assert (retry.status_code, retry.json()) == (409, WALLET_TAKEN)


# -- revocation ----------------------------------------------------------------------------


def test_sign_out_everywhere_on_one_instance_ends_sessions_on_the_other(pair: Pair) -> None:
    email_address = new_email("revoke")
    identity = sign_in(pair.a, pair.b, email_address)
    session = identity["session_jwt"]
    account = identity["account"]
    wallet = pair.a.wallet_sign_in(session, account)
    assert spread(pair.b, session) == spread(pair.b, wallet) == [(200, None)] * 8
    # A challenge the session started and had signed before it was revoked.
    address = derive_wallet(VECTOR_MASTER, account).address
    challenge = bound_challenge(pair.a, session, address)
    signature = dev_signature(pair.b, session, account, challenge["siwe_message"])

    revoked = pair.a.post("/v1/sessions/revoke", token=session)
    right_after = pair.b.get("/v1/identities", session)

    assert (revoked.status_code, revoked.text) == (204, "")
    assert (right_after.status_code, right_after.json()) == (401, REVOKED)
    assert spread(pair.b, session) == spread(pair.b, wallet) == [(401, REVOKED)] * 8
    derive = pair.b.post("/dev/derive-address", {"omni_account": account}, session)
    assert (derive.status_code, derive.json()) == (401, REVOKED)
    late = wallet_verify(pair.b, challenge["request_id"], signature)
    assert (late.status_code, late.json()) == (401, CHALLENGE_REVOKED)
    again = sign_in(pair.b, pair.a, email_address)["session_jwt"]
    assert spread(pair.b, again, 4) == [(200, None)] * 4


def test_an_unlink_on_one_instance_ends_sessions_on_the_other(pair: Pair) -> None:
    alice_address, backup_address = new_email("alice"), new_email("backup")
    alice = sign_in(pair.a, pair.b, alice_address)["session_jwt"]
    proof = sign_in(pair.b, pair.a, backup_address)["session_jwt"]
    linked = pair.b.post("/v1/identities/link", {"proof": proof}, alice)
    assert linked.status_code == 200, linked.text
    backup = sign_in(pair.b, pair.a, backup_address)
    assert backup["account"] == omni("email", alice_address)
    assert spread(pair.b, alice) == spread(pair.b, backup["session_jwt"]) == [(200, None)] * 8

    unlinked = requests.delete(
        f"{pair.a.base}/v1/identities/email/{backup_address}",
        headers={"Authorization": f"Bearer {alice}"},
        timeout=15,
    )
    right_after = pair.b.get("/v1/identities", alice)

    assert (unlinked.status_code, unlinked.text) == (204, "")
    assert (right_after.status_code, right_after.json()) == (401, REVOKED)
    assert spread(pair.b, alice) == spread(pair.b, backup["session_jwt"]) == [(401, REVOKED)] * 8
