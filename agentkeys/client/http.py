"""A small JSON client of the broker and the signer: a timeout on every call, and retries only
where they are safe (PROTOCOL §4), and an optional check of every response (the TEE signer's
signatures, §7). Failures raise ClientError subclasses naming the step."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import requests
from urllib3.exceptions import NewConnectionError

from agentkeys.client.errors import Refused, Unreachable

TIMEOUT = (5, 15)  # connect, read (seconds)
ATTEMPTS = 4
BACKOFF = 0.5  # seconds, doubling
MAX_RETRY_AFTER = 30  # a longer Retry-After is reported rather than waited out
RETRY_STATUSES = {502, 503, 504}


class Api:
    """JSON calls to one base URL (the broker, or the signer's)."""

    def __init__(
        self,
        base: str,
        *,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        timeout: tuple[float, float] = TIMEOUT,
        before: Callable[[], object] | None = None,
        check: Callable[[requests.Response], None] | None = None,
    ) -> None:
        """`before` runs before each request is sent (the attestation, once it succeeds a no-op);
        `check` sees every response, retried ones too, before anything of it is used."""
        self.base = base.rstrip("/")
        self.http = session or requests.Session()
        self.sleep, self.timeout = sleep, timeout
        self.before, self.check = before, check

    def get(self, step: str, path: str, token: str | None = None) -> dict[str, Any]:
        return self.call(step, "GET", path, token=token)

    def post(
        self,
        step: str,
        path: str,
        body: dict[str, Any] | None = None,
        token: str | None = None,
        *,
        replay: bool = True,
    ) -> dict[str, Any]:
        return self.call(step, "POST", path, body, token, replay=replay)

    def delete(self, step: str, path: str, token: str | None = None) -> dict[str, Any]:
        return self.call(step, "DELETE", path, token=token)

    def call(
        self,
        step: str,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        token: str | None = None,
        *,
        replay: bool = True,
    ) -> dict[str, Any]:
        """The JSON answer ({} for 204). GETs and DELETEs are retried on connection errors and
        502/503/504; any call on 429/503 with Retry-After; a POST otherwise only when it never
        reached the server; with `replay=False` (a verify) never."""
        return _answer(step, self.send(step, method, path, body, token, replay=replay))

    def send(
        self,
        step: str,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        token: str | None = None,
        *,
        replay: bool = True,
    ) -> requests.Response:
        """The last response, after the retries `call` describes."""
        if self.before is not None:
            self.before()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        idempotent = method in ("GET", "DELETE")
        # A redirect is an answer too: with a check, it is checked rather than followed unseen.
        redirects = self.check is None
        for attempt in range(ATTEMPTS):
            last = attempt == ATTEMPTS - 1 or not replay
            try:
                response = self.http.request(
                    method,
                    self.base + path,
                    json=body,
                    headers=headers,
                    timeout=self.timeout,
                    allow_redirects=redirects,
                )
            except requests.RequestException as exc:
                # A POST is sent again only if it provably never left: the connection failed.
                if last or not (idempotent or _never_sent(exc)):
                    raise Unreachable(
                        step, f"{self.base} did not answer ({_reason(exc)})"
                    ) from None
                self.sleep(BACKOFF * 2**attempt)
                continue
            if self.check is not None:
                self.check(response)
            wait = _retry_after(response)
            if not last and wait is not None:
                self.sleep(wait)
                continue
            if not last and idempotent and response.status_code in RETRY_STATUSES:
                self.sleep(BACKOFF * 2**attempt)
                continue
            return response
        raise AssertionError("unreachable")  # pragma: no cover


def _answer(step: str, response: requests.Response) -> dict[str, Any]:
    if response.status_code == 204:
        return {}
    try:
        data = response.json()
    except ValueError:
        data = None
    # Only a 2xx is an answer: an unfollowed redirect is not one (requests calls 3xx ok).
    if 200 <= response.status_code < 300 and isinstance(data, dict):
        return data
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        detail = str(data.get("detail") or data["error"])
        raise Refused(step, detail, data["error"], response.status_code)
    if response.status_code >= 500:
        raise Unreachable(step, f"the server failed with HTTP {response.status_code}")
    raise Refused(
        step, f"unexpected answer, HTTP {response.status_code}", None, response.status_code
    )


def _retry_after(response: requests.Response) -> float | None:
    if response.status_code not in (429, 503):
        return None
    raw = response.headers.get("Retry-After", "")
    if not raw.isdigit() or int(raw) > MAX_RETRY_AFTER:
        return None
    return float(raw)


def _never_sent(exc: requests.RequestException) -> bool:
    """True when the connection itself failed, so the server cannot have seen the request."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(exc, requests.ConnectionError) and isinstance(reason, NewConnectionError)


def _reason(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed"
    return type(exc).__name__
