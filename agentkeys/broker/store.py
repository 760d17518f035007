"""IdentityLinkStore: accounts, their linked identities, revocation and spent token ids (§1, §6.4).

Every method is one transaction, safe when several workers or instances share the database.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from agentkeys.broker.db import accounts, identities, read_only, spent_tokens, wallet_links
from agentkeys.errors import (
    AnchorIdentity,
    IdentityAlreadyLinked,
    IdentityConflict,
    LastIdentity,
    NotFound,
    Unauthorized,
)
from agentkeys.identity import EVM, Identity
from agentkeys.timefmt import now_seconds

LINKED = "linked"
PENDING_PROOF = "pending_proof"
# A spent token id is kept this long past its `exp`: verifiers accept a token up to their
# leeway (sessions.LEEWAY_SECONDS = 30) after `exp`, and it must stay single use until then.
SPENT_GRACE_SECONDS = 60


@dataclass(frozen=True)
class LinkedIdentity:
    identity: Identity
    status: str
    linked_at: int


class IdentityLinkStore:
    def __init__(
        self, engine: Engine, client_id: str, clock: Callable[[], int] = now_seconds
    ) -> None:
        self.engine = engine
        self.reader = read_only(engine)
        self.client_id = client_id
        self.clock = clock
        self._postgres = engine.dialect.name == "postgresql"
        mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        # Only the driver's placeholder is put into the text; the anchor goes as a parameter.
        self._generation_sql = (
            f"SELECT session_generation, merged_into FROM accounts WHERE anchor = {mark}"  # noqa: S608
        )

    def resolve(self, identity: Identity) -> str | None:
        """The account an identity is linked to, if any."""
        with self.reader.connect() as conn:
            return _account_of(conn, identity)

    def sign_in(self, identity: Identity) -> str:
        """The identity's account; the first sign-in creates one anchored at its omni."""
        for _ in range(3):  # a concurrent first sign-in of the same identity may win the insert
            account = self.resolve(identity)
            if account is not None:
                return account
            try:
                return self._create(identity)
            except IntegrityError:
                continue
        raise RuntimeError("could not resolve or create the account")  # pragma: no cover

    def _create(self, identity: Identity) -> str:
        anchor, now = identity.omni(self.client_id), self.clock()
        with self.engine.begin() as conn:
            existing = conn.execute(
                select(accounts.c.anchor_type, accounts.c.anchor_value)
                .where(accounts.c.anchor == anchor)
                .with_for_update()
            ).first()
            if existing is None:
                conn.execute(
                    insert(accounts).values(
                        anchor=anchor,
                        created_at=now,
                        anchor_type=identity.type,
                        anchor_value=identity.value,
                    )
                )
            # omni has no separators: another identity hashing to this anchor is a stranger.
            elif (existing.anchor_type, existing.anchor_value) != (identity.type, identity.value):
                raise IdentityConflict(
                    "This identity cannot open an account here: its account id is taken."
                )
            else:
                # An anchor retired by a merge comes back to the identity that created it: the
                # same anchor always means the same person's wallet, never someone else's.
                # Sessions of the retired account stay dead (a new generation).
                conn.execute(
                    update(accounts)
                    .where(accounts.c.anchor == anchor)
                    .values(merged_into=None, session_generation=_next_generation)
                )
            conn.execute(
                insert(identities).values(
                    identity_type=identity.type,
                    identity_value=identity.value,
                    account=anchor,
                    status=LINKED,
                    linked_at=now,
                )
            )
        return anchor

    def identities(self, account: str) -> list[LinkedIdentity]:
        """Linked identities, then wallets waiting for their proof."""
        with self.reader.connect() as conn:
            rows = conn.execute(
                select(identities)
                .where(identities.c.account == account)
                .order_by(identities.c.linked_at, identities.c.identity_type)
            ).all()
            pending = conn.execute(
                select(wallet_links)
                .where(wallet_links.c.account == account)
                .order_by(wallet_links.c.requested_at, wallet_links.c.address)
            ).all()
        linked = [
            LinkedIdentity(Identity(r.identity_type, r.identity_value), r.status, r.linked_at)
            for r in rows
        ]
        return linked + [
            LinkedIdentity(Identity(EVM, r.address), PENDING_PROOF, r.requested_at) for r in pending
        ]

    def merge(self, account: str, proof_account: str, proof_omni: str) -> LinkedIdentity:
        """Link the identity proved by a session of `proof_account` into `account` (§6.4).

        Allowed when that account holds nothing but the proved identity; the emptied account
        is retired and its sessions revoked. Already in `account`: no change.
        """
        now = self.clock()
        with self.engine.begin() as conn:
            _lock_account(conn, proof_account)
            rows = conn.execute(
                select(identities).where(identities.c.account == proof_account)
            ).all()
            proved = [
                r
                for r in rows
                if Identity(r.identity_type, r.identity_value).omni(self.client_id) == proof_omni
            ]
            if not proved:
                raise IdentityAlreadyLinked("That identity can no longer be linked.")
            row = proved[0]
            identity = Identity(row.identity_type, row.identity_value)
            if proof_account == account:
                return LinkedIdentity(identity, row.status, row.linked_at)
            # Merging an account that holds more would hand over identities nobody proved here.
            if len(rows) != 1:
                raise IdentityAlreadyLinked("That identity is already linked to another account.")
            conn.execute(
                update(identities)
                .where(identities.c.identity_type == identity.type)
                .where(identities.c.identity_value == identity.value)
                .values(account=account, linked_at=now)
            )
            conn.execute(
                update(accounts)
                .where(accounts.c.anchor == proof_account)
                .values(merged_into=account, session_generation=_next_generation)
            )
        return LinkedIdentity(identity, LINKED, now)

    def unlink(self, account: str, identity: Identity) -> None:
        """Remove an identity; never the anchor one, never the last; revokes older sessions."""
        with self.engine.begin() as conn:
            _lock_account(conn, account)
            if _account_of(conn, identity) != account:
                raise NotFound("That identity is not linked to this account.")
            linked = conn.execute(
                select(func.count())
                .select_from(identities)
                .where(identities.c.account == account, identities.c.status == LINKED)
            ).scalar_one()
            if linked <= 1:
                raise LastIdentity("The last sign-in identity of an account cannot be unlinked.")
            # The anchor identity stays, so an anchor can never pass to someone else.
            if identity.omni(self.client_id) == account:
                raise AnchorIdentity("The identity that created this account cannot be unlinked.")
            conn.execute(
                delete(identities)
                .where(identities.c.identity_type == identity.type)
                .where(identities.c.identity_value == identity.value)
            )
            _revoke(conn, account)

    def revoke_sessions(self, account: str) -> None:
        """Sign out everywhere: every session of the account minted so far is refused."""
        with self.engine.begin() as conn:
            _revoke(conn, account)

    def request_wallet_link(self, account: str, address: str) -> str:
        """Record that `account` wants to link wallet `address`: `linked` if it already is,
        else `pending_proof` until a bound SIWE signature confirms it."""
        self.check_wallet_linkable(account, address)
        with self.engine.begin() as conn:
            if _account_of(conn, Identity(EVM, address)) == account:
                return LINKED
            exists = conn.execute(
                select(wallet_links.c.address).where(
                    wallet_links.c.account == account, wallet_links.c.address == address
                )
            ).first()
            if exists is None:
                # Two identical requests racing: the loser's insert hits the key, same answer.
                with contextlib.suppress(IntegrityError), conn.begin_nested():
                    conn.execute(
                        insert(wallet_links).values(
                            account=account, address=address, requested_at=self.clock()
                        )
                    )
        return PENDING_PROOF

    def check_wallet_linkable(self, account: str, address: str) -> None:
        """409 when the wallet is confirmed for another account (disclosing nothing more)."""
        owner = self.resolve(Identity(EVM, address))
        if owner is not None and owner != account:
            raise IdentityAlreadyLinked("That wallet is already linked to another account.")

    def confirm_wallet(self, account: str, address: str, generation: int) -> None:
        """A bound SIWE signature proved control: link the wallet to `account`, but only while
        the session that started the challenge (of `generation`) is still valid."""
        wallet, now = Identity(EVM, address), self.clock()
        try:
            with self.engine.begin() as conn:
                # Under the account's lock: an unlink or merge either ran before (refused
                # here) or waits until the wallet is linked.
                if _lock_account(conn, account) != generation:
                    raise Unauthorized(
                        "The session that started this challenge has been revoked; sign in again."
                    )
                owner = _account_of(conn, wallet)
                if owner is not None and owner != account:
                    raise IdentityAlreadyLinked("That wallet is already linked to another account.")
                if owner is None:
                    conn.execute(
                        insert(identities).values(
                            identity_type=EVM,
                            identity_value=address,
                            account=account,
                            status=LINKED,
                            linked_at=now,
                        )
                    )
                conn.execute(
                    delete(wallet_links).where(
                        wallet_links.c.account == account, wallet_links.c.address == address
                    )
                )
        except IntegrityError:
            # Another account linked the same wallet in the same moment and won the insert.
            raise IdentityAlreadyLinked(
                "That wallet is already linked to another account."
            ) from None

    def session_generation(self, account: str) -> int | None:
        """The generation a session of `account` must carry; None for an unknown or merged
        account. Read on every authenticated request: one primary-key lookup, never cached,
        so a revocation is honoured by every worker and instance the moment it commits.

        On the pool's raw DBAPI connection: one SELECT by key, without the Core round of
        transaction events that costs ten times the query itself on SQLite."""
        raw = self.engine.raw_connection()
        driver: Any = raw.driver_connection  # psycopg.Connection on PostgreSQL
        # PostgreSQL: one SELECT needs no transaction. In autocommit psycopg sends no BEGIN,
        # and the pool's rollback on return has nothing to roll back: two round trips fewer.
        # (SQLite's connections already leave transactions to explicit BEGINs.)
        autocommit = self._postgres and not driver.autocommit
        try:
            if autocommit:
                driver.autocommit = True
            cursor = raw.cursor()
            cursor.execute(self._generation_sql, (account,))
            row = cursor.fetchone()
            cursor.close()
        finally:
            if autocommit and not driver.broken:  # a broken one is replaced at checkout
                driver.autocommit = False
            raw.close()  # back to the pool
        return None if row is None or row[1] is not None else int(row[0])

    def member_generation(self, account: str, identity: Identity) -> int | None:
        """The account's generation if `identity` is linked to it now (the generation a session
        for it is minted in), else None. One statement: PostgreSQL's READ COMMITTED gives each
        statement its own snapshot, so with two an unlink could commit between the link's read
        and the generation's, and the session would carry the generation that revoked it."""
        params = {"type": identity.type, "value": identity.value, "account": account}
        with self.reader.connect() as conn:
            row = conn.execute(_MEMBER_GENERATION, params).first()
        return None if row is None or row.merged_into is not None else int(row.session_generation)

    def spend(self, jti: str, expires_at: int) -> bool:
        """Mark a token id used; False if it was already spent (atomic across workers)."""
        try:
            with self.engine.begin() as conn:
                stale = self.clock() - SPENT_GRACE_SECONDS
                conn.execute(delete(spent_tokens).where(spent_tokens.c.expires_at < stale))
                conn.execute(insert(spent_tokens).values(jti=jti, expires_at=expires_at))
        except IntegrityError:
            return False
        return True


# The statements of every sign-in and session are built once: Core caches their compiled SQL,
# but building one and its cache key again costs more than running it on SQLite.
_ACCOUNT_OF = select(identities.c.account).where(
    identities.c.identity_type == bindparam("type"),
    identities.c.identity_value == bindparam("value"),
    identities.c.status == LINKED,
)
_GENERATION = select(accounts.c.session_generation, accounts.c.merged_into).where(
    accounts.c.anchor == bindparam("account")
)
_GENERATION_LOCKED = _GENERATION.with_for_update()
_MEMBER_GENERATION = (
    select(accounts.c.session_generation, accounts.c.merged_into)
    .join(identities, identities.c.account == accounts.c.anchor)
    .where(
        accounts.c.anchor == bindparam("account"),
        identities.c.identity_type == bindparam("type"),
        identities.c.identity_value == bindparam("value"),
        identities.c.status == LINKED,
    )
)


def _account_of(conn: Connection, identity: Identity) -> str | None:
    found = conn.execute(_ACCOUNT_OF, {"type": identity.type, "value": identity.value})
    return found.scalar_one_or_none()


def _generation(conn: Connection, account: str, *, lock: bool = False) -> int | None:
    """The account's session generation; None if it is merged or unknown."""
    row = conn.execute(_GENERATION_LOCKED if lock else _GENERATION, {"account": account}).first()
    return None if row is None or row.merged_into is not None else int(row.session_generation)


def _lock_account(conn: Connection, account: str) -> int | None:
    """Serialise changes to one account's identities (PostgreSQL row lock; SQLite's write lock
    is already held by BEGIN IMMEDIATE); the account's generation, as `_generation`."""
    return _generation(conn, account, lock=True)


_next_generation = accounts.c.session_generation + 1


def _revoke(conn: Connection, account: str) -> None:
    """Refuse every session of the account minted so far (they carry an older generation)."""
    conn.execute(
        update(accounts)
        .where(accounts.c.anchor == account)
        .values(session_generation=_next_generation)
    )
