"""The agentkeys client: the `agentkeys` command, its server mode, and a boto3 session for
Python agents. It speaks the wire protocol only: requests, click and the pure core, never Flask,
SQLAlchemy or the blueprints."""
