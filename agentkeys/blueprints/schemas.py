"""Marshmallow schemas of every response body, for the OpenAPI document (openapi.py); the
request schemas stay beside their views. Unknown fields are refused, so a body that grows a
field the document does not name fails the fuzz test."""

from __future__ import annotations

from marshmallow import Schema, fields, validate

HEX64 = validate.Regexp(r"^[0-9a-f]{64}$")  # an omni or an anchor (§1)
EIP55 = validate.Regexp(r"^0x[0-9a-fA-F]{40}$")  # checksummed in bodies (§3)
RFC3339_Z = validate.Regexp(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")  # §3
USER_CODE = validate.Regexp(r"^[B-DF-HJ-NP-TV-XZ2-9]{4}-[B-DF-HJ-NP-TV-XZ2-9]{4}$")
IDENTITY_TYPE = validate.Regexp(r"^(email|evm|oauth2_[a-z0-9]+)$")
CODE = validate.Regexp(r"^[a-z0-9_]+$")


class Problem(Schema):
    """RFC 9457 problem+json, the one error body (PROTOCOL §4)."""

    type = fields.String(required=True, validate=validate.Regexp(r"^urn:agentkeys:problem:"))
    title = fields.String(required=True)
    status = fields.Integer(required=True, validate=validate.Range(min=400, max=599))
    detail = fields.String(required=True)
    error = fields.String(required=True, validate=CODE)


class Health(Schema):
    status = fields.String(required=True, validate=validate.Equal("ok"))


class Ready(Schema):
    status = fields.String(required=True, validate=validate.Equal("ready"))


class SignInStarted(Schema):
    """§6.1: what the requester keeps to poll with."""

    request_id = fields.String(required=True)
    poll_token = fields.String(required=True)
    poll_url = fields.String(required=True, validate=validate.Regexp(r"^/v1/auth/email/status/"))
    user_code = fields.String(required=True, validate=USER_CODE)
    expires_in_seconds = fields.Integer(required=True, validate=validate.Range(min=0))


class OAuth2Started(SignInStarted):
    """§6.2: as the email start, plus the provider's authorization URL."""

    poll_url = fields.String(required=True, validate=validate.Regexp(r"^/v1/auth/oauth2/status/"))
    authorization_url = fields.String(required=True)


class Approved(Schema):
    ok = fields.Boolean(required=True, validate=validate.Equal(True))
    user_code = fields.String(required=True, validate=USER_CODE)


class SignInPending(Schema):
    status = fields.String(required=True, validate=validate.Equal("pending"))


class SignInConsumed(Schema):
    status = fields.String(required=True, validate=validate.Equal("consumed"))


class SignInVerified(Schema):
    """The session, handed out once at the first pickup."""

    status = fields.String(required=True, validate=validate.Equal("verified"))
    session_jwt = fields.String(required=True)
    expires_at = fields.String(required=True, validate=RFC3339_Z)
    account = fields.String(required=True, validate=HEX64)
    omni_account = fields.String(required=True, validate=HEX64)
    identity_type = fields.String(required=True, validate=IDENTITY_TYPE)


class SignInFailed(Schema):
    status = fields.String(required=True, validate=validate.Equal("failed"))
    error = fields.String(required=True, validate=CODE)
    reason = fields.String(required=True)


SIGN_IN_STATUSES = (SignInPending, SignInVerified, SignInConsumed, SignInFailed)


class LinkedIdentity(Schema):
    identity_type = fields.String(required=True, validate=IDENTITY_TYPE)
    identity_value = fields.String(required=True)
    linked_at = fields.String(required=True, validate=RFC3339_Z)
    status = fields.String(required=True, validate=validate.OneOf(["linked", "pending_proof"]))


class IdentityList(Schema):
    account = fields.String(required=True, validate=HEX64)
    identities = fields.List(fields.Nested(LinkedIdentity), required=True)


class IdentityLinked(Schema):
    account = fields.String(required=True, validate=HEX64)
    identity_type = fields.String(required=True, validate=IDENTITY_TYPE)
    identity_value = fields.String(required=True)
    linked_at = fields.String(required=True, validate=RFC3339_Z)


class WalletLinked(Schema):
    status = fields.String(required=True, validate=validate.Equal("linked"))


class WalletLinkPending(Schema):
    status = fields.String(required=True, validate=validate.Equal("pending_proof"))


class WalletChallenge(Schema):
    request_id = fields.String(required=True)
    siwe_message = fields.String(required=True)
    nonce = fields.String(required=True, validate=validate.Regexp(r"^[A-Za-z0-9]{16,}$"))
    expires_at = fields.String(required=True, validate=RFC3339_Z)


class WalletSession(Schema):
    session_jwt = fields.String(required=True)
    expires_at = fields.String(required=True, validate=RFC3339_Z)
    account = fields.String(required=True, validate=HEX64)
    omni_account = fields.String(required=True, validate=HEX64)
    wallet_address = fields.String(required=True, validate=EIP55)


class MintedToken(Schema):
    jwt = fields.String(required=True)
    expires_at = fields.String(required=True, validate=RFC3339_Z)
    wallet_address = fields.String(required=True, validate=EIP55)


class DerivedAddress(Schema):
    address = fields.String(required=True, validate=EIP55)
    key_version = fields.Integer(required=True, validate=validate.Equal(1))


class SignedMessage(DerivedAddress):
    signature = fields.String(required=True, validate=validate.Regexp(r"^0x[0-9a-f]{128}1[bc]$"))


class JWK(Schema):
    """A published ES256 verification key (RFC 7517), with its RFC 7638 thumbprint as kid."""

    kty = fields.String(required=True, validate=validate.Equal("EC"))
    crv = fields.String(required=True, validate=validate.Equal("P-256"))
    x = fields.String(required=True)
    y = fields.String(required=True)
    kid = fields.String(required=True)
    use = fields.String(required=True, validate=validate.Equal("sig"))
    alg = fields.String(required=True, validate=validate.Equal("ES256"))


class JWKS(Schema):
    keys = fields.List(fields.Nested(JWK), required=True)


class OpenIDConfiguration(Schema):
    """The OIDC discovery document STS reads (§6.5)."""

    issuer = fields.String(required=True)
    jwks_uri = fields.String(required=True)
    response_types_supported = fields.List(fields.String(), required=True)
    subject_types_supported = fields.List(fields.String(), required=True)
    id_token_signing_alg_values_supported = fields.List(fields.String(), required=True)
    claims_supported = fields.List(fields.String(), required=True)
