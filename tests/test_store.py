"""IdentityLinkStore (PROTOCOL §1, §6.3, §6.4) on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest
from sqlalchemy import Engine, Table, event, func, select, update

from agentkeys.broker.db import accounts, identities, make_engine, spent_tokens
from agentkeys.broker.ratelimit import SqlCounter
from agentkeys.broker.store import (
    SPENT_GRACE_SECONDS,
    IdentityLinkStore,
    LinkedIdentity,
)
from agentkeys.crypto import omni
from agentkeys.errors import (
    AgentKeysError,
    AnchorIdentity,
    IdentityAlreadyLinked,
    IdentityConflict,
    InvalidEmail,
    LastIdentity,
    NotFound,
    Unauthorized,
)
from agentkeys.identity import EMAIL, EVM, Identity, canonical_email, canonical_identity
from agentkeys.sessions import LEEWAY_SECONDS
from tests.conftest import T0, Clock, race

CLIENT_ID = "agentkeys"

T = TypeVar("T")

ALICE = Identity(EMAIL, "alice@example.com")
BOB = Identity("oauth2_google", "108234567890123456789")
CAROL = Identity(EVM, "0x" + "c0" * 20)


@pytest.fixture
def store(engine: Engine, clock: Clock) -> IdentityLinkStore:
    return IdentityLinkStore(engine, CLIENT_ID, clock=clock)


def count(engine: Engine, table: Table) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def account_row(engine: Engine, anchor: str) -> tuple[int, str | None] | None:
    with engine.connect() as conn:
        row = conn.execute(
            select(accounts.c.session_generation, accounts.c.merged_into).where(
                accounts.c.anchor == anchor
            )
        ).first()
    return None if row is None else (int(row.session_generation), row.merged_into)


# --- sign-in and anchors (§1) -------------------------------------------------------------


@pytest.mark.parametrize("identity", [ALICE, BOB, CAROL], ids=["email", "oauth2", "evm"])
def test_sign_in_creates_an_account_anchored_at_the_identitys_omni(
    store: IdentityLinkStore, engine: Engine, clock: Clock, identity: Identity
) -> None:
    assert store.resolve(identity) is None
    assert store.session_generation(identity.omni(CLIENT_ID)) is None  # no such account yet

    anchor = store.sign_in(identity)

    assert anchor == omni(identity.type, identity.value, CLIENT_ID)
    assert store.resolve(identity) == anchor
    assert store.identities(anchor) == [LinkedIdentity(identity, "linked", T0)]
    assert store.session_generation(anchor) == 0
    clock.now += 100
    assert store.sign_in(identity) == anchor  # idempotent: no second account, no new link time
    assert store.identities(anchor) == [LinkedIdentity(identity, "linked", T0)]
    assert count(engine, accounts) == 1
    assert count(engine, identities) == 1


LONGEST_DOMAIN = ".".join(["b" * 63, "c" * 63, "d" * 57]) + ".com"  # 189 characters
LONGEST_EMAIL = "a" * 64 + "@" + LONGEST_DOMAIN  # 254 characters, the maximum


CANONICAL_EMAILS = [
    ("onboard@example.com", "onboard@example.com"),
    ("Onboard@Example.COM", "onboard@example.com"),
    ("  onboard@example.com\t", "onboard@example.com"),
    ("onboard@example.com\r\n", "onboard@example.com"),
    ("First.Last+tag@Mail.Example.co.uk", "first.last+tag@mail.example.co.uk"),
    ("a!#$%&*+/=?^_`{|}~-z@x-1.example", "a!#$%&*+/=?^_`{|}~-z@x-1.example"),
    ("1@2.io", "1@2.io"),
    (LONGEST_EMAIL.upper(), LONGEST_EMAIL),
]


# The email tables test pure functions; they need no database (and 2 x 40 fresh databases
# would cost more than the rest of this file). The store side is the test after them.
@pytest.mark.parametrize(("raw", "canonical"), CANONICAL_EMAILS)
def test_canonical_email(raw: str, canonical: str) -> None:
    assert canonical_email(raw) == canonical
    assert canonical_identity(EMAIL, raw) == Identity(EMAIL, canonical)


INVALID_EMAILS = [
    "",
    "   ",
    "plain",
    "@example.com",
    "onboard@",
    "onboard@example",  # a domain needs at least one dot
    "onboard@@example.com",
    "on@board@example.com",
    ".onboard@example.com",
    "onboard.@example.com",
    "on..board@example.com",
    "on board@example.com",
    '"onboard"@example.com',
    "on,board@example.com",
    "onboard@example.com,other@example.com",
    "onboard@example.com\r\nBcc: other@example.com",
    "onboard\n@example.com",
    "on\x00board@example.com",
    "onboard@exa mple.com",
    "onboard@-example.com",
    "onboard@example-.com",
    "onboard@example..com",
    "onboard@.example.com",
    "onboard@example.com.",
    "onboard@exa_mple.com",
    "onboard@[127.0.0.1]",
    "onboard@" + "x" * 64 + ".com",  # a label is at most 63 characters
    "a" + LONGEST_EMAIL,  # 255 characters
    "önboard@example.com",
    "onboard@exämple.com",
    "\u212aelvin@example.com",  # KELVIN SIGN lowercases to ASCII "k": still not ASCII input
    "onboard@example.com\u200b",
]


@pytest.mark.parametrize("raw", INVALID_EMAILS)
def test_invalid_emails_are_refused(raw: str) -> None:
    with pytest.raises(InvalidEmail) as raised:
        canonical_email(raw)
    assert raised.value.code == "invalid_email"
    with pytest.raises(InvalidEmail):
        canonical_identity(EMAIL, raw)


def test_every_spelling_of_an_email_signs_in_to_its_canonical_account(
    store: IdentityLinkStore, engine: Engine
) -> None:
    for raw, canonical in CANONICAL_EMAILS:
        anchor = store.sign_in(canonical_identity(EMAIL, raw))
        assert anchor == omni(EMAIL, canonical, CLIENT_ID), raw
        assert store.resolve(Identity(EMAIL, canonical)) == anchor, raw
    assert count(engine, accounts) == len({c for _, c in CANONICAL_EMAILS})
    assert store.sign_in(canonical_identity(EMAIL, "onboard@example.com")) == (
        "f677ce5629707f03b345d016721da17ddbe80cc23038e85dbf18ce71f9b340a9"  # §1 vector
    )


def test_concurrent_first_sign_in_creates_exactly_one_account(
    store: IdentityLinkStore, engine: Engine
) -> None:
    anchors = race(8, lambda: IdentityLinkStore(engine, CLIENT_ID).sign_in(ALICE))

    assert anchors == [omni(ALICE.type, ALICE.value, CLIENT_ID)] * 8
    assert count(engine, accounts) == 1
    assert count(engine, identities) == 1
    assert store.identities(anchors[0])[0].identity == ALICE


# --- merge: link with proof (§6.4) --------------------------------------------------------


def test_merge_moves_the_proved_identity_into_the_callers_account(
    store: IdentityLinkStore, engine: Engine, clock: Clock
) -> None:
    a, b = store.sign_in(ALICE), store.sign_in(BOB)
    clock.now = T0 + 60

    linked = store.merge(a, b, BOB.omni(CLIENT_ID))

    assert linked == LinkedIdentity(BOB, "linked", T0 + 60)
    assert store.resolve(BOB) == a
    assert store.identities(a) == [
        LinkedIdentity(ALICE, "linked", T0),
        LinkedIdentity(BOB, "linked", T0 + 60),
    ]
    assert store.identities(b) == []
    # The emptied account is retired: all its sessions stop working.
    assert account_row(engine, b) == (1, a)
    assert store.session_generation(b) is None
    # The caller's own sessions (the one that asked for the merge) keep working.
    assert store.session_generation(a) == 0
    # Recovery: either identity now signs in to the same account, hence the same wallet.
    assert store.sign_in(ALICE) == a
    assert store.sign_in(BOB) == a
    assert count(engine, accounts) == 2


def test_merge_of_an_identity_already_in_the_callers_account_changes_nothing(
    store: IdentityLinkStore, engine: Engine, clock: Clock
) -> None:
    a, b = store.sign_in(ALICE), store.sign_in(BOB)
    store.merge(a, b, BOB.omni(CLIENT_ID))
    clock.now = T0 + 120
    before = store.identities(a)

    assert store.merge(a, a, ALICE.omni(CLIENT_ID)) == LinkedIdentity(ALICE, "linked", T0)
    assert store.merge(a, a, BOB.omni(CLIENT_ID)) == LinkedIdentity(BOB, "linked", T0)

    assert store.identities(a) == before
    assert account_row(engine, a) == (0, None)
    assert store.session_generation(a) == 0


def test_merge_refuses_an_identity_whose_account_holds_others(
    store: IdentityLinkStore, engine: Engine, clock: Clock
) -> None:
    a, b, c = store.sign_in(ALICE), store.sign_in(BOB), store.sign_in(CAROL)
    store.merge(a, b, BOB.omni(CLIENT_ID))  # a now holds ALICE and BOB
    clock.now = T0 + 60

    with pytest.raises(IdentityAlreadyLinked) as raised:
        store.merge(c, a, ALICE.omni(CLIENT_ID))
    assert raised.value.code == "identity_already_linked"
    assert a not in raised.value.detail  # nothing about the other account is disclosed
    # A proof minted by BOB's retired account before the merge is no use either.
    with pytest.raises(IdentityAlreadyLinked):
        store.merge(c, b, BOB.omni(CLIENT_ID))

    assert store.resolve(ALICE) == a
    assert store.resolve(BOB) == a
    assert store.identities(c) == [LinkedIdentity(CAROL, "linked", T0)]
    assert account_row(engine, a) == (0, None)
    assert account_row(engine, c) == (0, None)


# --- unlink (§6.3, §6.4) ------------------------------------------------------------------


@pytest.fixture
def linked_pair(store: IdentityLinkStore) -> tuple[str, str]:
    """Account `a` holding ALICE (anchor) and BOB (merged); account `c` holding only CAROL."""
    a, b, c = store.sign_in(ALICE), store.sign_in(BOB), store.sign_in(CAROL)
    store.merge(a, b, BOB.omni(CLIENT_ID))
    return a, c


@pytest.mark.parametrize(
    ("owner", "identity", "error"),
    [
        ("a", CAROL, NotFound),  # another account's identity
        ("a", Identity(EMAIL, "nobody@example.com"), NotFound),  # linked nowhere
        ("c", BOB, NotFound),
        ("c", CAROL, LastIdentity),
        ("a", ALICE, AnchorIdentity),
    ],
    ids=["other-account", "not-linked", "other-account-merged", "last", "anchor"],
)
def test_unlink_refusals_change_nothing(
    store: IdentityLinkStore,
    engine: Engine,
    clock: Clock,
    linked_pair: tuple[str, str],
    owner: str,
    identity: Identity,
    error: type[AgentKeysError],
) -> None:
    a, c = linked_pair
    account = {"a": a, "c": c}[owner]
    before = {a: store.identities(a), c: store.identities(c)}
    clock.now = T0 + 300

    with pytest.raises(error):
        store.unlink(account, identity)

    assert {a: store.identities(a), c: store.identities(c)} == before
    assert store.session_generation(a) == 0
    assert store.session_generation(c) == 0


def test_unlink_removes_the_identity_and_revokes_older_sessions(
    store: IdentityLinkStore, clock: Clock, linked_pair: tuple[str, str]
) -> None:
    a, _ = linked_pair
    clock.now = T0 + 300

    store.unlink(a, BOB)

    assert store.identities(a) == [LinkedIdentity(ALICE, "linked", T0)]
    assert store.resolve(BOB) is None
    assert store.session_generation(a) == 1
    # Now ALICE is the last identity as well as the anchor.
    with pytest.raises(LastIdentity):
        store.unlink(a, ALICE)
    with pytest.raises(NotFound):
        store.unlink(a, BOB)


def test_an_identity_unlinked_after_a_merge_gets_its_old_anchor_back(
    store: IdentityLinkStore, engine: Engine, clock: Clock
) -> None:
    a, b = store.sign_in(ALICE), store.sign_in(BOB)
    clock.now = T0 + 60
    store.merge(a, b, BOB.omni(CLIENT_ID))
    clock.now = T0 + 120
    store.unlink(a, BOB)
    assert store.session_generation(b) is None  # still retired until BOB signs in again
    clock.now = T0 + 180

    assert store.sign_in(BOB) == b

    assert account_row(engine, b) == (2, None)
    assert store.session_generation(b) == 2  # sessions of the old account stay dead
    assert store.identities(b) == [LinkedIdentity(BOB, "linked", T0 + 180)]
    assert store.identities(a) == [LinkedIdentity(ALICE, "linked", T0)]
    assert store.session_generation(a) == 1
    assert count(engine, accounts) == 2


# --- spent token ids (§6.4 single-use proofs) ---------------------------------------------


def test_spend_is_single_use(store: IdentityLinkStore) -> None:
    assert store.spend("jti-1", T0 + 600) is True
    assert store.spend("jti-1", T0 + 600) is False
    assert store.spend("jti-2", T0 + 600) is True


def test_concurrent_spend_of_one_jti_has_exactly_one_winner(
    store: IdentityLinkStore, engine: Engine
) -> None:
    results = race(8, lambda: store.spend("raced-jti", T0 + 600))

    assert sorted(results) == [False] * 7 + [True]
    assert count(engine, spent_tokens) == 1


def test_spend_purges_expired_rows_only_after_verifiers_stop_accepting_them(
    store: IdentityLinkStore, engine: Engine, clock: Clock
) -> None:
    assert SPENT_GRACE_SECONDS >= LEEWAY_SECONDS
    store.spend("old", T0 + 10)
    store.spend("fresh", T0 + 1000)

    # Past `exp`, but a verifier with leeway still accepts the token: it must stay spent.
    clock.now = T0 + 10 + LEEWAY_SECONDS
    assert store.spend("old", T0 + 10) is False
    assert count(engine, spent_tokens) == 2

    clock.now = T0 + 11 + SPENT_GRACE_SECONDS
    assert store.spend("other", T0 + 1000) is True
    with engine.connect() as conn:
        left = set(conn.execute(select(spent_tokens.c.jti)).scalars())
    assert left == {"fresh", "other"}


# --- listing ------------------------------------------------------------------------------


def test_identities_lists_linked_identities_in_link_order(
    store: IdentityLinkStore, clock: Clock
) -> None:
    b = store.sign_in(BOB)
    clock.now = T0 + 5
    c = store.sign_in(CAROL)
    clock.now = T0 + 7
    a = store.sign_in(ALICE)
    clock.now = T0 + 20
    store.merge(b, a, ALICE.omni(CLIENT_ID))
    clock.now = T0 + 30
    store.merge(b, c, CAROL.omni(CLIENT_ID))

    assert store.identities(b) == [
        LinkedIdentity(BOB, "linked", T0),
        LinkedIdentity(ALICE, "linked", T0 + 20),
        LinkedIdentity(CAROL, "linked", T0 + 30),
    ]
    assert store.identities(a) == []
    assert store.identities("00" * 32) == []


def test_revocation_reaches_another_worker_at_once(engine: Engine, clock: Clock) -> None:
    worker_a = IdentityLinkStore(engine, CLIENT_ID, clock=clock)
    worker_b = IdentityLinkStore(engine, CLIENT_ID, clock=clock)
    account = worker_a.sign_in(Identity(EMAIL, "first@example.com"))
    merged = worker_a.sign_in(Identity(EMAIL, "second@example.com"))
    worker_a.merge(account, merged, omni(EMAIL, "second@example.com"))
    assert worker_b.session_generation(account) == 0
    worker_a.unlink(account, Identity(EMAIL, "second@example.com"))  # the same second
    assert worker_a.session_generation(account) == 1
    assert worker_b.session_generation(account) == 1  # no cache to wait out
    worker_b.revoke_sessions(account)
    assert worker_a.session_generation(account) == 2
    assert worker_a.member_generation(account, Identity(EMAIL, "first@example.com")) == 2
    assert worker_a.member_generation(account, Identity(EMAIL, "second@example.com")) is None
    assert worker_a.member_generation(merged, Identity(EMAIL, "second@example.com")) is None


def test_an_unlink_committed_during_the_mint_read_still_revokes(
    engine: Engine, clock: Clock
) -> None:
    """The read a session is minted from is one snapshot. On PostgreSQL (READ COMMITTED, a
    snapshot per statement) a second statement would see an unlink that committed after the
    first: the session would then carry the very generation the unlink moved to."""
    store = IdentityLinkStore(engine, CLIENT_ID, clock=clock)
    other = IdentityLinkStore(make_engine(engine.url.render_as_string(False)), CLIENT_ID)
    account = store.sign_in(Identity(EMAIL, "first@example.com"))
    second = Identity(EMAIL, "second@example.com")
    store.merge(account, store.sign_in(second), second.omni(CLIENT_ID))
    statements: list[str] = []

    def unlink_once(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        statements.append(statement)
        if len(statements) == 1:  # after the mint's first statement, before any second
            other.unlink(account, second)

    event.listen(engine, "after_cursor_execute", unlink_once)
    try:
        generation = store.member_generation(account, second)
    finally:
        event.remove(engine, "after_cursor_execute", unlink_once)
        other.engine.dispose()

    assert statements, "the read ran no statement"
    assert store.session_generation(account) == 1  # the unlink committed
    assert generation is None or generation < 1  # a session minted from it is refused


@pytest.mark.parametrize(
    "read",
    [
        lambda store, account: store.session_generation(account),
        lambda store, account: store.member_generation(account, ALICE),
        lambda store, account: store.resolve(ALICE),
        lambda store, account: SqlCounter(store.engine).incr("a limit", 0, 60),
    ],
    ids=["raw revocation read", "mint read", "resolve", "a one-statement write"],
)
def test_autocommit_work_leaves_its_connection_transactional(
    engine: Engine, read: Callable[[IdentityLinkStore, str], object]
) -> None:
    """Reads and one-statement writes run in autocommit on PostgreSQL. The one pooled
    connection must come back from them transactional: a later transaction that fails must
    still roll back whole."""
    single = make_engine(engine.url.render_as_string(False), pool_size=1, max_overflow=0)
    store = IdentityLinkStore(single, CLIENT_ID)
    account = store.sign_in(ALICE)
    read(store, account)
    with pytest.raises(RuntimeError), single.begin() as conn:
        conn.execute(update(accounts).values(session_generation=5))
        raise RuntimeError("after the write, before the commit")
    assert store.session_generation(account) == 0
    single.dispose()


# --- identities that hash to one anchor (§1: omni has no separators) ----------------------

GOOGLE_SUB = "108234567890123456789"
AT_GOOGLE = Identity("oauth2_google", GOOGLE_SUB)
AT_GOOG = Identity("oauth2_goog", "le" + GOOGLE_SUB)  # the same bytes after the client id


def test_an_identity_with_anothers_anchor_is_refused_not_attached(
    store: IdentityLinkStore, engine: Engine
) -> None:
    assert AT_GOOG.omni(CLIENT_ID) == AT_GOOGLE.omni(CLIENT_ID)
    victim = store.sign_in(AT_GOOGLE)

    with pytest.raises(IdentityConflict) as refused:
        store.sign_in(AT_GOOG)

    assert refused.value.code == "identity_conflict"
    assert store.resolve(AT_GOOG) is None
    assert store.identities(victim) == [LinkedIdentity(AT_GOOGLE, "linked", T0)]
    assert account_row(engine, victim) == (0, None)  # the victim's sessions live on
    assert store.sign_in(AT_GOOGLE) == victim


def test_a_retired_anchor_comes_back_only_to_its_own_identity(
    store: IdentityLinkStore, engine: Engine
) -> None:
    a, b = store.sign_in(ALICE), store.sign_in(AT_GOOGLE)
    store.merge(a, b, AT_GOOGLE.omni(CLIENT_ID))
    store.unlink(a, AT_GOOGLE)  # b is retired and its identity linked nowhere

    with pytest.raises(IdentityConflict):
        store.sign_in(AT_GOOG)
    assert account_row(engine, b) == (1, a)  # still retired, nothing attached
    assert store.sign_in(AT_GOOGLE) == b


# --- races that must end in a clear answer, never an integrity error ----------------------


@pytest.mark.parametrize("round_", range(5))  # each round races afresh: the window is small
def test_accounts_racing_to_confirm_one_wallet_one_wins_the_rest_get_409(
    engine: Engine, clock: Clock, round_: int
) -> None:
    store = IdentityLinkStore(engine, CLIENT_ID, clock=clock)
    people = [store.sign_in(Identity(EMAIL, f"p{i}@example.com")) for i in range(8)]
    wallet = "0x" + "77" * 20
    turn = iter(people)

    def confirm() -> str:
        account = next(turn)
        try:
            IdentityLinkStore(engine, CLIENT_ID, clock=clock).confirm_wallet(account, wallet, 0)
        except IdentityAlreadyLinked:
            return "409"
        return "linked"

    outcomes = race(8, confirm)

    assert sorted(outcomes) == ["409"] * 7 + ["linked"]
    assert store.resolve(Identity(EVM, wallet)) in people


def test_racing_link_requests_of_one_account_all_answer_pending(store: IdentityLinkStore) -> None:
    account = store.sign_in(ALICE)
    wallet = "0x" + "78" * 20

    assert race(8, lambda: store.request_wallet_link(account, wallet)) == ["pending_proof"] * 8
    assert [i.status for i in store.identities(account)] == ["linked", "pending_proof"]


def test_confirming_for_a_revoked_or_merged_generation_links_nothing(
    store: IdentityLinkStore,
) -> None:
    a, b = store.sign_in(ALICE), store.sign_in(BOB)
    store.revoke_sessions(a)
    with pytest.raises(Unauthorized, match="revoked"):
        store.confirm_wallet(a, CAROL.value, 0)  # started in generation 0
    store.merge(a, b, BOB.omni(CLIENT_ID))
    with pytest.raises(Unauthorized, match="revoked"):
        store.confirm_wallet(b, CAROL.value, 0)  # b is merged away
    assert store.resolve(CAROL) is None
    store.confirm_wallet(a, CAROL.value, 1)
    assert store.resolve(CAROL) == a
