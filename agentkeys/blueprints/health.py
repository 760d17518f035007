"""Liveness and readiness probes."""

from __future__ import annotations

from flask import Blueprint


def create_blueprint() -> Blueprint:
    bp = Blueprint("health", __name__)

    @bp.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process answers."""
        return {"status": "ok"}

    @bp.get("/readyz")
    def readyz() -> dict[str, str]:
        """The app was built from valid settings and can serve requests."""
        return {"status": "ready"}

    return bp
