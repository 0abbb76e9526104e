"""The client's sans-I/O core: request ids, session state, and exactly-once delivery.

Front ends (:class:`~zchat.client.aio.AsyncClient`, :class:`~zchat.client.sync.Client`) ask
the core for request frames, send them, and hand back whatever their sockets receive; the
core decodes, keeps the session's state (nick, private topic, rooms and their topics) and
puts every sequenced event through a :class:`Feed`, which delivers each message exactly once
and in sequence order, holding early ones back and saying which ranges to fetch. It opens
no socket.

Private rooms move to a new topic whenever someone is removed from them (``rekey``):
:meth:`ClientCore.rekey` says which subscription to swap for which, the front end swaps
them, and :meth:`ClientCore.rekeyed` records the move; the room's feed then fills whatever
the swap missed from history. A ``kick`` or ``ban`` of this session drops the room.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from zchat.common.codec import decode_event, decode_reply, encode
from zchat.common.codes import ErrorCode, EventKind
from zchat.common.errors import ProtocolError, RequestError
from zchat.common.names import nick_key
from zchat.common.protocol import (
    STORED_KINDS,
    ErrorReply,
    Event,
    Goodbye,
    HistoryPage,
    Joined,
    Left,
    Moderate,
    NickChanged,
    Reply,
    Request,
    Welcome,
)
from zchat.common.topics import PRIVATE_ROOM_PREFIX, sync_subscription

#: The feed key of this client's DM inbox (rooms use their name).
DM = "@dm"

#: Events that remove their ``nick`` from the room: for this session, the room is gone.
REMOVALS = frozenset({EventKind.KICK, EventKind.BAN})

#: Events the broker may publish on two topics a session hears (a room's and its private
#: one): delivered once, by id.
_TWICE = frozenset({EventKind.INVITE, EventKind.KICK, EventKind.BAN})


class _Stamps:
    """Increasing microsecond stamps: the clock's, or one more than the last if the clock
    has not moved on (or stepped back). One for every client of the process: a blocking
    Client makes its cmids on its own thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def next(self) -> int:
        with self._lock:
            self._last = max(self._last + 1, time.time_ns() // 1000)
            return self._last


_CMID_STAMPS = _Stamps()


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A request ready to send: its id, its frame, and its kind for messages."""

    rid: int
    frame: bytes
    kind: str


@dataclass(frozen=True, slots=True)
class Rekey:
    """A private room's move to a new topic: subscribe to ``new``, then drop ``old``.

    ``seq`` is the room's last seq published on the old topic.
    """

    room: str
    old: bytes
    new: bytes
    seq: int


class Feed:
    """One channel's sequenced events, delivered exactly once and in order.

    ``last`` is the seq of the last event delivered; ``known`` the highest seq known to
    exist (from events, ticks and replies). While ``known > last`` something is missing and
    :meth:`gap` says where to fetch from.

    A feed made with ``last=None`` is not started: it holds every event it is offered until
    :meth:`start` says where delivery begins (a room's feed exists from its ``joined``
    reply, so live events that race the join's history are held, not delivered early).
    """

    def __init__(self, last: int | None = 0) -> None:
        self.started = last is not None
        self.last = last or 0
        self.known = self.last
        self._held: dict[int, Event] = {}

    def start(self, last: int) -> list[Event]:
        """Begin delivery after ``last`` (no-op if started); return what became deliverable."""
        if self.started:
            return []
        self.started = True
        return self.skip_to(last, deliver_held=False)

    def offer(self, event: Event) -> list[Event]:
        """Take ``event``; return the events now deliverable, in order (maybe none)."""
        seq = event.seq
        assert seq is not None
        self.known = max(self.known, seq)
        if (self.started and seq <= self.last) or seq in self._held:
            return []  # a duplicate: delivered already, or already waiting
        self._held[seq] = event
        return self._release()

    def note(self, seq: int) -> None:
        """Learn that ``seq`` exists (a tick, a join or history reply)."""
        self.known = max(self.known, seq)

    def skip_to(self, seq: int, *, deliver_held: bool = True) -> list[Event]:
        """Stop waiting for anything up to ``seq``: it is gone (pruned) or not wanted.

        Events already held at or below ``seq`` are delivered first, in order (they are real
        messages that arrived live), unless ``deliver_held`` is false (not wanted: before
        the history a join asked for).
        """
        out: list[Event] = []
        if seq > self.last:
            for old in sorted(s for s in self._held if s <= seq):
                event = self._held.pop(old)
                if deliver_held:
                    out.append(event)
            self.last = seq
        return out + self._release()

    def gap(self) -> int | None:
        """The seq to fetch after, if anything is missing; else None."""
        return self.last if self.started and self.known > self.last else None

    def _release(self) -> list[Event]:
        out: list[Event] = []
        if not self.started:
            return out
        while (event := self._held.pop(self.last + 1, None)) is not None:
            out.append(event)
            self.last += 1
        return out


class ClientCore:
    """State of one client session, independent of any socket.

    Attributes:
        client_id: this client's identity, a secret kept across reconnects (resends are
            recognised by it; a live session is resumed with it).
        nick: the session's nick once welcomed, else None.
        topic: the session's private topic once welcomed, else None.
        rooms: room name -> room topic, for every room joined.
        private: the rooms joined that are private (invite-only).
        keep_private: the rooms this client asked to be private (``join`` with ``private``):
            after a reconnect they are joined with ``private`` again, so a broker that lost
            them re-creates them private, never public.
        feeds: feed key (room name, or :data:`DM`) -> its :class:`Feed`.
        heartbeat, session_timeout, motd, max_page: from the welcome.
        inbox_history: DMs of the inbox, from before this client's first session, to deliver
            at that session's welcome (capped by ``max_page``); later welcomes carry on from
            the inbox's feed.
    """

    def __init__(self, client_id: str | None = None) -> None:
        self._rids = itertools.count(1)
        self.client_id = client_id or secrets.token_urlsafe(24)
        self.nick: str | None = None
        self.topic: bytes | None = None
        self.rooms: dict[str, bytes] = {}
        self.private: set[str] = set()
        self.keep_private: set[str] = set()
        self._recent: deque[int] = deque(maxlen=64)  # ids of _TWICE events delivered
        self.feeds: dict[str, Feed] = {}
        self.heartbeat = 5.0
        self.session_timeout = 15.0
        self.max_page = 200
        self.motd = ""
        self.sync_epoch: int | None = None
        self.epoch: int | None = None  # the broker's history epoch (Welcome.epoch)
        self.inbox_history = 0

    def request(self, cls: type[Request], *args: Any, **kwargs: Any) -> Outgoing:
        """Build and encode a request of type ``cls`` with a fresh request id.

        ``args`` are the fields after ``rid``; for :class:`Moderate`, whose kind varies, the
        first is its kind (``request(Moderate, RequestKind.KICK, room, nick)``).
        """
        rid = next(self._rids)
        if issubclass(cls, Moderate):
            kind, *rest = args
            msg: Request = cls(kind, rid, *rest, **kwargs)
        else:
            msg = cls(rid, *args, **kwargs)
        return Outgoing(rid, encode(msg), request_kind(msg))

    @staticmethod
    def new_cmid() -> str:
        """A fresh client message id: 14 hex digits of the microsecond clock, then 8 random
        characters (48 bits), 22 in all.

        Unique without coordination, and increasing (within the process, also if the clock
        steps back): the broker indexes the cmids it stores by client, and ids that follow
        one another land in the same place of that index instead of all over it (random ones
        made each stored message cost the broker's store up to twice as much: BENCHMARKS.md,
        "What limits zchat today").
        """
        return f"{_CMID_STAMPS.next():014x}{secrets.token_urlsafe(6)}"

    def receive_reply(self, frame: bytes) -> Reply:
        """Decode a reply frame and apply it to the session state.

        Raises:
            ProtocolError: the frame is not a valid reply.
        """
        reply = decode_reply(frame)
        if type(reply) is Welcome:
            self.nick, self.topic = reply.nick, reply.topic.encode()
            self.heartbeat, self.session_timeout, self.motd = reply.heartbeat, reply.timeout, reply.motd
            self.max_page = reply.max_page
            if self.epoch is not None and reply.epoch != self.epoch:
                # The broker's history started over: every seq we remember is void, and
                # everything in the new history is news to us.
                self.feeds = {key: Feed(0) for key in self.feeds}
            self.epoch = reply.epoch
            # The inbox outlives sessions (in secure mode it is the key's): a first session
            # starts its feed inbox_history back, and the gap is fetched like any other.
            back = min(self.inbox_history, self.max_page)
            self.feeds.setdefault(DM, Feed(max(0, reply.dm_seq - back))).note(reply.dm_seq)
        elif type(reply) is Joined:
            self.rooms[reply.room] = reply.topic.encode()
            if reply.private:
                self.private.add(reply.room)
            else:
                self.private.discard(reply.room)
            self.feeds.setdefault(reply.room, Feed(None)).note(reply.seq)
        elif type(reply) is Left:
            self.drop_room(reply.room)
        elif type(reply) is NickChanged:
            self.nick = reply.nick
        elif type(reply) is Goodbye:
            self.reset()
        return reply

    def open_feed(self, room: str, seq: int, history: int) -> list[Event]:
        """Start the feed of a room just joined, whose last seq is ``seq``.

        A new feed starts ``history`` messages back; a feed kept from before a reconnect
        carries on from where it was, so everything missed is fetched. Returns what became
        deliverable (live events held while the join was under way).
        """
        feed = self.feeds.setdefault(room, Feed(None))
        feed.note(seq)
        return feed.start(max(0, seq - history))

    def receive_event(self, frames: list[bytes]) -> Event:
        """Decode a publication (topic frame, envelope frame).

        Raises:
            ProtocolError: the publication is malformed.
        """
        if len(frames) != 2:
            raise ProtocolError(ErrorCode.BAD_FRAMES, f"a publication is 2 frames, not {len(frames)}")
        return decode_event(frames[1])

    def drop_room(self, room: str) -> None:
        """Forget ``room``: left, or removed from it."""
        self.rooms.pop(room, None)
        self.feeds.pop(room, None)
        self.private.discard(room)
        self.keep_private.discard(room)

    def is_me(self, nick: str | None) -> bool:
        """Whether ``nick`` is this session's nick (compared as the broker does)."""
        return nick is not None and self.nick is not None and nick_key(nick) == nick_key(self.nick)

    def accept(self, event: Event) -> list[Event]:
        """What the application should see of ``event``: it, nothing, or held-back events.

        A ``kick`` or ``ban`` of this session drops the room (the front end then unsubscribes
        its topic); an ``invite`` of this session is delivered though its room is not joined.
        ``rekey`` is not for the application: see :meth:`rekey`.
        """
        key = DM if event.room is None else event.room
        if event.kind is EventKind.REKEY:
            return []
        if event.kind in _TWICE:
            if event.id in self._recent:
                return []
            self._recent.append(event.id)
        if event.kind is EventKind.INVITE and event.room not in self.rooms and self.is_me(event.nick):
            return [event]
        if event.room is not None and event.room not in self.rooms:
            return []  # in flight when we left
        if event.kind in REMOVALS and event.room is not None and self.is_me(event.nick):
            self.drop_room(event.room)
            return [event]
        if event.kind is EventKind.TICK:
            feed = self.feeds.get(key)
            if feed is not None and event.seq is not None:
                feed.note(event.seq)
            return []
        if event.kind in STORED_KINDS and event.seq is not None:
            feed = self.feeds.get(key)
            return [event] if feed is None else feed.offer(event)
        return [event]

    def accept_history(self, key: str, after: int, page: HistoryPage) -> list[Event]:
        """Feed a page fetched with ``after``; return what became deliverable."""
        feed = self.feeds.get(key)
        if feed is None:
            return []
        feed.note(page.seq)
        out: list[Event] = []
        first = page.events[0].seq if page.events else None
        if first is not None and first > after + 1:
            out += feed.skip_to(first - 1)  # older messages were pruned
        elif first is None and page.seq > feed.last:
            out += feed.skip_to(page.seq)  # everything after `after` was pruned
        for event in page.events:
            out += feed.offer(event)
        return out

    def rekey(self, event: Event) -> Rekey | None:
        """The move a ``rekey`` event asks for, or None if there is nothing to do.

        Nothing to do: the room is not joined (left, or removed meanwhile), its topic is
        already the new one (a join or reconnect got it first), or the text is not a private
        room's topic. The room's feed learns the seq published on the old topic, so what
        was missed on it is fetched.
        """
        room = event.room
        old = self.rooms.get(room) if room is not None else None
        new = event.text.encode()
        if room is None or old is None or old == new or not new.startswith(PRIVATE_ROOM_PREFIX):
            return None
        feed = self.feeds.get(room)
        if feed is not None and event.seq is not None:
            feed.note(event.seq)
        return Rekey(room, old, new, event.seq or 0)

    def rekeyed(self, move: Rekey) -> bool:
        """Record that ``move`` is done (the new topic is in force); False if it no longer
        applies (the room was left, or a ``joined`` reply brought the new topic first), so
        this move's subscription to the new topic is not wanted.

        A ``joined`` reply that brought another topic meanwhile is older than the move: the
        broker answered the join before the move (a later move would carry a later rekey,
        which follows this one), so the move still applies.
        """
        current = self.rooms.get(move.room)
        if current is None or current == move.new:
            return False
        self.rooms[move.room] = move.new
        return True

    def new_sync(self) -> tuple[str, bytes]:
        """A fresh nonce and the subscription that asks the broker to echo it.

        Subscribe to the returned bytes after other subscriptions; when a ``sync`` event with
        this nonce arrives on the private topic, those subscriptions are in force (as long
        as the event's epoch, its ``seq``, is the one seen before them).
        """
        if self.topic is None:
            raise RuntimeError("sync needs a session: connect first")
        nonce = secrets.token_hex(8)
        return nonce, sync_subscription(self.topic, nonce)

    def reset(self) -> None:
        """Forget the session (after bye). Feeds are kept only across reconnects."""
        self.nick = None
        self.topic = None
        self.rooms.clear()
        self.feeds.clear()
        self.private.clear()
        self.keep_private.clear()


def request_kind(request: Request) -> str:
    """The wire kind of ``request`` (``Moderate`` carries its own)."""
    if isinstance(request, Moderate):
        return request.kind.value
    return request.KIND.value


def raise_for_error(reply: Reply) -> Reply:
    """Return ``reply``, or raise :class:`RequestError` if it is an error reply."""
    if type(reply) is ErrorReply:
        raise RequestError(reply.code, reply.reason, reply.retry_after)
    return reply
