"""Request helpers shared by the blueprints: JSON bodies, bearer sessions, limits."""

from __future__ import annotations

import json
from typing import Any

from flask import current_app, request
from marshmallow import Schema, ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from agentkeys import errors
from agentkeys.blueprints.problems import Problem
from agentkeys.services import Services
from agentkeys.sessions import IDENTITY, Session

SERVICES_KEY = "agentkeys.services"


def services() -> Services:
    found: Services = current_app.extensions[SERVICES_KEY]
    return found


def json_object() -> dict[str, Any]:
    """The request body as a JSON object; checks size, then content type, then syntax."""
    length, limit = request.content_length, request.max_content_length
    if limit is not None and (length or 0) > limit:
        raise RequestEntityTooLarge()
    if request.mimetype != "application/json":
        raise Problem(415, "unsupported_media_type", "Send the body as application/json.")
    if length is not None:
        # The length is checked above; one read of the WSGI input is several times cheaper
        # under gunicorn than werkzeug's chunked LimitedStream.
        raw = request.environ["wsgi.input"].read(length)
    else:
        raw = request.get_data(cache=True)  # a chunked body: werkzeug enforces the limit
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
        # A lone surrogate (\ud800) parses but is not Unicode: refuse it here, once, rather
        # than in every hash, database driver and JWT library it would reach.
        json.dumps(data, ensure_ascii=False).encode()
    except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        raise Problem(400, "invalid_json", "The body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise Problem(400, "invalid_json", "The body must be a JSON object.")
    return data


def load(schema: Schema, data: dict[str, Any]) -> dict[str, Any]:
    """Validate fields with a marshmallow schema; unknown, missing or mistyped → invalid_request."""
    try:
        result: dict[str, Any] = schema.load(data)
    except ValidationError as exc:
        fields = ", ".join(sorted(str(name) for name in exc.messages_dict))
        raise errors.InvalidRequest(f"Invalid or missing fields: {fields}.") from None
    return result


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def bearer_token() -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise errors.Unauthorized("Send Authorization: Bearer <session token>.")
    return token.strip()


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
