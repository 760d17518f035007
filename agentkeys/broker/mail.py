"""Magic-link sign-in mail (PROTOCOL §6.1): build it, and deliver it by SMTP or to the console.

Pure standard library. The link carries a single-use sign-in token, so it is a secret: it goes
into the mail and nowhere else (no logs, no error details), like the SMTP password.
"""

from __future__ import annotations

import contextlib
import html
import logging
import smtplib
import ssl
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Literal, TextIO
from urllib.parse import unquote, urlsplit

from agentkeys.errors import ConfigError, MailError
from agentkeys.settings import Secret

log = logging.getLogger(__name__)

MAIL_URL_VAR = "AGENTKEYS_MAIL_URL"
SUBJECT = "Your AgentKeys sign-in link"

Scheme = Literal["smtp", "smtp+starttls", "smtps", "console"]
DEFAULT_PORTS: dict[Scheme, int] = {"smtp": 25, "smtp+starttls": 587, "smtps": 465}
_URL_SHAPE = (
    f"{MAIL_URL_VAR} must be smtp://, smtp+starttls:// or smtps:// [user:password@]host[:port] "
    "(user and password percent-encoded), or console://"
)


@dataclass(frozen=True)
class MailTransport:
    """Where mail goes, parsed from AGENTKEYS_MAIL_URL; the password is never shown by repr."""

    scheme: Scheme
    host: str = ""
    port: int = 0
    user: str | None = None
    password: Secret | None = None

    @property
    def address(self) -> str:
        """host:port for logs and error details (brackets around an IPv6 literal)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_mail_url(url: str) -> MailTransport:
    """Parse AGENTKEYS_MAIL_URL; errors name the variable and never echo the URL (it may hold a
    password)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:  # bad port or bracketed host; its message would echo the URL
        raise ConfigError(_URL_SHAPE) from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{MAIL_URL_VAR} must have no path, query or fragment")
    if parts.scheme == "console":
        if parts.netloc:
            raise ConfigError(f"{MAIL_URL_VAR}=console:// takes no host")
        return MailTransport(scheme="console")
    scheme = next((s for s in DEFAULT_PORTS if s == parts.scheme), None)
    if scheme is None or not parts.hostname:
        raise ConfigError(_URL_SHAPE)
    if port == 0:
        raise ConfigError(f"{MAIL_URL_VAR} port must be from 1 to 65535")
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    if (user is None) != (password is None) or "" in (user, password):
        raise ConfigError(f"{MAIL_URL_VAR} must give both user and password, or neither")
    if user is not None and password is not None and not (user + password).isascii():
        # smtplib encodes AUTH PLAIN/LOGIN credentials as ASCII.
        raise ConfigError(f"{MAIL_URL_VAR} user and password must be ASCII after percent-decoding")
    return MailTransport(
        scheme=scheme,
        host=parts.hostname,
        port=port or DEFAULT_PORTS[scheme],
        user=user,
        password=Secret(password.encode()) if password is not None else None,
    )


def build_sign_in_mail(
    *,
    to: str,
    sender: str,
    link: str,
    user_code: str,
    expires_at: datetime,
    issuer: str,
    now: datetime | None = None,
) -> EmailMessage:
    """The sign-in mail: text/plain and text/html alternatives with the link, the user code and
    the expiry. `now` (default: the current time) is only for the "in N minutes" wording."""
    if expires_at.tzinfo is None or (now is not None and now.tzinfo is None):
        raise ValueError("expires_at and now must be timezone-aware")
    now = now or datetime.now(UTC)
    expires_at = expires_at.astimezone(UTC)
    minutes = max(1, round((expires_at - now).total_seconds() / 60))
    expiry = (
        f"expires at {expires_at:%Y-%m-%d %H:%M} UTC "
        f"(in {minutes} minute{'' if minutes == 1 else 's'})"
    )
    site = urlsplit(issuer).netloc or issuer

    message = EmailMessage()
    message["Subject"] = SUBJECT
    message["From"] = sender
    message["To"] = to
    message["Date"] = format_datetime(now.astimezone(UTC))
    message["Message-ID"] = make_msgid(domain=urlsplit(issuer).hostname or "localhost")
    message.set_content(_plain_body(to, site, link, user_code, expiry))
    message.add_alternative(_html_body(to, site, link, user_code, expiry), subtype="html")
    return message


def _plain_body(to: str, site: str, link: str, user_code: str, expiry: str) -> str:
    return (
        f"Someone asked to sign in to AgentKeys ({site}) as {to}.\n"
        "\n"
        f"Your code: {user_code}\n"
        "Approve only if your terminal shows this code.\n"
        "\n"
        "Open this link and press Approve to sign in:\n"
        "\n"
        f"{link}\n"
        "\n"
        f"The link is single use and {expiry}.\n"
        "If you did not ask to sign in, ignore this mail: nothing happens unless you approve.\n"
    )


def _html_body(to: str, site: str, link: str, user_code: str, expiry: str) -> str:
    # Every interpolated value is escaped (quotes too: the link also sits in an attribute).
    # No scripts and no remote images: nothing in the mail acts or phones home when opened.
    to, site, link, user_code, expiry = map(html.escape, (to, site, link, user_code, expiry))
    return (
        "<!DOCTYPE html>\n"
        '<html><head><meta charset="utf-8"><title>Your AgentKeys sign-in link</title></head>\n'
        '<body style="font-family: sans-serif; line-height: 1.5">\n'
        f"<p>Someone asked to sign in to AgentKeys ({site}) as {to}.</p>\n"
        '<p>Your code: <strong style="font-family: monospace; font-size: 1.4em">'
        f"{user_code}</strong><br>\n"
        "<strong>Approve only if your terminal shows this code.</strong></p>\n"
        f'<p><a href="{link}">Open the sign-in page and press Approve</a></p>\n'
        f"<p>Or copy this link: <code>{link}</code></p>\n"
        f"<p>The link is single use and {expiry}.</p>\n"
        "<p>If you did not ask to sign in, ignore this mail: nothing happens unless you "
        "approve.</p>\n"
        "</body></html>\n"
    )


class MailSender:
    """Delivers mail over the configured transport; network and SMTP failures are MailError."""

    def __init__(
        self,
        transport: MailTransport,
        *,
        timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.transport = transport
        self.timeout = timeout
        self._ssl_context = ssl_context
        self._stream = stream
        if transport.scheme == "smtp" and transport.user is not None:
            log.warning(
                "%s sends the SMTP password unencrypted; use smtp+starttls:// or smtps://",
                MAIL_URL_VAR,
            )

    def send(self, message: EmailMessage) -> None:
        if self.transport.scheme == "console":
            self._write_to_console(message)
            return
        try:
            self._deliver(message)
        except (smtplib.SMTPException, OSError) as error:
            # `from None`: the chained exception could carry server replies or recipients.
            raise MailError(
                f"sending mail via {self.transport.address} failed: {_describe(error)}"
            ) from None
        log.info("mail sent via %s", self.transport.address)

    def _deliver(self, message: EmailMessage) -> None:
        transport = self.transport
        client: smtplib.SMTP
        if transport.scheme == "smtps":
            client = smtplib.SMTP_SSL(
                transport.host, transport.port, timeout=self.timeout, context=self._tls()
            )
        else:
            client = smtplib.SMTP(transport.host, transport.port, timeout=self.timeout)
        try:
            if transport.scheme == "smtp+starttls":
                # Raises SMTPNotSupportedError when the server offers no STARTTLS: never
                # fall back to plain text.
                client.starttls(context=self._tls())
                client.ehlo()
            if transport.user is not None and transport.password is not None:
                client.login(transport.user, transport.password.reveal().decode())
            client.send_message(message)
        finally:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                client.quit()  # the outcome is already decided; QUIT only tidies up
            client.close()

    def _tls(self) -> ssl.SSLContext:
        # The default context verifies the certificate chain and the host name.
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _write_to_console(self, message: EmailMessage) -> None:
        """Development transport: the headers and the plain text (with the link) to the stream."""
        stream = self._stream if self._stream is not None else sys.stdout
        plain = message.get_body(preferencelist=("plain",))
        text = plain.get_content() if isinstance(plain, EmailMessage) else ""
        headers = "".join(f"{name}: {message[name]}\n" for name in ("From", "To", "Subject"))
        stream.write(f"----- mail (console://) -----\n{headers}\n{text}----- end of mail -----\n")
        stream.flush()
        log.info(
            "mail to %s (%s) written to the console; the link is only in the console output",
            message["To"],
            message["Subject"],
        )


def _describe(error: BaseException) -> str:
    """Name the failure without echoing server text, recipients, the message or credentials."""
    name = type(error).__name__
    if isinstance(error, smtplib.SMTPResponseException):
        return f"{name} (server replied {error.smtp_code})"
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        codes = sorted({code for code, _ in error.recipients.values()})
        return f"{name} (server replied {', '.join(map(str, codes))})"
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"{name}: {error.verify_message}"
    if isinstance(error, OSError) and error.strerror:
        return f"{name}: {error.strerror}"
    # Remaining SMTPException / OSError texts are smtplib's or the OS's own fixed messages.
    return f"{name}: {error}" if str(error) else name
