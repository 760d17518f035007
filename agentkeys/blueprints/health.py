"""Liveness and readiness probes."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify
from sqlalchemy.exc import SQLAlchemyError

from agentkeys.blueprints.http import services
from agentkeys.blueprints.problems import problem
from agentkeys.migrate import is_current

log = logging.getLogger(__name__)


def create_blueprint() -> Blueprint:
    bp = Blueprint("health", __name__)

    @bp.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process answers."""
        return {"status": "ok"}

    @bp.get("/readyz")
    def readyz() -> Response:
        """Ready when the database answers at the current schema revision."""
        try:
            current = is_current(services().engine)
        except SQLAlchemyError as exc:
            log.warning("readiness: database unreachable (%s)", type(exc).__name__)
            current = False
        if not current:
            return problem(503, "not_ready", "The database is unreachable or not migrated.")
        return jsonify(status="ready")

    return bp
