"""BrokerCore's delivery guarantees, driven the way the server's loop drives it, no sockets.

:class:`Loop` plays one server loop turn per :meth:`Loop.turn`: every request of the turn
goes to :meth:`BrokerCore.handle_request`, then :meth:`BrokerCore.commit`, then
:meth:`BrokerCore.take_output` (``server.Broker.serve_forever`` does the same), and what was
queued is decoded. Covered: gapless per-channel seqs, group commit and what a failed commit
turns into, idempotent resends by ``cmid``, session resume, history pages, ticks and the
XPUB junk epoch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zchat.broker.core import RETRY_AFTER, BrokerCore, Subscription, client_hash
from zchat.broker.store import MemoryStore, SqliteStore, Store
from zchat.client.core import ClientCore
from zchat.common.codec import decode_event, decode_reply, encode
from zchat.common.codes import ErrorCode, EventKind
from zchat.common.protocol import (
    STORED_KINDS,
    Bye,
    Dm,
    ErrorReply,
    Event,
    Hello,
    History,
    HistoryPage,
    Join,
    Joined,
    Leave,
    Members,
    Ping,
    Pong,
    Reply,
    Request,
    Say,
    Sent,
    Welcome,
    Who,
)
from zchat.common.topics import room_topic, sync_subscription

NOW = 1_700_000_000.0
A, B, C, D, E = b"peer-a", b"peer-b", b"peer-c", b"peer-d", b"peer-e"
ANN_ID, BOB_ID, CAROL_ID = "ann-identity-000000001", "bob-identity-000000002", "carol-identity-0000003"
ANN_INBOX, BOB_INBOX = "d:" + client_hash(ANN_ID), "d:" + client_hash(BOB_ID)
GENERAL = "r:general"
R = TypeVar("R", bound=Reply)


@dataclass
class Turn:
    """What one loop turn sent: the commit's outcome, replies and publications, decoded."""

    committed: bool
    replies: list[tuple[bytes, Reply]]
    events: list[tuple[bytes, Event]]

    def on(self, topic: bytes) -> list[Event]:
        """The events published on ``topic``."""
        return [event for where, event in self.events if where == topic]

    def stored(self) -> list[Event]:
        """The sequenced events (messages, actions, DMs) published."""
        return [event for _, event in self.events if event.kind in STORED_KINDS]


class Loop:
    """A :class:`BrokerCore` and the server loop around it, one :meth:`turn` at a time."""

    def __init__(self, store: Store | None = None, **options: Any) -> None:
        self.store: Store = store if store is not None else MemoryStore()
        self.core = BrokerCore(store=self.store, **options)
        self.now, self.mono = NOW, 0.0
        self.core.set_time(self.now, self.mono)
        self.topics: dict[bytes, bytes] = {}  # peer -> private topic, from its welcome
        self._rids = itertools.count(1)

    def rid(self) -> int:
        return next(self._rids)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds
        self.core.set_time(self.now, self.mono)

    def turn(self, *requests: tuple[bytes, Request]) -> Turn:
        """Handle ``requests`` in order, then commit and take the output, as the server does."""
        for peer, request in requests:
            self.core.handle_request(peer, encode(request))
        turn = self.flush()
        assert [peer for peer, _ in turn.replies] == [peer for peer, _ in requests], "one reply per request"
        for (_, request), (_, reply) in zip(requests, turn.replies, strict=True):
            assert reply.rid == request.rid
        return turn

    def flush(self) -> Turn:
        committed = self.core.commit()
        replies, publications = self.core.take_output()
        return Turn(
            committed,
            [(peer, decode_reply(frame)) for peer, frame in replies],
            [(topic, decode_event(frame)) for topic, frame in publications],
        )

    def call(self, peer: bytes, request: Request) -> Reply:
        """A turn of one request; its reply."""
        return self.turn((peer, request)).replies[0][1]

    # -- request builders (fresh rids) --

    def say(self, room: str, text: str, cmid: str | None = None, retry: bool = False) -> Say:
        return Say(self.rid(), room, text, False, cmid, retry)

    def dm(self, to: str, text: str, cmid: str | None = None, retry: bool = False) -> Dm:
        return Dm(self.rid(), to, text, False, cmid, retry)

    def history(
        self, room: str | None, *, before: int | None = None, after: int | None = None, limit: int | None = None
    ) -> History:
        return History(self.rid(), room, room is None, before, after, limit)

    # -- shortcuts that expect success --

    def hello(self, peer: bytes, nick: str, client: str | None = None) -> Welcome:
        welcome = ok(self.call(peer, Hello(self.rid(), nick, client)), Welcome)
        self.topics[peer] = welcome.topic.encode()
        return welcome

    def join(self, peer: bytes, room: str) -> Joined:
        return ok(self.call(peer, Join(self.rid(), room)), Joined)

    def sent(self, peer: bytes, request: Say | Dm) -> Sent:
        return ok(self.call(peer, request), Sent)


def ok(reply: Reply, cls: type[R]) -> R:
    assert type(reply) is cls, f"expected {cls.__name__}, got {reply!r}"
    return reply


def error(reply: Reply) -> ErrorCode:
    assert type(reply) is ErrorReply, f"expected an error, got {reply!r}"
    return reply.code


def stored_seqs(store: Store, channel: str) -> list[int]:
    return [m.seq for m in store.page(channel, before=None, after=0, limit=1_000_000)]


def setup_chat(loop: Loop) -> Loop:
    """ann (A) and bob (B) in #general with known identities; carol (C) in no room."""
    loop.hello(A, "ann", ANN_ID)
    loop.hello(B, "bob", BOB_ID)
    loop.hello(C, "carol", CAROL_ID)
    loop.join(A, "general")
    loop.join(B, "general")
    return loop


@pytest.fixture
def chat() -> Loop:
    return setup_chat(Loop())


@pytest.fixture(params=["memory", "sqlite"])
def any_chat(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Loop]:
    """:func:`chat` over each store."""
    store: Store = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / SqliteStore.FILENAME)
    yield setup_chat(Loop(store))
    store.close()


# -- sequencing ---------------------------------------------------------------------------


def test_room_seqs_are_gapless_within_and_across_turns(any_chat: Loop) -> None:
    loop = any_chat
    first = loop.turn(*[(A if i % 2 else B, loop.say("general", f"m{i}")) for i in range(1, 51)])
    assert [ok(reply, Sent).seq for _, reply in first.replies] == list(range(1, 51))
    assert [event.seq for event in first.on(room_topic("general"))] == list(range(1, 51))
    second = loop.turn(*[(B, loop.say("general", f"n{i}")) for i in range(10)])
    assert [ok(reply, Sent).seq for _, reply in second.replies] == list(range(51, 61))
    assert stored_seqs(loop.store, GENERAL) == list(range(1, 61))
    assert loop.store.last_seq(GENERAL) == 60


def test_inbox_seqs_are_gapless_within_and_across_turns(any_chat: Loop) -> None:
    loop = any_chat
    turn = loop.turn(
        (A, loop.dm("bob", "1")),
        (A, loop.dm("bob", "2")),
        (B, loop.dm("ann", "3")),
        (A, loop.dm("ann", "to myself")),
        (A, loop.dm("bob", "4")),
    )
    # ann's inbox gets every one of these five; bob's the four between ann and bob.
    assert [ok(reply, Sent).seq for _, reply in turn.replies] == [1, 2, 3, 4, 5]
    assert [e.seq for e in turn.on(loop.topics[A])] == [1, 2, 3, 4, 5]
    assert [e.seq for e in turn.on(loop.topics[B])] == [1, 2, 3, 4]
    later = loop.turn((B, loop.dm("ann", "5")), (A, loop.dm("bob", "6")))
    assert [ok(reply, Sent).seq for _, reply in later.replies] == [5, 7]  # bob's inbox, then ann's
    assert stored_seqs(loop.store, ANN_INBOX) == list(range(1, 8))
    assert stored_seqs(loop.store, BOB_INBOX) == list(range(1, 7))


def test_rooms_and_inboxes_count_separately(chat: Loop) -> None:
    chat.join(A, "dev")
    turn = chat.turn(
        (A, chat.say("general", "g1")),
        (A, chat.say("dev", "d1")),
        (A, chat.dm("bob", "x")),
        (A, chat.say("general", "g2")),
    )
    assert [ok(reply, Sent).seq for _, reply in turn.replies] == [1, 1, 1, 2]


def test_output_is_taken_only_after_the_commit(any_chat: Loop) -> None:
    loop = any_chat
    requests: list[tuple[bytes, Request]] = [
        (A, loop.say("general", "one")),
        (B, loop.dm("ann", "two")),
        (B, loop.say("general", "three")),
    ]
    for peer, request in requests:
        loop.core.handle_request(peer, encode(request))
    assert loop.core.staged == 3
    # Replies and publications are queued, but nothing is in the store yet: the server must
    # not send them before commit() (it calls commit() and then take_output()).
    assert loop.store.last_seq(GENERAL) == 0
    assert loop.store.page(GENERAL, before=None, after=None, limit=10) == []
    assert loop.store.last_seq(ANN_INBOX) == 0
    turn = loop.flush()
    assert turn.committed
    assert loop.core.staged == 0
    for event in turn.stored():
        channel = GENERAL if event.room is not None else (ANN_INBOX if event.to == "ann" else BOB_INBOX)
        page = loop.store.page(channel, before=None, after=(event.seq or 0) - 1, limit=1)
        assert [(m.seq, m.id, m.text) for m in page] == [(event.seq, event.id, event.text)]
    assert loop.core.stats.commits == 1
    assert loop.core.stats.stored == 4  # the DM is stored twice: once per inbox


def test_a_turn_without_messages_commits_nothing(chat: Loop) -> None:
    turn = chat.turn((A, Ping(chat.rid())), (C, Join(chat.rid(), "dev")))
    assert turn.committed
    assert chat.core.stats.commits == 0
    assert chat.core.staged == 0


def test_sent_carries_the_published_id_ts_and_seq(any_chat: Loop) -> None:
    loop = any_chat
    loop.advance(1.5)
    turn = loop.turn((A, loop.say("general", "hello")))
    sent = ok(turn.replies[0][1], Sent)
    [event] = turn.on(room_topic("general"))
    assert (sent.id, sent.ts, sent.seq, sent.dup) == (event.id, event.ts, event.seq, False)
    assert (event.kind, event.sender, event.text, event.ts) == (EventKind.MESSAGE, "ann", "hello", NOW + 1.5)

    loop.sent(C, loop.dm("ann", "first"))  # ann's inbox is now ahead of bob's
    turn = loop.turn((B, loop.dm("ann", "psst")))
    sent = ok(turn.replies[0][1], Sent)
    [to_ann] = turn.on(loop.topics[A])
    [to_bob] = turn.on(loop.topics[B])
    assert to_ann.id == to_bob.id == sent.id
    assert to_ann.ts == to_bob.ts == sent.ts
    assert sent.seq == to_bob.seq == 1  # the sender's copy
    assert to_ann.seq == 2


def test_dm_stores_one_copy_per_inbox_and_the_senders_carries_the_cmid(any_chat: Loop) -> None:
    loop = any_chat
    loop.sent(C, loop.dm("bob", "warm-up"))  # bob's inbox is now ahead of ann's
    sent = loop.sent(A, loop.dm("bob", "hi bob", cmid="dm-1"))
    [at_bob] = loop.store.page(BOB_INBOX, before=None, after=1, limit=10)
    [at_ann] = loop.store.page(ANN_INBOX, before=None, after=None, limit=10)
    assert (at_bob.seq, at_ann.seq) == (2, 1)
    assert at_bob.id == at_ann.id == sent.id
    for copy in (at_bob, at_ann):
        assert (copy.kind, copy.sender, copy.to, copy.text, copy.room) == ("dm", "ann", "bob", "hi bob", None)
    assert (at_bob.client, at_bob.cmid) == (None, None)
    assert (at_ann.client, at_ann.cmid) == (client_hash(ANN_ID), "dm-1")
    assert sent.seq == at_ann.seq


def test_dm_to_self_stores_one_copy(any_chat: Loop) -> None:
    loop = any_chat
    turn = loop.turn((A, loop.dm("ann", "note to self", cmid="self-1")))
    sent = ok(turn.replies[0][1], Sent)
    [event] = turn.stored()
    assert event.seq == sent.seq == 1
    [copy] = loop.store.page(ANN_INBOX, before=None, after=None, limit=10)
    assert (copy.seq, copy.client, copy.cmid, copy.to) == (1, client_hash(ANN_ID), "self-1", "ann")
    assert loop.core.stats.stored == 1


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(
    turns=st.lists(
        st.tuples(
            st.booleans(),  # does the turn's commit fail?
            st.lists(st.tuples(st.sampled_from([A, B, C]), st.sampled_from(["general", "ann", "bob"])), max_size=6),
        ),
        max_size=8,
    )
)
def test_seqs_stay_gapless_through_failed_commits(turns: list[tuple[bool, list[tuple[bytes, str]]]]) -> None:
    store = MemoryStore()
    loop = setup_chat(Loop(store))
    loop.join(C, "general")
    channels = {
        room_topic("general"): GENERAL,
        loop.topics[A]: ANN_INBOX,
        loop.topics[B]: BOB_INBOX,
        loop.topics[C]: "d:" + client_hash(CAROL_ID),
    }
    published: dict[bytes, list[int | None]] = {topic: [] for topic in channels}
    for fails, sends in turns:
        store.fail_commits = fails
        requests: list[tuple[bytes, Request]] = [
            (peer, loop.say(target, "x") if target == "general" else loop.dm(target, "x")) for peer, target in sends
        ]
        turn = loop.turn(*requests)
        assert turn.committed is (not fails or not requests)
        if fails:
            assert all(error(reply) is ErrorCode.UNAVAILABLE for _, reply in turn.replies)
            assert turn.stored() == []
        else:
            assert all(type(reply) is Sent for _, reply in turn.replies)
        for topic, event in turn.events:
            if event.kind in (EventKind.MESSAGE, EventKind.DM):
                published[topic].append(event.seq)
    for topic, channel in channels.items():
        # Every seq published once, in order, without gaps, and exactly what is stored.
        assert published[topic] == list(range(1, len(published[topic]) + 1))
        assert stored_seqs(store, channel) == published[topic]
        assert store.last_seq(channel) == len(published[topic])


# -- failed commits -----------------------------------------------------------------------


def test_failed_commit_turns_the_turns_messages_into_unavailable(chat: Loop) -> None:
    assert isinstance(chat.store, MemoryStore)
    chat.sent(A, chat.say("general", "before"))
    chat.store.fail_commits = True
    requests: list[tuple[bytes, Request]] = [
        (A, chat.say("general", "one", cmid="c1")),
        (B, chat.say("general", "two")),
        (A, chat.dm("bob", "three", cmid="c3")),
        (B, Ping(chat.rid())),
        (A, chat.say("general", "one", cmid="c1", retry=True)),  # a resend of a message of this turn
        (C, Join(chat.rid(), "general")),
        (A, chat.dm("ann", "four")),
    ]
    turn = chat.turn(*requests)
    assert not turn.committed
    kinds = [type(reply) for _, reply in turn.replies]
    assert kinds == [ErrorReply, ErrorReply, ErrorReply, Pong, ErrorReply, Joined, ErrorReply]
    for _, reply in turn.replies:
        if type(reply) is ErrorReply:
            assert (reply.code, reply.retry_after) == (ErrorCode.UNAVAILABLE, RETRY_AFTER)
    # Only what does not depend on the store went out: carol's join notice.
    assert [(e.kind, e.sender) for _, e in turn.events] == [(EventKind.JOIN, "carol")]
    assert chat.core.stats.commit_failures == 1
    assert chat.core.stats.errors[ErrorCode.UNAVAILABLE.value] == 5
    assert stored_seqs(chat.store, GENERAL) == [1]

    chat.store.fail_commits = False
    retry = chat.turn(
        (A, chat.say("general", "one", cmid="c1", retry=True)),
        (B, chat.say("general", "two")),
        (A, chat.dm("bob", "three", cmid="c3", retry=True)),
    )
    first, second, third = (ok(reply, Sent) for _, reply in retry.replies)
    assert (first.seq, first.dup) == (2, False)  # the seqs of the failed turn, handed out again
    assert (second.seq, second.dup) == (3, False)
    assert (third.seq, third.dup) == (1, False)
    assert [e.seq for e in retry.on(room_topic("general"))] == [2, 3]
    assert stored_seqs(chat.store, GENERAL) == [1, 2, 3]
    assert stored_seqs(chat.store, BOB_INBOX) == [1]
    assert stored_seqs(chat.store, ANN_INBOX) == [1]


def test_failed_commit_on_a_full_sqlite_store(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / SqliteStore.FILENAME)
    loop = setup_chat(Loop(store))
    loop.sent(A, loop.say("general", "fits"))
    store.set_max_pages(store.page_count())
    long = "x" * loop.core.limits.max_text  # a turn of these needs pages the quota refuses
    requests: list[tuple[bytes, Request]] = [(A, loop.say("general", long, cmid=f"c{i}")) for i in range(5)]
    turn = loop.turn(*requests, (B, loop.dm("ann", long)))
    assert [error(reply) for _, reply in turn.replies] == [ErrorCode.UNAVAILABLE] * 6
    assert turn.stored() == []
    assert stored_seqs(store, GENERAL) == [1]
    store.set_max_pages(2**30)
    sent = loop.sent(A, loop.say("general", long, cmid="c0", retry=True))
    assert (sent.seq, sent.dup) == (2, False)
    assert ok(loop.call(B, loop.dm("ann", "y")), Sent).seq == 1
    store.close()


def test_a_failed_message_is_not_remembered_as_sent(chat: Loop) -> None:
    assert isinstance(chat.store, MemoryStore)
    chat.store.fail_commits = True
    assert error(chat.call(A, chat.say("general", "lost", cmid="c1"))) is ErrorCode.UNAVAILABLE
    chat.store.fail_commits = False
    sent = chat.sent(A, chat.say("general", "lost", cmid="c1", retry=True))
    assert (sent.seq, sent.dup) == (1, False)
    assert chat.core.stats.duplicates == 0


def test_joined_seq_of_a_failed_turn_is_the_committed_one(chat: Loop) -> None:
    assert isinstance(chat.store, MemoryStore)
    chat.store.fail_commits = True
    turn = chat.turn((A, chat.say("general", "lost", cmid="c1")), (C, Join(chat.rid(), "general")))
    joined = ok(turn.replies[1][1], Joined)
    chat.store.fail_commits = False
    retried = chat.turn((A, chat.say("general", "lost", cmid="c1", retry=True)))
    # A client that joins with no history (as aio.join(history=0) and reconnects do) starts
    # its feed at Joined.seq; the retried message, seq 1, must still reach it.
    client = ClientCore()
    client.receive_reply(encode(joined))
    client.open_feed("general", joined.seq, 0)
    [event] = retried.stored()
    assert client.accept(event) == [event]
    assert joined.seq == 0  # what was committed when carol joined
    assert chat.store.last_seq(GENERAL) == event.seq == 1


def test_welcome_dm_seq_of_a_failed_turn_is_the_committed_one(chat: Loop) -> None:
    assert isinstance(chat.store, MemoryStore)
    chat.store.fail_commits = True
    turn = chat.turn((A, chat.dm("bob", "lost", cmid="d1")), (D, Hello(chat.rid(), "bob", BOB_ID)))
    welcome = ok(turn.replies[1][1], Welcome)
    assert welcome.resumed
    chat.store.fail_commits = False
    retried = chat.turn((A, chat.dm("bob", "lost", cmid="d1", retry=True)))
    [event] = retried.on(welcome.topic.encode())
    client = ClientCore(BOB_ID)  # bob's client restarted: it kept only its identity
    client.receive_reply(encode(welcome))
    assert client.accept(event) == [event]
    assert welcome.dm_seq == 0  # what was committed when bob's hello was answered
    assert chat.store.last_seq(BOB_INBOX) == event.seq == 1


# -- idempotent resends -------------------------------------------------------------------


@pytest.mark.parametrize("retry", [False, True])
def test_resend_with_the_same_cmid_is_answered_with_the_original(any_chat: Loop, retry: bool) -> None:
    loop = any_chat
    loop.advance(1)
    original = loop.sent(A, loop.say("general", "once", cmid="c1"))
    loop.advance(1)
    turn = loop.turn((A, loop.say("general", "once", cmid="c1", retry=retry)))
    again = ok(turn.replies[0][1], Sent)
    assert (again.id, again.ts, again.seq, again.dup) == (original.id, original.ts, original.seq, True)
    assert turn.events == []
    assert stored_seqs(loop.store, GENERAL) == [1]
    assert loop.core.stats.duplicates == 1


def test_resend_of_a_dm(any_chat: Loop) -> None:
    loop = any_chat
    original = loop.sent(A, loop.dm("bob", "once", cmid="d1"))
    turn = loop.turn((A, loop.dm("bob", "once", cmid="d1", retry=True)))
    again = ok(turn.replies[0][1], Sent)
    assert (again.id, again.seq, again.dup) == (original.id, original.seq, True)
    assert turn.events == []
    assert stored_seqs(loop.store, BOB_INBOX) == stored_seqs(loop.store, ANN_INBOX) == [1]


def test_resend_within_the_same_turn(chat: Loop) -> None:
    turn = chat.turn((A, chat.say("general", "once", cmid="c1")), (A, chat.say("general", "once", cmid="c1")))
    first, second = (ok(reply, Sent) for _, reply in turn.replies)
    assert (second.id, second.seq, second.dup) == (first.id, first.seq, True)
    assert len(turn.stored()) == 1
    assert stored_seqs(chat.store, GENERAL) == [1]


def test_the_same_cmid_from_another_client_is_a_new_message(chat: Loop) -> None:
    first = chat.sent(A, chat.say("general", "mine", cmid="c1"))
    other = chat.sent(B, chat.say("general", "mine too", cmid="c1"))
    assert (first.seq, other.seq, other.dup) == (1, 2, False)
    assert other.id != first.id
    assert stored_seqs(chat.store, GENERAL) == [1, 2]


def test_a_resumed_session_keeps_its_cmids(chat: Loop) -> None:
    original = chat.sent(A, chat.say("general", "once", cmid="c1"))
    chat.hello(D, "ann", ANN_ID)  # ann's connection died; she is back on a new one
    again = chat.sent(D, chat.say("general", "once", cmid="c1", retry=True))
    assert (again.seq, again.id, again.dup) == (original.seq, original.id, True)


def test_resend_after_a_restart_is_found_in_the_store_only_when_flagged(tmp_path: Path) -> None:
    """After a restart the cmid cache is empty: only a resend flagged ``retry`` looks in the store.

    That is the design: a first send (``retry`` false) costs no index lookup, and a client
    sets ``retry`` on every resend, so a resend is still recognised; an unflagged message
    that reuses a cmid is taken as new.
    """
    path = tmp_path / SqliteStore.FILENAME
    store = SqliteStore(path)
    before = setup_chat(Loop(store))
    said = before.sent(A, before.say("general", "once", cmid="c1"))
    dmed = before.sent(A, before.dm("bob", "once", cmid="d1"))
    store.close()

    store = SqliteStore(path)  # the broker restarts: a new core on the same database
    after = setup_chat(Loop(store))
    assert not after.core._cmids  # nothing cached
    again = after.sent(A, after.say("general", "once", cmid="c1", retry=True))
    assert (again.id, again.ts, again.seq, again.dup) == (said.id, said.ts, said.seq, True)
    dm_again = after.sent(A, after.dm("bob", "once", cmid="d1", retry=True))
    assert (dm_again.id, dm_again.seq, dm_again.dup) == (dmed.id, dmed.seq, True)
    assert stored_seqs(store, GENERAL) == [1]

    fresh = after.sent(A, after.say("general", "once", cmid="c2"))
    unflagged = after.sent(A, after.say("general", "twice", cmid="d1"))  # a cmid the store knows, unflagged
    assert (fresh.seq, fresh.dup) == (2, False)
    assert (unflagged.seq, unflagged.dup) == (3, False)
    assert fresh.id > said.id
    store.close()


# -- session resume -----------------------------------------------------------------------


def test_hello_with_the_same_identity_takes_over_the_session(chat: Loop) -> None:
    old_topic = chat.topics[A]
    chat.join(A, "dev")
    welcome = chat.hello(D, "whatever", ANN_ID)
    assert (welcome.resumed, welcome.nick, welcome.client) == (True, "ann", ANN_ID)
    assert welcome.topic.encode() == old_topic
    assert chat.core.stats.sessions_resumed == 1
    assert A not in chat.core.sessions and D in chat.core.sessions
    assert error(chat.call(A, Ping(chat.rid()))) is ErrorCode.NO_SESSION
    # Rooms kept: no rejoin needed, and a rejoin is idempotent.
    assert ok(chat.call(B, Who(chat.rid(), "general")), Members).members == ("ann", "bob")
    turn = chat.turn((D, Join(chat.rid(), "dev")), (D, chat.say("general", "back")))
    assert ok(turn.replies[1][1], Sent).seq == 1
    assert [e.kind for _, e in turn.events] == [EventKind.MESSAGE]
    assert chat.core.handle_subscription(b"\x01" + old_topic) is Subscription.GRANT


def test_hello_from_a_new_client_with_a_live_nick_is_refused(chat: Loop) -> None:
    assert error(chat.call(D, Hello(chat.rid(), "ann", "someone-else-0000000"))) is ErrorCode.NICK_TAKEN
    assert error(chat.call(D, Hello(chat.rid(), "ANN"))) is ErrorCode.NICK_TAKEN
    assert D not in chat.core.sessions
    assert chat.core.sessions[A].nick == "ann"


def test_a_new_identity_gets_a_new_session(chat: Loop) -> None:
    welcome = chat.hello(D, "dave")
    assert not welcome.resumed
    assert len(welcome.client) >= 16  # made up for the client
    assert chat.hello(E, "eve", "eve-identity-00000005").client == "eve-identity-00000005"


def test_a_resume_after_bye_is_a_new_session(chat: Loop) -> None:
    chat.turn((A, Bye(chat.rid())))
    welcome = chat.hello(D, "ann", ANN_ID)
    assert not welcome.resumed
    assert welcome.topic.encode() != chat.topics[A]


# -- history ------------------------------------------------------------------------------


def test_history_needs_membership(chat: Loop) -> None:
    assert error(chat.call(C, chat.history("general"))) is ErrorCode.NOT_MEMBER
    assert error(chat.call(C, chat.history("nowhere", after=0))) is ErrorCode.NOT_MEMBER


@pytest.fixture(params=["memory", "sqlite"])
def paged(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Loop]:
    """:func:`chat` with ``max_page=5`` and 12 messages in #general."""
    store: Store = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / SqliteStore.FILENAME)
    loop = setup_chat(Loop(store, max_page=5))
    loop.turn(*[(A, loop.say("general", f"m{i}")) for i in range(1, 13)])
    yield loop
    store.close()


def test_history_pages_are_capped_at_max_page(paged: Loop) -> None:
    page = ok(paged.call(A, paged.history("general", after=0, limit=100)), HistoryPage)
    assert [e.seq for e in page.events] == [1, 2, 3, 4, 5]
    assert (page.room, page.seq, page.more) == ("general", 12, True)
    page = ok(paged.call(A, paged.history("general", after=10, limit=100)), HistoryPage)
    assert ([e.seq for e in page.events], page.more) == ([11, 12], False)
    page = ok(paged.call(A, paged.history("general")), HistoryPage)  # default limit, capped too
    assert ([e.seq for e in page.events], page.more) == ([8, 9, 10, 11, 12], True)
    page = ok(paged.call(A, paged.history("general", before=8, limit=3)), HistoryPage)
    assert ([e.seq for e in page.events], page.more) == ([5, 6, 7], True)
    page = ok(paged.call(A, paged.history("general", limit=0)), HistoryPage)
    assert (page.events, page.seq, page.more) == ((), 12, False)
    page = ok(paged.call(A, paged.history("general", after=12)), HistoryPage)
    assert (page.events, page.seq, page.more) == ((), 12, False)
    assert paged.hello(D, "dave").max_page == 5


def test_history_events_are_the_published_events(chat: Loop) -> None:
    turn = chat.turn((A, chat.say("general", "one")), (B, Say(chat.rid(), "general", "waves", True)))
    page = ok(chat.call(B, chat.history("general", after=0)), HistoryPage)
    assert list(page.events) == turn.on(room_topic("general"))
    assert [(e.kind, e.seq) for e in page.events] == [(EventKind.MESSAGE, 1), (EventKind.ACTION, 2)]


def test_dm_history_reads_the_sessions_inbox(chat: Loop) -> None:
    turn = chat.turn((A, chat.dm("bob", "one")), (C, chat.dm("bob", "two")), (A, chat.dm("carol", "not bob's")))
    page = ok(chat.call(B, chat.history(None, after=0)), HistoryPage)
    assert list(page.events) == turn.on(chat.topics[B])
    expected = [("ann", "bob", "one", 1), ("carol", "bob", "two", 2)]
    assert [(e.sender, e.to, e.text, e.seq) for e in page.events] == expected
    assert (page.room, page.seq, page.more) == (None, 2, False)
    ann = ok(chat.call(A, chat.history(None, after=0)), HistoryPage)
    assert [(e.to, e.seq) for e in ann.events] == [("bob", 1), ("carol", 2)]


@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
@pytest.mark.parametrize("bound", ["before", "after"])
@pytest.mark.parametrize("value", [2**63 - 1, 2**63, 2**64 - 1])
def test_history_with_a_huge_bound_does_not_crash(tmp_path: Path, store_kind: str, bound: str, value: int) -> None:
    """msgpack carries integers up to 2**64-1, SQLite up to 2**63-1: neither may end the loop."""
    store: Store = MemoryStore() if store_kind == "memory" else SqliteStore(tmp_path / SqliteStore.FILENAME)
    loop = setup_chat(Loop(store))
    loop.sent(A, loop.say("general", "one"))
    loop.core.handle_request(A, encode(loop.history("general", **{bound: value})))
    [(_, reply)] = loop.flush().replies
    if value < 2**63:
        page = ok(reply, HistoryPage)
        assert [e.seq for e in page.events] == ([1] if bound == "before" else [])
    else:
        assert error(reply) is ErrorCode.INVALID
    store.close()


# -- reported seqs ------------------------------------------------------------------------


def test_joined_and_welcome_report_the_last_seq(chat: Loop) -> None:
    chat.turn(*[(A, chat.say("general", str(i))) for i in range(3)])
    chat.turn((A, chat.dm("bob", "1")), (C, chat.dm("bob", "2")))
    assert chat.join(C, "general").seq == 3
    assert chat.join(C, "fresh").seq == 0
    assert chat.hello(D, "bob", BOB_ID).dm_seq == 2  # bob resumes
    assert chat.hello(E, "eve").dm_seq == 0


def test_seqs_are_reported_from_the_store_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / SqliteStore.FILENAME
    store = SqliteStore(path)
    loop = setup_chat(Loop(store))
    loop.turn(*[(A, loop.say("general", str(i))) for i in range(4)])
    loop.turn((A, loop.dm("bob", "x")))
    store.close()

    store = SqliteStore(path)
    loop = Loop(store)
    assert loop.hello(B, "bob", BOB_ID).dm_seq == 1
    assert loop.join(B, "general").seq == 4
    assert loop.sent(B, loop.say("general", "after the restart")).seq == 5
    store.close()


# -- ticks --------------------------------------------------------------------------------


def test_tick_announces_quiet_channels_at_doubling_intervals_until_the_horizon() -> None:
    loop = setup_chat(Loop(tick_interval=1.0, tick_horizon=10.0))
    loop.turn((A, loop.say("general", "one")), (A, loop.say("general", "two")), (A, loop.dm("bob", "x")))
    expected = {(room_topic("general"), "general", 2), (loop.topics[B], None, 1), (loop.topics[A], None, 1)}
    ticked_at = []
    for _ in range(96):  # 12 s in steps of 1/8 s (exact in binary floating point)
        loop.core.tick()
        turn = loop.flush()
        if turn.events:
            assert all(e.kind is EventKind.TICK for _, e in turn.events)
            assert {(topic, e.room, e.seq) for topic, e in turn.events} == expected
            assert len(turn.events) == 3
            ticked_at.append(loop.mono)
        loop.advance(0.125)
    assert ticked_at == [1.0, 2.0, 4.0, 8.0]  # 16 s is past the horizon
    assert loop.core.next_tick_at() == float("inf")
    loop.sent(B, loop.say("general", "three"))  # active again
    loop.core.tick()
    assert loop.flush().events == []  # not quiet yet: a message that follows would reveal a gap
    loop.advance(1.0)
    loop.core.tick()
    assert [(topic, e.kind, e.seq) for topic, e in loop.flush().events] == [
        (room_topic("general"), EventKind.TICK, 3)
    ]


def test_traffic_postpones_the_tick_and_a_new_message_brings_a_late_one_forward() -> None:
    loop = setup_chat(Loop(tick_interval=1.0))
    loop.sent(A, loop.say("general", "one"))
    for _ in range(5):  # a message every half second: never quiet for a whole interval
        loop.advance(0.5)
        loop.core.tick()
        assert loop.flush().events == []
        loop.sent(A, loop.say("general", "more"))
    loop.advance(1.0)
    loop.core.tick()
    assert [e.seq for _, e in loop.flush().events] == [6]
    loop.advance(20.0)  # the next tick was planned 2 s out; a message now brings it back to 1 s
    loop.core.tick()
    loop.flush()
    loop.sent(A, loop.say("general", "again"))
    loop.advance(1.0)
    loop.core.tick()
    assert [e.seq for _, e in loop.flush().events] == [7]


def test_tick_after_a_failed_commit_announces_the_committed_seq(chat: Loop) -> None:
    assert isinstance(chat.store, MemoryStore)
    chat.sent(A, chat.say("general", "kept"))
    chat.store.fail_commits = True
    chat.turn((A, chat.say("general", "lost")))
    chat.advance(chat.core.tick_interval)
    chat.core.tick()
    assert [(e.kind, e.seq) for _, e in chat.flush().events] == [(EventKind.TICK, 1)]


def test_no_tick_for_a_room_without_members_or_a_dead_session(chat: Loop) -> None:
    chat.join(C, "solo")
    chat.turn((C, chat.say("solo", "alone")), (A, chat.dm("bob", "x")))
    chat.turn((C, Leave(chat.rid(), "solo")), (B, Bye(chat.rid())))  # solo is gone, and bob
    chat.advance(chat.core.tick_interval)
    chat.core.tick()
    assert [(topic, e.kind, e.seq) for topic, e in chat.flush().events] == [(chat.topics[A], EventKind.TICK, 1)]


# -- the XPUB junk epoch ------------------------------------------------------------------


def test_sync_events_carry_the_junk_epoch(chat: Loop) -> None:
    core, topic = chat.core, chat.topics[A]
    general = room_topic("general")

    def sync(nonce: str) -> list[tuple[str, int | None]]:
        assert core.handle_subscription(b"\x01" + sync_subscription(topic, nonce)) is Subscription.IGNORE
        return [(e.text, e.seq) for where, e in chat.flush().events if where == topic and e.kind is EventKind.SYNC]

    assert sync("n1") == [("n1", 0)]
    core.handle_xpub_junk()
    # Misaligned: no grant, no revoke, no sync answer.
    assert core.handle_subscription(b"\x01" + general) is Subscription.IGNORE
    assert core.handle_subscription(b"\x00" + general) is Subscription.IGNORE
    assert core.handle_subscription(b"\x01r/nowhere/") is Subscription.IGNORE
    assert sync("n2") == []
    assert core.stats.subscriptions_deferred == 4
    assert core.handle_subscription(b"\x02junk") is Subscription.IGNORE  # junk through the usual door
    assert core.handle_subscription(b"") is Subscription.IGNORE
    core.handle_xpub_junk()
    assert sync("n3") == []
    core.xpub_drained()
    # Aligned again: everything as usual, and the epoch moved on once per junk message.
    assert core.handle_subscription(b"\x01" + general) is Subscription.GRANT
    assert core.handle_subscription(b"\x00" + general) is Subscription.UNSUBSCRIBE
    assert core.handle_subscription(b"\x01r/nowhere/") is Subscription.DENY
    assert sync("n4") == [("n4", 4)]
    assert sync("n5") == [("n5", 4)]
