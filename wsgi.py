"""`gunicorn wsgi:app`: the production entry point."""

from agentkeys.broker.factory import app_from_env

app = app_from_env()
