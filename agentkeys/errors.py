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


class InvalidEmail(InvalidRequest):
    code = "invalid_email"


class Unauthorized(AgentKeysError):
    """Missing, invalid, expired or revoked credentials."""

    code = "unauthorized"


class Forbidden(AgentKeysError):
    """Authenticated, but this account may not do this."""

    code = "forbidden"


class NotFound(AgentKeysError):
    code = "not_found"


class UnknownRequest(NotFound):
    code = "unknown_request"


class Conflict(AgentKeysError):
    code = "conflict"


class IdentityAlreadyLinked(Conflict):
    code = "identity_already_linked"


class IdentityConflict(Conflict):
    """The identity's omni is the anchor of an account created by another identity."""

    code = "identity_conflict"


class AnchorIdentity(Conflict):
    code = "anchor_identity"


class LastIdentity(Conflict):
    code = "last_identity"


class RateLimited(AgentKeysError):
    code = "rate_limited"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class MailError(AgentKeysError):
    """The SMTP server or the network refused a mail; the detail names host:port, never secrets."""

    code = "mail_failed"


class OAuth2Error(AgentKeysError):
    """An OAuth2/OIDC provider sign-in failed: discovery, code exchange or id_token check."""

    code = "oauth2_failed"


class ChainNotAllowed(InvalidRequest):
    code = "chain_not_allowed"


class ChallengeUsed(Unauthorized):
    code = "challenge_used"


class ChallengeExpired(Unauthorized):
    code = "challenge_expired"


class WrongSigner(Unauthorized):
    """A well-formed signature by another key than the challenge's address."""

    code = "invalid_signature"


class WalletSessionRequired(Forbidden):
    code = "wallet_session_required"


class AttestationError(AgentKeysError):
    """A TEE attestation document that is malformed, unsigned by the pinned root, stale or not
    the expected enclave; `detail` is a one-line reason."""

    code = "attestation_invalid"


class Unavailable(AgentKeysError):
    """Something the service needs is not there now; the client may try again later."""

    code = "unavailable"

    def __init__(self, detail: str, retry_after: int = 30) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class SessionKeysUnavailable(Unavailable):
    """A separate signer cannot fetch the session JWKS, so it checks no session."""

    code = "session_keys_unavailable"


class AuditUnavailable(Unavailable):
    """The TEE worker cannot append to its audit log, so it signs nothing."""

    code = "audit_unavailable"


class AttestationUnavailable(Unavailable):
    """The TEE platform cannot produce an attestation document now."""

    code = "attestation_unavailable"


class DatabaseUnavailable(Unavailable):
    """The database does not answer now: down, unreachable, or no connection free in time."""

    code = "database_unavailable"


class LimitsUnavailable(Unavailable):
    """The rate-limit store (Redis) does not answer, so no limited request is let through."""

    code = "limits_unavailable"
