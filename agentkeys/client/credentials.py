"""AWS credentials as the client caches and prints them (../shared/reference/aws-credentials.md).
Standard library only: a warm `agentkeys credentials` imports neither boto3 nor requests."""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agentkeys.client.cache import Home

REFRESH_MARGIN = 15 * 60  # the SDKs re-run the helper on every call with less left than this
FORMATS = ("credential-process", "json", "env")


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str
    session_token: str
    expiration: int  # Unix seconds

    @property
    def expiration_rfc3339(self) -> str:
        """Strict RFC 3339 in UTC: botocore's refresh check crashes on a time without a zone."""
        return datetime.fromtimestamp(self.expiration, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def to_json(self) -> dict[str, Any]:
        return {
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            "session_token": self.session_token,
            "expiration": self.expiration,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Credentials:
        return cls(
            str(data["access_key_id"]),
            str(data["secret_access_key"]),
            str(data["session_token"]),
            int(data["expiration"]),
        )

    def environment(self) -> dict[str, str]:
        """The variables botocore and the JS SDK read (AWS_CREDENTIAL_EXPIRATION: not Go)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_SESSION_TOKEN": self.session_token,
            "AWS_CREDENTIAL_EXPIRATION": self.expiration_rfc3339,
        }

    def render(self, fmt: str) -> str:
        if fmt == "env":
            return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in self.environment().items())
        body: dict[str, Any] = {"Version": 1} if fmt == "credential-process" else {}
        body |= {
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "SessionToken": self.session_token,
            "Expiration": self.expiration_rfc3339,
        }
        return json.dumps(body)


def cached(home: Home, name: str) -> Credentials | None:
    """The cached credentials in `name` (see credentials_name) while more than 15 minutes
    remain."""
    stored = home.read(name)
    try:
        found = Credentials.from_json(stored) if stored else None
    except (KeyError, TypeError, ValueError):
        return None  # a file from another version, or damaged: mint again
    if found is None or found.expiration - time.time() <= REFRESH_MARGIN:
        return None
    return found
