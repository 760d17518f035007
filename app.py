"""`flask --app app run`: the development entry point."""

from agentkeys.broker.factory import app_from_env

app = app_from_env()
