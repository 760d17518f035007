"""Apps are built through the factory per test: `make_app(**settings_overrides)`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask

from agentkeys.factory import create_app
from agentkeys.settings import Secret, Settings
from tests.vectors import VECTOR_ADDRESS, VECTOR_MASTER

BASE_SETTINGS = Settings(
    env="development",
    issuer="http://127.0.0.1:8000",
    database_url="sqlite://",
    dev_master_secret=Secret(VECTOR_MASTER),
)

MakeApp = Callable[..., Flask]


@pytest.fixture
def make_app(tmp_path: Any) -> MakeApp:
    def build(**overrides: Any) -> Flask:
        settings = dataclasses.replace(BASE_SETTINGS, **overrides)
        app = create_app(settings, instance_path=str(tmp_path / "instance"))
        app.config["TESTING"] = True
        return app

    return build


@pytest.fixture
def app(make_app: MakeApp) -> Flask:
    return make_app()


def siwe_text(
    address: str = VECTOR_ADDRESS,
    *,
    domain: str = "127.0.0.1:8000",
    scheme: str | None = None,
    chain_id: int = 1,
    expires_in: timedelta | None = timedelta(minutes=10),
    not_before: datetime | None = None,
    resources: tuple[str, ...] = (),
) -> str:
    """A SIWE message as the broker issues them, with knobs for the policy tests."""
    now = datetime.now(UTC).replace(microsecond=0)
    origin = f"{scheme}://{domain}" if scheme else domain
    lines = [
        f"{origin} wants you to sign in with your Ethereum account:",
        address,
        "",
        "Sign in to AgentKeys.",
        "",
        "URI: http://127.0.0.1:8000",
        "Version: 1",
        f"Chain ID: {chain_id}",
        "Nonce: abcdef0123456789",
        f"Issued At: {_rfc3339(now)}",
    ]
    if expires_in is not None:
        lines.append(f"Expiration Time: {_rfc3339(now + expires_in)}")
    if not_before is not None:
        lines.append(f"Not Before: {_rfc3339(not_before)}")
    if resources:
        lines.append("Resources:")
        lines.extend(f"- {r}" for r in resources)
    return "\n".join(lines)


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
