"""agentkeys.siwe: strict EIP-4361 parsing and formatting, cross-checked against eth-account."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import string
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from hypothesis import given, settings
from hypothesis import strategies as st

from agentkeys.crypto import SECP256K1_N, recover_personal, to_checksum_address
from agentkeys.errors import SiweError
from agentkeys.siwe import SiweMessage, main

ADDRESS = "0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2"
HEADER = " wants you to sign in with your Ethereum account:"

# Every optional field present; the base that the malformed table mutates.
FULL = f"""https://example.com{HEADER}
{ADDRESS}

I accept the ExampleOrg Terms of Service: https://example.com/tos

URI: https://example.com/login
Version: 1
Chain ID: 1
Nonce: 32891756
Issued At: 2021-09-30T16:25:24Z
Expiration Time: 2021-09-30T16:35:24.5+02:00
Not Before: 2021-09-30T16:20:24Z
Request ID: req-1:a@b
Resources:
- ipfs://bafybeiemxf5abjwjbikoz4mc3a3dla6ual3jsgpdr4cjr3oz3evfyavhwq/
- https://example.com/my-web2-claim.json"""

MINIMAL = f"""example.com{HEADER}
{ADDRESS}


URI: https://example.com
Version: 1
Chain ID: 1
Nonce: abcdefgh
Issued At: 2021-09-30T16:25:24Z"""

FULL_JSON = {
    "scheme": "https",
    "domain": "example.com",
    "address": ADDRESS,
    "statement": "I accept the ExampleOrg Terms of Service: https://example.com/tos",
    "uri": "https://example.com/login",
    "version": "1",
    "chain_id": "1",
    "nonce": "32891756",
    "issued_at": "2021-09-30T16:25:24Z",
    "expiration_time": "2021-09-30T16:35:24.5+02:00",
    "not_before": "2021-09-30T16:20:24Z",
    "request_id": "req-1:a@b",
    "resources": [
        "ipfs://bafybeiemxf5abjwjbikoz4mc3a3dla6ual3jsgpdr4cjr3oz3evfyavhwq/",
        "https://example.com/my-web2-claim.json",
    ],
}

MINIMAL_JSON = {
    "scheme": None,
    "domain": "example.com",
    "address": ADDRESS,
    "statement": None,
    "uri": "https://example.com",
    "version": "1",
    "chain_id": "1",
    "nonce": "abcdefgh",
    "issued_at": "2021-09-30T16:25:24Z",
    "expiration_time": None,
    "not_before": None,
    "request_id": None,
    "resources": None,
}


def msg(**fields: Any) -> SiweMessage:
    """A valid message (MINIMAL's fields) with some fields replaced."""
    base: dict[str, Any] = {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in MINIMAL_JSON.items()
    }
    return SiweMessage(**{**base, **fields})


# --- hand-written valid messages -------------------------------------------------------------

VALID = [
    pytest.param(MINIMAL, MINIMAL_JSON, id="minimal"),
    pytest.param(FULL, FULL_JSON, id="every-optional-field"),
    pytest.param(
        MINIMAL.replace("example.com" + HEADER, "http://[2001:db8::7]:8080" + HEADER).replace(
            "URI: https://example.com", "URI: http://[2001:db8::7]:8080/login?next=%2Fhome#top"
        ),
        {
            "scheme": "http",
            "domain": "[2001:db8::7]:8080",
            "uri": "http://[2001:db8::7]:8080/login?next=%2Fhome#top",
        },
        id="ipv6-host-and-port",
    ),
    pytest.param(
        FULL.replace("I accept the ExampleOrg Terms of Service: https://example.com/tos\n", ""),
        {**FULL_JSON, "statement": None},
        id="no-statement",
    ),
    pytest.param(
        FULL.replace("\nI accept the ExampleOrg Terms of Service: https://example.com/tos", "\n"),
        {**FULL_JSON, "statement": ""},
        id="empty-statement",
    ),
    pytest.param(MINIMAL + "\nResources:", {"resources": []}, id="empty-resources"),
    pytest.param(
        MINIMAL + "\nRequest ID: \nResources:\n- urn:agentkeys:account:" + "ab" * 32,
        {"request_id": "", "resources": ["urn:agentkeys:account:" + "ab" * 32]},
        id="empty-request-id-and-urn-resource",
    ),
    pytest.param(
        MINIMAL.replace("example.com" + HEADER, "127.0.0.1:3000" + HEADER)
        .replace("Chain ID: 1", "Chain ID: " + str(2**256 - 1))
        .replace("2021-09-30T16:25:24Z", "2024-02-29t23:59:59.123456789-00:00"),
        {"domain": "127.0.0.1:3000", "chain_id": str(2**256 - 1)},
        id="ipv4-lowercase-t-negative-zero-offset-max-chain-id",
    ),
    pytest.param(
        MINIMAL.replace("example.com" + HEADER, "[v1f.a:b]" + HEADER).replace(
            "URI: https://example.com", "URI: mailto:a@example.com"
        ),
        {"domain": "[v1f.a:b]", "uri": "mailto:a@example.com"},
        id="ipvfuture-host-rootless-uri",
    ),
    pytest.param(
        MINIMAL.replace("example.com" + HEADER, "ex%41mple.com:" + HEADER),
        {"domain": "ex%41mple.com:"},
        id="pct-encoded-host-empty-port",
    ),
]


@pytest.mark.parametrize(("text", "fields"), VALID)
def test_valid_messages_round_trip_exactly(text: str, fields: dict[str, object]) -> None:
    message = SiweMessage.parse(text)
    assert message.format() == text
    as_json = message.to_json()
    assert list(as_json) == list(MINIMAL_JSON)
    assert {key: as_json[key] for key in fields} == fields


def test_statement_absent_and_empty_differ_by_one_line() -> None:
    absent, empty = msg(statement=None).format(), msg(statement="").format()
    assert f"{ADDRESS}\n\n\nURI: " in absent
    assert f"{ADDRESS}\n\n\n\nURI: " in empty
    assert SiweMessage.parse(absent).statement is None
    assert SiweMessage.parse(empty).statement == ""


def test_typed_accessors() -> None:
    message = SiweMessage.parse(FULL)
    assert message.issued_at_datetime == datetime(2021, 9, 30, 16, 25, 24, tzinfo=UTC)
    assert message.expiration_datetime == datetime(2021, 9, 30, 14, 35, 24, 500000, tzinfo=UTC)
    assert message.not_before_datetime == datetime(2021, 9, 30, 16, 20, 24, tzinfo=UTC)
    assert message.chain_id_int == 1
    assert message.issued_at_datetime.tzinfo is UTC

    minimal = SiweMessage.parse(MINIMAL)
    assert minimal.expiration_datetime is None
    assert minimal.not_before_datetime is None

    odd = msg(issued_at="2024-02-29t23:59:59.1234569z", chain_id="8453")
    assert odd.issued_at_datetime == datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=UTC)
    assert odd.chain_id_int == 8453
    west = msg(expiration_time="2021-12-31T23:30:00-05:45")
    assert west.expiration_datetime == datetime(2022, 1, 1, 5, 15, tzinfo=UTC)


# --- malformed messages: each one mutation of FULL -------------------------------------------


def mutate(old: str, new: str) -> str:
    assert FULL.count(old) == 1, old
    return FULL.replace(old, new)


ISSUED = "Issued At: 2021-09-30T16:25:24Z"

MALFORMED = [
    pytest.param("", "line 1 must end with", id="empty"),
    pytest.param(FULL + "\n", "ends with a line break", id="trailing-newline"),
    pytest.param(FULL + "\n- ", "resource 3", id="trailing-empty-resource"),
    pytest.param(FULL + "\nfoo", "line 17: unexpected 'foo'", id="trailing-garbage"),
    pytest.param("\n" + FULL, "line 1 must end with", id="leading-newline"),
    pytest.param(FULL.replace("\n", "\r\n"), "carriage return", id="crlf"),
    pytest.param(mutate("Terms", "Te\rrms"), "carriage return", id="cr-in-statement"),
    pytest.param(mutate(" wants ", " Wants "), "line 1 must end with", id="header-case"),
    pytest.param(mutate("Ethereum account:", "ethereum account:"), "line 1", id="header-eth-case"),
    pytest.param(mutate("account:", "account: "), "line 1", id="header-trailing-space"),
    pytest.param(
        mutate("https://example.com wants", "https://u@example.com wants"),
        "userinfo",
        id="domain-userinfo",
    ),
    pytest.param(
        mutate("https://example.com wants", "https://:443 wants"),
        "empty host",
        id="domain-empty-host",
    ),
    pytest.param(
        mutate("https://example.com wants", "https://example.com/a wants"),
        "not an RFC 3986 authority",
        id="domain-with-path",
    ),
    pytest.param(
        mutate("https://example.com wants", "https://example.com:8o wants"),
        "not an RFC 3986 authority",
        id="domain-bad-port",
    ),
    pytest.param(
        mutate("https://example.com wants", "https://[1::2::3] wants"),
        "not an RFC 3986 authority",
        id="domain-bad-ipv6",
    ),
    pytest.param(
        mutate("https://example.com wants", "https://[fe80::1%25eth0] wants"),
        "not an RFC 3986 authority",
        id="domain-ipv6-zone-id",
    ),
    pytest.param(
        mutate("https://example.com wants", "https://exa mple.com wants"),
        "not an RFC 3986 authority",
        id="domain-space",
    ),
    pytest.param(
        mutate("https://example.com wants", "https://exämple.com wants"),
        "not an RFC 3986 authority",
        id="domain-non-ascii",
    ),
    pytest.param(
        mutate("https://example.com wants", "1http://example.com wants"),
        "not an RFC 3986 scheme",
        id="scheme-digit-first",
    ),
    pytest.param(
        mutate("https://example.com wants", "://example.com wants"),
        "not an RFC 3986 scheme",
        id="scheme-empty",
    ),
    pytest.param(mutate(ADDRESS, ADDRESS.lower()), "EIP-55", id="address-lowercase"),
    pytest.param(
        mutate(ADDRESS, ADDRESS.replace("C02aaA", "C02aaa")), "EIP-55", id="address-bad-checksum"
    ),
    pytest.param(mutate(ADDRESS, "0X" + ADDRESS[2:]), "EIP-55", id="address-0X"),
    pytest.param(mutate(ADDRESS, ADDRESS[:-1]), "EIP-55", id="address-39-hex"),
    pytest.param(mutate(ADDRESS + "\n", ""), "line 3: expected the empty line", id="no-address"),
    pytest.param(
        mutate(ADDRESS + "\n\n", ADDRESS + "\n"),
        "line 3: expected the empty line",
        id="no-blank-after-address",
    ),
    pytest.param(
        mutate("tos\n\n", "tos\n"),
        "line 5: expected the empty line after the statement",
        id="no-blank-after-statement",
    ),
    pytest.param(
        mutate("Terms of", "Terms\nof"), "line 5: expected the empty line", id="statement-with-lf"
    ),
    pytest.param(
        mutate("Terms of", "Terms 100% of"), "statement contains '%'", id="statement-percent"
    ),
    pytest.param(mutate("Terms of", "Terms\tof"), "statement contains '\\t'", id="statement-tab"),
    pytest.param(mutate("Terms of", 'Terms "of"'), "statement contains '\"'", id="statement-quote"),
    pytest.param(
        mutate("Terms of", "Términos"), "statement contains 'é'", id="statement-non-ascii"
    ),
    pytest.param(
        mutate("URI: https://example.com/login\n", ""), "line 6: expected 'URI'", id="uri-missing"
    ),
    pytest.param(mutate("URI: https", "uri: https"), "line 6: expected 'URI'", id="uri-label-case"),
    pytest.param(
        mutate("URI: https://example.com/login", "URI: /login"),
        "URI '/login' is not an RFC 3986 URI",
        id="uri-relative",
    ),
    pytest.param(
        mutate("URI: https", "URI:  https"), "is not an RFC 3986 URI", id="uri-double-space"
    ),
    pytest.param(
        mutate("example.com/login", "example.com/log in"), "is not an RFC 3986 URI", id="uri-space"
    ),
    pytest.param(
        mutate("example.com/login", "example.com/%zz"),
        "is not an RFC 3986 URI",
        id="uri-bad-percent",
    ),
    pytest.param(
        mutate("example.com/login", "example.com/a#b#c"),
        "is not an RFC 3986 URI",
        id="uri-two-fragments",
    ),
    pytest.param(
        mutate("example.com/login", "[::1::]/"), "is not an RFC 3986 URI", id="uri-bad-ipv6"
    ),
    pytest.param(mutate("Version: 1", "Version: 2"), "it must be '1'", id="version-2"),
    pytest.param(
        mutate("Version: 1\nChain ID: 1", "Chain ID: 1\nVersion: 1"),
        "line 7: expected 'Version'",
        id="version-chain-id-swapped",
    ),
    pytest.param(mutate("Chain ID: 1", "Chain ID: 01"), "without leading zeros", id="chain-01"),
    pytest.param(mutate("Chain ID: 1", "Chain ID: 0"), "without leading zeros", id="chain-0"),
    pytest.param(mutate("Chain ID: 1", "Chain ID: 0x1"), "without leading zeros", id="chain-hex"),
    pytest.param(mutate("Chain ID: 1", "Chain ID: "), "without leading zeros", id="chain-empty"),
    pytest.param(
        mutate("Chain ID: 1", "Chain ID: \u0661"), "without leading zeros", id="chain-arabic-digit"
    ),
    pytest.param(mutate("Chain ID: 1", f"Chain ID: {2**256}"), "exceeds", id="chain-2-pow-256"),
    pytest.param(mutate("Chain ID: 1", "Chain ID: " + "9" * 79), "exceeds", id="chain-79-digits"),
    pytest.param(mutate("Nonce: 32891756", "Nonce: 3289175"), "at least 8", id="nonce-7"),
    pytest.param(mutate("Nonce: 32891756", "Nonce: 3289-1756"), "at least 8", id="nonce-dash"),
    pytest.param(
        mutate("Nonce: 32891756", "Nonce: " + "".join(chr(0xFF10 + int(d)) for d in "32891756")),
        "ASCII",
        id="nonce-fullwidth",
    ),
    pytest.param(
        mutate("Nonce: 32891756\n", "Nonce: 32891756\nNonce: 32891756\n"),
        "line 10: expected 'Issued At'",
        id="nonce-duplicated",
    ),
    pytest.param(mutate(ISSUED + "\n", ""), "line 10: expected 'Issued At'", id="issued-missing"),
    pytest.param(
        mutate(ISSUED, ISSUED.replace("09-30", "02-30")), "day is out of range", id="issued-feb-30"
    ),
    pytest.param(
        mutate(ISSUED, ISSUED.replace("2021-09", "2021-13")),
        "month must be in",
        id="issued-month-13",
    ),
    pytest.param(
        mutate(ISSUED, ISSUED.replace("T16", "T24")), "hour must be in", id="issued-hour-24"
    ),
    pytest.param(
        mutate(ISSUED, ISSUED.replace(":25:", ":60:")), "minute must be in", id="issued-minute-60"
    ),
    pytest.param(
        mutate(ISSUED, ISSUED.replace(":24Z", ":61Z")), "second must be in", id="issued-second-61"
    ),
    pytest.param(
        mutate(ISSUED, "Issued At: 2016-12-31T23:59:60Z"), "leap second", id="issued-leap-second"
    ),
    pytest.param(
        mutate(ISSUED, ISSUED.replace("2021", "0000")), "not a valid date-time", id="issued-year-0"
    ),
    pytest.param(
        mutate(ISSUED, "Issued At: 9999-12-31T23:59:59-01:00"),
        "not a valid date-time",
        id="issued-past-year-9999-in-utc",
    ),
    pytest.param(mutate(ISSUED, ISSUED.replace("Z", "")), "not an RFC 3339", id="issued-no-zone"),
    pytest.param(
        mutate(ISSUED, ISSUED.replace("Z", "+0200")), "not an RFC 3339", id="issued-offset-no-colon"
    ),
    pytest.param(
        mutate(ISSUED, ISSUED.replace("Z", "+24:00")),
        "impossible UTC offset",
        id="issued-offset-24h",
    ),
    pytest.param(
        mutate(ISSUED, ISSUED.replace("Z", "-05:60")),
        "impossible UTC offset",
        id="issued-offset-60m",
    ),
    pytest.param(
        mutate(ISSUED, ISSUED.replace("T", " ")), "not an RFC 3339", id="issued-space-separator"
    ),
    pytest.param(
        mutate(ISSUED, ISSUED.replace("24Z", "24.Z")), "not an RFC 3339", id="issued-empty-fraction"
    ),
    pytest.param(
        mutate(ISSUED, "Issued At: 2021-9-30T16:25:24Z"),
        "not an RFC 3339",
        id="issued-one-digit-month",
    ),
    pytest.param(mutate("24.5+02:00", "24.5+02:00 "), "Expiration Time", id="expiration-space"),
    pytest.param(
        mutate(
            "Expiration Time: 2021-09-30T16:35:24.5+02:00\nNot Before: 2021-09-30T16:20:24Z",
            "Not Before: 2021-09-30T16:20:24Z\nExpiration Time: 2021-09-30T16:35:24.5+02:00",
        ),
        "line 12: field 'Expiration Time' is out of order",
        id="optional-fields-swapped",
    ),
    pytest.param(
        mutate("Not Before", "Expiration Time"),
        "line 12: field 'Expiration Time' is out of order, duplicated",
        id="expiration-duplicated",
    ),
    pytest.param(
        mutate("Request ID: req-1:a@b", "Request ID: a/b"), "pchar", id="request-id-slash"
    ),
    pytest.param(
        mutate("Request ID: req-1:a@b", "Request ID: a b"), "pchar", id="request-id-space"
    ),
    pytest.param(
        mutate("Request ID: ", "Request ID:"),
        "line 13: field 'Request ID'",
        id="request-id-no-space",
    ),
    pytest.param(
        mutate("Resources:", "Resources: "),
        "line 14: field 'Resources'",
        id="resources-trailing-space",
    ),
    pytest.param(
        mutate("- https://example.com/my", "-https://example.com/my"),
        "line 16: unexpected",
        id="resource-no-space",
    ),
    pytest.param(
        mutate("- https://example.com/my", "- not a uri"), "resource 2", id="resource-not-uri"
    ),
    pytest.param(
        mutate("Request ID: req-1:a@b\n", "Request ID: req-1:a@b\nFoo: bar\n"),
        "line 14: unexpected 'Foo: bar'",
        id="unknown-field",
    ),
    pytest.param(
        FULL.split("\nURI:")[0],
        "message ends before the 'URI' line",
        id="truncated-after-statement",
    ),
]


@pytest.mark.parametrize(("text", "reason"), MALFORMED)
def test_malformed_messages_are_refused(text: str, reason: str) -> None:
    assert text != FULL
    with pytest.raises(SiweError) as caught:
        SiweMessage.parse(text)
    assert reason in caught.value.detail
    assert caught.value.code == "invalid_siwe_message"


def test_full_base_of_the_malformed_table_is_valid() -> None:
    assert SiweMessage.parse(FULL).format() == FULL


BAD_FIELDS = [
    pytest.param({"address": ADDRESS.lower()}, "EIP-55", id="address"),
    pytest.param({"scheme": ""}, "scheme", id="scheme-empty"),
    pytest.param({"domain": "a@example.com"}, "userinfo", id="domain-userinfo"),
    pytest.param({"statement": "two\nlines"}, "statement contains '\\n'", id="statement-lf"),
    pytest.param({"uri": "example.com"}, "URI", id="uri"),
    pytest.param({"uri": "http://[v.a]/"}, "URI", id="uri-ipvfuture-no-version"),
    pytest.param({"uri": "http://[v1.]/"}, "URI", id="uri-ipvfuture-empty"),
    pytest.param({"uri": "http://[1.2.3.4]/"}, "URI", id="uri-bracketed-ipv4"),
    pytest.param({"uri": "http://a:b@c:d/"}, "URI", id="uri-port-not-digits"),
    pytest.param({"uri": "a+b-c.d:x y"}, "URI", id="uri-space-in-path"),
    pytest.param({"domain": "[vf]"}, "authority", id="domain-ipvfuture-no-dot"),
    pytest.param({"domain": "[::1"}, "authority", id="domain-unclosed-bracket"),
    pytest.param({"version": "1.0"}, "Version", id="version"),
    pytest.param({"chain_id": "01"}, "Chain ID", id="chain-id"),
    pytest.param({"chain_id": 1}, "chain_id must be a string", id="chain-id-int"),
    pytest.param({"nonce": "short"}, "Nonce", id="nonce"),
    pytest.param({"issued_at": "2021-09-30"}, "Issued At", id="issued-at"),
    pytest.param({"not_before": "2021-02-29T00:00:00Z"}, "Not Before", id="not-before-feb-29"),
    pytest.param({"expiration_time": "x"}, "Expiration Time", id="expiration"),
    pytest.param({"request_id": "a\nb"}, "Request ID", id="request-id-lf"),
    pytest.param({"resources": ["https://a"]}, "tuple", id="resources-list"),
    pytest.param({"resources": ("https://a", "b c")}, "resource 2", id="resources-item"),
]


@pytest.mark.parametrize(("fields", "reason"), BAD_FIELDS)
def test_constructing_an_invalid_message_is_refused(fields: dict[str, Any], reason: str) -> None:
    with pytest.raises(SiweError) as caught:
        msg(**fields)
    assert reason in caught.value.detail


def test_pathological_input_is_refused_quickly() -> None:
    started = time.perf_counter()
    for uri in [
        "http://" + "a" * 100_000 + " ",
        "a:" + "/a" * 50_000 + " ",
        "x://[" + "1:" * 50_000,
    ]:
        with pytest.raises(SiweError):
            msg(uri=uri)
    assert time.perf_counter() - started < 2


# --- property tests ----------------------------------------------------------------------------

HEXDIG = "0123456789abcdefABCDEF"
UNRESERVED = string.ascii_letters + string.digits + "-._~"
SUB_DELIMS = "!$&'()*+,;="
PCHAR = UNRESERVED + SUB_DELIMS + ":@"


def rfc3986_text(alphabet: str, min_size: int = 0, max_size: int = 8) -> st.SearchStrategy[str]:
    """Characters of `alphabet` and percent-encodings, as RFC 3986 builds most components."""
    pct = st.tuples(st.sampled_from(HEXDIG), st.sampled_from(HEXDIG)).map(
        lambda t: "%" + "".join(t)
    )
    char = st.one_of(st.sampled_from(alphabet), pct)
    return st.lists(char, min_size=min_size, max_size=max_size).map("".join)


ipv6_literals = st.builds(
    lambda address, exploded: f"[{address.exploded if exploded else address.compressed}]",
    st.ip_addresses(v=6),
    st.booleans(),
)
hosts = st.one_of(
    rfc3986_text(UNRESERVED + SUB_DELIMS, min_size=1),
    st.ip_addresses(v=4).map(str),
    ipv6_literals,
    st.builds(
        lambda version, rest: f"[v{version}.{rest}]",
        st.text(HEXDIG, min_size=1, max_size=3),
        st.text(UNRESERVED + SUB_DELIMS + ":", min_size=1, max_size=6),
    ),
)
ports = st.one_of(st.just(""), st.just(":"), st.integers(0, 65535).map(lambda p: f":{p}"))
domains = st.builds(lambda host, port: host + port, hosts, ports)
schemes = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(string.ascii_letters),
    st.text(string.ascii_letters + string.digits + "+-.", max_size=5),
)
segments = rfc3986_text(PCHAR)
paths_abempty = st.lists(segments, max_size=3).map(lambda parts: "".join("/" + p for p in parts))
hier_parts = st.one_of(
    st.builds(
        lambda userinfo, host, port, path: f"//{userinfo}{host}{port}{path}",
        st.one_of(st.just(""), rfc3986_text(UNRESERVED + SUB_DELIMS + ":").map(lambda u: u + "@")),
        hosts,
        ports,
        paths_abempty,
    ),
    st.builds(lambda first, rest: "/" + first + rest, rfc3986_text(PCHAR, 1), paths_abempty),
    st.just("/"),
    st.builds(lambda first, rest: first + rest, rfc3986_text(PCHAR, 1), paths_abempty),
    st.just(""),
)
query_like = rfc3986_text(PCHAR + "/?")
uris = st.builds(
    lambda scheme, hier, query, fragment: f"{scheme}:{hier}{query}{fragment}",
    schemes,
    hier_parts,
    st.one_of(st.just(""), query_like.map(lambda q: "?" + q)),
    st.one_of(st.just(""), query_like.map(lambda f: "#" + f)),
)


@st.composite
def date_times(draw: st.DrawFn) -> tuple[str, datetime]:
    """An RFC 3339 date-time string and the UTC instant it denotes (to the microsecond)."""
    naive = draw(st.datetimes(min_value=datetime(1900, 1, 2), max_value=datetime(2199, 12, 30)))
    fraction = draw(st.one_of(st.just(""), st.text(string.digits, min_size=1, max_size=9)))
    offset = draw(st.integers(-(23 * 60 + 59), 23 * 60 + 59))
    utc = draw(st.booleans())
    hours, minutes = divmod(abs(offset), 60)
    sign = "-" if offset < 0 else "+"
    zone = draw(st.sampled_from("Zz")) if utc else f"{sign}{hours:02d}:{minutes:02d}"
    text = (
        f"{naive.year:04d}-{naive.month:02d}-{naive.day:02d}{draw(st.sampled_from('Tt'))}"
        f"{naive.hour:02d}:{naive.minute:02d}:{naive.second:02d}"
        + ("." + fraction if fraction else "")
        + zone
    )
    micro = int(fraction[:6].ljust(6, "0"))
    tz = UTC if utc else timezone(timedelta(minutes=offset))
    return text, naive.replace(microsecond=micro, tzinfo=tz).astimezone(UTC)


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


addresses = st.binary(min_size=20, max_size=20).map(lambda b: to_checksum_address("0x" + b.hex()))
timestamps = date_times().map(lambda pair: pair[0])
messages = st.builds(
    SiweMessage,
    scheme=optional(schemes),
    domain=domains,
    address=addresses,
    statement=optional(st.text(UNRESERVED + ":/?#[]@" + SUB_DELIMS + " ", max_size=40)),
    uri=uris,
    version=st.just("1"),
    chain_id=st.integers(1, 2**256 - 1).map(str),
    nonce=st.text(string.ascii_letters + string.digits, min_size=8, max_size=24),
    issued_at=timestamps,
    expiration_time=optional(timestamps),
    not_before=optional(timestamps),
    request_id=optional(rfc3986_text(PCHAR)),
    resources=optional(st.lists(uris, max_size=3).map(tuple)),
)


@settings(max_examples=120, database=None, deadline=None)
@given(messages)
def test_generated_messages_round_trip(message: SiweMessage) -> None:
    text = message.format()
    assert SiweMessage.parse(text) == message
    assert SiweMessage.parse(text).format() == text
    assert json.loads(json.dumps(message.to_json())) == message.to_json()


@settings(max_examples=30, database=None, deadline=None)
@given(date_times())
def test_date_time_accessor_matches_the_instant(pair: tuple[str, datetime]) -> None:
    text, instant = pair
    message = msg(issued_at=text, expiration_time=text, not_before=text)
    assert message.issued_at_datetime == instant
    assert message.expiration_datetime == instant
    assert message.not_before_datetime == instant
    assert message.issued_at_datetime.utcoffset() == timedelta(0)


IPV6_EDGES = [
    *[(text, True) for text in ["::", "::1", "1::", "1::8", "1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7::"]],
    *[(text, True) for text in ["::2:3:4:5:6:7:8", "1::3:4:5:6:7:8", "::ffff:192.0.2.1"]],
    *[(text, True) for text in ["1:2:3:4:5:6:1.2.3.4", "1::1.2.3.4", "FFFF::aBcD", "0:0::0"]],
    *[(text, False) for text in ["", ":", ":::", "1:::2", "1::2::3", ":1::", "1::2:", "12345::"]],
    *[(text, False) for text in ["1:2:3:4:5:6:7", "1:2:3:4:5:6:7:8:9", "1:2:3:4:5:6:7:8::"]],
    *[(text, False) for text in ["::1.2.3", "::256.0.0.1", "::01.2.3.4", "1.2.3.4", "::1.2.3.4:5"]],
    *[(text, False) for text in ["1:2:3:4:5:6:7:1.2.3.4", "fe80::1%eth0", "fe80::1%25eth0", "g::"]],
]


@pytest.mark.parametrize(("literal", "valid"), IPV6_EDGES)
def test_ipv6_edge_cases(literal: str, valid: bool) -> None:
    try:
        ipaddress.IPv6Address(literal)
    except ValueError:
        assert not valid or "%" in literal  # the table agrees with the ipaddress module
    else:
        assert valid or "%" in literal  # zone ids are RFC 6874, not RFC 3986
    if valid:
        assert msg(domain=f"[{literal}]:1", uri=f"http://[{literal}]/").domain == f"[{literal}]:1"
    else:
        with pytest.raises(SiweError, match="not an RFC 3986 authority"):
            msg(domain=f"[{literal}]")
        with pytest.raises(SiweError, match="not an RFC 3986 URI"):
            msg(uri=f"http://[{literal}]/")


ipv6_candidates = st.lists(
    st.sampled_from(["", "0", "1", "ab", "fFfF", "12345", "1.2.3.4", "01.2.3.4", "256.1.1.1", "g"]),
    min_size=1,
    max_size=10,
).map(":".join)


@settings(max_examples=30, database=None, deadline=None)
@given(st.one_of(ipv6_candidates, st.ip_addresses(v=6).map(lambda a: a.compressed)))
def test_ipv6_literals_agree_with_the_ipaddress_module(candidate: str) -> None:
    try:
        ipaddress.IPv6Address(candidate)
        expected = True
    except ValueError:
        expected = False
    try:
        msg(domain=f"[{candidate}]")
        accepted = True
    except SiweError:
        accepted = False
    assert accepted == expected, candidate


@settings(max_examples=20, database=None, deadline=None)
@given(messages, st.integers(1, SECP256K1_N - 1))
def test_text_is_what_eth_account_signs(message: SiweMessage, secret: int) -> None:
    account = Account.from_key(secret.to_bytes(32, "big"))
    message = dataclasses.replace(message, address=account.address)  # eth-account's EIP-55
    text = message.format()
    signed = Account.sign_message(encode_defunct(text=text), secret.to_bytes(32, "big"))
    assert Account.recover_message(encode_defunct(text=text), signature=signed.signature) == (
        message.address
    )
    assert recover_personal(text.encode(), "0x" + bytes(signed.signature).hex()) == message.address
    assert SiweMessage.parse(text).address == account.address


# --- command line ------------------------------------------------------------------------------


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    # cwd = the checkout, so `-m` imports this tree whatever the venv's editable install maps to.
    return subprocess.run(
        [sys.executable, "-m", "agentkeys.siwe", *args],
        cwd=PROJECT_ROOT,
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_cli_prints_every_field_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "message.txt"
    path.write_bytes(FULL.encode() + b"\n")  # one trailing newline, as editors write
    result = run_cli(str(path))
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout.decode() == json.dumps(FULL_JSON) + "\n"


def test_cli_reads_stdin_and_prints_null_for_absent_fields() -> None:
    result = run_cli(stdin=MINIMAL.encode())
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout.decode() == json.dumps(MINIMAL_JSON) + "\n"
    assert json.loads(result.stdout)["expiration_time"] is None


def test_cli_refuses_a_malformed_message() -> None:
    result = run_cli(stdin=MINIMAL.replace("Nonce: abcdefgh", "Nonce: abc").encode())
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode() == "siwe: Nonce must be at least 8 ASCII letters or digits\n"


CLI_FAILURES = [
    pytest.param(
        MINIMAL.encode() + b"\n\n", "siwe: message ends with a line break", id="two-newlines"
    ),
    pytest.param(MINIMAL.encode() + b"\r\n", "siwe: message contains a carriage return", id="crlf"),
    pytest.param(MINIMAL.encode() + b"\xff", "siwe: {path} is not valid UTF-8", id="not-utf-8"),
]


@pytest.mark.parametrize(("content", "error"), CLI_FAILURES)
def test_cli_main_reports_bad_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, error: str
) -> None:
    path = tmp_path / "message.txt"
    path.write_bytes(content)
    assert main([str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(error.format(path=path))
    assert captured.err.count("\n") == 1


def test_cli_main_reports_an_unreadable_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.txt"
    assert main([str(missing)]) == 1
    assert capsys.readouterr().err == f"siwe: cannot read {missing}: No such file or directory\n"
