"""``AsyncClient``: the asyncio front end of the client core.

One DEALER carries requests and their replies; one SUB receives the session's private topic
and the topics of its rooms. Two reader tasks hand what arrives to the core; a heartbeat task
pings when the client has been idle for the broker's heartbeat interval, so that a session
lives as long as its process does.

Every request method waits for the broker's reply and raises
:class:`~zchat.common.errors.RequestError` for an error reply,
:class:`~zchat.common.errors.RequestTimeout` when none comes within ``timeout`` seconds.
``join`` and ``connect`` return only once the new subscription is in force, so nothing
published after they return is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from enum import Enum
from types import TracebackType
from typing import Any, TypeVar

import zmq
import zmq.asyncio

from zchat.common.codes import ErrorCode, EventKind
from zchat.common.config import DEFAULT_PUB, DEFAULT_ROUTER
from zchat.common.errors import ConnectionClosed, ProtocolError, RequestError, RequestTimeout
from zchat.common.protocol import (
    Bye,
    Dm,
    ErrorReply,
    Event,
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

from .core import ClientCore, raise_for_error

log = logging.getLogger("zchat.client")

R = TypeVar("R")


class ClientState(Enum):
    """Where a client is in its life."""

    DISCONNECTED = "disconnected"  # not connected yet
    CONNECTED = "connected"
    LOST = "lost"  # the broker stopped answering, or forgot the session
    CLOSED = "closed"


class AsyncClient:
    """A zchat client for asyncio programs.

    Args:
        router: the broker's ROUTER endpoint.
        pub: the broker's XPUB endpoint.
        timeout: seconds to wait for each reply.
        max_queued_events: events held for :meth:`recv_event` before reading pauses (the
            broker then drops for this client, never for others).
        context: a ``zmq.asyncio.Context`` to share; by default the client owns one.
    """

    def __init__(
        self,
        router: str = DEFAULT_ROUTER,
        pub: str = DEFAULT_PUB,
        *,
        timeout: float = 5.0,
        max_queued_events: int = 10_000,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.router, self.pub, self.timeout = router, pub, timeout
        self.core = ClientCore()
        self.state = ClientState.DISCONNECTED
        self._own_context = context is None
        self._ctx = context or zmq.asyncio.Context()
        self._dealer: zmq.asyncio.Socket | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._waiters: dict[int, asyncio.Future[Reply]] = {}
        self._syncs: dict[str, asyncio.Future[None]] = {}
        self._events: asyncio.Queue[Event | None] = asyncio.Queue(max_queued_events)
        self._tasks: list[asyncio.Task[None]] = []
        self._last_sent = 0.0

    # -- session -----------------------------------------------------------------------------

    @property
    def current_nick(self) -> str | None:
        """This session's nick, or None before :meth:`connect`."""
        return self.core.nick

    @property
    def joined(self) -> list[str]:
        """The rooms this session is in."""
        return list(self.core.rooms)

    async def connect(self, nick: str) -> Welcome:
        """Open the sockets and a session called ``nick``; return the broker's welcome."""
        if self.state is not ClientState.DISCONNECTED:
            raise RuntimeError(f"connect() on a client that is {self.state.value}")
        self._open_sockets()
        try:
            welcome = await self._call(Welcome, Hello, nick)
            await self._subscribe(welcome.topic.encode())
        except BaseException:
            await self._close_sockets()  # back to DISCONNECTED: connect() may be tried again
            raise
        self.state = ClientState.CONNECTED
        self._tasks.append(asyncio.create_task(self._heartbeat(), name="zchat-heartbeat"))
        return welcome

    async def join(self, room: str) -> Joined:
        """Join ``room``; return once its events are being received."""
        joined = await self._call(Joined, Join, room)
        await self._subscribe(joined.topic.encode())
        return joined

    async def leave(self, room: str) -> None:
        """Leave ``room`` and stop receiving its events."""
        topics = dict(self.core.rooms)
        left = await self._call(Left, Leave, room)
        topic = topics.get(left.room)
        if topic is not None and self._sub is not None:
            self._sub.unsubscribe(topic)

    async def say(self, room: str, text: str, *, action: bool = False) -> Sent:
        """Send ``text`` to ``room`` (a ``/me`` action if ``action``); return its id and time."""
        return await self._call(Sent, Say, room, text, action)

    async def dm(self, nick: str, text: str, *, action: bool = False) -> Sent:
        """Send ``text`` privately to ``nick``."""
        return await self._call(Sent, Dm, nick, text, action)

    async def who(self, room: str) -> list[str]:
        """The nicks of ``room``'s members."""
        return list((await self._call(Members, Who, room)).members)

    async def rooms(self) -> list[RoomInfo]:
        """Every room on the broker with its member count."""
        return list((await self._call(RoomList, Rooms)).rooms)

    async def nick(self, new_nick: str) -> str:
        """Change this session's nick; return it as the broker has it."""
        return (await self._call(NickChanged, Nick, new_nick)).nick

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
        if self.state is ClientState.CONNECTED:
            with contextlib.suppress(RequestTimeout, ConnectionClosed, ProtocolError):
                await self._request(Bye)
        await self._shutdown()

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
        if event is None:
            self._events.put_nowait(None)  # leave the end marker for the next reader
            raise ConnectionClosed("the client is closed")
        return event

    async def events(self) -> AsyncIterator[Event]:
        """Every event, in arrival order, until the client is closed."""
        while True:
            try:
                yield await self.recv_event()
            except ConnectionClosed:
                return

    # -- internals ---------------------------------------------------------------------------

    def _open_sockets(self) -> None:
        dealer = self._ctx.socket(zmq.DEALER)
        sub = self._ctx.socket(zmq.SUB)
        for sock in (dealer, sub):
            sock.setsockopt(zmq.LINGER, 0)
            if sock is dealer:
                sock.connect(self.router)
            else:
                sock.connect(self.pub)
        self._dealer, self._sub = dealer, sub
        self._tasks = [
            asyncio.create_task(self._read_replies(dealer), name="zchat-replies"),
            asyncio.create_task(self._read_events(sub), name="zchat-events"),
        ]

    async def _request(self, cls: type[Request], *args: Any) -> Reply:
        """Send a request and wait for its reply; raise for an error reply."""
        if self._dealer is None or self.state is ClientState.CLOSED:
            raise ConnectionClosed("the client is not connected")
        out = self.core.request(cls, *args)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self._waiters[out.rid] = future
        self._last_sent = loop.time()
        try:
            await self._dealer.send(out.frame)
            reply = await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            raise RequestTimeout(out.kind, self.timeout) from None
        finally:
            self._waiters.pop(out.rid, None)
        return raise_for_error(reply)

    async def _call(self, expect: type[R], cls: type[Request], *args: Any) -> R:
        """:meth:`_request`, checking that the reply is of type ``expect``."""
        reply = await self._request(cls, *args)
        if not isinstance(reply, expect):
            raise ProtocolError(
                ErrorCode.INVALID, f"expected a {expect.__name__} reply to {cls.KIND.value!r}, got {reply.KIND.value!r}"
            )
        return reply

    async def _subscribe(self, topic: bytes) -> None:
        """Subscribe to ``topic`` and wait until the broker has granted it."""
        assert self._sub is not None
        self._sub.subscribe(topic)
        nonce, request = self.core.new_sync()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._syncs[nonce] = future
        self._sub.subscribe(request)
        try:
            await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            raise RequestTimeout("subscribe", self.timeout) from None
        finally:
            self._syncs.pop(nonce, None)
            self._sub.unsubscribe(request)

    async def _read_replies(self, dealer: zmq.asyncio.Socket) -> None:
        while True:
            frame = await dealer.recv()
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
                    future.set_result(None)
                continue
            await self._events.put(event)

    async def _heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            interval = self.core.heartbeat
            await asyncio.sleep(max(0.05, self._last_sent + interval - loop.time()))
            if loop.time() - self._last_sent < interval:
                continue
            try:
                await self._call(Pong, Ping)
            except (RequestTimeout, ProtocolError) as exc:
                log.warning("lost the broker: %s", exc)
                self.state = ClientState.LOST
                return
            except RequestError as exc:  # no_session: the broker no longer knows this session
                log.warning("the broker ended this session: %s", exc)
                self.state = ClientState.LOST
                return

    async def _close_sockets(self) -> None:
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current]
        self._tasks = []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        futures: list[asyncio.Future[Any]] = [*self._waiters.values(), *self._syncs.values()]
        for future in futures:
            if not future.done():
                future.set_exception(ConnectionClosed("the client was closed"))
        for sock in (self._dealer, self._sub):
            if sock is not None:
                sock.close(linger=0)
        self._dealer = self._sub = None

    async def _shutdown(self) -> None:
        await self._close_sockets()
        self.state = ClientState.CLOSED
        if self._events.full():
            self._events.get_nowait()
        self._events.put_nowait(None)  # wakes every reader of events()
        if self._own_context:
            self._ctx.term()
