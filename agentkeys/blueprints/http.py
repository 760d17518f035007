"""Request helpers of the broker's blueprints: its services, bearer sessions, limits; the JSON
parsing they share with the TEE worker is in parsing.py."""

from __future__ import annotations

from flask import current_app, request

from agentkeys import errors
from agentkeys.blueprints.parsing import bearer_token, json_object, load
from agentkeys.broker.services import Services
from agentkeys.sessions import IDENTITY, Session

__all__ = [
    "bearer_session",
    "bearer_token",
    "client_ip",
    "json_object",
    "load",
    "rate_limit",
    "services",
]

SERVICES_KEY = "agentkeys.broker.services"


def services() -> Services:
    found: Services = current_app.extensions[SERVICES_KEY]
    return found


def bearer_session(kinds: tuple[str, ...] = (IDENTITY,)) -> Session:
    """The caller's verified session (401 otherwise)."""
    return services().sessions.verify(bearer_token(), kinds=kinds)


def client_ip() -> str:
    """The peer address; ProxyFix rewrites it from X-Forwarded-For behind trusted proxies."""
    return request.remote_addr or "unknown"


def rate_limit(name: str, subject: str) -> None:
    """Count one request against a §6.7 limit; 429 with Retry-After once it is exceeded."""
    svc = services()
    retry_after = svc.limiter.hit(name, subject, svc.settings.rate_limits[name])
    if retry_after is not None:
        raise errors.RateLimited("Too many requests; try again later.", retry_after)
