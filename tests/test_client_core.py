"""ClientCore without sockets: request ids, session state from replies, event decoding, sync."""

from __future__ import annotations

import itertools

import pytest

from zchat.broker.core import BrokerCore, Subscription
from zchat.client.core import DM, ClientCore, Outgoing, Rekey, _Stamps, raise_for_error
from zchat.common.codec import decode_request, encode, encode_map
from zchat.common.codes import ErrorCode, EventKind, RequestKind
from zchat.common.errors import ProtocolError, RequestError
from zchat.common.protocol import (
    Bye,
    Dm,
    ErrorReply,
    Event,
    Goodbye,
    Hello,
    HistoryPage,
    Join,
    Joined,
    Leave,
    Left,
    Members,
    Moderate,
    NickChanged,
    Pong,
    Reply,
    Say,
    Sent,
    SetTopic,
    Welcome,
)
from zchat.common.topics import split_sync

TOPIC = "p/0123456789abcdef0123456789abcdef/"


def welcome(rid: int = 1, nick: str = "ann") -> bytes:
    return encode(Welcome(rid, nick, TOPIC, "be nice", 4.0, 12.0))


@pytest.fixture
def core() -> ClientCore:
    return ClientCore()


@pytest.fixture
def session(core: ClientCore) -> ClientCore:
    """A core that has been welcomed as ann."""
    core.receive_reply(welcome())
    return core


# -- requests -----------------------------------------------------------------------------


def test_request_ids_increase_and_frames_decode(core: ClientCore) -> None:
    out = [
        core.request(Hello, "ann"),
        core.request(Join, "general"),
        core.request(Say, "general", "hi"),
        core.request(Say, "general", "waves", True),
        core.request(Dm, "bob", "psst"),
        core.request(Bye),
    ]
    assert [o.rid for o in out] == [1, 2, 3, 4, 5, 6]
    assert [o.kind for o in out] == ["hello", "join", "say", "say", "dm", "bye"]
    assert [decode_request(o.frame) for o in out] == [
        Hello(1, "ann"),
        Join(2, "general"),
        Say(3, "general", "hi"),
        Say(4, "general", "waves", True),
        Dm(5, "bob", "psst"),
        Bye(6),
    ]
    assert all(type(o) is Outgoing for o in out)


def test_request_ids_are_per_core() -> None:
    first, second = ClientCore(), ClientCore()
    first.request(Hello, "ann")
    assert second.request(Hello, "bob").rid == 1


def test_cmids_are_valid_unique_and_increase() -> None:
    """Valid on the wire, never repeated, and in the order they were made (what keeps the
    broker's cmid index cheap to write)."""
    cmids = [ClientCore.new_cmid() for _ in range(2000)]
    for cmid in cmids:
        say = Say.from_map({"room": "general", "text": "hi", "cmid": cmid}, 1)
        assert say.cmid == cmid and len(cmid) == 22
    assert len(set(cmids)) == len(cmids)
    stamps = [cmid[:14] for cmid in cmids]
    assert stamps == sorted(set(stamps)), "stamps must strictly increase"


def test_cmid_stamps_increase_when_the_clock_stands_still_or_steps_back(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([5_000_000_000, 5_000_000_000, 4_000_000_000, 6_000_000_000])  # ns
    monkeypatch.setattr("zchat.client.core.time.time_ns", lambda: next(clock))
    stamps = _Stamps()
    assert [stamps.next() for _ in range(4)] == [5_000_000, 5_000_001, 5_000_002, 6_000_000]  # µs


def test_request_ids_keep_counting_across_sessions(session: ClientCore) -> None:
    session.request(Join, "general")
    session.receive_reply(encode(Goodbye(2)))
    assert session.request(Hello, "ann").rid == 2


# -- replies ------------------------------------------------------------------------------


def test_initial_state(core: ClientCore) -> None:
    assert (core.nick, core.topic, core.rooms, core.motd) == (None, None, {}, "")


def test_welcome_opens_the_session(core: ClientCore) -> None:
    reply = core.receive_reply(welcome(nick="Ann"))
    assert type(reply) is Welcome
    assert (core.nick, core.topic, core.motd) == ("Ann", TOPIC.encode(), "be nice")
    assert (core.heartbeat, core.session_timeout) == (4.0, 12.0)


@pytest.mark.parametrize(("history", "dm_seq", "max_page", "starts_after"),
                         [(0, 7, 200, 7), (5, 7, 200, 2), (50, 7, 200, 0), (50, 70, 30, 40), (5, 0, 200, 0)])
def test_a_first_welcome_starts_the_inbox_history_back(history: int, dm_seq: int, max_page: int,
                                                       starts_after: int) -> None:
    core = ClientCore()
    core.inbox_history = history
    core.receive_reply(encode(Welcome(1, "ann", TOPIC, "", 4.0, 12.0, "id", dm_seq, max_page=max_page)))
    feed = core.feeds[DM]
    missing = starts_after if dm_seq > starts_after else None
    assert (feed.last, feed.known, feed.gap()) == (starts_after, dm_seq, missing)
    # A later welcome (a reconnection) carries on from the feed: nothing is delivered twice.
    core.receive_reply(encode(Welcome(2, "ann", TOPIC, "", 4.0, 12.0, "id", dm_seq + 1, max_page=max_page)))
    assert (core.feeds[DM] is feed, feed.last, feed.known) == (True, starts_after, dm_seq + 1)


def test_joined_and_left_track_rooms(session: ClientCore) -> None:
    session.receive_reply(encode(Joined(2, "general", "r/general/", ("ann",))))
    session.receive_reply(encode(Joined(3, "dev", "r/dev/", ("ann", "bob"))))
    assert session.rooms == {"general": b"r/general/", "dev": b"r/dev/"}
    assert type(session.receive_reply(encode(Left(4, "general")))) is Left
    assert session.rooms == {"dev": b"r/dev/"}
    session.receive_reply(encode(Left(5, "nowhere")))  # leaving an unknown room is harmless
    assert session.rooms == {"dev": b"r/dev/"}


def test_nick_reply_changes_nick(session: ClientCore) -> None:
    session.receive_reply(encode(NickChanged(2, "anna")))
    assert session.nick == "anna"


def test_goodbye_resets(session: ClientCore) -> None:
    session.receive_reply(encode(Joined(2, "general", "r/general/", ("ann",))))
    assert type(session.receive_reply(encode(Goodbye(3)))) is Goodbye
    assert (session.nick, session.topic, session.rooms) == (None, None, {})


@pytest.mark.parametrize(
    "reply",
    [
        ErrorReply(2, ErrorCode.NICK_TAKEN, "taken"),
        ErrorReply(None, ErrorCode.MALFORMED, "bad"),
        Sent(2, 17, 1.5),
        Pong(2, 1.5),
        Members(2, "general", ("bob",)),
    ],
    ids=repr,
)
def test_other_replies_leave_state_alone(session: ClientCore, reply: Reply) -> None:
    assert session.receive_reply(encode(reply)) == reply
    assert (session.nick, session.topic, session.rooms) == ("ann", TOPIC.encode(), {})


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xc1",
        b"\x91\x01",
        encode(Welcome(1, "ann", TOPIC, "", 1.0, 3.0)) + b"\x00",
        encode(Hello(1, "ann")),  # a request is not a reply
        encode(Event(EventKind.MESSAGE, "g", "ann", "hi", 1.0, 1)),
        encode_map({"v": 2, "kind": "goodbye", "rid": 1}),
        encode_map({"v": 1, "kind": "goodbye"}),
        encode_map({"v": 1, "kind": "welcome", "rid": 1, "nick": "ann"}),
        encode_map({"v": 1, "kind": "joined", "rid": 1, "room": "g", "topic": 5, "members": []}),
        encode_map({"v": 1, "kind": "error", "rid": 1, "code": "no_such_code", "reason": "?"}),
        b"\xdd\xff\xff\xff\xff",
        b"\x91" * 100_000,
    ],
)
def test_malformed_replies_raise_protocol_error(session: ClientCore, frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        session.receive_reply(frame)
    assert (session.nick, session.topic, session.rooms) == ("ann", TOPIC.encode(), {})


def test_raise_for_error() -> None:
    ok = Pong(1, 2.0)
    assert raise_for_error(ok) is ok
    with pytest.raises(RequestError) as exc:
        raise_for_error(ErrorReply(1, ErrorCode.SERVER_FULL, "full", 3.0))
    assert (exc.value.code, exc.value.reason, exc.value.retry_after) == (ErrorCode.SERVER_FULL, "full", 3.0)


# -- events -------------------------------------------------------------------------------


def test_receive_event(session: ClientCore) -> None:
    event = Event(EventKind.MESSAGE, "general", "bob", "hi", 1.5, 42)
    assert session.receive_event([b"r/general/", encode(event)]) == event


@pytest.mark.parametrize("count", [0, 1, 3, 4])
def test_receive_event_needs_two_frames(session: ClientCore, count: int) -> None:
    frames = [b"r/general/", encode(Event(EventKind.JOIN, "general", "bob", "", 1.0, 1))] + [b"x"] * 2
    with pytest.raises(ProtocolError) as exc:
        session.receive_event(frames[:count])
    assert exc.value.code is ErrorCode.BAD_FRAMES


@pytest.mark.parametrize(
    "frame",
    [b"", b"\xc1", encode(Goodbye(1)), encode_map({"v": 1, "kind": "message", "sender": "bob"})],
)
def test_malformed_events_raise_protocol_error(session: ClientCore, frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        session.receive_event([b"r/general/", frame])


# -- sync ---------------------------------------------------------------------------------


def test_new_sync_needs_a_session(core: ClientCore) -> None:
    with pytest.raises(RuntimeError):
        core.new_sync()


def test_new_sync_is_a_sync_subscription(session: ClientCore) -> None:
    nonces = set()
    for _ in range(50):
        nonce, subscription = session.new_sync()
        assert split_sync(subscription) == (TOPIC.encode(), nonce)
        nonces.add(nonce)
    assert len(nonces) == 50


def test_new_sync_after_goodbye_needs_a_new_session(session: ClientCore) -> None:
    session.receive_reply(encode(Goodbye(2)))
    with pytest.raises(RuntimeError):
        session.new_sync()


# -- both cores in memory -----------------------------------------------------------------


def test_client_core_against_broker_core() -> None:
    """Two client cores talk through one broker core, frames passed by hand."""
    broker = BrokerCore(motd="hi", session_timeout=9.0)
    broker.set_time(1_700_000_000.0, 0.0)
    ann, bob = ClientCore(), ClientCore()
    published: list[tuple[bytes, bytes]] = []

    def call(client: ClientCore, peer: bytes, out: Outgoing) -> Reply:
        broker.handle_request(peer, out.frame)
        [(to, frame)], publications = broker.take_output()
        published.extend(publications)
        assert to == peer
        reply = client.receive_reply(frame)
        assert reply.rid == out.rid
        return raise_for_error(reply)

    call(ann, b"a", ann.request(Hello, "ann"))
    call(bob, b"b", bob.request(Hello, "bob"))
    assert (ann.nick, ann.heartbeat, ann.motd) == ("ann", 3.0, "hi")
    assert ann.topic is not None and bob.topic is not None
    call(ann, b"a", ann.request(Join, "#General"))
    published.clear()  # ann's own join notice
    assert broker.handle_subscription(b"\x01" + ann.rooms["general"]) is Subscription.GRANT
    nonce, subscription = ann.new_sync()
    assert broker.handle_subscription(b"\x01" + subscription) is Subscription.IGNORE
    _, [(topic, frame)] = broker.take_output()
    sync = ann.receive_event([topic, frame])
    assert (topic, sync.kind, sync.text) == (ann.topic, EventKind.SYNC, nonce)
    call(bob, b"b", bob.request(Dm, "ANN", "psst"))
    assert [t for t, _ in published] == [ann.topic, bob.topic]
    event = ann.receive_event(list(published[0]))
    assert (event.sender, event.to, event.text) == ("bob", "ann", "psst")
    with pytest.raises(RequestError) as exc:
        call(bob, b"b", bob.request(Say, "general", "hi"))
    assert exc.value.code is ErrorCode.NOT_MEMBER
    call(ann, b"a", ann.request(Leave, "general"))
    assert ann.rooms == {}
    call(ann, b"a", ann.request(Bye))
    assert ann.topic is None


# -- private rooms and moderation ---------------------------------------------------------

OLD = "q/" + "a" * 32 + "/"
NEW = "q/" + "b" * 32 + "/"


_IDS = itertools.count(900)


def moderation(kind: EventKind, nick: str, *, room: str = "den", sender: str = "op", text: str = "") -> Event:
    return Event(kind, room, sender, text, 2.0, next(_IDS), nick=nick)


def message(seq: int, room: str = "den") -> Event:
    return Event(EventKind.MESSAGE, room, "bob", f"m{seq}", 1.0, 100 + seq, seq=seq)


@pytest.fixture
def den(session: ClientCore) -> ClientCore:
    """ann in the private room #den (topic OLD), which has had 5 messages, all delivered."""
    session.receive_reply(encode(Joined(2, "den", OLD, ("ann", "bob"), 5, True, "plans", ("ann",))))
    session.open_feed("den", 5, 0)
    return session


def test_moderation_requests_carry_their_kind(core: ClientCore) -> None:
    kick = core.request(Moderate, RequestKind.KICK, "den", "bob", "spam")
    invite = core.request(Moderate, RequestKind.INVITE, "den", "carol")
    topic = core.request(SetTopic, "den", "plans")
    private = core.request(Join, "den", True)
    assert [o.kind for o in (kick, invite, topic, private)] == ["kick", "invite", "topic", "join"]
    assert [decode_request(o.frame) for o in (kick, invite, topic, private)] == [
        Moderate(RequestKind.KICK, 1, "den", "bob", "spam"),
        Moderate(RequestKind.INVITE, 2, "den", "carol"),
        SetTopic(3, "den", "plans"),
        Join(4, "den", True),
    ]


def test_joined_tells_which_rooms_are_private(den: ClientCore) -> None:
    den.receive_reply(encode(Joined(3, "general", "r/general/", ("ann",))))
    assert den.private == {"den"}
    den.keep_private.add("den")
    den.receive_reply(encode(Left(4, "den")))
    assert (den.private, den.keep_private, set(den.rooms)) == (set(), set(), {"general"})


def test_rekey_says_what_to_swap_and_the_feed_learns_the_old_topics_last_seq(den: ClientCore) -> None:
    rekey = Event(EventKind.REKEY, "den", "", NEW, 2.0, 901, seq=7)
    assert den.accept(rekey) == []  # not for the application
    move = den.rekey(rekey)
    assert move == Rekey("den", OLD.encode(), NEW.encode(), 7)
    assert den.rooms["den"] == OLD.encode()  # until the new subscription is in force
    assert den.feeds["den"].gap() == 5  # 6 and 7 went out on the old topic: fetch them
    assert den.rekeyed(move)
    assert den.rooms["den"] == NEW.encode()
    assert den.rekey(rekey) is None  # done already


def test_no_gap_and_no_repeat_across_a_rekey(den: ClientCore) -> None:
    """6 arrives on the old topic, 7 is lost with it, 9 arrives live on the new topic before
    the history fill (after 6) brings 7..9: each is delivered once, in order."""
    assert [e.seq for e in den.accept(message(6))] == [6]
    move = den.rekey(Event(EventKind.REKEY, "den", "", NEW, 2.0, 901, seq=7))
    assert move is not None and den.rekeyed(move)
    assert den.accept(message(9)) == []  # held: 7 and 8 are missing
    page = HistoryPage(3, "den", tuple(message(seq) for seq in (7, 8, 9)), 9, False)
    assert [e.seq for e in den.accept_history("den", 6, page)] == [7, 8, 9]
    assert den.accept(message(9)) == [] and den.feeds["den"].gap() is None


@pytest.mark.parametrize(
    ("room", "text"),
    [("elsewhere", NEW), ("den", OLD), ("den", "r/den/"), ("den", "p/" + "c" * 32 + "/")],
    ids=["not joined", "same topic", "public topic", "private topic"],
)
def test_rekeys_that_ask_nothing_are_ignored(den: ClientCore, room: str, text: str) -> None:
    assert den.rekey(Event(EventKind.REKEY, room, "", text, 2.0, 901, seq=7)) is None
    assert den.rooms["den"] == OLD.encode()


def test_a_move_finished_after_leaving_is_not_recorded(den: ClientCore) -> None:
    move = den.rekey(Event(EventKind.REKEY, "den", "", NEW, 2.0, 901, seq=5))
    assert move is not None
    den.receive_reply(encode(Left(3, "den")))
    assert not den.rekeyed(move) and "den" not in den.rooms


@pytest.mark.parametrize("kind", [EventKind.KICK, EventKind.BAN])
def test_being_kicked_or_banned_drops_the_room(den: ClientCore, kind: EventKind) -> None:
    den.keep_private.add("den")
    removal = moderation(kind, "ANN", text="spam")  # nicks compare as the broker does
    assert den.accept(removal) == [removal]
    assert ("den" in den.rooms, "den" in den.feeds, den.private, den.keep_private) == (False, False, set(), set())
    assert den.accept(removal) == []  # its copy on the other topic
    assert den.accept(message(6)) == []  # anything still in flight
    assert den.rekey(Event(EventKind.REKEY, "den", "", NEW, 2.0, 901, seq=5)) is None


def test_moderation_of_others_is_delivered_and_changes_nothing(den: ClientCore) -> None:
    events = [
        moderation(EventKind.KICK, "bob", text="spam"),
        moderation(EventKind.BAN, "bob"),
        moderation(EventKind.UNBAN, "bob"),
        moderation(EventKind.INVITE, "carol"),
        moderation(EventKind.OP, "carol"),
        moderation(EventKind.DEOP, "carol"),
        Event(EventKind.TOPIC, "den", "op", "new plans", 2.0, 902),
    ]
    assert [den.accept(e) for e in events] == [[e] for e in events]
    assert den.rooms == {"den": OLD.encode()}


def test_an_invitation_comes_before_the_room_is_joined(den: ClientCore) -> None:
    mine = moderation(EventKind.INVITE, "ann", room="attic")
    theirs = moderation(EventKind.INVITE, "carol", room="attic")
    assert den.accept(mine) == [mine]
    assert den.accept(theirs) == []  # a room we are not in
    assert "attic" not in den.rooms


def test_an_event_published_on_two_topics_is_delivered_once(den: ClientCore) -> None:
    invite = moderation(EventKind.INVITE, "ann")  # a member invited again: room and private topic
    assert den.accept(invite) == [invite]
    assert den.accept(invite) == []
