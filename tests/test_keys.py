"""KeyRing (§6.3, §6.5): one key per purpose under races, sealed storage, JWKS, rotation."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Engine, select, update

from agentkeys.broker.db import signing_keys
from agentkeys.broker.keys import (
    JWKS_MAX_AGE,
    RELOAD_SECONDS,
    UNKNOWN_KID_RELOAD_SECONDS,
    VERIFY_LEEWAY,
    KeyRing,
    KeyUnsealError,
)
from agentkeys.errors import Unauthorized
from agentkeys.identity import EMAIL, Identity
from agentkeys.sessions import IDENTITY, WALLET, SessionTokens
from agentkeys.settings import Secret

T0 = 1_700_000_000
TOKEN_TTL = 900
KEK = Secret(bytes(range(32)))
OTHER_KEK = Secret(bytes(range(1, 33)))
REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ring(
    engine: Engine,
    purpose: str = "session",
    *,
    kek: Secret | None = KEK,
    clock: FakeClock | None = None,
) -> KeyRing:
    return KeyRing(engine, purpose, kek=kek, token_ttl=TOKEN_TTL, clock=clock or FakeClock())


def rows(engine: Engine, purpose: str = "session") -> list[dict[str, Any]]:
    with engine.connect() as conn:
        found = conn.execute(
            select(signing_keys)
            .where(signing_keys.c.purpose == purpose)
            .order_by(signing_keys.c.signs_from)
        ).all()
    return [dict(row._mapping) for row in found]


def der_of(keys: KeyRing) -> bytes:
    return keys.signing_key().private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- first key --------------------------------------------------------------------------------


def test_ensure_initial_creates_one_key_per_purpose(engine: Engine) -> None:
    kids = {}
    for purpose in ("session", "oidc"):
        keys = ring(engine, purpose)
        keys.ensure_initial()
        keys.ensure_initial()  # the second call finds the key and keeps it
        kids[purpose] = keys.signing_key().kid
        [row] = rows(engine, purpose)
        assert (row["kid"], row["slot"], row["signs_from"], row["retire_at"]) == (
            kids[purpose],
            f"{purpose}:1",
            T0,
            None,
        )
    assert kids["session"] != kids["oidc"]
    # A fresh ring (another worker) adopts the stored key instead of making its own.
    late = ring(engine)
    late.ensure_initial()
    assert late.signing_key().kid == kids["session"]
    assert len(rows(engine)) == 1


def test_ensure_initial_from_threads_at_once(engine: Engine) -> None:
    barrier = threading.Barrier(6)
    kids: list[str] = []
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            keys = ring(engine)  # each worker has its own ring over the shared engine
            barrier.wait()
            keys.ensure_initial()
            kids.append(keys.signing_key().kid)
        except BaseException as exc:  # reported below; a thread cannot fail the test itself
            failures.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert failures == []
    [row] = rows(engine)
    assert kids == [row["kid"]] * 6


# Each process waits at a file barrier until all are ready, then races for the first key.
PROCESS_SCRIPT = """
import pathlib, sys, time
from agentkeys.broker.db import make_engine
from agentkeys.broker.keys import KeyRing
from agentkeys.settings import Secret
url, kek, gate, index, count = sys.argv[1:]
gate = pathlib.Path(gate)
(gate / f"ready-{index}").touch()
deadline = time.monotonic() + 20
while len(list(gate.glob("ready-*"))) < int(count) and time.monotonic() < deadline:
    time.sleep(0.01)
engine = make_engine(url)
keys = KeyRing(engine, "session", kek=Secret(bytes.fromhex(kek)), token_ttl=900)
keys.ensure_initial()
print(keys.signing_key().kid)
engine.dispose()
"""


def test_ensure_initial_from_processes_at_once(
    any_database_url: str, engine: Engine, tmp_path: Path
) -> None:
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                PROCESS_SCRIPT,
                any_database_url,
                KEK.reveal().hex(),
                str(tmp_path),
                str(index),
                "3",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(3)
    ]
    outputs = [process.communicate(timeout=60) for process in processes]
    assert [(p.returncode, err) for p, (_, err) in zip(processes, outputs, strict=True)] == [
        (0, "")
    ] * 3
    [row] = rows(engine)
    assert [out.strip() for out, _ in outputs] == [row["kid"]] * 3
    # The processes keep real time; a ring on real time signs with their key too.
    assert KeyRing(engine, "session", kek=KEK, token_ttl=TOKEN_TTL).signing_key().kid == row["kid"]


# -- sealed storage -----------------------------------------------------------------------------


def test_sealed_key_is_aes_gcm_under_the_kek(engine: Engine) -> None:
    keys = ring(engine)
    keys.ensure_initial()
    der = der_of(keys)
    [row] = rows(engine)
    blob = row["private_key"]
    assert isinstance(blob, bytes) and row["sealed"] == 1
    assert der not in blob and len(blob) == 12 + len(der) + 16  # nonce ‖ ciphertext ‖ tag
    aad = f"agentkeys-signing-key:session:{row['kid']}".encode()
    assert AESGCM(KEK.reveal()).decrypt(blob[:12], blob[12:], aad) == der
    with pytest.raises(InvalidTag):
        AESGCM(OTHER_KEK.reveal()).decrypt(blob[:12], blob[12:], aad)


@pytest.mark.parametrize(
    ("kek", "error", "message"),
    [
        (OTHER_KEK, KeyUnsealError, "AGENTKEYS_KEY_ENCRYPTION_KEY is wrong"),
        (None, KeyUnsealError, "signing keys are sealed: set AGENTKEYS_KEY_ENCRYPTION_KEY"),
    ],
    ids=["another-kek", "no-kek"],
)
def test_sealed_keys_load_only_with_their_kek(
    engine: Engine, kek: Secret | None, error: type[Exception], message: str | None
) -> None:
    ring(engine).ensure_initial()
    stranger = ring(engine, kek=kek)
    with pytest.raises(error, match=message):
        stranger.signing_key()
    with pytest.raises(error, match=message):
        stranger.reload()
    with pytest.raises(error, match=message):  # the release step fails, not the first request
        stranger.ensure_initial()


@pytest.mark.parametrize("source_purpose", ["session", "oidc"])
def test_sealed_blob_is_bound_to_its_row(engine: Engine, source_purpose: str) -> None:
    """The AAD names kid and purpose: a blob copied into another row does not open there."""
    keys = ring(engine)
    keys.ensure_initial()
    victim = keys.signing_key().kid
    source = ring(engine, source_purpose)
    if source_purpose == "session":
        source.rotate()
        donor = rows(engine)[-1]
    else:
        source.ensure_initial()
        [donor] = rows(engine, "oidc")
    assert donor["kid"] != victim
    with engine.begin() as conn:
        conn.execute(
            update(signing_keys)
            .where(signing_keys.c.kid == victim)
            .values(private_key=donor["private_key"])
        )
    with pytest.raises(KeyUnsealError, match="is wrong"):
        ring(engine).reload()


def test_without_kek_the_key_is_plain_der(engine: Engine) -> None:
    keys = ring(engine, kek=None)
    keys.ensure_initial()
    [row] = rows(engine)
    assert row["sealed"] == 0
    assert row["private_key"] == der_of(keys)
    stored = serialization.load_der_private_key(row["private_key"], password=None)
    assert isinstance(stored, ec.EllipticCurvePrivateKey)
    assert stored.public_key().public_numbers() == (
        keys.signing_key().private_key.public_key().public_numbers()
    )


# -- JWKS ---------------------------------------------------------------------------------------


def test_jwks_publishes_only_the_public_key(engine: Engine) -> None:
    keys = ring(engine)
    keys.ensure_initial()
    signing = keys.signing_key()
    [jwk] = keys.jwks()["keys"]
    assert sorted(jwk) == ["alg", "crv", "kid", "kty", "use", "x", "y"]
    assert (jwk["kty"], jwk["crv"], jwk["use"], jwk["alg"]) == ("EC", "P-256", "sig", "ES256")
    numbers = signing.private_key.public_key().public_numbers()
    assert b64url_decode(jwk["x"]) == numbers.x.to_bytes(32, "big")
    assert b64url_decode(jwk["y"]) == numbers.y.to_bytes(32, "big")
    [row] = rows(engine)
    assert '"d"' not in str(row["public_jwk"])

    # RFC 7638: SHA-256 over the required members in lexicographic order, no whitespace.
    canonical = f'{{"crv":"P-256","kty":"EC","x":"{jwk["x"]}","y":"{jwk["y"]}"}}'
    thumbprint = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest())
    assert jwk["kid"] == signing.kid == thumbprint.rstrip(b"=").decode()

    token = jwt.encode({"probe": 1}, signing.private_key, algorithm="ES256")
    public = jwt.PyJWK(jwk)
    assert public.key_id == signing.kid
    assert jwt.decode(token, public.key, algorithms=["ES256"]) == {"probe": 1}
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(forged, public.key, algorithms=["ES256"])


# -- rotation -----------------------------------------------------------------------------------


def kids_of(keys: KeyRing) -> set[str]:
    return {jwk["kid"] for jwk in keys.jwks()["keys"]}


class NeverRevoked:
    def session_generation(self, account: str) -> int | None:
        return 0

    def member_generation(self, account: str, identity: Identity) -> int | None:
        return 0


def session_tokens(keys: KeyRing, clock: FakeClock) -> SessionTokens:
    """Sessions over `keys` for a worker whose accounts are never revoked."""
    return SessionTokens(
        keys,
        issuer="https://broker.example",
        client_id="agentkeys",
        ttl={IDENTITY: TOKEN_TTL, WALLET: TOKEN_TTL},
        generations=NeverRevoked(),
        clock=clock,
    )


def test_rotation_timeline(engine: Engine) -> None:
    clock = FakeClock()
    keys = ring(engine, clock=clock)
    keys.ensure_initial()
    old = keys.signing_key().kid
    sessions = session_tokens(keys, clock)
    identity = Identity(EMAIL, "rotate@example.com")

    clock.now = T0 + 10
    new = keys.rotate()
    switch = T0 + 10 + JWKS_MAX_AGE
    assert new.signs_from == switch and new.kid != old
    assert kids_of(keys) == {old, new.kid}  # published at once, one max-age before it signs
    stored = {row["kid"]: row["retire_at"] for row in rows(engine)}
    # Retired once its last token is past exp and the verifiers' leeway.
    assert stored == {old: switch + TOKEN_TTL + VERIFY_LEEWAY, new.kid: None}

    clock.now = switch - 0.5
    assert keys.signing_key().kid == old
    last_old, _ = sessions.mint("a" * 64, identity)  # the old key's last token
    assert jwt.get_unverified_header(last_old)["kid"] == old

    clock.now = switch
    assert keys.signing_key().kid == new.kid
    first_new, _ = sessions.mint("a" * 64, identity)
    assert jwt.get_unverified_header(first_new)["kid"] == new.kid

    expires = switch - 1 + TOKEN_TTL
    for moment in (switch, expires - 1, expires, expires + VERIFY_LEEWAY - 1):
        clock.now = moment
        assert sessions.verify(last_old).expires_at == expires
        assert sessions.verify(first_new).issued_at == switch
        assert kids_of(keys) == {old, new.kid}

    clock.now = switch + TOKEN_TTL + VERIFY_LEEWAY  # past every old token's exp and leeway
    assert kids_of(keys) == {new.kid}
    assert keys.public_key(old) is None
    with pytest.raises(Unauthorized, match="has expired"):  # this worker checked it before
        sessions.verify(last_old)
    another_worker = session_tokens(keys, clock)
    with pytest.raises(Unauthorized, match="signed with an unknown key"):
        another_worker.verify(last_old)


def test_second_rotation_before_the_first_signs(engine: Engine) -> None:
    clock = FakeClock()
    keys = ring(engine, clock=clock)
    keys.ensure_initial()
    first = keys.signing_key().kid
    clock.now = T0 + 10
    second = keys.rotate()
    clock.now = T0 + 20
    third = keys.rotate()
    assert kids_of(keys) == {first, second.kid, third.kid}
    clock.now = second.signs_from
    assert keys.signing_key().kid == second.kid
    clock.now = third.signs_from
    assert keys.signing_key().kid == third.kid
    clock.now = third.signs_from + TOKEN_TTL + VERIFY_LEEWAY
    assert kids_of(keys) == {third.kid}


def test_other_worker_sees_rotation_after_its_reload_interval(engine: Engine) -> None:
    clock = FakeClock()
    rotator = ring(engine, clock=clock)
    rotator.ensure_initial()
    old = rotator.signing_key().kid
    worker = ring(engine, clock=clock)
    assert kids_of(worker) == {old}  # loaded at T0

    clock.now = T0 + 10
    new = rotator.rotate().kid
    clock.now = T0 + RELOAD_SECONDS
    assert kids_of(worker) == {old}  # still its cached view
    clock.now = T0 + RELOAD_SECONDS + 1
    assert kids_of(worker) == {old, new}
    assert worker.signing_key().kid == old  # the new key does not sign before its time


def test_other_worker_reloads_for_an_unknown_kid(engine: Engine) -> None:
    clock = FakeClock()
    rotator = ring(engine, clock=clock)
    rotator.ensure_initial()
    worker = ring(engine, clock=clock)
    worker.reload()  # loaded at T0

    new = rotator.rotate()
    assert worker.public_key(new.kid) is None  # read just now: no reload for unknown kids
    clock.now = T0 + UNKNOWN_KID_RELOAD_SECONDS
    assert worker.public_key(new.kid) is None
    clock.now = T0 + UNKNOWN_KID_RELOAD_SECONDS + 1
    found = worker.public_key(new.kid)
    assert found is not None
    assert found.public_numbers() == new.private_key.public_key().public_numbers()
    assert new.kid in kids_of(worker)
    newest = rotator.rotate()
    assert worker.public_key(newest.kid) is None  # reloaded a moment ago: not again
