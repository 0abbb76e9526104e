"""The broker's sans-I/O core: sessions, nicks, rooms and private topics.

The I/O layer (``server``) feeds it what arrives — request frames from the ROUTER with the
peer's routing id, subscription messages from the XPUB — and the passage of time; the core
answers by queueing frames, which the I/O layer takes with :meth:`BrokerCore.take_output`
and sends once per loop turn. The core never touches a socket, so every rule here is tested
in memory.

Rules it keeps:

* ``sender`` of everything published is the session's nick, never what the client claims
  (requests have no sender field at all; anything extra in a map is ignored).
* A subscription is granted only for the topic of a room that exists or the private topic
  of a live session; everything else (``b""``, prefixes, guesses, dead sessions) is denied.
* Nicks are unique among live sessions by :func:`~zchat.common.names.nick_key`.
* A session silent for ``session_timeout`` seconds is ended as if it had said ``bye``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from zchat.common.codec import decode_request, encode
from zchat.common.codes import ErrorCode, EventKind
from zchat.common.errors import ProtocolError
from zchat.common.limits import DEFAULT_LIMITS, Limits
from zchat.common.names import nick_key
from zchat.common.protocol import (
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
from zchat.common.topics import new_private_topic, room_topic, split_sync

log = logging.getLogger("zchat.broker")


class Subscription(Enum):
    """What the I/O layer must do with a message read from the XPUB socket."""

    GRANT = "grant"  # setsockopt(SUBSCRIBE, topic) for the pipe it came from
    DENY = "deny"  # nothing: the pipe never gets the topic
    UNSUBSCRIBE = "unsubscribe"  # setsockopt(UNSUBSCRIBE, topic)
    IGNORE = "ignore"  # not a subscription (or a sync request, already answered)


@dataclass(eq=False, slots=True)
class Session:
    """One client's session, keyed by its DEALER's routing id on the ROUTER."""

    peer: bytes
    nick: str
    key: str
    topic: bytes
    last_seen: float
    rooms: dict[str, Room] = field(default_factory=dict)


@dataclass(eq=False, slots=True)
class Room:
    """A public room; it exists while it has members."""

    name: str
    topic: bytes
    members: dict[bytes, Session] = field(default_factory=dict)


@dataclass(slots=True)
class Stats:
    """Counters the broker keeps as traffic flows (for logs, tests and metrics)."""

    requests: int = 0
    published: int = 0
    sessions_opened: int = 0
    sessions_expired: int = 0
    subscriptions_granted: int = 0
    subscriptions_denied: int = 0
    errors: Counter[str] = field(default_factory=Counter)


class BrokerCore:
    """All broker state and rules; see the module docstring.

    Args:
        limits: size and count bounds.
        motd: message of the day, sent in every welcome.
        session_timeout: seconds of silence after which a session ends.
    """

    def __init__(
        self,
        *,
        limits: Limits = DEFAULT_LIMITS,
        motd: str = "",
        session_timeout: float = 15.0,
    ) -> None:
        self.limits = limits
        self.motd = motd
        self.session_timeout = session_timeout
        self.heartbeat = session_timeout / 3
        self.sessions: dict[bytes, Session] = {}
        self.nicks: dict[str, Session] = {}
        self.private_topics: dict[bytes, Session] = {}
        self.rooms: dict[str, Room] = {}
        self.room_topics: dict[bytes, Room] = {}
        self.stats = Stats()
        self.now = 0.0  # wall clock, for timestamps
        self.mono = 0.0  # monotonic clock, for timeouts
        self._last_id = 0
        self._replies: list[tuple[bytes, bytes]] = []
        self._publishes: list[tuple[bytes, bytes]] = []
        self._handlers: dict[type[Any], Callable[[Session, Any], Reply]] = {
            Join: self._join,
            Leave: self._leave,
            Say: self._say,
            Dm: self._dm,
            Who: self._who,
            Rooms: self._rooms,
            Nick: self._nick,
            Ping: self._ping,
            Bye: self._bye,
            Hello: self._hello_again,
        }

    # -- inputs ----------------------------------------------------------------------------

    def set_time(self, now: float, mono: float) -> None:
        """Tell the core the time; called once per loop turn, before the turn's inputs."""
        self.now = now
        self.mono = mono

    def handle_request(self, peer: bytes, frame: bytes) -> None:
        """Handle one request frame from the DEALER whose routing id is ``peer``."""
        self.stats.requests += 1
        if not frame:
            self._queue_reply(peer, ErrorReply(None, ErrorCode.BAD_FRAMES, "empty frame"))
            return
        try:
            request = decode_request(frame, self.limits)
        except ProtocolError as exc:
            self._queue_reply(peer, ErrorReply.from_exception(exc))
            return
        session = self.sessions.get(peer)
        if session is None:
            reply = self._without_session(peer, request)
        else:
            session.last_seen = self.mono
            reply = self._handlers[type(request)](session, request)
        self._queue_reply(peer, reply)

    def handle_bad_frames(self, peer: bytes, count: int) -> None:
        """A request arrived as ``count`` frames instead of one."""
        self.stats.requests += 1
        reason = f"a request is exactly one frame, not {count}"
        self._queue_reply(peer, ErrorReply(None, ErrorCode.BAD_FRAMES, reason))

    def handle_subscription(self, message: bytes) -> Subscription:
        """Decide on one message read from the XPUB socket (``\\x01topic`` or ``\\x00topic``)."""
        if not message or message[0] > 1:
            return Subscription.IGNORE
        topic = message[1:]
        if message[0] == 0:
            return Subscription.UNSUBSCRIBE
        if topic in self.room_topics or topic in self.private_topics:
            self.stats.subscriptions_granted += 1
            return Subscription.GRANT
        sync = split_sync(topic)
        if sync is not None:
            session = self.private_topics.get(sync[0])
            if session is not None:
                self._publish(session.topic, Event(EventKind.SYNC, None, "", sync[1], self.now, self._next_id()))
                return Subscription.IGNORE
        self.stats.subscriptions_denied += 1
        return Subscription.DENY

    def expire_sessions(self) -> int:
        """End every session silent for longer than the timeout; return how many."""
        deadline = self.mono - self.session_timeout
        expired = [s for s in self.sessions.values() if s.last_seen < deadline]
        for session in expired:
            log.info("session %s (%s) timed out", session.nick, session.peer.hex())
            self._end_session(session, "timed out")
        self.stats.sessions_expired += len(expired)
        return len(expired)

    # -- outputs ---------------------------------------------------------------------------

    def take_output(self) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
        """``(replies, publications)`` queued since the last call, in order.

        Replies are ``(routing id, frame)``; publications are ``(topic, frame)``.
        """
        replies, publishes = self._replies, self._publishes
        self._replies, self._publishes = [], []
        return replies, publishes

    # -- helpers ---------------------------------------------------------------------------

    def _next_id(self) -> int:
        # Microseconds since the epoch, bumped to stay strictly increasing: unique across
        # restarts as long as the clock does not run backwards.
        self._last_id = max(self._last_id + 1, int(self.now * 1_000_000))
        return self._last_id

    def _queue_reply(self, peer: bytes, reply: Reply) -> None:
        if type(reply) is ErrorReply:
            self.stats.errors[reply.code.value] += 1
        self._replies.append((peer, encode(reply)))

    def _publish(self, topic: bytes, event: Event) -> None:
        self.stats.published += 1
        self._publishes.append((topic, encode(event)))

    def _event(self, kind: EventKind, room: str | None, sender: str, text: str = "", **extra: Any) -> Event:
        return Event(kind, room, sender, text, self.now, self._next_id(), **extra)

    @staticmethod
    def _error(rid: int, code: ErrorCode, reason: str) -> ErrorReply:
        return ErrorReply(rid, code, reason)

    def _without_session(self, peer: bytes, request: Request) -> Reply:
        if type(request) is Hello:
            return self._hello(peer, request)
        if type(request) is Bye:
            return Goodbye(request.rid)  # already gone: bye is idempotent
        return self._error(request.rid, ErrorCode.NO_SESSION, "no session: say hello first (or it expired)")

    def _end_session(self, session: Session, reason: str) -> None:
        for room in list(session.rooms.values()):
            self._remove_member(room, session, reason)
        del self.sessions[session.peer]
        del self.nicks[session.key]
        del self.private_topics[session.topic]

    def _remove_member(self, room: Room, session: Session, reason: str) -> None:
        del room.members[session.peer]
        del session.rooms[room.name]
        if room.members:
            self._publish(room.topic, self._event(EventKind.LEAVE, room.name, session.nick, reason))
        else:
            del self.rooms[room.name]
            del self.room_topics[room.topic]

    # -- request handlers ------------------------------------------------------------------

    def _hello(self, peer: bytes, req: Hello) -> Reply:
        if len(self.sessions) >= self.limits.max_sessions:
            return self._error(req.rid, ErrorCode.SERVER_FULL, "the broker holds all the sessions it may")
        key = nick_key(req.nick)
        if key in self.nicks:
            return self._error(req.rid, ErrorCode.NICK_TAKEN, f"nick {req.nick!r} is taken")
        topic = new_private_topic()
        session = Session(peer, req.nick, key, topic, self.mono)
        self.sessions[peer] = session
        self.nicks[key] = session
        self.private_topics[topic] = session
        self.stats.sessions_opened += 1
        log.info("session %s (%s) opened", req.nick, peer.hex())
        return Welcome(req.rid, req.nick, topic.decode(), self.motd, self.heartbeat, self.session_timeout)

    def _hello_again(self, session: Session, req: Hello) -> Reply:
        return self._error(req.rid, ErrorCode.ALREADY_HELLO, f"this connection is already {session.nick!r}")

    def _join(self, session: Session, req: Join) -> Reply:
        room = self.rooms.get(req.room)
        if room is not None and session.peer in room.members:
            return Joined(req.rid, room.name, room.topic.decode(), self._member_nicks(room))
        if len(session.rooms) >= self.limits.max_rooms_per_session:
            limit = self.limits.max_rooms_per_session
            return self._error(req.rid, ErrorCode.TOO_MANY_ROOMS, f"a session may be in at most {limit} rooms")
        if room is None:
            room = Room(req.room, room_topic(req.room))
            self.rooms[room.name] = room
            self.room_topics[room.topic] = room
        room.members[session.peer] = session
        session.rooms[room.name] = room
        self._publish(room.topic, self._event(EventKind.JOIN, room.name, session.nick))
        return Joined(req.rid, room.name, room.topic.decode(), self._member_nicks(room))

    def _leave(self, session: Session, req: Leave) -> Reply:
        room = session.rooms.get(req.room)
        if room is None:
            return self._error(req.rid, ErrorCode.NOT_MEMBER, f"you are not in room {req.room!r}")
        self._remove_member(room, session, "left")
        return Left(req.rid, req.room)

    def _say(self, session: Session, req: Say) -> Reply:
        room = session.rooms.get(req.room)
        if room is None:
            return self._error(req.rid, ErrorCode.NOT_MEMBER, f"join {req.room!r} before you speak in it")
        kind = EventKind.ACTION if req.action else EventKind.MESSAGE
        event = Event(kind, room.name, session.nick, req.text, self.now, self._next_id())
        self._publish(room.topic, event)
        return Sent(req.rid, event.id, event.ts)

    def _dm(self, session: Session, req: Dm) -> Reply:
        target = self.nicks.get(nick_key(req.to))
        if target is None:
            return self._error(req.rid, ErrorCode.NO_SUCH_NICK, f"nobody is called {req.to!r}")
        event = self._event(EventKind.DM, None, session.nick, req.text, to=target.nick)
        self._publish(target.topic, event)
        if target is not session:
            self._publish(session.topic, event)  # the sender's other views see it too
        return Sent(req.rid, event.id, event.ts)

    def _who(self, session: Session, req: Who) -> Reply:
        room = self.rooms.get(req.room)
        if room is None:
            return self._error(req.rid, ErrorCode.NO_SUCH_ROOM, f"there is no room {req.room!r}")
        return Members(req.rid, room.name, self._member_nicks(room))

    def _rooms(self, session: Session, req: Rooms) -> Reply:
        infos = tuple(RoomInfo(name, len(self.rooms[name].members)) for name in sorted(self.rooms))
        return RoomList(req.rid, infos)

    def _nick(self, session: Session, req: Nick) -> Reply:
        key = nick_key(req.nick)
        owner = self.nicks.get(key)
        if owner is not None and owner is not session:
            return self._error(req.rid, ErrorCode.NICK_TAKEN, f"nick {req.nick!r} is taken")
        old = session.nick
        if old == req.nick:
            return NickChanged(req.rid, old)
        del self.nicks[session.key]
        session.nick, session.key = req.nick, key
        self.nicks[key] = session
        for room in session.rooms.values():
            self._publish(room.topic, self._event(EventKind.NICK, room.name, old, nick=req.nick))
        log.info("session %s (%s) is now %s", old, session.peer.hex(), req.nick)
        return NickChanged(req.rid, req.nick)

    def _ping(self, session: Session, req: Ping) -> Reply:
        return Pong(req.rid, self.now)

    def _bye(self, session: Session, req: Bye) -> Reply:
        log.info("session %s (%s) said bye", session.nick, session.peer.hex())
        self._end_session(session, "quit")
        return Goodbye(req.rid)

    @staticmethod
    def _member_nicks(room: Room) -> tuple[str, ...]:
        return tuple(sorted((s.nick for s in room.members.values()), key=nick_key))
