"""Schemathesis over every operation of /openapi.json, against the broker under gunicorn on
loopback: no 5xx, and every response has a documented status, content type, headers and body.

Bearer-protected operations get real sessions: an identity session by the magic-link dance
(through a real SMTP server), a wallet session by a bound SIWE challenge signed by /dev."""

from __future__ import annotations

import collections
import itertools
import re
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import pytest
import requests
import schemathesis
from aiosmtpd.controller import Controller
from flask import Response
from schemathesis import AuthContext, Case
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from agentkeys.blueprints.openapi import build_document, served_by_default
from tests.broker import Broker, broker_env
from tests.conftest import MakeApp
from tests.live import free_port, gunicorn
from tests.smtp import Recorder, Server, magic_link_token

EMAIL = "fuzz@example.com"
ISSUER = "http://127.0.0.1:8000"  # the document's server; the calls go to the live broker
# Far above what one run sends, so the fuzzer is not answered 429 only (test_ratelimit.py
# tests the limits themselves).
RATE_LIMITS = ",".join(
    f"{name}=100000/60" for name in ("email_address", "email_ip", "start_ip", "verify_ip")
)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# About 20 examples per operation in the fuzzing phase, from a fixed seed and no example
# database, so every run sends the same requests; the coverage phase adds its boundary cases.
CONFIG = schemathesis.Config.from_dict(
    {"seed": 20260511, "generation": {"max-examples": 20, "database": "none"}}
)
PLACEHOLDER = "session-of-kind-"


class SessionNames:
    """The auth hook: marks each case with a session its operation's security accepts, taking
    the alternatives in turn (none, where that is one). A mark, not a token: the coverage phase
    builds its cases at collection, before the broker runs; `Sessions.fill` swaps in a live one."""

    def __init__(self) -> None:
        self.turn = itertools.count()

    def get(self, case: Case[Any], ctx: AuthContext) -> str | None:
        options = [
            next(iter(option), None) for option in case.operation.definition.raw.get("security", [])
        ]
        if not options:
            return None
        return options[next(self.turn) % len(options)]

    def set(self, case: Case[Any], data: str, ctx: AuthContext) -> None:
        case.headers["Authorization"] = f"Bearer {PLACEHOLDER}{data}"


class Sessions:
    """Live sessions of one account: an identity session and a wallet session, signed in again
    after a call that revokes them all; a poll token of a real sign-in request."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.tokens: dict[str, str] = {}
        self.answered: dict[str, set[int]] = collections.defaultdict(set)  # with a live session

    def current(self) -> dict[str, str]:
        if not self.tokens:
            self.tokens = self.sign_in()
        return self.tokens

    def sign_in(self) -> dict[str, str]:
        """The magic-link dance, then a bound SIWE sign-in signed by /dev: the bodies the
        fuzzer cannot reach (it knows no mailed token), each checked against the document."""
        self.broker.mailbox.recorder.envelopes.clear()
        started = self.answer(202, "POST", "/v1/auth/email/request", {"email": EMAIL})
        token = magic_link_token(self.broker.mailbox.recorder.message())
        self.answer(200, "POST", "/v1/auth/email/verify", {"token": token})
        status = f"/v1/auth/email/status/{started['request_id']}"
        verified = self.answer(200, "GET", status, token=started["poll_token"])
        assert verified["status"] == "verified"
        consumed = self.answer(200, "GET", status, token=started["poll_token"])
        assert consumed == {"status": "consumed"}
        identity, account = verified["session_jwt"], verified["account"]
        body = {"omni_account": account}
        address = self.answer(200, "POST", "/dev/derive-address", body, identity)["address"]
        challenge = self.answer(
            200, "POST", "/v1/auth/wallet/start", {"address": address}, identity
        )
        body = {"omni_account": account, "message_hex": challenge["siwe_message"].encode().hex()}
        signed = self.answer(200, "POST", "/dev/sign-message", body, identity)
        body = {"request_id": challenge["request_id"], "signature": signed["signature"]}
        wallet = self.answer(200, "POST", "/v1/auth/wallet/verify", body)
        polled = self.answer(202, "POST", "/v1/auth/email/request", {"email": EMAIL})
        status = f"/v1/auth/email/status/{polled['request_id']}"
        assert self.answer(200, "GET", status, token=polled["poll_token"]) == {"status": "pending"}
        return {
            "identitySession": identity,
            "walletSession": wallet["session_jwt"],
            "pollToken": polled["poll_token"],
        }

    def answer(
        self,
        status: int,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        token: str | None = None,
    ) -> Any:
        """One call of the broker, its status and body checked against the document."""
        if method == "GET":
            response = self.broker.get(path, token)
        else:
            response = self.broker.post(path, body, token)
        assert response.status_code == status, response.text
        template = re.sub(r"/status/[^/]+$", "/status/{request_id}", path)
        schema[template][method].validate_response(response)
        return response.json()

    def fill(self, case: Case[Any]) -> bool:
        """Swap the auth hook's mark for a live token of that kind; whether there was one."""
        header = case.headers.get("Authorization", "")
        if not header.startswith(f"Bearer {PLACEHOLDER}"):
            return False
        kind = header.removeprefix(f"Bearer {PLACEHOLDER}")
        case.headers["Authorization"] = f"Bearer {self.current()[kind]}"
        if case.operation.path == "/v1/sessions/revoke":
            self.tokens = {}  # this call ends every session of the account so far
        return True


# The document as the app builds it; the live broker must serve the same (checked below).
schema = schemathesis.openapi.from_dict(build_document(ISSUER, served_by_default()), config=CONFIG)
schema.auth(refresh_interval=None, retry_on=[])(SessionNames)


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sessions]:
    """The broker under gunicorn (2 workers, SQLite, development, the dev signer), mailing to
    a real SMTP server on loopback, and live sessions of one account on it."""
    recorder, smtp_port = Recorder(), free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    database = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'fuzz.sqlite3'}"
    mailbox = Server(smtp_port, recorder)
    env = broker_env(base, database, mailbox, AGENTKEYS_RATE_LIMITS=RATE_LIMITS)
    try:
        with gunicorn(env, workers=2, port=port):
            yield Sessions(Broker(base, mailbox))
    finally:
        controller.stop()


def test_the_broker_serves_the_fuzzed_document(sessions: Sessions) -> None:
    served = requests.get(f"{sessions.broker.base}/openapi.json", timeout=15).json()
    assert served == build_document(sessions.broker.base, served_by_default())
    assert served["paths"] == schema.raw_schema["paths"]


@schema.parametrize()
def test_every_operation_answers_as_documented(case: Case[Any], sessions: Sessions) -> None:
    authenticated = sessions.fill(case)
    response = case.call_and_validate(base_url=sessions.broker.base, checks=CHECKS)
    if authenticated and case.method.upper() == case.operation.method.upper():
        sessions.answered[case.operation.label].add(response.status_code)


def test_the_fuzzer_got_past_the_bearer_checks(sessions: Sessions) -> None:
    """The auth hook's sessions were live (this runs after the fuzz test, in file order): a
    success, or a 403 that comes only after the session check (§5), on each of these."""
    past = [
        ("GET /v1/identities", 200),
        ("POST /v1/sessions/revoke", 204),
        ("POST /v1/wallet/link", 202),
        ("POST /v1/auth/wallet/start", 200),
        ("POST /v1/mint-oidc-jwt", 200),  # a wallet session
        ("POST /v1/mint-oidc-jwt", 403),  # an identity session: wallet_session_required
        ("POST /dev/derive-address", 403),  # another account's anchor: forbidden
        ("POST /dev/sign-message", 403),
    ]
    assert [(label, code) for label, code in past if code not in sessions.answered[label]] == []
    assert len(sessions.answered) == 11  # every protected operation got sessions


def _not_json() -> Response:
    return Response('{"status": "ok"}', mimetype="text/plain")


def _fails() -> NoReturn:
    raise RuntimeError("a bug")


@pytest.mark.parametrize(
    ("view", "codes"),
    [
        (lambda: {"status": "fine"}, {"ST108"}),  # the body breaks its schema
        (lambda: ({"status": "ok"}, 201), {"ST103"}),  # an undocumented status
        (_not_json, {"ST105"}),  # an undocumented content type
        (_fails, {"ST101", "ST103"}),  # a 500
    ],
)
def test_the_checks_catch_a_broken_answer(
    make_app: MakeApp, view: Callable[[], Any], codes: set[str]
) -> None:
    """The fuzz test can fail: the same checks, on a case of the same document, refuse an app
    whose /healthz answers wrong (in process, so the view can be swapped)."""
    app = make_app()
    app.view_functions["health.healthz"] = view
    case = schema["/healthz"]["GET"].Case()
    with pytest.raises(FailureGroup) as caught:
        case.call_and_validate(app=app, checks=CHECKS)
    assert {failure.code for failure in caught.value.exceptions} == codes
    app.view_functions["health.healthz"] = lambda: {"status": "ok"}
    case.call_and_validate(app=app, checks=CHECKS)  # and pass a right one
