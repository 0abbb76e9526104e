"""Flood control over loopback: one identity flooding costs itself, not everyone else.

The flooder speaks the wire protocol with a raw DEALER (pipelining as fast as it can, as a
hostile script would); the bystander is an ordinary :class:`~zchat.client.Client`.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import zmq

from zchat.broker import BrokerConfig
from zchat.broker.ratelimit import Rate, RateLimits
from zchat.common.codec import decode_reply, encode
from zchat.common.codes import ErrorCode
from zchat.common.protocol import ErrorReply, Hello, Join, Joined, Reply, Say, Sent, Welcome

if TYPE_CHECKING:
    from tests.conftest import Connect, RunningBroker

pytestmark = pytest.mark.timeout(60)


class Raw:
    """A DEALER speaking the protocol by hand."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], router: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(router)
        self.rid = 0

    def send(self, request_type: type[Hello | Join | Say], *args: object) -> None:
        self.rid += 1
        self.sock.send(encode(request_type(self.rid, *args)))  # type: ignore[arg-type]

    def recv(self, timeout: float = 5.0) -> Reply:
        assert self.sock.poll(int(timeout * 1000)), "no reply"
        return decode_reply(self.sock.recv())

    def call(self, request_type: type[Hello | Join | Say], *args: object) -> Reply:
        self.send(request_type, *args)
        return self.recv()


@pytest.fixture
def raw(zctx: zmq.Context[zmq.Socket[bytes]]) -> Callable[[RunningBroker], Raw]:
    return lambda rb: Raw(zctx, rb.router)


def test_a_flooder_gets_its_budget_and_others_keep_their_round_trip(
    broker_factory: Callable[..., RunningBroker],
    raw: Callable[[RunningBroker], Raw],
    connect: Connect,
) -> None:
    rate, burst, total = 50.0, 100, 3000
    rb = broker_factory(BrokerConfig(rate_limits=RateLimits(messages=Rate(rate, burst), strikes=0)))
    flooder = raw(rb)
    assert type(flooder.call(Hello, "flooder")) is Welcome
    assert type(flooder.call(Join, "general")) is Joined
    bob = connect(rb, "bob", "general")
    counts = {"sent": 0, "limited": 0}
    span: list[float] = []

    def flood() -> None:
        # 100 requests in flight: as fast as it goes without overrunning the 200 replies
        # the broker queues for a peer that does not read.
        start, window = time.monotonic(), 100
        for _ in range(window):
            flooder.send(Say, "general", "x" * 120)
        for done in range(total):
            if done + window < total:
                flooder.send(Say, "general", "x" * 120)
            reply = flooder.recv()
            if type(reply) is Sent:
                counts["sent"] += 1
            else:
                assert type(reply) is ErrorReply and reply.code is ErrorCode.RATE_LIMITED
                assert reply.retry_after is not None and 0 < reply.retry_after <= 1 / rate + 0.001
                counts["limited"] += 1
        span.append(time.monotonic() - start)

    thread = threading.Thread(target=flood)
    thread.start()
    round_trips: list[float] = []
    while thread.is_alive() or len(round_trips) < 20:
        round_trips.append(bob.ping())
    thread.join()
    assert counts["sent"] + counts["limited"] == total
    # Token bucket: at most the burst plus what refilled while the flood lasted.
    assert burst <= counts["sent"] <= burst + rate * span[0] + 1
    assert counts["limited"] >= total - burst - rate * span[0] - 1
    # The bystander's own budget is untouched, and the broker kept answering it promptly.
    assert bob.say("general", "still here").seq == counts["sent"] + 1
    assert statistics.median(round_trips) < 0.05, round_trips
    assert max(round_trips) < 1.0, round_trips


def test_a_flooder_that_keeps_going_is_disconnected_for_a_while(
    broker_factory: Callable[..., RunningBroker],
    raw: Callable[[RunningBroker], Raw],
    connect: Connect,
) -> None:
    limits = RateLimits(messages=Rate(1, 5), strikes=20, penalty=30.0)
    rb = broker_factory(BrokerConfig(rate_limits=limits))
    flooder = raw(rb)
    identity = "flooder-identity-0123456789"
    assert type(flooder.call(Hello, "flooder", identity)) is Welcome
    assert type(flooder.call(Join, "general")) is Joined
    bob = connect(rb, "bob", "general")
    replies = [flooder.call(Say, "general", "spam") for _ in range(25)]
    assert [type(r) for r in replies[:5]] == [Sent] * 5
    refused = replies[5:]
    assert all(type(r) is ErrorReply and r.code is ErrorCode.RATE_LIMITED for r in refused)
    last = refused[-1]
    assert type(last) is ErrorReply and "flooding" in last.reason
    assert last.retry_after is not None and last.retry_after > 25
    # Its session is gone, and the same identity is refused until the penalty is over.
    gone = flooder.call(Say, "general", "more")
    assert type(gone) is ErrorReply and gone.code is ErrorCode.NO_SESSION
    again = flooder.call(Hello, "flooder", identity)
    assert type(again) is ErrorReply and again.code is ErrorCode.RATE_LIMITED
    assert again.retry_after is not None and again.retry_after > 25
    assert "flooder" not in bob.who("general")
    assert bob.say("general", "business as usual").seq == 6
