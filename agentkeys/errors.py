"""Typed domain errors. Pure code raises these; the HTTP edge maps them to problem responses."""


class AgentKeysError(Exception):
    """Base of every error a client can cause; `code` is the stable wire code (PROTOCOL §4)."""

    code = "error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ConfigError(AgentKeysError):
    """The environment does not describe a valid configuration; the process must not start."""

    code = "config_error"


class InvalidRequest(AgentKeysError):
    code = "invalid_request"


class InvalidOmniAccount(InvalidRequest):
    code = "invalid_omni_account"


class InvalidMessageHex(InvalidRequest):
    code = "invalid_message_hex"


class InvalidAddress(InvalidRequest):
    code = "invalid_address"


class InvalidSignature(InvalidRequest):
    """A signature that is malformed, high-s, or does not recover."""

    code = "invalid_signature"


class SiweError(InvalidRequest):
    """A message that is not strict EIP-4361."""

    code = "invalid_siwe_message"


class MessageNotAllowed(AgentKeysError):
    """The signer's policy refuses to sign this message (PROTOCOL §5)."""

    code = "message_not_allowed"


class SignerDisabled(AgentKeysError):
    """The dev signer is not configured in this process."""

    code = "signer_disabled"
