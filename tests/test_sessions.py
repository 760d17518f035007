"""Session JWTs (§6.3): claims, every way to refuse one, and a check by libraries nobody here
wrote (pyjwt's JWK client over a real HTTP server, and the pure-Python `ecdsa`)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ecdsa
import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine, update
from werkzeug.serving import make_server

from agentkeys.broker.db import make_engine, signing_keys
from agentkeys.broker.keys import RELOAD_SECONDS, KeyRing
from agentkeys.errors import Unauthorized
from agentkeys.identity import EMAIL, EVM, Identity
from agentkeys.sessions import IDENTITY, LEEWAY_SECONDS, WALLET, SessionTokens
from tests.conftest import BASE_SETTINGS, MakeApp, bearer_for
from tests.vectors import OMNI_ONBOARD, VECTOR_ADDRESS, VECTOR_ANCHOR

NOW = 1_800_000_000
ISSUER = "https://broker.example"
ANCHOR = VECTOR_ANCHOR
WALLET_ADDRESS = VECTOR_ADDRESS.lower()
ONBOARD = Identity(EMAIL, "onboard@example.com")

NOT_A_SESSION_TOKEN = "The bearer token is not a session token."
UNKNOWN_KEY = "The bearer token was signed with an unknown key."
INVALID = "The bearer token is not a valid session."
EXPIRED = "The session has expired; sign in again."
REVOKED = "The session has been revoked; sign in again."
NEEDS_IDENTITY = "This needs a session of kind identity."
REQUIRED = ["iss", "aud", "sub", "iat", "exp", "jti", "kind", "account", "omni_account", "gen"]
RETIRED_KEY = "The bearer token was signed with a key that is no longer valid."


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeGenerations:
    """Account generations to set by hand; every identity counts as linked to a known account."""

    def __init__(self) -> None:
        self.of: dict[str, int] = {ANCHOR: 0}

    def session_generation(self, account: str) -> int | None:
        return self.of.get(account)

    def member_generation(self, account: str, identity: Identity) -> int | None:
        return self.of.get(account)


@dataclass
class Rig:
    """SessionTokens over a KeyRing on its own database, with a clock and generations to set."""

    engine: Engine
    keys: KeyRing
    tokens: SessionTokens
    clock: FakeClock
    generations: FakeGenerations

    @property
    def kid(self) -> str:
        return self.keys.signing_key().kid

    def claims(self, **changes: Any) -> dict[str, Any]:
        """Valid identity-session claims; a change to None drops the claim."""
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": "agentkeys:broker",
            "sub": f"agentkeys:account:{ANCHOR}",
            "iat": NOW,
            "exp": NOW + 3600,
            "jti": "jti-0123456789abcdef",
            "kind": IDENTITY,
            "account": ANCHOR,
            "omni_account": OMNI_ONBOARD,
            "identity_type": EMAIL,
            "gen": 0,
        }
        claims.update(changes)
        return {name: value for name, value in claims.items() if value is not None}

    def sign(
        self,
        claims: dict[str, Any] | None = None,
        *,
        headers: dict[str, Any] | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> str:
        """ES256 over `claims` with our key (or `key`) and header kid (or `headers`)."""
        return jwt.encode(
            self.claims() if claims is None else claims,
            key or self.keys.signing_key().private_key,
            algorithm="ES256",
            headers={"kid": self.kid} if headers is None else headers,
        )

    def mint(self, account: str = ANCHOR, kind: str = IDENTITY) -> str:
        if kind == WALLET:
            identity = Identity(EVM, WALLET_ADDRESS)
            token, _ = self.tokens.mint(account, identity, kind=WALLET, wallet=WALLET_ADDRESS)
        else:
            token, _ = self.tokens.mint(account, ONBOARD)
        return token


@pytest.fixture
def rig(sqlite_url: str) -> Iterator[Rig]:
    engine = make_engine(sqlite_url)
    clock = FakeClock()
    keys = KeyRing(engine, "session", kek=None, token_ttl=86400, clock=clock)
    keys.ensure_initial()
    generations = FakeGenerations()
    tokens = SessionTokens(
        keys,
        issuer=ISSUER,
        client_id="agentkeys",
        ttl={IDENTITY: 86400, WALLET: 900},
        generations=generations,
        clock=clock,
    )
    yield Rig(engine, keys, tokens, clock, generations)
    engine.dispose()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def compact(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    segments = [b64url(json.dumps(part).encode()) for part in (header, claims)]
    return ".".join([*segments, b64url(signature)])


# -- minting ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [IDENTITY, WALLET])
def test_mint_and_verify_round_trip(rig: Rig, kind: str) -> None:
    token = rig.mint(kind=kind)
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": rig.kid, "typ": "JWT"}
    claims = jwt.decode(token, options={"verify_signature": False})
    session = rig.tokens.verify(token, kinds=(kind,))
    expected: dict[str, Any] = {
        "iss": ISSUER,
        "aud": "agentkeys:broker",
        "sub": f"agentkeys:account:{ANCHOR}",
        "iat": NOW,
        "exp": NOW + (86400 if kind == IDENTITY else 900),
        "jti": session.jti,
        "kind": kind,
        "account": ANCHOR,
        "omni_account": OMNI_ONBOARD,
        "identity_type": EMAIL,
        "gen": 0,
    }
    if kind == WALLET:
        expected |= {
            "omni_account": Identity(EVM, WALLET_ADDRESS).omni("agentkeys"),
            "identity_type": EVM,
            "wallet_address": WALLET_ADDRESS,
        }
    assert claims == expected
    assert len(b64url_decode(session.jti)) >= 16  # at least 128 random bits
    assert (session.account, session.kind, session.issued_at, session.expires_at) == (
        ANCHOR,
        kind,
        NOW,
        expected["exp"],
    )
    assert session.wallet_address == (WALLET_ADDRESS if kind == WALLET else None)
    assert rig.mint(kind=kind) != token  # a fresh jti each time


# -- refusals -----------------------------------------------------------------------------------


def hs256_with_public_pem(rig: Rig) -> str:
    pem = (
        rig.keys.signing_key()
        .private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": rig.kid}
    unsigned = compact(header, rig.claims()).rsplit(".", 1)[0]
    mac = hmac.new(pem, unsigned.encode(), hashlib.sha256).digest()
    return f"{unsigned}.{b64url(mac)}"


def revoked(rig: Rig) -> str:
    token = rig.mint()
    rig.generations.of[ANCHOR] += 1  # an unlink or merge, in the same second as the sign-in
    return token


def garbled_payload(rig: Rig) -> str:
    header = b64url(json.dumps({"alg": "ES256", "kid": rig.kid}).encode())
    return f"{header}.bm90IGpzb24.c2ln"


Case = Callable[[Rig], str]
REFUSALS: list[tuple[str, Case, str]] = [
    ("no-kid", lambda r: r.sign(headers={}), UNKNOWN_KEY),
    ("kid-not-a-string", lambda r: compact({"alg": "ES256", "kid": 7}, r.claims()), UNKNOWN_KEY),
    ("unknown-kid", lambda r: r.sign(headers={"kid": "not-our-key"}), UNKNOWN_KEY),
    (
        "alg-none",
        lambda r: jwt.encode(r.claims(), "", algorithm="none", headers={"kid": r.kid}),
        INVALID,
    ),
    ("alg-none-handmade", lambda r: compact({"alg": "none", "kid": r.kid}, r.claims()), INVALID),
    ("hs256-public-pem-secret", hs256_with_public_pem, INVALID),
    (
        "another-p256-key-under-our-kid",
        lambda r: r.sign(key=ec.generate_private_key(ec.SECP256R1())),
        INVALID,
    ),
    ("wrong-iss", lambda r: r.sign(r.claims(iss="https://evil.example")), INVALID),
    ("wrong-aud", lambda r: r.sign(r.claims(aud="agentkeys:other")), INVALID),
    ("aud-list-without-ours", lambda r: r.sign(r.claims(aud=["sts.amazonaws.com"])), INVALID),
    ("expired-beyond-leeway", lambda r: r.sign(r.claims(exp=NOW - 30)), EXPIRED),
    ("issued-in-the-future", lambda r: r.sign(r.claims(iat=NOW + 31)), INVALID),
    ("exp-not-a-number", lambda r: r.sign(r.claims(exp=str(NOW + 60))), INVALID),
    ("gen-not-a-number", lambda r: r.sign(r.claims(gen="0")), INVALID),
    ("gen-from-the-future", lambda r: r.sign(r.claims(gen=1)), REVOKED),
    ("deeply-nested-header", lambda r: b64url(b"[" * 100_000) + ".e30.c2ln", NOT_A_SESSION_TOKEN),
    *(
        (f"missing-{name}", (lambda r, name=name: r.sign(r.claims(**{name: None}))), INVALID)
        for name in REQUIRED
    ),
    ("sub-of-another-account", lambda r: r.sign(r.claims(sub="agentkeys:account:00")), INVALID),
    ("wallet-where-identity-needed", lambda r: r.mint(kind=WALLET), NEEDS_IDENTITY),
    ("revoked", revoked, REVOKED),
    (
        "unknown-account",
        lambda r: r.sign(r.claims(account="cd" * 32, sub=f"agentkeys:account:{'cd' * 32}")),
        REVOKED,
    ),
    ("garbage-payload", garbled_payload, INVALID),
    ("empty", lambda r: "", NOT_A_SESSION_TOKEN),
    ("word", lambda r: "garbage", NOT_A_SESSION_TOKEN),
    ("dots", lambda r: "a.b.c", NOT_A_SESSION_TOKEN),
    ("header-not-an-object", lambda r: compact([], {}), UNKNOWN_KEY),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(
    ("case", "detail"), [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS]
)
def test_refusals(rig: Rig, case: Case, detail: str) -> None:
    token = case(rig)
    with pytest.raises(Unauthorized) as refused:
        rig.tokens.verify(token)
    assert (refused.value.code, refused.value.detail) == ("unauthorized", detail)


ACCEPTED: list[tuple[str, Case]] = [
    ("exp-within-leeway", lambda r: r.sign(r.claims(exp=NOW - 29))),
    ("iat-within-leeway", lambda r: r.sign(r.claims(iat=NOW + 30))),
    ("aud-list-with-ours", lambda r: r.sign(r.claims(aud=["x", "agentkeys:broker"]))),
    ("no-identity-type", lambda r: r.sign(r.claims(identity_type=None))),
]


@pytest.mark.parametrize("case", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_accepted_edges(rig: Rig, case: Case) -> None:
    assert rig.tokens.verify(case(rig)).account == ANCHOR


@pytest.mark.parametrize(
    ("after_expiry", "detail"), [(0, None), (29, None), (30, EXPIRED), (3600, EXPIRED)]
)
def test_expiry_follows_the_clock_with_30s_leeway(
    rig: Rig, after_expiry: int, detail: str | None
) -> None:
    token = rig.mint(kind=WALLET)
    rig.clock.now = NOW + 900 + after_expiry
    if detail is None:
        assert rig.tokens.verify(token, kinds=(WALLET,)).expires_at == NOW + 900
    else:
        with pytest.raises(Unauthorized, match=detail):
            rig.tokens.verify(token, kinds=(WALLET,))


def test_revocation_is_exact_within_one_second(rig: Rig) -> None:
    token = rig.mint()
    assert rig.tokens.verify(token).generation == 0
    rig.generations.of[ANCHOR] = 1  # revoked in the very second the session was minted
    with pytest.raises(Unauthorized, match=REVOKED):
        rig.tokens.verify(token)
    fresh = rig.mint()  # the same second again: a session minted after the revocation lives
    assert rig.tokens.verify(fresh).generation == 1


def test_mint_refuses_an_identity_no_longer_linked(rig: Rig) -> None:
    with pytest.raises(Unauthorized, match="no longer linked"):
        rig.mint(account="cd" * 32)


def test_a_retired_key_stops_verifying_cached_tokens(rig: Rig, sqlite_url: str) -> None:
    token = rig.mint()
    assert rig.tokens.verify(token).kid == rig.kid  # verified once: the signature is cached
    # Another process withdraws the key (it is no longer published)...
    other = make_engine(sqlite_url)
    with other.begin() as conn:
        conn.execute(update(signing_keys).values(retire_at=NOW - 1))
    other.dispose()
    # ...and within the key ring's reload interval every token it signed is refused.
    rig.clock.now = NOW + RELOAD_SECONDS + 1
    with pytest.raises(Unauthorized) as refused:
        rig.tokens.verify(token)
    assert refused.value.detail == RETIRED_KEY


# -- the app over real HTTP, checked by pyjwt's JWK client and `ecdsa` --------------------------


@pytest.fixture
def served(make_app: MakeApp) -> Iterator[tuple[str, dict[str, str]]]:
    """The app on a loopback port: its base URL and a bearer header from email sign-in."""
    app = make_app()
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", bearer_for(app, ONBOARD.value)
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


def test_session_verifies_with_pyjwt_jwk_client(served: tuple[str, dict[str, str]]) -> None:
    base, bearer = served
    token = bearer["Authorization"].removeprefix("Bearer ")
    response = requests.get(f"{base}/v1/session-keys", timeout=10)
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "public, max-age=300"

    signing_key = jwt.PyJWKClient(f"{base}/v1/session-keys").get_signing_key_from_jwt(token)
    assert signing_key.key_id == jwt.get_unverified_header(token)["kid"]
    claims = jwt.decode(
        token,
        signing_key.key,
        algorithms=["ES256"],
        audience="agentkeys:broker",
        issuer=BASE_SETTINGS.issuer,
        options={"require": REQUIRED},
    )
    # The first sign-in anchors the account at the identity's omni (§1 vector).
    assert (claims["account"], claims["omni_account"], claims["kind"]) == (
        OMNI_ONBOARD,
        OMNI_ONBOARD,
        IDENTITY,
    )
    assert claims["sub"] == f"agentkeys:account:{OMNI_ONBOARD}"
    identities = requests.get(f"{base}/v1/identities", headers=bearer, timeout=10)
    assert (identities.status_code, identities.json()["account"]) == (200, OMNI_ONBOARD)


def test_session_signature_verifies_with_ecdsa(served: tuple[str, dict[str, str]]) -> None:
    base, bearer = served
    token = bearer["Authorization"].removeprefix("Bearer ")
    kid = jwt.get_unverified_header(token)["kid"]
    [jwk] = [
        k
        for k in requests.get(f"{base}/v1/session-keys", timeout=10).json()["keys"]
        if k["kid"] == kid
    ]
    point = b64url_decode(jwk["x"]) + b64url_decode(jwk["y"])
    verifier = ecdsa.VerifyingKey.from_string(point, curve=ecdsa.NIST256p)
    signing_input, _, signature = token.rpartition(".")
    raw = b64url_decode(signature)
    assert len(raw) == 64  # JWS ES256: r ‖ s, 32 bytes each, not DER
    digest = hashlib.sha256(signing_input.encode()).digest()
    assert verifier.verify_digest(raw, digest, sigdecode=ecdsa.util.sigdecode_string)
    tampered = hashlib.sha256(signing_input.encode() + b" ").digest()
    with pytest.raises(ecdsa.BadSignatureError):
        verifier.verify_digest(raw, tampered, sigdecode=ecdsa.util.sigdecode_string)


def test_signature_checked_once_per_token_but_time_and_revocation_always(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = rig.mint()
    decodes: list[int] = []
    real_decode = jwt.decode

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        decodes.append(1)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting_decode)
    for _ in range(3):
        assert rig.tokens.verify(token).account == ANCHOR
    assert len(decodes) == 1
    with pytest.raises(Unauthorized, match="kind wallet"):  # the kind is checked on every use
        rig.tokens.verify(token, kinds=(WALLET,))
    rig.generations.of[ANCHOR] = 1  # revoked
    with pytest.raises(Unauthorized, match="revoked"):
        rig.tokens.verify(token)
    rig.generations.of[ANCHOR] = 0
    rig.clock.now += 86400 + LEEWAY_SECONDS  # expired
    with pytest.raises(Unauthorized, match="expired"):
        rig.tokens.verify(token)
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    for _ in range(2):  # failures are never cached
        with pytest.raises(Unauthorized):
            rig.tokens.verify(tampered)
    assert len(decodes) == 3
