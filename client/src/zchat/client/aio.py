"""``AsyncClient``: the asyncio front end of the client core.

One DEALER carries requests and their replies; one SUB receives the session's private topic
and the topics of its rooms. Reader tasks hand what arrives to the core; a heartbeat task
pings when nothing has been heard for the broker's heartbeat interval; a supervisor task
reconnects when the broker stops answering or forgets the session.

Delivery: every message, action and DM carries its channel's sequence number. The core's
feeds deliver each exactly once and in order; a gap (seen in a later message or in the
broker's periodic ``tick``) is filled from history. ``join`` delivers the room's recent
history before its live traffic, and ``connect`` the DM inbox's (in secure mode the inbox is
the key's, and keeps DMs sent while it was offline); after a reconnect every room and the DM
inbox are filled from the last message seen.

Sending: ``say`` and ``dm`` carry a client message id; if the broker does not answer, or
the connection is lost, the same request is sent again (flagged as a resend) until it is
acknowledged or ``send_timeout`` passes. The broker stores a resent message once.

Flood control: a request refused with ``rate_limited`` holds back every request of its kind
(messages, joins, history pages) for the ``retry_after`` the broker gave. ``say``/``dm`` and
the fills of missed messages wait that long and resend (same cmid); other requests raise.

Private rooms: a ``rekey`` event (someone was removed) moves the room to a new topic; the
client subscribes to it, drops the old one and fills from history what the move missed, so
the room's messages still arrive exactly once and in order. A ``kick`` or ``ban`` of this
session drops the room. A room that cannot be joined again after a reconnection (removed
meanwhile, or a private room the broker lost) is dropped, and a ``leave`` event of this
session with the reason is delivered.

Secure mode: with ``server_key`` and ``key`` both sockets are CURVE clients (encrypted, and
the broker knows us by our public key). A socket monitor watches the DEALER's handshake, so
a broker that refuses our key, or that is not the server whose key we hold, fails
:meth:`AsyncClient.connect` at once with :class:`~zchat.common.errors.AuthenticationFailed`
instead of a timeout (and a plain client meeting a CURVE broker learns why too).

Every request method raises :class:`~zchat.common.errors.RequestError` for an error reply
and :class:`~zchat.common.errors.RequestTimeout` when no reply comes in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from zchat.common.codes import ErrorCode, EventKind, RequestKind
from zchat.common.config import DEFAULT_PUB, DEFAULT_ROUTER
from zchat.common.errors import (
    AuthenticationFailed,
    AuthFailure,
    ConfigError,
    ConnectionClosed,
    ProtocolError,
    RequestError,
    RequestTimeout,
)
from zchat.common.keys import KeyPair, load_public_key, load_secret_key
from zchat.common.protocol import (
    STORED_KINDS,
    Away,
    AwayChanged,
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
    Welcome,
    Who,
)

from .core import DM, REMOVALS, ClientCore, raise_for_error

log = logging.getLogger("zchat.client")

R = TypeVar("R")


class ClientState(Enum):
    """Where a client is in its life."""

    DISCONNECTED = "disconnected"  # not connected yet
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # lost the broker or the session; trying again
    CLOSED = "closed"


def backoff(initial: float = 0.1, factor: float = 2.0, maximum: float = 5.0) -> Iterator[float]:
    """Delays between reconnection attempts: exponential, capped, with full jitter."""
    delay = initial
    while True:
        yield random.uniform(0, delay)
        delay = min(delay * factor, maximum)


#: Requests that change nothing: asked again after a reconnection if the session was gone.
_READS: frozenset[type[Request]] = frozenset({History, Who, Rooms, Ping})

#: Which flood-control bucket a request draws on (the broker's buckets); other requests
#: are held back by their own kind.
_BUCKETS: dict[type[Request], str] = {
    Say: "messages", Dm: "messages", Away: "messages", Nick: "messages", Join: "subscriptions", History: "history",
}  # fmt: skip

#: Refusals of a rejoin that mean we may no longer be in the room: it is dropped.
_GONE = frozenset({ErrorCode.NOT_INVITED, ErrorCode.BANNED, ErrorCode.ROOM_EXISTS})

#: Seconds to wait after a ``rate_limited`` reply that does not say how long.
_DEFAULT_RETRY_AFTER = 1.0


class _Gate:
    """Flood control for one bucket of requests, as the broker's ``rate_limited`` asks.

    Open, requests pass at once. A refusal closes it for its ``retry_after``; then requests
    pass one at a time, each after the one before it is answered and ``retry_after`` (the
    time the broker's bucket takes to refill for one) after it, until one is accepted with
    nobody waiting behind it and the gate opens again. So a refusal is not followed by more
    refusals, each of them a strike towards the broker's penalty for flooding.
    """

    def __init__(self) -> None:
        self.until = 0.0  # loop time before which nothing passes
        self.pace = 0.0  # seconds between requests while limited: the last retry_after
        self.limited = False  # refused lately: one request at a time
        self._lock = asyncio.Lock()
        self._queued = 0  # requests waiting for their turn

    @contextlib.asynccontextmanager
    async def turn(self, closing: asyncio.Event) -> AsyncIterator[bool]:
        """Wait for a request's turn; yield whether it goes alone (the gate is limited).

        Raises:
            ConnectionClosed: ``closing`` was set while waiting.
        """
        if not self.limited:
            yield False
            return
        self._queued += 1
        try:
            await self._lock.acquire()
        finally:
            self._queued -= 1
        try:
            loop = asyncio.get_running_loop()
            while (delay := self.until - loop.time()) > 0 and not closing.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(closing.wait(), delay)
            if closing.is_set():
                raise ConnectionClosed("the client is closed")
            yield True
        finally:
            self._lock.release()

    def answered(self, reply: Reply, alone: bool) -> None:
        """Learn from a reply: a refusal closes the gate; a lone request accepted keeps the
        pace for those waiting behind it, or opens the gate if none are."""
        now = asyncio.get_running_loop().time()
        if type(reply) is ErrorReply and reply.code is ErrorCode.RATE_LIMITED:
            self.pace = _DEFAULT_RETRY_AFTER if reply.retry_after is None else reply.retry_after
            self.until = max(self.until, now + self.pace)
            self.limited = True
        elif alone and self._queued:
            self.until = max(self.until, now + self.pace)
        elif alone:
            self.limited = False


def _kind_of(cls: type[Request], args: tuple[Any, ...]) -> str:
    """The wire kind of a request of ``cls`` built from ``args`` (``Moderate``: the first)."""
    return str(args[0].value) if issubclass(cls, Moderate) else cls.KIND.value


def rate_limited(exc: BaseException) -> bool:
    """Whether ``exc`` is the broker asking to slow down (resend after ``retry_after``)."""
    return isinstance(exc, RequestError) and exc.code is ErrorCode.RATE_LIMITED


async def _cancel_and_wait(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait for them to end.

    ``gather(return_exceptions=True)`` swallows the tasks' CancelledError but not the
    caller's own: a ``suppress(CancelledError)`` around ``await task`` would eat both.
    """
    current = asyncio.current_task()
    tasks = [task for task in tasks if task is not current]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


#: What the DEALER's monitor reports about the security handshake.
_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def curve_keys(server_key: str | Path | None, key: str | Path | KeyPair | None) -> tuple[str, KeyPair] | None:
    """The broker's public key and our key pair for CURVE, or None without them.

    ``server_key`` is the broker's public key (Z85) or its ``.key`` file; ``key`` is our
    ``.key_secret`` file (or a :class:`KeyPair`).

    Raises:
        ConfigError: only one of the two was given.
        KeyFileError: a key file is missing, malformed, or (the secret one) readable by others.
    """
    if server_key is None and key is None:
        return None
    if server_key is None or key is None:
        given = "key" if server_key is None else "server_key"
        raise ConfigError("server_key/key", None, "CURVE needs both the broker's public key (server_key, "
                          "--server-key, ZCHAT_SERVER_KEY) and this client's secret key (key, --key, ZCHAT_KEY); "
                          f"only {given} was given")
    pair = key if isinstance(key, KeyPair) else load_secret_key(key)
    return load_public_key(server_key), pair


def worth_retrying(exc: BaseException) -> bool:
    """Whether a failed send may succeed if tried again after a reconnect."""
    if isinstance(exc, RequestTimeout | ConnectionClosed):
        return True
    return isinstance(exc, RequestError) and exc.code is ErrorCode.NO_SESSION


class AsyncClient:
    """A zchat client for asyncio programs.

    Args:
        router: the broker's ROUTER endpoint.
        pub: the broker's XPUB endpoint.
        timeout: seconds to wait for each reply.
        history: messages of a room's history delivered when joining it, and of the DM
            inbox's when connecting (the broker caps it). With a key the inbox is the key's:
            each new program sees its last DMs again (both directions), and those sent
            while it was away; 0 delivers only new ones.
        send_timeout: seconds ``say``/``dm`` keep resending before giving up.
        client_id: this client's identity; pass the same one after a restart to make resends
            of messages sent before it recognisable (default: a fresh random one).
        on_state: called with the new :class:`ClientState` whenever it changes.
        max_queued_events: events held for :meth:`recv_event` before reading pauses (the
            broker then drops for this client, and gap repair fetches what was dropped).
        context: a ``zmq.asyncio.Context`` to share; by default the client owns one.
        server_key: the broker's CURVE public key, or its ``.key`` file: turns on CURVE.
        key: this client's CURVE secret key file (``.key_secret``, mode 0600) or key pair;
            given with ``server_key``, never alone.

    Raises:
        ConfigError: only one of ``server_key`` and ``key``.
        KeyFileError: a key file cannot be used.
    """

    def __init__(
        self,
        router: str = DEFAULT_ROUTER,
        pub: str = DEFAULT_PUB,
        *,
        timeout: float = 5.0,
        history: int = 50,
        send_timeout: float = 30.0,
        client_id: str | None = None,
        on_state: Callable[[ClientState], None] | None = None,
        max_queued_events: int = 10_000,
        context: zmq.asyncio.Context | None = None,
        server_key: str | Path | None = None,
        key: str | Path | KeyPair | None = None,
    ) -> None:
        self._curve = curve_keys(server_key, key)
        self.router, self.pub, self.timeout = router, pub, timeout
        self.join_history, self.send_timeout = history, send_timeout
        self.core = ClientCore(client_id)
        self.core.inbox_history = history
        self.state = ClientState.DISCONNECTED
        self._on_state = on_state
        self._own_context = context is None
        self._ctx = context or zmq.asyncio.Context()
        self._dealer: zmq.asyncio.Socket | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._waiters: dict[int, asyncio.Future[Reply]] = {}
        self._syncs: dict[str, asyncio.Future[int]] = {}
        # Unbounded, so a batch of released events goes in whole and in order (two writers
        # awaiting put() on a full queue would interleave); reading pauses instead while
        # more than max_queued_events wait (_wait_for_room).
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._max_queued = max_queued_events
        self._room_for_events = asyncio.Event()
        self._room_for_events.set()
        self._io_tasks: list[asyncio.Task[None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._fills: dict[str, asyncio.Task[None]] = {}
        self._rekeys: dict[str, asyncio.Task[None]] = {}
        # For each join under way, the rekeys and removals of this session read meanwhile,
        # by room, with whether they waited for their room's joined reply: see _join.
        self._joins: list[dict[str, list[tuple[Event, bool]]]] = []
        self._gates: dict[str, _Gate] = {}  # flood control, by bucket (_BUCKETS)
        self._connected = asyncio.Event()
        self._closing = asyncio.Event()
        #: Set when the broker refused our key on a reconnection (it was revoked): the client
        #: stops reconnecting, and calls raise it.
        self.refused: AuthenticationFailed | None = None
        self._lost = asyncio.Event()
        self._last_heard = 0.0
        self._wanted_nick = ""
        self._away = ""  # set again on a new session after a reconnection

    # -- session -----------------------------------------------------------------------------

    @property
    def current_nick(self) -> str | None:
        """This session's nick, or None before :meth:`connect`."""
        return self.core.nick

    @property
    def away_text(self) -> str:
        """Why this client is away, as :meth:`away` last set it ("": it is not)."""
        return self._away

    @property
    def joined(self) -> list[str]:
        """The rooms this session is in."""
        return list(self.core.rooms)

    @property
    def client_id(self) -> str:
        """This client's identity (keep it to resend after a restart)."""
        return self.core.client_id

    async def connect(self, nick: str) -> Welcome:
        """Open the sockets and a session called ``nick``; return the broker's welcome, once
        the DM inbox's recent history (``history`` messages) is delivered.

        Raises:
            AuthenticationFailed: the security handshake failed (key refused, wrong server
                key, CURVE on one side only); at once, not after ``timeout``.
            RequestError: the broker refused the session (``nick_taken``, ...).
            RequestTimeout: no answer (nothing listens there, or it is overloaded).
        """
        if self.state is not ClientState.DISCONNECTED:
            raise RuntimeError(f"connect() on a client that is {self.state.value}")
        self._wanted_nick = nick
        try:
            welcome = await self._open_session(nick)
        except BaseException:
            await self._close_sockets()  # still DISCONNECTED: connect() may be tried again
            raise
        self._set_state(ClientState.CONNECTED)
        self._tasks = [
            asyncio.create_task(self._heartbeat(), name="zchat-heartbeat"),
            asyncio.create_task(self._supervise(), name="zchat-supervisor"),
        ]
        try:
            await self._fill(DM)  # the inbox's recent history, if it has any
        except Exception as exc:  # connected all the same: fetched in the background
            log.info("could not fetch the DM inbox yet: %s", exc)
            self._schedule_fill(DM)
        return welcome

    async def join(self, room: str, *, private: bool = False, history: int | None = None) -> Joined:
        """Join ``room``; return once its recent history is delivered and its events flow.

        With ``private``, a room that does not exist yet is created invite-only, with this
        session as its operator (``room_exists`` if a public room has the name); a private
        room is joined by those invited either way (else ``not_invited``, ``banned``).
        ``history`` overrides the client's default number of past messages to deliver.
        """
        known_topics = set(self.core.rooms.values())
        joined = await self._join(room, private)
        if joined.room not in self.core.rooms:
            return joined  # removed at once: the kick or ban is delivered
        if private and joined.private:
            self.core.keep_private.add(joined.room)
        count = self.join_history if history is None else history
        if joined.topic.encode() not in known_topics:
            try:
                await self._subscribe(joined.topic.encode())
            except BaseException:
                # We are in the room: start its feed anyway, or its messages would be held
                # back for good; gap repair catches up once the subscription works.
                self._deliver(self.core.open_feed(joined.room, joined.seq, min(count, self.core.max_page)))
                raise
        self._deliver(self.core.open_feed(joined.room, joined.seq, min(count, self.core.max_page)))
        # At least one fetch even with nothing known to be missing: a message stored between
        # the joined reply and the subscription taking effect was published before we could
        # hear it; from here on, everything newer arrives live.
        await self._fill(joined.room, at_least_once=True)
        return joined

    async def _join(self, room: str, private: bool, *, rejoin: bool = False) -> Joined:
        """Send ``join`` (``rejoin``: for a reconnection, resent while ``rate_limited``), then
        apply the rekeys and removals of this session read while it was under way.

        Replies and events come on two sockets, so a ``rekey`` or a ``kick`` that the broker
        sent after the ``joined`` reply may be read before it: one of a room not joined yet
        waited for the reply (:meth:`_note_for_join`) and is applied now, as if read after
        it; one already applied is applied again, since the reply may have brought back the
        room or its older topic (a rekey whose topic the reply has already is ignored).
        """
        notes: dict[str, list[tuple[Event, bool]]] = {}
        self._joins.append(notes)
        try:
            if rejoin:
                joined = await self._call_patiently(Joined, Join, room, private, wait=False)
            else:
                joined = await self._call(Joined, Join, room, private)
        finally:
            self._joins.remove(notes)
        for event, waited in notes.get(joined.room, []):
            if event.kind is EventKind.REKEY:
                self._on_rekey(event)
            elif waited:
                self._deliver(self.core.accept(event))
            else:
                self.core.drop_room(joined.room)
        return joined

    def _note_for_join(self, event: Event) -> bool:
        """While joins are under way, note a ``rekey`` or a removal of this session for
        :meth:`_join`; True if it must wait for its room's ``joined`` reply (not joined yet)."""
        if not self._joins or event.room is None:
            return False
        waits = event.room not in self.core.rooms
        for notes in self._joins:
            notes.setdefault(event.room, []).append((event, waits))
        return waits

    async def leave(self, room: str) -> None:
        """Leave ``room`` and stop receiving its events."""
        topics = dict(self.core.rooms)
        left = await self._call(Left, Leave, room)
        topic = topics.get(left.room)
        if topic is not None and self._sub is not None:
            self._sub.unsubscribe(topic)

    async def say(self, room: str, text: str, *, action: bool = False, cmid: str | None = None) -> Sent:
        """Send ``text`` to ``room`` (a ``/me`` action if ``action``); return its id and seq.

        ``cmid`` (default: a fresh one) makes resends recognisable; the same ``cmid`` sent
        again by this client identity is answered with the original message, not stored
        twice — also by a restarted process that passes the same ``client_id``.
        """
        return await self._send(Say, room, text, action, cmid)

    async def dm(self, nick: str, text: str, *, action: bool = False, cmid: str | None = None) -> Sent:
        """Send ``text`` privately to ``nick`` (resent like :meth:`say`)."""
        return await self._send(Dm, nick, text, action, cmid)

    async def who(self, room: str) -> list[str]:
        """The nicks of ``room``'s members."""
        return list((await self.members(room)).members)

    async def members(self, room: str) -> Members:
        """Like :meth:`who`, with which members are the room's operators (``.ops``)."""
        return await self._call(Members, Who, room)

    # -- private rooms and moderation (operators only, else ``not_operator``) ----------------

    async def invite(self, room: str, nick: str) -> Moderated:
        """Put ``nick`` (online) on the member list of the private ``room`` and tell them."""
        return await self._call(Moderated, Moderate, RequestKind.INVITE, room, nick)

    async def kick(self, room: str, nick: str, reason: str = "") -> Moderated:
        """Remove ``nick`` from the private ``room`` and its member list (``reason`` is shown)."""
        return await self._call(Moderated, Moderate, RequestKind.KICK, room, nick, reason)

    async def ban(self, room: str, nick: str, reason: str = "") -> Moderated:
        """Remove ``nick`` from the private ``room`` and keep them out until :meth:`unban`."""
        return await self._call(Moderated, Moderate, RequestKind.BAN, room, nick, reason)

    async def unban(self, room: str, nick: str) -> Moderated:
        """Lift the ban of ``nick`` (they need an :meth:`invite` to come back)."""
        return await self._call(Moderated, Moderate, RequestKind.UNBAN, room, nick)

    async def op(self, room: str, nick: str) -> Moderated:
        """Make ``nick``, a member, an operator of the private ``room``."""
        return await self._call(Moderated, Moderate, RequestKind.OP, room, nick)

    async def deop(self, room: str, nick: str) -> Moderated:
        """Take operator rights in the private ``room`` from ``nick``."""
        return await self._call(Moderated, Moderate, RequestKind.DEOP, room, nick)

    async def topic(self, room: str, text: str) -> Moderated:
        """Set ``room``'s topic line (``""`` clears it); in a private room, operators only."""
        return await self._call(Moderated, SetTopic, room, text)

    async def rooms(self) -> list[RoomInfo]:
        """Every room on the broker with its member count."""
        return list((await self._call(RoomList, Rooms)).rooms)

    async def nick(self, new_nick: str) -> str:
        """Change this session's nick; return it as the broker has it."""
        nick = (await self._call(NickChanged, Nick, new_nick)).nick
        self._wanted_nick = nick
        return nick

    async def away(self, text: str = "") -> str:
        """Mark this session away, ``text`` saying why (``""``: back again); the rooms are
        told with an ``away`` event, and a DM to this nick gets ``sent.away``. Kept across
        reconnections."""
        text = (await self._call(AwayChanged, Away, text)).text
        self._away = text
        return text

    async def history(
        self, room: str | None = None, *, before: int | None = None, after: int | None = None, limit: int = 50
    ) -> list[Event]:
        """A page of stored messages of ``room`` (or of this client's DMs when None).

        Without ``before``/``after``: the newest ``limit``. With ``before``: the ``limit``
        before that seq (scroll back). With ``after``: the ``limit`` after it. In seq order.
        """
        page = await self._call(HistoryPage, History, room, room is None, before, after, limit)
        return list(page.events)

    async def ping(self) -> float:
        """Round trip to the broker, in seconds."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self._call(Pong, Ping)
        return loop.time() - start

    async def close(self) -> None:
        """Say bye (if connected), then close the sockets. Safe to call twice."""
        if self.state is ClientState.CLOSED:
            return
        self._closing.set()  # wakes calls waiting for a reconnection: they raise ConnectionClosed
        await _cancel_and_wait([*self._tasks, *self._fills.values(), *self._rekeys.values()])
        self._tasks, self._fills, self._rekeys = [], {}, {}
        if self.state is ClientState.CONNECTED:
            with contextlib.suppress(RequestTimeout, ConnectionClosed, ProtocolError, RequestError):
                await self._request(Bye, wait=False, timeout=min(self.timeout, 1.0))
        await self._close_sockets()
        self._set_state(ClientState.CLOSED)
        self._events.put_nowait(None)  # wakes every reader of events()
        if self._own_context:
            self._ctx.term()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- events ------------------------------------------------------------------------------

    async def recv_event(self, timeout: float | None = None) -> Event:
        """The next event, waiting up to ``timeout`` seconds (forever if None).

        Raises:
            TimeoutError: none arrived in time.
            ConnectionClosed: the client was closed.
        """
        if self.state is ClientState.CLOSED and self._events.empty():
            raise ConnectionClosed("the client is closed")
        event = await asyncio.wait_for(self._events.get(), timeout)
        if self._events.qsize() < self._max_queued:
            self._room_for_events.set()
        if event is None:
            self._events.put_nowait(None)  # leave the end marker for the next reader
            raise self.refused or ConnectionClosed("the client is closed")
        return event

    async def events(self) -> AsyncIterator[Event]:
        """Every event, in order, until the client is closed."""
        while True:
            try:
                yield await self.recv_event()
            except ConnectionClosed:
                return

    # -- requests ----------------------------------------------------------------------------

    async def _request(
        self, cls: type[Request], *args: Any, wait: bool = True, timeout: float | None = None
    ) -> Reply:
        """Send a request and wait for its reply; raise for an error reply.

        With ``wait`` (the default for callers' requests) it first waits for a reconnection
        in progress to finish; the reconnection's own requests pass ``wait=False``. Either
        way it waits while the broker holds requests of its kind back (``rate_limited``).
        """
        timeout = self.timeout if timeout is None else timeout
        if wait and not self._connected.is_set() and not await self._wait_connected(timeout):
            raise RequestTimeout(_kind_of(cls, args), timeout)
        gate = self._gates.setdefault(_BUCKETS.get(cls) or _kind_of(cls, args), _Gate())
        async with gate.turn(self._closing) as alone:
            reply = await self._exchange(cls, args, timeout)
            gate.answered(reply, alone)
        if type(reply) is ErrorReply and reply.code is ErrorCode.NO_SESSION and wait:
            self._lose("the broker no longer knows this session")
            if cls in _READS and await self._wait_connected(timeout):
                return await self._request(cls, *args, wait=False, timeout=timeout)  # once, reconnected
        return raise_for_error(reply)

    async def _wait_connected(self, timeout: float) -> bool:
        """Wait until connected (True) or ``timeout`` passes (False); raise if closed meanwhile."""
        if self._closing.is_set():
            raise self.refused or ConnectionClosed("the client is closed")
        waiters = [asyncio.create_task(self._connected.wait()), asyncio.create_task(self._closing.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _cancel_and_wait(waiters)  # type: ignore[arg-type]
        if self._closing.is_set():
            raise self.refused or ConnectionClosed("the client was closed")
        return self._connected.is_set()

    async def _exchange(self, cls: type[Request], args: tuple[Any, ...], timeout: float) -> Reply:
        """Send one request and wait for its reply (error replies included)."""
        if self._dealer is None:
            raise ConnectionClosed("the client is not connected")
        out = self.core.request(cls, *args)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiters[out.rid] = future
        try:
            await self._dealer.send(out.frame)
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise RequestTimeout(out.kind, timeout) from None
        finally:
            self._waiters.pop(out.rid, None)

    async def _call_patiently(self, expect: type[R], cls: type[Request], *args: Any, wait: bool = True) -> R:
        """:meth:`_call`, resent (after the wait the broker asked for) while ``rate_limited``."""
        while True:
            try:
                return await self._call(expect, cls, *args, wait=wait)
            except RequestError as exc:
                if not rate_limited(exc):
                    raise
                log.info("the broker asks to slow down (%s); resending %s", exc, _kind_of(cls, args))

    async def _call(self, expect: type[R], cls: type[Request], *args: Any, wait: bool = True) -> R:
        """:meth:`_request`, checking that the reply is of type ``expect``."""
        reply = await self._request(cls, *args, wait=wait)
        if not isinstance(reply, expect):
            raise ProtocolError(
                ErrorCode.INVALID,
                f"expected a {expect.__name__} reply to {_kind_of(cls, args)!r}, got {reply.KIND.value!r}",
            )
        return reply

    async def _send(self, cls: type[Say | Dm], target: str, text: str, action: bool, cmid: str | None) -> Sent:
        """Send a say/dm until acknowledged, resending (flagged) after timeouts and reconnects.

        A caller-chosen ``cmid`` may be a resend from an earlier process, so even the first
        attempt is flagged ``retry``: the broker then also looks the cmid up in its store.
        A ``rate_limited`` refusal is resent after its ``retry_after`` (unless that passes the
        deadline); meanwhile :meth:`_request` holds back every other say and dm.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.send_timeout
        retry = cmid is not None
        cmid = cmid or self.core.new_cmid()
        while True:
            try:
                return await self._call(Sent, cls, target, text, action, cmid, retry)
            except (RequestTimeout, ConnectionClosed, RequestError) as exc:
                if rate_limited(exc) and self.state is not ClientState.CLOSED:
                    if self._gates["messages"].until > deadline:
                        raise
                    log.info("resending %s after: %s", cls.KIND.value, exc)
                    continue  # _request waits out the hold first
                if not worth_retrying(exc) or self.state is ClientState.CLOSED or loop.time() >= deadline:
                    raise
                log.info("resending %s after: %s", cls.KIND.value, exc)
                retry = True
                await self._probe()

    # -- subscriptions and delivery ----------------------------------------------------------

    async def _sync(self, timeout: float) -> int:
        """Ask for a sync marker behind every subscription sent so far; return its epoch."""
        assert self._sub is not None
        nonce, request = self.core.new_sync()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._syncs[nonce] = future
        self._sub.subscribe(request)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._syncs.pop(nonce, None)
            if self._sub is not None:
                self._sub.unsubscribe(request)

    async def _subscribe(self, topic: bytes) -> None:
        """Subscribe to ``topic`` and return once the broker has granted it.

        The broker answers a sync only when it could place every subscription before it;
        if its epoch moved since the last sync (it could not place some subscription in
        between) or no answer comes, the subscription is sent again.
        """
        assert self._sub is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        attempt = 0.25
        self._sub.subscribe(topic)
        while True:
            try:
                epoch = await self._sync(min(attempt, max(0.01, deadline - loop.time())))
                if epoch == self.core.sync_epoch or topic == self.core.topic:
                    self.core.sync_epoch = epoch  # the private topic proves itself: the sync came on it
                    return
                self.core.sync_epoch = epoch
            except TimeoutError:
                if loop.time() >= deadline:
                    raise RequestTimeout("subscribe", self.timeout) from None
                attempt *= 2
            self._sub.unsubscribe(topic)
            self._sub.subscribe(topic)

    async def _fill(self, key: str, *, at_least_once: bool = False, background: bool = False) -> None:
        """Fetch what the feed ``key`` misses, page by page, delivering as it comes.

        With ``at_least_once``, fetch after the feed's last seq even if nothing is known to
        be missing. A ``background`` fill pauses between pages while the application is
        behind; one a caller awaits (join) does not, since the caller cannot read meanwhile.
        """
        feed = self.core.feeds.get(key)
        room = None if key == DM else key
        while feed is not None and (after := feed.gap() if not at_least_once else feed.last) is not None:
            at_least_once = False
            # wait=False: a fill must not outlive a reconnection (its feed may be replaced
            # then, when the broker's history started over); the reconnect refills.
            page = await self._call_patiently(
                HistoryPage, History, room, room is None, None, after, self.core.max_page, wait=False
            )
            if self.core.feeds.get(key) is not feed:
                return  # the feed was reset meanwhile: this page answers an obsolete question
            self._deliver(self.core.accept_history(key, after, page))
            if background:
                await self._room_for_events.wait()
            if not page.more and feed.gap() == after:
                break  # nothing more to have (it may come with a later tick)

    def _schedule_fill(self, key: str) -> None:
        if key in self._fills or not self._connected.is_set():
            return

        async def fill() -> None:
            try:
                await self._fill(key, background=True)
            except (RequestTimeout, RequestError, ConnectionClosed) as exc:
                log.info("could not fetch missed messages of %s yet: %s", key, exc)
            finally:
                self._fills.pop(key, None)

        self._fills[key] = asyncio.create_task(fill(), name=f"zchat-fill-{key}")

    def _on_rekey(self, event: Event) -> None:
        """A private room moves to a new topic: start the move, after any move of it under way."""
        room = event.room
        if room is None or room not in self.core.rooms:
            return
        task = asyncio.create_task(self._rekey(event, self._rekeys.get(room)), name=f"zchat-rekey-{room}")
        self._rekeys[room] = task

        def done(finished: asyncio.Task[None]) -> None:
            if self._rekeys.get(room) is finished:
                del self._rekeys[room]

        task.add_done_callback(done)

    async def _rekey(self, event: Event, previous: asyncio.Task[None] | None) -> None:
        """Subscribe to the room's new topic, sync, drop the old one, then fill the gap.

        Messages published on the new topic before the subscription took effect come from
        history; the feed drops what arrives twice, so nothing is lost or repeated.
        """
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        move = self.core.rekey(event)
        if move is None or self._sub is None:
            return
        try:
            await self._subscribe(move.new)
        except RequestTimeout:
            self._lose(f"could not subscribe to the new topic of #{move.room}")  # a rejoin gets it
            return
        except ConnectionClosed:
            return
        if self._sub is None:
            return
        moved = self.core.rekeyed(move)
        if not moved:  # left (or removed) meanwhile
            self._sub.unsubscribe(move.new)
        self._sub.unsubscribe(move.old)
        if moved:
            try:
                await self._fill(move.room, at_least_once=True, background=True)
            except (RequestTimeout, RequestError, ConnectionClosed) as exc:
                log.info("could not fetch what #%s missed while moving: %s", move.room, exc)

    # -- connection --------------------------------------------------------------------------

    def _set_state(self, state: ClientState) -> None:
        if state is self.state:
            return
        self.state = state
        if state is ClientState.CONNECTED:
            self._connected.set()
        else:
            self._connected.clear()
        if self._on_state is not None:
            try:
                self._on_state(state)
            except Exception:  # the application's callback: log it, never let it stop us
                log.exception("on_state callback failed for %s", state.value)

    async def _open_session(self, nick: str) -> Welcome:
        self._open_sockets()
        welcome = await self._call(Welcome, Hello, nick, self.core.client_id, wait=False)
        self.core.sync_epoch = None
        await self._subscribe(welcome.topic.encode())
        return welcome

    def _open_sockets(self) -> None:
        dealer = self._ctx.socket(zmq.DEALER)
        sub = self._ctx.socket(zmq.SUB)
        for sock in (dealer, sub):
            sock.setsockopt(zmq.LINGER, 0)
            if self._curve is not None:
                server, pair = self._curve
                sock.setsockopt(zmq.CURVE_SERVERKEY, server.encode("ascii"))
                sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public.encode("ascii"))
                sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret.encode("ascii"))
        # Before connect(), so the monitor sees the first handshake.
        monitor = dealer.get_monitor_socket(_HANDSHAKE_EVENTS)
        dealer.connect(self.router)
        sub.connect(self.pub)
        self._dealer, self._sub = dealer, sub
        self._last_heard = asyncio.get_running_loop().time()
        self._io_tasks = [
            asyncio.create_task(self._read_replies(dealer), name="zchat-replies"),
            asyncio.create_task(self._read_events(sub), name="zchat-events"),
            asyncio.create_task(self._watch_handshake(dealer, monitor), name="zchat-handshake"),
        ]

    async def _watch_handshake(self, dealer: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> None:
        """Until the DEALER's first handshake succeeds: if it fails, fail the waiting requests.

        libzmq would retry a failed handshake for ever, and our hello would only time out;
        the monitor tells at once, and why.
        """
        try:
            while True:
                message = parse_monitor_message(await monitor.recv_multipart())
                if message["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    return
                error = self._handshake_error(message["event"], message["value"])
                log.warning("%s", error)
                for future in self._waiters.values():
                    if not future.done():
                        future.set_exception(error)
                return
        finally:
            if not dealer.closed:
                dealer.disable_monitor()
            monitor.close(linger=0)

    def _handshake_error(self, event: int, value: int) -> AuthenticationFailed:
        """The error for a failed handshake, naming its likely cause."""
        where = self.router
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            mine = f" {self._curve[1].public}" if self._curve is not None else ""
            return AuthenticationFailed(
                AuthFailure.KEY_REFUSED, where,
                f"the broker at {where} refused this client's key{mine} (status {value}): it is not among the "
                "broker's authorized keys; give the broker's operator your public .key file",
            )
        if self._curve is None:
            # A broker without CURVE accepts every plain handshake: this one wants security
            # (libzmq reports a mechanism mismatch, or at times only the dropped connection).
            why = ("it requires CURVE: give its public key (--server-key, ZCHAT_SERVER_KEY) and your secret "
                   "key (--key, ZCHAT_KEY)")
            return AuthenticationFailed(AuthFailure.MECHANISM_MISMATCH, where, f"the broker at {where}: {why}")
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            why = "it does not use CURVE: connect without --server-key and --key"
            return AuthenticationFailed(AuthFailure.MECHANISM_MISMATCH, where, f"the broker at {where}: {why}")
        # The broker dropped the handshake. A plain broker can do that too: when it closes
        # first, the TCP reset may discard its greeting before we read the mismatch.
        why = ("the server key given (--server-key) is most likely not this broker's public key "
               "(or the broker does not use CURVE)")
        return AuthenticationFailed(AuthFailure.HANDSHAKE_FAILED, where,
                                    f"the security handshake with {where} failed: {why}")

    async def _close_sockets(self) -> None:
        tasks, self._io_tasks = self._io_tasks, []
        await _cancel_and_wait(tasks)
        futures: list[asyncio.Future[Any]] = [*self._waiters.values(), *self._syncs.values()]
        for future in futures:
            if not future.done():
                future.set_exception(ConnectionClosed("the connection was closed"))
        for sock in (self._dealer, self._sub):
            if sock is not None:
                sock.close(linger=0)
        self._dealer = self._sub = None

    def _lose(self, why: str) -> None:
        """The broker stopped answering or forgot us: let the supervisor reconnect."""
        if self.state is ClientState.CONNECTED:
            log.warning("lost the broker (%s); reconnecting", why)
            self._lost.set()
            self._set_state(ClientState.RECONNECTING)

    async def _probe(self) -> None:
        """After a failed send: check the broker is there; wait out a reconnection."""
        if self.state is ClientState.CONNECTED:
            try:
                await self._request(Ping, wait=False)
            except (RequestTimeout, ConnectionClosed):
                self._lose("no answer to a ping")
            except RequestError:
                pass  # no_session already triggered the reconnection
        if self.state is ClientState.RECONNECTING:
            await self._wait_connected(self.send_timeout)

    async def _supervise(self) -> None:
        while True:
            await self._lost.wait()
            self._lost.clear()
            await self._reconnect()

    async def _reconnect(self) -> None:
        """New sockets, hello with the same identity, rejoin, resubscribe and backfill."""
        pending, self._fills, self._rekeys = [*self._fills.values(), *self._rekeys.values()], {}, {}
        await _cancel_and_wait(pending)
        for delay in backoff():
            await self._close_sockets()
            try:
                welcome = await self._open_session(self._wanted_nick)
                if self._away and not welcome.resumed:  # before the rejoins, which then say so
                    await self._away_again()
                for room in list(self.core.rooms):
                    await self._rejoin(room)
                self._set_state(ClientState.CONNECTED)
                log.info("reconnected as %s", self.core.nick)
                for key in list(self.core.feeds):
                    self._schedule_fill(key)
                return
            except RequestError as exc:
                if exc.code is ErrorCode.NICK_TAKEN:  # taken while we were away, as IRC clients do
                    self._wanted_nick = self._wanted_nick[:31] + "_"
                log.info("reconnection refused (%s); next try in %.1f s", exc, delay)
            except AuthenticationFailed as exc:
                if exc.failure is AuthFailure.KEY_REFUSED:
                    # Our key was removed from the broker's authorized keys: trying again
                    # cannot help. Calls waiting for the reconnection raise this instead.
                    log.error("not reconnecting: %s", exc)
                    self.refused = exc
                    self._closing.set()
                    self._events.put_nowait(None)  # events() ends
                    return
                log.info("reconnection failed (%s); next try in %.1f s", exc, delay)
            except (RequestTimeout, ConnectionClosed) as exc:
                log.info("reconnection failed (%s); next try in %.1f s", exc, delay)
            await asyncio.sleep(delay)

    async def _away_again(self) -> None:
        """Mark a new session away as the last one was; a broker that refuses the text now
        (its limits changed, or it has no ``away``) leaves us here, and we stop asking."""
        try:
            await self._call_patiently(AwayChanged, Away, self._away, wait=False)
        except (RequestError, ProtocolError) as exc:
            log.warning("could not mark the new session away again: %s", exc)
            self._away = ""

    async def _rejoin(self, room: str) -> None:
        """Join ``room`` again after a reconnection, as private as it was; drop it if we may not.

        A room we asked to be private is joined with ``private`` (so a broker that lost it
        makes it private again). A private room we were only invited to that comes back
        public was lost by the broker: we leave the public one rather than talk in it.
        """
        was_private = room in self.core.private
        try:
            joined = await self._join(room, room in self.core.keep_private, rejoin=True)
        except RequestError as exc:
            if exc.code not in _GONE:
                raise
            return self._drop_room(room, f"could not rejoin: {exc.reason}")
        if joined.room not in self.core.rooms:
            return None  # removed meanwhile: the kick or ban is delivered
        if was_private and not joined.private:
            await self._call(Left, Leave, room, wait=False)
            return self._drop_room(room, "the private room is gone from the broker")
        await self._subscribe(joined.topic.encode())
        self._deliver(self.core.open_feed(joined.room, joined.seq, 0))

    def _drop_room(self, room: str, why: str) -> None:
        """Forget ``room`` and tell the application with a ``leave`` event of this session."""
        log.warning("no longer in #%s: %s", room, why)
        self.core.drop_room(room)
        self._deliver([Event(EventKind.LEAVE, room, self.core.nick or "", why, time.time(), 0)])

    async def _heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            interval = self.core.heartbeat
            await asyncio.sleep(max(0.05, self._last_heard + interval - loop.time()))
            if self.state is not ClientState.CONNECTED or loop.time() - self._last_heard < interval:
                continue
            try:
                await self._request(Ping, wait=False)
            except (RequestTimeout, ConnectionClosed):
                self._lose("no answer to a ping")
            except RequestError as exc:  # no_session: the broker forgot us (it restarted?)
                self._lose(exc.reason)

    async def _read_replies(self, dealer: zmq.asyncio.Socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            frame = await dealer.recv()
            self._last_heard = loop.time()
            try:
                reply = self.core.receive_reply(frame)
            except ProtocolError as exc:
                log.warning("ignoring a malformed reply from the broker: %s", exc)
                continue
            future = self._waiters.pop(reply.rid, None) if reply.rid is not None else None
            if future is not None and not future.done():
                future.set_result(reply)
            elif type(reply) is ErrorReply and reply.rid is None:
                log.warning("the broker could not read a request: %s", reply.reason)

    def _deliver(self, events: list[Event]) -> None:
        """Queue events for the application, all at once (so batches never interleave)."""
        for event in events:
            self._events.put_nowait(event)
        if self._events.qsize() >= self._max_queued:
            self._room_for_events.clear()

    async def _read_events(self, sub: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sub.recv_multipart()
            try:
                event = self.core.receive_event(frames)
            except ProtocolError as exc:
                log.warning("ignoring a malformed publication: %s", exc)
                continue
            if event.kind is EventKind.SYNC:
                future = self._syncs.pop(event.text, None)
                if future is not None and not future.done():
                    future.set_result(event.seq or 0)
                continue
            if event.kind is EventKind.GOAWAY:  # the broker is stopping: reconnect (to its successor)
                self._lose(event.text or "the broker is going away")
                continue
            ours = event.kind is EventKind.REKEY or (event.kind in REMOVALS and self.core.is_me(event.nick))
            if ours and self._note_for_join(event):
                continue  # it follows a joined reply not read yet: _join applies it
            if event.kind is EventKind.REKEY:
                self._on_rekey(event)
                continue
            if not self._room_for_events.is_set() and event.seq is not None and event.kind in STORED_KINDS:
                # The application is behind: drop it here rather than stop reading (sync
                # markers and goaway must still get through); a tick reveals the gap and a
                # background fill fetches it once there is room again.
                continue
            topic = self.core.rooms.get(event.room) if event.room is not None else None
            self._deliver(self.core.accept(event))
            if topic is not None and event.room not in self.core.rooms:
                sub.unsubscribe(topic)  # removed from the room (kick, ban): nothing more of it
            key = DM if event.room is None else event.room
            feed = self.core.feeds.get(key)
            if feed is not None and feed.gap() is not None:
                self._schedule_fill(key)
