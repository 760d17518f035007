"""Typed, frozen settings read once from the environment (PROTOCOL §8)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

from agentkeys.errors import ConfigError

DEVELOPMENT = "development"
PRODUCTION = "production"
MASTER_SECRET_VAR = "DEV_KEY_SERVICE_MASTER_SECRET"  # noqa: S105  (a name, not a secret)
KEK_VAR = "AGENTKEYS_KEY_ENCRYPTION_KEY"

_HEX_SECRET = re.compile(r"(0x)?[0-9a-fA-F]{64}\Z")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
# The password of scheme://user:password@host; it runs to the last "@", as urllib reads it.
_URL_PASSWORD = re.compile(r"(://[^:/]*:).*@", re.DOTALL)


class Secret:
    """A secret value that `repr`, `str`, logs and tracebacks never show."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # secrets are not dict keys


def redact_url(url: str) -> str:
    """The URL with its password shown as ***: `postgresql://app:***@db/keys`."""
    return _URL_PASSWORD.sub(r"\1***@", url, count=1)


@dataclass(frozen=True)
class Limit:
    count: int
    seconds: int


DEFAULT_LIMITS = {
    "email_address": Limit(5, 900),
    "email_ip": Limit(60, 60),
    "start_ip": Limit(60, 60),
    "verify_ip": Limit(120, 60),
}
LIMITS_VAR = "AGENTKEYS_RATE_LIMITS"


def parse_limits(raw: str | None) -> dict[str, Limit]:
    """`name=count/seconds,…` over the defaults, e.g. `email_address=3/600`."""
    limits = dict(DEFAULT_LIMITS)
    for item in filter(None, (part.strip() for part in (raw or "").split(","))):
        name, _, spec = item.partition("=")
        count, _, seconds = spec.partition("/")
        # isascii: str.isdigit() also accepts superscripts and other scripts' digits.
        digits = spec.isascii() and count.isdigit() and seconds.isdigit()
        if name not in DEFAULT_LIMITS or not digits:
            raise ConfigError(
                f"{LIMITS_VAR} takes name=count/seconds for {', '.join(DEFAULT_LIMITS)}"
            )
        if int(count) < 1 or not 1 <= int(seconds) <= 86400:
            raise ConfigError(f"{LIMITS_VAR}: counts are ≥ 1 and windows 1 to 86400 seconds")
        limits[name] = Limit(int(count), int(seconds))
    return limits


GOOGLE_ISSUER = "https://accounts.google.com"
_PROVIDER_VAR = re.compile(r"AGENTKEYS_OAUTH2_([A-Z0-9]+)_(ISSUER|CLIENT_ID|CLIENT_SECRET)\Z")


@dataclass(frozen=True)
class OAuth2Provider:
    """One OAuth2/OIDC provider, configured by issuer discovery (§6.2)."""

    name: str  # lowercase; identities are `oauth2_<name>`
    issuer: str
    client_id: str
    client_secret: Secret | None


@dataclass(frozen=True)
class Settings:
    env: str = DEVELOPMENT
    issuer: str = "http://127.0.0.1:8000"
    database_url: str = "sqlite:///instance/agentkeys.sqlite3"
    dev_master_secret: Secret | None = None
    client_id: str = "agentkeys"
    mail_url: str = "console://"
    mail_from: str = "AgentKeys <noreply@localhost>"
    siwe_chain_ids: tuple[int, ...] = (1,)
    signer_allowed_domains: tuple[str, ...] = ()
    identity_session_ttl: int = 86400
    wallet_session_ttl: int = 900
    oidc_ttl: int = 300
    oidc_audience: str = "sts.amazonaws.com"
    max_body_bytes: int = 65536
    trusted_proxies: int = 0
    redis_url: str | None = None
    session_jwks_url: str | None = None
    oauth2_providers: tuple[OAuth2Provider, ...] = ()
    key_encryption_key: Secret | None = None
    rate_limits: dict[str, Limit] = field(default_factory=lambda: dict(DEFAULT_LIMITS))

    def __repr__(self) -> str:
        # DATABASE_URL, AGENTKEYS_MAIL_URL and AGENTKEYS_REDIS_URL may carry a password.
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            shown.append(f"{f.name}={redact_url(value) if isinstance(value, str) else value!r}")
        return f"Settings({', '.join(shown)})"

    def oauth2_provider(self, name: str) -> OAuth2Provider | None:
        return next((p for p in self.oauth2_providers if p.name == name), None)

    @property
    def is_production(self) -> bool:
        return self.env == PRODUCTION

    @property
    def issuer_authority(self) -> str:
        """host[:port] of the issuer: the SIWE domain."""
        return urlsplit(self.issuer).netloc

    @property
    def allowed_signing_domains(self) -> tuple[str, ...]:
        return self.signer_allowed_domains or (self.issuer_authority,)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, instance_path: str | Path = "instance"
    ) -> Settings:
        """Build and validate settings; raise ConfigError naming the variable (never its value)."""
        env = EnvReader(os.environ if environ is None else environ)
        mode = env.choice("AGENTKEYS_ENV", (DEVELOPMENT, PRODUCTION), PRODUCTION)
        prod = mode == PRODUCTION
        default_db = f"sqlite:///{Path(instance_path).resolve() / 'agentkeys.sqlite3'}"
        settings = cls(
            env=mode,
            issuer=env.text("AGENTKEYS_ISSUER", None if prod else "http://127.0.0.1:8000"),
            database_url=env.text("DATABASE_URL", default_db),
            dev_master_secret=_hex_secret(MASTER_SECRET_VAR, env.optional(MASTER_SECRET_VAR)),
            client_id=env.text("AGENTKEYS_CLIENT_ID", "agentkeys"),
            mail_url=env.text("AGENTKEYS_MAIL_URL", None if prod else "console://"),
            mail_from=env.text("AGENTKEYS_MAIL_FROM", "AgentKeys <noreply@localhost>"),
            siwe_chain_ids=env.int_list("AGENTKEYS_SIWE_CHAIN_IDS", (1,)),
            signer_allowed_domains=env.text_list("AGENTKEYS_SIGNER_ALLOWED_DOMAINS"),
            identity_session_ttl=env.integer(
                "AGENTKEYS_IDENTITY_SESSION_TTL", 86400, 60, 30 * 86400
            ),
            wallet_session_ttl=env.integer("AGENTKEYS_WALLET_SESSION_TTL", 900, 60, 86400),
            oidc_ttl=env.integer("AGENTKEYS_OIDC_TTL", 300, 60, 3600),
            oidc_audience=env.text("AGENTKEYS_OIDC_AUDIENCE", "sts.amazonaws.com"),
            max_body_bytes=env.integer("AGENTKEYS_MAX_BODY_BYTES", 65536, 1024, 16 * 1024 * 1024),
            trusted_proxies=env.integer("AGENTKEYS_TRUSTED_PROXIES", 0, 0, 10),
            redis_url=env.optional("AGENTKEYS_REDIS_URL"),
            session_jwks_url=env.optional("AGENTKEYS_SESSION_JWKS_URL"),
            oauth2_providers=env.oauth2_providers(),
            key_encryption_key=_hex_secret(KEK_VAR, env.optional(KEK_VAR)),
            rate_limits=parse_limits(env.optional(LIMITS_VAR)),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        """Cross-field rules; production refuses dev-only parts."""
        check_issuer(self.issuer, self.is_production)
        if self.is_production and self.dev_master_secret is not None:
            # The dev signer keeps the master secret in plain process memory: never in production.
            raise ConfigError(
                f"{MASTER_SECRET_VAR} is set while AGENTKEYS_ENV=production: "
                "production builds reject the dev key service"
            )
        _check_identity_types(self.oauth2_providers)
        for provider in self.oauth2_providers:
            # Discovery, JWKS and the code exchange must not be open to tampering in transit.
            if self.is_production and not provider.issuer.startswith("https://"):
                name = f"AGENTKEYS_OAUTH2_{provider.name.upper()}_ISSUER"
                raise ConfigError(f"{name} must be https in production")
        if self.is_production and self.key_encryption_key is None:
            # Signing keys live in the database; production must never keep them in plaintext.
            raise ConfigError(f"{KEK_VAR} is required in production (it seals the signing keys)")
        if self.is_production and self.mail_url.startswith("console:"):
            raise ConfigError("AGENTKEYS_MAIL_URL=console:// is for development only")


def parse_bool(name: str, raw: str) -> bool:
    """Strict boolean: true/false/1/0/yes/no/on/off, anything else is an error (never truthy)."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name} must be one of true/false/1/0/yes/no/on/off")


class EnvReader:
    """Typed readers over an environment mapping; errors name the variable, never its value."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def optional(self, name: str) -> str | None:
        value = self._environ.get(name, "").strip()
        return value or None

    def text(self, name: str, default: str | None) -> str:
        value = self.optional(name)
        if value is not None:
            return value
        if default is None:
            raise ConfigError(f"{name} is required in production")
        return default

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.text(name, default)
        if value not in choices:
            raise ConfigError(f"{name} must be one of: {', '.join(choices)}")
        return value

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.optional(name)
        if raw is None:
            return default
        if not raw.isdigit() or not low <= int(raw) <= high:
            raise ConfigError(f"{name} must be a whole number from {low} to {high}")
        return int(raw)

    def text_list(self, name: str) -> tuple[str, ...]:
        raw = self.optional(name) or ""
        return tuple(item.strip() for item in raw.split(",") if item.strip())

    def int_list(self, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
        items = self.text_list(name)
        if not items:
            return default
        if not all(item.isdigit() and 0 < int(item) < 2**53 for item in items):
            raise ConfigError(f"{name} must be a comma-separated list of positive chain ids")
        return tuple(int(item) for item in items)

    def oauth2_providers(self) -> tuple[OAuth2Provider, ...]:
        """Providers named by AGENTKEYS_OAUTH2_<NAME>_CLIENT_ID; `google` has a preset issuer."""
        names = sorted(
            {m[1] for m in map(_PROVIDER_VAR.match, self._environ) if m and m[2] == "CLIENT_ID"}
        )
        providers = []
        for name in names:
            prefix = f"AGENTKEYS_OAUTH2_{name}_"
            issuer = self.text(prefix + "ISSUER", GOOGLE_ISSUER if name == "GOOGLE" else "")
            if not issuer.startswith(("https://", "http://")):
                raise ConfigError(f"{prefix}ISSUER must be the provider's http(s) issuer URL")
            secret = self.optional(prefix + "CLIENT_SECRET")
            providers.append(
                OAuth2Provider(
                    name=name.lower(),
                    issuer=issuer,  # kept exact: the id_token's iss must equal it
                    client_id=self.text(prefix + "CLIENT_ID", ""),
                    client_secret=Secret(secret.encode()) if secret else None,
                )
            )
        return tuple(providers)


def _hex_secret(name: str, raw: str | None) -> Secret | None:
    """A 32-byte secret given as 64 hex characters, optionally 0x-prefixed."""
    if raw is None:
        return None
    if not _HEX_SECRET.match(raw):
        raise ConfigError(f"{name} must be 64 hex characters (optionally 0x-prefixed)")
    return Secret(bytes.fromhex(raw.removeprefix("0x")))


def _check_identity_types(providers: tuple[OAuth2Provider, ...]) -> None:
    """omni joins type and value with no separator: if one identity type were a prefix of
    another (`oauth2_goog`, `oauth2_google`), two people could share one account id."""
    types = ["email", "evm", *(f"oauth2_{p.name}" for p in providers)]
    for short in types:
        for long in types:
            if long != short and long.startswith(short):
                raise ConfigError(
                    f"OAuth2 provider names must not be prefixes of each other: "
                    f"{short!r} and {long!r} (AGENTKEYS_OAUTH2_<NAME>_CLIENT_ID)"
                )


def check_issuer(issuer: str, production: bool) -> None:
    parts = urlsplit(issuer)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("AGENTKEYS_ISSUER must be an absolute http(s) URL")
    if parts.query or parts.fragment or parts.path or parts.username or issuer.endswith("/"):
        raise ConfigError("AGENTKEYS_ISSUER must have no path, query, fragment or trailing '/'")
    # STS fetches discovery over https from the issuer itself; a port or http would not verify.
    if production and (parts.scheme != "https" or parts.port is not None):
        raise ConfigError("AGENTKEYS_ISSUER must be https with no port in production")
