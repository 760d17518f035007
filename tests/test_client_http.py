"""The client's HTTP rules against a real server on loopback that fails on cue: GETs retried on
connection errors and 502/503/504, any call on 429/503 with Retry-After, a POST otherwise only
when it never reached the server, a verify never, and never on another 4xx."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from agentkeys.client.errors import Refused, Unreachable
from agentkeys.client.http import ATTEMPTS, Api
from tests.live import free_port


class Script:
    """What the server answers, one (status, headers, body, delay) per request, then 200."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, dict[str, str], dict[str, Any], float]] = []
        self.seen: list[str] = []

    def fail(self, times: int, status: int, headers: dict[str, str] | None = None) -> None:
        body = {"error": "unavailable", "detail": "try later"}
        self.answers += [(status, headers or {}, body, 0.0)] * times


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            script.seen.append(f"{self.command} {self.path}")
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            status, headers, body, delay = (
                script.answers.pop(0) if script.answers else (200, {}, {"ok": True}, 0.0)
            )
            time.sleep(delay)
            raw = json.dumps(body).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_GET = do_POST = do_DELETE = answer

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}", script
    httpd.shutdown()
    httpd.server_close()


def api(base: str, waits: list[float] | None = None) -> Api:
    return Api(base, sleep=(waits.append if waits is not None else lambda _: None), timeout=(1, 1))


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_get_is_retried_through_two_failures(server: tuple[str, Script], status: int) -> None:
    base, script = server
    script.fail(2, status)
    waits: list[float] = []
    assert api(base, waits).get("step 1 (sign-in)", "/status") == {"ok": True}
    assert script.seen == ["GET /status"] * 3
    assert waits == [0.5, 1.0]  # backing off


def test_a_post_is_not_retried_on_a_bare_503(server: tuple[str, Script]) -> None:
    base, script = server
    script.fail(2, 503)
    with pytest.raises(Refused) as refused:
        api(base).post("step 7 (mint)", "/mint")
    assert refused.value.code == "unavailable" and script.seen == ["POST /mint"]


@pytest.mark.parametrize("status", [429, 503])
def test_any_call_waits_out_retry_after(server: tuple[str, Script], status: int) -> None:
    base, script = server
    script.fail(2, status, {"Retry-After": "2"})
    waits: list[float] = []
    assert api(base, waits).post("step 4 (challenge)", "/start", {"a": 1}) == {"ok": True}
    assert script.seen == ["POST /start"] * 3 and waits == [2.0, 2.0]


def test_a_verify_is_never_replayed(server: tuple[str, Script]) -> None:
    base, script = server
    script.fail(2, 503, {"Retry-After": "1"})
    with pytest.raises(Refused):
        api(base).post("step 6 (verify)", "/verify", {"request_id": "r"}, replay=False)
    assert script.seen == ["POST /verify"]


def test_a_post_that_may_have_arrived_is_not_sent_again(server: tuple[str, Script]) -> None:
    base, script = server
    script.answers.append((200, {}, {"ok": True}, 1.5))  # slower than the 1 s read timeout
    with pytest.raises(Unreachable) as unreachable:
        api(base).post("step 7 (mint)", "/mint")
    assert "timed out" in unreachable.value.line()
    assert script.seen == ["POST /mint"]


def test_a_get_that_timed_out_is_retried(server: tuple[str, Script]) -> None:
    base, script = server
    script.answers.append((200, {}, {"slow": True}, 1.5))
    assert api(base).get("whoami", "/v1/identities") == {"ok": True}
    assert len(script.seen) == 2


def test_a_post_that_never_connected_is_retried() -> None:
    waits: list[float] = []
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    with pytest.raises(Unreachable) as unreachable:
        api(closed, waits).post("step 1 (sign-in)", "/v1/auth/email/request", {"email": "a@b.c"})
    assert len(waits) == ATTEMPTS - 1  # each attempt failed before anything was sent
    assert unreachable.value.line() == (
        f"agentkeys: step 1 (sign-in): {closed} did not answer (connection failed)"
    )
    assert unreachable.value.exit_code == 5


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409])
def test_other_4xx_are_never_retried(server: tuple[str, Script], status: int) -> None:
    base, script = server
    script.fail(1, status)
    with pytest.raises(Refused) as refused:
        api(base).get("whoami", "/v1/identities")
    assert refused.value.status == status and script.seen == ["GET /v1/identities"]
    assert refused.value.line() == "agentkeys: whoami: try later (unavailable)"
    assert refused.value.exit_code == 4
