"""BrokerCore without sockets: private rooms, moderation, topic rotation, keys and flood control.

Each peer is a DEALER routing id; in secure mode each also has a CURVE public key, which the
I/O layer would read from the frame's ZAP ``User-Id``. Subscriptions are checked the way the
XPUB would ask for them, with the subscriber's key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import pytest

from zchat.broker.core import BrokerCore, Subscription
from zchat.broker.ratelimit import Rate, RateLimits
from zchat.broker.store import MemoryStore, SqliteStore
from zchat.common.codec import decode_event, decode_reply, encode
from zchat.common.codes import ErrorCode, EventKind, RequestKind
from zchat.common.limits import Limits
from zchat.common.protocol import (
    Away,
    AwayChanged,
    Bye,
    Dm,
    ErrorReply,
    Event,
    Goodbye,
    Hello,
    History,
    HistoryPage,
    Join,
    Joined,
    Leave,
    Left,
    Members,
    Moderate,
    Moderated,
    Nick,
    NickChanged,
    Reply,
    Request,
    RoomList,
    Rooms,
    Say,
    Sent,
    SetTopic,
    Welcome,
    Who,
)

NOW = 1_700_000_000.0
A, B, C, D = b"peer-a", b"peer-b", b"peer-c", b"peer-d"
KEY_A, KEY_B, KEY_C = "A" * 40, "B" * 40, "C" * 40
R = TypeVar("R", bound=Reply)


class Net:
    """Peers around one core; ``keys`` gives a peer's CURVE key (secure mode)."""

    def __init__(self, core: BrokerCore, keys: dict[bytes, str] | None = None) -> None:
        self.core = core
        self.keys = keys or {}
        self.now, self.mono = NOW, 0.0
        core.set_time(self.now, self.mono)
        self.topics: dict[bytes, bytes] = {}
        self.identities: dict[bytes, str] = {}
        self.published: list[tuple[bytes, Event]] = []
        self._rid = 0

    def send(self, peer: bytes, cls: Any, *args: Any) -> Reply:
        self._rid += 1
        request: Request = cls(self._rid, *args) if cls is not Moderate else Moderate(args[0], self._rid, *args[1:])
        self.core.handle_request(peer, encode(request), self.keys.get(peer))
        self.core.commit()
        replies, publications = self.core.take_output()
        self.published += [(topic, decode_event(frame)) for topic, frame in publications]
        assert [to for to, _ in replies] == [peer]
        reply = decode_reply(replies[0][1])
        assert reply.rid == self._rid
        return reply

    def hello(self, peer: bytes, nick: str) -> Welcome:
        welcome = ok(self.send(peer, Hello, nick), Welcome)
        self.topics[peer] = welcome.topic.encode()
        self.identities[peer] = welcome.client
        return welcome

    def events(self) -> list[tuple[bytes, Event]]:
        out, self.published = self.published, []
        return out

    def subscribe(self, peer: bytes, topic: bytes) -> Subscription:
        return self.core.handle_subscription(b"\x01" + topic, self.keys.get(peer))

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds
        self.core.set_time(self.now, self.mono)


def ok(reply: Reply, cls: type[R]) -> R:
    assert type(reply) is cls, f"expected {cls.__name__}, got {reply!r}"
    return reply


def error(reply: Reply) -> ErrorCode:
    assert type(reply) is ErrorReply, f"expected an error, got {reply!r}"
    return reply.code


def on(events: list[tuple[bytes, Event]], topic: bytes) -> list[Event]:
    return [event for t, event in events if t == topic]


@pytest.fixture
def net() -> Net:
    """ann (operator) and bob in private room #ops; carol online, not invited."""
    net = Net(BrokerCore(store=MemoryStore()))
    for peer, nick in ((A, "ann"), (B, "bob"), (C, "carol")):
        net.hello(peer, nick)
    ok(net.send(A, Join, "ops", True), Joined)
    ok(net.send(A, Moderate, RequestKind.INVITE, "ops", "bob"), Moderated)
    ok(net.send(B, Join, "ops"), Joined)
    net.events()
    return net


def test_creator_of_a_private_room_is_its_operator() -> None:
    net = Net(BrokerCore())
    net.hello(A, "ann")
    joined = ok(net.send(A, Join, "ops", True), Joined)
    assert joined.private and joined.ops == ("ann",) and joined.members == ("ann",)
    assert joined.topic.startswith("q/") and len(joined.topic) == 35
    assert net.subscribe(A, joined.topic.encode()) is Subscription.GRANT


def test_uninvited_cannot_join_see_or_list_a_private_room(net: Net) -> None:
    assert error(net.send(C, Join, "ops")) is ErrorCode.NOT_INVITED
    assert error(net.send(C, Join, "ops", True)) is ErrorCode.NOT_INVITED
    assert error(net.send(C, Who, "ops")) is ErrorCode.NO_SUCH_ROOM
    assert [r.name for r in ok(net.send(C, Rooms), RoomList).rooms] == []
    listed = ok(net.send(B, Rooms), RoomList).rooms
    assert [(r.name, r.members, r.private) for r in listed] == [("ops", 2, True)]
    assert error(net.send(C, History, "ops")) is ErrorCode.NOT_MEMBER


def test_invite_is_announced_to_the_room_and_to_the_invitee(net: Net) -> None:
    room_topic = ok(net.send(A, Join, "ops"), Joined).topic.encode()
    ok(net.send(A, Moderate, RequestKind.INVITE, "ops", "carol"), Moderated)
    events = net.events()
    for topic in (room_topic, net.topics[C]):
        (invite,) = on(events, topic)
        assert (invite.kind, invite.sender, invite.nick, invite.room) == (EventKind.INVITE, "ann", "carol", "ops")
    assert ok(net.send(C, Join, "ops"), Joined).members == ("ann", "bob", "carol")


def test_only_operators_moderate_and_only_private_rooms(net: Net) -> None:
    assert error(net.send(B, Moderate, RequestKind.INVITE, "ops", "carol")) is ErrorCode.NOT_OPERATOR
    assert error(net.send(B, Moderate, RequestKind.KICK, "ops", "ann", "")) is ErrorCode.NOT_OPERATOR
    assert error(net.send(B, SetTopic, "ops", "mine now")) is ErrorCode.NOT_OPERATOR
    ok(net.send(C, Join, "lobby"), Joined)
    assert error(net.send(C, Moderate, RequestKind.KICK, "lobby", "ann", "")) is ErrorCode.NOT_PRIVATE
    assert error(net.send(C, Join, "lobby", True)) is ErrorCode.ROOM_EXISTS
    assert error(net.send(A, Moderate, RequestKind.INVITE, "ops", "nobody")) is ErrorCode.NO_SUCH_NICK
    assert error(net.send(A, Moderate, RequestKind.INVITE, "nowhere", "bob")) is ErrorCode.NO_SUCH_ROOM


def test_kick_rotates_the_topic_and_the_sequence_goes_on(net: Net) -> None:
    old = ok(net.send(A, Join, "ops"), Joined).topic.encode()
    ok(net.send(C, Join, "ops"), ErrorReply)
    ok(net.send(A, Moderate, RequestKind.INVITE, "ops", "carol"), Moderated)
    ok(net.send(C, Join, "ops"), Joined)
    assert ok(net.send(A, Say, "ops", "before"), Sent).seq == 1
    net.events()
    ok(net.send(A, Moderate, RequestKind.KICK, "ops", "carol", "bye now"), Moderated)
    events = net.events()
    (kick,) = on(events, net.topics[C])
    assert (kick.kind, kick.nick, kick.text) == (EventKind.KICK, "carol", "bye now")
    rekeys = {}
    for peer in (A, B):
        kick_seen, rekey = on(events, net.topics[peer])
        assert kick_seen.kind is EventKind.KICK and rekey.kind is EventKind.REKEY
        assert rekey.room == "ops" and rekey.seq == 1
        rekeys[peer] = rekey.text.encode()
    assert on(events, old) == []
    new = rekeys[A]
    assert rekeys[B] == new != old and new.startswith(b"q/")
    # The old topic is dead for everyone; the new one is granted to members (knowing it).
    assert net.subscribe(C, old) is Subscription.DENY
    assert net.subscribe(B, new) is Subscription.GRANT
    assert ok(net.send(A, Say, "ops", "after"), Sent).seq == 2
    (after,) = on(net.events(), new)
    assert (after.text, after.seq) == ("after", 2)
    assert ok(net.send(A, Who, "ops"), Members).members == ("ann", "bob")
    assert error(net.send(C, Join, "ops")) is ErrorCode.NOT_INVITED
    assert error(net.send(C, Say, "ops", "hello?")) is ErrorCode.NOT_MEMBER


def test_ban_keeps_out_until_unban_and_invite(net: Net) -> None:
    ok(net.send(A, Moderate, RequestKind.BAN, "ops", "bob", "spam"), Moderated)
    assert error(net.send(B, Join, "ops")) is ErrorCode.BANNED
    assert error(net.send(A, Moderate, RequestKind.INVITE, "ops", "bob")) is ErrorCode.BANNED
    ok(net.send(A, Moderate, RequestKind.UNBAN, "ops", "bob"), Moderated)
    assert error(net.send(B, Join, "ops")) is ErrorCode.NOT_INVITED
    ok(net.send(A, Moderate, RequestKind.INVITE, "ops", "bob"), Moderated)
    ok(net.send(B, Join, "ops"), Joined)


def test_ops_can_be_given_and_taken(net: Net) -> None:
    ok(net.send(A, Moderate, RequestKind.OP, "ops", "bob"), Moderated)
    assert error(net.send(C, Join, "ops")) is ErrorCode.NOT_INVITED
    assert ok(net.send(B, Who, "ops"), Members).ops == ("ann", "bob")
    ok(net.send(B, Moderate, RequestKind.INVITE, "ops", "carol"), Moderated)
    ok(net.send(B, Moderate, RequestKind.DEOP, "ops", "ann"), Moderated)
    assert ok(net.send(C, Join, "ops"), Joined).ops == ("bob",)
    assert error(net.send(A, Moderate, RequestKind.INVITE, "ops", "carol")) is ErrorCode.NOT_OPERATOR
    assert error(net.send(B, Moderate, RequestKind.OP, "ops", "nobody")) is ErrorCode.NO_SUCH_NICK


def test_topic_is_set_by_operators_and_shown_on_join(net: Net) -> None:
    room = ok(net.send(A, Join, "ops"), Joined).topic.encode()
    ok(net.send(A, SetTopic, "ops", "release on friday"), Moderated)
    (event,) = on(net.events(), room)
    assert (event.kind, event.sender, event.text) == (EventKind.TOPIC, "ann", "release on friday")
    ok(net.send(A, Moderate, RequestKind.INVITE, "ops", "carol"), Moderated)
    assert ok(net.send(C, Join, "ops"), Joined).subject == "release on friday"
    # In a public room any member may set it.
    ok(net.send(C, Join, "lobby"), Joined)
    ok(net.send(C, SetTopic, "lobby", "all welcome"), Moderated)
    assert ok(net.send(B, Join, "lobby"), Joined).subject == "all welcome"
    assert error(net.send(A, SetTopic, "lobby", "x")) is ErrorCode.NOT_MEMBER


def test_a_private_room_outlives_its_members_and_a_restart() -> None:
    store = MemoryStore()
    net = Net(BrokerCore(store=store))
    net.hello(A, "ann")
    net.hello(C, "carol")
    ok(net.send(A, Join, "ops", True), Joined)
    ok(net.send(A, SetTopic, "ops", "secret plans"), Moderated)
    net.send(A, Say, "ops", "hidden")
    ok(net.send(A, Leave, "ops"), Left)
    assert error(net.send(C, Join, "ops")) is ErrorCode.NOT_INVITED  # not public now it is empty
    later = Net(BrokerCore(store=store))
    later.hello(C, "carol")
    assert error(later.send(C, Join, "ops")) is ErrorCode.NOT_INVITED
    assert error(later.send(C, Join, "ops", True)) is ErrorCode.NOT_INVITED


def test_the_private_topic_of_a_room_is_a_secret_in_insecure_mode(net: Net) -> None:
    topic = ok(net.send(A, Join, "ops"), Joined).topic.encode()
    other_digit = b"1" if topic[-2:-1] == b"0" else b"0"
    for guess in (b"", b"q", b"q/", topic[:-1], topic[:-2] + other_digit + b"/"):
        assert net.subscribe(C, guess) is Subscription.DENY


# -- secure mode: keys -----------------------------------------------------------------------


@pytest.fixture
def secure() -> Net:
    keys = {A: KEY_A, B: KEY_B, C: KEY_C, D: KEY_A}
    return Net(BrokerCore(store=MemoryStore(), secure=True, limits=Limits(max_sessions_per_key=2)), keys)


def test_a_nick_belongs_to_the_first_key(secure: Net) -> None:
    assert secure.hello(A, "ann").key == KEY_A
    for lookalike in ("ann", "ANN", "Аnn", "ａｎｎ"):
        assert error(secure.send(B, Hello, lookalike)) is ErrorCode.NICK_TAKEN
    secure.hello(B, "bob")
    ok(secure.send(A, Nick, "annie"), NickChanged)
    # ann is offline now (A renamed itself), but still registered to key A.
    assert error(secure.send(B, Nick, "Ann")) is ErrorCode.NICK_TAKEN
    ok(secure.send(A, Nick, "ann"), NickChanged)


def test_the_same_key_may_hold_two_sessions_sharing_nick_and_inbox(secure: Net) -> None:
    secure.hello(A, "ann")
    second = secure.hello(D, "ann")
    assert second.key == KEY_A and second.topic.encode() != secure.topics[A]
    secure.hello(B, "bob")
    sent = ok(secure.send(B, Dm, "ann", "to both"), Sent)
    events = secure.events()
    for peer in (A, D):
        (dm,) = on(events, secure.topics[peer])
        assert (dm.text, dm.seq) == ("to both", 1)
    assert sent.seq == 1
    page = ok(secure.send(D, History, None, True), HistoryPage)
    assert [e.text for e in page.events] == ["to both"]
    assert error(secure.send(b"peer-e", Hello, "ann")) is ErrorCode.UNAUTHORIZED  # no key at all
    secure.keys[b"peer-f"] = KEY_A
    assert error(secure.send(b"peer-f", Hello, "ann")) is ErrorCode.TOO_MANY_SESSIONS


def test_a_dm_to_an_offline_registered_nick_waits_in_its_keys_inbox(secure: Net) -> None:
    secure.hello(A, "Ann")
    ok(secure.send(A, Bye), Goodbye)  # key A goes offline; "Ann" stays registered to it
    secure.hello(B, "bob")
    sent = ok(secure.send(B, Dm, "ANN", "while you were out", False, "c1"), Sent)
    assert sent.offline and sent.seq == 1  # the seq of bob's own copy
    assert [(topic, e.to) for topic, e in secure.events()] == [(secure.topics[B], "Ann")]  # as registered
    resent = ok(secure.send(B, Dm, "ann", "while you were out", False, "c1", True), Sent)
    assert resent.dup and (resent.id, resent.seq) == (sent.id, sent.seq)
    welcome = secure.hello(D, "ann")  # key A again, in a new session
    assert welcome.dm_seq == 1
    (dm,) = ok(secure.send(D, History, None, True), HistoryPage).events
    assert (dm.sender, dm.to, dm.text, dm.seq, dm.id) == ("bob", "Ann", "while you were out", 1, sent.id)
    live = ok(secure.send(B, Dm, "ann", "now you are here"), Sent)
    assert not live.offline
    assert [e.seq for e in on(secure.events(), secure.topics[D])] == [2]


def test_a_dm_to_any_nick_of_a_key_reaches_the_key_under_its_current_nick(secure: Net) -> None:
    secure.hello(A, "ann")
    ok(secure.send(A, Nick, "annie"), NickChanged)  # "ann" stays registered to key A
    secure.hello(B, "bob")
    # "offline" is about the nick named: that ann and annie are one key is not bob's to learn.
    assert ok(secure.send(B, Dm, "ann", "hi"), Sent).offline
    (dm,) = on(secure.events(), secure.topics[A])
    assert (dm.to, dm.text) == ("ann", "hi")


def test_no_dm_waits_for_a_revoked_key(secure: Net) -> None:
    secure.hello(A, "ann")
    ok(secure.send(A, Bye), Goodbye)
    secure.hello(B, "bob")
    secure.core.key_allowed = lambda key: key != KEY_A  # as the server's ZAP handler says
    assert error(secure.send(B, Dm, "ann", "are you there?")) is ErrorCode.NO_SUCH_NICK
    assert ok(secure.send(B, History, None, True), HistoryPage).events == ()


def test_a_nick_registration_alone_is_committed(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "zchat.db")
    net = Net(BrokerCore(store=store, secure=True), {A: KEY_A})
    net.hello(A, "Ann")  # a turn with nothing else to commit
    store.close()
    again = SqliteStore(tmp_path / "zchat.db")
    try:
        assert again.registered_nick("ann") == (KEY_A, "Ann")
    finally:
        again.close()


def test_a_dm_to_a_nick_nobody_registered_is_refused_and_stores_nothing(secure: Net) -> None:
    secure.hello(B, "bob")
    assert error(secure.send(B, Dm, "nobody", "hello?")) is ErrorCode.NO_SUCH_NICK
    assert ok(secure.send(B, History, None, True), HistoryPage).events == ()
    assert secure.events() == []


def test_without_curve_a_dm_to_an_offline_nick_is_refused() -> None:
    net = Net(BrokerCore(store=MemoryStore()))
    net.hello(A, "ann")
    ok(net.send(A, Bye), Goodbye)  # without keys nobody owns a nick: ann is gone
    net.hello(B, "bob")
    assert error(net.send(B, Dm, "ann", "hello?")) is ErrorCode.NO_SUCH_NICK
    assert ok(net.send(B, History, None, True), HistoryPage).events == ()


def test_private_topics_are_granted_only_to_their_key(secure: Net) -> None:
    secure.hello(A, "ann")
    secure.hello(B, "bob")
    assert secure.subscribe(B, secure.topics[A]) is Subscription.DENY
    assert secure.subscribe(A, secure.topics[A]) is Subscription.GRANT
    room = ok(secure.send(A, Join, "ops", True), Joined).topic.encode()
    assert secure.subscribe(B, room) is Subscription.DENY  # even knowing the topic
    ok(secure.send(A, Moderate, RequestKind.INVITE, "ops", "bob"), Moderated)
    assert secure.subscribe(B, room) is Subscription.GRANT


def test_a_session_cannot_be_resumed_with_another_key(secure: Net) -> None:
    welcome = secure.hello(A, "ann")
    assert error(secure.send(B, Hello, "bob", welcome.client)) is ErrorCode.UNAUTHORIZED
    assert ok(secure.send(D, Hello, "ann", welcome.client), Welcome).resumed  # same key


def test_nicks_per_key_are_bounded() -> None:
    net = Net(BrokerCore(secure=True, limits=Limits(max_nicks_per_key=2)), {A: KEY_A})
    net.hello(A, "one")
    ok(net.send(A, Nick, "two"), NickChanged)
    assert error(net.send(A, Nick, "three")) is ErrorCode.TOO_MANY_NICKS
    ok(net.send(A, Nick, "one"), NickChanged)


def test_revoking_a_key_ends_its_sessions_and_rotates_its_rooms(secure: Net) -> None:
    secure.hello(A, "ann")
    secure.hello(B, "bob")
    old = ok(secure.send(A, Join, "ops", True), Joined).topic.encode()
    ok(secure.send(A, Moderate, RequestKind.INVITE, "ops", "bob"), Moderated)
    ok(secure.send(B, Join, "ops"), Joined)
    secure.events()
    assert secure.core.keys_revoked({KEY_A}) == 1
    _, publications = secure.core.take_output()
    events = [(t, decode_event(f)) for t, f in publications]
    assert [e.kind for e in on(events, secure.topics[B])] == [EventKind.GOAWAY]
    (rekey,) = on(events, secure.topics[A])
    assert rekey.kind is EventKind.REKEY and rekey.text.encode() != old
    assert error(secure.send(B, Say, "ops", "still here?")) is ErrorCode.NO_SESSION


# -- flood control ---------------------------------------------------------------------------


def flood_net(secure: bool = False, **limits: Any) -> Net:
    rates = RateLimits(**{"messages": Rate(1, 3), "strikes": 5, "penalty": 30.0, **limits})
    net = Net(BrokerCore(rate_limits=rates, secure=secure), {A: KEY_A, B: KEY_B} if secure else {})
    net.client = net.hello(A, "ann").client  # type: ignore[attr-defined]
    net.hello(B, "bob")
    ok(net.send(A, Join, "general"), Joined)
    ok(net.send(B, Join, "general"), Joined)
    net.events()
    return net


def test_away_and_nick_cost_a_message_per_room_they_are_announced_in() -> None:
    net = flood_net(messages=Rate(0.001, 4))  # nothing refills meanwhile
    ok(net.send(A, Join, "dev"), Joined)  # ann is in two rooms
    ok(net.send(A, Away, "lunch"), AwayChanged)  # two tokens of the four
    ok(net.send(A, Nick, "annie"), NickChanged)  # two more: none left
    assert error(net.send(A, Away)) is ErrorCode.RATE_LIMITED
    assert net.core.sessions[A].away == "lunch"  # refused: nothing changed
    for room in ("r1", "r2", "r3", "r4", "r5"):
        ok(net.send(B, Join, room), Joined)
    ok(net.send(B, Away, "in six rooms"), AwayChanged)  # six rooms, capped at the burst: it can pass
    assert error(net.send(B, Say, "general", "hi")) is ErrorCode.RATE_LIMITED  # it took all four


def test_a_nick_two_sessions_share_is_away_only_when_both_are(secure: Net) -> None:
    secure.hello(A, "ann")
    secure.hello(D, "ann")  # key A again
    secure.hello(B, "bob")
    for peer in (A, D, B):
        ok(secure.send(peer, Join, "g"), Joined)
    secure.events()
    ok(secure.send(A, Away, "lunch"), AwayChanged)
    assert secure.events() == []  # D is still here: so is ann
    assert ok(secure.send(B, Who, "g"), Members).away == {}
    assert ok(secure.send(B, Dm, "ann", "hi"), Sent).away == ""
    secure.events()
    ok(secure.send(D, Away, "coffee"), AwayChanged)
    assert [(e.kind, e.sender, e.text) for _, e in secure.events()] == [(EventKind.AWAY, "ann", "coffee")]
    assert ok(secure.send(B, Who, "g"), Members).away == {"ann": "coffee"}  # the first reason of the two
    assert ok(secure.send(B, Dm, "ann", "hi"), Sent).away == "coffee"
    secure.events()
    ok(secure.send(A, Away), AwayChanged)
    assert [(e.kind, e.text) for _, e in secure.events()] == [(EventKind.AWAY, "")]


def test_over_the_message_budget_the_reply_says_when_to_retry() -> None:
    net = flood_net()
    for _ in range(3):
        ok(net.send(A, Say, "general", "hi"), Sent)
    refused = ok(net.send(A, Say, "general", "too many"), ErrorReply)
    assert refused.code is ErrorCode.RATE_LIMITED and refused.retry_after == pytest.approx(1.0, abs=0.01)
    assert [e.text for _, e in net.events()] == ["hi"] * 3  # the refused one changed nothing
    ok(net.send(B, Say, "general", "bob is fine"), Sent)  # another identity has its own budget
    net.advance(refused.retry_after or 0)
    assert ok(net.send(A, Say, "general", "later"), Sent).seq == 5


@pytest.mark.parametrize("secure", [False, True])
def test_a_client_that_keeps_flooding_is_disconnected_for_a_while(secure: bool) -> None:
    """The penalty holds the identity: the client identity in insecure mode (a reconnecting
    client presents it again), the key in secure mode (whatever identity it presents)."""
    net = flood_net(secure)
    codes = [net.send(A, Say, "general", "spam") for _ in range(8)]
    assert [type(r).__name__ for r in codes[:3]] == ["Sent"] * 3
    last = ok(codes[-1], ErrorReply)
    assert last.code is ErrorCode.RATE_LIMITED and last.retry_after == pytest.approx(30.0)
    assert error(net.send(A, Say, "general", "again")) is ErrorCode.NO_SESSION
    identity = None if secure else net.client  # type: ignore[attr-defined]
    hello = ok(net.send(A, Hello, "ann2", identity), ErrorReply)
    assert hello.code is ErrorCode.RATE_LIMITED and hello.retry_after is not None and hello.retry_after > 20
    ok(net.send(B, Say, "general", "bob is fine"), Sent)
    net.advance(31)
    ok(net.send(A, Hello, "ann2", identity), Welcome)


def test_history_and_joins_have_budgets_too() -> None:
    net = flood_net(history=Rate(1, 2), subscriptions=Rate(1, 2))
    ok(net.send(A, History, "general"), HistoryPage)
    ok(net.send(A, History, "general"), HistoryPage)
    assert error(net.send(A, History, "general")) is ErrorCode.RATE_LIMITED
    ok(net.send(A, Join, "a"), Joined)  # the second of two: the first was #general
    assert error(net.send(A, Join, "b")) is ErrorCode.RATE_LIMITED


def test_subscriptions_over_the_budget_are_denied_without_strikes() -> None:
    """The SUB side never sees a retry_after, so its refusals must not disconnect the key."""
    rates = RateLimits(subscriptions=Rate(1, 3), strikes=2, penalty=30.0)
    net = Net(BrokerCore(rate_limits=rates, secure=True), {A: KEY_A})
    net.hello(A, "ann")
    topic = net.topics[A]
    decisions = [net.subscribe(A, topic) for _ in range(10)]
    assert decisions[:3] == [Subscription.GRANT] * 3
    assert set(decisions[3:]) == {Subscription.DENY}
    assert A in net.core.sessions  # ten refusals, no penalty
    net.advance(1.0)
    assert net.subscribe(A, topic) is Subscription.GRANT


def test_private_rooms_a_principal_may_create_are_bounded_also_across_a_restart() -> None:
    store = MemoryStore()
    net = Net(BrokerCore(store=store, limits=Limits(max_private_rooms_per_key=2)))
    net.hello(A, "ann")
    ok(net.send(A, Join, "one", True), Joined)
    ok(net.send(A, Join, "two", True), Joined)
    assert error(net.send(A, Join, "three", True)) is ErrorCode.TOO_MANY_ROOMS
    ok(net.send(A, Join, "three"), Joined)  # a public room is not kept: no bound
    later = Net(BrokerCore(store=store, limits=Limits(max_private_rooms_per_key=2)))
    # The same principal after the restart: without CURVE, its client identity.
    ok(later.send(A, Hello, "ann", _identity_of(net, A)), Welcome)
    assert error(later.send(A, Join, "four", True)) is ErrorCode.TOO_MANY_ROOMS


def _identity_of(net: Net, peer: bytes) -> str:
    """The client identity the welcome handed ``peer`` (its principal without CURVE)."""
    return net.identities[peer]


def test_one_keys_sessions_are_listed_in_a_fixed_order(secure: Net) -> None:
    """"ann" and "ANN" (one key's two sessions) compare equal by nick key: who and joined
    list them by the nick itself next, not in whatever order a set holds them."""
    secure.hello(A, "ann")
    secure.hello(D, "ANN")
    secure.hello(B, "bob")
    for peer in (D, B, A):
        ok(secure.send(peer, Join, "lobby"), Joined)
    assert ok(secure.send(B, Who, "lobby"), Members).members == ("ANN", "ann", "bob")
