"""gunicorn settings for the `tee` process (Procfile): the TEE worker, logging as `web` does."""

import os
import sys

from agentkeys.errors import ConfigError
from agentkeys.observability import (
    ACCESS_LOG_FORMAT,
    JSON,
    GunicornLogger,
    JsonGunicornLogger,
    Observability,
)
from agentkeys.settings import parse_bool
from agentkeys.tee.settings import WorkerSettings

# Refuse to start on a bad configuration in the master, before the worker boots: one line.
try:
    _observability = Observability.from_env(production=WorkerSettings.from_env().is_production)
    access_log_on = parse_bool("AGENTKEYS_ACCESS_LOG", os.environ.get("AGENTKEYS_ACCESS_LOG", "on"))
except ConfigError as exc:
    sys.exit(f"agentkeys: configuration error: {exc.detail}")

# One process: the attested response key, the audit chain and the per-account limits live in
# it (agentkeys/tee/app.py). Threads, not greenlets: signing is CPU work in C.
workers = 1
threads = 8
accesslog = "-" if access_log_on else None
access_log_format = ACCESS_LOG_FORMAT
errorlog = "-"
logger_class = JsonGunicornLogger if _observability.log_format == JSON else GunicornLogger
