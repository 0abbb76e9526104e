"""Private rooms, moderation and flood control, end to end: real brokers, real client libraries.

Each test runs a broker on loopback (OS-chosen ports; a restarted broker process binds the
ports its predecessor chose) and blocking :class:`~zchat.client.Client` objects (or an
:class:`~zchat.client.AsyncClient` where a test needs many requests in flight at once). The
promises checked:

* a private room is invite-only, listed only to its members, moderated by its operators;
* a kick or ban in the middle of a conversation: the removed member hears nothing of the room
  afterwards, and everyone else still gets every message exactly once and in order across the
  topic's rotation (``rekey``);
* a private room stays private across broker restarts: members rejoin it, its creator makes
  it again (private) if the broker lost it, and an invited member does not make it public;
* over the broker's rate limits, ``say``/``dm`` and history fills wait ``retry_after`` and
  resend, other requests raise with ``retry_after``.

Nothing waits with a fixed sleep: waits poll until a deadline.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from tests.support import events_until, wait_until

from zchat.broker import BrokerConfig
from zchat.broker.ratelimit import Rate, RateLimits
from zchat.client import AsyncClient, Client, ClientState, EventKind, RequestError
from zchat.common.codes import ErrorCode
from zchat.common.errors import ClientError
from zchat.common.protocol import Event, Sent

if TYPE_CHECKING:
    from tests.conftest import BrokerProcess, Connect, RunningBroker

#: Seconds any single wait may take before the test fails.
WAIT = 10.0

MakeClient = Callable[..., Client]


# -- helpers ---------------------------------------------------------------------------------



def up_to_a_marker(client: Client) -> list[Event]:
    """Every event ``client`` has coming: it sends itself a DM, which is published after
    everything published before it (on any topic of this client), and reads up to it."""
    marker = client.dm(client.current_nick or "", "marker")
    return events_until(client, lambda e: e.kind is EventKind.DM and e.id == marker.id)[:-1]


def messages(events: list[Event], room: str) -> list[Event]:
    return [e for e in events if e.kind is EventKind.MESSAGE and e.room == room]


def seqs(events: list[Event]) -> list[int | None]:
    return [e.seq for e in events]


def refused(code: ErrorCode, call: Callable[[], object]) -> RequestError:
    with pytest.raises(RequestError) as exc:
        call()
    assert exc.value.code is code, exc.value
    return exc.value


def private_room(client_factory: MakeClient, room: str, op: str, *members: str) -> list[Client]:
    """``op`` creates the private ``room`` and invites ``members``, who join it."""
    owner = client_factory(op)
    owner.join(room, private=True)
    clients = [owner]
    for nick in members:
        client = client_factory(nick)
        owner.invite(room, nick)
        client.join(room)
        clients.append(client)
    return clients


def answers(predicate: Callable[[], object]) -> Callable[[], bool]:
    """``predicate`` as a poll that counts a failed request (the broker is away) as false."""

    def poll() -> bool:
        try:
            return bool(predicate())
        except ClientError:
            return False

    return poll


# -- a private room's life ---------------------------------------------------------------------


def test_a_private_room_is_invite_only(client_factory: MakeClient) -> None:
    alice, bob, carol = client_factory("alice"), client_factory("bob"), client_factory("carol")
    joined = alice.join("den", private=True)
    assert (joined.private, joined.members, joined.ops) == (True, ("alice",), ("alice",))
    assert joined.topic.startswith("q/")  # not r/den/: knowing the name is not enough
    refused(ErrorCode.NOT_INVITED, lambda: bob.join("den"))

    assert alice.invite("den", "bob").nick == "bob"
    invitation = bob.recv_event(WAIT)  # before bob is in the room
    assert (invitation.kind, invitation.room, invitation.sender, invitation.nick) == (
        EventKind.INVITE, "den", "alice", "bob",
    )  # fmt: skip
    joined = bob.join("den")  # no flag needed to join a private room
    assert (joined.private, joined.members, joined.ops) == (True, ("alice", "bob"), ("alice",))
    sent = alice.say("den", "just us")
    said = events_until(bob, lambda e: e.kind is EventKind.MESSAGE)[-1]
    assert (said.text, said.id) == ("just us", sent.id)

    assert [(r.name, r.private) for r in bob.rooms() if r.name == "den"] == [("den", True)]
    assert "den" not in [r.name for r in carol.rooms()]
    refused(ErrorCode.NOT_INVITED, lambda: carol.join("den", private=True))


def test_moderation_is_for_operators_of_private_rooms(client_factory: MakeClient) -> None:
    alice, bob = private_room(client_factory, "den", "alice", "bob")
    client_factory("carol", "lobby")
    refused(ErrorCode.NOT_OPERATOR, lambda: bob.kick("den", "alice"))
    refused(ErrorCode.NOT_OPERATOR, lambda: bob.invite("den", "carol"))
    refused(ErrorCode.NOT_OPERATOR, lambda: bob.topic("den", "mine now"))
    refused(ErrorCode.NOT_PRIVATE, lambda: alice.kick("lobby", "carol"))
    refused(ErrorCode.NO_SUCH_NICK, lambda: alice.invite("den", "nobody"))
    refused(ErrorCode.ROOM_EXISTS, lambda: alice.join("lobby", private=True))


def test_topics_and_operators(client_factory: MakeClient) -> None:
    alice, bob = private_room(client_factory, "den", "alice", "bob")
    alice.topic("den", "plans for friday")
    alice.op("den", "bob")
    assert bob.members("den").ops == ("alice", "bob") and bob.who("den") == ["alice", "bob"]
    bob.topic("den", "plans for saturday")  # an operator now
    alice.deop("den", "bob")
    events = events_until(bob, lambda e: e.kind is EventKind.DEOP)
    assert [(e.kind, e.sender, e.nick, e.text) for e in events if e.kind not in (EventKind.JOIN, EventKind.INVITE)] == [
        (EventKind.TOPIC, "alice", None, "plans for friday"),
        (EventKind.OP, "alice", "bob", ""),
        (EventKind.TOPIC, "bob", None, "plans for saturday"),
        (EventKind.DEOP, "alice", "bob", ""),
    ]
    carol = client_factory("carol")
    alice.invite("den", "carol")
    joined = carol.join("den")
    assert (joined.subject, joined.ops) == ("plans for saturday", ("alice",))


def test_a_kick_in_the_middle_of_a_conversation_leaves_no_gap(client_factory: MakeClient) -> None:
    """carol and dave talk without pause while alice kicks bob, then erin: the room moves to
    a new topic twice. Whoever stays gets every message once, in order; bob and erin nothing
    after their kick."""
    alice, bob, carol, dave, erin = private_room(client_factory, "den", "alice", "bob", "carol", "dave", "erin")
    first_topic = alice._client.core.rooms["den"]
    per_talker = 40
    sent: list[Sent] = []

    def talk(client: Client) -> None:
        for i in range(per_talker):
            sent.append(client.say("den", f"{client.current_nick} {i}"))  # noqa: PERF401 - others read it meanwhile

    talkers = [threading.Thread(target=talk, args=(c,)) for c in (carol, dave)]
    for thread in talkers:
        thread.start()
    wait_until(lambda: len(sent) >= per_talker // 2, timeout=WAIT)
    alice.kick("den", "bob", "spam")
    wait_until(lambda: len(sent) >= per_talker, timeout=WAIT)
    alice.ban("den", "erin")
    for thread in talkers:
        thread.join(WAIT)
    total = 2 * per_talker
    assert sorted(s.seq for s in sent) == list(range(1, total + 1))

    for stayer in (alice, carol, dave):
        events = up_to_a_marker(stayer)
        assert seqs(messages(events, "den")) == list(range(1, total + 1)), stayer.current_nick
        removals = [(e.kind, e.nick) for e in events if e.kind in (EventKind.KICK, EventKind.BAN)]
        assert removals == [(EventKind.KICK, "bob"), (EventKind.BAN, "erin")]
        assert stayer._client.core.rooms["den"] != first_topic  # it moved

    for removed, kind in ((bob, EventKind.KICK), (erin, EventKind.BAN)):
        events = up_to_a_marker(removed)
        [at] = [i for i, e in enumerate(events) if e.kind is kind]
        assert (events[at].room, events[at].nick) == ("den", removed.current_nick)
        assert messages(events[at + 1 :], "den") == []  # nothing after the kick
        heard = seqs(messages(events, "den"))
        assert heard == list(range(1, len(heard) + 1)) and len(heard) >= per_talker // 2
        assert "den" not in removed.joined
        refused(ErrorCode.NOT_MEMBER, lambda c=removed: c.say("den", "still here?"))  # type: ignore[misc]
    refused(ErrorCode.NOT_INVITED, lambda: bob.join("den"))
    refused(ErrorCode.BANNED, lambda: erin.join("den"))
    assert alice.who("den") == ["alice", "carol", "dave"]


def test_what_the_new_topic_carried_before_a_client_moved_comes_from_history(
    broker_factory: Callable[..., RunningBroker], connect: Connect
) -> None:
    """dave's client is slow to act on the rekey: carol's last messages go out on the new
    topic before dave listens to it, and nothing comes after them (no tick either, to reveal
    a gap). The fill that ends the move brings them, once, in order."""
    rb = broker_factory(BrokerConfig(tick_interval=3600))
    alice, bob, carol, dave = (connect(rb, nick, timeout=WAIT) for nick in ("alice", "bob", "carol", "dave"))
    alice.join("den", private=True)
    for client in (bob, carol, dave):
        alice.invite("den", client.current_nick or "")
        client.join("den")
    carol.say("den", "before")
    held: list[Event] = []
    slow = dave._client
    slow._on_rekey = held.append  # type: ignore[method-assign, assignment]
    alice.kick("den", "bob")
    wait_until(lambda: held)
    after = [carol.say("den", f"after {i}") for i in range(3)]

    async def move_now() -> None:
        del slow._on_rekey  # the instance's stand-in: the method shows through again
        slow._on_rekey(held[0])

    dave._run(move_now())
    events = events_until(dave, lambda e: e.text == "after 2")
    assert [(e.text, e.seq) for e in messages(events, "den")] == [
        ("before", 1), *((f"after {i}", sent.seq) for i, sent in enumerate(after)),
    ]  # fmt: skip
    assert messages(up_to_a_marker(dave), "den") == []  # and never again


def test_a_ban_holds_until_unban_and_a_new_invitation(client_factory: MakeClient) -> None:
    alice, bob = private_room(client_factory, "den", "alice", "bob")
    alice.ban("den", "bob", "enough")
    ban = events_until(bob, lambda e: e.kind is EventKind.BAN)[-1]
    assert (ban.sender, ban.nick, ban.text) == ("alice", "bob", "enough")
    refused(ErrorCode.BANNED, lambda: alice.invite("den", "bob"))
    refused(ErrorCode.BANNED, lambda: bob.join("den"))
    alice.unban("den", "bob")
    refused(ErrorCode.NOT_INVITED, lambda: bob.join("den"))
    alice.invite("den", "bob")
    assert bob.join("den").members == ("alice", "bob")


def test_the_async_client_has_the_same_methods(broker: RunningBroker) -> None:
    """AsyncClient and Client share names; one pass through the async ones."""
    rb = broker

    async def scenario() -> None:
        async with AsyncClient(rb.router, rb.pub) as alice, AsyncClient(rb.router, rb.pub) as bob:
            await alice.connect("alice")
            await bob.connect("bob")
            assert (await alice.join("den", private=True)).private
            await alice.invite("den", "bob")
            await bob.join("den")
            await alice.op("den", "bob")
            await alice.topic("den", "hi")
            assert (await bob.members("den")).ops == ("alice", "bob")
            await bob.deop("den", "alice")
            await bob.kick("den", "alice", "mutiny")
            kinds: list[EventKind] = []
            while not kinds or kinds[-1] is not EventKind.KICK:
                kinds.append((await alice.recv_event(WAIT)).kind)
            assert "den" not in alice.joined
            await bob.ban("den", "alice")
            await bob.unban("den", "alice")

    asyncio.run(asyncio.wait_for(scenario(), WAIT * 2))


# -- restarts ----------------------------------------------------------------------------------


def test_members_rejoin_a_private_room_after_a_broker_restart(
    broker_process: Callable[..., BrokerProcess], client_factory: MakeClient
) -> None:
    data = {"ZCHAT_DATA_DIR": tempfile.mkdtemp(prefix="zchat-test-")}
    first = broker_process("--session-timeout", "2", env=data)
    made: list[Client] = []
    try:
        alice, bob = (Client(first.router, first.pub, timeout=1.0) for _ in range(2))
        made += [alice, bob]
        alice.connect("alice")
        bob.connect("bob")
        alice.join("den", private=True)
        alice.invite("den", "bob")
        bob.join("den")
        first.proc.kill()
        first.proc.wait(WAIT)
        broker_process("--router", first.router, "--pub", first.pub, "--session-timeout", "2", env=data)

        sent = alice.say("den", "after the restart")  # resent until the new broker has it
        said = events_until(bob, lambda e: e.kind is EventKind.MESSAGE)[-1]
        assert (said.text, said.id) == ("after the restart", sent.id)
        assert alice.members("den").ops == ("alice",)
        carol = Client(first.router, first.pub, timeout=1.0)
        made.append(carol)
        carol.connect("carol")
        refused(ErrorCode.NOT_INVITED, lambda: carol.join("den"))
    finally:
        for client in made:
            client.close()


def test_a_lost_private_room_comes_back_private_for_its_creator(
    broker_process: Callable[..., BrokerProcess],
) -> None:
    """A broker with a memory store forgets the room; its creator's client makes it again
    private on rejoining, never public."""
    options = ("--store", "memory", "--session-timeout", "2")
    first = broker_process(*options)
    alice = Client(first.router, first.pub, timeout=1.0)
    carol = None
    try:
        alice.connect("alice")
        alice.join("den", private=True)
        first.proc.kill()
        first.proc.wait(WAIT)
        broker_process("--router", first.router, "--pub", first.pub, *options)
        wait_until(answers(lambda: ("den", True) in [(r.name, r.private) for r in alice.rooms()]), timeout=WAIT)
        assert alice.state is ClientState.CONNECTED and alice.members("den").ops == ("alice",)
        carol = Client(first.router, first.pub, timeout=1.0)
        carol.connect("carol")
        refused(ErrorCode.NOT_INVITED, lambda: carol.join("den"))
    finally:
        alice.close()
        if carol is not None:
            carol.close()


def test_an_invited_member_does_not_make_a_lost_private_room_public(
    broker_process: Callable[..., BrokerProcess],
) -> None:
    """bob was invited; the broker forgets the room; bob's client must not sit in a public
    room of that name believing it private: it leaves and says so with a leave event."""
    options = ("--store", "memory", "--session-timeout", "2")
    first = broker_process(*options)
    alice, bob = Client(first.router, first.pub, timeout=1.0), Client(first.router, first.pub, timeout=1.0)
    try:
        alice.connect("alice")
        bob.connect("bob")
        alice.join("den", private=True)
        alice.invite("den", "bob")
        bob.join("den")
        alice.close()  # only bob comes back
        events_until(bob, lambda e: e.kind is EventKind.LEAVE and e.sender == "alice")
        first.proc.kill()
        first.proc.wait(WAIT)
        broker_process("--router", first.router, "--pub", first.pub, *options)
        gone = events_until(bob, lambda e: e.kind is EventKind.LEAVE and e.sender == "bob")[-1]
        assert gone.room == "den" and "gone" in gone.text
        assert "den" not in bob.joined
        wait_until(answers(lambda: "den" not in [r.name for r in bob.rooms()]), timeout=WAIT)
    finally:
        alice.close()
        bob.close()


# -- flood control -----------------------------------------------------------------------------


def limited(
    messages: Rate | None = None, subscriptions: Rate | None = None, history: Rate | None = None
) -> BrokerConfig:
    return BrokerConfig(rate_limits=RateLimits(messages, None, subscriptions, history))


def refusals(rb: RunningBroker) -> int:
    return rb.broker.core.stats.errors.get(ErrorCode.RATE_LIMITED.value, 0)


def test_say_and_dm_over_the_limit_wait_and_resend(broker_factory: Callable[..., RunningBroker]) -> None:
    """30 messages at once against a burst of 5 at 20 a second: every one is acknowledged and
    stored once; the refusals stay well under the broker's penalty (50 in 10 s)."""
    rb = broker_factory(limited(messages=Rate(20, 5)))

    async def scenario() -> list[Sent]:
        async with AsyncClient(rb.router, rb.pub) as alice:
            await alice.connect("alice")
            await alice.join("lobby")
            sends = [alice.say("lobby", f"m{i}") if i % 3 else alice.dm("alice", f"d{i}") for i in range(30)]
            acks = await asyncio.gather(*sends)
            stored = await alice.history("lobby", limit=100)
            assert sorted(e.text for e in stored) == sorted(f"m{i}" for i in range(30) if i % 3)
            return acks

    acks = asyncio.run(asyncio.wait_for(scenario(), WAIT * 2))
    assert len({a.id for a in acks}) == 30
    assert 0 < refusals(rb) < 50


def test_history_fills_wait_and_other_requests_raise_with_retry_after(
    broker_factory: Callable[..., RunningBroker],
) -> None:
    rb = broker_factory(limited(subscriptions=Rate(0.5, 2), history=Rate(1, 1)))
    alice = Client(rb.router, rb.pub)
    bob = Client(rb.router, rb.pub)
    try:
        alice.connect("alice")
        for room in ("one", "two"):
            alice.join(room)
            for i in range(3):
                alice.say(room, f"{room} {i}")
        bob.connect("bob")
        bob.join("one")  # its history fill takes the one history token
        bob.join("two")  # its fill is refused, waits, and is sent again
        events = events_until(bob, lambda e: e.text == "two 2")
        assert [e.text for e in messages(events, "one") + messages(events, "two")] == [
            "one 0", "one 1", "one 2", "two 0", "two 1", "two 2",
        ]  # fmt: skip
        assert refusals(rb) == 2  # the second fill of each, resent a second later
        exc = refused(ErrorCode.RATE_LIMITED, lambda: bob.join("three"))  # 2 joins: the burst is spent
        assert exc.retry_after is not None and 0 < exc.retry_after <= 2
    finally:
        alice.close()
        bob.close()
