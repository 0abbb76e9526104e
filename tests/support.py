"""Helpers shared by test modules: waiting for a condition, for events, for a sync marker,
for the outcome of a ZeroMQ handshake; CURVE key pairs for a secure broker."""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from hypothesis import HealthCheck, settings
from zmq.utils.monitor import recv_monitor_message

from zchat.client import Client
from zchat.common.codec import decode_event
from zchat.common.codes import EventKind
from zchat.common.keys import KeyPair, write_key_pair
from zchat.common.protocol import Event
from zchat.common.topics import sync_subscription

Socket = zmq.Socket[bytes]
WAIT = 5.0


def machine_settings(max_examples: int) -> settings:
    """Settings for the core's random-traffic state machines: 40 steps a run, reproducible
    (derandomized, no example database), no deadline."""
    return settings(
        max_examples=max_examples,
        stateful_step_count=40,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.01) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def events_until(client: Client, last: Callable[[Event], bool], timeout: float = 10.0) -> list[Event]:
    """``client``'s events up to and including the first for which ``last`` is true."""
    deadline = time.monotonic() + timeout
    events: list[Event] = []
    while not events or not last(events[-1]):
        remaining = deadline - time.monotonic()
        try:
            events.append(client.recv_event(max(0.001, remaining)))
        except TimeoutError:
            raise AssertionError(f"condition not met within {timeout} s; got {events!r}") from None
    return events


def barrier(sock: Socket, private_topic: bytes, *, timeout: float = WAIT) -> list[list[bytes]]:
    """Wait for a sync marker on ``private_topic``; return every other publication seen first.

    ``sock`` (a SUB, or an XSUB that sends its own subscription messages) must already hold
    ``private_topic``. Sync markers (ours or other observers') are not returned. As the
    protocol says, a sync the broker could not place (it read an XSUB's junk just before)
    goes unanswered: ask again with a fresh nonce until ``timeout``.
    """
    xsub = sock.type == zmq.XSUB
    seen: list[list[bytes]] = []
    deadline = time.monotonic() + timeout
    attempt = 0.25
    while True:
        nonce = secrets.token_hex(8)
        request = sync_subscription(private_topic, nonce)
        if xsub:
            sock.send(b"\x01" + request)
        else:
            sock.subscribe(request)
        try:
            if _wait_for_sync(sock, private_topic, nonce, min(deadline, time.monotonic() + attempt), seen):
                return seen
        finally:
            if xsub:
                sock.send(b"\x00" + request)
            else:
                sock.unsubscribe(request)
        if time.monotonic() >= deadline:
            raise AssertionError(f"no sync marker within {timeout} s; saw {seen!r}")
        attempt *= 2


def _wait_for_sync(sock: Socket, private_topic: bytes, nonce: str, until: float, seen: list[list[bytes]]) -> bool:
    while (remaining := until - time.monotonic()) > 0 and sock.poll(int(remaining * 1000) + 1):
        frames = sock.recv_multipart()
        if frames[0] == private_topic and len(frames) == 2:
            event = decode_event(frames[1])
            if event.kind is EventKind.SYNC:
                if event.text == nonce:
                    return True
                continue
        seen.append(frames)
    return False


def handshake_outcome(monitor: Socket, timeout: float = WAIT) -> int:
    """The first handshake event (success or failure) or disconnection the monitor reports."""
    wanted = {zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
              zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_DISCONNECTED}
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        if monitor.poll(int(remaining * 1000) + 1):
            event = int(recv_monitor_message(monitor)["event"])
            if event in wanted:
                return event
    raise AssertionError(f"no handshake outcome within {timeout} s")


@dataclass
class Keys:
    """Key pairs in ``dir``; the broker's authorized-keys directory is ``authorized``."""

    dir: Path
    authorized: Path
    pairs: dict[str, KeyPair] = field(default_factory=dict)

    def make(self, name: str, *, authorize: bool = True) -> KeyPair:
        self.pairs[name] = pair = write_key_pair(self.dir, name)
        if authorize:
            self.authorize(name)
        return pair

    def authorize(self, name: str) -> None:
        shutil.copy(self.dir / f"{name}.key", self.authorized / f"{name}.key")

    def revoke(self, name: str) -> None:
        (self.authorized / f"{name}.key").unlink()

    def secret(self, name: str) -> Path:
        return self.dir / f"{name}.key_secret"

    def public(self, name: str) -> Path:
        return self.dir / f"{name}.key"
