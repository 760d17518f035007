"""Identity types and canonical values (PROTOCOL §1). Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass

from agentkeys.crypto import normalize_address, omni
from agentkeys.errors import InvalidEmail, InvalidRequest

EMAIL = "email"
EVM = "evm"
OAUTH2_PREFIX = "oauth2_"

# RFC 5322 dot-atom local part (ASCII only), LDH domain labels with at least one dot.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_EMAIL = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*@{_LABEL}(?:\.{_LABEL})+\Z")
_PROVIDER = re.compile(r"[a-z0-9]+\Z")


@dataclass(frozen=True)
class Identity:
    type: str
    value: str

    def omni(self, client_id: str) -> str:
        return omni(self.type, self.value, client_id)


def canonical_email(raw: str) -> str:
    """Trimmed, lowercased, strict ASCII local@domain of at most 254 characters."""
    trimmed = raw.strip()
    email = trimmed.lower()
    # ASCII is checked before lowercasing: str.lower() turns KELVIN SIGN (U+212A) into "k".
    if len(email) > 254 or not trimmed.isascii() or not _EMAIL.match(email):
        raise InvalidEmail("email must be a plain address like name@example.com")
    return email


def mailbox(email: str) -> str:
    """The mailbox a canonical address delivers to, for counting: `me+tag@x` is `me@x`."""
    local, _, domain = email.rpartition("@")
    return f"{local.split('+', 1)[0] or local}@{domain}"


def canonical_identity(identity_type: str, value: str) -> Identity:
    """The canonical form of an identity as a client names it (URL paths, link requests)."""
    if identity_type == EMAIL:
        return Identity(EMAIL, canonical_email(value))
    if identity_type == EVM:
        return Identity(EVM, normalize_address(value))
    provider = identity_type.removeprefix(OAUTH2_PREFIX)
    if (
        identity_type.startswith(OAUTH2_PREFIX)
        and _PROVIDER.match(provider)
        and 0 < len(value) <= 255
        and value.isprintable()  # OIDC: sub is ASCII; never NUL, controls or surrogates
    ):
        return Identity(identity_type, value)
    raise InvalidRequest(f"unknown identity type {identity_type[:40]!r} or bad value")
