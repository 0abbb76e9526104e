"""Security properties of :class:`BrokerCore` under random request sequences (hypothesis).

A rule-based state machine plays the server loop around the sans-I/O core — requests
handled as they come, one commit per turn (sometimes refused by the store), session
expiry, ticks — and plays the XPUB: each party's subscriptions go through
``handle_subscription`` and every publication reaches the pipes holding a granted prefix of
its topic, exactly as ZeroMQ's prefix matching would deliver it.

The parties:

* agents: conforming clients whose pipe subscribes to what their replies and rekey events
  tell them, and which, as the worst client would, never give up a private subscription
  (after a bye, a timeout, a kick: the pipe keeps what it was granted);
* spies: pipes without a session subscribing to guesses (``b""``, prefixes, dead topics);
  in secure mode to the exact topics of everyone else, as if they had leaked.

Requests carry forged ``sender``/``seq``/``id`` fields. The machine runs insecure and secure
(every request and subscription then comes with a CURVE key; two agents share one key).

Checked after every turn and every subscription:

* sender: every message, action and DM carries the nick the sending session had;
* privacy: spies receive nothing on private topics (``p/``, ``q/``); an agent receives on
  ``p/`` topics only its live session's publications, DMs only of its principal; a member
  kicked or banned receives nothing more of the room on any topic it still holds; nothing
  is published on a private room's topic once it rotated; in secure mode a private topic is
  granted only to its owner's key and a private room's only to a member's;
* sequencing: each channel's published seqs run 1, 2, 3... with no gap or repeat across
  refused commits; a refused turn publishes nothing stored and acknowledges nothing new; a
  resend is answered with the original's id and seq; ticks and rekeys announce no seq the
  store has not committed.

``test_broker_core.py`` holds the core's own bookkeeping invariants under random traffic;
``test_core_delivery.py`` the delivery guarantees turn by turn.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule, run_state_machine_as_test
from tests.support import machine_settings

from zchat.broker.core import BrokerCore, Subscription, client_hash
from zchat.broker.store import MemoryStore
from zchat.common.codec import decode_event, decode_reply, encode_map
from zchat.common.codes import ErrorCode, EventKind
from zchat.common.limits import Limits
from zchat.common.names import nick_key
from zchat.common.protocol import (
    ErrorReply,
    Event,
    Goodbye,
    Joined,
    Left,
    Moderated,
    NickChanged,
    Reply,
    Sent,
    Welcome,
)

NOW = 1_700_000_000.0
NICKS = ["ann", "bob", "cy", "ANN", "ｂｏｂ"]
ROOMS = ["general", "den", "vault"]
MODERATION = ["invite", "kick", "ban", "unban", "op", "deop"]
FORGED = {"sender": "root", "seq": 1, "id": 1, "ts": 0.0, "kind_": "message"}
SPY_KEY = "S" * 40
STORED = {EventKind.MESSAGE, EventKind.ACTION, EventKind.DM}
PRIVATE = (b"p/", b"q/")
Channel = tuple[str, str]  # ("r", room) or ("d", principal)


@dataclass(eq=False)
class Pipe:
    """One subscriber connection on the simulated XPUB."""

    name: str
    key: str | None  # its CURVE key (secure mode)
    granted: set[bytes] = field(default_factory=set)
    #: topic -> subscribe (True) or unsubscribe (False), not yet placed (the XPUB misaligned)
    pending: dict[bytes, bool] = field(default_factory=dict)

    def wants(self, topic: bytes) -> bool:
        return any(topic.startswith(prefix) for prefix in self.granted)


@dataclass(eq=False)
class Agent:
    """A client: its identity, key, two DEALERs (to resume from another) and its pipe."""

    identity: str
    key: str | None
    principal: str  # what the core calls it: the key in secure mode, else the identity's hash
    peers: tuple[bytes, bytes]
    pipe: Pipe
    peer: bytes | None = None  # where its live session is
    topic: bytes | None = None  # its live session's private topic
    rooms: dict[str, bytes] = field(default_factory=dict)  # room -> topic as last told
    cmids: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, target, cmid) sent


@dataclass
class Asked:
    """One request of the current turn, as the core saw it when it handled it."""

    peer: bytes
    kind: str
    rid: int
    agent: Agent | None
    nick: str | None  # the sending session's nick then (None: no session)
    principal: str | None = None
    text: str | None = None
    room: str | None = None
    about: str | None = None  # a moderation's target nick, as asked
    target: str | None = None  # its principal, if known
    cmid: str | None = None
    expect: ErrorCode | None = None


class CoreMachine(RuleBasedStateMachine):
    """Random traffic through the core and the simulated XPUB; see the module docstring."""

    secure = False

    def __init__(self) -> None:
        super().__init__()
        self.store = MemoryStore()
        self.core = BrokerCore(
            store=self.store, limits=Limits(max_rooms_per_session=2), session_timeout=15.0, secure=self.secure
        )
        self.now, self.mono = NOW, 0.0
        self.core.set_time(self.now, self.mono)
        self.rids = itertools.count(1)
        self.serial = itertools.count()
        keys = ["A" * 40, "A" * 40, "B" * 40, "C" * 40]  # agents 0 and 1 share a key
        self.agents: list[Agent] = []
        for i, key in enumerate(keys):
            identity = f"agent-identity-{i:010d}"
            principal = key if self.secure else client_hash(identity)
            peers = (f"peer-{i}".encode(), f"peer-{i}-again".encode())
            own_key = key if self.secure else None
            self.agents.append(Agent(identity, own_key, principal, peers, Pipe(f"agent{i}", own_key)))
        self.spies = [Pipe(f"spy{i}", SPY_KEY if self.secure else None) for i in range(2)]
        self.turn: list[Asked] = []
        self.topic_owner: dict[bytes, Agent] = {}
        self.seen_topics: set[bytes] = set()
        self.nicks_of: dict[str, set[str]] = {}  # principal -> every nick its sessions had
        self.last_seq: dict[Channel, int] = {}
        self.id_seq: dict[tuple[Channel, int], int] = {}
        self.acked: dict[tuple[str, str], tuple[int, int]] = {}  # (identity, cmid) -> (id, seq)
        self.expelled: set[tuple[str, str]] = set()  # (room, principal) kicked or banned
        self.acl: dict[str, set[str]] = {}  # private room -> member principals
        self.current_q: dict[str, bytes] = {}  # private room -> its topic now

    @initialize(setting=st.sampled_from(["empty", "public", "private"]))
    def start(self, setting: str) -> None:
        """Begin with nobody, or with three agents in a public room or a private one."""
        if setting == "empty":
            return
        ann, bob, cy = self.agents[0], self.agents[2], self.agents[3]
        for agent, nick in ((ann, "ann"), (bob, "bob"), (cy, "cy")):
            self._ask(agent, agent.peers[0], "hello", agent.key, nick=nick, client=agent.identity)
        self.end_turn(fail=False, seconds=0.0, tick=False, drained=True)
        room = "vault" if setting == "private" else "general"
        self._from(ann, "join", room=room, private=setting == "private").room = room
        if setting == "private":
            for nick in ("bob", "cy"):
                self.moderate_now(ann, "invite", room, nick)
        self.end_turn(fail=False, seconds=0.0, tick=False, drained=True)
        for agent in (bob, cy):
            self._from(agent, "join", room=room).room = room
        self.end_turn(fail=False, seconds=0.0, tick=False, drained=True)

    # -- requests -----------------------------------------------------------------------------

    def _ask(self, agent: Agent | None, peer: bytes, kind: str, key: str | None, **fields: Any) -> Asked:
        session = self.core.sessions.get(peer)
        asked = Asked(peer, kind, next(self.rids), agent, session.nick if session else None,
                      session.principal if session else None)
        self.turn.append(asked)
        self.core.handle_request(peer, encode_map({"v": 1, "kind": kind, "rid": asked.rid, **fields}), key)
        return asked

    def _from(self, agent: Agent, kind: str, **fields: Any) -> Asked:
        return self._ask(agent, agent.peer or agent.peers[0], kind, agent.key, **fields)

    def _text(self) -> str:
        return f"text{next(self.serial)}"

    def _agent(self, data: st.DataObject) -> Agent:
        """Mostly an agent with a session (so requests get past no_session)."""
        live = [agent for agent in self.agents if agent.peer is not None]
        often: bool = data.draw(st.integers(0, 9)) > 0
        return data.draw(st.sampled_from(live if live and often else self.agents))

    def _room(self, data: st.DataObject, agent: Agent) -> str:
        """Mostly one of the agent's rooms (so say, leave and moderation get somewhere)."""
        mine = sorted(agent.rooms)
        often: bool = data.draw(st.integers(0, 4)) > 0
        return data.draw(st.sampled_from(mine if mine and often else ROOMS))

    def _nick(self, data: st.DataObject) -> str:
        """Mostly a live session's nick (so DMs and moderation find their target)."""
        live = sorted(session.nick for session in self.core.sessions.values())
        often: bool = data.draw(st.integers(0, 3)) > 0
        return data.draw(st.sampled_from(live if live and often else NICKS))

    @rule(data=st.data(), nick=st.sampled_from(NICKS), other_peer=st.booleans())
    def hello(self, data: st.DataObject, nick: str, other_peer: bool) -> None:
        agent = data.draw(st.sampled_from(self.agents))
        self._ask(agent, agent.peers[other_peer], "hello", agent.key, nick=nick, client=agent.identity)

    @precondition(lambda self: self.secure)
    @rule(data=st.data(), nick=st.sampled_from(NICKS))
    def impostor(self, data: st.DataObject, nick: str) -> None:
        """Another key resumes an agent's live session with its identity: refused."""
        agent = data.draw(st.sampled_from(self.agents))
        live = client_hash(agent.identity) in self.core.clients
        asked = self._ask(None, b"spy-peer", "hello", SPY_KEY, nick=nick, client=agent.identity)
        if live:
            asked.expect = ErrorCode.UNAUTHORIZED
        else:  # it would open a session of its own: end it in this very turn
            self._ask(None, b"spy-peer", "bye", SPY_KEY)

    @rule(data=st.data(), room=st.sampled_from(ROOMS), private=st.booleans())
    def join(self, data: st.DataObject, room: str, private: bool) -> None:
        agent = self._agent(data)
        self._from(agent, "join", room=room, private=private).room = room

    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        agent = self._agent(data)
        room = self._room(data, agent)
        self._from(agent, "leave", room=room).room = room

    @rule(data=st.data(), action=st.booleans(), with_cmid=st.booleans())
    def say(self, data: st.DataObject, action: bool, with_cmid: bool) -> None:
        agent = self._agent(data)
        cmid = f"c{next(self.serial)}" if with_cmid else None
        self.say_now(agent, self._room(data, agent), self._text(), action, cmid)

    def say_now(self, agent: Agent, room: str, text: str, action: bool = False, cmid: str | None = None) -> None:
        extra = {"cmid": cmid} if cmid else {}
        asked = self._from(agent, "say", room=room, text=text, action=action, **extra, **FORGED)
        asked.text, asked.room, asked.cmid = text, room, cmid
        if cmid:
            agent.cmids.append(("say", room, cmid))

    @rule(data=st.data(), with_cmid=st.booleans())
    def dm(self, data: st.DataObject, with_cmid: bool) -> None:
        agent, to = self._agent(data), self._nick(data)
        text, cmid = self._text(), f"c{next(self.serial)}" if with_cmid else None
        extra = {"cmid": cmid} if cmid else {}
        asked = self._from(agent, "dm", to=to, text=text, room="general", **extra, **FORGED)
        asked.text, asked.cmid = text, cmid
        if cmid:
            agent.cmids.append(("dm", to, cmid))

    @rule(data=st.data())
    def resend(self, data: st.DataObject) -> None:
        """A resend (retry) of an earlier say or dm with the same cmid, and a new text."""
        agent = self._agent(data)
        if not agent.cmids:
            return
        kind, target, cmid = data.draw(st.sampled_from(agent.cmids))
        where = {"room": target} if kind == "say" else {"to": target}
        text = self._text()
        asked = self._from(agent, kind, text=text, cmid=cmid, retry=True, **where)
        asked.text, asked.cmid, asked.room = text, cmid, target if kind == "say" else None

    @rule(data=st.data(), nick=st.sampled_from(NICKS))
    def nick(self, data: st.DataObject, nick: str) -> None:
        self._from(self._agent(data), "nick", nick=nick)

    @rule(data=st.data(), text=st.sampled_from(["", "lunch"]))
    def away(self, data: st.DataObject, text: str) -> None:
        self._from(self._agent(data), "away", text=text, **FORGED)

    @rule(data=st.data(), now=st.integers(0, 3))
    def bye(self, data: st.DataObject, now: int) -> None:
        if not now:  # one time in four: sessions that live long see more
            self._from(self._agent(data), "bye")

    @rule(data=st.data(), kind=st.sampled_from(["invite", "kick", "ban", "kick", "ban", "unban", "op", "deop"]))
    def moderate(self, data: st.DataObject, kind: str) -> None:
        private = [(a, room) for a in self.agents if a.peer for room, topic in a.rooms.items() if topic[:2] == b"q/"]
        often: bool = data.draw(st.integers(0, 3)) > 0
        if private and often:  # mostly a member of a private room, often its operator
            agent, room = data.draw(st.sampled_from(private))
        else:
            agent = self._agent(data)
            room = self._room(data, agent)
        self.moderate_now(agent, kind, room, self._nick(data))

    def moderate_now(self, agent: Agent, kind: str, room: str, nick: str) -> None:
        targets = self.core.nicks.get(nick_key(nick))
        owner = targets[0].principal if targets else self.store.nick_owner(nick_key(nick)) if self.secure else None
        asked = self._from(agent, kind, room=room, nick=nick, reason="because")
        asked.room, asked.about, asked.target = room, nick, owner

    # -- the loop -------------------------------------------------------------------------------

    @rule(
        fail=st.sampled_from([False, False, True]),
        seconds=st.sampled_from([0.0, 0.0, 1.0, 8.0, 16.0]),
        tick=st.booleans(),
        drained=st.booleans(),
    )
    def end_turn(self, fail: bool, seconds: float, tick: bool, drained: bool) -> None:
        """Commit (or have the store refuse), expire, tick, and deliver, as one loop turn."""
        self.store.fail_commits = fail
        committed = self.core.commit()
        self.store.fail_commits = False
        if seconds:
            self.now += seconds
            self.mono += seconds
            self.core.set_time(self.now, self.mono)
            self.core.expire_sessions()
        if tick:
            self.core.tick()
        frames, publications = self.core.take_output()
        assert [peer for peer, _ in frames] == [asked.peer for asked in self.turn], "one reply per request, in order"
        replies = [decode_reply(frame) for _, frame in frames]
        for asked, reply in zip(self.turn, replies, strict=True):
            assert reply.rid == asked.rid
            if asked.expect is not None:
                assert type(reply) is ErrorReply and reply.code is asked.expect, reply
        for asked, reply in zip(self.turn, replies, strict=True):  # topics of this turn's sessions
            if type(reply) is Welcome and asked.agent is not None:
                self.topic_owner[reply.topic.encode()] = asked.agent
                self.nicks_of.setdefault(asked.agent.principal, set()).add(reply.nick)
            if type(reply) is NickChanged and asked.principal is not None:
                self.nicks_of.setdefault(asked.principal, set()).add(reply.nick)
        events = [(topic, decode_event(frame)) for topic, frame in publications]
        self._check_stream(events, committed)
        self._check_acknowledgements(replies, events, committed)
        self._learn(replies)
        self._forget_ended()
        self.turn = []
        if drained:
            self.core.xpub_drained()
        self._place_subscriptions()

    def _check_stream(self, events: list[tuple[bytes, Event]], committed: bool) -> None:
        """Sequencing, stamping and topics of a turn's publications, in publication order."""
        said = {asked.text: asked for asked in self.turn if asked.text is not None}
        actors = {kind: {a.nick for a in self.turn if a.kind == kind} for kind in ("join", "nick", "away", *MODERATION)}
        rekeys: list[Event] = []
        for topic, event in events:
            if event.kind in STORED:
                assert committed, f"a refused turn published {event!r}"
                asked = said.get(event.text)
                assert asked is not None, f"{event!r} is no message of this turn (a resend republished?)"
                assert event.sender == asked.nick, "the sender is the session's nick, not what it claimed"
                self._sequence(self._channel(topic, event), event)
            elif event.kind is EventKind.JOIN:
                assert event.sender in actors["join"]
            elif event.kind is EventKind.NICK:
                assert event.sender in actors["nick"]
            elif event.kind is EventKind.AWAY:  # its own away, or the join of a session that is away
                assert event.sender in actors["away"] | actors["join"]
            elif event.kind.value in MODERATION:
                assert event.sender in actors[event.kind.value]
                if event.kind in (EventKind.KICK, EventKind.BAN):
                    self._expel(event)
            elif event.kind is EventKind.TICK:
                assert event.seq == self.last_seq.get(self._channel(topic, event), 0), "a tick of an unstored seq"
            elif event.kind is EventKind.REKEY:
                assert event.room is not None
                self.current_q[event.room] = event.text.encode()
                self.seen_topics.add(event.text.encode())
                rekeys.append(event)
            if topic.startswith(b"q/") and event.room is not None:
                if event.kind is EventKind.JOIN and self.current_q.get(event.room) != topic:
                    self.current_q[event.room] = topic  # (re)created: its first member joins
                assert self.current_q.get(event.room) == topic, f"{event!r} published on a rotated topic"
            self._deliver(topic, event)
        for event in rekeys:
            assert event.room is not None and event.seq is not None
            assert event.seq <= self.last_seq.get(("r", event.room), 0), f"{event!r} announces an unstored seq"

    def _channel(self, topic: bytes, event: Event) -> Channel:
        if event.room is not None:
            return ("r", event.room)
        return ("d", self.topic_owner[topic].principal)

    def _sequence(self, channel: Channel, event: Event) -> None:
        known = self.id_seq.get((channel, event.id))
        if known is not None:  # the same copy on another session's topic of one principal
            assert event.seq == known
            return
        last = self.last_seq.get(channel, 0)
        assert event.seq == last + 1, f"{channel}: seq {event.seq} after {last}"
        self.last_seq[channel] = event.seq
        self.id_seq[(channel, event.id)] = event.seq

    def _expel(self, event: Event) -> None:
        """From this kick or ban on, its target's pipes must get nothing more of the room."""
        assert event.room is not None and event.nick is not None
        key = nick_key(event.nick)
        for asked in self.turn:
            same = (asked.kind, asked.room, nick_key(asked.about or "")) == (event.kind.value, event.room, key)
            if same and asked.target is not None:
                self.expelled.add((event.room, asked.target))

    def _deliver(self, topic: bytes, event: Event) -> None:
        """What ZeroMQ does with one publication: a copy to each pipe holding a prefix of it."""
        for spy in self.spies:
            if spy.wants(topic):
                assert not topic.startswith(PRIVATE), f"{spy.name} received {event!r} on {topic!r}"
        for agent in self.agents:
            if not agent.pipe.wants(topic):
                continue
            if topic.startswith(b"p/"):
                owner = self.topic_owner[topic]  # its own, or (secure) a session of the same key's
                assert owner.principal == agent.principal, f"{agent.pipe.name} received {event!r} of {owner.pipe.name}"
                assert owner.topic == topic, f"{agent.pipe.name} received {event!r} on a dead session's topic"
                if event.kind is EventKind.DM:
                    mine = self.nicks_of.get(agent.principal, set())
                    assert event.sender in mine or event.to in mine, f"{agent.pipe.name} received {event!r}"
                self._obey(agent, event)
            elif topic.startswith(b"q/"):
                assert event.room is not None
                assert (event.room, agent.principal) not in self.expelled, f"removed {agent.pipe.name} got {event!r}"

    def _obey(self, agent: Agent, event: Event) -> None:
        """A conforming client's response to a rekey (a kick it ignores: worst case)."""
        if event.kind is EventKind.REKEY and event.room in agent.rooms:
            old = agent.rooms[event.room]
            agent.rooms[event.room] = event.text.encode()
            agent.pipe.pending[event.text.encode()] = True
            agent.pipe.pending[old] = False

    def _check_acknowledgements(self, replies: list[Reply], events: list[tuple[bytes, Event]], committed: bool) -> None:
        ids = {event.id: event for _, event in events if event.kind in STORED}
        fresh: list[tuple[Asked, Sent]] = []
        for asked, reply in zip(self.turn, replies, strict=True):
            if type(reply) is not Sent:
                continue
            if reply.dup:
                continue
            assert committed, "a refused turn acknowledged a new message"
            event = ids[reply.id]
            assert event.text == asked.text
            channel: Channel = ("r", asked.room or "") if asked.kind == "say" else ("d", asked.principal or "")
            assert reply.seq == self.id_seq[(channel, reply.id)]
            fresh.append((asked, reply))
        for asked, reply in fresh:
            if asked.cmid is not None and asked.agent is not None:
                self.acked[(asked.agent.identity, asked.cmid)] = (reply.id, reply.seq)
        for asked, reply in zip(self.turn, replies, strict=True):
            if type(reply) is Sent and reply.dup:
                assert asked.agent is not None and asked.cmid is not None
                assert self.acked.get((asked.agent.identity, asked.cmid)) == (reply.id, reply.seq), "a resend's answer"

    def _learn(self, replies: list[Reply]) -> None:
        """What each agent's client learns from its replies."""
        for asked, reply in zip(self.turn, replies, strict=True):
            agent = asked.agent
            if agent is None:
                continue
            if type(reply) is Welcome:
                agent.peer, agent.topic = asked.peer, reply.topic.encode()
                self.seen_topics.add(agent.topic)
                agent.pipe.pending[agent.topic] = True
            elif type(reply) is Goodbye and asked.peer == agent.peer:
                agent.peer, agent.topic = None, None
                agent.rooms.clear()
            elif type(reply) is Joined:
                topic = reply.topic.encode()
                agent.rooms[reply.room] = topic
                agent.pipe.pending[topic] = True
                self.seen_topics.add(topic)
                self.expelled.discard((reply.room, agent.principal))
                if reply.private:
                    self.acl.setdefault(reply.room, set()).add(agent.principal)
            elif type(reply) is Left:
                agent.pipe.pending[agent.rooms.pop(reply.room)] = False
            elif type(reply) is Moderated and asked.target is not None:
                if reply.action == "invite":
                    self.acl.setdefault(reply.room, set()).add(asked.target)
                elif reply.action in ("kick", "ban"):
                    self.acl.get(reply.room, set()).discard(asked.target)
                    for member in self.agents:
                        if member.principal == asked.target:
                            member.rooms.pop(reply.room, None)  # its subscription stays

    def _forget_ended(self) -> None:
        """Sessions that timed out (or moved to another peer): their pipes keep what they hold."""
        live = {client_hash(a.identity): a for a in self.agents if client_hash(a.identity) in self.core.clients}
        for agent in self.agents:
            if agent.peer is not None and client_hash(agent.identity) not in live:
                agent.peer, agent.topic = None, None
                agent.rooms.clear()
        for name in list(self.current_q):
            if name not in self.core.rooms:
                del self.current_q[name]

    # -- subscriptions --------------------------------------------------------------------------

    def _place_subscriptions(self) -> None:
        for agent in self.agents:
            pipe = agent.pipe
            for topic, subscribe in list(pipe.pending.items()):
                decision = self._subscribe(pipe, topic, subscribe)
                if decision is Subscription.IGNORE:
                    continue  # the XPUB is misaligned: sent again later
                del pipe.pending[topic]
                if subscribe and topic == agent.topic:
                    assert decision is Subscription.GRANT, f"{pipe.name} was refused its own live topic"
        assert self.core.take_output() == ([], [])

    def _subscribe(self, pipe: Pipe, topic: bytes, subscribe: bool = True) -> Subscription:
        decision = self.core.handle_subscription((b"\x01" if subscribe else b"\x00") + topic, pipe.key)
        if decision is Subscription.GRANT:
            self._check_grant(pipe, topic)
            pipe.granted.add(topic)
        elif decision is Subscription.UNSUBSCRIBE:
            pipe.granted.discard(topic)
        return decision

    def _check_grant(self, pipe: Pipe, topic: bytes) -> None:
        """Only a live room's or session's exact topic; in secure mode only to its key."""
        if topic.startswith(b"p/"):
            owner = self.topic_owner.get(topic)
            assert owner is not None and owner.topic == topic, f"{pipe.name} was granted a dead private topic"
            assert not self.secure or owner.key == pipe.key, f"{pipe.name} was granted another key's private topic"
        elif topic.startswith(b"q/"):
            rooms = [name for name, current in self.current_q.items() if current == topic]
            assert rooms, f"{pipe.name} was granted a private room's old topic"
            assert not self.secure or pipe.key in self.acl.get(rooms[0], set()), f"{pipe.name} is not a member"
        else:
            assert topic.startswith(b"r/") and topic.endswith(b"/"), f"{pipe.name} was granted {topic!r}"

    def _guesses(self) -> list[bytes]:
        guesses = [b"", b"p", b"q", b"r", b"d", b"p/", b"q/", b"r/", b"r/general/", b"p/" + b"0" * 32 + b"/"]
        for topic in sorted(self.seen_topics):
            guesses += [topic[:3], topic[:-1], topic[:-2] + b"x/"]
            if self.secure or not self._live(topic):  # secure: as if leaked; insecure: a dead one
                guesses += [topic, topic + b"sync/nonce1"]
        return guesses

    def _live(self, topic: bytes) -> bool:
        owner = self.topic_owner.get(topic)
        return (owner is not None and owner.topic == topic) or topic in self.current_q.values()

    @precondition(lambda self: not self.turn)  # between turns: its output is the only output
    @rule(data=st.data(), subscribe=st.booleans())
    def spy(self, data: st.DataObject, subscribe: bool) -> None:
        pipe = data.draw(st.sampled_from(self.spies))
        topic = data.draw(st.sampled_from(self._guesses()))
        decision = self._subscribe(pipe, topic, subscribe)
        if subscribe and topic.startswith(PRIVATE):
            assert decision is not Subscription.GRANT, f"{pipe.name} was granted {topic!r}"
        _, publications = self.core.take_output()
        assert publications == [], "a spy's subscription made the broker publish"

    @precondition(lambda self: self.secure and not self.turn)
    @rule(data=st.data())
    def leaked_topic(self, data: st.DataObject) -> None:
        """An agent subscribes to a topic it was not given (secure: whoever it was leaked to)."""
        if not self.seen_topics:
            return
        agent = data.draw(st.sampled_from(self.agents))
        topic = data.draw(st.sampled_from(sorted(self.seen_topics)))
        self._subscribe(agent.pipe, topic)  # _check_grant judges a grant
        assert self.core.take_output() == ([], [])

    @rule()
    def xpub_junk(self) -> None:
        """An XSUB's data message: until the XPUB is drained no subscription may be placed."""
        self.core.handle_xpub_junk()


class SecureCoreMachine(CoreMachine):
    secure = True


SETTINGS = machine_settings(150)


def test_random_traffic_keeps_senders_privacy_and_seqs() -> None:
    run_state_machine_as_test(CoreMachine, settings=SETTINGS)


def test_random_traffic_keeps_senders_privacy_and_seqs_in_secure_mode() -> None:
    run_state_machine_as_test(SecureCoreMachine, settings=SETTINGS)


def test_a_rekey_in_a_refused_turn_announces_no_unstored_seq() -> None:
    machine = CoreMachine()
    machine.start("private")  # ann (operator), bob and cy in the private room 'vault'
    ann = machine.agents[0]
    machine.say_now(ann, "vault", "stored")
    machine.end_turn(fail=False, seconds=0.0, tick=False, drained=True)
    machine.say_now(ann, "vault", "refused")
    machine.moderate_now(ann, "kick", "vault", "cy")
    machine.end_turn(fail=True, seconds=0.0, tick=False, drained=True)
