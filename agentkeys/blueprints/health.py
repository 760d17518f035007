"""Liveness and readiness probes."""

from __future__ import annotations

import logging

import psycopg
from flask import Blueprint, Response, jsonify
from sqlalchemy.exc import SQLAlchemyError

from agentkeys.blueprints.http import services
from agentkeys.blueprints.problems import problem
from agentkeys.broker.db import OUTAGE_RETRY_AFTER
from agentkeys.broker.migrate import is_current
from agentkeys.errors import LimitsUnavailable

log = logging.getLogger(__name__)


def create_blueprint() -> Blueprint:
    bp = Blueprint("health", __name__)

    @bp.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process answers (it needs neither the database nor Redis)."""
        return {"status": "ok"}

    @bp.get("/readyz")
    def readyz() -> Response:
        """Ready when the database answers at the current schema revision and the rate-limit
        store (Redis, when configured) answers; asked afresh each time, so it recovers alone."""
        svc = services()
        retry = {"Retry-After": str(OUTAGE_RETRY_AFTER)}
        try:
            current = is_current(svc.engine)
        except (SQLAlchemyError, psycopg.Error) as exc:  # psycopg's may escape unwrapped
            log.warning("readiness: database unreachable (%s)", type(exc).__name__)
            current = False
        if not current:
            detail = "The database is unreachable or not migrated."
            return problem(503, "not_ready", detail, retry)
        try:
            svc.limiter.ping()
        except LimitsUnavailable:
            return problem(503, "not_ready", "The rate-limit store is unreachable.", retry)
        return jsonify(status="ready")

    return bp
