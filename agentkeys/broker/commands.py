"""Operator commands: `flask --app app keys rotate --purpose session|oidc`, `flask --app app prune`
(run it periodically: it deletes what no flow can use any more)."""

from __future__ import annotations

import click
from flask import Flask

from agentkeys.blueprints.http import services
from agentkeys.broker.keys import JWKS_MAX_AGE
from agentkeys.broker.prune import prune as prune_expired
from agentkeys.timefmt import now_seconds, rfc3339


def register_commands(app: Flask) -> None:
    @app.cli.command()
    @click.option("--batch", type=click.IntRange(min=1), default=1000, show_default=True)
    def prune(batch: int) -> None:
        """Delete expired challenges, sign-in requests, spent token ids and ended limit windows."""
        svc = services()
        limits = svc.settings.rate_limits
        counts = prune_expired(svc.engine, now_seconds(), batch=batch, limits=limits)
        for table, deleted in counts.items():
            click.echo(f"pruned {deleted} {table}")

    @app.cli.group()
    def keys() -> None:
        """Signing keys shared by every worker and instance."""

    @keys.command()
    @click.option("--purpose", type=click.Choice(["session", "oidc"]), required=True)
    def rotate(purpose: str) -> None:
        """Publish a new key now; it signs after one JWKS max-age, without downtime."""
        svc = services()
        ring = svc.session_keys if purpose == "session" else svc.oidc_keys
        key = ring.rotate()
        click.echo(f"published {purpose} key {key.kid}")
        click.echo(f"it signs from {rfc3339(key.signs_from)} (after the {JWKS_MAX_AGE} s cache)")
        retiring = [k for k in ring.published() if k.kid != key.kid and k.retire_at]
        for old in retiring:
            click.echo(f"key {old.kid} stays published until {rfc3339(old.retire_at or 0)}")

    @keys.command(name="list")
    def list_keys() -> None:
        """The published keys of both purposes."""
        svc = services()
        for ring in svc.keyrings():
            for key in ring.published():
                retire = rfc3339(key.retire_at) if key.retire_at else "-"
                click.echo(
                    f"{ring.purpose:8} {key.kid}  signs from {rfc3339(key.signs_from)}  "
                    f"retires {retire}"
                )
