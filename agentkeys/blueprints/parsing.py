"""Request parsing every JSON endpoint shares, the broker's and the TEE worker's: bodies,
field schemas and the bearer token. Nothing here reaches the broker's services."""

from __future__ import annotations

import json
from typing import Any

from flask import request
from marshmallow import Schema, ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from agentkeys import errors
from agentkeys.blueprints.problems import Problem


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
        # Strict UTF-8 (RFC 8259 §8.1): json.loads would also take UTF-16 and UTF-32, and
        # decode surrogate bytes as they stand.
        text = raw.decode("utf-8")
        data = json.loads(text, parse_constant=_reject_constant)
        # A lone surrogate (\ud800) parses but is not Unicode: refuse it here, once, rather
        # than in every hash, database driver and JWT library it would reach. After a strict
        # decode only a \u escape can make one.
        if "\\u" in text:
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
