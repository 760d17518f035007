"""`agentkeys`: sign in once, then AWS credentials for agents with no local key. Each command
parses and prints; the flow is in flow.py. The warm `credentials` path imports neither boto3
nor requests."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from agentkeys.client.cache import SESSION
from agentkeys.client.config import ClientConfig
from agentkeys.client.credentials import FORMATS, Credentials, cached
from agentkeys.client.errors import EXIT_CODES, ClientError

DURATION = click.IntRange(900, 43200)
ROLE_HELP = "IAM role to assume (default AGENTKEYS_ROLE_ARN)."


@click.group(epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--broker-url", help="The broker (default AGENTKEYS_BROKER_URL or http://127.0.0.1:8000)."
)
@click.option(
    "--signer-url", help="The signer (default AGENTKEYS_SIGNER_URL or the broker + /dev)."
)
@click.option(
    "--home",
    help="Where the session and credentials are kept (default AGENTKEYS_HOME or ~/.agentkeys).",
)
@click.option(
    "--tee-root-cert",
    help="Attest the signer: the pinned TEE root certificate, PEM or DER "
    "(default AGENTKEYS_TEE_ROOT_CERT; unset: no attestation).",
)
@click.option(
    "--tee-pcr0",
    help="The worker images (PCR0, 96 hex, comma-separated) an attested signer may run "
    "(default AGENTKEYS_TEE_PCR0; required with a root).",
)
@click.pass_context
def main(
    ctx: click.Context,
    broker_url: str | None,
    signer_url: str | None,
    home: str | None,
    tee_root_cert: str | None,
    tee_pcr0: str | None,
) -> None:
    """Short-lived AWS credentials for agents, from an email or OAuth2 sign-in: no local key."""
    ctx.obj = {
        "broker_url": broker_url,
        "signer_url": signer_url,
        "home": home,
        "tee_root_cert": tee_root_cert,
        "tee_pcr0": tee_pcr0,
    }


def config_of(ctx: click.Context, **flags: str | None) -> ClientConfig:
    return ClientConfig.from_env({**ctx.obj, **flags})


@contextmanager
def failures() -> Iterator[None]:
    """A ClientError ends the command with its one line on stderr and its exit code."""
    try:
        yield
    except ClientError as exc:
        click.echo(exc.line(), err=True)
        sys.exit(exc.exit_code)


@main.command(epilog=EXIT_CODES)
@click.option("--email", help="Sign in with a magic link sent to this address.")
@click.option("--provider", help="Sign in with this OAuth2 provider (e.g. google).")
@click.option("--no-browser", is_flag=True, help="Print the sign-in URL; never open a browser.")
@click.pass_context
def init(ctx: click.Context, email: str | None, provider: str | None, no_browser: bool) -> None:
    """Sign in, then derive, link and prove this account's wallet once (steps 1-6)."""
    one_way_to_sign_in(email, provider)
    from agentkeys.client import flow

    config = config_of(ctx)
    with failures():
        client = flow.Client(config)
        status = sign_in(client, email, provider, no_browser)
        session, account = str(status["session_jwt"]), str(status["account"])
        wallet = client.derive_address(session, account)
        client.link_wallet(session, wallet)
        client.wallet_session(session, account, wallet)
        path = flow.save_session(config, status, wallet)
    click.echo(f"account  {account}")
    click.echo(f"wallet   {wallet}")
    click.echo(f"session  {path} (until {status['expires_at']})")


def one_way_to_sign_in(email: str | None, provider: str | None) -> None:
    if (email is None) == (provider is None):
        raise click.UsageError("give exactly one of --email ADDR or --provider NAME")


def sign_in(client: Any, email: str | None, provider: str | None, no_browser: bool) -> Any:
    """Step 1 with a person: start, say where to approve, wait; the verified status."""
    started = client.start_email(email) if email else client.start_oauth2(str(provider))
    status = client.wait(started, announce(started, email, no_browser))
    click.echo("", err=True)
    return status


def announce(started: Any, email: str | None, no_browser: bool) -> Callable[[float], None]:
    """Say where to approve, then show a countdown on stderr while polling."""
    click.echo(
        f"Your code: {started.user_code} (approve only if the page shows this code)", err=True
    )
    if email:
        click.echo(f"Open the link sent to {email} and press Approve.", err=True)
    else:
        click.echo(f"Open this URL to sign in:\n  {started.authorization_url}", err=True)
        has_display = bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
        if has_display and not no_browser:
            import webbrowser

            webbrowser.open(started.authorization_url)
    tty = sys.stderr.isatty()
    last = [0.0]

    def tick(left: float) -> None:
        if tty or time.monotonic() - last[0] >= 30:
            last[0] = time.monotonic()
            minutes, seconds = divmod(int(left), 60)
            end = "\r" if tty else "\n"
            click.echo(f"waiting for approval… {minutes}:{seconds:02d} left ", err=True, nl=False)
            click.echo(end, err=True, nl=False)

    return tick


@main.command(epilog=EXIT_CODES)
@click.option(
    "--format", "fmt", type=click.Choice(FORMATS), default="credential-process", show_default=True
)
@click.option("--role-arn", help=ROLE_HELP)
@click.option(
    "--duration", type=DURATION, default=3600, show_default=True, help="Seconds (900-43200)."
)
@click.pass_context
def credentials(ctx: click.Context, fmt: str, role_arn: str | None, duration: int) -> None:
    """Print AWS credentials (steps 4-7, then STS), cached until 15 minutes before they expire.
    Never prompts: use it as a credential_process."""
    click.echo(obtain(ctx, role_arn, duration).render(fmt))


def obtain(ctx: click.Context, role_arn: str | None, duration: int) -> Credentials:
    config = config_of(ctx, role_arn=role_arn)
    if not config.role_arn:
        raise click.UsageError("no role: give --role-arn or set AGENTKEYS_ROLE_ARN")
    found = cached(config.home, config.credentials_name(config.role_arn, duration))
    if found is not None:
        return found
    from agentkeys.client import flow

    with failures():
        return flow.fresh_credentials(config, config.role_arn, duration)


@main.command(name="exec", epilog=EXIT_CODES, context_settings={"ignore_unknown_options": True})
@click.option("--role-arn", help=ROLE_HELP)
@click.option(
    "--duration", type=DURATION, default=3600, show_default=True, help="Seconds (900-43200)."
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_(
    ctx: click.Context, role_arn: str | None, duration: int, command: tuple[str, ...]
) -> None:
    """Run COMMAND with AWS credentials in its environment: agentkeys exec -- aws s3 ls.
    COMMAND replaces this process, so its exit code and signals pass through."""
    if os.environ.get("AGENTKEYS_EXEC"):
        raise click.UsageError("already inside `agentkeys exec`")
    found = obtain(ctx, role_arn, duration)
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE")}
    env |= found.environment() | {"AGENTKEYS_EXEC": "1"}
    region = config_of(ctx).region
    if region:
        env |= {"AWS_REGION": region, "AWS_DEFAULT_REGION": region}
    program = shutil.which(command[0], path=env.get("PATH"))
    if program is None:
        click.echo(f"agentkeys: exec: {command[0]}: command not found", err=True)
        sys.exit(127)
    os.execve(program, list(command), env)  # noqa: S606  (argv as given, no shell)


@main.command(epilog=EXIT_CODES)
@click.pass_context
def whoami(ctx: click.Context) -> None:
    """The account, its identities, the wallet, when the session ends, and the signer (attested
    when AGENTKEYS_TEE_ROOT_CERT is set)."""
    from agentkeys.client import flow

    config = config_of(ctx)
    with failures():
        session = config.session("whoami")
        client = flow.Client(config)
        listed = client.identities(session["session_jwt"])
        attested = client.attestor.attest() if client.attestor is not None else None
    click.echo(f"account  {listed['account']}")
    click.echo(f"wallet   {session['wallet']}")
    ends = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(session["expires_at"]))
    click.echo(f"session  {session['identity_type']}, until {ends}")
    for item in listed["identities"]:
        click.echo(f"  {item['identity_type']:16} {item['identity_value']}  {item['status']}")
    if attested is None:
        click.echo(
            f"signer   {config.signer_url}  (not attested: AGENTKEYS_TEE_ROOT_CERT is unset)"
        )
    else:
        click.echo(
            f"signer   {config.signer_url}  attested {attested.platform}, PCR0 {attested.pcr0}"
        )


@main.command(epilog=EXIT_CODES)
@click.option(
    "--everywhere", is_flag=True, help="Also revoke every session of the account on the server."
)
@click.pass_context
def logout(ctx: click.Context, everywhere: bool) -> None:
    """Forget the local session and cached credentials."""
    config = config_of(ctx)
    if everywhere:
        from agentkeys.client import flow

        with failures():
            flow.Client(config).revoke_everywhere(config.session("logout")["session_jwt"])
        click.echo("every session of the account is revoked", err=True)
    forget(config)
    click.echo(f"signed out: {config.home.path} holds no session or credentials", err=True)


def forget(config: ClientConfig) -> None:
    config.home.remove(SESSION)
    shutil.rmtree(config.home.path / "credentials", ignore_errors=True)


@main.group(epilog=EXIT_CODES)
def identities() -> None:
    """Link another identity to this account, or unlink one."""


@identities.command(name="link", epilog=EXIT_CODES)
@click.option("--email", help="Link this address (a magic link is sent to it).")
@click.option("--provider", help="Link the identity at this OAuth2 provider.")
@click.option("--no-browser", is_flag=True, help="Print the sign-in URL; never open a browser.")
@click.pass_context
def link(ctx: click.Context, email: str | None, provider: str | None, no_browser: bool) -> None:
    """Prove another identity (a sign-in with it) and link it: either then recovers the account."""
    one_way_to_sign_in(email, provider)
    from agentkeys.client import flow

    config = config_of(ctx)
    with failures():
        session = config.session("link")
        client = flow.Client(config)
        proof = sign_in(client, email, provider, no_browser)
        linked = client.link_identity(session["session_jwt"], str(proof["session_jwt"]))
    click.echo(
        f"linked {linked['identity_type']} {linked['identity_value']} to {linked['account']}"
    )


@identities.command(name="unlink", epilog=EXIT_CODES)
@click.argument("identity_type")
@click.argument("value")
@click.pass_context
def unlink(ctx: click.Context, identity_type: str, value: str) -> None:
    """Unlink an identity. This revokes every session of the account, this one too."""
    from agentkeys.client import flow

    config = config_of(ctx)
    with failures():
        flow.Client(config).unlink_identity(
            config.session("unlink")["session_jwt"], identity_type, value
        )
    forget(config)
    click.echo(
        f"unlinked {identity_type} {value}; every session was revoked: run `agentkeys init`",
        err=True,
    )


@main.command(epilog=EXIT_CODES)
@click.option("--role-arn", help=ROLE_HELP)
@click.option(
    "--duration", type=DURATION, default=3600, show_default=True, help="Seconds (900-43200)."
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Port of the endpoint on 127.0.0.1 (0: a free one).",
)
@click.option(
    "--web-identity-token-file",
    "token_file",
    type=click.Path(dir_okay=False),
    help="Also keep a fresh OIDC token in this file, for SDKs that call STS themselves.",
)
@click.option(
    "--no-container", is_flag=True, help="No endpoint: only the --web-identity-token-file."
)
@click.option(
    "--refresh-at",
    type=click.FloatRange(0.001, 0.9),
    default=0.5,
    show_default=True,
    help="Renew a token or credentials once this share of their life has passed.",
)
@click.pass_context
def serve(
    ctx: click.Context,
    role_arn: str | None,
    duration: int,
    port: int,
    token_file: str | None,
    no_container: bool,
    refresh_at: float,
) -> None:
    """Keep credentials fresh for long-running agents until SIGTERM. Export the lines it prints:
    AWS_CONTAINER_CREDENTIALS_FULL_URI and AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE (an endpoint
    on 127.0.0.1 that SDKs fetch credentials from), and with --web-identity-token-file
    AWS_WEB_IDENTITY_TOKEN_FILE, AWS_ROLE_ARN and AWS_ROLE_SESSION_NAME (the SDK calls STS with
    the token; it takes these over the endpoint when both are set)."""
    import shlex
    from pathlib import Path

    config = config_of(ctx, role_arn=role_arn)
    if not config.role_arn:
        raise click.UsageError("no role: give --role-arn or set AGENTKEYS_ROLE_ARN")
    if no_container and token_file is None:
        raise click.UsageError("--no-container leaves nothing to serve without a token file")
    path = Path(token_file).absolute() if token_file else None
    if path is not None and not path.parent.is_dir():
        raise click.UsageError(f"no folder {path.parent} for --web-identity-token-file")
    from agentkeys.client import serve as daemon

    def announce(exports: dict[str, str]) -> None:
        click.echo("\n".join(f"export {k}={shlex.quote(v)}" for k, v in exports.items()))

    with failures():
        daemon.run(
            config,
            config.role_arn,
            duration,
            announce=announce,
            port=port,
            token_file=path,
            container=not no_container,
            refresh_at=refresh_at,
        )


if __name__ == "__main__":
    main()
