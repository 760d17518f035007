"""One error shape: RFC 9457 problem+json with a stable `error` code (PROTOCOL §4)."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from flask import Flask, Response, request
from marshmallow import Schema, ValidationError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from agentkeys import errors

log = logging.getLogger(__name__)

STATUS_OF: dict[type[errors.AgentKeysError], int] = {
    errors.InvalidRequest: 400,
    errors.MessageNotAllowed: 403,
    errors.SignerDisabled: 503,
}

CODE_OF_HTTP_STATUS = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


class Problem(Exception):
    """An edge-level error with its HTTP status (content type, JSON syntax, size)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def problem(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    body = {
        "type": f"urn:agentkeys:problem:{code}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "error": code,
    }
    response = Response(json.dumps(body), status, mimetype="application/problem+json")
    response.headers.update(headers or {})
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(Problem)
    def _edge(exc: Problem) -> Response:
        return problem(exc.status, exc.code, exc.detail)

    @app.errorhandler(errors.AgentKeysError)
    def _domain(exc: errors.AgentKeysError) -> Response:
        status = next((s for cls, s in STATUS_OF.items() if isinstance(exc, cls)), 400)
        return problem(status, exc.code, exc.detail)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = CODE_OF_HTTP_STATUS.get(status, HTTPStatus(status).phrase.lower().replace(" ", "_"))
        # Keep Allow on 405 and similar protocol headers; the body is ours.
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        return problem(status, code, _http_detail(status), headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem(500, "internal_error", "The server failed to handle this request.")


def _http_detail(status: int) -> str:
    if status == 404:
        return "No such endpoint."
    if status == 405:
        return f"{request.method} is not allowed on this endpoint."
    if status == 413:
        return "The request body is larger than the server accepts."
    return HTTPStatus(status).description


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
    except (ValueError, RecursionError):
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
