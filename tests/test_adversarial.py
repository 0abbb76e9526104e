"""Adversarial tests: hostile input on both sockets and below ZeroMQ, against a real broker.

Every attack runs over loopback against a broker on OS-chosen ports, and after each one a
conforming client (:class:`Witness`) checks that the broker still serves: a ``ping`` answers
quickly and a room message is the very next event its member receives (so nothing the attack
sent was published). A negative check ("this socket received nothing") is made exact with a
*barrier*: the observing socket also holds a live private topic and asks the broker for a
``sync`` marker on it; the broker reads one pipe's subscriptions in order and the XPUB sends
one pipe's publications in order, so whatever the socket was going to receive comes first.

Covered here: msgpack bombs and random bytes on the ROUTER and the XPUB, frames over the
size limits and multipart messages, raw TCP junk and hand-made ZMTP below ZeroMQ on both
ports, forged fields in requests, subscriptions that guess at private topics (measured over
thousands of DMs) or keep a dead session's topic, and the broker's memory under all that;
then, by hand rather than through the client library (which would hide a leak): a kicked
member that keeps listening, a second key claiming a nick or a session, unknown keys and a
wrong server key on both ports, and one key flooding from several sessions.
The codec's own handling of the same bytes is in ``test_codec.py``; single bad requests
and XSUB junk in ``test_integration.py``; the client library's side of CURVE, flooding and
kicks in ``test_curve.py``, ``test_flood.py`` and ``test_private_rooms.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
import zmq
from tests.support import barrier, handshake_outcome
from zmq.utils.monitor import recv_monitor_message

from zchat.broker import BrokerConfig
from zchat.broker.ratelimit import Rate, RateLimits
from zchat.broker.server import MAX_SUBSCRIPTION_FRAME, ROUTER_SNDHWM
from zchat.client import Client, EventKind
from zchat.common.codec import decode_event, decode_reply, encode_map
from zchat.common.codes import ErrorCode
from zchat.common.keys import KeyPair, write_key_pair
from zchat.common.limits import DEFAULT_LIMITS
from zchat.common.protocol import (
    ErrorReply,
    Event,
    Goodbye,
    HistoryPage,
    Joined,
    Members,
    Moderated,
    Pong,
    Reply,
    Sent,
    Welcome,
)
from zchat.common.topics import new_private_topic

if TYPE_CHECKING:
    from tests.conftest import BrokerProcess, RunningBroker

Context = zmq.Context[zmq.Socket[bytes]]
Socket = zmq.Socket[bytes]
Map = dict[str, Any]

#: Seconds any single wait may take before the test fails.
WAIT = 5.0
#: Longest ping round trip a conforming client may see while the broker is under attack.
MAX_RTT = 1.0
#: Requests sent before reading their replies: the ROUTER drops replies beyond its high-water
#: mark for a peer that does not read them.
WINDOW = ROUTER_SNDHWM // 2
#: Largest request frame of the default limits (ZMQ_MAXMSGSIZE on the ROUTER).
MAX_FRAME = DEFAULT_LIMITS.max_frame
#: Largest message the XPUB reads; a larger one drops the peer.
MAX_SUBSCRIPTION = MAX_SUBSCRIPTION_FRAME
#: What a broker's peak RSS may grow by while it fends off the attacks below.
RSS_BOUND = 30 * 1024 * 1024

#: Codes a frame that is not a well-formed request may earn.
REFUSALS = {
    ErrorCode.MALFORMED,
    ErrorCode.INVALID,
    ErrorCode.BAD_VERSION,
    ErrorCode.UNKNOWN_KIND,
    ErrorCode.TOO_LARGE,
    ErrorCode.INVALID_NICK,
    ErrorCode.INVALID_TEXT,
    ErrorCode.BAD_FRAMES,
}


# -- raw sockets -------------------------------------------------------------------------------


def raw(ctx: Context, kind: int, endpoint: str) -> Socket:
    """A raw socket connected to ``endpoint``, with linger 0 so teardown never blocks."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def envelope(kind: str, rid: int, **fields: Any) -> bytes:
    """A request frame as a hand-written client would build it."""
    return encode_map({"v": 1, "kind": kind, "rid": rid, **fields})


def recv_reply(dealer: Socket, timeout: float = WAIT) -> Reply:
    if not dealer.poll(int(timeout * 1000)):
        raise AssertionError(f"no reply within {timeout} s")
    return decode_reply(dealer.recv())


def ask(dealer: Socket, frame: bytes) -> Reply:
    dealer.send(frame)
    return recv_reply(dealer)


def open_session(ctx: Context, router: str, nick: str, client: str | None = None) -> tuple[Socket, bytes]:
    """A raw DEALER with a session called ``nick``, and that session's private topic."""
    dealer = raw(ctx, zmq.DEALER, router)
    fields = {"nick": nick} if client is None else {"nick": nick, "client": client}
    welcome = ask(dealer, envelope("hello", 1, **fields))
    assert isinstance(welcome, Welcome), welcome
    return dealer, welcome.topic.encode()


def subscriber(ctx: Context, pub: str, *topics: bytes) -> Socket:
    """A SUB holding ``topics`` (subscriptions the broker will grant or deny)."""
    sub = raw(ctx, zmq.SUB, pub)
    for topic in topics:
        sub.subscribe(topic)
    return sub


def wait_disconnected(monitor: Socket, timeout: float = WAIT) -> None:
    """Wait until the monitored socket reports that the broker closed its connection."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        if monitor.poll(int(remaining * 1000) + 1) and recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
            return
    raise AssertionError(f"the broker did not drop the connection within {timeout} s")


# -- a conforming client, watching ---------------------------------------------------------------


@dataclass
class Witness:
    """Two conforming clients in room 'lobby': what they see proves the broker still serves."""

    router: str
    pub: str
    alice: Client
    bob: Client
    markers: Iterator[int] = field(default_factory=itertools.count)

    def check(self, after: str = "") -> None:
        """The broker answers quickly, and the next event alice gets is bob's marker."""
        rtt = self.alice.ping()
        assert rtt < MAX_RTT, f"ping took {rtt:.3f} s after {after}"
        text = f"marker {next(self.markers)}"
        sent = self.bob.say("lobby", text)
        event = self.alice.recv_event(WAIT)  # the very next event: nothing came before it
        assert (event.kind, event.sender, event.text, event.id) == (EventKind.MESSAGE, "bob", text, sent.id), after

    def newcomer_connects(self) -> None:
        newcomer = Client(self.router, self.pub, timeout=WAIT)
        try:
            assert newcomer.connect(f"newcomer{next(self.markers)}").resumed is False
        finally:
            newcomer.close()


def make_witness(router: str, pub: str, clients: list[Client]) -> Witness:
    alice, bob = Client(router, pub, timeout=WAIT), Client(router, pub, timeout=WAIT)
    clients += [alice, bob]
    alice.connect("alice")
    alice.join("lobby")
    bob.connect("bob")
    bob.join("lobby")
    event = alice.recv_event(WAIT)
    assert (event.kind, event.sender) == (EventKind.JOIN, "bob")
    return Witness(router, pub, alice, bob)


@pytest.fixture
def witness(broker: RunningBroker) -> Iterator[Witness]:
    clients: list[Client] = []
    try:
        yield make_witness(broker.router, broker.pub, clients)
    finally:
        for client in clients:
            client.close()
    assert broker.thread.is_alive()


# -- the bombs ---------------------------------------------------------------------------------


def _hello_with(value: bytes) -> bytes:
    """A hello frame whose nick is the raw msgpack ``value``."""
    return b"\x84\xa1v\x01\xa4kind\xa5hello\xa3rid\x05\xa4nick" + value


def _ping_with_rid(value: bytes) -> bytes:
    """A ping frame whose rid is the raw msgpack ``value``."""
    return b"\x83\xa1v\x01\xa4kind\xa4ping\xa3rid" + value


def _say_with_text(value: bytes) -> bytes:
    """A say frame (to 'lobby') whose text is the raw msgpack ``value``."""
    return b"\x85\xa1v\x01\xa4kind\xa3say\xa3rid\x05\xa4room\xa5lobby\xa4text" + value


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


_RNG = random.Random(0x2C4A7)

#: Frames no client would send, each at most MAX_FRAME bytes (so libzmq hands them over).
BOMBS: dict[str, bytes] = {
    # declared lengths far beyond the frame
    "array32 of 2**32-1 items": b"\xdd\xff\xff\xff\xff",
    "map32 of 2**32-1 pairs": b"\xdf\xff\xff\xff\xff",
    "map32 of 2**32-1 pairs holding 20 000": b"\xdf\xff\xff\xff\xff" + b"\xa1a\x01" * 20_000,
    "str32 of 4 GiB": b"\xdb\xff\xff\xff\xff" + b"x" * 100,
    "bin32 of 4 GiB": b"\xc6\xff\xff\xff\xff" + b"x" * 100,
    "ext32 of 4 GiB": b"\xc9\xff\xff\xff\xff\x01",
    "nick of str32 4 GiB": _hello_with(b"\xdb\xff\xff\xff\xff"),
    "text of array32 2**32-1 items": _say_with_text(b"\xdd\xff\xff\xff\xff"),
    "map16 of 65 535 pairs holding 1": b"\xde\xff\xff\xa1v\x01",
    # nesting deeper than any sane limit
    "arrays nested 65 000 deep": b"\x91" * 65_000,
    "maps nested 21 000 deep": b"\x81\xa1a" * 21_000,
    "nick of arrays nested 60 000 deep": _hello_with(b"\x91" * 60_000 + b"\xc0"),
    "text of maps nested 20 000 deep": _say_with_text(b"\x81\xa1a" * 20_000 + b"\xc0"),
    # extension types, timestamps (ext -1) among them
    "ext type 1 as rid": _ping_with_rid(b"\xd4\x01\x00"),
    "ext type 127 as rid": _ping_with_rid(b"\xc7\x05\x7fhello"),
    "ext type -128 as nick": _hello_with(b"\xd5\x80\x00\x00"),
    "timestamp32 as rid": _ping_with_rid(b"\xd6\xff\x00\x00\x00\x00"),
    "timestamp64 with out-of-range nanoseconds as rid": _ping_with_rid(b"\xd7\xff" + b"\xff" * 8),
    "timestamp96 at the far end of time as text": _say_with_text(b"\xc7\x0c\xff" + b"\xff" * 12),
    "timestamp of a length no timestamp has": _ping_with_rid(b"\xc7\x03\xff\x00\x00\x00"),
    "timestamp as the version": b"\x83\xa1v\xd6\xff\x00\x00\x00\x01\xa4kind\xa4ping\xa3rid\x05",
    "timestamp as a map key": b"\x81\xd6\xff\x00\x00\x00\x00\x01",
    "6 000 ext values": b"\xdd\x00\x00\x17\x70" + b"\xd7\x05" + b"\x00" * 8 + (b"\xd7\x05" + b"\x01" * 8) * 5999,
    "ext and bin fields in a hello": _pack(
        {"v": 1, "kind": "hello", "rid": 5, "nick": msgpack.ExtType(3, b"ann"), "client": b"\x00" * 40}
    ),
    # numbers and keys
    "NaN as rid": _ping_with_rid(b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00"),
    "infinity as version": b"\x83\xa1v\xcb\x7f\xf0\x00\x00\x00\x00\x00\x00\xa4kind\xa4ping\xa3rid\x05",
    "uint64 max as rid": _ping_with_rid(b"\xcf" + b"\xff" * 8),
    "int64 min as rid": _ping_with_rid(b"\xd3\x80" + b"\x00" * 7),
    "10 000 distinct keys": b"\xde\x27\x10" + b"".join(b"\xa4" + b"%04x" % i + b"\xc0" for i in range(10_000)),
    "bytes keys spelling a ping": b"\x83\xc4\x01v\x01\xc4\x04kind\xa4ping\xc4\x03rid\x07",
    "invalid UTF-8 in the kind": b"\x83\xa1v\x01\xa4kind\xa4p\xffng\xa3rid\x05",
    # no msgpack at all
    "random bytes filling the frame": _RNG.randbytes(MAX_FRAME),
    "a frame of MAX_FRAME zeros": bytes(MAX_FRAME),
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_a_msgpack_bomb_on_the_router_is_refused_and_harms_nobody(
    broker: RunningBroker, witness: Witness, zctx: Context, name: str
) -> None:
    frame = BOMBS[name]
    assert len(frame) <= MAX_FRAME
    mallory, _ = open_session(zctx, broker.router, "mallory")
    for dealer in (raw(zctx, zmq.DEALER, broker.router), mallory):  # without and with a session
        reply = ask(dealer, frame)
        assert isinstance(reply, ErrorReply) and reply.code in REFUSALS, reply
    pong = ask(mallory, envelope("ping", 9))
    assert isinstance(pong, Pong) and pong.rid == 9, "mallory's session survives"
    witness.check(name)


def test_thousands_of_random_frames_get_one_refusal_each(
    broker: RunningBroker, witness: Witness, zctx: Context
) -> None:
    rng = random.Random(20_240_604)
    frames = [rng.randbytes(rng.choice([1, 2, 3, 8, 64, 1000, rng.randrange(1, MAX_FRAME)])) for _ in range(2000)]
    mallory, _ = open_session(zctx, broker.router, "mallory")
    codes: list[ErrorCode] = []
    for start in range(0, len(frames), WINDOW):
        window = frames[start : start + WINDOW]
        for frame in window:
            mallory.send(frame)
        for _ in window:
            reply = recv_reply(mallory)
            assert isinstance(reply, ErrorReply), reply
            codes.append(reply.code)
    assert len(codes) == len(frames) and set(codes) <= REFUSALS
    assert isinstance(ask(mallory, envelope("ping", 9)), Pong)
    witness.check()


# -- junk on the XPUB ----------------------------------------------------------------------------


def xpub_junk(rng: random.Random) -> list[list[bytes]]:
    """Messages an XSUB may send: bombs as (un)subscriptions and as data, random bytes, multipart."""
    short = [bomb[: MAX_SUBSCRIPTION - 1] for bomb in BOMBS.values()]
    messages: list[list[bytes]] = []
    for bomb in short:
        messages += [[b"\x01" + bomb], [b"\x00" + bomb], [b"\x02" + bomb[:-1]]]
    messages += [[rng.randbytes(rng.randrange(1, MAX_SUBSCRIPTION))] for _ in range(100)]
    messages += [[b"\x01" + bomb, b"\x01" + bomb] for bomb in short[:10]]  # two subscriptions in one message
    messages += [[b""] * 100, [b"\x01p/"] * 50]
    return messages


def test_bombs_and_random_bytes_on_the_xpub_reach_nobody(
    broker: RunningBroker, witness: Witness, zctx: Context
) -> None:
    _, junker_topic = open_session(zctx, broker.router, "junker")
    xsub = raw(zctx, zmq.XSUB, broker.pub)
    xsub.send(b"\x01" + junker_topic)
    for message in xpub_junk(random.Random(7)):
        xsub.send_multipart(message)
    # Once the marker is back every message above was read; nothing but the junker's own
    # topic (nothing published there) may have reached the XSUB.
    assert barrier(xsub, junker_topic) == []
    witness.check()
    witness.newcomer_connects()  # its subscriptions are granted: the XPUB's queues realigned


# -- frames over the limits, multipart messages ----------------------------------------------------


def test_a_frame_of_exactly_max_frame_is_read_one_byte_more_drops_the_peer(
    broker: RunningBroker, witness: Witness, zctx: Context
) -> None:
    def say(size: int) -> bytes:
        """A say of ``size`` bytes: its text a str16 of as many characters as fit."""
        chars = size - len(_say_with_text(b"\xda\x00\x00"))
        return _say_with_text(b"\xda" + chars.to_bytes(2, "big") + b"x" * chars)

    mallory, _ = open_session(zctx, broker.router, "mallory", client="mallory-identity-0000000001")
    assert isinstance(ask(mallory, envelope("join", 2, room="lobby")), Joined)
    assert witness.alice.recv_event(WAIT).sender == "mallory"
    at_limit = say(MAX_FRAME)
    assert len(at_limit) == MAX_FRAME
    reply = ask(mallory, at_limit)
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.INVALID_TEXT, reply  # read, and refused

    monitor = mallory.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        mallory.send(say(MAX_FRAME + 1))
        wait_disconnected(monitor)  # libzmq dropped mallory before the broker read a byte of it
    finally:
        mallory.disable_monitor()
        monitor.close()
    witness.check("an oversized frame")
    # The DEALER reconnects on its own, as a new peer: its session is found again by identity.
    reply = ask(mallory, envelope("ping", 3))
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.NO_SESSION, reply
    welcome = ask(mallory, envelope("hello", 4, nick="mallory", client="mallory-identity-0000000001"))
    assert isinstance(welcome, Welcome) and welcome.resumed


@pytest.mark.parametrize(
    "frames",
    [
        [b"x" * (MAX_FRAME + 1)],
        [b"\x01" * (4 * 1024 * 1024)],
        [envelope("ping", 1), b"x" * (MAX_FRAME + 1)],
        [b"x" * (MAX_FRAME + 1), envelope("ping", 1)],
    ],
    ids=["just over", "4 MiB", "a ping then an oversized frame", "an oversized frame then a ping"],
)
def test_an_oversized_frame_drops_only_its_sender(
    broker: RunningBroker, witness: Witness, zctx: Context, frames: list[bytes]
) -> None:
    mallory = raw(zctx, zmq.DEALER, broker.router)
    assert isinstance(ask(mallory, envelope("ping", 1)), ErrorReply)  # connected (no session)
    monitor = mallory.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        mallory.send_multipart(frames)
        wait_disconnected(monitor)
    finally:
        mallory.disable_monitor()
        monitor.close()
    assert not mallory.poll(0), "an oversized message was answered"
    witness.check()


def test_an_oversized_message_on_the_xpub_drops_only_its_sender(
    broker: RunningBroker, witness: Witness, zctx: Context
) -> None:
    """A data message, and a subscription (the SUB reconnects without it)."""
    oversized = b"x" * MAX_SUBSCRIPTION
    for name, kind, message in (("XSUB", zmq.XSUB, b"\x02" + oversized), ("SUB", zmq.SUB, b"\x01p/" + oversized)):
        sock = zctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)  # before connecting: no event missed
        try:
            sock.connect(broker.pub)
            if kind == zmq.SUB:
                sock.subscribe(message[1:])
            else:
                sock.send(message)
            wait_disconnected(monitor)
        finally:
            sock.disable_monitor()
            monitor.close()
        witness.check(f"an oversized message from a {name}")
        assert not sock.poll(0)
    witness.newcomer_connects()


def test_multipart_requests_get_one_refusal_and_change_nothing(
    broker: RunningBroker, witness: Witness, zctx: Context
) -> None:
    mallory = raw(zctx, zmq.DEALER, broker.router)
    cases = [
        [envelope("hello", 1, nick="mallory"), b""],  # a valid hello with a trailing frame
        [b"", envelope("hello", 2, nick="mallory")],  # a REQ-style empty delimiter
        [envelope("hello", 3, nick="mallory")] * 2,
        [b"x"] * 10_000,
        [b""] * 1000,
    ]
    for frames in cases:
        mallory.send_multipart(frames)
        reply = recv_reply(mallory)
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.BAD_FRAMES, reply
        assert reply.reason.endswith(f"not {len(frames)}"), reply.reason
    reply = ask(mallory, envelope("ping", 4))
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.NO_SESSION, "no hello was applied"

    mallory, _ = open_session(zctx, broker.router, "mallory")
    assert isinstance(ask(mallory, envelope("join", 5, room="lobby")), Joined)
    assert witness.alice.recv_event(WAIT).sender == "mallory"
    mallory.send_multipart([envelope("say", 6, room="lobby", text="one"), envelope("say", 7, room="lobby", text="two")])
    reply = recv_reply(mallory)
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.BAD_FRAMES
    witness.check()  # neither say was published


# -- raw TCP below ZeroMQ --------------------------------------------------------------------------


def zmtp_greeting(mechanism: bytes = b"NULL", version: tuple[int, int] = (3, 0)) -> bytes:
    """A ZMTP 3 greeting (RFC 23): signature, version, mechanism, as-server, filler."""
    return b"\xff" + bytes(8) + b"\x7f" + bytes(version) + mechanism.ljust(20, b"\0") + b"\0" + bytes(31)


def zmtp_frame(body: bytes, *, command: bool = False, more: bool = False, declared: int | None = None) -> bytes:
    """A ZMTP frame of ``body``, declaring ``declared`` bytes if given (long form if over 255)."""
    size = len(body) if declared is None else declared
    flags = (0x04 if command else 0) | (0x01 if more else 0)
    if size > 255:
        return bytes([flags | 0x02]) + size.to_bytes(8, "big") + body
    return bytes([flags, size]) + body


def zmtp_property(name: bytes, value: bytes, declared: int | None = None) -> bytes:
    size = len(value) if declared is None else declared
    return bytes([len(name)]) + name + size.to_bytes(4, "big") + value


def zmtp_ready(socket_type: bytes) -> bytes:
    return zmtp_frame(b"\x05READY" + zmtp_property(b"Socket-Type", socket_type), command=True)


@dataclass(frozen=True)
class Junk:
    """Bytes for a raw TCP connection: ``before`` at once; ``after`` once the broker's ZMTP
    greeting is in (None: nothing more). ``closes``: the broker must hang up."""

    before: bytes
    after: bytes | None = None
    closes: bool = True


def tcp_junk(socket_type: bytes) -> dict[str, Junk]:
    """What a port scanner, a confused client or an attacker may send to a port of ours;
    ``socket_type`` is a type the port accepts (DEALER on the ROUTER, XSUB on the XPUB)."""
    rng = random.Random(11)
    hello = zmtp_greeting()
    ready = zmtp_ready(socket_type)
    return {
        # Anything not starting with 0xff is read as ZMTP 1.0: a length, flags, a body...
        "an HTTP request": Junk(b"GET / HTTP/1.1\r\nHost: zchat\r\n\r\n", closes=False),
        "4 KiB of random bytes": Junk(rng.randbytes(4096), closes=False),
        "4 KiB of zeros": Junk(bytes(4096)),
        "4 KiB of 0xff": Junk(b"\xff" * 4096),
        "a TLS ClientHello": Junk(bytes.fromhex("1603010200010001fc0303") + bytes(512)),
        "ZMTP 1.0 identity of 2**63-1 bytes": Junk(b"\xff" + (2**63 - 1).to_bytes(8, "big") + b"\x00" + bytes(100)),
        "ZMTP 1.0 frame of 2**62 bytes": Junk(b"\x01\x00\xff" + (2**62).to_bytes(8, "big") + b"\x00" + bytes(100)),
        "ZMTP 2.0 frame of 2**63 bytes": Junk(b"\xff" + bytes(8) + b"\x7f\x01\x06\x00\x00\x02\xff" + bytes(8)),
        # ZMTP 3: a greeting, then broken commands or frames
        "the CURVE mechanism": Junk(zmtp_greeting(b"CURVE"), bytes(100)),
        "the PLAIN mechanism": Junk(zmtp_greeting(b"PLAIN"), bytes(100)),
        "a mechanism of 0xff bytes": Junk(zmtp_greeting(b"\xff" * 20), bytes(100)),
        "a command of 2**63-1 bytes": Junk(hello, zmtp_frame(b"\x05READY", command=True, declared=2**63 - 1)),
        "a command of 2**64-1 bytes": Junk(hello, zmtp_frame(b"\x05READY", command=True, declared=2**64 - 1)),
        "a READY property of 4 GiB": Junk(
            hello, zmtp_frame(b"\x05READY" + zmtp_property(b"Socket-Type", socket_type, 2**32 - 1), command=True)
        ),
        "a READY property name past its end": Junk(hello, zmtp_frame(b"\x05READY\xffSocket", command=True)),
        "a READY of a PUB socket": Junk(hello, zmtp_ready(b"PUB")),
        "HELLO instead of READY": Junk(hello, zmtp_frame(b"\x05HELLO" + bytes(100), command=True)),
        "an ERROR command": Junk(hello, zmtp_frame(b"\x05ERROR\x05hello", command=True)),
        "a message before READY": Junk(hello, zmtp_frame(b"hello")),
        "a frame of 2**63-1 bytes": Junk(hello, ready + zmtp_frame(b"", declared=2**63 - 1)),
        "a frame of 2**64-1 bytes": Junk(hello, ready + zmtp_frame(b"", declared=2**64 - 1)),
        "a SUBSCRIBE command of 2**40 bytes": Junk(
            zmtp_greeting(version=(3, 1)), ready + zmtp_frame(b"\x09SUBSCRIBE", command=True, declared=2**40)
        ),
        # well-formed ZMTP carrying nonsense: the connection may stay, the broker must not care
        "reserved flag bits": Junk(hello, ready + b"\xf8\x05hello", closes=False),
        "a message of 10 000 frames that never ends": Junk(hello, ready + b"\x01\x00" * 10_000, closes=False),
        "version 255.255": Junk(zmtp_greeting(version=(255, 255)), ready, closes=False),
        "a SUBSCRIBE command to p/": Junk(
            zmtp_greeting(version=(3, 1)), ready + zmtp_frame(b"\x09SUBSCRIBEp/", command=True), closes=False
        ),
        "a greeting cut short": Junk(hello[:11], closes=False),
    }


def tcp_connect(endpoint: str) -> socket.socket:
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=WAIT)


def recv_exact(conn: socket.socket, size: int) -> bytes | None:
    """``size`` bytes, or None if the peer hung up first."""
    data = b""
    while len(data) < size:
        try:
            chunk = conn.recv(size - len(data))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        data += chunk
    return data


def hung_up(conn: socket.socket, timeout: float = WAIT) -> bool:
    """Whether the peer closes ``conn`` within ``timeout`` (what it sends meanwhile is read)."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        conn.settimeout(remaining)
        try:
            if not conn.recv(65536):
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
    return False


def send_junk(endpoint: str, junk: Junk) -> socket.socket:
    """Open a TCP connection to ``endpoint`` and send ``junk`` (waiting for the greeting)."""
    conn = tcp_connect(endpoint)
    try:
        conn.sendall(junk.before)
    except (BrokenPipeError, ConnectionResetError):
        return conn
    # libzmq must have sent its greeting before the rest comes: it hangs up on a READY
    # that arrives with the greeting's tail, a client that does not wait would not connect.
    if junk.after is not None and recv_exact(conn, 64) is not None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.sendall(junk.after)
    return conn


def test_a_hand_made_zmtp_client_is_served(broker: RunningBroker) -> None:
    """The control for the junk below: these helpers speak ZMTP well enough to get a welcome,
    so the junk reaches the same parser a real client's bytes do."""
    conn = tcp_connect(broker.router)
    try:
        conn.sendall(zmtp_greeting())
        greeting = recv_exact(conn, 64)
        assert greeting is not None and (greeting[0], greeting[9], greeting[12:16]) == (0xFF, 0x7F, b"NULL")
        conn.sendall(zmtp_ready(b"DEALER") + zmtp_frame(envelope("hello", 1, nick="handmade")))
        command = _read_zmtp_frame(conn)
        assert command.startswith(b"\x05READY") and b"ROUTER" in command
        welcome = decode_reply(_read_zmtp_frame(conn))
        assert isinstance(welcome, Welcome) and welcome.nick == "handmade"
    finally:
        conn.close()


def _read_zmtp_frame(conn: socket.socket) -> bytes:
    head = recv_exact(conn, 1)
    assert head is not None
    size_bytes = recv_exact(conn, 8 if head[0] & 0x02 else 1)
    assert size_bytes is not None
    body = recv_exact(conn, int.from_bytes(size_bytes, "big"))
    assert body is not None
    return body


@pytest.mark.parametrize("port", ["router", "pub"])
def test_raw_tcp_junk_is_hung_up_on_and_harms_nobody(broker: RunningBroker, witness: Witness, port: str) -> None:
    endpoint, socket_type = (broker.router, b"DEALER") if port == "router" else (broker.pub, b"XSUB")
    still_open: list[socket.socket] = []
    try:
        for name, junk in tcp_junk(socket_type).items():
            conn = send_junk(endpoint, junk)
            if junk.closes:
                assert hung_up(conn), f"the broker kept a connection that sent {name}"
                conn.close()
            else:
                still_open.append(conn)
            witness.check(name)
        witness.newcomer_connects()  # with the lingering connections still open
    finally:
        for conn in still_open:
            conn.close()
    witness.check()


# -- forged fields -----------------------------------------------------------------------------------


def test_forged_sender_seq_id_and_ts_are_replaced_by_the_brokers(
    broker: RunningBroker, witness: Witness, zctx: Context
) -> None:
    forged = {"sender": "alice", "seq": 999, "id": 1, "ts": 0.0, "nick": "alice", "kind_": "message"}
    mallory, _ = open_session(zctx, broker.router, "mallory")
    assert isinstance(ask(mallory, envelope("join", 2, room="lobby", sender="alice")), Joined)
    assert witness.alice.recv_event(WAIT).sender == "mallory"

    said = ask(mallory, envelope("say", 3, room="lobby", text="trust me", to="bob", **forged))
    assert isinstance(said, Sent)
    event = witness.alice.recv_event(WAIT)
    assert (event.kind, event.sender, event.to, event.id, event.ts, event.seq) == (
        EventKind.MESSAGE, "mallory", None, said.id, said.ts, said.seq
    )
    assert said.seq != 999 and said.id != 1

    dm = ask(mallory, envelope("dm", 4, to="alice", text="psst", room="lobby", **forged))
    assert isinstance(dm, Sent)
    event = witness.alice.recv_event(WAIT)
    assert (event.kind, event.sender, event.to, event.room, event.id, event.seq) == (
        EventKind.DM, "mallory", "alice", None, dm.id, dm.seq
    )

    # What is stored (and served to whoever reads the history later) is stamped the same way.
    page = ask(mallory, envelope("history", 5, room="lobby", after=0))
    assert isinstance(page, HistoryPage)
    assert [(e.sender, e.text) for e in page.events if e.kind is EventKind.MESSAGE] == [("mallory", "trust me")]
    page = ask(mallory, envelope("history", 6, dm=True, after=0))
    assert isinstance(page, HistoryPage)
    assert [(e.sender, e.to, e.text) for e in page.events] == [("mallory", "alice", "psst")]
    witness.check()


# -- subscriptions that guess --------------------------------------------------------------------


def guesses_at(topic: bytes, other: bytes) -> list[bytes]:
    """Subscriptions someone who does not know ``topic`` might try, and some who half does."""
    hex_digits = topic[2:-1]
    flipped = bytes([hex_digits[-1] ^ 1]) if chr(hex_digits[-1] ^ 1) in "0123456789abcdef" else b"0"
    return sorted({
        b"",
        *(bytes([byte]) for byte in range(256)),  # every single-byte prefix: b"p", b"q", b"r", b"d"...
        b"p/", b"q/", b"r/", b"d:", b"d/", b"p/0", b"P/",
        *(topic[:n] for n in range(3, len(topic))),  # every proper prefix of the topic
        topic[:-2] + flipped + b"/",  # the last digit off
        topic.upper(),
        topic[:-1],
        topic + b"x",
        topic + b"sync/",  # a sync without a nonce
        topic + b"sync/" + b"x" * 40,  # a sync with a nonce over the limit
        other[:-1],
        b"p/" + b"0" * 32 + b"/",
        new_private_topic(),
    })


def dm_window(sender: Socket, to: str, texts: list[str], rids: Iterator[int]) -> list[Sent]:
    """Send a DM per text without waiting, then collect the acknowledgements."""
    for text in texts:
        sender.send(envelope("dm", next(rids), to=to, text=text))
    replies = [recv_reply(sender) for _ in texts]
    sent = [reply for reply in replies if isinstance(reply, Sent)]
    assert len(sent) == len(replies), [reply for reply in replies if not isinstance(reply, Sent)][:3]
    return sent


def dms_on(sub: Socket, count: int, timeout: float = WAIT) -> list[Event]:
    """The next ``count`` DM events ``sub`` receives (ticks and syncs skipped)."""
    return events_on(sub, None, count, {EventKind.DM}, timeout)


def denied(rb: RunningBroker) -> int:
    """How many subscriptions the broker has refused (read on its loop's thread)."""
    count: int = rb.broker.submit(lambda: rb.broker.core.stats.subscriptions_denied).result(WAIT)
    return count


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_guessed_subscriptions_receive_none_of_thousands_of_dms(
    broker: RunningBroker, witness: Witness, client_factory: Callable[..., Client], zctx: Context
) -> None:
    observer = client_factory()  # a live private topic for the spies' barriers
    observer_topic = observer.connect("observer").topic.encode()
    carol, carol_topic = open_session(zctx, broker.router, "carol")
    dave, dave_topic = open_session(zctx, broker.router, "dave")
    carol_sub = subscriber(zctx, broker.pub, carol_topic)
    assert barrier(carol_sub, carol_topic) == []  # granted: the sync on it came back
    guesses = guesses_at(carol_topic, dave_topic)
    denied_before = denied(broker)
    spy = subscriber(zctx, broker.pub, *guesses, observer_topic)
    xspy = raw(zctx, zmq.XSUB, broker.pub)
    for guess in [*guesses, observer_topic]:
        xspy.send(b"\x01" + guess)
    assert barrier(spy, observer_topic) == []
    assert barrier(xspy, observer_topic) == []
    assert denied(broker) - denied_before == 2 * len(guesses), "every guess was read, and refused"

    rounds, window = 15, WINDOW  # 1500 DMs each way: 3000 publications on carol's topic
    rids = itertools.count(10)
    for r in range(rounds):
        texts = [f"secret {r}-{i}" for i in range(window)]
        dm_window(dave, "carol", texts, rids)
        dm_window(carol, "dave", texts, rids)
    received = dms_on(carol_sub, 2 * rounds * window)
    assert [e.seq for e in received] == list(range(1, 2 * rounds * window + 1))  # all, once, in order
    assert {(e.sender, e.to) for e in received} == {("dave", "carol"), ("carol", "dave")}
    leaked = {"sub": barrier(spy, observer_topic), "xsub": barrier(xspy, observer_topic)}
    assert leaked == {"sub": [], "xsub": []}, {k: len(v) for k, v in leaked.items()}
    witness.check()


@pytest.mark.parametrize("ending", ["bye", "timeout"])
def test_a_dead_sessions_topic_gets_nothing_more(
    broker_factory: Callable[..., RunningBroker], zctx: Context, ending: str
) -> None:
    rb = broker_factory(BrokerConfig(session_timeout=2.0) if ending == "timeout" else None)
    clients: list[Client] = []
    try:
        witness = make_witness(rb.router, rb.pub, clients)
        _check_dead_topic(rb, witness, zctx, ending)
    finally:
        for client in clients:
            client.close()


def _check_dead_topic(rb: RunningBroker, witness: Witness, zctx: Context, ending: str) -> None:
    observer = Client(rb.router, rb.pub, timeout=WAIT)  # kept alive by its heartbeats
    try:
        observer_topic = observer.connect("observer").topic.encode()
        identity = "carol-identity-00000000000001"
        carol, old_topic = open_session(zctx, rb.router, "carol", client=identity)
        assert isinstance(ask(carol, envelope("join", 2, room="lobby")), Joined)
        assert witness.alice.recv_event(WAIT).sender == "carol"
        ghost = subscriber(zctx, rb.pub, old_topic, observer_topic)  # carol's own SUB, kept open
        assert barrier(ghost, old_topic) == []  # granted while carol lives

        if ending == "bye":
            assert isinstance(ask(carol, envelope("bye", 3)), Goodbye)
        left = witness.alice.recv_event(WAIT)  # a timeout: within 2 s plus a sweep
        reason = "quit" if ending == "bye" else "timed out"
        assert (left.kind, left.sender, left.text) == (EventKind.LEAVE, "carol", reason)

        late = subscriber(zctx, rb.pub, old_topic, observer_topic)  # asks for the dead topic now
        assert barrier(late, observer_topic) == []
        # carol is back with the same identity: a new session, a new topic, the same inbox.
        carol, new_topic = open_session(zctx, rb.router, "carol", client=identity)
        assert new_topic != old_topic
        carol_sub = subscriber(zctx, rb.pub, new_topic)
        assert barrier(carol_sub, new_topic) == []
        dave, _ = open_session(zctx, rb.router, "dave")
        rids = itertools.count(10)
        texts = [f"for carol {i}" for i in range(WINDOW)]
        for _ in range(3):
            dm_window(dave, "carol", texts, rids)
            dm_window(carol, "dave", texts, rids)
        assert [e.text for e in dms_on(carol_sub, 6 * WINDOW)] == texts * 6
        assert barrier(ghost, observer_topic) == []
        assert barrier(late, observer_topic) == []
        witness.check()
    finally:
        observer.close()


# -- memory ----------------------------------------------------------------------------------------


def peak_rss(pid: int) -> int:
    """The most memory process ``pid`` has held resident so far (Linux's VmHWM), in bytes.

    The peak, not the current size: memory an attack made the broker allocate counts even if
    it was given back before the measurement.
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM line")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Attacker:
    """Every attack above, once per :meth:`round`, against one broker."""

    ctx: Context
    router: str
    pub: str
    rng: random.Random = field(default_factory=lambda: random.Random(5))
    rounds: Iterator[int] = field(default_factory=itertools.count)

    def round(self) -> None:
        n = next(self.rounds)
        mallory, topic = open_session(self.ctx, self.router, f"mallory{n}")
        try:
            frames = [*BOMBS.values(), *(self.rng.randbytes(self.rng.randrange(1, 2000)) for _ in range(60))]
            for frame in frames:
                mallory.send(frame)
            for _ in frames:
                assert isinstance(recv_reply(mallory), ErrorReply)
            mallory.send_multipart([b"x"] * 100)
            assert isinstance(recv_reply(mallory), ErrorReply)
            self.xpub_junk(topic)
            self.tcp_junk()
            self.oversized()
            assert isinstance(ask(mallory, envelope("bye", 1)), Goodbye)
        finally:
            mallory.close()

    def xpub_junk(self, topic: bytes) -> None:
        xsub = raw(self.ctx, zmq.XSUB, self.pub)
        try:
            xsub.send(b"\x01" + topic)
            for message in xpub_junk(self.rng):
                xsub.send_multipart(message)
            assert barrier(xsub, topic) == []
        finally:
            xsub.close()

    def tcp_junk(self) -> None:
        for endpoint, socket_type in ((self.router, b"DEALER"), (self.pub, b"XSUB")):
            for junk in tcp_junk(socket_type).values():
                conn = send_junk(endpoint, junk)
                if junk.closes:
                    assert hung_up(conn)
                conn.close()

    def oversized(self) -> None:
        dealer = raw(self.ctx, zmq.DEALER, self.router)
        monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            dealer.send(b"x" * (MAX_FRAME + 1))
            wait_disconnected(monitor)
        finally:
            dealer.disable_monitor()
            monitor.close()
            dealer.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_memory_and_descriptors_stay_bounded_under_attack(
    broker_process: Callable[..., BrokerProcess], zctx: Context
) -> None:
    bp = broker_process("--store", "memory")
    pid = bp.proc.pid
    clients: list[Client] = []
    try:
        witness = make_witness(bp.router, bp.pub, clients)
        attacker = Attacker(zctx, bp.router, bp.pub)
        for _ in range(2):  # warm-up: the allocator's pools, libzmq's buffers, Python's caches
            attacker.round()
        witness.check()
        rss_before, fds_before = peak_rss(pid), open_fds(pid)
        for n in range(8):
            attacker.round()
            witness.check(f"round {n}")
        rss_after = peak_rss(pid)
        growth = rss_after - rss_before
        assert growth < RSS_BOUND, f"peak RSS grew by {growth / 2**20:.1f} MiB ({rss_before} -> {rss_after})"
        # Every junk connection is closed: libzmq releases their descriptors soon after.
        deadline = time.monotonic() + WAIT
        while open_fds(pid) > fds_before + 4:
            assert time.monotonic() < deadline, f"descriptors: {fds_before} before, {open_fds(pid)} after"
            time.sleep(0.05)
        witness.newcomer_connects()
        assert bp.proc.poll() is None
    finally:
        for client in clients:
            client.close()


@pytest.mark.xfail(
    strict=True,
    reason="libzmq bounds the size of each frame (ZMQ_MAXMSGSIZE), not the number of frames of a "
    "message, and buffers a whole multipart message before the broker can read (and discard) it: "
    "one peer makes the broker hold as much memory as it sends in one message.",
)
@pytest.mark.parametrize("port", ["router", "pub"])
@pytest.mark.timeout(60)
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_one_multipart_message_cannot_grow_the_broker_without_bound(
    broker_process: Callable[..., BrokerProcess], zctx: Context, port: str
) -> None:
    bp = broker_process("--store", "memory")
    clients: list[Client] = []
    try:
        witness = make_witness(bp.router, bp.pub, clients)
        _, topic = open_session(zctx, bp.router, "mallory")
        rss_before = peak_rss(bp.proc.pid)
        frame_size = MAX_FRAME - 100 if port == "router" else MAX_SUBSCRIPTION - 10
        total = 64 * 1024 * 1024  # frames each within the limit, 64 MiB together
        sock = raw(zctx, zmq.DEALER if port == "router" else zmq.XSUB, bp.router if port == "router" else bp.pub)
        if port == "pub":
            sock.send(b"\x01" + topic)
        sock.setsockopt(zmq.SNDHWM, 0)
        frame = b"\x02" * frame_size
        for _ in range(total // frame_size):
            sock.send(frame, zmq.SNDMORE)
        sock.send(frame)
        if port == "router":
            reply = recv_reply(sock, timeout=30)
            assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.BAD_FRAMES
        else:
            assert barrier(sock, topic, timeout=30) == []
        witness.check()
        growth = peak_rss(bp.proc.pid) - rss_before
        assert growth < RSS_BOUND, f"peak RSS grew by {growth / 2**20:.1f} MiB for one {total / 2**20:.0f} MiB message"
    finally:
        for client in clients:
            client.close()


# -- private rooms, keys and flooding --------------------------------------------------------------


@dataclass
class Secure:
    """A broker in secure mode (CURVE, ZAP) and the key pairs made for it."""

    rb: RunningBroker
    server: KeyPair
    keys: Path
    authorized: Path

    def key(self, name: str, *, authorize: bool = True) -> KeyPair:
        pair = write_key_pair(self.keys, name)
        if authorize:
            shutil.copy(self.keys / f"{name}.key", self.authorized / f"{name}.key")
        return pair


def secure_broker(factory: Callable[..., RunningBroker], tmp_path: Path, **config: Any) -> Secure:
    keys, authorized = tmp_path / "keys", tmp_path / "authorized"
    keys.mkdir(mode=0o700)
    authorized.mkdir()
    server = write_key_pair(keys, "server")
    rb = factory(BrokerConfig(curve_secret_key=keys / "server.key_secret", authorized_keys=authorized,
                              store="memory", **config))
    return Secure(rb, server, keys, authorized)


@pytest.fixture
def secure(broker_factory: Callable[..., RunningBroker], tmp_path: Path) -> Secure:
    return secure_broker(broker_factory, tmp_path)


def curve_socket(ctx: Context, kind: int, server: str, pair: KeyPair | None) -> Socket:
    """A raw socket set up as a CURVE client of ``server`` with ``pair`` (plain if None),
    not yet connected."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if pair is not None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, server.encode())
        sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public.encode())
        sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret.encode())
    return sock


def curve(ctx: Context, kind: int, endpoint: str, server: str, pair: KeyPair | None) -> Socket:
    """:func:`curve_socket`, connected to ``endpoint``."""
    sock = curve_socket(ctx, kind, server, pair)
    sock.connect(endpoint)
    return sock


@dataclass
class Party:
    """Someone speaking the protocol by hand: a DEALER, a SUB holding its private topic."""

    nick: str
    dealer: Socket
    sub: Socket
    topic: bytes
    rids: Iterator[int] = field(default_factory=lambda: itertools.count(100))

    def ask(self, kind: str, **fields: Any) -> Reply:
        return ask(self.dealer, envelope(kind, next(self.rids), **fields))

    def listen(self, topic: bytes) -> list[list[bytes]]:
        """Subscribe to ``topic``; wait until that (and all before) is decided; what came meanwhile."""
        self.sub.subscribe(topic)
        return barrier(self.sub, self.topic)


def party(ctx: Context, rb: RunningBroker, nick: str, *, server: str = "", pair: KeyPair | None = None,
          client: str | None = None) -> Party:
    dealer = curve(ctx, zmq.DEALER, rb.router, server, pair)
    sub = curve(ctx, zmq.SUB, rb.pub, server, pair)
    welcome = ask(dealer, envelope("hello", 1, nick=nick, **({"client": client} if client else {})))
    assert isinstance(welcome, Welcome), welcome
    topic = welcome.topic.encode()
    sub.subscribe(topic)
    assert barrier(sub, topic) == []  # granted
    return Party(nick, dealer, sub, topic)


def say_window(speaker: Party, room: str, texts: list[str]) -> list[Sent]:
    for text in texts:
        speaker.dealer.send(envelope("say", next(speaker.rids), room=room, text=text))
    replies = [recv_reply(speaker.dealer) for _ in texts]
    sent = [reply for reply in replies if isinstance(reply, Sent)]
    assert len(sent) == len(replies), [reply for reply in replies if not isinstance(reply, Sent)][:3]
    return sent


def events_on(
    sub: Socket, topic: bytes | None, count: int, kinds: set[EventKind], timeout: float = WAIT
) -> list[Event]:
    """The next ``count`` events of ``kinds`` that ``sub`` receives on ``topic`` (None: any)."""
    deadline = time.monotonic() + timeout
    events: list[Event] = []
    while len(events) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not sub.poll(int(remaining * 1000) + 1):
            raise AssertionError(f"{len(events)} of {count} events arrived within {timeout} s")
        where, frame = sub.recv_multipart()
        event = decode_event(frame)
        if (topic is None or where == topic) and event.kind in kinds:
            events.append(event)
    return events


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["insecure", "secure"])
def test_a_kicked_member_that_keeps_listening_gets_nothing_more(
    broker_factory: Callable[..., RunningBroker], tmp_path: Path, zctx: Context, mode: str
) -> None:
    """mallory ignores her kick: her SUB keeps the room's old topic and, in secure mode, asks
    for the new one as well (as if a member had leaked it). Over two thousand messages after
    the kick she receives none; the members who stay receive all of them."""
    if mode == "secure":
        sec = secure_broker(broker_factory, tmp_path)
        rb, server = sec.rb, sec.server.public
        pairs: dict[str, KeyPair | None] = {nick: sec.key(nick) for nick in ("alice", "bob", "mallory")}
    else:
        rb, server, pairs = broker_factory(), "", dict.fromkeys(("alice", "bob", "mallory"))
    alice, bob, mallory = (party(zctx, rb, nick, server=server, pair=pairs[nick]) for nick in pairs)
    joined = alice.ask("join", room="den", private=True)
    assert isinstance(joined, Joined) and joined.private
    old_topic = joined.topic.encode()
    for member in (bob, mallory):
        assert isinstance(alice.ask("invite", room="den", nick=member.nick), Moderated)
        assert isinstance(member.ask("join", room="den"), Joined)
        member.listen(old_topic)
    barrier(mallory.sub, mallory.topic)  # what reached her before the kick: not counted

    assert isinstance(alice.ask("kick", room="den", nick="mallory", reason="out"), Moderated)
    [rekey] = events_on(bob.sub, bob.topic, 1, {EventKind.REKEY})
    new_topic = rekey.text.encode()
    assert new_topic != old_topic and rekey.room == "den"
    bob.listen(new_topic)
    bob.sub.unsubscribe(old_topic)
    denied_before = denied(rb)
    if mode == "secure":
        mallory.sub.subscribe(new_topic)  # leaked to her: her key is no member any more
    refused = mallory.ask("join", room="den")
    assert isinstance(refused, ErrorReply) and refused.code is ErrorCode.NOT_INVITED
    refused = mallory.ask("say", room="den", text="still here?")
    assert isinstance(refused, ErrorReply) and refused.code is ErrorCode.NOT_MEMBER

    rounds = 10
    for r in range(rounds):
        texts = [f"after the kick {r}-{i}" for i in range(WINDOW)]
        say_window(alice, "den", texts)
        say_window(bob, "den", texts)
    heard = events_on(bob.sub, new_topic, 2 * rounds * WINDOW, {EventKind.MESSAGE})
    assert [e.seq for e in heard] == list(range(1, 2 * rounds * WINDOW + 1))
    seen = barrier(mallory.sub, mallory.topic)
    told = [decode_event(frame) for topic, frame in seen if topic == mallory.topic]
    assert [(e.kind, e.room, e.nick) for e in told] == [(EventKind.KICK, "den", "mallory")]
    assert [topic for topic, _ in seen if topic != mallory.topic] == [], "mallory heard the room after her kick"
    if mode == "secure":
        assert denied(rb) - denied_before == 1, "her subscription to the new topic was refused"


@pytest.mark.timeout(60)
def test_a_second_key_cannot_take_a_registered_nick_a_lookalike_or_a_session(
    secure: Secure, zctx: Context
) -> None:
    alice_key, mallory_key = secure.key("alice"), secure.key("mallory")
    server, rb = secure.server.public, secure.rb
    identity = "alice-identity-0000000000001"
    alice = party(zctx, rb, "alice", server=server, pair=alice_key, client=identity)
    # Case, width, Cyrillic а and е, I for l, Latin alpha, 1 for l, mathematical bold.
    lookalikes = ["alice", "Alice", "ALICE", "ａｌｉｃｅ", "\u0430lice", "alic\u0435", "aIice", "\u0251lice", "a1ice",
                  "\U0001d41a\U0001d425\U0001d422\U0001d41c\U0001d41e"]
    claims: dict[str, object] = {}
    for nick in lookalikes:
        dealer = curve(zctx, zmq.DEALER, rb.router, server, mallory_key)
        reply = ask(dealer, envelope("hello", 1, nick=nick))
        claims[nick] = reply.code if isinstance(reply, ErrorReply) else type(reply).__name__
        dealer.close()
    thief = curve(zctx, zmq.DEALER, rb.router, server, mallory_key)
    stolen = ask(thief, envelope("hello", 1, nick="x", client=identity))
    assert isinstance(stolen, ErrorReply) and stolen.code is ErrorCode.UNAUTHORIZED, "resumed with another key"

    mallory = party(zctx, rb, "mallory", server=server, pair=mallory_key)
    for nick in lookalikes:
        reply = mallory.ask("nick", nick=nick)
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.NICK_TAKEN, (nick, reply)
    # alice leaves: her nick stays hers (the store remembers which key registered it).
    assert isinstance(alice.ask("bye"), Goodbye)
    reply = mallory.ask("nick", nick="Alice")
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.NICK_TAKEN
    dealer = curve(zctx, zmq.DEALER, rb.router, server, mallory_key)
    reply = ask(dealer, envelope("hello", 1, nick="alice"))
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.NICK_TAKEN
    assert claims == dict.fromkeys(lookalikes, ErrorCode.NICK_TAKEN)

    # alice is back (her nick, her key) and mallory subscribes to her private topic, leaked.
    alice = party(zctx, rb, "alice", server=server, pair=alice_key, client=identity)
    denied_before = denied(rb)
    mallory.sub.subscribe(alice.topic)
    assert barrier(mallory.sub, mallory.topic) == []
    assert denied(rb) - denied_before == 1
    bob = party(zctx, rb, "bob", server=server, pair=secure.key("bob"))
    for r in range(5):
        texts = [f"for alice {r}-{i}" for i in range(WINDOW)]
        dm_window(bob.dealer, "alice", texts, bob.rids)
    assert len(dms_on(alice.sub, 5 * WINDOW)) == 5 * WINDOW
    assert barrier(mallory.sub, mallory.topic) == []


@pytest.mark.timeout(60)
def test_unknown_keys_and_a_wrong_server_key_get_nothing_on_either_port(secure: Secure, zctx: Context) -> None:
    server, rb = secure.server.public, secure.rb
    alice = party(zctx, rb, "alice", server=server, pair=secure.key("alice"))
    assert isinstance(alice.ask("join", room="general"), Joined)
    alice.listen(b"r/general/")
    unknown, impostor = secure.key("unknown", authorize=False), secure.key("impostor", authorize=False)
    attempts = {
        "an unknown key": (server, unknown),
        "a wrong server key": (impostor.public, secure.key("carol")),
        "no key (NULL)": (server, None),
    }
    outsiders: dict[str, tuple[Socket, Socket]] = {}  # name -> (socket, its monitor)
    for name, (server_key, pair) in attempts.items():
        for kind, endpoint in ((zmq.DEALER, rb.router), (zmq.SUB, rb.pub), (zmq.XSUB, rb.pub)):
            sock = curve_socket(zctx, kind, server_key, pair)
            outsiders[f"{name}, {sock.type!r}"] = sock, sock.get_monitor_socket()  # before connecting
            sock.connect(endpoint)
            if kind == zmq.DEALER:
                sock.send(envelope("hello", 1, nick="outsider"))
            elif kind == zmq.SUB:
                for topic in (b"", b"r/general/", alice.topic):
                    sock.subscribe(topic)
            else:
                sock.send(b"\x01")
                sock.send(b"\x01r/general/")
    for name, (sock, monitor) in outsiders.items():
        try:
            assert handshake_outcome(monitor) != zmq.EVENT_HANDSHAKE_SUCCEEDED, f"{name} completed a handshake"
        finally:
            sock.disable_monitor()
            monitor.close()
    for conn in (send_junk(endpoint, Junk(zmtp_greeting(), zmtp_ready(b"DEALER"))) for endpoint in (rb.router, rb.pub)):
        assert hung_up(conn), "a NULL handshake was accepted by a CURVE broker"
        conn.close()

    texts = [f"public {i}" for i in range(WINDOW)]
    say_window(alice, "general", texts)
    assert [e.text for e in events_on(alice.sub, b"r/general/", WINDOW, {EventKind.MESSAGE})] == texts
    assert [name for name, (sock, _) in outsiders.items() if sock.poll(0)] == []
    members = alice.ask("who", room="general")
    assert isinstance(members, Members) and members.members == ("alice",)
    assert rb.broker.zap is not None and rb.broker.zap.refused >= 3


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_one_key_flooding_from_many_sessions_gets_one_budget(
    broker_factory: Callable[..., RunningBroker], tmp_path: Path, zctx: Context
) -> None:
    """A key may hold several sessions (each with its own client identity): they share the
    key's budget, so opening more of them floods no faster; another key's round trips stay
    short meanwhile."""
    rate, burst, lasting = 50.0, 100, 1.0
    sec = secure_broker(broker_factory, tmp_path, rate_limits=RateLimits(messages=Rate(rate, burst), strikes=0))
    flooder_key, server = sec.key("flooder"), sec.server.public
    floods = [party(zctx, sec.rb, "flooder", server=server, pair=flooder_key, client=f"flood-identity-{i:012d}")
              for i in range(5)]
    for flood in floods:
        assert isinstance(flood.ask("join", room="general"), Joined)
    bystander = Client(sec.rb.router, sec.rb.pub, timeout=WAIT, server_key=str(sec.keys / "server.key"),
                       key=sec.key("bystander"))
    try:
        bystander.connect("bystander")
        counts = {"sent": 0, "limited": 0}
        round_trips: list[float] = []
        started = time.monotonic()
        while time.monotonic() - started < lasting:  # every session pipelines a window at once
            for flood in floods:
                for _ in range(WINDOW):
                    flood.dealer.send(envelope("say", next(flood.rids), room="general", text="x" * 100))
            round_trips.append(bystander.ping())
            for flood in floods:
                for _ in range(WINDOW):
                    reply = recv_reply(flood.dealer)
                    if isinstance(reply, Sent):
                        counts["sent"] += 1
                    else:
                        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.RATE_LIMITED, reply
                        counts["limited"] += 1
        span = time.monotonic() - started
        assert counts["limited"] > 0
        assert burst <= counts["sent"] <= burst + rate * span + 1, (counts, span)  # one bucket for the key
        assert max(round_trips) < MAX_RTT, round_trips
    finally:
        bystander.close()
