"""A real SMTP server on loopback (aiosmtpd) that keeps what it receives."""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session

from tests.live import free_port


@dataclass
class Recorder:
    """aiosmtpd handler that keeps every envelope it accepts."""

    envelopes: list[Envelope] = field(default_factory=list)
    authenticated: list[bool] = field(default_factory=list)

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        self.authenticated.append(bool(session.authenticated))
        return "250 OK"

    def message(self) -> EmailMessage:
        (envelope,) = self.envelopes
        assert isinstance(envelope.content, bytes)
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class Server:
    port: int
    recorder: Recorder


StartServer = Callable[..., Server]


@pytest.fixture
def smtp_server() -> Iterator[StartServer]:
    """Start aiosmtpd on a free 127.0.0.1 port with the given Controller options."""
    controllers: list[Controller] = []

    def start(**options: Any) -> Server:
        recorder, port = Recorder(), free_port()
        controller = Controller(
            recorder, hostname="127.0.0.1", port=port, server_hostname="localhost", **options
        )
        controller.start()
        controllers.append(controller)
        return Server(port, recorder)

    yield start
    for controller in controllers:
        controller.stop()


def magic_link_token(message: EmailMessage) -> str:
    """The token of the sign-in link in a mail's plain-text part."""
    body = message.get_body(preferencelist=("plain",))
    assert body is not None
    match = re.search(r"/auth/email/landing#t=([A-Za-z0-9_-]+)", body.get_content())
    assert match, "no sign-in link in the mail"
    return match.group(1)
