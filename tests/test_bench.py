"""The benchmark's reference path must do the same work as ours, or its ratio means nothing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentkeys.crypto import derive_wallet
from agentkeys.siwe import SiweMessage
from bench.client import STEPS, shares
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


def test_cold_mint_shares_cover_every_step() -> None:
    rounds = [dict.fromkeys(STEPS, 0.001) | {"STS": 0.004}, dict.fromkeys(STEPS, 0.003)]
    split = shares(rounds)
    assert list(split) == list(STEPS)
    assert split["STS"] == pytest.approx((3.5, 3.5 / 13.5))  # median in ms, share of the sum
    assert sum(share for _, share in split.values()) == pytest.approx(1)
