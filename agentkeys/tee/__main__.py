"""`python -m agentkeys.tee`: the worker's operator commands, run where the worker runs (the
sealing key is the platform's). Exit codes: 0 ok, 1 refused or a bad audit log, 2 usage."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import click

from agentkeys.errors import ConfigError
from agentkeys.tee.audit import verify_file
from agentkeys.tee.platform import PlatformError, platform_from_name
from agentkeys.tee.settings import WorkerSettings
from agentkeys.tee.state import SealedState, StateError

_MASTER_HEX = re.compile(r"(0x)?[0-9a-fA-F]{64}\Z")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Operator commands of the AgentKeys TEE worker (settings from the environment, §8)."""


def _state(state_dir: Path | None = None) -> SealedState:
    """The sealed state the worker would open, from the environment (one line on failure)."""
    try:
        settings = WorkerSettings.from_env()
        if state_dir is not None:
            settings = dataclasses.replace(settings, state_dir=state_dir)
        platform = platform_from_name(
            settings.platform, settings.state_dir, production=settings.is_production
        )
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc.detail}") from None
    except PlatformError as exc:
        raise click.ClickException(str(exc)) from None
    return SealedState(platform, settings.state_dir, settings.release)


@main.command("import-master")
@click.option(
    "--file",
    "path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A file holding the master secret as 64 hex characters (e.g. instance/dev-master-secret).",
)
def import_master(path: Path) -> None:
    """Seal an existing master secret once, before the worker's first boot, so the same anchors
    keep the same wallets. Refused once a master secret is sealed."""
    text = path.read_text().strip()
    # The value is never echoed: an error names the file only.
    if not _MASTER_HEX.match(text):
        raise click.ClickException(f"{path} does not hold 64 hex characters")
    state = _state()
    try:
        state.import_master(bytes.fromhex(text.removeprefix("0x")))
    except StateError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"sealed the master secret from {path} into {state.master_path}")


@main.group()
def audit() -> None:
    """The audit log (PROTOCOL §7)."""


@audit.command("verify")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--state",
    "state_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The worker's state folder: also check the log against its sealed head (a cut tail).",
)
def verify(file: Path, state_dir: Path | None) -> None:
    """Check the hash chain; exit 0 when intact, 1 naming the first bad line."""
    head = None
    if state_dir is not None:
        try:
            head = _state(state_dir).audit_head()
        except StateError as exc:
            raise click.ClickException(str(exc)) from None
    failure = verify_file(file, head)
    if failure is not None:
        click.echo(f"{file}: {failure}", err=True)
        sys.exit(1)
    covered = f", {head.count} covered by the sealed head" if head is not None else ""
    click.echo(f"{file}: intact{covered}")


if __name__ == "__main__":
    main()
