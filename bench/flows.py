"""Complete client flows per second: steps 2-7 without STS (derive, wallet start, sign, verify,
mint) by agentkeys.client.flow.Client, one process per client, each its own account."""

from __future__ import annotations

import multiprocessing
import queue
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

from agentkeys.client import flow
from agentkeys.client.config import ClientConfig

_START_SECONDS = 120  # for the clients to import and make their first flow


@dataclass(frozen=True)
class FlowRun:
    flows: int  # completed within the run's seconds
    finished: int  # completed in all, the one that ran past the end included
    elapsed: float  # from the start to the last client's end


def one_flow(client: flow.Client, token: str, account: str) -> str:
    """Steps 2 and 4-7 as `agentkeys credentials` makes them: an OIDC token for STS."""
    address = client.derive_address(token, account)
    session = {"session_jwt": token, "account": account, "wallet": address}
    return client.oidc_token(session)


def client_main(
    base: str,
    home: str,
    token: str,
    account: str,
    orders: Any,
    results: Any,
    barrier: Barrier,
) -> None:
    """One client process: a flow to warm up, then for each order (seconds) wait for the
    others, run flows until the time is up, and report the counts."""
    try:
        config = ClientConfig.from_env(
            environ={"AGENTKEYS_BROKER_URL": base, "AGENTKEYS_HOME": home}
        )
        client = flow.Client(config)  # one per daemon: its connections are kept alive
        one_flow(client, token, account)
        results.put(("ready", 0, 0))
        while (seconds := orders.get()) is not None:
            barrier.wait()
            start = time.perf_counter()
            done = finished = 0
            while True:
                one_flow(client, token, account)
                finished += 1
                if time.perf_counter() - start > seconds:
                    break
                done += 1
            results.put(("done", done, finished))
    except BaseException:  # reported to the benchmark, which stops
        results.put(("error", traceback.format_exc(), 0))


class FlowClients:
    """Client processes kept for the whole run, started once (spawned: nothing of the
    benchmark's own connections is inherited)."""

    def __init__(self, base: str, accounts: Sequence[tuple[str, str]], home: Path) -> None:
        context = multiprocessing.get_context("spawn")
        self.orders = [context.Queue() for _ in accounts]
        self.results: Any = context.Queue()
        self.barrier = context.Barrier(len(accounts) + 1)
        self.processes: list[BaseProcess] = [
            context.Process(
                target=client_main,
                args=(base, str(home / str(n)), token, anchor, orders, self.results, self.barrier),
                daemon=True,
            )
            for n, ((anchor, token), orders) in enumerate(zip(accounts, self.orders, strict=True))
        ]

    def __enter__(self) -> FlowClients:
        for process in self.processes:
            process.start()
        for _ in self.processes:
            self._result("ready", _START_SECONDS)
        return self

    def __exit__(self, *_: object) -> None:
        for orders in self.orders:
            orders.put(None)
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()

    def run(self, seconds: float, started: Callable[[], None] | None = None) -> FlowRun:
        """Flows for `seconds` from every client at once; `started` runs as they start."""
        for orders in self.orders:
            orders.put(seconds)
        self.barrier.wait(timeout=_START_SECONDS)
        begin = time.perf_counter()
        if started is not None:
            started()
        flows = finished = 0
        for _ in self.processes:
            done, total = self._result("done", seconds + _START_SECONDS)
            flows, finished = flows + done, finished + total
        return FlowRun(flows, finished, time.perf_counter() - begin)

    def _result(self, kind: str, timeout: float) -> tuple[int, int]:
        try:
            found, first, second = self.results.get(timeout=timeout)
        except queue.Empty:
            raise SystemExit(
                f"bench: a flow client did not answer within {timeout:.0f} s"
            ) from None
        if found != kind:
            raise SystemExit(f"bench: a flow client failed:\n{first}")
        return int(first), int(second)
