"""Sign-in mail: URL parsing, the message itself, and delivery to a real SMTP server on loopback."""

from __future__ import annotations

import io
import ipaddress
import logging
import ssl
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from agentkeys.broker.mail import MailSender, MailTransport, build_sign_in_mail, parse_mail_url
from agentkeys.errors import ConfigError, MailError
from tests.live import free_port
from tests.smtp import Recorder, StartServer

TOKEN = "tok_" + "Qx7" * 14
LINK = f"https://keys.example.com/auth/email/landing#t={TOKEN}"
NOW = datetime(2026, 11, 28, 19, 20, tzinfo=UTC)
EXPIRES = NOW + timedelta(minutes=10)
USER, PASSWORD = "mailer@example.com", "hunter2-p@ss:word"


def sign_in_mail(**overrides: Any) -> EmailMessage:
    fields: dict[str, Any] = {
        "to": "alice@example.com",
        "sender": "AgentKeys <noreply@keys.example.com>",
        "link": LINK,
        "user_code": "WDJB-MJHT",
        "expires_at": EXPIRES,
        "issuer": "https://keys.example.com",
        "now": NOW,
    }
    return build_sign_in_mail(**(fields | overrides))


def parts_of(message: EmailMessage) -> tuple[str, str]:
    plain, rich = message.get_body(("plain",)), message.get_body(("html",))
    assert isinstance(plain, EmailMessage) and isinstance(rich, EmailMessage)
    return plain.get_content(), rich.get_content()


# --- AGENTKEYS_MAIL_URL --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port", "user", "password"),
    [
        ("smtp://mx.example.com", "smtp", "mx.example.com", 25, None, None),
        ("smtp://mx.example.com:2525/", "smtp", "mx.example.com", 2525, None, None),
        (
            "smtp+starttls://u:p@Mail.Example.com",
            "smtp+starttls",
            "mail.example.com",
            587,
            "u",
            "p",
        ),
        ("smtps://mail.example.com", "smtps", "mail.example.com", 465, None, None),
        ("smtps://u:p@mail.example.com:1465", "smtps", "mail.example.com", 1465, "u", "p"),
        ("smtp://[::1]:2525", "smtp", "::1", 2525, None, None),
        (
            "smtp+starttls://mailer%40example.com:hunter2-p%40ss%3Aword@smtp.example.com",
            "smtp+starttls",
            "smtp.example.com",
            587,
            USER,
            PASSWORD,
        ),
        ("console://", "console", "", 0, None, None),
    ],
)
def test_parse_mail_url(
    url: str, scheme: str, host: str, port: int, user: str | None, password: str | None
) -> None:
    transport = parse_mail_url(url)
    assert (transport.scheme, transport.host, transport.port, transport.user) == (
        scheme,
        host,
        port,
        user,
    )
    revealed = transport.password.reveal().decode() if transport.password else None
    assert revealed == password


def test_transport_repr_hides_the_password() -> None:
    transport = parse_mail_url(f"smtps://{quote(USER)}:{quote(PASSWORD, safe='')}@mx:465")
    shown = repr(transport) + str(transport)
    assert "Secret('**********')" in shown and USER in shown
    assert PASSWORD not in shown and quote(PASSWORD, safe="") not in shown
    assert transport.address == "mx:465"
    assert MailTransport("smtp", "::1", 25).address == "[::1]:25"


@pytest.mark.parametrize(
    "url",
    [
        "",
        "mx.example.com",
        "http://u:hunter2@mx.example.com",
        "smtp+ssl://u:hunter2@mx.example.com",
        "mailto:hunter2@example.com",
        "smtp://:25",
        "smtp://u:hunter2@",
        "smtp://u:hunter2@:25",
        "smtp://u:hunter2@mx:port",
        "smtp://u:hunter2@mx:0",
        "smtp://u:hunter2@mx:70000",
        "smtp://u:hunter2@[::1",
        "smtp://hunter2@mx",
        "smtp://:hunter2@mx",
        "smtp://u:@mx",
        "smtp://@mx",
        "smtp://u:h%C3%BCnter2@mx",
        "smtp://u:hunter2@mx/path",
        "smtp://u:hunter2@mx?tls=1",
        "smtp://u:hunter2@mx#x",
        "console://hunter2@mx",
    ],
)
def test_bad_mail_url_refused_without_echo(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_mail_url(url)
    detail = str(info.value)
    assert "AGENTKEYS_MAIL_URL" in detail
    assert "hunter2" not in detail and (not url or url not in detail)
    # Nor in the traceback: a chained ValueError from urlsplit would quote the URL.
    assert "hunter2" not in "".join(traceback.format_exception(info.value))


@settings(max_examples=60, deadline=None)
@given(
    user=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20),
    password=st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=30),
)
def test_percent_encoded_credentials_round_trip(user: str, password: str) -> None:
    transport = parse_mail_url(f"smtps://{quote(user, safe='')}:{quote(password, safe='')}@mx")
    assert transport.user == user and transport.password is not None
    assert transport.password.reveal() == password.encode()
    assert (transport.host, transport.port) == ("mx", 465)


# --- the message ----------------------------------------------------------------------------


def test_sign_in_mail_headers_and_parts() -> None:
    message = sign_in_mail()
    assert message["Subject"] == "Your AgentKeys sign-in link"
    assert message["From"] == "AgentKeys <noreply@keys.example.com>"
    assert message["To"] == "alice@example.com"
    assert message["Date"] == "Sat, 28 Nov 2026 19:20:00 +0000"
    assert message["Message-ID"].endswith("@keys.example.com>")
    assert message.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
    expiry = "expires at 2026-11-28 19:30 UTC (in 10 minutes)"
    for body in parts_of(message):
        assert "WDJB-MJHT" in body
        assert "Approve only if your terminal shows this code." in body
        assert "single use" in body and expiry in body
        assert "keys.example.com" in body and "alice@example.com" in body
    plain, rich = parts_of(message)
    assert f"\n{LINK}\n" in plain
    assert f'<a href="{LINK}">' in rich and f"<code>{LINK}</code>" in rich


def test_sign_in_mail_html_escapes_every_value() -> None:
    hostile = {
        "to": '"Eve <x>" <eve@example.com>',
        "link": 'https://keys.example.com/auth/email/landing#t=a"><script>x</script>&b=<i>',
        "user_code": "<b>&\"AB'",
        "issuer": "https://keys.example.com",
    }
    plain, rich = parts_of(sign_in_mail(**hostile))
    assert "<script" not in rich.lower() and "<img" not in rich.lower() and "<i>" not in rich
    assert "&lt;b&gt;&amp;&quot;AB&#x27;" in rich
    escaped_link = (
        "https://keys.example.com/auth/email/landing#t=a&quot;&gt;&lt;script&gt;x"
        "&lt;/script&gt;&amp;b=&lt;i&gt;"
    )
    assert f'<a href="{escaped_link}">' in rich
    assert "eve@example.com" in rich and "<eve@" not in rich and "<x>" not in rich
    assert hostile["link"] in plain and hostile["user_code"] in plain  # plain text is literal


@pytest.mark.parametrize(
    ("expires_in", "wording"),
    [
        (timedelta(minutes=10), "(in 10 minutes)"),
        (timedelta(seconds=599), "(in 10 minutes)"),
        (timedelta(seconds=50), "(in 1 minute)"),
        (timedelta(hours=2), "(in 120 minutes)"),
    ],
)
def test_expiry_wording(expires_in: timedelta, wording: str) -> None:
    plain, _ = parts_of(sign_in_mail(expires_at=NOW + expires_in))
    assert wording in plain


def test_expiry_is_shown_in_utc() -> None:
    plus_one = timezone(timedelta(hours=1))
    plain, _ = parts_of(sign_in_mail(expires_at=EXPIRES.astimezone(plus_one)))
    assert "expires at 2026-11-28 19:30 UTC (in 10 minutes)" in plain


def test_naive_expiry_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        sign_in_mail(expires_at=EXPIRES.replace(tzinfo=None))


def test_header_injection_refused() -> None:
    with pytest.raises(ValueError):
        sign_in_mail(to="alice@example.com\r\nBcc: mallory@example.com")


# --- a real SMTP server on loopback ---------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    server: ssl.SSLContext  # presents the self-signed certificate
    client: ssl.SSLContext  # verifies and trusts exactly that certificate


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A self-signed certificate for 127.0.0.1 (CN and IP SAN), made at test time."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder: Path = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(cert_file))
    return Tls(server=server, client=client)


def accept_only(user: str, password: str) -> Callable[..., AuthResult]:
    """An aiosmtpd authenticator that accepts exactly one user and password."""

    def authenticate(
        server: SMTPServer, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            user.encode(),
            password.encode(),
        )
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd replies 535

    return authenticate


def sender_for(url: str, **options: Any) -> MailSender:
    return MailSender(parse_mail_url(url), timeout=3.0, **options)


def assert_received_sign_in_mail(recorder: Recorder) -> None:
    (envelope,) = recorder.envelopes
    assert envelope.mail_from == "noreply@keys.example.com"
    assert envelope.rcpt_tos == ["alice@example.com"]
    message = recorder.message()
    assert message["Subject"] == "Your AgentKeys sign-in link"
    assert message["To"] == "alice@example.com"
    plain, rich = parts_of(message)
    for body in (plain, rich):
        assert "WDJB-MJHT" in body and "single use" in body
        assert "expires at 2026-11-28 19:30 UTC (in 10 minutes)" in body
    assert LINK in plain and f'href="{LINK}"' in rich


def test_plain_smtp_delivers_the_sign_in_mail(smtp_server: StartServer) -> None:
    server = smtp_server()
    sender_for(f"smtp://127.0.0.1:{server.port}").send(sign_in_mail())
    assert_received_sign_in_mail(server.recorder)
    assert server.recorder.authenticated == [False]


def test_auth_login_with_the_right_password(
    smtp_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = smtp_server(authenticator=accept_only(USER, PASSWORD), auth_require_tls=False)
    url = f"smtp://{quote(USER, safe='')}:{quote(PASSWORD, safe='')}@127.0.0.1:{server.port}"
    with caplog.at_level(logging.INFO, logger="agentkeys.broker.mail"):
        sender_for(url).send(sign_in_mail())
    assert_received_sign_in_mail(server.recorder)
    assert server.recorder.authenticated == [True]
    assert "sends the SMTP password unencrypted" in caplog.text  # loud about plain-text AUTH
    assert PASSWORD not in caplog.text and LINK not in caplog.text and TOKEN not in caplog.text


def test_auth_with_a_wrong_password_is_mail_error(smtp_server: StartServer) -> None:
    server = smtp_server(authenticator=accept_only(USER, PASSWORD), auth_require_tls=False)
    wrong = "not-" + PASSWORD
    url = f"smtp://{quote(USER, safe='')}:{quote(wrong, safe='')}@127.0.0.1:{server.port}"
    with pytest.raises(MailError) as info:
        sender_for(url).send(sign_in_mail())
    assert info.value.code == "mail_failed"
    assert info.value.detail == (
        f"sending mail via 127.0.0.1:{server.port} failed: "
        "SMTPAuthenticationError (server replied 535)"
    )
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert server.recorder.envelopes == []


def test_starttls_with_auth(smtp_server: StartServer, tls: Tls) -> None:
    # require_starttls: the server refuses MAIL in plain text; auth_require_tls is the default.
    server = smtp_server(
        tls_context=tls.server,
        require_starttls=True,
        authenticator=accept_only(USER, PASSWORD),
        auth_required=True,
    )
    url = (
        f"smtp+starttls://{quote(USER, safe='')}:{quote(PASSWORD, safe='')}@127.0.0.1:{server.port}"
    )
    sender_for(url, ssl_context=tls.client).send(sign_in_mail())
    assert_received_sign_in_mail(server.recorder)
    assert server.recorder.authenticated == [True]


def test_starttls_never_falls_back_to_plain_text(smtp_server: StartServer) -> None:
    server = smtp_server()  # offers no STARTTLS
    with pytest.raises(MailError, match="SMTPNotSupportedError"):
        sender_for(f"smtp+starttls://127.0.0.1:{server.port}").send(sign_in_mail())
    assert server.recorder.envelopes == []


def test_smtps_implicit_tls(smtp_server: StartServer, tls: Tls) -> None:
    server = smtp_server(ssl_context=tls.server)
    sender_for(f"smtps://127.0.0.1:{server.port}", ssl_context=tls.client).send(sign_in_mail())
    assert_received_sign_in_mail(server.recorder)


@pytest.mark.parametrize("scheme", ["smtps", "smtp+starttls"])
def test_tls_verifies_the_certificate_by_default(
    smtp_server: StartServer, tls: Tls, scheme: str
) -> None:
    # No ssl_context given: ssl.create_default_context() does not trust the self-signed cert.
    options = {"smtps": {"ssl_context": tls.server}, "smtp+starttls": {"tls_context": tls.server}}
    server = smtp_server(**options[scheme])
    with pytest.raises(MailError, match=r"SSLCertVerificationError: self.signed certificate"):
        sender_for(f"{scheme}://127.0.0.1:{server.port}").send(sign_in_mail())
    assert server.recorder.envelopes == []


def test_connection_refused_is_mail_error_without_secrets() -> None:
    port = free_port()  # nothing listens there
    url = f"smtps://{quote(USER, safe='')}:{quote(PASSWORD, safe='')}@127.0.0.1:{port}"
    with pytest.raises(MailError) as info:
        sender_for(url).send(sign_in_mail())
    assert info.value.detail == (
        f"sending mail via 127.0.0.1:{port} failed: ConnectionRefusedError: Connection refused"
    )
    for secret in (PASSWORD, quote(PASSWORD, safe=""), LINK, TOKEN, "WDJB-MJHT"):
        assert secret not in str(info.value)


# --- console:// (development) ---------------------------------------------------------------


def test_console_writes_the_mail_and_logs_no_link(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="agentkeys.broker.mail"):
        MailSender(parse_mail_url("console://"), stream=stream).send(sign_in_mail())
    shown = stream.getvalue()
    assert "To: alice@example.com" in shown and "Subject: Your AgentKeys sign-in link" in shown
    assert f"\n{LINK}\n" in shown and "WDJB-MJHT" in shown and "single use" in shown
    (record,) = caplog.records
    assert record.levelno == logging.INFO and "alice@example.com" in record.getMessage()
    assert LINK not in caplog.text and TOKEN not in caplog.text


def test_console_defaults_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    MailSender(MailTransport("console")).send(sign_in_mail())
    assert LINK in capsys.readouterr().out
