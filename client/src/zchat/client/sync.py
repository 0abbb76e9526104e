"""``Client``: the blocking front end, for scripts, bots and tests.

It runs an :class:`~zchat.client.aio.AsyncClient` on an event loop in a private thread, so
heartbeats keep the session alive while the caller's code does other things, and it offers
the same methods under the same names, blocking until each completes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from zchat.common.config import DEFAULT_PUB, DEFAULT_ROUTER
from zchat.common.errors import ConnectionClosed
from zchat.common.keys import KeyPair
from zchat.common.protocol import Event, Joined, Members, Moderated, RoomInfo, Sent, Welcome

from .aio import AsyncClient, ClientState, curve_keys

T = TypeVar("T")


class Client:
    """A blocking zchat client; see :class:`~zchat.client.aio.AsyncClient` for the arguments."""

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
        server_key: str | Path | None = None,
        key: str | Path | KeyPair | None = None,
    ) -> None:
        curve = curve_keys(server_key, key)  # before the thread starts: bad keys raise here
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="zchat-client", daemon=True)
        self._thread.start()

        async def make() -> AsyncClient:
            return AsyncClient(
                router,
                pub,
                timeout=timeout,
                history=history,
                send_timeout=send_timeout,
                client_id=client_id,
                on_state=on_state,
                max_queued_events=max_queued_events,
                server_key=curve[0] if curve is not None else None,
                key=curve[1] if curve is not None else None,
            )

        self._client = self._run(make())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coro.close()
            raise ConnectionClosed("the client is closed")
        if threading.current_thread() is self._thread:
            coro.close()  # e.g. from an on_state callback: waiting here would wait on ourselves
            raise RuntimeError("a blocking Client method was called from the client's own thread")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C in the caller: the call must not go on and eat an event
            raise

    @property
    def state(self) -> ClientState:
        return self._client.state

    @property
    def current_nick(self) -> str | None:
        return self._client.current_nick

    @property
    def away_text(self) -> str:
        return self._client.away_text

    @property
    def joined(self) -> list[str]:
        return self._client.joined

    @property
    def client_id(self) -> str:
        return self._client.client_id

    def connect(self, nick: str) -> Welcome:
        return self._run(self._client.connect(nick))

    def join(self, room: str, *, private: bool = False, history: int | None = None) -> Joined:
        return self._run(self._client.join(room, private=private, history=history))

    def leave(self, room: str) -> None:
        self._run(self._client.leave(room))

    def say(self, room: str, text: str, *, action: bool = False, cmid: str | None = None) -> Sent:
        return self._run(self._client.say(room, text, action=action, cmid=cmid))

    def dm(self, nick: str, text: str, *, action: bool = False, cmid: str | None = None) -> Sent:
        return self._run(self._client.dm(nick, text, action=action, cmid=cmid))

    def history(
        self, room: str | None = None, *, before: int | None = None, after: int | None = None, limit: int = 50
    ) -> list[Event]:
        return self._run(self._client.history(room, before=before, after=after, limit=limit))

    def who(self, room: str) -> list[str]:
        return self._run(self._client.who(room))

    def members(self, room: str) -> Members:
        return self._run(self._client.members(room))

    def invite(self, room: str, nick: str) -> Moderated:
        return self._run(self._client.invite(room, nick))

    def kick(self, room: str, nick: str, reason: str = "") -> Moderated:
        return self._run(self._client.kick(room, nick, reason))

    def ban(self, room: str, nick: str, reason: str = "") -> Moderated:
        return self._run(self._client.ban(room, nick, reason))

    def unban(self, room: str, nick: str) -> Moderated:
        return self._run(self._client.unban(room, nick))

    def op(self, room: str, nick: str) -> Moderated:
        return self._run(self._client.op(room, nick))

    def deop(self, room: str, nick: str) -> Moderated:
        return self._run(self._client.deop(room, nick))

    def topic(self, room: str, text: str) -> Moderated:
        return self._run(self._client.topic(room, text))

    def rooms(self) -> list[RoomInfo]:
        return self._run(self._client.rooms())

    def nick(self, new_nick: str) -> str:
        return self._run(self._client.nick(new_nick))

    def away(self, text: str = "") -> str:
        return self._run(self._client.away(text))

    def ping(self) -> float:
        return self._run(self._client.ping())

    def recv_event(self, timeout: float | None = None) -> Event:
        """The next event; raises TimeoutError after ``timeout`` s, ConnectionClosed once closed."""
        return self._run(self._client.recv_event(timeout))

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Every event until the client closes, or until ``timeout`` s pass with none."""
        while True:
            try:
                yield self.recv_event(timeout)
            except (TimeoutError, ConnectionClosed):
                return

    def close(self) -> None:
        """Say bye, close the sockets and stop the client's thread. Safe to call twice."""
        if self._loop.is_closed():
            return
        if threading.current_thread() is self._thread:
            raise RuntimeError("Client.close() was called from the client's own thread (an on_state callback?)")
        try:
            self._run(self._client.close())
            self._run(self._cancel_leftovers())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    @staticmethod
    async def _cancel_leftovers() -> None:
        """End calls other threads still wait on, so their callers get an error, not a hang."""
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
