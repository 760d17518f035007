"""gunicorn settings for the `web` process (Procfile): PORT and WEB_CONCURRENCY as on Heroku."""

import os
import sys

from agentkeys.errors import ConfigError
from agentkeys.settings import Settings, parse_bool

# Refuse to start on a bad configuration in the master, before any worker forks: one line.
try:
    Settings.from_env()
except ConfigError as exc:
    sys.exit(f"agentkeys: configuration error: {exc.detail}")

# A platform router reaches the dyno on PORT from outside: listen on every interface.
bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Threads with an event loop for idle sockets: a browser's preconnected or kept-alive
# connection must not hold a whole worker, as it does with the sync worker.
worker_class = "gthread"
threads = 4
access_log_on = parse_bool("AGENTKEYS_ACCESS_LOG", os.environ.get("AGENTKEYS_ACCESS_LOG", "on"))
accesslog = "-" if access_log_on else None
# Paths only: query strings carry OAuth2 codes and state (magic-link tokens travel in the URL
# fragment, which never reaches the server).
access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms'
errorlog = "-"
