"""Strict EIP-4361 (Sign-In with Ethereum) messages: parse, validate, format. Pure: no Flask.

Follows the EIP's ABNF exactly, with these decisions where it is silent or loose:

- `Chain ID` is a decimal without leading zeros from 1 to 2**256 - 1 (the EVM's CHAINID word;
  at most 78 digits). "0" and "01" are refused.
- Times are RFC 3339 `date-time`. "T"/"t" and "Z"/"z" are both accepted (RFC 3339 §5.6: ABNF
  literals are case-insensitive). A leap second (second 60) is refused: Python's datetime cannot
  hold it and no issuer needs one. Offsets are Z or ±hh:mm with hh ≤ 23, mm ≤ 59; "-00:00" is
  UTC. A time that falls outside years 1..9999 once moved to UTC is refused.
- The domain is an RFC 3986 authority without userinfo (`user@host` is refused outright) and with
  a non-empty host.
- `statement` absent (None) and present-but-empty ("") are different messages, as in the ABNF;
  so are no `Resources:` section (None) and an empty one (()).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

from agentkeys.crypto import is_checksum_address
from agentkeys.errors import SiweError

# RFC 3986 Appendix A as regex pieces. ASCII classes only, and never re.IGNORECASE: its Unicode
# folding would let U+212A KELVIN SIGN match "k".
_ALPHA = "A-Za-z"
_HEXDIG = "0-9A-Fa-f"
_UNRESERVED = r"A-Za-z0-9\-._~"
_GEN_DELIMS = r":/?#\[\]@"
_SUB_DELIMS = r"!$&'()*+,;="
_PCT_ENCODED = f"%[{_HEXDIG}]{{2}}"
_PCHAR = f"(?:[{_UNRESERVED}{_SUB_DELIMS}:@]|{_PCT_ENCODED})"
_SCHEME = rf"[{_ALPHA}][{_ALPHA}0-9+\-.]*"
_USERINFO = f"(?:[{_UNRESERVED}{_SUB_DELIMS}:]|{_PCT_ENCODED})*"
_DEC_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IPV4_ADDRESS = rf"{_DEC_OCTET}(?:\.{_DEC_OCTET}){{3}}"
_H16 = f"[{_HEXDIG}]{{1,4}}"
_LS32 = f"(?:{_H16}:{_H16}|{_IPV4_ADDRESS})"


def _h16s(n: int) -> str:
    """`n( h16 ":" )` of RFC 3986 §3.2.2."""
    return f"(?:{_H16}:){{{n}}}"


def _head(at_most: int) -> str:
    """`[ *at_most( h16 ":" ) h16 ]`: the part before "::"."""
    return f"(?:(?:{_H16}:){{0,{at_most}}}{_H16})?"


_IPV6_ADDRESS = "(?:" + "|".join([
    f"{_h16s(6)}{_LS32}",
    f"::{_h16s(5)}{_LS32}",
    f"{_head(0)}::{_h16s(4)}{_LS32}",
    f"{_head(1)}::{_h16s(3)}{_LS32}",
    f"{_head(2)}::{_h16s(2)}{_LS32}",
    f"{_head(3)}::{_h16s(1)}{_LS32}",
    f"{_head(4)}::{_LS32}",
    f"{_head(5)}::{_H16}",
    f"{_head(6)}::",
]) + ")"  # fmt: skip
_IPVFUTURE = rf"[vV][{_HEXDIG}]+\.[{_UNRESERVED}{_SUB_DELIMS}:]+"
_IP_LITERAL = rf"\[(?:{_IPV6_ADDRESS}|{_IPVFUTURE})\]"
_REG_NAME = f"(?:[{_UNRESERVED}{_SUB_DELIMS}]|{_PCT_ENCODED})*"
_HOST = f"(?:{_IP_LITERAL}|{_IPV4_ADDRESS}|{_REG_NAME})"
_PORT = "[0-9]*"
_AUTHORITY = f"(?:{_USERINFO}@)?{_HOST}(?::{_PORT})?"
_SEGMENT = f"{_PCHAR}*"
_SEGMENT_NZ = f"{_PCHAR}+"
_PATH_ABEMPTY = f"(?:/{_SEGMENT})*"
_PATH_ABSOLUTE = f"/(?:{_SEGMENT_NZ}(?:/{_SEGMENT})*)?"
_PATH_ROOTLESS = f"{_SEGMENT_NZ}(?:/{_SEGMENT})*"
_HIER_PART = f"(?://{_AUTHORITY}{_PATH_ABEMPTY}|{_PATH_ABSOLUTE}|{_PATH_ROOTLESS}|)"
_QUERY = f"(?:{_PCHAR}|[/?])*"  # fragment has the same grammar

SCHEME_RE = re.compile(_SCHEME)
URI_RE = re.compile(f"{_SCHEME}:{_HIER_PART}(?:\\?{_QUERY})?(?:#{_QUERY})?")
# EIP-4361 `domain`: an authority with the userinfo part left out (checked for first, by "@").
DOMAIN_RE = re.compile(f"(?P<host>{_HOST})(?::{_PORT})?")

# EIP-4361's own rules.
STATEMENT_RE = re.compile(f"[{_UNRESERVED}{_GEN_DELIMS}{_SUB_DELIMS} ]*")
REQUEST_ID_RE = re.compile(f"{_PCHAR}*")
NONCE_RE = re.compile("[A-Za-z0-9]{8,}")
CHAIN_ID_RE = re.compile("[1-9][0-9]*")
MAX_CHAIN_ID = 2**256 - 1  # 78 decimal digits

# RFC 3339 §5.6 `date-time`; ranges are checked by datetime itself.
DATE_TIME_RE = re.compile(
    r"(?P<year>[0-9]{4})-(?P<month>[0-9]{2})-(?P<day>[0-9]{2})[Tt]"
    r"(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})(?:\.(?P<fraction>[0-9]+))?"
    r"(?:[Zz]|(?P<sign>[+-])(?P<offset_hour>[0-9]{2}):(?P<offset_minute>[0-9]{2}))"
)

HEADER_SUFFIX = " wants you to sign in with your Ethereum account:"
_OPTIONAL_LABELS = ("Expiration Time: ", "Not Before: ", "Request ID: ")
_LABELS = ("URI: ", "Version: ", "Chain ID: ", "Nonce: ", "Issued At: ", *_OPTIONAL_LABELS)


def _show(text: str) -> str:
    """A short repr of untrusted text for an error detail."""
    return repr(text) if len(text) <= 60 else repr(text[:57]) + "…"


def _check_uri(label: str, value: str) -> None:
    if not URI_RE.fullmatch(value):
        raise SiweError(f"{label} {_show(value)} is not an RFC 3986 URI")


def _check_domain(domain: str) -> None:
    if "@" in domain:  # "@" can only appear in userinfo
        raise SiweError(f"domain {_show(domain)} carries userinfo, which is not accepted")
    match = DOMAIN_RE.fullmatch(domain)
    if not match:
        raise SiweError(f"domain {_show(domain)} is not an RFC 3986 authority (host[:port])")
    if not match["host"]:
        raise SiweError(f"domain {_show(domain)} has an empty host")


def _check_statement(statement: str) -> None:
    if not STATEMENT_RE.fullmatch(statement):
        bad = next(c for c in statement if not STATEMENT_RE.fullmatch(c))
        raise SiweError(f"statement contains {bad!r}, which EIP-4361 does not allow")


def _check_chain_id(chain_id: str) -> None:
    if not CHAIN_ID_RE.fullmatch(chain_id):
        raise SiweError(
            f"Chain ID {_show(chain_id)} must be a decimal integer ≥ 1 without leading zeros"
        )
    if len(chain_id) > 78 or int(chain_id) > MAX_CHAIN_ID:
        raise SiweError("Chain ID exceeds 2**256 - 1")


def _date_time(label: str, value: str) -> datetime:
    """An RFC 3339 date-time as an aware UTC datetime (fraction truncated to microseconds)."""
    match = DATE_TIME_RE.fullmatch(value)
    if not match:
        raise SiweError(f"{label} {_show(value)} is not an RFC 3339 date-time")
    if match["second"] == "60":
        raise SiweError(f"{label} {_show(value)} is a leap second, which is not accepted")
    offset = timedelta(0)
    if match["sign"]:
        hours, minutes = int(match["offset_hour"]), int(match["offset_minute"])
        if hours > 23 or minutes > 59:
            raise SiweError(f"{label} {_show(value)} has an impossible UTC offset")
        offset = timedelta(hours=hours, minutes=minutes) * (-1 if match["sign"] == "-" else 1)
    fraction = match["fraction"] or ""
    try:
        local = datetime(
            int(match["year"]),
            int(match["month"]),
            int(match["day"]),
            int(match["hour"]),
            int(match["minute"]),
            int(match["second"]),
            int(fraction[:6].ljust(6, "0")),
            tzinfo=timezone(offset),
        )
        return local.astimezone(UTC)
    except (ValueError, OverflowError) as exc:  # Feb 30, month 13, hour 24, year 0, …
        raise SiweError(f"{label} {_show(value)} is not a valid date-time: {exc}") from None


@dataclass(frozen=True)
class SiweMessage:
    """One EIP-4361 message; every field is kept exactly as written, and validated on creation."""

    scheme: str | None
    domain: str
    address: str
    statement: str | None
    uri: str
    version: str
    chain_id: str
    nonce: str
    issued_at: str
    expiration_time: str | None = None
    not_before: str | None = None
    request_id: str | None = None
    resources: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("domain", "address", "uri", "version", "chain_id", "nonce", "issued_at"):
            if not isinstance(getattr(self, name), str):
                raise SiweError(f"{name} must be a string")
        for name in ("scheme", "statement", "expiration_time", "not_before", "request_id"):
            if not isinstance(getattr(self, name), str | None):
                raise SiweError(f"{name} must be a string or None")
        if self.resources is not None and not (
            isinstance(self.resources, tuple) and all(isinstance(r, str) for r in self.resources)
        ):
            raise SiweError("resources must be a tuple of strings or None")

        if self.scheme is not None and not SCHEME_RE.fullmatch(self.scheme):
            raise SiweError(f"scheme {_show(self.scheme)} is not an RFC 3986 scheme")
        _check_domain(self.domain)
        if not is_checksum_address(self.address):
            raise SiweError(
                f"address {_show(self.address)} is not an EIP-55 checksummed address"
                " (0x and 40 hex digits in their exact checksum case)"
            )
        if self.statement is not None:
            _check_statement(self.statement)
        _check_uri("URI", self.uri)
        if self.version != "1":
            raise SiweError(f"Version {_show(self.version)} is not supported; it must be '1'")
        _check_chain_id(self.chain_id)
        if not NONCE_RE.fullmatch(self.nonce):
            raise SiweError("Nonce must be at least 8 ASCII letters or digits")
        _date_time("Issued At", self.issued_at)
        if self.expiration_time is not None:
            _date_time("Expiration Time", self.expiration_time)
        if self.not_before is not None:
            _date_time("Not Before", self.not_before)
        if self.request_id is not None and not REQUEST_ID_RE.fullmatch(self.request_id):
            raise SiweError(f"Request ID {_show(self.request_id)} is not made of RFC 3986 pchar")
        for number, resource in enumerate(self.resources or (), start=1):
            _check_uri(f"resource {number}", resource)

    @classmethod
    def parse(cls, text: str) -> SiweMessage:
        """Parse a message, refusing anything that is not exactly the EIP-4361 ABNF."""
        if "\r" in text:
            raise SiweError("message contains a carriage return; lines end with LF only")
        lines = text.split("\n")
        at = 0  # index of the next line to read

        def take(label: str) -> str:
            nonlocal at
            if at >= len(lines):
                raise SiweError(f"message ends before the {label.rstrip(': ')!r} line")
            line = lines[at]
            if not line.startswith(label):
                raise SiweError(
                    f"line {at + 1}: expected {label.rstrip(': ')!r}, found {_show(line)}"
                )
            at += 1
            return line[len(label) :]

        def blank(what: str) -> None:
            nonlocal at
            if at >= len(lines) or lines[at] != "":
                raise SiweError(f"line {at + 1}: expected the empty line {what}")
            at += 1

        header = lines[0]
        if not header.endswith(HEADER_SUFFIX):
            raise SiweError(f"line 1 must end with {HEADER_SUFFIX!r}")
        origin = header[: -len(HEADER_SUFFIX)]
        scheme, domain = origin.split("://", 1) if "://" in origin else (None, origin)
        if len(lines) < 2:
            raise SiweError("message ends after line 1; expected the address")
        address = lines[1]
        at = 2
        blank("after the address")
        # `[ statement LF ] LF`: a lone empty line means no statement; an empty statement is
        # followed by a second empty line.
        statement: str | None = None
        if at < len(lines) and (lines[at] != "" or lines[at + 1 : at + 2] == [""]):
            statement = lines[at]
            at += 1
        blank("after the statement" if statement is not None else "before 'URI'")
        uri = take("URI: ")
        version = take("Version: ")
        chain_id = take("Chain ID: ")
        nonce = take("Nonce: ")
        issued_at = take("Issued At: ")
        optional: dict[str, str] = {}
        for label in _OPTIONAL_LABELS:
            if at < len(lines) and lines[at].startswith(label):
                optional[label] = take(label)
        resources: tuple[str, ...] | None = None
        if at < len(lines) and lines[at] == "Resources:":
            at += 1
            items: list[str] = []
            while at < len(lines) and lines[at].startswith("- "):
                items.append(lines[at][2:])
                at += 1
            resources = tuple(items)
        if at < len(lines):
            raise SiweError(_describe_extra(lines, at))
        return cls(
            scheme=scheme,
            domain=domain,
            address=address,
            statement=statement,
            uri=uri,
            version=version,
            chain_id=chain_id,
            nonce=nonce,
            issued_at=issued_at,
            expiration_time=optional.get("Expiration Time: "),
            not_before=optional.get("Not Before: "),
            request_id=optional.get("Request ID: "),
            resources=resources,
        )

    def format(self) -> str:
        """The message text, exactly as signed; `SiweMessage.parse(m.format()) == m`."""
        origin = self.domain if self.scheme is None else f"{self.scheme}://{self.domain}"
        lines = [origin + HEADER_SUFFIX, self.address, ""]
        if self.statement is not None:
            lines.append(self.statement)
        lines += [
            "",
            f"URI: {self.uri}",
            f"Version: {self.version}",
            f"Chain ID: {self.chain_id}",
            f"Nonce: {self.nonce}",
            f"Issued At: {self.issued_at}",
        ]
        for label, value in zip(
            _OPTIONAL_LABELS, (self.expiration_time, self.not_before, self.request_id), strict=True
        ):
            if value is not None:
                lines.append(label + value)
        if self.resources is not None:
            lines.append("Resources:")
            lines += [f"- {resource}" for resource in self.resources]
        return "\n".join(lines)

    @property
    def issued_at_datetime(self) -> datetime:
        return _date_time("Issued At", self.issued_at)

    @property
    def expiration_datetime(self) -> datetime | None:
        return (
            None
            if self.expiration_time is None
            else _date_time("Expiration Time", self.expiration_time)
        )

    @property
    def not_before_datetime(self) -> datetime | None:
        return None if self.not_before is None else _date_time("Not Before", self.not_before)

    @property
    def chain_id_int(self) -> int:
        return int(self.chain_id)

    def to_json(self) -> dict[str, object]:
        """Every field as written (absent ones None, resources a list), for logs and the CLI."""
        return {
            "scheme": self.scheme,
            "domain": self.domain,
            "address": self.address,
            "statement": self.statement,
            "uri": self.uri,
            "version": self.version,
            "chain_id": self.chain_id,
            "nonce": self.nonce,
            "issued_at": self.issued_at,
            "expiration_time": self.expiration_time,
            "not_before": self.not_before,
            "request_id": self.request_id,
            "resources": None if self.resources is None else list(self.resources),
        }


def _describe_extra(lines: list[str], at: int) -> str:
    """Why the line at `at` (0-based), left over after a complete message, is an error."""
    line = lines[at]
    if line == "" and at == len(lines) - 1:
        return "message ends with a line break; an EIP-4361 message ends without one"
    for label in (*_LABELS, "Resources:"):
        if line.startswith(label.rstrip(" ")):
            name = label.rstrip(": ")
            return f"line {at + 1}: field {name!r} is out of order, duplicated or malformed"
    return f"line {at + 1}: unexpected {_show(line)} after the end of the message"


def main(argv: list[str] | None = None) -> int:
    """`python -m agentkeys.siwe [FILE]`: check one message; print its fields as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m agentkeys.siwe",
        description=(
            "Parse a strict EIP-4361 message from FILE (or stdin) as UTF-8 and print its fields "
            "as one line of JSON; exit 1 with 'siwe: <reason>' if it is malformed. One trailing "
            "line break is dropped because editors add it; any other trailing text is an error."
        ),
    )
    parser.add_argument("file", nargs="?", metavar="FILE", help="message file (default: stdin)")
    args = parser.parse_args(argv)
    name = args.file or "<stdin>"
    try:
        if args.file is None:
            raw = sys.stdin.buffer.read()
        else:
            with open(args.file, "rb") as handle:
                raw = handle.read()
    except OSError as exc:
        print(f"siwe: cannot read {name}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        print(f"siwe: {name} is not valid UTF-8 (byte {exc.start})", file=sys.stderr)
        return 1
    text = text.removesuffix("\n")
    try:
        message = SiweMessage.parse(text)
    except SiweError as exc:
        print(f"siwe: {exc.detail}", file=sys.stderr)
        return 1
    print(json.dumps(message.to_json()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
