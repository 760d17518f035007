"""Every request's id (X-Request-ID, in its log lines) and metrics; GET /metrics when enabled."""

from __future__ import annotations

import time

from flask import Blueprint, Response, g, request

from agentkeys.observability import Metrics, current_request_id
from agentkeys.requestid import REQUEST_ID_HEADER, request_id_from

# The Prometheus text format that prometheus_client's generate_latest writes.
EXPOSITION_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def create_blueprint(metrics: Metrics | None) -> Blueprint:
    """A fresh blueprint whose hooks run for the whole app; /metrics exists only with `metrics`
    (otherwise it is a 404 like any unknown path)."""
    bp = Blueprint("metrics", __name__)

    @bp.before_app_request
    def _start() -> None:
        g.request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
        g.request_started = time.perf_counter()
        current_request_id.set(g.request_id)

    @bp.after_app_request
    def _finish(response: Response) -> Response:
        response.headers[REQUEST_ID_HEADER] = g.get("request_id") or request_id_from(None)
        started = g.get("request_started")
        if metrics is not None and started is not None:
            elapsed = time.perf_counter() - started
            metrics.observe(request.endpoint, request.method, response.status_code, elapsed)
        return response

    @bp.teardown_app_request
    def _forget(_: BaseException | None) -> None:
        current_request_id.set(None)  # a thread or greenlet serves the next request afresh

    if metrics is not None:

        @bp.get("/metrics")
        def scrape() -> Response:
            """Counts only, labelled by endpoint names and outcomes: no identity, address or
            path. Served only with AGENTKEYS_METRICS=on; keep it off the public route."""
            response = Response(metrics.exposition(), content_type=EXPOSITION_TYPE)
            response.headers["Cache-Control"] = "no-store"
            return response

    return bp
