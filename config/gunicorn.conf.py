"""gunicorn settings for the `web` process (Procfile): PORT and WEB_CONCURRENCY as on Heroku."""

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from agentkeys.errors import ConfigError
from agentkeys.observability import (
    ACCESS_LOG_FORMAT,
    JSON,
    METRICS_DIR_VAR,
    GunicornLogger,
    JsonGunicornLogger,
    Observability,
)
from agentkeys.settings import Settings, parse_bool

# Refuse to start on a bad configuration in the master, before any worker forks: one line.
try:
    _observability = Observability.from_env(production=Settings.from_env().is_production)
    access_log_on = parse_bool("AGENTKEYS_ACCESS_LOG", os.environ.get("AGENTKEYS_ACCESS_LOG", "on"))
    _given_metrics_dir = os.environ.get(METRICS_DIR_VAR)
    if _observability.metrics and _given_metrics_dir and not Path(_given_metrics_dir).is_dir():
        raise ConfigError(f"{METRICS_DIR_VAR} must be an existing directory")
except ConfigError as exc:
    sys.exit(f"agentkeys: configuration error: {exc.detail}")

# A platform router reaches the dyno on PORT from outside: listen on every interface.
bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# One greenlet per connection: an idle, kept-alive or slow client (one that trickles its headers
# or body) waits in gevent's event loop and holds no thread that other clients need.
worker_class = "gevent"
# Connections per worker, slow ones included; a buffering proxy in front bounds them better.
worker_connections = 1000
# No preload_app: the app must be imported after gevent patches the worker, or psycopg's wait and
# SQLAlchemy's pool locks stay blocking (both are bound at import) and stall the whole worker.
# (It also keeps prometheus_client out of the master until on_starting has set its directory.)
accesslog = "-" if access_log_on else None
access_log_format = ACCESS_LOG_FORMAT  # paths only: query strings carry OAuth2 codes and state
errorlog = "-"
logger_class = JsonGunicornLogger if _observability.log_format == JSON else GunicornLogger

# Metrics (AGENTKEYS_METRICS=on): each worker writes its counts to files in one directory and a
# scrape sums them, so /metrics reads the same whichever worker answers (prometheus_client's
# multiprocess mode, chosen when a worker first imports it, after the fork).
_OWN_METRICS_DIR = "agentkeys-metrics-"


def on_starting(server: Any) -> None:
    """Once per master, before any worker: the metrics directory, with no counts of old runs."""
    if not _observability.metrics:
        return
    given = os.environ.get(METRICS_DIR_VAR)
    if given:
        # Counts left by a previous run would be summed into this one's.
        for stale in Path(given).glob("*.db"):
            stale.unlink()
    else:
        # New and private (0700) per master: no other user can read or plant metric files.
        os.environ[METRICS_DIR_VAR] = tempfile.mkdtemp(prefix=_OWN_METRICS_DIR)


def child_exit(server: Any, worker: Any) -> None:
    """A worker is gone: drop its live gauges (its counters stay in the sums)."""
    if _observability.metrics:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def on_exit(server: Any) -> None:
    """Remove the metrics directory this master made (one an operator gave is left)."""
    path = Path(os.environ.get(METRICS_DIR_VAR) or "/nonexistent")
    ours = path.parent == Path(tempfile.gettempdir()) and path.name.startswith(_OWN_METRICS_DIR)
    if _observability.metrics and ours:
        shutil.rmtree(path, ignore_errors=True)
