"""The agentkeys client: the `agentkeys` command, its server mode, and a boto3 session for
Python agents. It speaks the wire protocol only: requests, click and the pure core, never Flask,
SQLAlchemy or the blueprints."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentkeys.client.aws import aws_session

__all__ = ["aws_session"]


def __getattr__(name: str) -> Any:
    """`aws_session` on first use: importing the package (and the CLI) never loads boto3."""
    if name == "aws_session":
        from agentkeys.client.aws import aws_session

        return aws_session
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
