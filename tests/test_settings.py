"""Settings read once from the environment: defaults, strict parsing, production refusals."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from agentkeys.errors import ConfigError
from agentkeys.settings import Secret, Settings, parse_bool

SECRET_HEX = "0f" * 32
PROD = {
    "AGENTKEYS_ISSUER": "https://keys.example.com",
    "AGENTKEYS_MAIL_URL": "smtp://mx:25",
    "AGENTKEYS_KEY_ENCRYPTION_KEY": "5e" * 32,
}
DEV = {"AGENTKEYS_ENV": "development"}


def test_development_defaults(tmp_path) -> None:
    settings = Settings.from_env(DEV, instance_path=tmp_path)
    assert settings.env == "development"
    assert settings.issuer == "http://127.0.0.1:8000"
    assert settings.database_url == f"sqlite:///{tmp_path.resolve()}/agentkeys.sqlite3"
    assert settings.dev_master_secret is None
    assert settings.mail_url == "console://"
    assert settings.mail_from == "AgentKeys <noreply@localhost>"
    assert settings.client_id == "agentkeys"
    assert settings.siwe_chain_ids == (1,)
    assert settings.allowed_signing_domains == ("127.0.0.1:8000",)
    assert (settings.identity_session_ttl, settings.wallet_session_ttl, settings.oidc_ttl) == (
        86400,
        900,
        300,
    )
    assert settings.oidc_audience == "sts.amazonaws.com"
    assert settings.max_body_bytes == 65536
    assert settings.trusted_proxies == 0
    assert settings.redis_url is None and settings.session_jwks_url is None


def test_env_defaults_to_production_which_requires_issuer() -> None:
    with pytest.raises(ConfigError, match="AGENTKEYS_ISSUER is required in production"):
        Settings.from_env({})
    settings = Settings.from_env(PROD)
    assert settings.is_production
    assert settings.allowed_signing_domains == ("keys.example.com",)


def test_production_requires_mail_url_and_kek() -> None:
    with pytest.raises(ConfigError, match="AGENTKEYS_MAIL_URL is required"):
        Settings.from_env({"AGENTKEYS_ISSUER": "https://keys.example.com"})
    without_kek = {k: v for k, v in PROD.items() if k != "AGENTKEYS_KEY_ENCRYPTION_KEY"}
    with pytest.raises(ConfigError, match="AGENTKEYS_KEY_ENCRYPTION_KEY is required in production"):
        Settings.from_env(without_kek)
    with pytest.raises(ConfigError, match="AGENTKEYS_KEY_ENCRYPTION_KEY must be 64 hex"):
        Settings.from_env({**PROD, "AGENTKEYS_KEY_ENCRYPTION_KEY": "5e" * 16})
    with pytest.raises(ConfigError, match="development only"):
        Settings.from_env({**PROD, "AGENTKEYS_MAIL_URL": "console://"})


def test_master_secret_parsed_and_hidden() -> None:
    for raw in (SECRET_HEX, "0x" + SECRET_HEX, SECRET_HEX.upper()):
        settings = Settings.from_env({**DEV, "DEV_KEY_SERVICE_MASTER_SECRET": raw})
        assert settings.dev_master_secret is not None
        assert settings.dev_master_secret.reveal() == bytes.fromhex(SECRET_HEX)
        shown = repr(settings) + str(settings) + repr(dataclasses.asdict(settings))
        assert SECRET_HEX not in shown.lower() and "Secret('**********')" in shown


@pytest.mark.parametrize(
    "raw", ["0f" * 31, "0f" * 33, "zz" * 32, "0x" + "0f" * 31, "0X" + SECRET_HEX, "0f" * 16 + " x"]
)
def test_malformed_master_secret_refused_without_echo(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**DEV, "DEV_KEY_SERVICE_MASTER_SECRET": raw})
    message = str(info.value)
    assert "DEV_KEY_SERVICE_MASTER_SECRET" in message and "\n" not in message
    assert raw not in message and raw.strip() not in message


def test_empty_master_secret_means_disabled() -> None:
    settings = Settings.from_env({**DEV, "DEV_KEY_SERVICE_MASTER_SECRET": ""})
    assert settings.dev_master_secret is None


def test_production_rejects_dev_master_secret() -> None:
    with pytest.raises(ConfigError, match="production builds reject"):
        Settings.from_env({**PROD, "DEV_KEY_SERVICE_MASTER_SECRET": SECRET_HEX})


@pytest.mark.parametrize(
    ("issuer", "production"),
    [
        ("http://keys.example.com", True),
        ("https://keys.example.com:8443", True),
        ("https://keys.example.com/", True),
        ("https://keys.example.com/path", False),
        ("https://keys.example.com?x=1", False),
        ("https://user@keys.example.com", False),
        ("ftp://keys.example.com", False),
        ("keys.example.com", False),
    ],
)
def test_issuer_rules(issuer: str, production: bool) -> None:
    env = {**(PROD if production else DEV), "AGENTKEYS_ISSUER": issuer}
    with pytest.raises(ConfigError, match="AGENTKEYS_ISSUER"):
        Settings.from_env(env)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AGENTKEYS_ENV", "staging"),
        ("AGENTKEYS_OIDC_TTL", "59"),
        ("AGENTKEYS_OIDC_TTL", "3601"),
        ("AGENTKEYS_OIDC_TTL", "5m"),
        ("AGENTKEYS_MAX_BODY_BYTES", "-1"),
        ("AGENTKEYS_TRUSTED_PROXIES", "one"),
        ("AGENTKEYS_SIWE_CHAIN_IDS", "1,x"),
        ("AGENTKEYS_SIWE_CHAIN_IDS", "0"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({**DEV, name: value})


def test_lists_and_numbers() -> None:
    settings = Settings.from_env(
        {
            **DEV,
            "AGENTKEYS_SIWE_CHAIN_IDS": "10, 1",
            "AGENTKEYS_SIGNER_ALLOWED_DOMAINS": "a.example, b.example:8443",
            "AGENTKEYS_OIDC_TTL": "3600",
        }
    )
    assert settings.siwe_chain_ids == (10, 1)
    assert settings.allowed_signing_domains == ("a.example", "b.example:8443")
    assert settings.oidc_ttl == 3600


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("ON", True),
        ("1", True),
        ("yes", True),
        ("false", False),
        ("0", False),
        ("Off", False),
        ("no", False),
    ],
)
def test_parse_bool_strict(raw: str, expected: bool) -> None:
    assert parse_bool("X", raw) is expected


@pytest.mark.parametrize("raw", ["", "2", "y", "enabled", "nope", "truthy"])
def test_parse_bool_rejects_everything_else(raw: str) -> None:
    with pytest.raises(ConfigError, match="X must be one of"):
        parse_bool("X", raw)


def test_settings_frozen() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.env = "production"  # type: ignore[misc]


def test_secret_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    secret = Secret(bytes.fromhex(SECRET_HEX))
    logging.getLogger("t").warning("settings: %s %r", secret, Settings(dev_master_secret=secret))
    assert SECRET_HEX not in caplog.text and "**********" in caplog.text


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://app:pw-s3cr3t-marker@db:5432/keys", "postgresql://app:***@db:5432/keys"),
        ("redis://:pw-s3cr3t-marker@cache:6379/0", "redis://:***@cache:6379/0"),
        ("smtps://me@example.com:pw-s3cr3t-marker@mx:465", "smtps://me@example.com:***@mx:465"),
        ("smtp://mailer:pw%40s3cr3t-marker@mx", "smtp://mailer:***@mx"),
        # Unencoded "@" or "/" in the password: nothing of it shows.
        ("postgresql://app:pw@s3cr3t-marker@db/keys", "postgresql://app:***@db/keys"),
        ("redis://:pw-s3cr3t-marker/x@cache", "redis://:***@cache"),
        ("postgresql://app@db:5432/keys", "postgresql://app@db:5432/keys"),
        ("sqlite:////srv/keys.sqlite3", "sqlite:////srv/keys.sqlite3"),
    ],
)
def test_url_passwords_hidden_from_repr(
    url: str, shown: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(database_url=url, mail_url=url, redis_url=url)
    assert settings.database_url == settings.mail_url == settings.redis_url == url  # still usable
    logging.getLogger("t").warning("settings: %s %r", settings, settings)
    assert str(settings) == repr(settings)
    assert repr(settings).startswith("Settings(env='development', issuer=")
    assert repr(settings).count(f"='{shown}'") == 3 and caplog.text.count(f"='{shown}'") == 6
    assert "s3cr3t-marker" not in repr(settings) + caplog.text


def test_url_passwords_hidden_from_repr_of_settings_from_env() -> None:
    settings = Settings.from_env(
        {
            **PROD,
            "DATABASE_URL": "postgres://app:pw-s3cr3t-marker@db/keys",
            "AGENTKEYS_MAIL_URL": "smtp+starttls://mailer:pw-s3cr3t-marker@mx",
            "AGENTKEYS_REDIS_URL": "rediss://default:pw-s3cr3t-marker@cache:6380",
        }
    )
    shown = repr(settings)
    assert "s3cr3t-marker" not in shown
    assert "'postgres://app:***@db/keys'" in shown and "'rediss://default:***@cache:6380'" in shown
    assert "mail_url='smtp+starttls://mailer:***@mx'" in shown


@pytest.mark.parametrize(
    ("names", "refused"),
    [
        (("GOOG", "GOOGLE"), True),  # oauth2_goog is a prefix of oauth2_google
        (("GOOGLE", "GOOGLEX"), True),
        (("A", "AB", "ABC"), True),
        (("GOOGLE", "GITHUB"), False),
        (("GOOGLE", "XGOOGLE"), False),  # a suffix is harmless: the types differ at once
    ],
)
def test_provider_names_that_would_collide_in_omni_are_refused(
    names: tuple[str, ...], refused: bool
) -> None:
    environ = dict(DEV)
    for name in names:
        environ[f"AGENTKEYS_OAUTH2_{name}_CLIENT_ID"] = "client"
        environ[f"AGENTKEYS_OAUTH2_{name}_ISSUER"] = "https://idp.example"
    if not refused:
        assert len(Settings.from_env(environ).oauth2_providers) == len(names)
        return
    with pytest.raises(ConfigError, match="must not be prefixes of each other"):
        Settings.from_env(environ)
