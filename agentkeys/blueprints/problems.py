"""One error shape: RFC 9457 problem+json with a stable `error` code (PROTOCOL §4)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from http import HTTPStatus

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from agentkeys import errors

log = logging.getLogger(__name__)

STATUS_OF: dict[type[errors.AgentKeysError], int] = {
    errors.InvalidRequest: 400,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.MessageNotAllowed: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.RateLimited: 429,
    errors.MailError: 503,
    errors.OAuth2Error: 502,
    errors.SignerDisabled: 503,
    errors.Unavailable: 503,
}

# Maps an exception that is no bug (a database outage) to the domain error to answer with.
Translate = Callable[[Exception], errors.AgentKeysError | None]

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


def register_error_handlers(app: Flask, translate: Translate | None = None) -> None:
    @app.errorhandler(Problem)
    def _edge(exc: Problem) -> Response:
        return problem(exc.status, exc.code, exc.detail)

    @app.errorhandler(errors.AgentKeysError)
    def _domain(exc: errors.AgentKeysError) -> Response:
        status = next((s for cls, s in STATUS_OF.items() if isinstance(exc, cls)), 400)
        headers = {}
        if isinstance(exc, errors.RateLimited | errors.Unavailable):
            headers["Retry-After"] = str(exc.retry_after)
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="agentkeys"'
        return problem(status, exc.code, exc.detail, headers)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = CODE_OF_HTTP_STATUS.get(status, HTTPStatus(status).phrase.lower().replace(" ", "_"))
        # Keep Allow on 405 and similar protocol headers; the body is ours.
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        return problem(status, code, _http_detail(status), headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        known = translate(exc) if translate is not None else None
        if known is not None:
            # An outage is expected, not a bug: one line, no traceback; the driver's first line
            # names host and port at most (make_engine refuses URLs that would put more there).
            log.warning(
                "%s on %s %s: %s", known.code, request.method, request.path, _first_line(exc)
            )
            return _domain(known)
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem(500, "internal_error", "The server failed to handle this request.")


def _first_line(exc: BaseException) -> str:
    """The exception's class and the first line of its message (SQLAlchemy's later lines hold
    the statement), bounded."""
    message = str(exc).partition("\n")[0][:300]
    return f"{type(exc).__module__}.{type(exc).__qualname__}: {message}"


def _http_detail(status: int) -> str:
    if status == 404:
        return "No such endpoint."
    if status == 405:
        return f"{request.method} is not allowed on this endpoint."
    if status == 413:
        return "The request body is larger than the server accepts."
    return HTTPStatus(status).description
