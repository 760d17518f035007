"""`agentkeys serve`: the daemon for long-running agents (../shared/reference/aws-credentials.md
§2 and §3). A container-credentials endpoint on 127.0.0.1 that botocore's ContainerProvider
reads, and a web identity token file for SDKs that call STS themselves. Each is renewed in a
thread well before it expires and served as it is while the broker is down. The standard
library's HTTP server: one local client, no framework."""

from __future__ import annotations

import base64
import hmac
import json
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from agentkeys.client import flow
from agentkeys.client.cache import write_atomic
from agentkeys.client.config import ClientConfig
from agentkeys.client.credentials import Credentials
from agentkeys.client.errors import ClientError, Untrusted

HOST = "127.0.0.1"
PATH = "/credentials"
FIRST_BACKOFF, MAX_BACKOFF = 1.0, 60.0  # seconds between failed renewals, doubling
MIN_WAIT = 1.0  # never renew more often than this, whatever a token claims
STOP_WAIT = 5.0  # how long a stopping daemon waits for a renewal under way
SERVE = "serve"

Sleep = Callable[[float], Any]


def log(message: str) -> None:
    """One line on stderr. Callers pass no token, key or session: only names and times."""
    print(f"agentkeys serve: {message}", file=sys.stderr, flush=True)


def rfc3339(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


class Renewable(Protocol):
    what: str

    @property
    def expires(self) -> float: ...

    def renew(self) -> float:
        """Fetch a new one; the seconds it lives."""


class HeldCredentials:
    """The role's credentials the endpoint hands out."""

    what = "credentials"

    def __init__(self, config: ClientConfig, role_arn: str, duration: int, sleep: Sleep) -> None:
        self.config, self.role_arn, self.duration, self.sleep = config, role_arn, duration, sleep
        self.current: Credentials | None = None

    @property
    def expires(self) -> float:
        return self.current.expiration if self.current else 0.0

    def valid(self) -> Credentials | None:
        found = self.current
        return found if found is not None and found.expiration > time.time() else None

    def renew(self) -> float:
        verb = "refreshed" if self.current else "got"
        self.current = renew_credentials(
            self.config, self.role_arn, self.duration, self.current, self.sleep
        )
        log(f"{verb} credentials for {self.role_arn}, expire {self.current.expiration_rfc3339}")
        return self.current.expiration - time.time()


def renew_credentials(
    config: ClientConfig, role_arn: str, duration: int, held: Credentials | None, sleep: Sleep
) -> Credentials:
    """Credentials in place of `held` (None at first): newer ones another process cached, else
    minted, under the CLI's lock and into its cache."""
    newer_than = 0 if held is None else held.expiration
    return flow.fresh_credentials(config, role_arn, duration, newer_than=newer_than, sleep=sleep)


class TokenFile:
    """A fresh OIDC token in `path`, for AWS_WEB_IDENTITY_TOKEN_FILE."""

    what = "the web identity token"

    def __init__(self, config: ClientConfig, path: Path, sleep: Sleep) -> None:
        self.config, self.path, self.sleep = config, path, sleep
        self.expires = 0.0

    def renew(self) -> float:
        verb = "refreshed" if self.expires else "wrote"
        token = flow.Client(self.config, sleep=self.sleep).oidc_token(self.config.session())
        issued, expires = token_times(token)
        # As is, no newline: botocore sends the file's content verbatim. Atomic and 0600: an
        # SDK may read it at any moment, and nobody else may.
        write_atomic(self.path, token.encode())
        self.expires = expires
        log(f"{verb} the web identity token in {self.path}, expires {rfc3339(expires)}")
        return expires - issued


def token_times(token: str) -> tuple[int, int]:
    """The token's iat and exp, read without verifying it: only to time the renewal (STS is
    the one that verifies it)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        issued, expires = int(claims["iat"]), int(claims["exp"])
    except (IndexError, KeyError, TypeError, ValueError):
        raise Untrusted(flow.MINT, "the minted token carries no iat and exp") from None
    if expires <= issued:
        raise Untrusted(flow.MINT, "the minted token expires before it is issued")
    return issued, expires


class Keeper(threading.Thread):
    """Renews one thing once `share` of its life has passed; while that fails, again after 1,
    2, 4 … 60 seconds, the current one staying in place. Until `stop` is set."""

    def __init__(self, thing: Renewable, life: float, share: float, stop: threading.Event) -> None:
        super().__init__(name=f"agentkeys serve: {thing.what}", daemon=True)
        self.thing, self.wait, self.share, self.stop = thing, share * life, share, stop

    def run(self) -> None:
        backoff = FIRST_BACKOFF
        while not self.stop.wait(max(self.wait, MIN_WAIT)):
            try:
                self.wait, backoff = self.share * self.thing.renew(), FIRST_BACKOFF
            except Exception as exc:  # a daemon outlives a bad minute: the broker may be back
                if self.stop.is_set():
                    return  # cut short by stopping, not a failure
                until = rfc3339(self.thing.expires)
                log(
                    f"could not refresh {self.thing.what} ({describe(exc)}); retrying in "
                    f"{backoff:g} s, keeping the current one (expires {until})"
                )
                self.wait, backoff = backoff, min(2 * backoff, MAX_BACKOFF)


def describe(exc: Exception) -> str:
    """What failed, without the exception's arguments (a file error could quote anything)."""
    if isinstance(exc, ClientError):
        return exc.line().removeprefix("agentkeys: ")
    return type(exc).__name__


class Endpoint(ThreadingHTTPServer):
    """The container-credentials endpoint: GET PATH with the token as Authorization."""

    def __init__(self, port: int, held: HeldCredentials) -> None:
        # Loopback only: the credentials never leave this machine.
        super().__init__((HOST, port), Handler)
        self.held = held
        # 256 random bits, as aws-vault: any local process or web page can reach the port.
        self.token = secrets.token_urlsafe(32)


class Handler(BaseHTTPRequestHandler):
    server: Endpoint

    def do_GET(self) -> None:
        given = self.headers.get("Authorization", "").encode("latin-1")
        # Constant time, so how long a refusal takes says nothing about how close a guess was.
        if not hmac.compare_digest(given, self.server.token.encode()):
            log("refused a request without the endpoint's token")
            self.answer(
                401, {"message": "send the token from AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"}
            )
            return
        if urlsplit(self.path).path != PATH:
            self.answer(404, {"message": f"credentials are at {PATH}"})
            return
        found = self.server.held.valid()
        if found is None:
            self.answer(503, {"message": "the credentials expired and could not be renewed"})
            return
        self.answer(
            200,
            {
                "AccessKeyId": found.access_key_id,
                "SecretAccessKey": found.secret_access_key,
                "Token": found.session_token,
                "Expiration": found.expiration_rfc3339,
                "RoleArn": self.server.held.role_arn,
            },
        )

    def answer(self, status: int, body: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")  # credentials: never kept by a proxy
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """No request log: the renewals are what is worth reading."""


def run(
    config: ClientConfig,
    role_arn: str,
    duration: int,
    *,
    announce: Callable[[dict[str, str]], None],
    port: int = 0,
    token_file: Path | None = None,
    container: bool = True,
    refresh_at: float = 0.5,
) -> None:
    """Fetch the first credentials and token (a ClientError if that fails), `announce` the
    variables to export, then keep them fresh until SIGTERM or SIGINT."""
    stop = threading.Event()
    handlers = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    keepers: list[Keeper] = []
    endpoint: Endpoint | None = None
    token_path: Path | None = None
    exports: dict[str, str] = {}
    try:
        if container:
            held = HeldCredentials(config, role_arn, duration, stop.wait)
            try:
                endpoint = Endpoint(port, held)
            except OSError as exc:
                raise ClientError(
                    SERVE, f"cannot listen on {HOST}:{port}: {exc.strerror}"
                ) from None
            threading.Thread(
                target=endpoint.serve_forever, name="agentkeys serve", daemon=True
            ).start()
            keepers.append(Keeper(held, held.renew(), refresh_at, stop))
            token_path = config.home.ensure() / f"container-token-{endpoint.server_port}"
            # No newline: botocore refuses a token with CR or LF. 0600: it is the key.
            write_atomic(token_path, endpoint.token.encode())
            exports |= {
                "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"http://{HOST}:{endpoint.server_port}{PATH}",
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token_path),
            }
        if token_file is not None:
            tokens = TokenFile(config, token_file, stop.wait)
            try:
                keepers.append(Keeper(tokens, tokens.renew(), refresh_at, stop))
            except OSError as exc:
                raise ClientError(SERVE, f"cannot write {token_file}: {exc.strerror}") from None
            exports |= {
                "AWS_WEB_IDENTITY_TOKEN_FILE": str(token_file),
                "AWS_ROLE_ARN": role_arn,
                "AWS_ROLE_SESSION_NAME": flow.role_session_name(config.session()["wallet"]),
            }
        for keeper in keepers:
            keeper.start()
        announce(exports)
        stop.wait()
        log("stopping")
    finally:
        stop.set()
        if endpoint is not None:
            endpoint.shutdown()
            endpoint.server_close()
        if token_path is not None:
            token_path.unlink(missing_ok=True)
        for keeper in keepers:
            if keeper.is_alive():
                keeper.join(STOP_WAIT)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
