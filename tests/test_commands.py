"""Operator commands and logging hygiene."""

from __future__ import annotations

import logging

import pytest
from flask import Flask
from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError

from agentkeys.broker.db import accounts
from agentkeys.broker.keys import JWKS_MAX_AGE
from tests.conftest import services_of


@pytest.mark.parametrize("purpose", ["session", "oidc"])
def test_keys_rotate_publishes_before_signing(app: Flask, purpose: str) -> None:
    svc = services_of(app)
    ring = svc.session_keys if purpose == "session" else svc.oidc_keys
    old = ring.signing_key().kid
    result = app.test_cli_runner().invoke(args=["keys", "rotate", "--purpose", purpose])
    assert result.exit_code == 0, result.output
    new = next(k for k in ring.published() if k.kid != old)
    assert f"published {purpose} key {new.kid}" in result.output
    assert f"key {old} stays published until" in result.output
    assert ring.signing_key().kid == old  # signs only after one JWKS max-age
    assert new.signs_from - ring.clock() > JWKS_MAX_AGE - 5
    listed = app.test_cli_runner().invoke(args=["keys", "list"]).output
    assert old in listed and new.kid in listed


def test_keys_rotate_rejects_unknown_purpose(app: Flask) -> None:
    result = app.test_cli_runner().invoke(args=["keys", "rotate", "--purpose", "mail"])
    assert result.exit_code != 0 and "Invalid value for '--purpose'" in result.output


def test_sql_parameters_never_logged(app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    svc = services_of(app)
    secret_looking = "f" * 64
    with svc.engine.begin() as conn:
        conn.execute(insert(accounts).values(anchor=secret_looking, created_at=1))
    with pytest.raises(IntegrityError) as caught, svc.engine.begin() as conn:
        conn.execute(insert(accounts).values(anchor=secret_looking, created_at=2))
    assert secret_looking not in str(caught.value)
    assert "SQL parameters hidden" in str(caught.value)
    assert secret_looking not in caplog.text
