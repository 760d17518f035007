"""A boto3 session for Python agents whose credentials refresh through the same per-role cache
and cross-process lock as `agentkeys credentials`: one mint serves the CLI and every session."""

from __future__ import annotations

from typing import Any

import boto3
import botocore.session
from botocore.credentials import CredentialProvider, CredentialResolver, RefreshableCredentials

from agentkeys.client import flow
from agentkeys.client.config import ClientConfig

METHOD = "custom-agentkeys"  # botocore asks providers it does not ship to be named custom-…
FLAGS = ("broker_url", "signer_url", "home", "sts_endpoint_url")
MIN_DURATION, MAX_DURATION = 900, 43200


class AgentKeysProvider(CredentialProvider):  # type: ignore[misc]
    """Hands botocore the session's one refreshable credentials object."""

    METHOD = METHOD
    CANONICAL_NAME = METHOD

    def __init__(self, credentials: RefreshableCredentials) -> None:
        super().__init__()
        self.credentials = credentials

    def load(self) -> RefreshableCredentials:
        return self.credentials


def aws_session(
    role_arn: str | None = None,
    *,
    duration: int = 3600,
    region: str | None = None,
    **flags: str | None,
) -> boto3.Session:
    """A boto3 session as `role_arn` (default AGENTKEYS_ROLE_ARN). `flags` are the CLI's options
    (broker_url, signer_url, home, sts_endpoint_url); unset ones come from the environment.
    Raises a ClientError (agentkeys.client.errors) when not signed in or a step fails."""
    unknown = sorted(set(flags) - set(FLAGS))
    if unknown:
        raise TypeError(f"aws_session() got unexpected keyword arguments: {', '.join(unknown)}")
    if not MIN_DURATION <= duration <= MAX_DURATION:
        raise ValueError(f"duration must be {MIN_DURATION} to {MAX_DURATION} seconds")
    config = ClientConfig.from_env({**flags, "role_arn": role_arn})
    role = config.role_arn
    if not role:
        raise ValueError("no role: pass role_arn= or set AGENTKEYS_ROLE_ARN")

    def refresh() -> dict[str, Any]:
        found = flow.fresh_credentials(config, role, duration)
        return {
            "access_key": found.access_key_id,
            "secret_key": found.secret_access_key,
            "token": found.session_token,
            "expiry_time": found.expiration_rfc3339,
        }

    credentials = RefreshableCredentials.create_from_metadata(
        refresh(), refresh_using=refresh, method=METHOD
    )
    session = botocore.session.Session()
    # Ours is the only provider: ambient keys (env, ~/.aws) must not stand in for the role.
    session.register_component(
        "credential_provider", CredentialResolver([AgentKeysProvider(credentials)])
    )
    return boto3.Session(botocore_session=session, region_name=region or config.region)
