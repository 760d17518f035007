"""Slow clients under the Procfile's web configuration: 32 connections that trickle their
request must not starve `/healthz` or a real sign-in request of the other clients."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import pytest
import requests

from tests.broker import broker_env
from tests.live import gunicorn
from tests.smtp import StartServer

SLOW_CLIENTS = 32
TRICKLE_SECONDS = 0.5  # one byte per connection this often
POLLS, POLL_EVERY, POLL_DEADLINE = 8, 1.25, 3.0  # 8 polls 1.25 s apart: 10 s
HARD_STOP = 60.0  # the tricklers stop by themselves even if the test hangs
BODY_LENGTH = 4000  # never finished: 2 bytes a second for ~12 s
ALICE = {"email": "alice@example.com"}


def request_head(port: int) -> bytes:
    return (
        "POST /v1/auth/email/request HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {BODY_LENGTH}\r\n"
        "\r\n"
    ).encode()


@contextmanager
def tricklers(port: int, trickle: str) -> Iterator[list[int]]:
    """SLOW_CLIENTS sockets on loopback: `body` sends whole headers then one body byte per
    tick; `headers` sends even the headers so. Yields, per tick, how many sockets took a byte."""
    head = request_head(port)
    address = ("127.0.0.1", port)
    sockets = [socket.create_connection(address, timeout=5) for _ in range(SLOW_CLIENTS)]
    pending = {sock: (b"" if trickle == "body" else head) for sock in sockets}
    if trickle == "body":
        for sock in sockets:
            sock.sendall(head)
    stop, sent_per_tick = threading.Event(), []

    def run() -> None:
        deadline = time.monotonic() + HARD_STOP
        while not stop.wait(TRICKLE_SECONDS) and time.monotonic() < deadline:
            sent = 0
            for sock in sockets:
                data = pending[sock]
                byte, pending[sock] = (data[:1], data[1:]) if data else (b" ", b"")
                try:
                    sock.send(byte)  # JSON allows leading whitespace: the body stays valid
                    sent += 1
                except OSError:
                    pass  # the server closed it
            sent_per_tick.append(sent)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield sent_per_tick
    finally:
        stop.set()
        thread.join(timeout=5)
        for sock in sockets:
            sock.close()


def timed(send: Callable[[], requests.Response], expected: int) -> float | str:
    """Seconds a request took to get the expected status, or what went wrong instead."""
    started = time.monotonic()
    try:
        response = send()
    except requests.RequestException as exc:
        return type(exc).__name__
    elapsed = round(time.monotonic() - started, 3)
    return elapsed if response.status_code == expected else str(response.status_code)


@pytest.mark.parametrize("trickle", ["body", "headers"])
def test_slow_clients_do_not_starve_others(
    trickle: str, sqlite_url: str, smtp_server: StartServer
) -> None:
    mailbox = smtp_server()
    with ExitStack() as stack:
        # The Procfile's configuration with WEB_CONCURRENCY's default of 2 workers.
        base = stack.enter_context(gunicorn(broker_env("http://127.0.0.1", sqlite_url, mailbox)))
        port = int(base.rsplit(":", 1)[1])
        healthz, sign_in_url = base + "/healthz", base + "/v1/auth/email/request"
        sent_per_tick = stack.enter_context(tricklers(port, trickle))
        time.sleep(2 * TRICKLE_SECONDS)  # the slow clients are connected and sending
        started, polls = time.monotonic(), []
        for i in range(POLLS):
            time.sleep(max(0.0, started + i * POLL_EVERY - time.monotonic()))
            polls.append(timed(lambda: requests.get(healthz, timeout=POLL_DEADLINE), 200))
        # A real request meanwhile: it needs the database and the SMTP server.
        sign_in = timed(lambda: requests.post(sign_in_url, json=ALICE, timeout=10), 202)
        still_open = sent_per_tick[-1] if sent_per_tick else 0

    on_time = [p for p in polls if isinstance(p, float) and p < POLL_DEADLINE]
    summary = f"polls={polls} sign_in={sign_in} slow clients still sending={still_open}"
    assert len(on_time) == POLLS, summary
    assert isinstance(sign_in, float) and sign_in < POLL_DEADLINE, summary
    assert len(mailbox.recorder.envelopes) == 1, summary
    print(summary)
