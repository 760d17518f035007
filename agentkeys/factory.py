"""The application factory as a list of named steps."""

from __future__ import annotations

import logging

from flask import Flask

from agentkeys.blueprints import dev_key_service, health
from agentkeys.blueprints.problems import register_error_handlers
from agentkeys.dev_key_service import DEV_ONLY_WARNING, DevKeyService
from agentkeys.errors import ConfigError
from agentkeys.settings import Settings

SETTINGS_KEY = "agentkeys.settings"


def create_app(settings: Settings | None = None, *, instance_path: str | None = None) -> Flask:
    """Build the app; settings come from the environment unless given (tests pass them)."""
    app = Flask("agentkeys", instance_path=instance_path)
    if settings is None:
        settings = Settings.from_env(instance_path=app.instance_path)
    else:
        settings.validate()
    register_settings(app, settings)
    register_error_handlers(app)
    register_blueprints(app, settings)
    return app


def register_settings(app: Flask, settings: Settings) -> None:
    app.extensions[SETTINGS_KEY] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]


def register_blueprints(app: Flask, settings: Settings) -> None:
    app.register_blueprint(health.create_blueprint())
    service = None
    if settings.dev_master_secret is not None:
        service = DevKeyService(settings.dev_master_secret, settings)
        logging.getLogger("agentkeys.dev_key_service").warning(DEV_ONLY_WARNING)
    app.register_blueprint(dev_key_service.create_blueprint(service))


def app_from_env() -> Flask:
    """The app for `flask run` and gunicorn: a bad configuration exits with one line."""
    try:
        return create_app()
    except ConfigError as exc:
        raise SystemExit(f"agentkeys: configuration error: {exc.detail}") from None
