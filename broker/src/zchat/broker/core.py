"""The broker's sans-I/O core: sessions, nicks, rooms, private topics and sequencing.

The I/O layer (``server``) feeds it what arrives — request frames from the ROUTER with the
peer's routing id, subscription messages from the XPUB — and the passage of time. The core
answers by queueing frames. Once per loop turn the I/O layer calls :meth:`BrokerCore.commit`
(one store transaction for every message of the turn: group commit) and then sends what
:meth:`BrokerCore.take_output` returns. The core never touches a socket; it reaches the
message store only through the :class:`~zchat.broker.store.Store` interface.

Rules it keeps:

* ``sender`` of everything published is the session's nick, never what the client claims.
* A subscription is granted only for the topic of a room that has members or the private
  topic of a live session; everything else (``b""``, prefixes, guesses, dead sessions) is not.
* Nicks are unique among live sessions by :func:`~zchat.common.names.nick_key`.
* Every room message, action and DM gets the next sequence number of its channel (a room, or
  one client's DM inbox); its ``sent`` reply and its publication leave only after the store
  committed it. If the commit fails, both are replaced by an ``unavailable`` error and the
  sequence numbers are given back, so no number is ever published twice or skipped.
* A resend carrying the ``cmid`` of a stored message is answered with the original.
* A session silent for ``session_timeout`` seconds is ended as if it had said ``bye``.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import secrets
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from zchat.common.codec import decode_request, encode, encode_sent, encode_stored_event
from zchat.common.codes import ErrorCode, EventKind, RequestKind
from zchat.common.errors import ProtocolError
from zchat.common.limits import DEFAULT_LIMITS, Limits
from zchat.common.names import nick_key
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
    Ping,
    Pong,
    Reply,
    Request,
    RoomInfo,
    RoomList,
    Rooms,
    Say,
    Sent,
    SetTopic,
    StatsReply,
    StatsRequest,
    Welcome,
    Who,
)
from zchat.common.topics import new_private_room_topic, new_private_topic, room_topic, split_sync

from .ratelimit import FloodControl, Kind, RateLimits, Verdict
from .store import MemoryStore, RoomAcl, Store, StoredMessage, StoreError

log = logging.getLogger("zchat.broker")

#: How many (client, cmid) pairs are remembered in memory for idempotent retry; older ones
#: are looked up in the store when the resend is flagged ``retry``.
CMID_CACHE_SIZE = 100_000
#: Seconds a client waits before retrying after an ``unavailable`` error.
RETRY_AFTER = 1.0
#: Most text bytes one history page carries (a page of 200 long messages could be 3 MB; a
#: client asking for many and never reading would make the broker hold them all).
MAX_PAGE_BYTES = 256 * 1024


def _cap_bytes(page: list[StoredMessage], budget: int, *, newest_first: bool) -> list[StoredMessage]:
    """The part of ``page`` whose texts fit in ``budget`` bytes, keeping the end read first
    (the newest messages when paging backwards, the oldest when paging forwards)."""
    total = 0
    order = reversed(range(len(page))) if newest_first else range(len(page))
    keep = 0
    for index in order:
        total += len(page[index].text) * 4  # an upper bound of its UTF-8 size, without encoding
        if total > budget and keep:
            break
        keep += 1
    return page[len(page) - keep :] if newest_first else page[:keep]


class Subscription(Enum):
    """What the I/O layer must do with a message read from the XPUB socket."""

    GRANT = "grant"  # setsockopt(SUBSCRIBE, topic) for the pipe it came from
    DENY = "deny"  # nothing: the pipe never gets the topic
    UNSUBSCRIBE = "unsubscribe"  # setsockopt(UNSUBSCRIBE, topic)
    IGNORE = "ignore"  # nothing (junk, an answered sync, or a subscription we cannot place)


@dataclass(eq=False, slots=True)
class Session:
    """One client's session, bound to its DEALER's routing id on the ROUTER.

    ``principal`` is who the session acts for: its CURVE public key (``pubkey``) in secure
    mode, its client-identity hash otherwise. Flood control, private-room membership and
    the DM inbox belong to the principal, so every session of one key shares them.
    """

    peer: bytes
    nick: str
    nkey: str  # nick_key(nick)
    topic: bytes
    client: str  # hash of the client identity
    inbox: str  # the principal's DM channel, "d:<hash>"
    last_seen: float
    principal: str
    pubkey: str | None = None
    rooms: dict[str, Room] = field(default_factory=dict)
    away: str = ""  # why the session is away ("": it is not)


@dataclass(eq=False, slots=True)
class Room:
    """A room in use; it exists while it has members (its history outlives it).

    A private room also has an ``acl`` (persisted, outliving the Room) and a random topic
    that is replaced whenever someone is removed from it.
    """

    name: str
    topic: bytes
    channel: str
    members: set[Session] = field(default_factory=set)
    acl: RoomAcl | None = None
    subject: str = ""  # a public room's topic line (a private room keeps it in its acl)


@dataclass(slots=True)
class Stats:
    """Counters the broker keeps as traffic flows (for logs, tests and metrics)."""

    requests: int = 0
    published: int = 0
    stored: int = 0
    duplicates: int = 0
    history_requests: int = 0
    gap_fetches: int = 0  # history requests with 'after': clients repairing gaps
    commits: int = 0
    commit_failures: int = 0
    pruned: int = 0
    sessions_opened: int = 0
    sessions_resumed: int = 0
    sessions_expired: int = 0
    subscriptions_granted: int = 0
    subscriptions_denied: int = 0
    subscriptions_deferred: int = 0
    errors: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class _Pending:
    """Output that stands or falls with the turn's commit."""

    peer: bytes
    rid: int
    reply_index: int
    publish_indices: list[int]
    cache_key: tuple[str, str] | None


def _fields(event: str, session: Session) -> dict[str, str]:
    """Structured fields of a session log line (JSON logs show them as keys)."""
    return {"event": f"session_{event}", "nick": session.nick, "peer": session.peer.hex()}


def _retry_after(seconds: float) -> float:
    """``seconds`` rounded up to the millisecond: never 0, never early."""
    return math.ceil(seconds * 1000) / 1000


def _unlist(index: dict[str, list[Session]], key: str, session: Session) -> None:
    """Take ``session`` out of ``index[key]``, dropping the entry when it empties."""
    sessions = index[key]
    sessions.remove(session)
    if not sessions:
        del index[key]


def _nick_order(nick: str) -> tuple[str, str]:
    return nick_key(nick), nick


def client_hash(identity: str) -> str:
    """The stored form of a client identity (the identity itself is a secret)."""
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


class BrokerCore:
    """All broker state and rules; see the module docstring.

    Args:
        store: where messages are kept (default: in memory).
        limits: size and count bounds.
        motd: message of the day, sent in every welcome.
        session_timeout: seconds of silence after which a session ends.
        max_page: most events one ``history`` reply holds.
        tick_interval: seconds after a channel's last message that its first ``tick``
            announces its last seq (so a lost final message is noticed); later ticks follow
            at 2, 4, 8, … times that while the channel stays quiet.
        tick_horizon: seconds after a channel's last message after which it is not ticked.
        secure: CURVE is on: every request and subscription comes with the peer's public
            key, nicks belong to keys, and grants of private topics check the key.
        rate_limits: flood-control limits per principal (default: none).
    """

    def __init__(
        self,
        *,
        store: Store | None = None,
        limits: Limits = DEFAULT_LIMITS,
        motd: str = "",
        session_timeout: float = 15.0,
        max_page: int = 200,
        tick_interval: float = 1.0,
        tick_horizon: float = 60.0,
        version: str = "",
        secure: bool = False,
        rate_limits: RateLimits | None = None,
    ) -> None:
        self.store: Store = store if store is not None else MemoryStore()
        self.limits = limits
        self.motd = motd
        self.session_timeout = session_timeout
        self.heartbeat = session_timeout / 3
        self.max_page = max_page
        self.tick_interval = tick_interval
        self.tick_horizon = tick_horizon
        self.secure = secure
        #: Whether a key is authorized now (secure mode; the I/O layer sets it to the ZAP
        #: handler's check). A revoked key keeps its registered nicks, but no DM waits for it.
        self.key_allowed: Callable[[str], bool] = lambda key: True
        self.flood = FloodControl(rate_limits) if rate_limits is not None else None
        self.sessions: dict[bytes, Session] = {}
        # nick key -> the live sessions using that nick (several only for one key's sessions)
        self.nicks: dict[str, list[Session]] = {}
        # DM inbox channel -> the live sessions of its principal
        self.inboxes: dict[str, list[Session]] = {}
        self.clients: dict[str, Session] = {}
        self.acls: dict[str, RoomAcl] = self.store.private_rooms()
        self._created = Counter(acl.creator for acl in self.acls.values())  # private rooms by creator
        self.private_topics: dict[bytes, Session] = {}
        self.rooms: dict[str, Room] = {}
        self.room_topics: dict[bytes, Room] = {}
        self.stats = Stats()
        self.version = version
        #: Figures only the I/O layer can measure (commit and loop turn times), for ``stats``.
        self.io_figures: dict[str, float] = {}
        self.now = 0.0  # wall clock, for timestamps
        self.mono = 0.0  # monotonic clock, for timeouts
        self._started: float | None = None
        self._last_id = self.store.last_id()
        self._seqs: dict[str, int] = {}  # channel -> last seq handed out (committed or staged)
        self._batch_seqs: dict[str, int] = {}  # channel -> its last seq before this turn
        self._pending: list[_Pending] = []
        self._cmids: OrderedDict[tuple[str, str], tuple[int, float, int]] = OrderedDict()
        self._staged_cmids: set[tuple[str, str]] = set()
        # channel -> [when it last got a message, when its next tick is due] (mono), and the
        # due times in a heap (entries whose time is no longer the channel's are stale)
        self._active: dict[str, list[float]] = {}
        self._tick_heap: list[tuple[float, str]] = []
        self._stored_at_last_prune = 0
        self._xpub_misaligned = False
        self._junk_epoch = 0
        self._dirty = False  # room or nick records staged in the store
        self._replies: list[tuple[bytes, bytes]] = []
        self._publishes: list[tuple[bytes, bytes] | None] = []
        self._handlers: dict[type[Any], Callable[[Session, Any], Reply | bytes]] = {
            Join: self._join,
            Leave: self._leave,
            Say: self._say,
            Dm: self._dm,
            Who: self._who,
            Rooms: self._rooms,
            Nick: self._nick,
            Ping: self._ping,
            Bye: self._bye,
            History: self._history,
            StatsRequest: self._stats,
            Hello: self._hello_again,
            Moderate: self._moderate,
            SetTopic: self._set_topic,
            Away: self._away,
        }

    # -- inputs ----------------------------------------------------------------------------

    def set_time(self, now: float, mono: float) -> None:
        """Tell the core the time; called once per loop turn, before the turn's inputs."""
        self.now = now
        self.mono = mono
        if self._started is None:
            self._started = mono

    def handle_request(self, peer: bytes, frame: bytes, key: str | None = None) -> None:
        """Handle one request frame from the DEALER whose routing id is ``peer``.

        ``key`` is the connection's CURVE public key (secure mode), as ZAP authenticated it.
        """
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
        reply: Reply | bytes
        if session is None:
            reply = self._without_session(peer, request, key)
        else:
            session.last_seen = self.mono
            limited = self._charge(session, request, len(frame)) if self.flood is not None else None
            reply = limited or self._handlers[type(request)](session, request)
        self._queue_reply(peer, reply)

    def handle_bad_frames(self, peer: bytes, count: int) -> None:
        """A request arrived as ``count`` frames instead of one."""
        self.stats.requests += 1
        reason = f"a request is exactly one frame, not {count}"
        self._queue_reply(peer, ErrorReply(None, ErrorCode.BAD_FRAMES, reason))

    def handle_subscription(self, message: bytes, key: str | None = None) -> Subscription:
        """Decide on one single-frame message read from the XPUB socket.

        ``\\x01topic`` asks to subscribe, ``\\x00topic`` to unsubscribe; anything else is junk
        an XSUB sent, and :meth:`handle_xpub_junk` must be called for it instead. ``key`` is
        the subscriber's CURVE public key in secure mode: a private topic is then granted
        only to its owner's key, a private room's only to a member's.
        """
        if not message or message[0] > 1:
            self.handle_xpub_junk()
            return Subscription.IGNORE
        if self._xpub_misaligned:
            # libzmq cannot tell us which pipe this came from (see handle_xpub_junk): neither
            # grant nor revoke. A sync is left unanswered too, so its client tries again.
            self.stats.subscriptions_deferred += 1
            return Subscription.IGNORE
        topic = message[1:]
        if message[0] == 0:
            return Subscription.UNSUBSCRIBE
        if key is not None and self.flood is not None and self._subscription_limited(key):
            self.stats.subscriptions_denied += 1
            return Subscription.DENY
        if self._may_read(topic, key):
            self.stats.subscriptions_granted += 1
            return Subscription.GRANT
        sync = split_sync(topic)
        if sync is not None:
            session = self.private_topics.get(sync[0])
            if session is not None and (not self.secure or session.pubkey == key):
                # seq carries the junk epoch: a client that sees it change between two syncs
                # cannot be sure a subscription it sent in between was placed, and resends it.
                epoch = self._junk_epoch
                sync_event = Event(EventKind.SYNC, None, "", sync[1], self.now, self._next_id(), seq=epoch)
                self._publish(session.topic, sync_event)
                return Subscription.IGNORE
        self.stats.subscriptions_denied += 1
        log.debug("subscription to %r denied: not a live room or private topic", topic[:80])
        return Subscription.DENY

    def _may_read(self, topic: bytes, key: str | None) -> bool:
        """Whether a subscriber (with CURVE ``key`` in secure mode) may be granted ``topic``."""
        room = self.room_topics.get(topic)
        if room is not None:
            # Insecure mode: a private room's topic is a secret only members were told.
            return room.acl is None or not self.secure or key in room.acl.members
        session = self.private_topics.get(topic)
        return session is not None and (not self.secure or session.pubkey == key)

    def _subscription_limited(self, key: str) -> bool:
        assert self.flood is not None
        # No strike for a denied subscription: the SUB side never sees a retry_after to
        # pace itself by; a client whose sync goes unanswered just asks again later.
        verdict, _ = self.flood.charge(key, Kind.SUBSCRIPTIONS, self.mono, strike=False)
        return verdict is not Verdict.OK

    def _fan_out(self, session: Session) -> float:
        """Messages an away or nick costs (it is published to each of the session's rooms):
        one a room, at least one, up to the bucket's burst (so that it can pass)."""
        assert self.flood is not None
        rooms, rate = max(1, len(session.rooms)), self.flood.limits.messages
        return float(min(rooms, rate.burst) if rate is not None else rooms)

    def _charge(self, session: Session, request: Request, size: int) -> Reply | None:
        """An error reply if ``request`` is over its principal's flood limits, else None."""
        assert self.flood is not None
        kind = type(request)
        if kind is Say or kind is Dm or kind is Away or kind is Nick:
            cost = 1.0 if kind is Say or kind is Dm else self._fan_out(session)  # say: the hot path
            verdict, wait = self.flood.charge(session.principal, Kind.MESSAGES, self.mono, cost)
            if verdict is Verdict.OK:
                verdict, wait = self.flood.charge(session.principal, Kind.BYTES, self.mono, size)
        elif kind is Join:
            verdict, wait = self.flood.charge(session.principal, Kind.SUBSCRIPTIONS, self.mono)
        elif kind is History:
            verdict, wait = self.flood.charge(session.principal, Kind.HISTORY, self.mono)
        else:
            return None
        if verdict is Verdict.OK:
            return None
        if verdict is Verdict.PENALISED:
            self._penalise(session.principal)
            reason = f"flooding: disconnected for {wait:.0f} s"
        else:
            reason = f"too fast: wait {wait:.2f} s"
        return ErrorReply(request.rid, ErrorCode.RATE_LIMITED, reason, _retry_after(wait))

    def _penalise(self, principal: str) -> None:
        """End every session of a principal that kept flooding (its hellos are refused meanwhile)."""
        for session in [s for s in self.sessions.values() if s.principal == principal]:
            log.warning("session %s (%s) disconnected for flooding", session.nick, session.peer.hex(),
                        extra=_fields("flooding", session))
            self._publish(session.topic, self._event(EventKind.GOAWAY, None, "", "disconnected for flooding"))
            self._end_session(session, "flooding")

    def set_rate_limits(self, limits: RateLimits | None) -> None:
        """Change flood control while running (a reload); None turns it off."""
        if limits is None:
            self.flood = None
        elif self.flood is None:
            self.flood = FloodControl(limits)
        else:
            self.flood.limits = limits

    def handle_xpub_junk(self) -> None:
        """A non-subscription message (from an XSUB) was read from the XPUB socket.

        In manual mode libzmq 4.3 queues the sending pipe of each subscription message but
        not of other messages, while every read takes one pipe off that queue; after such a
        message, SUBSCRIBE/UNSUBSCRIBE would apply to the wrong pipe (granting one peer's
        private topic to another) until the queue is empty again: :meth:`xpub_drained`.
        Until then no subscription is granted or revoked and no sync answered; the epoch
        that sync events carry moves on, so clients resend what they sent meanwhile.
        """
        self._xpub_misaligned = True
        self._junk_epoch += 1

    def xpub_drained(self) -> None:
        """A non-blocking read of the XPUB found nothing: libzmq's queues are aligned again."""
        self._xpub_misaligned = False

    def expire_sessions(self) -> int:
        """End every session silent for longer than the timeout; return how many."""
        deadline = self.mono - self.session_timeout
        expired = [s for s in self.sessions.values() if s.last_seen < deadline]
        for session in expired:
            log.info("session %s (%s) timed out", session.nick, session.peer.hex(), extra=_fields("timeout", session))
            self._end_session(session, "timed out")
        self.stats.sessions_expired += len(expired)
        if self.flood is not None:
            self.flood.sweep(self.mono)
        return len(expired)

    @property
    def staged(self) -> int:
        """How many replies (or room and nick records) wait for the next :meth:`commit`."""
        return len(self._pending) + self._dirty

    def commit(self) -> bool:
        """Commit the turn's messages in one store transaction; False if the store refused.

        On failure every reply that would have acknowledged one of them becomes an
        ``unavailable`` error, their publications are dropped and their sequence numbers
        are handed out again.
        """
        if not self._pending and not self._dirty:
            return True
        try:
            self.stats.stored += self.store.commit()
        except StoreError as exc:
            self.stats.commit_failures += 1
            log.warning("store commit of %d messages failed: %s", len(self._pending), exc)
            self._fail_batch()
            return False
        finally:
            self._batch_seqs.clear()
            self._staged_cmids.clear()
        self.stats.commits += 1
        self._pending.clear()
        self._dirty = False
        return True

    def tick(self) -> None:
        """Publish the ticks that are due: a channel's last seq on its topic.

        A subscriber whose last seq is lower has lost a message and fetches it. While
        messages flow, each reveals a loss before it, so a channel is ticked only once it
        has been quiet for ``tick_interval``, then at 2, 4, 8, … times that up to the
        horizon: a handful of ticks per burst of traffic, spread over time, instead of
        every active channel every second at once (thousands of channels ticking in the
        same turn stalled every peer's traffic behind the burst).
        """
        heap, now, interval = self._tick_heap, self.mono, self.tick_interval
        while heap and heap[0][0] <= now:
            due, channel = heapq.heappop(heap)
            times = self._active.get(channel)
            if times is None or times[1] != due:
                continue  # stale: re-planned since
            last = times[0]
            quiet = due - last
            if quiet < interval:  # a message came after this tick was planned
                times[1] = last + interval
                heapq.heappush(heap, (times[1], channel))
                continue
            topics, room = self._channel_topics(channel)
            if topics and quiet <= self.tick_horizon:
                event = Event(EventKind.TICK, room, "", "", self.now, self._next_id(), seq=self._seqs[channel])
                for topic in topics:
                    self._publish(topic, event)
            if 2 * quiet > self.tick_horizon:
                del self._active[channel]
                # After the commit _seqs equals the store's value: forget it, so a stream of
                # short-lived channels does not grow memory. The store answers next time.
                self._seqs.pop(channel, None)
            else:
                times[1] = last + 2 * quiet
                heapq.heappush(heap, (times[1], channel))

    def next_tick_at(self) -> float:
        """When (monotonic) :meth:`tick` next has something to do; infinity if never."""
        return self._tick_heap[0][0] if self._tick_heap else math.inf

    def prune(self, max_per_channel: int, max_age: float | None, budget: int = 1000) -> int:
        """Delete stored messages beyond the retention limits: up to ``budget``, or as many
        as were stored since the last pass if that is more (so retention keeps up)."""
        stored_since = self.stats.stored - self._stored_at_last_prune
        self._stored_at_last_prune = self.stats.stored
        removed = self.store.prune(self.now, max_per_channel, max_age, max(budget, 2 * stored_since))
        self.stats.pruned += removed
        return removed

    # -- outputs ---------------------------------------------------------------------------

    def take_output(self) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
        """``(replies, publications)`` queued since the last call, in order.

        Replies are ``(routing id, frame)``; publications are ``(topic, frame)``. Call
        :meth:`commit` first: output of an uncommitted turn is not to be sent.
        """
        replies, publishes = self._replies, self._publishes
        self._replies, self._publishes = [], []
        return replies, [p for p in publishes if p is not None]

    # -- helpers ---------------------------------------------------------------------------

    def _next_id(self) -> int:
        # Microseconds since the epoch, bumped to stay strictly increasing, and starting
        # above the store's highest id: unique across restarts.
        self._last_id = max(self._last_id + 1, int(self.now * 1_000_000))
        return self._last_id

    def _next_seq(self, channel: str) -> int:
        seq = self._seqs.get(channel)
        if seq is None:
            seq = self._seqs[channel] = self.store.last_seq(channel)
        if channel not in self._batch_seqs:
            self._batch_seqs[channel] = seq
        self._seqs[channel] = seq + 1
        mono = self.mono
        times = self._active.get(channel)
        if times is None:
            self._active[channel] = [mono, mono + self.tick_interval]
            heapq.heappush(self._tick_heap, (mono + self.tick_interval, channel))
        else:
            times[0] = mono
            if times[1] > mono + self.tick_interval:  # planned far out: tick soon instead
                times[1] = mono + self.tick_interval
                heapq.heappush(self._tick_heap, (times[1], channel))
        return seq + 1

    def _channel_topics(self, channel: str) -> tuple[list[bytes], str | None]:
        if channel.startswith("r:"):
            room = self.rooms.get(channel[2:])
            return ([room.topic], room.name) if room is not None else ([], None)
        return [s.topic for s in self.inboxes.get(channel, ())], None

    def _queue_reply(self, peer: bytes, reply: Reply | bytes) -> None:
        if isinstance(reply, bytes):  # encoded already (the message path's Sent)
            self._replies.append((peer, reply))
            return
        if type(reply) is ErrorReply:
            self.stats.errors[reply.code.value] += 1
        self._replies.append((peer, encode(reply)))

    def _publish(self, topic: bytes, event: Event) -> int:
        return self._publish_frame(topic, encode(event))

    def _publish_frame(self, topic: bytes, frame: bytes) -> int:
        self.stats.published += 1
        self._publishes.append((topic, frame))
        return len(self._publishes) - 1

    def _event(self, kind: EventKind, room: str | None, sender: str, text: str = "", **extra: Any) -> Event:
        return Event(kind, room, sender, text, self.now, self._next_id(), **extra)

    @staticmethod
    def _error(rid: int, code: ErrorCode, reason: str) -> ErrorReply:
        return ErrorReply(rid, code, reason)

    def _stage(
        self,
        session: Session,
        rid: int,
        publishes: list[int],
        cmid: str | None,
        sent: tuple[int, float, int],
        *,
        offline: bool = False,
        away: str = "",
    ) -> bytes:
        """Record output that depends on the commit; return the ``sent`` reply (for the
        message's ``(id, ts, seq)``; for a DM, ``offline`` if the nick named has no live
        session, ``away`` why its sessions are away) to queue next."""
        key = None
        if cmid is not None:
            key = (session.client, cmid)
            self._cmids[key] = sent
            self._staged_cmids.add(key)
            if len(self._cmids) > CMID_CACHE_SIZE:
                self._cmids.popitem(last=False)
        self._pending.append(_Pending(session.peer, rid, len(self._replies), publishes, key))
        return encode_sent(rid, *sent, offline=offline, away=away)

    def _fail_batch(self) -> None:
        unavailable = ErrorReply(None, ErrorCode.UNAVAILABLE, "the message store refused the write", RETRY_AFTER)
        for pending in self._pending:
            unavailable.rid = pending.rid
            self.stats.errors[ErrorCode.UNAVAILABLE.value] += 1
            self._replies[pending.reply_index] = (pending.peer, encode(unavailable))
            for index in pending.publish_indices:
                self._publishes[index] = None
            if pending.cache_key is not None:
                self._cmids.pop(pending.cache_key, None)
        for channel, seq in self._batch_seqs.items():
            self._seqs[channel] = seq
        self._pending.clear()

    def _duplicate(self, session: Session, req: Say | Dm) -> Sent | None:
        """The original's ``sent`` if this is a resend of a stored (or staged) message."""
        if req.cmid is None:
            return None
        key = (session.client, req.cmid)
        known = self._cmids.get(key)
        if known is None and req.retry:
            stored = self.store.find_cmid(session.client, req.cmid)
            if stored is not None:
                known = (stored.id, stored.ts, stored.seq)
        if known is None:
            return None
        self.stats.duplicates += 1
        sent = Sent(req.rid, known[0], known[1], known[2], dup=True)
        if key in self._staged_cmids:  # the original is in this very turn: same fate
            self._pending.append(_Pending(session.peer, req.rid, len(self._replies), [], None))
        return sent

    def _without_session(self, peer: bytes, request: Request, key: str | None) -> Reply:
        if type(request) is Hello:
            return self._hello(peer, request, key)
        if type(request) is Bye:
            return Goodbye(request.rid)  # already gone: bye is idempotent
        if type(request) is StatsRequest:
            return self._stats(None, request)
        return self._error(request.rid, ErrorCode.NO_SESSION, "no session: say hello first (or it expired)")

    def _end_session(self, session: Session, reason: str) -> None:
        for room in list(session.rooms.values()):
            self._remove_member(room, session, reason)
        del self.sessions[session.peer]
        _unlist(self.nicks, session.nkey, session)
        _unlist(self.inboxes, session.inbox, session)
        del self.clients[session.client]
        del self.private_topics[session.topic]

    def _remove_member(self, room: Room, session: Session, reason: str, *, announce: bool = True) -> None:
        room.members.discard(session)
        del session.rooms[room.name]
        if room.members:
            if announce:
                self._publish(room.topic, self._event(EventKind.LEAVE, room.name, session.nick, reason))
        else:
            del self.rooms[room.name]
            del self.room_topics[room.topic]

    def _welcome(self, rid: int, session: Session, identity: str, resumed: bool) -> Welcome:
        return Welcome(
            rid,
            session.nick,
            session.topic.decode(),
            self.motd,
            self.heartbeat,
            self.session_timeout,
            identity,
            self.store.last_seq(session.inbox),  # committed only, as in _joined
            resumed,
            self.max_page,
            self.store.epoch,
            session.pubkey or "",
        )

    # -- request handlers ------------------------------------------------------------------

    def _hello(self, peer: bytes, req: Hello, key: str | None) -> Reply:
        if self.secure and key is None:
            return self._error(req.rid, ErrorCode.UNAUTHORIZED, "this broker needs CURVE: connect with a key")
        identity = req.client or secrets.token_urlsafe(24)
        chash = client_hash(identity)
        principal = key if self.secure and key is not None else chash
        if self.flood is not None:
            wait = self.flood.penalty_left(principal, self.mono)
            if wait > 0:
                return ErrorReply(req.rid, ErrorCode.RATE_LIMITED, "disconnected for flooding", _retry_after(wait))
        session = self.clients.get(chash)
        if session is not None:
            if session.pubkey != key:
                return self._error(req.rid, ErrorCode.UNAUTHORIZED, "that session belongs to another key")
            # The same client on a new connection (its old one died): move the session over.
            del self.sessions[session.peer]
            log.info("session %s resumed (%s -> %s)", session.nick, session.peer.hex(), peer.hex(),
                     extra={**_fields("resumed", session), "peer": peer.hex()})
            session.peer, session.last_seen = peer, self.mono
            self.sessions[peer] = session
            self.stats.sessions_resumed += 1
            return self._welcome(req.rid, session, identity, resumed=True)
        if len(self.sessions) >= self.limits.max_sessions:
            return self._error(req.rid, ErrorCode.SERVER_FULL, "the broker holds all the sessions it may")
        inbox = "d:" + (chash if key is None or not self.secure else client_hash(key))
        if len(self.inboxes.get(inbox, ())) >= self.limits.max_sessions_per_key:
            limit = self.limits.max_sessions_per_key
            return self._error(req.rid, ErrorCode.TOO_MANY_SESSIONS, f"a key may hold at most {limit} sessions")
        nkey = nick_key(req.nick)
        refused = self._claim_nick(req.rid, principal, req.nick, nkey)
        if refused is not None:
            return refused
        topic = new_private_topic()
        pubkey = key if self.secure else None
        session = Session(peer, req.nick, nkey, topic, chash, inbox, self.mono, principal, pubkey)
        self.sessions[peer] = session
        self.nicks.setdefault(nkey, []).append(session)
        self.inboxes.setdefault(inbox, []).append(session)
        self.clients[chash] = session
        self.private_topics[topic] = session
        self.stats.sessions_opened += 1
        log.info("session %s (%s) opened", req.nick, peer.hex(), extra=_fields("opened", session))
        return self._welcome(req.rid, session, identity, resumed=False)

    def _claim_nick(self, rid: int, principal: str, nick: str, nkey: str) -> ErrorReply | None:
        """Refuse ``nick`` if another principal uses it (or, in secure mode, owns it);
        in secure mode a nick nobody owns yet becomes the principal's (persisted)."""
        live = self.nicks.get(nkey)
        if live and live[0].principal != principal:
            return self._error(rid, ErrorCode.NICK_TAKEN, f"nick {nick!r} is taken")
        if not self.secure:
            return None
        owner = self.store.nick_owner(nkey)
        if owner is None:
            if self.store.nicks_owned(principal) >= self.limits.max_nicks_per_key:
                limit = self.limits.max_nicks_per_key
                return self._error(rid, ErrorCode.TOO_MANY_NICKS, f"a key may own at most {limit} nicks")
            self.store.register_nick(nkey, principal, nick, self.now)
            self._dirty = True  # committed with the turn even if nothing else is
        elif owner != principal:
            return self._error(rid, ErrorCode.NICK_TAKEN, f"nick {nick!r} is registered to another key")
        return None

    def _hello_again(self, session: Session, req: Hello) -> Reply:
        return self._error(req.rid, ErrorCode.ALREADY_HELLO, f"this connection is already {session.nick!r}")

    def _joined(self, rid: int, room: Room) -> Joined:
        # The committed seq, not one staged this turn: if the turn's commit failed, a staged
        # seq would be handed out again and the joiner would take the new message for old.
        seq = self.store.last_seq(room.channel)
        acl = room.acl
        subject = acl.subject if acl is not None else room.subject
        return Joined(rid, room.name, room.topic.decode(), self._member_nicks(room), seq, acl is not None,
                      subject, self._op_nicks(room), self._away_nicks(room))

    def _join(self, session: Session, req: Join) -> Reply:
        room = self.rooms.get(req.room)
        acl = self.acls.get(req.room)
        if acl is None and req.private and (room is not None or self.store.last_seq("r:" + req.room)):
            return self._error(req.rid, ErrorCode.ROOM_EXISTS, f"{req.room!r} is a public room")
        if room is not None and session in room.members:
            return self._joined(req.rid, room)
        if acl is not None:
            if session.principal in acl.banned:
                return self._error(req.rid, ErrorCode.BANNED, f"you are banned from {req.room!r}")
            if session.principal not in acl.members:
                return self._error(req.rid, ErrorCode.NOT_INVITED, f"{req.room!r} is private: ask an operator")
        if len(session.rooms) >= self.limits.max_rooms_per_session:
            limit = self.limits.max_rooms_per_session
            return self._error(req.rid, ErrorCode.TOO_MANY_ROOMS, f"a session may be in at most {limit} rooms")
        if acl is None and req.private:
            p = session.principal
            if self._created[p] >= self.limits.max_private_rooms_per_key:
                limit = self.limits.max_private_rooms_per_key
                return self._error(req.rid, ErrorCode.TOO_MANY_ROOMS, f"you may create at most {limit} private rooms")
            self._created[p] += 1
            acl = self.acls[req.room] = RoomAcl(req.room, p, self.now, {p}, {p}, set())
            self._save_acl(acl)
            log.info("private room %s created by %s", req.room, session.nick)
        if room is None:
            topic = new_private_room_topic() if acl is not None else room_topic(req.room)
            room = Room(req.room, topic, "r:" + req.room, acl=acl)
            self.rooms[room.name] = room
            self.room_topics[room.topic] = room
        was = self._nick_away(room, session.nick)  # another session of the key may be here
        room.members.add(session)
        session.rooms[room.name] = room
        self._publish(room.topic, self._event(EventKind.JOIN, room.name, session.nick))
        if (why := self._nick_away(room, session.nick)) != was:  # as if they had seen it happen
            self._publish(room.topic, self._event(EventKind.AWAY, room.name, session.nick, why))
        return self._joined(req.rid, room)

    def _leave(self, session: Session, req: Leave) -> Reply:
        room = session.rooms.get(req.room)
        if room is None:
            return self._error(req.rid, ErrorCode.NOT_MEMBER, f"you are not in room {req.room!r}")
        self._remove_member(room, session, "left")
        return Left(req.rid, req.room)

    def _say(self, session: Session, req: Say) -> Reply | bytes:
        if req.cmid is not None:  # first: a resend is answered even if we left
            duplicate = self._duplicate(session, req)
            if duplicate is not None:
                return duplicate
        room = session.rooms.get(req.room)
        if room is None:
            return self._error(req.rid, ErrorCode.NOT_MEMBER, f"join {req.room!r} before you speak in it")
        kind = EventKind.ACTION if req.action else EventKind.MESSAGE
        seq, msg_id, now, nick = self._next_seq(room.channel), self._next_id(), self.now, session.nick
        self.store.add(
            StoredMessage(room.channel, seq, msg_id, now, kind, room.name, nick, req.text,
                          None, session.client, req.cmid)
        )
        # Every message comes this way: its event and reply are encoded from their fields
        # rather than built as Event and Sent objects only to be encoded.
        frame = encode_stored_event(kind, room.name, nick, req.text, ts=now, id=msg_id, seq=seq)
        index = self._publish_frame(room.topic, frame)
        return self._stage(session, req.rid, [index], req.cmid, (msg_id, now, seq))

    def _dm(self, session: Session, req: Dm) -> Reply | bytes:
        duplicate = self._duplicate(session, req)  # first: a resend is answered even if they left
        if duplicate is not None:
            return duplicate
        nkey = nick_key(req.to)
        targets = self.nicks.get(nkey)
        away = ""
        if targets:
            to, recipient = targets[0].nick, targets[0].inbox
            if all(t.away for t in targets):  # every session of the nick is away (as _away_nicks)
                away = min(t.away for t in targets)
        else:
            # In secure mode a registered nick's inbox is its key's, online or not: the DM
            # waits there, and the owner reads it with `history` when they come back.
            record = self.store.registered_nick(nkey) if self.secure else None
            if record is None or not self.key_allowed(record[0]):
                return self._error(req.rid, ErrorCode.NO_SUCH_NICK, f"nobody is called {req.to!r}")
            owner, to = record
            recipient = "d:" + client_hash(owner)
        # Whether the nick named has a live session; not whether its key has one under another
        # nick, which would tell the sender that two nicks are one key's.
        offline = not targets
        msg_id, now = self._next_id(), self.now
        published: list[int] = []
        seq = 0
        # One stored copy per inbox: the recipient's and (unless the same) the sender's,
        # which carries the cmid. Each copy is published on the private topic of every
        # session of the inbox's principal (one key may hold several sessions).
        inboxes = (recipient, session.inbox) if recipient != session.inbox else (session.inbox,)
        for inbox in inboxes:
            seq = self._next_seq(inbox)
            mine = inbox == session.inbox
            self.store.add(
                StoredMessage(inbox, seq, msg_id, now, EventKind.DM, None, session.nick, req.text,
                              to, session.client if mine else None, req.cmid if mine else None)
            )
            frame = encode_stored_event(EventKind.DM, None, session.nick, req.text, ts=now, id=msg_id, seq=seq, to=to)
            published.extend(self._publish_frame(owner.topic, frame) for owner in self.inboxes.get(inbox, ()))
        return self._stage(session, req.rid, published, req.cmid, (msg_id, now, seq), offline=offline, away=away)

    def _history(self, session: Session, req: History) -> Reply:
        self.stats.history_requests += 1
        if req.after is not None:
            self.stats.gap_fetches += 1
        if req.dm:
            channel = session.inbox
        else:
            assert req.room is not None
            if req.room not in session.rooms:
                return self._error(req.rid, ErrorCode.NOT_MEMBER, f"join {req.room!r} to read its history")
            channel = "r:" + req.room
        limit = min(req.limit if req.limit is not None else 50, self.max_page)
        page = self.store.page(channel, before=req.before, after=req.after, limit=limit)
        stored = _cap_bytes(page, MAX_PAGE_BYTES, newest_first=req.after is None)
        events = tuple(
            Event(EventKind(m.kind), m.room, m.sender, m.text, m.ts, m.id, to=m.to, seq=m.seq) for m in stored
        )
        more = len(page) == limit > 0 or len(stored) < len(page)  # full, or cut to MAX_PAGE_BYTES
        return HistoryPage(req.rid, req.room, events, self.store.last_seq(channel), more)

    def _stats(self, session: Session | None, req: StatsRequest) -> Reply:
        uptime = self.mono - self._started if self._started is not None else 0.0
        return StatsReply(req.rid, self.version, uptime, self.snapshot())

    def snapshot(self) -> dict[str, float]:
        """Every gauge and counter by name (``stats`` replies and Prometheus read this)."""
        stats = self.stats
        figures: dict[str, float] = {
            "sessions": len(self.sessions),
            "rooms": len(self.rooms),
            "members": sum(len(room.members) for room in self.rooms.values()),
            "requests_total": stats.requests,
            "published_total": stats.published,
            "stored_total": stats.stored,
            "duplicates_total": stats.duplicates,
            "history_requests_total": stats.history_requests,
            "gap_fetches_total": stats.gap_fetches,
            "commits_total": stats.commits,
            "commit_failures_total": stats.commit_failures,
            "pruned_total": stats.pruned,
            "sessions_opened_total": stats.sessions_opened,
            "sessions_resumed_total": stats.sessions_resumed,
            "sessions_expired_total": stats.sessions_expired,
            "subscriptions_granted_total": stats.subscriptions_granted,
            "subscriptions_denied_total": stats.subscriptions_denied,
            "subscriptions_deferred_total": stats.subscriptions_deferred,
            "rate_limited_total": stats.errors.get("rate_limited", 0),
            "errors_total": sum(stats.errors.values()),
        }
        for code, count in dict(stats.errors).items():
            figures[f"errors_total:{code}"] = count
        figures.update(self.io_figures)
        return figures

    def going_away(self) -> None:
        """Tell every session the broker is shutting down (so clients reconnect at once)."""
        for session in self.sessions.values():
            self._publish(session.topic, self._event(EventKind.GOAWAY, None, "", "the broker is shutting down"))

    def _who(self, session: Session, req: Who) -> Reply:
        room = self.rooms.get(req.room)
        if room is None or (room.acl is not None and session.principal not in room.acl.members):
            return self._error(req.rid, ErrorCode.NO_SUCH_ROOM, f"there is no room {req.room!r}")
        return Members(req.rid, room.name, self._member_nicks(room), self._op_nicks(room), self._away_nicks(room))

    def _rooms(self, session: Session, req: Rooms) -> Reply:
        infos = [RoomInfo(name, len(room.members)) for name, room in self.rooms.items() if room.acl is None]
        for name, acl in self.acls.items():  # private rooms: only those the session may join
            if session.principal in acl.members:
                live = self.rooms.get(name)
                infos.append(RoomInfo(name, len(live.members) if live is not None else 0, True))
        return RoomList(req.rid, tuple(sorted(infos, key=lambda info: info.name)))

    def _nick(self, session: Session, req: Nick) -> Reply:
        key = nick_key(req.nick)
        old = session.nick
        if old == req.nick:
            return NickChanged(req.rid, old)
        if key != session.nkey:
            refused = self._claim_nick(req.rid, session.principal, req.nick, key)
            if refused is not None:
                return refused
        _unlist(self.nicks, session.nkey, session)
        session.nick, session.nkey = req.nick, key
        self.nicks.setdefault(key, []).append(session)
        for room in session.rooms.values():
            self._publish(room.topic, self._event(EventKind.NICK, room.name, old, nick=req.nick))
        log.info("session %s (%s) is now %s", old, session.peer.hex(), req.nick,
                 extra={**_fields("nick", session), "old_nick": old})
        return NickChanged(req.rid, req.nick)

    def _away(self, session: Session, req: Away) -> Reply:
        if req.text != session.away:
            # What each room sees of the nick: another session of the key with the same nick
            # may keep it "here" (or give it another reason), so announce only what changes.
            rooms = list(session.rooms.values())
            before = [self._nick_away(room, session.nick) for room in rooms]
            session.away = req.text
            for room, was in zip(rooms, before, strict=True):
                now = self._nick_away(room, session.nick)
                if now != was:
                    self._publish(room.topic, self._event(EventKind.AWAY, room.name, session.nick, now))
            log.info("session %s (%s) is %s", session.nick, session.peer.hex(), "away" if req.text else "back",
                     extra=_fields("away" if req.text else "back", session))
        return AwayChanged(req.rid, req.text)

    def _ping(self, session: Session, req: Ping) -> Reply:
        return Pong(req.rid, self.now)

    def _bye(self, session: Session, req: Bye) -> Reply:
        log.info("session %s (%s) said bye", session.nick, session.peer.hex(), extra=_fields("bye", session))
        self._end_session(session, "quit")
        return Goodbye(req.rid)

    @staticmethod
    def _member_nicks(room: Room) -> tuple[str, ...]:
        # nick_key first (how people read a list), then the nick itself: one key's sessions
        # may be "ann" and "ANN", and their order must not depend on the set's.
        return tuple(sorted((s.nick for s in room.members), key=_nick_order))

    def _nick_away(self, room: Room, nick: str) -> str:
        """Why ``nick`` is away in ``room`` ("": it is not), as :meth:`_away_nicks` has it,
        from the nick's few sessions rather than the room's members."""
        whys = [s.away for s in self.nicks.get(nick_key(nick), ()) if s.nick == nick and s.rooms.get(room.name) is room]
        return min(whys) if whys and all(whys) else ""

    @staticmethod
    def _away_nicks(room: Room) -> dict[str, str]:
        """The away members' nicks and why (a nick that two sessions of one key share is
        away if both are), in nick order."""
        whys: dict[str, list[str]] = {}
        for s in room.members:
            whys.setdefault(s.nick, []).append(s.away)
        return {nick: min(whys[nick]) for nick in sorted(whys, key=_nick_order) if all(whys[nick])}

    @staticmethod
    def _op_nicks(room: Room) -> tuple[str, ...]:
        if room.acl is None:
            return ()
        ops = room.acl.ops
        return tuple(sorted({s.nick for s in room.members if s.principal in ops}, key=_nick_order))

    # -- private rooms and moderation ------------------------------------------------------

    def _save_acl(self, acl: RoomAcl) -> None:
        self.store.save_room(acl)
        self._dirty = True

    def _moderate(self, session: Session, req: Moderate) -> Reply:
        acl = self.acls.get(req.room)
        if acl is None:
            if req.room in self.rooms:
                return self._error(req.rid, ErrorCode.NOT_PRIVATE, f"{req.room!r} is public: nobody moderates it")
            return self._error(req.rid, ErrorCode.NO_SUCH_ROOM, f"there is no room {req.room!r}")
        if session.principal not in acl.ops:
            return self._error(req.rid, ErrorCode.NOT_OPERATOR, f"you are not an operator of {req.room!r}")
        targets = self.nicks.get(nick_key(req.nick), [])
        principal = targets[0].principal if targets else None
        if principal is None and self.secure:
            principal = self.store.nick_owner(nick_key(req.nick))  # the key owning an offline nick
        if principal is None:
            return self._error(req.rid, ErrorCode.NO_SUCH_NICK, f"nobody is called {req.nick!r}")
        nick = targets[0].nick if targets else req.nick
        kind = req.kind
        if kind is RequestKind.INVITE:
            if principal in acl.banned:
                return self._error(req.rid, ErrorCode.BANNED, f"{nick!r} is banned from {req.room!r}: unban first")
            acl.members.add(principal)
        elif kind is RequestKind.KICK or kind is RequestKind.BAN:
            acl.members.discard(principal)
            acl.ops.discard(principal)
            if kind is RequestKind.BAN:
                acl.banned.add(principal)
        elif kind is RequestKind.UNBAN:
            acl.banned.discard(principal)
        elif kind is RequestKind.OP:
            if principal not in acl.members:
                return self._error(req.rid, ErrorCode.NOT_MEMBER, f"{nick!r} is not a member of {req.room!r}")
            acl.ops.add(principal)
        else:
            acl.ops.discard(principal)
        self._save_acl(acl)
        event = self._event(EventKind(kind.value), req.room, session.nick, req.reason, nick=nick)
        room = self.rooms.get(req.room)
        if kind is RequestKind.KICK or kind is RequestKind.BAN:
            self._expel(req.room, principal, event)
        else:
            if room is not None:
                self._publish(room.topic, event)
            if kind is RequestKind.INVITE:
                for target in targets:
                    self._publish(target.topic, event)
        log.info("%s %s %s in %s", session.nick, kind.value, nick, req.room,
                 extra={**_fields("moderation", session), "room": req.room, "target": nick})
        return Moderated(req.rid, req.room, kind.value, nick)

    def _expel(self, name: str, principal: str, event: Event | None) -> None:
        """Remove every session of ``principal`` from private room ``name`` and rotate its topic.

        ``event`` (a kick or ban) goes to the private topic of each session in the room and
        of each session of the principal, so everyone gets it whichever topic it listens to.
        """
        room = self.rooms.get(name)
        present = list(room.members) if room is not None else []
        if event is not None:
            told = {s.topic for s in present}
            told.update(s.topic for s in self.sessions.values() if s.principal == principal)
            for topic in told:
                self._publish(topic, event)
        if room is None:
            return
        for member in present:
            if member.principal == principal:
                self._remove_member(room, member, "removed", announce=False)
        if room.members:
            self._rotate(room)

    def _rotate(self, room: Room) -> None:
        """Move a private room to a fresh topic and tell each remaining member on its own.

        Whoever held the old topic (a pipe keeps a granted subscription) gets nothing more.
        """
        del self.room_topics[room.topic]
        room.topic = new_private_room_topic()
        self.room_topics[room.topic] = room
        # The committed seq, as in _joined: a seq staged this turn could be handed out again
        # if the commit fails. Members fill from their own last seq anyway.
        seq = self.store.last_seq(room.channel)
        rekey = self._event(EventKind.REKEY, room.name, "", room.topic.decode(), seq=seq)
        for member in room.members:
            self._publish(member.topic, rekey)

    def _set_topic(self, session: Session, req: SetTopic) -> Reply:
        room = session.rooms.get(req.room)
        if room is None:
            return self._error(req.rid, ErrorCode.NOT_MEMBER, f"join {req.room!r} to set its topic")
        if room.acl is not None:
            if session.principal not in room.acl.ops:
                return self._error(req.rid, ErrorCode.NOT_OPERATOR, f"you are not an operator of {req.room!r}")
            room.acl.subject = req.text
            self._save_acl(room.acl)
        else:
            room.subject = req.text
        self._publish(room.topic, self._event(EventKind.TOPIC, room.name, session.nick, req.text))
        return Moderated(req.rid, room.name, RequestKind.TOPIC.value, "")

    def keys_revoked(self, allowed: set[str]) -> int:
        """End the sessions of keys no longer in ``allowed`` (the authorized-keys directory
        changed), rotating the private rooms they were in; return how many ended."""
        gone = [s for s in self.sessions.values() if s.pubkey is not None and s.pubkey not in allowed]
        for session in gone:
            log.warning("session %s (%s) ended: its key was revoked", session.nick, session.peer.hex(),
                        extra=_fields("revoked", session))
            for room in list(session.rooms.values()):
                if room.acl is not None:
                    self._expel(room.name, session.principal, None)
            if session.peer in self.sessions:
                self._publish(session.topic, self._event(EventKind.GOAWAY, None, "", "your key was revoked"))
                self._end_session(session, "key revoked")
        return len(gone)
