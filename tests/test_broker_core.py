"""BrokerCore in memory: several peers talk to one core, no sockets.

``Peers`` plays the DEALERs (routing ids like ``b"peer-a"``): it encodes requests, feeds them
to :meth:`BrokerCore.handle_request`, and decodes what :meth:`BrokerCore.take_output` queued.
A rule-based state machine at the end drives random traffic and checks the core's
invariants after every step.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Collection
from typing import Any, TypeVar

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from tests.support import machine_settings

from zchat.broker.core import BrokerCore, Subscription
from zchat.common.codec import decode_event, decode_reply, encode, encode_map
from zchat.common.codes import ErrorCode, EventKind
from zchat.common.limits import Limits
from zchat.common.names import nick_key, normalize_room
from zchat.common.protocol import (
    Away,
    AwayChanged,
    Bye,
    Dm,
    ErrorReply,
    Event,
    Goodbye,
    Hello,
    Join,
    Joined,
    Leave,
    Left,
    Members,
    Nick,
    NickChanged,
    Ping,
    Pong,
    Reply,
    Request,
    RoomInfo,
    RoomList,
    Rooms,
    Say,
    Sent,
    Welcome,
    Who,
)
from zchat.common.topics import new_private_topic, room_topic, sync_subscription

NOW = 1_700_000_000.0
A, B, C, D = b"peer-a", b"peer-b", b"peer-c", b"peer-d"
PRIVATE_TOPIC = re.compile(r"p/[0-9a-f]{32}/")
R = TypeVar("R", bound=Reply)


class Peers:
    """Several DEALER peers sharing one in-memory :class:`BrokerCore`.

    Every publication the core queues is decoded into ``published`` (``(topic, event)``);
    :meth:`events` takes them.
    """

    def __init__(self, core: BrokerCore | None = None) -> None:
        self.core = core or BrokerCore(motd="be nice", session_timeout=15.0)
        self.now, self.mono = NOW, 0.0
        self.core.set_time(self.now, self.mono)
        self.published: list[tuple[bytes, Event]] = []
        self.topics: dict[bytes, bytes] = {}  # peer -> private topic, from its welcome
        self._rid = 0

    def send_frame(self, peer: bytes, frame: bytes) -> Reply:
        """Feed one raw frame from ``peer``; return the one reply it gets."""
        self.core.handle_request(peer, frame)
        return self._collect(peer)

    def send(self, peer: bytes, cls: Callable[..., Request], *args: Any) -> Reply:
        """Send a request of type ``cls`` with a fresh rid; the reply must carry that rid."""
        self._rid += 1
        reply = self.send_frame(peer, encode(cls(self._rid, *args)))
        assert reply.rid == self._rid
        return reply

    def send_map(self, peer: bytes, **fields: Any) -> Reply:
        """Send a hand-built map (for fields no request class would carry)."""
        self._rid += 1
        return self.send_frame(peer, encode_map({"v": 1, "rid": self._rid, **fields}))

    def _collect(self, peer: bytes) -> Reply:
        replies, publications = self.core.take_output()
        self.published += [(topic, decode_event(frame)) for topic, frame in publications]
        assert [to for to, _ in replies] == [peer], "exactly one reply, to the sender"
        return decode_reply(replies[0][1])

    def events(self) -> list[tuple[bytes, Event]]:
        """The publications since the last call."""
        _, publications = self.core.take_output()
        self.published += [(topic, decode_event(frame)) for topic, frame in publications]
        out, self.published = self.published, []
        return out

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds
        self.core.set_time(self.now, self.mono)

    def subscribe(self, topic: bytes) -> Subscription:
        return self.core.handle_subscription(b"\x01" + topic)

    # -- shortcuts that expect success --

    def hello(self, peer: bytes, nick: str) -> Welcome:
        welcome = ok(self.send(peer, Hello, nick), Welcome)
        self.topics[peer] = welcome.topic.encode()
        return welcome

    def join(self, peer: bytes, room: str) -> Joined:
        return ok(self.send(peer, Join, room), Joined)


def ok(reply: Reply, cls: type[R]) -> R:
    assert type(reply) is cls, f"expected {cls.__name__}, got {reply!r}"
    return reply


def error(reply: Reply) -> ErrorCode:
    assert type(reply) is ErrorReply, f"expected an error, got {reply!r}"
    return reply.code


@pytest.fixture
def peers() -> Peers:
    return Peers()


@pytest.fixture
def chat(peers: Peers) -> Peers:
    """ann and bob in #general; carol connected but in no room. Events so far discarded."""
    peers.hello(A, "ann")
    peers.hello(B, "bob")
    peers.hello(C, "carol")
    peers.join(A, "general")
    peers.join(B, "general")
    peers.events()
    return peers


# -- hello --------------------------------------------------------------------------------


def test_welcome_fields(peers: Peers) -> None:
    welcome = peers.hello(A, "ann")
    assert welcome.nick == "ann"
    assert welcome.motd == "be nice"
    assert PRIVATE_TOPIC.fullmatch(welcome.topic)
    assert (welcome.heartbeat, welcome.timeout) == (5.0, 15.0)
    assert peers.hello(B, "bob").topic != welcome.topic
    assert peers.events() == []


@pytest.mark.parametrize("timeout", [3.0, 30.0, 0.5])
def test_heartbeat_is_a_third_of_the_timeout(timeout: float) -> None:
    peers = Peers(BrokerCore(session_timeout=timeout))
    welcome = peers.hello(A, "ann")
    assert welcome.heartbeat == pytest.approx(timeout / 3)
    assert welcome.timeout == timeout
    assert welcome.motd == ""


def test_welcome_nick_is_the_nfkc_display_form(peers: Peers) -> None:
    assert peers.hello(A, "Ａｎｎ").nick == "Ann"


@pytest.mark.parametrize("lookalike", ["ann", "ANN", "Ann", "ａｎｎ", "ＡＮＮ", "aNn"])
def test_nick_collision_is_case_and_width_insensitive(peers: Peers, lookalike: str) -> None:
    peers.hello(A, "Ann")
    reply = peers.send(B, Hello, lookalike)
    assert error(reply) is ErrorCode.NICK_TAKEN
    assert B not in peers.core.sessions
    assert peers.hello(B, "anne").nick == "anne"


def test_already_hello(peers: Peers) -> None:
    peers.hello(A, "ann")
    assert error(peers.send(A, Hello, "ann")) is ErrorCode.ALREADY_HELLO
    assert error(peers.send(A, Hello, "other")) is ErrorCode.ALREADY_HELLO
    assert peers.core.sessions[A].nick == "ann"
    assert peers.hello(B, "other").nick == "other"  # the refused nick was not taken


@pytest.mark.parametrize(
    ("cls", "args"),
    [(Join, ("general",)), (Leave, ("general",)), (Say, ("general", "hi")), (Dm, ("bob", "hi")),
     (Who, ("general",)), (Rooms, ()), (Nick, ("ann",)), (Ping, ()), (Away, ("lunch",))],
)
def test_no_session_before_hello(peers: Peers, cls: type[Request], args: tuple[Any, ...]) -> None:
    peers.hello(B, "bob")
    peers.join(B, "general")
    peers.events()
    assert error(peers.send(A, cls, *args)) is ErrorCode.NO_SESSION
    assert peers.events() == []


def test_bye_without_session_is_goodbye(peers: Peers) -> None:
    ok(peers.send(A, Bye), Goodbye)
    ok(peers.send(A, Bye), Goodbye)


def test_invalid_nick_in_hello(peers: Peers) -> None:
    assert error(peers.send_map(A, kind="hello", nick="server")) is ErrorCode.INVALID_NICK
    assert error(peers.send_map(A, kind="hello", nick="a b")) is ErrorCode.INVALID_NICK
    assert peers.core.sessions == {}


# -- rooms --------------------------------------------------------------------------------


def test_join_publishes_notice_and_lists_members(peers: Peers) -> None:
    peers.hello(A, "carol")
    peers.hello(B, "Ann")
    peers.hello(C, "bob")
    joined = peers.join(A, "#General")
    assert (joined.room, joined.topic, joined.members) == ("general", "r/general/", ("carol",))
    [(topic, event)] = peers.events()
    assert topic == b"r/general/"
    assert (event.kind, event.room, event.sender, event.text, event.ts) == (EventKind.JOIN, "general", "carol", "", NOW)
    peers.join(B, "GENERAL")
    assert peers.join(C, "ｇｅｎｅｒａｌ").members == ("Ann", "bob", "carol")  # sorted by nick key
    assert [(t, e.kind, e.sender) for t, e in peers.events()] == [
        (b"r/general/", EventKind.JOIN, "Ann"),
        (b"r/general/", EventKind.JOIN, "bob"),
    ]


def test_join_twice_is_idempotent(chat: Peers) -> None:
    joined = chat.join(A, "general")
    assert joined.members == ("ann", "bob")
    assert chat.events() == []
    assert len(chat.core.rooms["general"].members) == 2


def test_leave_notice_and_empty_room_is_deleted(chat: Peers) -> None:
    assert ok(chat.send(A, Leave, "#General"), Left).room == "general"
    [(topic, event)] = chat.events()
    assert topic == b"r/general/"
    assert (event.kind, event.room, event.sender, event.text) == (EventKind.LEAVE, "general", "ann", "left")
    ok(chat.send(B, Leave, "general"), Left)
    assert chat.events() == []  # nobody left to tell
    assert "general" not in chat.core.rooms
    assert b"r/general/" not in chat.core.room_topics
    assert error(chat.send(B, Who, "general")) is ErrorCode.NO_SUCH_ROOM
    assert chat.subscribe(b"r/general/") is Subscription.DENY


def test_leave_a_room_you_are_not_in(chat: Peers) -> None:
    assert error(chat.send(C, Leave, "general")) is ErrorCode.NOT_MEMBER
    assert error(chat.send(C, Leave, "nowhere")) is ErrorCode.NOT_MEMBER
    assert chat.events() == []


def test_say_publishes_on_the_room_topic(chat: Peers) -> None:
    sent = ok(chat.send(A, Say, "general", "hello"), Sent)
    [(topic, event)] = chat.events()
    assert topic == b"r/general/"
    assert (event.kind, event.room, event.sender, event.text) == (EventKind.MESSAGE, "general", "ann", "hello")
    assert (event.id, event.ts) == (sent.id, sent.ts) == (sent.id, NOW)
    ok(chat.send(B, Say, "#GENERAL", "waves", True), Sent)
    [(_, action)] = chat.events()
    assert (action.kind, action.sender, action.text) == (EventKind.ACTION, "bob", "waves")


def test_say_requires_membership(chat: Peers) -> None:
    assert error(chat.send(C, Say, "general", "hi")) is ErrorCode.NOT_MEMBER
    assert error(chat.send(C, Say, "nowhere", "hi")) is ErrorCode.NOT_MEMBER
    assert chat.events() == []


@pytest.mark.parametrize(("kind", "peer", "nick"), [("say", A, "ann"), ("join", C, "carol"), ("leave", A, "ann"),
                                                     ("nick", A, "ann")])
def test_sender_field_of_a_client_is_ignored(chat: Peers, kind: str, peer: bytes, nick: str) -> None:
    fields = {"room": "general", "text": "I am bob", "nick": "annie", "sender": "bob", "from": "bob", "id": 1}
    reply = chat.send_map(peer, kind=kind, **fields)
    assert type(reply) is not ErrorReply
    [(_, event)] = chat.events()
    assert event.sender == nick
    assert event.id != 1


def test_text_is_checked(chat: Peers) -> None:
    assert error(chat.send_map(A, kind="say", room="general", text="\x1b[2J")) is ErrorCode.INVALID_TEXT
    assert error(chat.send_map(A, kind="say", room="general", text="")) is ErrorCode.INVALID_TEXT
    assert error(chat.send_map(A, kind="dm", to="bob", text="x" * 4001)) is ErrorCode.INVALID_TEXT
    assert chat.events() == []


# -- dm -----------------------------------------------------------------------------------


def test_dm_goes_to_both_private_topics_only(chat: Peers) -> None:
    sent = ok(chat.send(A, Dm, "CAROL", "psst"), Sent)
    events = chat.events()
    assert [topic for topic, _ in events] == [chat.topics[C], chat.topics[A]]
    for _, event in events:
        assert (event.kind, event.room, event.sender, event.to, event.text) == (
            EventKind.DM, None, "ann", "carol", "psst"
        )
        assert event.id == sent.id
    ok(chat.send(C, Dm, "ann", "nods", True), Sent)
    assert [(t, e.kind, e.to) for t, e in chat.events()] == [
        (chat.topics[A], EventKind.DM, "ann"),
        (chat.topics[C], EventKind.DM, "ann"),
    ]


def test_dm_to_self_is_published_once(chat: Peers) -> None:
    ok(chat.send(A, Dm, "Ann", "note to self"), Sent)
    [(topic, event)] = chat.events()
    assert topic == chat.topics[A]
    assert (event.sender, event.to) == ("ann", "ann")


def test_dm_to_unknown_nick(chat: Peers) -> None:
    assert error(chat.send(A, Dm, "dave", "hi")) is ErrorCode.NO_SUCH_NICK
    assert chat.events() == []


# -- who, rooms ---------------------------------------------------------------------------


def test_who_lists_members_sorted_by_key(peers: Peers) -> None:
    for peer, nick in [(A, "zed"), (B, "Bob"), (C, "alice"), (D, "_x")]:
        peers.hello(peer, nick)
        peers.join(peer, "general")
    members = ok(peers.send(A, Who, "#General"), Members)
    assert (members.room, members.members) == ("general", ("_x", "alice", "Bob", "zed"))
    assert error(peers.send(A, Who, "nowhere")) is ErrorCode.NO_SUCH_ROOM


def test_who_does_not_need_membership(chat: Peers) -> None:
    assert ok(chat.send(C, Who, "general"), Members).members == ("ann", "bob")


def test_rooms_lists_every_room_sorted_with_counts(chat: Peers) -> None:
    chat.join(C, "Zoo")
    chat.join(C, "dev")
    chat.join(A, "dev")
    chat.join(C, "2024")
    rooms = ok(chat.send(C, Rooms), RoomList)
    assert rooms.rooms == (RoomInfo("2024", 1), RoomInfo("dev", 2), RoomInfo("general", 2), RoomInfo("zoo", 1))


def test_rooms_when_there_are_none(peers: Peers) -> None:
    peers.hello(A, "ann")
    assert ok(peers.send(A, Rooms), RoomList).rooms == ()


def test_ping(peers: Peers) -> None:
    peers.hello(A, "ann")
    peers.advance(2.5)
    assert ok(peers.send(A, Ping), Pong).ts == NOW + 2.5


# -- nick ---------------------------------------------------------------------------------


def test_nick_change_is_announced_in_every_room(chat: Peers) -> None:
    chat.join(A, "dev")
    chat.events()
    assert ok(chat.send(A, Nick, "Anna"), NickChanged).nick == "Anna"
    events = chat.events()
    assert sorted(topic for topic, _ in events) == [b"r/dev/", b"r/general/"]
    for topic, event in events:
        assert (event.kind, event.sender, event.nick) == (EventKind.NICK, "ann", "Anna")
        assert topic == room_topic(str(event.room))
    ok(chat.send(A, Say, "general", "hi"), Sent)
    assert chat.events()[0][1].sender == "Anna"
    assert ok(chat.send(B, Who, "general"), Members).members == ("Anna", "bob")


def test_nick_change_frees_the_old_nick(chat: Peers) -> None:
    ok(chat.send(A, Nick, "anna"), NickChanged)
    chat.events()
    assert chat.hello(D, "ANN").nick == "ANN"
    assert error(chat.send(B, Nick, "Anna")) is ErrorCode.NICK_TAKEN
    ok(chat.send(B, Dm, "ann", "hi"), Sent)
    assert [e.to for _, e in chat.events()] == ["ANN", "ANN"]  # the new owner of the nick
    assert sorted(chat.core.nicks) == sorted(map(nick_key, ["ann", "anna", "bob", "carol"]))


def test_nick_change_to_a_taken_nick(chat: Peers) -> None:
    chat.events()
    assert error(chat.send(A, Nick, "ＢＯＢ")) is ErrorCode.NICK_TAKEN
    assert chat.core.sessions[A].nick == "ann"
    assert chat.events() == []


def test_nick_change_of_case_only_and_to_the_same_nick(chat: Peers) -> None:
    assert ok(chat.send(A, Nick, "ann"), NickChanged).nick == "ann"
    assert chat.events() == []
    assert ok(chat.send(A, Nick, "ANN"), NickChanged).nick == "ANN"
    [(_, event)] = chat.events()
    assert (event.sender, event.nick) == ("ann", "ANN")
    assert chat.core.nicks["ann"] == [chat.core.sessions[A]]


def test_nick_change_outside_rooms_publishes_nothing(chat: Peers) -> None:
    ok(chat.send(C, Nick, "caroline"), NickChanged)
    assert chat.events() == []


# -- away ---------------------------------------------------------------------------------


def test_away_is_announced_in_every_room_and_shown_by_who_and_joined(chat: Peers) -> None:
    chat.join(A, "dev")
    chat.events()
    assert ok(chat.send(A, Away, "lunch, back at 2"), AwayChanged).text == "lunch, back at 2"
    events = chat.events()
    assert sorted(topic for topic, _ in events) == [b"r/dev/", b"r/general/"]
    assert {(e.kind, e.sender, e.text) for _, e in events} == {(EventKind.AWAY, "ann", "lunch, back at 2")}
    assert ok(chat.send(B, Who, "general"), Members).away == {"ann": "lunch, back at 2"}
    assert chat.join(C, "general").away == {"ann": "lunch, back at 2"}
    chat.events()
    ok(chat.send(A, Away, "lunch, back at 2"), AwayChanged)  # the same again: nothing new to tell
    assert chat.events() == []
    assert ok(chat.send(A, Away), AwayChanged).text == ""  # back
    assert {(e.kind, e.text) for _, e in chat.events()} == {(EventKind.AWAY, "")}
    assert ok(chat.send(B, Who, "general"), Members).away == {}


def test_a_dm_to_an_away_nick_is_delivered_and_its_sender_told_why(chat: Peers) -> None:
    ok(chat.send(B, Away, "on a train"), AwayChanged)
    chat.events()
    sent = ok(chat.send(A, Dm, "BOB", "call me"), Sent)
    assert (sent.away, sent.offline) == ("on a train", False)
    assert [topic for topic, _ in chat.events()] == [chat.topics[B], chat.topics[A]]
    assert ok(chat.send(B, Dm, "ann", "ok"), Sent).away == ""


def test_an_away_session_joining_a_room_says_so_after_its_join(chat: Peers) -> None:
    ok(chat.send(C, Away, "reading"), AwayChanged)
    assert chat.events() == []  # in no room: nobody to tell
    chat.join(C, "general")
    assert [(e.kind, e.sender, e.text) for _, e in chat.events()] == [
        (EventKind.JOIN, "carol", ""), (EventKind.AWAY, "carol", "reading")
    ]


def test_away_text_is_checked(chat: Peers) -> None:
    assert error(chat.send_map(A, kind="away", text=5)) is ErrorCode.INVALID
    assert error(chat.send_map(A, kind="away", text="x" * 391)) is ErrorCode.INVALID_TEXT
    assert error(chat.send_map(A, kind="away", text="bad\x00")) is ErrorCode.INVALID_TEXT
    assert chat.core.sessions[A].away == "" and chat.events() == []


# -- bye and expiry -----------------------------------------------------------------------


def test_bye_frees_nick_rooms_and_private_topic(chat: Peers) -> None:
    chat.join(A, "solo")
    chat.events()
    topic = chat.topics[A]
    assert chat.subscribe(topic) is Subscription.GRANT
    ok(chat.send(A, Bye), Goodbye)
    [(where, event)] = chat.events()
    assert where == b"r/general/"
    assert (event.kind, event.sender, event.text) == (EventKind.LEAVE, "ann", "quit")
    assert "solo" not in chat.core.rooms
    assert chat.subscribe(b"r/solo/") is Subscription.DENY
    assert chat.subscribe(topic) is Subscription.DENY
    assert A not in chat.core.sessions
    assert ok(chat.send(B, Who, "general"), Members).members == ("bob",)
    assert error(chat.send(A, Say, "general", "hi")) is ErrorCode.NO_SESSION
    assert error(chat.send(B, Dm, "ann", "hi")) is ErrorCode.NO_SUCH_NICK
    assert chat.hello(D, "Ann").topic.encode() != topic
    assert chat.hello(A, "ann2").nick == "ann2"  # the same connection may start again


def test_sessions_expire_after_the_timeout(chat: Peers) -> None:
    chat.advance(10)
    ok(chat.send(B, Ping), Pong)  # bob keeps his session alive
    chat.advance(5.5)  # ann and carol silent for 15.5 s, bob for 5.5 s
    assert chat.core.expire_sessions() == 2
    [(topic, event)] = chat.events()
    assert topic == b"r/general/"
    assert (event.kind, event.sender, event.text, event.ts) == (EventKind.LEAVE, "ann", "timed out", NOW + 15.5)
    assert set(chat.core.sessions) == {B}
    assert sorted(chat.core.nicks) == ["bob"]
    assert error(chat.send(A, Ping)) is ErrorCode.NO_SESSION
    chat.advance(15.5)
    assert chat.core.expire_sessions() == 1
    assert chat.events() == []  # bob was alone: #general just goes away
    assert chat.core.rooms == {} and chat.core.nicks == {} and chat.core.private_topics == {}
    assert chat.core.stats.sessions_expired == 3


def test_sessions_do_not_expire_early(chat: Peers) -> None:
    chat.advance(14)
    assert chat.core.expire_sessions() == 0
    assert len(chat.core.sessions) == 3
    assert chat.events() == []


def test_any_request_keeps_a_session_alive(chat: Peers) -> None:
    for _ in range(5):
        chat.advance(10)
        chat.send(A, Who, "nowhere")  # even one refused
        chat.core.expire_sessions()
    assert set(chat.core.sessions) == {A}


# -- bad frames and limits ----------------------------------------------------------------


def test_bad_frames(peers: Peers) -> None:
    peers.core.handle_bad_frames(A, 3)
    reply = peers._collect(A)
    assert type(reply) is ErrorReply
    assert (reply.code, reply.rid) == (ErrorCode.BAD_FRAMES, None)
    reply = peers.send_frame(A, b"")
    assert type(reply) is ErrorReply
    assert (reply.code, reply.rid) == (ErrorCode.BAD_FRAMES, None)


@pytest.mark.parametrize(
    ("frame", "code", "rid"),
    [
        (b"\xc1", ErrorCode.MALFORMED, None),
        (b"\x91\x01", ErrorCode.MALFORMED, None),
        (encode_map({"v": 2, "kind": "ping", "rid": 4}), ErrorCode.BAD_VERSION, 4),
        (encode_map({"v": 1, "kind": "shout", "rid": 5}), ErrorCode.UNKNOWN_KIND, 5),
        (encode_map({"v": 1, "kind": "join", "rid": 6}), ErrorCode.INVALID, 6),
        (encode_map({"v": 1, "kind": "join", "rid": 7, "room": "a b"}), ErrorCode.INVALID_ROOM, 7),
        (encode_map({"v": 1, "kind": "ping", "rid": True}), ErrorCode.INVALID, None),
        (b"\x80" * 70_000, ErrorCode.TOO_LARGE, None),
    ],
)
def test_unreadable_requests_get_error_replies(peers: Peers, frame: bytes, code: ErrorCode, rid: int | None) -> None:
    peers.hello(A, "ann")
    reply = peers.send_frame(A, frame)
    assert type(reply) is ErrorReply
    assert (reply.code, reply.rid) == (code, rid)
    assert peers.core.stats.errors[code.value] == 1


def test_max_rooms_per_session() -> None:
    peers = Peers(BrokerCore(limits=Limits(max_rooms_per_session=2)))
    peers.hello(A, "ann")
    peers.join(A, "one")
    peers.join(A, "two")
    assert error(peers.send(A, Join, "three")) is ErrorCode.TOO_MANY_ROOMS
    assert "three" not in peers.core.rooms
    peers.join(A, "two")  # already in it: still fine
    ok(peers.send(A, Leave, "one"), Left)
    peers.join(A, "three")


def test_max_sessions() -> None:
    peers = Peers(BrokerCore(limits=Limits(max_sessions=2)))
    peers.hello(A, "ann")
    peers.hello(B, "bob")
    assert error(peers.send(C, Hello, "carol")) is ErrorCode.SERVER_FULL
    assert "carol" not in peers.core.nicks
    ok(peers.send(A, Bye), Goodbye)
    peers.hello(C, "carol")


def test_limits_on_frames_and_names() -> None:
    peers = Peers(BrokerCore(limits=Limits(max_frame=100, max_nick=4, max_text=5)))
    assert error(peers.send(A, Hello, "annie")) is ErrorCode.INVALID_NICK
    peers.hello(A, "ann")
    peers.join(A, "g")
    assert error(peers.send(A, Say, "g", "123456")) is ErrorCode.INVALID_TEXT
    ok(peers.send(A, Say, "g", "12345"), Sent)
    assert error(peers.send_map(A, kind="say", room="g", text="x", pad="y" * 100)) is ErrorCode.TOO_LARGE


def test_ids_strictly_increase(chat: Peers) -> None:
    sent_ids: list[int] = []
    for i in range(20):
        sent_ids.append(ok(chat.send(A, Say, "general", f"m{i}"), Sent).id)
        sent_ids.append(ok(chat.send(B, Dm, "carol", f"d{i}"), Sent).id)
        chat.join(C, f"room{i}")
        chat.subscribe(sync_subscription(chat.topics[C], f"n{i}"))
        if i == 10:
            chat.now -= 1000  # the wall clock steps back: ids must not
            chat.core.set_time(chat.now, chat.mono)
    # Each DM is published twice (to carol and to bob) under one id: count carol's copy.
    event_ids = [e.id for topic, e in chat.events() if e.kind is not EventKind.DM or topic == chat.topics[C]]
    assert len(event_ids) == 80
    assert all(a < b for a, b in itertools.pairwise(event_ids))
    assert all(a < b for a, b in itertools.pairwise(sent_ids))
    assert set(sent_ids) <= set(event_ids)
    assert sent_ids[0] >= int(NOW * 1_000_000)  # microseconds of the wall clock


# -- subscriptions ------------------------------------------------------------------------


def test_subscriptions_granted_for_existing_rooms_and_live_sessions(chat: Peers) -> None:
    assert chat.subscribe(b"r/general/") is Subscription.GRANT
    for peer in (A, B, C):
        assert chat.subscribe(chat.topics[peer]) is Subscription.GRANT
    assert chat.core.stats.subscriptions_granted == 4


def test_subscriptions_denied(chat: Peers) -> None:
    topic = chat.topics[A]
    chat.hello(D, "dave")
    dead = chat.topics[D]
    ok(chat.send(D, Bye), Goodbye)
    chat.join(C, "gone")
    ok(chat.send(C, Leave, "gone"), Left)
    chat.events()
    denied = [
        b"",
        b"r/",
        b"p/",
        b"r",
        b"p",
        b"/",
        b"r/general",
        b"r/General/",
        b"r/general/x",
        b"r/general//",
        b"r/nowhere/",
        b"r/gone/",
        topic[:-1],
        topic[:10],
        topic[:3],
        topic + b"x",
        topic + topic,
        topic.upper(),
        new_private_topic(),
        b"p/" + b"0" * 32 + b"/",
        dead,
        sync_subscription(dead, "abc"),
        sync_subscription(b"p/" + b"0" * 32 + b"/", "abc"),
        sync_subscription(topic, "not-alnum"),
        sync_subscription(topic, "x" * 33),
        topic + b"sync/",
    ]
    for subscription in denied:
        assert chat.subscribe(subscription) is Subscription.DENY, subscription
    assert chat.events() == []
    assert chat.core.stats.subscriptions_denied == len(denied)


@pytest.mark.parametrize("message", [b"\x00", b"\x00r/general/", b"\x00p/", b"\x00junk", b"\x00" + b"\xff" * 50])
def test_unsubscribe_messages(chat: Peers, message: bytes) -> None:
    assert chat.core.handle_subscription(message) is Subscription.UNSUBSCRIBE


@pytest.mark.parametrize("message", [b"", b"\x02r/general/", b"\xffp/", b"r/general/", b"hello"])
def test_junk_on_the_xpub_is_ignored(chat: Peers, message: bytes) -> None:
    assert chat.core.handle_subscription(message) is Subscription.IGNORE
    assert chat.events() == []


def test_sync_subscription_publishes_one_sync_event(chat: Peers) -> None:
    topic = chat.topics[B]
    assert chat.subscribe(sync_subscription(topic, "abc123")) is Subscription.IGNORE
    [(where, event)] = chat.events()
    assert where == topic
    assert (event.kind, event.text, event.room, event.ts) == (EventKind.SYNC, "abc123", None, NOW)
    assert chat.core.handle_subscription(b"\x00" + sync_subscription(topic, "abc123")) is Subscription.UNSUBSCRIBE
    assert chat.events() == []


# -- random traffic -----------------------------------------------------------------------

PEERS = [b"peer-a", b"peer-b", b"peer-c", b"peer-d", b"peer-e"]
NICKS = [
    *("ann", "Ann", "ＡＮＮ", "bob", "Bob", "carol", "dave_", "Ωmega", "ωmega", "eve.x", "frank-1", "Straße"),
    *("strasse", "server", "1bad", ""),
]
ROOMS = ["general", "#General", "ＧＥＮＥＲＡＬ", "dev", "#dev", "x1", "2024", "ωμέγα", "#", "bad room"]
TEXTS = st.one_of(
    st.sampled_from(["hi", "line\nline", "tab\there", "ünï 😀"]),
    st.sampled_from(["\x1b[2J", "", "x" * 5000, "bell\x07"]),
    st.text(max_size=10),
)
JUNK_MAPS = st.dictionaries(
    st.sampled_from(["v", "kind", "rid", "nick", "room", "text", "to", "action", "sender"]),
    st.none() | st.booleans() | st.integers(-5, 2**64 - 1) | st.text(max_size=5) | st.sampled_from(
        ["hello", "join", "leave", "say", "dm", "who", "rooms", "nick", "ping", "bye", *NICKS, *ROOMS]
    ),
    max_size=6,
)


class BrokerMachine(RuleBasedStateMachine):
    """Random requests from several peers, time passing, subscriptions; invariants each step."""

    def __init__(self) -> None:
        super().__init__()
        self.limits = Limits(max_rooms_per_session=3, max_sessions=4)
        self.core = BrokerCore(limits=self.limits, session_timeout=15.0)
        self.now, self.mono = NOW, 0.0
        self.core.set_time(self.now, self.mono)
        self.rid = 0
        self.last_id = 0
        self.topics_seen: set[bytes] = {b"", b"r/", b"p/", b"r/general", new_private_topic()}

    # -- driving --

    def _request(self, peer: bytes, frame: bytes) -> Reply:
        before = self.core.sessions.get(peer)
        nick_before = None if before is None else before.nick
        nicks_before = dict(self.core.nicks)
        self.core.handle_request(peer, frame)  # must never raise
        replies, publications = self.core.take_output()
        assert [to for to, _ in replies] == [peer]
        reply = decode_reply(replies[0][1])
        events = [(topic, decode_event(f)) for topic, f in publications]
        if type(reply) is ErrorReply or nick_before is None:
            assert events == [], "a refused request or one without a session publishes nothing"
        for topic, event in events:
            assert event.sender == nick_before, "sender is the nick of the session that caused it"
            self._check_event(topic, event)
        after = self.core.sessions.get(peer)
        if type(reply) is Welcome:
            assert before is None and after is not None
            assert nick_key(reply.nick) not in nicks_before
            self.topics_seen.add(reply.topic.encode())
        elif type(reply) is Goodbye:
            assert after is None
        elif type(reply) is Joined:
            assert after is not None and after.rooms[reply.room].topic.decode() == reply.topic
            self.topics_seen.add(reply.topic.encode())
        elif type(reply) is Sent:
            assert reply.id == events[0][1].id
        if type(reply) is NickChanged:
            assert after is not None and after.nick == reply.nick
            assert all(e.kind is EventKind.NICK and e.nick == reply.nick for _, e in events)
        return reply

    def _check_event(self, topic: bytes, event: Event, emptied: Collection[str] = ()) -> None:
        """Check one publication after its step; ``emptied``: rooms the step may have emptied."""
        # Ids strictly increase; a DM's copy to its sender shares the id of the recipient's.
        assert event.id > self.last_id or (event.kind is EventKind.DM and event.id == self.last_id)
        self.last_id = event.id
        if event.room is not None:
            assert topic == room_topic(event.room)
            assert event.room in self.core.rooms or event.room in emptied, "only rooms that exist hear events"
        else:
            owner = self.core.private_topics[topic]  # a live session's private topic
            if event.kind is EventKind.DM:
                assert owner.nick in (event.to, event.sender)
            else:
                assert event.kind is EventKind.SYNC

    def _next_rid(self) -> int:
        self.rid += 1
        return self.rid

    def _peer(self, data: st.DataObject) -> bytes:
        """Mostly a peer with a session (so requests get past no_session), sometimes any."""
        live = sorted(self.core.sessions)
        if live and data.draw(st.integers(0, 9)) < 8:
            return data.draw(st.sampled_from(live))
        return data.draw(st.sampled_from(PEERS))

    def _room(self, data: st.DataObject, peer: bytes) -> str:
        """Mostly one of the peer's rooms (so say and leave get past not_member), sometimes any."""
        session = self.core.sessions.get(peer)
        if session is not None and session.rooms and data.draw(st.integers(0, 9)) < 7:
            return data.draw(st.sampled_from(sorted(session.rooms)))
        return data.draw(st.sampled_from(ROOMS))

    @initialize(count=st.integers(0, 3))
    def start(self, count: int) -> None:
        """Begin with a few sessions in #general, or none."""
        for peer, nick in list(zip(PEERS, ["ann", "bob", "carol"], strict=False))[:count]:
            self._request(peer, encode(Hello(self._next_rid(), nick)))
            self._request(peer, encode(Join(self._next_rid(), "general")))

    @rule(data=st.data(), nick=st.sampled_from(NICKS))
    def hello(self, data: st.DataObject, nick: str) -> None:
        idle = [p for p in PEERS if p not in self.core.sessions]
        prefer_idle = bool(idle) and data.draw(st.booleans())
        peer = data.draw(st.sampled_from(idle if prefer_idle else PEERS))
        self._request(peer, encode_map({"v": 1, "kind": "hello", "rid": self._next_rid(), "nick": nick}))

    @rule(data=st.data(), room=st.sampled_from(ROOMS))
    def join(self, data: st.DataObject, room: str) -> None:
        peer = self._peer(data)
        self._request(peer, encode_map({"v": 1, "kind": "join", "rid": self._next_rid(), "room": room}))

    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        peer = self._peer(data)
        room = self._room(data, peer)
        self._request(peer, encode_map({"v": 1, "kind": "leave", "rid": self._next_rid(), "room": room}))

    @rule(data=st.data(), text=TEXTS, action=st.booleans())
    def say(self, data: st.DataObject, text: str, action: bool) -> None:
        peer = self._peer(data)
        room = self._room(data, peer)
        m = {"v": 1, "kind": "say", "rid": self._next_rid(), "room": room, "text": text, "action": action}
        self._request(peer, encode_map(m))

    @rule(data=st.data(), to=st.sampled_from(NICKS), text=TEXTS)
    def dm(self, data: st.DataObject, to: str, text: str) -> None:
        peer = self._peer(data)
        m = {"v": 1, "kind": "dm", "rid": self._next_rid(), "to": to, "text": text}
        reply = self._request(peer, encode_map(m))
        if type(reply) is Sent:
            assert self.core.nicks.get(nick_key(to)) is not None

    @rule(data=st.data())
    def who(self, data: st.DataObject) -> None:
        peer = self._peer(data)
        room = self._room(data, peer)
        reply = self._request(peer, encode_map({"v": 1, "kind": "who", "rid": self._next_rid(), "room": room}))
        if type(reply) is Members:
            nicks = [s.nick for s in self.core.rooms[reply.room].members]
            assert reply.members == tuple(sorted(nicks, key=nick_key))

    @rule(data=st.data())
    def rooms(self, data: st.DataObject) -> None:
        peer = self._peer(data)
        reply = self._request(peer, encode(Rooms(self._next_rid())))
        if type(reply) is RoomList:
            expected = [(name, len(room.members)) for name, room in sorted(self.core.rooms.items())]
            assert [(r.name, r.members) for r in reply.rooms] == expected

    @rule(data=st.data(), nick=st.sampled_from(NICKS))
    def nick(self, data: st.DataObject, nick: str) -> None:
        peer = self._peer(data)
        self._request(peer, encode_map({"v": 1, "kind": "nick", "rid": self._next_rid(), "nick": nick}))

    @rule(data=st.data())
    def ping(self, data: st.DataObject) -> None:
        peer = self._peer(data)
        self._request(peer, encode(Ping(self._next_rid())))

    @rule(data=st.data())
    def bye(self, data: st.DataObject) -> None:
        peer = self._peer(data)
        session = self.core.sessions.get(peer)
        self._request(peer, encode(Bye(self._next_rid())))
        if session is not None:
            self.topics_seen.add(session.topic)  # now a dead private topic

    @rule(data=st.data(), m=JUNK_MAPS)
    def raw_map(self, data: st.DataObject, m: dict[str, Any]) -> None:
        peer = self._peer(data)
        self._request(peer, encode_map(m))

    @rule(data=st.data(), frame=st.binary(max_size=40))
    def raw_bytes(self, data: st.DataObject, frame: bytes) -> None:
        peer = self._peer(data)
        self._request(peer, frame)

    @rule(seconds=st.sampled_from([0.5, 5.0, 14.0, 16.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds
        self.core.set_time(self.now, self.mono)
        before = {p: s.nick for p, s in self.core.sessions.items()}
        members_before = {name: {s.peer for s in room.members} for name, room in self.core.rooms.items()}
        expired = self.core.expire_sessions()
        _, publications = self.core.take_output()
        gone = {p: nick for p, nick in before.items() if p not in self.core.sessions}
        assert expired == len(gone)
        # When every member of a room times out in one sweep, the first ones' leave notices
        # are published while the others are still members, then the room goes away.
        emptied = {name for name, members in members_before.items() if members <= gone.keys()}
        for topic, frame in publications:
            event = decode_event(frame)
            assert (event.kind, event.text) == (EventKind.LEAVE, "timed out")
            assert event.sender in gone.values()
            self._check_event(topic, event, emptied)
        for session in self.core.sessions.values():
            assert self.mono - session.last_seen <= self.core.session_timeout

    @rule(data=st.data())
    def subscribe(self, data: st.DataObject) -> None:
        live = [s.topic for s in self.core.sessions.values()] + list(self.core.room_topics)
        choices = sorted(self.topics_seen | set(live))
        topic = data.draw(st.sampled_from(choices))
        suffix = data.draw(st.sampled_from([b"", b"", b"sync/n0nce", b"x", b"sync/"]))
        subscription = topic + suffix
        result = self.core.handle_subscription(b"\x01" + subscription)
        _, publications = self.core.take_output()
        if subscription in self.core.room_topics or subscription in self.core.private_topics:
            assert result is Subscription.GRANT
        elif suffix == b"sync/n0nce" and topic in self.core.private_topics:
            assert result is Subscription.IGNORE
            [(where, frame)] = publications
            event = decode_event(frame)
            assert (where, event.kind, event.text) == (topic, EventKind.SYNC, "n0nce")
            self._check_event(where, event)
            return
        else:
            assert result is Subscription.DENY
        assert publications == []

    # -- invariants --

    @invariant()
    def nicks_match_sessions(self) -> None:
        core = self.core
        assert len(core.nicks) == len(core.sessions) == len(core.private_topics)
        assert len(core.sessions) <= self.limits.max_sessions
        for peer, session in core.sessions.items():
            assert session.peer == peer
            assert session.nkey == nick_key(session.nick)
            assert core.nicks[session.nkey] == [session]  # insecure mode: one session per nick
            assert core.private_topics[session.topic] is session
            assert PRIVATE_TOPIC.fullmatch(session.topic.decode())
            assert len(session.rooms) <= self.limits.max_rooms_per_session

    @invariant()
    def rooms_match_members(self) -> None:
        core = self.core
        assert len(core.rooms) == len(core.room_topics)
        for name, room in core.rooms.items():
            assert room.name == name == normalize_room(name)
            assert room.members, "a room exists while it has members"
            assert room.topic == room_topic(name)
            assert core.room_topics[room.topic] is room
            for member in room.members:
                assert core.sessions[member.peer] is member
                assert member.rooms[name] is room
        for session in core.sessions.values():
            for name, room in session.rooms.items():
                assert core.rooms[name] is room
                assert session in room.members

    @invariant()
    def nothing_left_queued(self) -> None:
        assert self.core.take_output() == ([], [])


def test_random_traffic_keeps_the_invariants() -> None:
    run_state_machine_as_test(BrokerMachine, settings=machine_settings(200))
