"""`gunicorn --config config/tee.gunicorn.conf.py agentkeys.tee.wsgi:app`: the TEE worker."""

from agentkeys.tee.app import app_from_env

app = app_from_env()
