"""The benchmark's reference path must do the same work as ours, or its ratio means nothing."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from agentkeys.crypto import derive_wallet
from agentkeys.siwe import SiweMessage
from bench.run import ecdsa_derive_and_sign, siwe_message, wrk_script


@settings(max_examples=10, deadline=None)
@given(master=st.binary(min_size=32, max_size=32), anchor=st.binary(min_size=32, max_size=32))
def test_ecdsa_reference_matches_coincurve(master: bytes, anchor: bytes) -> None:
    wallet = derive_wallet(master, anchor.hex())
    message = siwe_message(wallet.address, "127.0.0.1:8000", anchor.hex())
    SiweMessage.parse(message)  # the benchmark signs a message the policy can accept
    expected = (wallet.address, wallet.sign_personal(message.encode()))
    assert ecdsa_derive_and_sign(master, anchor.hex(), message.encode()) == expected


def test_wrk_script_posts_json() -> None:
    script = wrk_script({"omni_account": "ab"})
    assert 'wrk.method = "POST"' in script
    assert 'wrk.headers["Content-Type"] = "application/json"' in script
    body = json.loads(json.loads(script.splitlines()[2].removeprefix("wrk.body = ")))
    assert body == {"omni_account": "ab"}
    assert wrk_script(None) == ""
