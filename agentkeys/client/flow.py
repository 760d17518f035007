"""The daemon flow, seed steps 1-7, as plain functions over the wire protocol (PROTOCOL §5, §6):
sign in, derive, link, a bound SIWE challenge signed by the signer, verify, mint, and STS.
No terminal here: the CLI and the server mode print."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from agentkeys.client.cache import SESSION
from agentkeys.client.config import ClientConfig
from agentkeys.client.credentials import Credentials, cached
from agentkeys.client.errors import (
    NotSignedIn,
    Refused,
    StsRefused,
    Unreachable,
    Untrusted,
)
from agentkeys.client.http import Api
from agentkeys.crypto import normalize_address, to_checksum_address
from agentkeys.errors import AgentKeysError, SiweError
from agentkeys.siwe import SiweMessage

if TYPE_CHECKING:
    from agentkeys.client.attest import Attestor

SIGN_IN, DERIVE, LINK = "step 1 (sign-in)", "step 2 (derive)", "step 3 (link)"
CHALLENGE, SIGN, VERIFY, MINT = (
    "step 4 (challenge)",
    "step 5 (sign)",
    "step 6 (verify)",
    "step 7 (mint)",
)
STS = "STS"
POLL_SECONDS = 2.0
MAX_SIGNABLE = timedelta(hours=1)


@dataclass(frozen=True)
class Started:
    """A sign-in waiting for the person: what to show them and what to poll."""

    request_id: str
    poll_token: str
    poll_url: str
    user_code: str
    expires_at: float
    authorization_url: str | None = None


class Client:
    """The broker and the signer, as the daemon sees them."""

    def __init__(self, config: ClientConfig, *, sleep: Callable[[float], None] = time.sleep):
        """With AGENTKEYS_TEE_ROOT_CERT set the signer is attested before anything is sent to it,
        and each of its answers must carry the attested key's signature (PROTOCOL §7)."""
        self.config = config
        self.broker = Api(config.broker_url, sleep=sleep)
        policy = config.tee_policy()
        self.attestor: Attestor | None = None
        if policy is None:
            self.signer = Api(config.signer_url, session=self.broker.http, sleep=sleep)
        else:
            from agentkeys.client.attest import Attestor

            fetch = Api(config.signer_url, session=self.broker.http, sleep=sleep)
            self.attestor = attestor = Attestor(policy, fetch)
            self.signer = Api(
                config.signer_url,
                session=self.broker.http,
                sleep=sleep,
                before=attestor.attest,
                check=attestor.check,
            )
        self.sleep = sleep

    # -- step 1: sign in ------------------------------------------------------------------------

    def start_email(self, email: str) -> Started:
        body = self.broker.post(SIGN_IN, "/v1/auth/email/request", {"email": email})
        return _started(body)

    def start_oauth2(self, provider: str) -> Started:
        body = self.broker.post(SIGN_IN, "/v1/auth/oauth2/start", {"provider": provider})
        return _started(body)

    def wait(self, started: Started, tick: Callable[[float], None] | None = None) -> dict[str, Any]:
        """Poll until the person approves; the verified status body. Stops at once on `failed`
        or expiry with the reason; `tick(seconds_left)` before each poll."""
        while True:
            left = started.expires_at - time.time()
            if left <= 0:
                raise Refused(
                    SIGN_IN, "the sign-in request expired before it was approved", "expired"
                )
            if tick is not None:
                tick(left)
            status = self.broker.get(SIGN_IN, started.poll_url, started.poll_token)
            state = status.get("status")
            if state == "verified":
                return status
            if state == "failed":
                raise Refused(
                    SIGN_IN, str(status.get("reason") or "sign-in failed"), status.get("error")
                )
            if state == "consumed":
                raise Refused(SIGN_IN, "this sign-in was already picked up elsewhere", "consumed")
            self.sleep(min(POLL_SECONDS, max(left, 0.1)))

    # -- steps 2 and 3 ----------------------------------------------------------------------------

    def derive_address(self, session: str, account: str) -> str:
        """The account's wallet (EIP-55), from the signer."""
        with _identity_session(DERIVE):
            body = self.signer.post(DERIVE, "/derive-address", {"omni_account": account}, session)
        return _checksum(DERIVE, body.get("address"))

    def link_wallet(self, session: str, address: str) -> str:
        with _identity_session(LINK):
            body = self.broker.post(
                LINK,
                "/v1/wallet/link",
                {"identity_type": "evm", "identity_value": address},
                session,
            )
        return str(body.get("status"))

    # -- steps 4 to 7 -----------------------------------------------------------------------------

    def wallet_session(self, session: str, account: str, address: str) -> dict[str, Any]:
        """A bound challenge, checked before anything signs it, signed by the signer and
        verified: the wallet session body (steps 4-6)."""
        with _identity_session(CHALLENGE):
            challenge = self.broker.post(
                CHALLENGE, "/v1/auth/wallet/start", {"address": address}, session
            )
        message = str(challenge.get("siwe_message", ""))
        check_challenge(
            message, broker_url=self.config.broker_url, address=address, account=account
        )
        body = {"omni_account": account, "message_hex": message.encode().hex()}
        with _identity_session(SIGN):
            signed = self.signer.post(SIGN, "/sign-message", body, session)
        # The signer must sign with the account's own wallet, the one we derived.
        if _checksum(SIGN, signed.get("address")) != address:
            raise Untrusted(SIGN, "the signer answered for another address than the derived one")
        verified = self.broker.post(
            VERIFY,
            "/v1/auth/wallet/verify",
            {"request_id": challenge.get("request_id"), "signature": signed.get("signature")},
            replay=False,  # the first verify consumes the challenge, whatever its outcome
        )
        if (
            verified.get("account") != account
            or _checksum(VERIFY, verified.get("wallet_address")) != address
        ):
            raise Untrusted(VERIFY, "the broker signed in another account or wallet")
        return verified

    def mint(self, wallet_session: str) -> str:
        body = self.broker.post(MINT, "/v1/mint-oidc-jwt", token=wallet_session)
        return str(body["jwt"])

    def oidc_token(self, session: dict[str, Any]) -> str:
        """Steps 4-7 with the stored identity session: a fresh OIDC token for STS."""
        wallet = self.wallet_session(session["session_jwt"], session["account"], session["wallet"])
        return self.mint(str(wallet["session_jwt"]))

    # -- identities and sign-out ------------------------------------------------------------------

    def identities(self, session: str) -> dict[str, Any]:
        with _identity_session("identities"):
            return self.broker.get("identities", "/v1/identities", session)

    def link_identity(self, session: str, proof: str) -> dict[str, Any]:
        with _identity_session("link"):
            return self.broker.post("link", "/v1/identities/link", {"proof": proof}, session)

    def unlink_identity(self, session: str, identity_type: str, value: str) -> None:
        path = f"/v1/identities/{quote(identity_type, safe='')}/{quote(value, safe='@')}"
        with _identity_session("unlink"):
            self.broker.delete("unlink", path, session)

    def revoke_everywhere(self, session: str) -> None:
        with _identity_session("logout"):
            self.broker.post("logout", "/v1/sessions/revoke", token=session)


def check_challenge(message: str, *, broker_url: str, address: str, account: str) -> SiweMessage:
    """Refuse a challenge before anything signs it unless it is the broker's own, for our
    derived address, bound to our account, and short-lived: a signature is a credential."""
    try:
        siwe = SiweMessage.parse(message)
    except SiweError as exc:
        raise Untrusted(
            CHALLENGE, f"the broker issued a message that is not EIP-4361: {exc.detail}"
        ) from None
    if siwe.domain != urlsplit(broker_url).netloc or siwe.uri != broker_url:
        raise Untrusted(CHALLENGE, f"the challenge is for {siwe.domain!r}, not this broker")
    if siwe.address != address:
        raise Untrusted(CHALLENGE, "the challenge is for another address than the derived one")
    if f"urn:agentkeys:account:{account}" not in (siwe.resources or ()):
        raise Untrusted(CHALLENGE, "the challenge is not bound to this account")
    expires, now = siwe.expiration_datetime, datetime.now(UTC)
    if expires is None or expires <= now or expires > now + MAX_SIGNABLE:
        raise Untrusted(CHALLENGE, "the challenge does not expire within the hour")
    return siwe


def role_session_name(wallet: str) -> str:
    """`agentkeys-<wallet hex>`: 50 characters of [\\w+=,.@-], and never an email (CloudTrail)."""
    return f"agentkeys-{wallet.lower().removeprefix('0x')}"


def assume_role(
    config: ClientConfig, token: str, *, role_arn: str, duration: int, wallet: str
) -> Credentials:
    """AssumeRoleWithWebIdentity, unsigned: the OIDC token is the only credential."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError
    from botocore.exceptions import ClientError as BotoError

    quiet_wire_logs()
    sts = boto3.client(
        "sts",
        region_name=config.region or "us-east-1",
        endpoint_url=config.sts_endpoint_url,
        config=Config(signature_version=UNSIGNED, retries={"mode": "standard", "max_attempts": 3}),
    )
    try:
        answer = sts.assume_role_with_web_identity(
            RoleArn=role_arn,
            RoleSessionName=role_session_name(wallet),
            WebIdentityToken=token,
            DurationSeconds=duration,
        )
    except BotoError as exc:
        error = exc.response.get("Error", {})
        raise StsRefused(STS, str(error.get("Message") or "refused"), error.get("Code")) from None
    except BotoCoreError as exc:
        raise Unreachable(STS, f"STS did not answer ({type(exc).__name__})") from None
    found = answer["Credentials"]
    return Credentials(
        found["AccessKeyId"],
        found["SecretAccessKey"],
        found["SessionToken"],
        int(found["Expiration"].timestamp()),
    )


def quiet_wire_logs() -> None:
    """botocore logs whole request and response bodies at DEBUG, and here those hold the OIDC
    token and the AWS secret: keep those two loggers at INFO or above, whatever the caller set."""
    for name in ("botocore.endpoint", "botocore.parsers"):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.INFO:
            logger.setLevel(logging.INFO)


def fresh_credentials(
    config: ClientConfig,
    role_arn: str,
    duration: int = 3600,
    *,
    newer_than: int = 0,
    sleep: Callable[[float], None] = time.sleep,
) -> Credentials:
    """Credentials for `role_arn`: from the cache, or minted once under a lock however many
    processes ask at the same moment (the others wait and take the cached ones). A daemon
    renewing early passes `newer_than`, the expiry of what it holds."""

    name = config.credentials_name(role_arn, duration)

    def usable() -> Credentials | None:
        found = cached(config.home, name)
        return found if found is not None and found.expiration > newer_than else None

    found = usable()
    if found is not None:
        return found
    with config.home.lock(name):
        found = usable()
        if found is not None:
            return found
        session = config.session()
        token = Client(config, sleep=sleep).oidc_token(session)
        credentials = assume_role(
            config, token, role_arn=role_arn, duration=duration, wallet=session["wallet"]
        )
        config.home.write(name, credentials.to_json())
        return credentials


def save_session(config: ClientConfig, status: dict[str, Any], wallet: str) -> str:
    """Keep the identity session (0600, atomic); the path it is kept at."""
    expires = datetime.strptime(str(status["expires_at"]), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    path = config.home.write(
        SESSION,
        {
            "broker_url": config.broker_url,
            "session_jwt": status["session_jwt"],
            "expires_at": int(expires.timestamp()),
            "account": status["account"],
            "omni_account": status["omni_account"],
            "identity_type": status["identity_type"],
            "wallet": wallet,
        },
    )
    return str(path)


@contextlib.contextmanager
def _identity_session(step: str) -> Iterator[None]:
    """A 401 to the identity bearer means it was revoked or expired: sign in again."""
    try:
        yield
    except Refused as exc:
        if exc.status != 401:
            raise
        raise NotSignedIn(
            step, "the session was revoked or has expired; run `agentkeys init` again", exc.code
        ) from None


def _started(body: dict[str, Any]) -> Started:
    return Started(
        request_id=str(body["request_id"]),
        poll_token=str(body["poll_token"]),
        poll_url=str(body["poll_url"]),
        user_code=str(body["user_code"]),
        expires_at=time.time() + float(body["expires_in_seconds"]),
        authorization_url=body.get("authorization_url"),
    )


def _checksum(step: str, address: object) -> str:
    try:
        return to_checksum_address(normalize_address(str(address)))
    except AgentKeysError:
        raise Untrusted(step, "the answer carries no valid address") from None
