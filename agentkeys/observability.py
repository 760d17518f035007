"""Logs and metrics: JSON log lines carrying the request id, gunicorn's access log in the same
shape, and the broker's Prometheus metrics (requests, latency, sign-ins, signatures, mints)."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from gunicorn.glogging import Logger  # type: ignore[import-untyped]

from agentkeys.requestid import REQUEST_ID_HEADER
from agentkeys.settings import EnvReader, parse_bool

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram

LOG_FORMAT_VAR = "AGENTKEYS_LOG_FORMAT"
METRICS_VAR = "AGENTKEYS_METRICS"
METRICS_DIR_VAR = "PROMETHEUS_MULTIPROC_DIR"
JSON, TEXT = "json", "text"
# The fields of an access line beyond ts, level, logger, message and request_id.
ACCESS_FIELDS = ("method", "path", "status", "duration_ms", "remote")
# gunicorn's text access line: paths only, as query strings carry OAuth2 codes and state
# (magic-link tokens travel in the URL fragment, which never reaches the server). JSON lines
# carry the same fields, by name.
ACCESS_LOG_FORMAT = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms %({x-request-id}o)s'
# C0 and C1 control characters: a decoded path (`/a%0Ab`) must not start a forged log line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_REQUEST_ID_HEADER = REQUEST_ID_HEADER.lower()

# The id of the request this context serves; set and cleared by the broker's request hooks.
current_request_id: ContextVar[str | None] = ContextVar("agentkeys_request_id", default=None)


@dataclass(frozen=True)
class Observability:
    """How this process logs and whether it keeps metrics (tests build it directly)."""

    log_format: str = TEXT
    metrics: bool = False

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, production: bool
    ) -> Observability:
        env = EnvReader(os.environ if environ is None else environ)
        # Production logs go to a pipeline that parses them; development's are read by a person.
        log_format = env.choice(LOG_FORMAT_VAR, (JSON, TEXT), JSON if production else TEXT)
        raw = env.optional(METRICS_VAR)
        # Off unless asked for: the counts tell how busy the service is, so /metrics is served
        # only where the operator scrapes it (and routes it privately, see README).
        return cls(log_format, parse_bool(METRICS_VAR, raw) if raw is not None else False)


# --- logs -------------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id (and an access line's
    fields). json.dumps escapes line breaks and control characters, so a line is one record."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _rfc3339_ms(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or current_request_id.get(),
        }
        entry.update(
            (name, getattr(record, name)) for name in ACCESS_FIELDS if hasattr(record, name)
        )
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def _rfc3339_ms(created: float) -> str:
    """`2026-01-02T03:04:05.678Z`: RFC 3339 in UTC, as elsewhere in AgentKeys, to the ms."""
    moment = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    return moment.replace("+00:00", "Z")


def install_json_logging(stream: TextIO | None = None) -> None:
    """JSON lines on stderr for every logger that propagates to the root (once per process).
    Flask then adds no handler of its own to the app's logger, so app logs come out here."""
    root = logging.getLogger()
    if any(getattr(h, "_agentkeys_json", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._agentkeys_json = True  # type: ignore[attr-defined]
    root.addHandler(handler)


def _printable(value: Any) -> Any:
    if isinstance(value, str):
        return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value)
    return value


class GunicornLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger, text lines: control characters in the path are shown escaped."""

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        found: dict[str, Any] = super().atoms(resp, req, environ, request_time)
        return {key: _printable(value) for key, value in found.items()}


class JsonGunicornLogger(GunicornLogger):
    """gunicorn's error and access logs, and the app's logs, as JSON lines (the access line
    without the query string, which carries OAuth2 codes and state)."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                if getattr(handler, "_gunicorn", False):
                    handler.setFormatter(JsonFormatter())
        install_json_logging()

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        # AGENTKEYS_ACCESS_LOG=off sets no access log: no line to build (nor to write).
        if not self.cfg.accesslog:
            return
        status = int(str(resp.status).split(None, 1)[0])
        method, path = environ.get("REQUEST_METHOD", "-"), environ.get("PATH_INFO", "")
        headers = resp.headers.items() if hasattr(resp.headers, "items") else resp.headers
        request_id = next((v for k, v in headers if k.lower() == _REQUEST_ID_HEADER), None)
        fields = {
            "request_id": request_id,
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(request_time.total_seconds() * 1000, 3),
            "remote": environ.get("REMOTE_ADDR"),
        }
        self.access_log.info("%s %s %s", method, path, status, extra=fields)


# --- metrics ------------------------------------------------------------------------------------

# Sign-in steps by Flask endpoint: (method, the outcome of a 2xx answer).
SIGN_IN_STEPS = {
    "auth.email_request": ("email", "started"),
    "auth.email_verify": ("email", "verified"),
    "auth.oauth2_start": ("oauth2", "started"),
    "auth.oauth2_callback": ("oauth2", "identified"),
    "auth.oauth2_approve": ("oauth2", "verified"),
    "wallet.wallet_start": ("wallet", "started"),
    "wallet.wallet_verify": ("wallet", "verified"),
}
# Signer operations by endpoint: (signer, operation).
SIGNER_OPERATIONS = {
    "dev_key_service.derive_address": ("dev", "derive"),
    "dev_key_service.sign_message": ("dev", "sign"),
}
MINT_ENDPOINT = "wallet.mint_oidc_jwt"
FAILURES = ("failed", "rate_limited", "error")
# Any other method would be a label value a client could invent at will.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"


def outcome(status: int, success: str) -> str:
    """A step's outcome from its HTTP status: refused by the request (4xx), limited, or ours."""
    if status < 400:
        return success
    if status == 429:
        return "rate_limited"
    return "failed" if status < 500 else "error"


def multiprocess_dir() -> str | None:
    """Where gunicorn's workers keep their metric files (config/gunicorn.conf.py sets it)."""
    return os.environ.get(METRICS_DIR_VAR) or None


class Metrics:
    """The broker's counters and latency histogram, labelled only by values from fixed sets
    (endpoint names, methods, statuses, outcomes): never an identity, an address or a path."""

    def __init__(self, signers: tuple[str, ...] = ("dev",)) -> None:
        """`signers`: the enabled ones; a disabled /dev's 503s are requests, not operations."""
        self.signers = signers
        # Imported here: prometheus_client picks its multiprocess mode when first imported, and
        # the gunicorn master imports this module (for its logger) before it sets the directory.
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry: CollectorRegistry = CollectorRegistry()
        registry = self.registry
        self.requests: Counter = Counter(
            "agentkeys_http_requests",
            "HTTP requests by endpoint, method and status.",
            ["endpoint", "method", "status"],
            registry=registry,
        )
        self.duration: Histogram = Histogram(
            "agentkeys_http_request_duration_seconds",
            "Time in the app per request, by endpoint and method.",
            ["endpoint", "method"],
            registry=registry,
        )
        self.sign_ins: Counter = Counter(
            "agentkeys_sign_ins",
            "Sign-in steps by method and outcome.",
            ["method", "outcome"],
            registry=registry,
        )
        self.signatures: Counter = Counter(
            "agentkeys_signatures",
            "Signer operations (derive, sign) by signer and outcome.",
            ["signer", "operation", "outcome"],
            registry=registry,
        )
        self.mints: Counter = Counter(
            "agentkeys_mints", "OIDC token mints by outcome.", ["outcome"], registry=registry
        )
        # Every known series from zero, so rate() and alerts see them before the first event.
        for method, success in SIGN_IN_STEPS.values():
            for name in (success, *FAILURES):
                self.sign_ins.labels(method, name)
        for signer, operation in SIGNER_OPERATIONS.values():
            if signer in signers:
                for name in ("ok", *FAILURES):
                    self.signatures.labels(signer, operation, name)
        for name in ("ok", *FAILURES):
            self.mints.labels(name)

    def observe(self, endpoint: str | None, method: str, status: int, seconds: float) -> None:
        """Count one answered request, by its Flask endpoint: never by its raw path, as each
        404 path would make a new series in memory and in every scrape (a memory attack)."""
        name = endpoint or UNMATCHED
        verb = method if method in METHODS else "other"
        self.requests.labels(name, verb, str(status)).inc()
        self.duration.labels(name, verb).observe(seconds)
        if name in SIGN_IN_STEPS:
            kind, success = SIGN_IN_STEPS[name]
            self.sign_ins.labels(kind, outcome(status, success)).inc()
        elif name in SIGNER_OPERATIONS:
            signer, operation = SIGNER_OPERATIONS[name]
            if signer in self.signers:
                self.signatures.labels(signer, operation, outcome(status, "ok")).inc()
        elif name == MINT_ENDPOINT:
            self.mints.labels(outcome(status, "ok")).inc()

    def exposition(self) -> bytes:
        """The text format; under gunicorn the sum over every worker's files, so a scrape reads
        the same whichever worker answers it."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        path = multiprocess_dir()
        if path is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
