"""The application factory as a list of named steps."""

from __future__ import annotations

import logging
import re
import sys

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from agentkeys.blueprints import auth, dev_key_service, health, identities, openapi, wallet
from agentkeys.blueprints import metrics as metrics_blueprint
from agentkeys.blueprints.http import SERVICES_KEY
from agentkeys.blueprints.problems import register_error_handlers
from agentkeys.broker.commands import register_commands
from agentkeys.broker.db import outage
from agentkeys.broker.dev_key_service import DEV_ONLY_WARNING, DevKeyService
from agentkeys.broker.keys import KeyUnsealError
from agentkeys.broker.migrate import is_current
from agentkeys.broker.services import Services
from agentkeys.errors import ConfigError
from agentkeys.observability import JSON, Metrics, Observability, install_json_logging
from agentkeys.settings import Settings

log = logging.getLogger("agentkeys")
# The query of a request line, `GET /auth/oauth2/callback?code=…&state=… HTTP/1.1`.
_QUERY_STRING = re.compile(r"\?[^\s\"'\x1b]*")


def create_app(
    settings: Settings | None = None,
    *,
    instance_path: str | None = None,
    observability: Observability | None = None,
) -> Flask:
    """Build the app; settings come from the environment unless given (tests pass them)."""
    app = Flask("agentkeys", instance_path=instance_path)
    if settings is None:
        settings = Settings.from_env(instance_path=app.instance_path)
        observability = observability or Observability.from_env(production=settings.is_production)
    else:
        settings.validate()
    register_observability(app, settings, observability or Observability())
    refuse_debugger(app, settings)
    register_settings(app, settings)
    register_request_log()
    register_proxies(app, settings)
    register_error_handlers(app, translate=outage)
    svc = register_services(app, settings)
    register_blueprints(app, settings)
    register_commands(app)
    if not settings.is_production:
        generate_dev_keys(svc)
    return app


def refuse_debugger(app: Flask, settings: Settings) -> None:
    """`flask run --debug` (FLASK_DEBUG) serves werkzeug's debugger, a Python console in the
    browser: anyone who reaches it runs code with the master secret and the keys in reach."""
    if app.debug and settings.is_production:
        raise ConfigError("the debugger (FLASK_DEBUG, flask --debug) is refused in production")


def register_settings(app: Flask, settings: Settings) -> None:
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]


def register_observability(app: Flask, settings: Settings, observability: Observability) -> None:
    """First, so every request has its id before anything logs; JSON logs; metrics if on."""
    if observability.log_format == JSON:
        install_json_logging()
    signers = ("dev",) if settings.dev_master_secret is not None else ()
    metrics = Metrics(signers) if observability.metrics else None
    app.register_blueprint(metrics_blueprint.create_blueprint(metrics))


def register_request_log() -> None:
    """`flask run` logs request lines without query strings, as gunicorn's access log does."""
    logging.getLogger("werkzeug").addFilter(_without_query_strings)


def _without_query_strings(record: logging.LogRecord) -> bool:
    # Query strings carry OAuth2 codes and state: they must not reach the log.
    record.msg, record.args = _QUERY_STRING.sub("", record.getMessage()), ()
    return True


def register_proxies(app: Flask, settings: Settings) -> None:
    if settings.trusted_proxies:
        # Only as many X-Forwarded-For hops as there are proxies we run; the rest is client-made.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies)  # type: ignore[method-assign]


def register_services(app: Flask, settings: Settings) -> Services:
    svc = Services.build(settings)
    app.extensions[SERVICES_KEY] = svc
    return svc


def generate_dev_keys(svc: Services) -> None:
    """Development makes its signing keys on first run (production: the release step)."""
    try:
        if not is_current(svc.engine):
            log.warning("the database is not migrated: run `python -m agentkeys.release`")
            return
        for ring in svc.keyrings():
            ring.ensure_initial()
    except Exception as exc:
        if outage(exc) is None:
            raise
        # Boot anyway and answer 503s: a worker that raised here would exit 3, and gunicorn's
        # master halts every worker on that. The key rings make the keys on first use.
        log.warning("the database is unavailable at boot (%s): serving 503s", type(exc).__name__)


def register_blueprints(app: Flask, settings: Settings) -> None:
    app.register_blueprint(health.create_blueprint())
    app.register_blueprint(auth.create_blueprint())
    app.register_blueprint(identities.create_blueprint())
    app.register_blueprint(wallet.create_blueprint())
    app.register_blueprint(openapi.create_blueprint())
    service = None
    if settings.dev_master_secret is not None:
        service = DevKeyService(settings.dev_master_secret, settings)
        log.warning(DEV_ONLY_WARNING)
    app.register_blueprint(dev_key_service.create_blueprint(service))


# gunicorn's arbiter halts when a worker exits with this code; on any other it respawns the
# worker, so a plain `gunicorn wsgi:app` (no config file to check first) would crash-loop.
APP_LOAD_ERROR = 4


def app_from_env() -> Flask:
    """The app for `flask run` and gunicorn: a bad configuration exits with one line."""
    try:
        return create_app()
    except ConfigError as exc:
        refusal = f"agentkeys: configuration error: {exc.detail}"
    except KeyUnsealError as exc:
        refusal = f"agentkeys: {exc}"
    print(refusal, file=sys.stderr, flush=True)
    raise SystemExit(APP_LOAD_ERROR)
