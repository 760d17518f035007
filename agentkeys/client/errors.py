"""What can go wrong in the client, one exit code per kind (documented in `agentkeys --help`)."""

from __future__ import annotations

EXIT_CODES = """\
Exit codes: 0 ok; 1 unexpected error; 2 usage; 3 not signed in (run `agentkeys init`);
4 refused by the broker or signer; 5 broker, signer or STS unreachable; 6 refused by STS;
7 an answer failed the client's own checks (wrong address, domain or account);
8 the signer failed attestation (AGENTKEYS_TEE_ROOT_CERT, AGENTKEYS_TEE_PCR0)."""


class ClientError(Exception):
    """One line for stderr naming the step and the server's `error` code, and an exit code."""

    exit_code = 1

    def __init__(self, step: str, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.step, self.message, self.code = step, message, code

    def line(self) -> str:
        code = f" ({self.code})" if self.code else ""
        return f"agentkeys: {self.step}: {self.message}{code}"


class NotSignedIn(ClientError):
    exit_code = 3


class Refused(ClientError):
    exit_code = 4

    def __init__(self, step: str, message: str, code: str | None = None, status: int = 0) -> None:
        super().__init__(step, message, code)
        self.status = status


class Unreachable(ClientError):
    exit_code = 5


class StsRefused(ClientError):
    exit_code = 6


class Untrusted(ClientError):
    """The broker or signer answered something the client must not act on."""

    exit_code = 7


class AttestationFailed(ClientError):
    """The TEE signer did not prove its image and response key, or a response of it is not signed
    by that key, or the attestation settings are unusable: nothing it said is acted on."""

    exit_code = 8
