"""The app's long-lived objects, built once per process from Settings. No Flask."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from sqlalchemy import Engine

from agentkeys.broker.db import make_engine
from agentkeys.broker.keys import KeyRing
from agentkeys.broker.login import LoginRequests
from agentkeys.broker.mail import MailSender, parse_mail_url
from agentkeys.broker.oauth2 import OIDCClient
from agentkeys.broker.oidc import OIDCTokens
from agentkeys.broker.ratelimit import Counter, RateLimiter, RedisCounter, SqlCounter
from agentkeys.broker.store import IdentityLinkStore
from agentkeys.broker.wallet import WalletChallenges
from agentkeys.errors import InvalidRequest
from agentkeys.sessions import IDENTITY, WALLET, SessionTokens
from agentkeys.settings import Settings


class UnknownProvider(InvalidRequest):
    code = "unknown_provider"


@dataclass
class Services:
    settings: Settings
    engine: Engine
    store: IdentityLinkStore
    logins: LoginRequests
    session_keys: KeyRing
    oidc_keys: KeyRing
    sessions: SessionTokens
    limiter: RateLimiter
    mailer: MailSender
    wallet: WalletChallenges
    oidc: OIDCTokens
    _oidc_clients: dict[str, OIDCClient] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def build(cls, settings: Settings) -> Services:
        engine = make_engine(settings.database_url)
        store = IdentityLinkStore(engine, settings.client_id)
        # Nothing here connects: a worker booting while the database is down still comes up
        # and answers 503s. Development makes its first keys on first use (production: the
        # release step), so a boot during an outage needs no restart once the database is back.
        dev_keys = not settings.is_production
        session_keys = KeyRing(
            engine,
            "session",
            kek=settings.key_encryption_key,
            token_ttl=max(settings.identity_session_ttl, settings.wallet_session_ttl),
            create_first=dev_keys,
        )
        oidc_keys = KeyRing(
            engine,
            "oidc",
            kek=settings.key_encryption_key,
            token_ttl=settings.oidc_ttl,
            create_first=dev_keys,
        )
        sessions = SessionTokens(
            session_keys,
            issuer=settings.issuer,
            client_id=settings.client_id,
            ttl={IDENTITY: settings.identity_session_ttl, WALLET: settings.wallet_session_ttl},
            generations=store,
        )
        counter: Counter = (
            RedisCounter(settings.redis_url) if settings.redis_url else SqlCounter(engine)
        )
        return cls(
            settings=settings,
            engine=engine,
            store=store,
            logins=LoginRequests(engine),
            session_keys=session_keys,
            oidc_keys=oidc_keys,
            sessions=sessions,
            limiter=RateLimiter(counter),
            mailer=MailSender(parse_mail_url(settings.mail_url)),
            wallet=WalletChallenges(
                engine, store, issuer=settings.issuer, chain_ids=settings.siwe_chain_ids
            ),
            oidc=OIDCTokens(
                oidc_keys,
                issuer=settings.issuer,
                audience=settings.oidc_audience,
                ttl=settings.oidc_ttl,
            ),
        )

    def oidc_client(self, name: str) -> OIDCClient:
        """The client of a configured provider (one per process: it caches discovery and JWKS)."""
        provider = self.settings.oauth2_provider(name)
        if provider is None:
            raise UnknownProvider(f"No OAuth2 provider named {name[:40]!r} is configured.")
        with self._lock:
            client = self._oidc_clients.get(name)
            if client is None:
                redirect_uri = f"{self.settings.issuer}/auth/oauth2/callback"
                client = self._oidc_clients[name] = OIDCClient(provider, redirect_uri=redirect_uri)
        return client

    def keyrings(self) -> list[KeyRing]:
        return [self.session_keys, self.oidc_keys]
