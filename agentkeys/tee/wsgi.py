"""`gunicorn -w 1 --threads 8 agentkeys.tee.wsgi:app`: the TEE worker, one process."""

from agentkeys.tee.app import app_from_env

app = app_from_env()
