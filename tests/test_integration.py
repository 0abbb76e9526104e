"""Integration tests: a real broker on loopback, blocking clients and raw ZeroMQ sockets.

Each test starts its own broker on ``tcp://127.0.0.1:*`` (one test uses ``inproc://``, see its
docstring), talks to it with :class:`~zchat.client.Client`, :class:`~zchat.client.AsyncClient`
or hand-made DEALER/SUB/XSUB sockets, and checks what every party sees.

Nothing waits with a fixed sleep. A *negative* check ("this socket received nothing") is made
exact with a barrier: the observer also holds a granted private topic and asks the broker for
a ``sync`` marker on it (see ``zchat.common.topics``); the broker handles one pipe's
subscriptions in order and the XPUB delivers one pipe's publications in order, so anything
the observer was ever going to receive arrives before the marker.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import pytest
import zmq
from tests import support
from tests.support import barrier

from zchat.broker import Broker, BrokerConfig
from zchat.client import AsyncClient, Client, ClientState, ConnectionClosed, EventKind, RequestError
from zchat.common.codec import decode_event, decode_reply, encode, encode_map
from zchat.common.codes import ErrorCode
from zchat.common.limits import Limits
from zchat.common.protocol import ErrorReply, Event, Hello, Pong, Reply, RoomInfo, Sent, Welcome

if TYPE_CHECKING:
    from tests.conftest import Connect, RunningBroker

Context = zmq.Context[zmq.Socket[bytes]]
Socket = zmq.Socket[bytes]
Map = dict[str, Any]

#: Seconds any single wait may take before the test fails.
WAIT = 5.0
#: Events up to a condition, waiting at most WAIT by default.
events_until = functools.partial(support.events_until, timeout=WAIT)
#: Seconds a negative check waits where no barrier exists (the reply that never comes).
QUIET = 0.5


# -- helpers ---------------------------------------------------------------------------------


def raw(ctx: Context, kind: int, endpoint: str) -> Socket:
    """A raw socket connected to ``endpoint``, with linger 0 so teardown never blocks."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def envelope(kind: str, rid: int | None = None, **fields: Any) -> Map:
    """A request map as a hand-written client would build it."""
    m: Map = {"v": 1, "kind": kind, **fields}
    if rid is not None:
        m["rid"] = rid
    return m


def recv_reply(dealer: Socket, timeout: float = WAIT) -> Reply:
    if not dealer.poll(int(timeout * 1000)):
        raise AssertionError(f"no reply within {timeout} s")
    return decode_reply(dealer.recv())


def ask(dealer: Socket, m: Map) -> Reply:
    dealer.send(encode_map(m))
    return recv_reply(dealer)


def hello(ctx: Context, rb: RunningBroker, nick: str) -> tuple[Socket, bytes]:
    """A raw DEALER with a session called ``nick``, and that session's private topic."""
    dealer = raw(ctx, zmq.DEALER, rb.router)
    welcome = ask(dealer, envelope("hello", 1, nick=nick))
    assert isinstance(welcome, Welcome), welcome
    return dealer, welcome.topic.encode()



def next_event(client: Client, kind: EventKind, timeout: float = WAIT) -> Event:
    """The next event of ``kind``, skipping others."""
    return events_until(client, lambda e: e.kind is kind, timeout=timeout)[-1]


def text_is(text: str) -> Callable[[Event], bool]:
    return lambda e: e.text == text


class Lines:
    """A child's output lines, read by a thread so that the test can wait with a deadline."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._queue: queue.Queue[bytes] = queue.Queue()
        self.seen: list[bytes] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[bytes]) -> None:
        for line in iter(stream.readline, b""):
            self._queue.put(line)
        self._queue.put(b"")

    def wait_for(self, needle: bytes, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{needle!r} not printed within {timeout} s: {self.seen!r}") from None
            if not line:
                raise AssertionError(f"output ended before {needle!r}: {self.seen!r}")
            self.seen.append(line)
            if needle in line:
                return


# -- rooms -------------------------------------------------------------------------------------


def test_rooms_sharing_a_prefix_are_isolated(
    broker: RunningBroker, client_factory: Callable[..., Client], zctx: Context
) -> None:
    ann = client_factory("ann", "gen")
    ben = client_factory("ben", "general")
    cat = client_factory("cat", "GEN", "#General")  # both, by other spellings
    _, observer_topic = hello(zctx, broker, "observer")
    # A raw SUB holding the exact topic of 'gen' (granted: rooms are public) and the bare
    # prefix 'r/gen' (denied): it must see 'gen' and never 'general'.
    spy = raw(zctx, zmq.SUB, broker.pub)
    for topic in (b"r/gen/", b"r/gen", observer_topic):
        spy.subscribe(topic)
    assert barrier(spy, observer_topic) == []

    for i in range(5):
        ann.say("gen", f"gen {i}")
        ben.say("general", f"general {i}")
    ann.say("gen", "gen end")  # after every 'general' message
    ben.say("general", "general end")  # after every 'gen' message

    ann_events = events_until(ann, text_is("gen end"))
    assert {e.room for e in ann_events} == {"gen"}
    assert [e.text for e in ann_events if e.kind is EventKind.MESSAGE] == [*(f"gen {i}" for i in range(5)), "gen end"]

    ben_events = events_until(ben, text_is("general end"))
    assert {e.room for e in ben_events} == {"general"}
    assert [e.text for e in ben_events if e.kind is EventKind.MESSAGE] == [
        *(f"general {i}" for i in range(5)),
        "general end",
    ]

    cat_events = [e for e in events_until(cat, text_is("general end")) if e.kind is EventKind.MESSAGE]
    assert len(cat_events) == 12
    assert all(e.text.startswith(e.room + " ") for e in cat_events if e.room is not None)

    spied = [decode_event(frames[1]) for frames in barrier(spy, observer_topic)]
    assert {e.room for e in spied} == {"gen"}
    assert [e.text for e in spied] == [*(f"gen {i}" for i in range(5)), "gen end"]


def test_join_leave_and_nick_notices_reach_other_members(client_factory: Callable[..., Client]) -> None:
    alice = client_factory("alice", "lobby")
    bob = client_factory("bob", "lobby")
    joined = next_event(alice, EventKind.JOIN)
    assert (joined.room, joined.sender) == ("lobby", "bob")

    assert bob.nick("robert") == "robert"
    renamed = next_event(alice, EventKind.NICK)
    assert (renamed.room, renamed.sender, renamed.nick) == ("lobby", "bob", "robert")

    alice.dm("ROBERT", "found you")  # the new nick, in any case
    dm = next_event(bob, EventKind.DM)
    assert (dm.sender, dm.to, dm.text) == ("alice", "robert", "found you")
    with pytest.raises(RequestError) as excinfo:
        alice.dm("bob", "lost you")  # the old nick is free
    assert excinfo.value.code is ErrorCode.NO_SUCH_NICK

    bob.leave("lobby")
    left = next_event(alice, EventKind.LEAVE)
    assert (left.room, left.sender, left.text) == ("lobby", "robert", "left")

    carol = client_factory("carol", "lobby")
    assert next_event(alice, EventKind.JOIN).sender == "carol"
    carol.close()
    quit_ = next_event(alice, EventKind.LEAVE)
    assert (quit_.room, quit_.sender, quit_.text) == ("lobby", "carol", "quit")
    assert alice.who("lobby") == ["alice"]


def test_who_and_rooms_answer(client_factory: Callable[..., Client]) -> None:
    alice = client_factory("alice", "lobby")
    client_factory("Bob", "lobby")
    carol = client_factory("carol", "kitchen")

    assert alice.who("lobby") == ["alice", "Bob"]  # sorted case-insensitively
    assert alice.who("#LOBBY") == ["alice", "Bob"]
    assert alice.who("kitchen") == ["carol"]  # no need to be a member
    assert alice.rooms() == [RoomInfo("kitchen", 1), RoomInfo("lobby", 2)]
    with pytest.raises(RequestError) as excinfo:
        alice.who("attic")
    assert excinfo.value.code is ErrorCode.NO_SUCH_ROOM

    carol.leave("kitchen")  # its last member: the room is gone
    assert alice.rooms() == [RoomInfo("lobby", 2)]
    with pytest.raises(RequestError) as excinfo:
        alice.who("kitchen")
    assert excinfo.value.code is ErrorCode.NO_SUCH_ROOM


def test_leave_stops_the_rooms_events_even_after_joining_twice(client_factory: Callable[..., Client]) -> None:
    alice = client_factory("alice", "lobby", "lobby")  # joining twice is allowed (and a no-op)
    bob = client_factory("bob", "lobby", "hall")
    alice.leave("lobby")
    alice.join("hall")
    bob.say("lobby", "alice has gone")
    bob.say("hall", "marker")  # after the lobby message, on the same pipe
    events = events_until(alice, text_is("marker"))
    assert [e.room for e in events if e.kind is EventKind.MESSAGE] == ["hall"]


def test_session_and_room_limits(broker_factory: Callable[..., RunningBroker], connect: Connect) -> None:
    rb = broker_factory(BrokerConfig(limits=Limits(max_sessions=2, max_rooms_per_session=2)))
    alice = connect(rb, "alice", "one", "two")
    with pytest.raises(RequestError) as excinfo:
        alice.join("three")
    assert excinfo.value.code is ErrorCode.TOO_MANY_ROOMS
    assert alice.joined == ["one", "two"]
    alice.join("#TWO")  # already in it: no new room counted
    bob = connect(rb, "bob")
    with pytest.raises(RequestError) as excinfo:
        connect(rb, "carol")
    assert excinfo.value.code is ErrorCode.SERVER_FULL
    bob.close()  # frees a session
    assert connect(rb, "carol", "three").who("three") == ["carol"]


# -- privacy and identity ----------------------------------------------------------------------


def test_dms_reach_only_the_recipient(
    broker: RunningBroker, client_factory: Callable[..., Client], zctx: Context
) -> None:
    alice = client_factory()
    alice_topic = alice.connect("alice").topic.encode()
    bob = client_factory("bob", "general")
    client_factory("carol", "general")
    _, observer_topic = hello(zctx, broker, "observer")
    guesses = {
        "everything": b"",
        "every private topic": b"p/",
        "every room": b"r/",
        "a guessed private topic": b"p/" + b"0" * 32 + b"/",
        "half of alice's topic": alice_topic[:18],
        "alice's topic but its slash": alice_topic[:-1],
    }
    spies: dict[str, Socket] = {}
    for name, topic in guesses.items():
        spy = raw(zctx, zmq.SUB, broker.pub)
        spy.subscribe(topic)
        spy.subscribe(observer_topic)
        assert barrier(spy, observer_topic) == [], name  # every subscription above is decided
        spies[name] = spy

    count = 200
    for i in range(count):
        bob.dm("alice", f"secret {i}")
    received = [alice.recv_event(WAIT) for _ in range(count)]
    assert [(e.kind, e.sender, e.to, e.room, e.text) for e in received] == [
        (EventKind.DM, "bob", "alice", None, f"secret {i}") for i in range(count)
    ]
    leaked = {name: len(barrier(spy, observer_topic)) for name, spy in spies.items()}
    assert leaked == dict.fromkeys(guesses, 0)


def test_sender_is_the_sessions_nick_not_what_the_client_claims(
    broker: RunningBroker, client_factory: Callable[..., Client], zctx: Context
) -> None:
    alice = client_factory("alice", "general")
    mallory = raw(zctx, zmq.DEALER, broker.router)
    assert isinstance(ask(mallory, envelope("hello", 1, nick="mallory", sender="alice")), Welcome)
    assert ask(mallory, envelope("join", 2, room="general", sender="alice")).KIND.value == "joined"
    assert next_event(alice, EventKind.JOIN).sender == "mallory"

    sent = ask(mallory, envelope("say", 3, room="general", text="trust me", sender="mallory-fake", nick="alice"))
    assert isinstance(sent, Sent)
    said = next_event(alice, EventKind.MESSAGE)
    assert (said.sender, said.text, said.id) == ("mallory", "trust me", sent.id)

    assert isinstance(ask(mallory, envelope("dm", 4, to="alice", text="psst", sender="bob", to_nick="x")), Sent)
    dm = next_event(alice, EventKind.DM)
    assert (dm.sender, dm.to, dm.text) == ("mallory", "alice", "psst")


@pytest.mark.parametrize("lookalike", ["ALICE", "Alice", "ａｌｉｃｅ", "ＡＬＩＣＥ"])
def test_nick_collisions_are_case_and_width_insensitive(client_factory: Callable[..., Client], lookalike: str) -> None:
    alice = client_factory("alice")
    newcomer = client_factory()
    with pytest.raises(RequestError) as excinfo:
        newcomer.connect(lookalike)
    assert excinfo.value.code is ErrorCode.NICK_TAKEN
    assert newcomer.state is ClientState.DISCONNECTED  # and connect() may be tried again
    newcomer.connect("bob")
    with pytest.raises(RequestError) as excinfo:
        newcomer.nick(lookalike)
    assert excinfo.value.code is ErrorCode.NICK_TAKEN
    assert newcomer.current_nick == "bob"
    # Its owner may take another form of its own nick (shown as typed, after NFKC).
    assert alice.nick(lookalike) == unicodedata.normalize("NFKC", lookalike)


# -- heartbeats --------------------------------------------------------------------------------

VICTIM = textwrap.dedent(
    """
    import sys, time
    from zchat.client import Client

    client = Client(sys.argv[1], sys.argv[2], timeout=5)
    client.connect("victim")
    client.join("ward")
    print("READY", flush=True)
    time.sleep(60)  # until killed
    """
)


def test_a_killed_client_times_out_and_frees_its_nick(
    broker_factory: Callable[..., RunningBroker], connect: Connect
) -> None:
    rb = broker_factory(BrokerConfig(session_timeout=1.0))
    nurse = connect(rb, "nurse", "ward")
    child = subprocess.Popen(
        [sys.executable, "-c", VICTIM, rb.router, rb.pub], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert child.stdout is not None
    try:
        Lines(child.stdout).wait_for(b"READY", timeout=10)
        assert next_event(nurse, EventKind.JOIN).sender == "victim"
        with pytest.raises(RequestError) as excinfo:
            connect(rb, "victim")
        assert excinfo.value.code is ErrorCode.NICK_TAKEN
        child.send_signal(signal.SIGKILL)
        child.wait(WAIT)
        started = time.monotonic()
        left = next_event(nurse, EventKind.LEAVE)
        assert (left.sender, left.room, left.text) == ("victim", "ward", "timed out")
        assert time.monotonic() - started < 3.0  # 1 s timeout, swept every 0.25 s
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(WAIT)
        child.stdout.close()
    again = connect(rb, "victim", "ward")
    assert again.who("ward") == ["nurse", "victim"]
    assert nurse.ping() > 0  # the idle survivor was kept alive by its own heartbeats


# -- bad input through a raw DEALER ------------------------------------------------------------

SMALL = Limits(max_frame=1024, max_text=200)
VALID_SAY = envelope("say", 7, room="general", text="hello")


@dataclass(frozen=True)
class Bad:
    """One bad request: its frames, the error code it earns (None: no reply) and rid echoed."""

    frames: list[bytes]
    code: ErrorCode | None
    rid: int | None = None
    fresh: bool = False  # sent from a DEALER with no session, instead of mallory's


def one(m: Map) -> list[bytes]:
    return [encode_map(m)]


BAD_INPUTS: dict[str, Bad] = {
    # unreadable
    "invalid msgpack byte": Bad([b"\xc1"], ErrorCode.MALFORMED),
    "truncated msgpack": Bad([encode_map(VALID_SAY)[:-3]], ErrorCode.MALFORMED),
    "trailing bytes": Bad([encode_map(VALID_SAY) + b"\xc0"], ErrorCode.MALFORMED),
    "ascii text": Bad([b"hello broker"], ErrorCode.MALFORMED),
    "msgpack array": Bad([b"\x93\x01\x02\x03"], ErrorCode.MALFORMED),
    "msgpack string": Bad([b"\xa5hello"], ErrorCode.MALFORMED),
    "msgpack int": Bad([b"\x2a"], ErrorCode.MALFORMED),
    "msgpack nil": Bad([b"\xc0"], ErrorCode.MALFORMED),
    "map with an int key": Bad([b"\x81\x01\x02"], ErrorCode.MALFORMED),
    "empty frame": Bad([b""], ErrorCode.BAD_FRAMES),
    "two frames": Bad([encode_map(VALID_SAY), b"x"], ErrorCode.BAD_FRAMES),
    "three frames": Bad([b"", encode_map(VALID_SAY), b""], ErrorCode.BAD_FRAMES),
    "over the frame limit": Bad([encode_map({**VALID_SAY, "text": "x" * 2000})], None),
    # readable, but wrong
    "missing rid": Bad(one(envelope("say", room="general", text="hi")), ErrorCode.INVALID),
    "rid is a string": Bad(one({**VALID_SAY, "rid": "7"}), ErrorCode.INVALID),
    "rid is a bool": Bad(one({**VALID_SAY, "rid": True}), ErrorCode.INVALID),
    "rid is negative": Bad(one({**VALID_SAY, "rid": -1}), ErrorCode.INVALID),
    "rid over 2**63-1": Bad(one({**VALID_SAY, "rid": 2**64 - 1}), ErrorCode.INVALID),
    "missing version": Bad(one({k: v for k, v in VALID_SAY.items() if k != "v"}), ErrorCode.BAD_VERSION, 7),
    "version 2": Bad(one({**VALID_SAY, "v": 2}), ErrorCode.BAD_VERSION, 7),
    "version true": Bad(one({**VALID_SAY, "v": True}), ErrorCode.BAD_VERSION, 7),
    "missing kind": Bad(one({k: v for k, v in VALID_SAY.items() if k != "kind"}), ErrorCode.INVALID, 7),
    "kind is an int": Bad(one({**VALID_SAY, "kind": 3}), ErrorCode.INVALID, 7),
    "unknown kind": Bad(one({**VALID_SAY, "kind": "shout"}), ErrorCode.UNKNOWN_KIND, 7),
    "an event kind": Bad(one({**VALID_SAY, "kind": "message"}), ErrorCode.UNKNOWN_KIND, 7),
    "a reply kind": Bad(one({**VALID_SAY, "kind": "welcome"}), ErrorCode.UNKNOWN_KIND, 7),
    "missing text": Bad(one(envelope("say", 7, room="general")), ErrorCode.INVALID, 7),
    "missing room": Bad(one(envelope("say", 7, text="hi")), ErrorCode.INVALID, 7),
    "room is an int": Bad(one({**VALID_SAY, "room": 5}), ErrorCode.INVALID, 7),
    "text is a list": Bad(one({**VALID_SAY, "text": ["hi"]}), ErrorCode.INVALID, 7),
    "text is bytes": Bad(one({**VALID_SAY, "text": b"hi"}), ErrorCode.INVALID, 7),
    "action is a string": Bad(one({**VALID_SAY, "action": "yes"}), ErrorCode.INVALID, 7),
    "empty text": Bad(one({**VALID_SAY, "text": ""}), ErrorCode.INVALID_TEXT, 7),
    "text over max_text": Bad(one({**VALID_SAY, "text": "x" * 201}), ErrorCode.INVALID_TEXT, 7),
    "terminal escape in text": Bad(one({**VALID_SAY, "text": "\x1b[2J"}), ErrorCode.INVALID_TEXT, 7),
    "slash in a room name": Bad(one({**VALID_SAY, "room": "general/x"}), ErrorCode.INVALID_ROOM, 7),
    "join a room with a slash": Bad(one(envelope("join", 7, room="gen/")), ErrorCode.INVALID_ROOM, 7),
    "join a bidi-override room": Bad(one(envelope("join", 7, room="a\u202eb")), ErrorCode.INVALID_ROOM, 7),
    "nick with a space": Bad(one(envelope("nick", 7, nick="mal lory")), ErrorCode.INVALID_NICK, 7),
    "nick with a zero-width space": Bad(one(envelope("nick", 7, nick="al\u200bice")), ErrorCode.INVALID_NICK, 7),
    "reserved nick": Bad(one(envelope("nick", 7, nick="Server")), ErrorCode.INVALID_NICK, 7),
    # readable and well-formed, but not allowed
    "hello again": Bad(one(envelope("hello", 7, nick="mallory2")), ErrorCode.ALREADY_HELLO, 7),
    "take a member's nick": Bad(one(envelope("nick", 7, nick="ALICE")), ErrorCode.NICK_TAKEN, 7),
    "say where not a member": Bad(one({**VALID_SAY, "room": "kitchen"}), ErrorCode.NOT_MEMBER, 7),
    "leave where not a member": Bad(one(envelope("leave", 7, room="kitchen")), ErrorCode.NOT_MEMBER, 7),
    "dm nobody": Bad(one(envelope("dm", 7, to="nobody", text="hi")), ErrorCode.NO_SUCH_NICK, 7),
    "who in no room": Bad(one(envelope("who", 7, room="kitchen")), ErrorCode.NO_SUCH_ROOM, 7),
    "say without a session": Bad(one(VALID_SAY), ErrorCode.NO_SESSION, 7, fresh=True),
    "join without a session": Bad(one(envelope("join", 7, room="general")), ErrorCode.NO_SESSION, 7, fresh=True),
    "hello with a taken nick": Bad(one(envelope("hello", 7, nick="Alice")), ErrorCode.NICK_TAKEN, 7, fresh=True),
    "hello with no nick": Bad(one(envelope("hello", 7)), ErrorCode.INVALID, 7, fresh=True),
}


@dataclass
class Arena:
    """A broker with small limits, two members of 'general' and mallory, a raw member."""

    rb: RunningBroker
    alice: Client
    bob: Client
    mallory: Socket
    ctx: Context
    rids: Iterator[int] = field(default_factory=lambda: iter(range(1000, 2000)))

    def assert_undisturbed(self, *, mallory_connected: bool = True) -> None:
        """Nothing reached alice, the broker still serves, and no state changed."""
        assert self.rb.thread.is_alive()
        marker = f"marker {next(self.rids)}"
        sent = self.bob.say("general", marker)
        event = self.alice.recv_event(WAIT)  # the very next event: nothing came before it
        assert (event.kind, event.sender, event.text, event.id) == (EventKind.MESSAGE, "bob", marker, sent.id)
        assert self.alice.who("general") == ["alice", "bob", "mallory"]
        assert self.alice.rooms() == [RoomInfo("general", 3)]
        assert self.alice.current_nick == "alice"
        if mallory_connected:  # one reply per request: the next one is for the next request
            rid = next(self.rids)
            pong = ask(self.mallory, envelope("ping", rid))
            assert isinstance(pong, Pong) and pong.rid == rid
        newcomer = Client(self.rb.router, self.rb.pub, timeout=WAIT)
        try:
            assert newcomer.connect("newcomer").nick == "newcomer"
        finally:
            newcomer.close()


@pytest.fixture
def arena(broker_factory: Callable[..., RunningBroker], connect: Connect, zctx: Context) -> Arena:
    rb = broker_factory(BrokerConfig(limits=SMALL))
    alice = connect(rb, "alice", "general")
    bob = connect(rb, "bob", "general")
    mallory, _ = hello(zctx, rb, "mallory")
    assert ask(mallory, envelope("join", 2, room="general")).KIND.value == "joined"
    assert [e.sender for e in events_until(alice, lambda e: e.sender == "mallory")] == ["bob", "mallory"]
    return Arena(rb, alice, bob, mallory, zctx)


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gets_an_error_and_harms_nobody(arena: Arena, name: str) -> None:
    bad = BAD_INPUTS[name]
    dealer = raw(arena.ctx, zmq.DEALER, arena.rb.router) if bad.fresh else arena.mallory
    dealer.send_multipart(bad.frames)
    if bad.code is None:
        # libzmq drops a peer whose frame is over ZMQ_MAXMSGSIZE before the broker sees it.
        assert not dealer.poll(int(QUIET * 1000)), "an oversized frame was answered"
    else:
        reply = recv_reply(dealer)
        assert isinstance(reply, ErrorReply), reply
        assert (reply.code, reply.rid) == (bad.code, bad.rid), reply.reason
        assert reply.reason
    arena.assert_undisturbed(mallory_connected=bad.code is not None)


def test_bad_frames_reason_counts_the_frames_sent(arena: Arena) -> None:
    for count in (2, 3):
        arena.mallory.send_multipart([b"x"] * count)
        reply = recv_reply(arena.mallory)
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.BAD_FRAMES
        assert reply.reason.endswith(f"not {count}"), reply.reason


def test_a_burst_of_every_bad_input_harms_nobody(arena: Arena, zctx: Context) -> None:
    """All of the above from one peer, back to back, without waiting for replies."""
    answerable = {name: bad for name, bad in BAD_INPUTS.items() if bad.code is not None and not bad.fresh}
    for bad in answerable.values():
        arena.mallory.send_multipart(bad.frames)
    codes = []
    for _ in answerable:
        reply = recv_reply(arena.mallory)
        assert isinstance(reply, ErrorReply)
        codes.append(reply.code)
    assert codes == [bad.code for bad in answerable.values()]
    arena.assert_undisturbed()


# -- junk on the XPUB --------------------------------------------------------------------------


def test_xsub_junk_does_not_disturb_the_broker(
    broker_factory: Callable[..., RunningBroker], connect: Connect, zctx: Context
) -> None:
    rb = broker_factory()
    alice = connect(rb, "alice", "general")
    bob = connect(rb, "bob", "general")
    assert next_event(alice, EventKind.JOIN).sender == "bob"
    _, junker_topic = hello(zctx, rb, "junker")
    xsub = raw(zctx, zmq.XSUB, rb.pub)
    xsub.send(b"\x01" + junker_topic)
    junk: list[list[bytes]] = [
        [b"junk"],
        [b"\x02not a subscription"],
        [b"\xff" * 100],
        [b""],
        [b"abc", b"def"],
        [b"a", b"b", b"c", b"d"],
        [b"\x01r/nosuchroom/", b"\x01r/general/"],  # the second part is data, not a subscription
        [b"\x00", b"\x00p/"],
        [b"\x01"],  # a subscription to everything: denied
        [b"\x01p/"],
        [b"\x01r/"],
        [b"\x00r/general/"],  # an unsubscription of what was never granted
    ]
    for message in junk:
        xsub.send_multipart(message)
    # Every message above has been read once the marker comes back; and nothing but events
    # of the junker's own topic (none) may reach the XSUB.
    assert barrier(xsub, junker_topic) == []

    sent = bob.say("general", "still here")
    assert (alice.recv_event(WAIT).text, sent.id) == ("still here", sent.id)
    assert alice.who("general") == ["alice", "bob"]
    assert alice.rooms() == [RoomInfo("general", 2)]
    carol = connect(rb, "carol", "general")  # connect and join wait for their grants
    carol.dm("alice", "psst")
    assert next_event(alice, EventKind.DM).text == "psst"

    # A message over the XPUB's 1024-byte limit: libzmq drops that peer, nobody else.
    # (Not a subscription: an XSUB would resend that on every reconnect.)
    xsub.send(b"\x02" + b"x" * 2000)
    dave = connect(rb, "dave", "general")
    assert dave.who("general") == ["alice", "bob", "carol", "dave"]
    assert rb.thread.is_alive()


def test_xsub_junk_cannot_steal_a_private_topic(zctx: Context) -> None:
    """A subscription read after an XSUB's junk message is never granted to the wrong pipe.

    libzmq (4.3.5, xpub.cpp) queues the pipe of every (un)subscription message for XPUB_MANUAL
    but not the pipe of an XSUB's plain data message, while each recv() pops one pipe. A data
    message read with subscriptions queued behind it leaves ``setsockopt(SUBSCRIBE)`` applied
    to the *next* subscription's pipe. This test builds that queue deterministically: inproc
    pipes deliver synchronously, and the broker does not serve until the queue is in place.
    The broker grants nothing until its XPUB queue is drained; the subscriber sends its
    subscription again (as the client library does when a sync's epoch moved) and gets it.
    """
    name = uuid.uuid4().hex
    broker = Broker(BrokerConfig(router=f"inproc://{name}-router", pub=f"inproc://{name}-pub"), context=zctx)
    thread = threading.Thread(target=broker.serve_forever, name="broker", daemon=True)
    try:
        # alice's session, opened through the sans-I/O core before the loop runs.
        broker.core.set_time(time.time(), time.monotonic())
        broker.core.handle_request(b"\x00alice", encode(Hello(1, "alice")))
        (_, frame), *_ = broker.core.take_output()[0]
        welcome = decode_reply(frame)
        assert isinstance(welcome, Welcome)
        alice_topic = welcome.topic.encode()

        thief = raw(zctx, zmq.XSUB, broker.pub_endpoint)
        thief.send(b"junk")
        broker.xpub.poll(0)  # the XPUB takes the junk in (still unread)
        alice_sub = raw(zctx, zmq.SUB, broker.pub_endpoint)
        alice_sub.subscribe(alice_topic)  # queued behind the junk...
        thief.send(b"\x01r/anything/")  # ...and followed by another pipe's subscription
        thread.start()

        sender = raw(zctx, zmq.DEALER, broker.router_endpoint)
        assert isinstance(ask(sender, envelope("hello", 1, nick="carol")), Welcome)
        assert isinstance(ask(sender, envelope("dm", 2, to="alice", text="for alice only")), Sent)
        assert not thief.poll(int(QUIET * 1000)), "the thief got alice's private topic"
        assert not alice_sub.poll(0), "a subscription read in the misaligned window was granted"
        alice_sub.unsubscribe(alice_topic)  # send it again, now that the queue is drained
        alice_sub.subscribe(alice_topic)
        deadline = time.monotonic() + WAIT
        while broker.core.stats.subscriptions_granted < 1:  # read by the loop, poll until then
            assert time.monotonic() < deadline, "the resent subscription was never granted"
            time.sleep(0.01)
        assert isinstance(ask(sender, envelope("dm", 3, to="alice", text="again")), Sent)
        assert alice_sub.poll(int(WAIT * 1000)), "alice's resent subscription was not granted"
        assert not thief.poll(int(QUIET * 1000)), "the thief got alice's private topic"
    finally:
        broker.stop()
        if thread.is_alive():
            thread.join(WAIT)
        else:
            broker.close()


# -- the asyncio front end ---------------------------------------------------------------------


def test_async_client_connect_join_say_events_close(broker: RunningBroker) -> None:
    async def scenario() -> None:
        async with AsyncClient(broker.router, broker.pub, timeout=WAIT) as alice:
            welcome = await alice.connect("alice")
            assert (welcome.nick, alice.current_nick) == ("alice", "alice")
            joined = await alice.join("#Lobby")
            assert (joined.room, joined.members, alice.joined) == ("lobby", ("alice",), ["lobby"])

            bob = AsyncClient(broker.router, broker.pub, timeout=WAIT)
            await bob.connect("bob")
            await bob.join("lobby")
            assert (await alice.recv_event(WAIT)).sender == "bob"
            said = await bob.say("lobby", "hi")
            await bob.say("lobby", "waves", action=True)
            await bob.dm("alice", "psst")
            await bob.close()
            assert bob.state is ClientState.CLOSED

            seen: list[Event] = []
            stream = alice.events()
            while len(seen) < 4:
                seen.append(await asyncio.wait_for(anext(stream), WAIT))
            assert [(e.kind, e.sender, e.text) for e in seen] == [
                (EventKind.MESSAGE, "bob", "hi"),
                (EventKind.ACTION, "bob", "waves"),
                (EventKind.DM, "bob", "psst"),
                (EventKind.LEAVE, "bob", "quit"),
            ]
            assert seen[0].id == said.id and seen[0].room == "lobby"
            assert await alice.who("lobby") == ["alice"]
            assert await alice.ping() > 0
            with pytest.raises(TimeoutError):
                await alice.recv_event(0.05)
        assert alice.state is ClientState.CLOSED
        with pytest.raises(ConnectionClosed):
            await alice.recv_event(WAIT)
        assert [e async for e in alice.events()] == []
        await alice.close()  # twice is fine
        with pytest.raises(ConnectionClosed):
            await alice.say("lobby", "too late")

    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_async_client_reports_a_taken_nick_and_can_retry(broker: RunningBroker) -> None:
    async def scenario() -> None:
        async with (
            AsyncClient(broker.router, broker.pub, timeout=WAIT) as first,
            AsyncClient(broker.router, broker.pub, timeout=WAIT) as second,
        ):
            await first.connect("Zoë")
            with pytest.raises(RequestError) as excinfo:
                await second.connect("ZOË")
            assert excinfo.value.code is ErrorCode.NICK_TAKEN
            assert (await second.connect("zed")).nick == "zed"
            assert [r.name for r in await second.rooms()] == []

    asyncio.run(asyncio.wait_for(scenario(), 20))
