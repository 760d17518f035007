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
# One greenlet per connection: an idle, kept-alive or slow client (one that trickles its headers
# or body) waits in gevent's event loop and holds no thread that other clients need.
worker_class = "gevent"
# Connections per worker, slow ones included; a buffering proxy in front bounds them better.
worker_connections = 1000
# No preload_app: the app must be imported after gevent patches the worker, or psycopg's wait and
# SQLAlchemy's pool locks stay blocking (both are bound at import) and stall the whole worker.
access_log_on = parse_bool("AGENTKEYS_ACCESS_LOG", os.environ.get("AGENTKEYS_ACCESS_LOG", "on"))
accesslog = "-" if access_log_on else None
# Paths only: query strings carry OAuth2 codes and state (magic-link tokens travel in the URL
# fragment, which never reaches the server).
access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms'
errorlog = "-"
