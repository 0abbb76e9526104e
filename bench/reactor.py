"""The load generators' event loop: epoll over ZeroMQ sockets' ``ZMQ_FD``, and driver commands.

A load-generator process may hold thousands of sockets (the scale case), where
``zmq.Poller`` would rebuild and scan its whole item list on every call. ``ZMQ_FD`` is
edge-triggered and only says "look at ``ZMQ_EVENTS``", so: a handler drains its socket
until ``EAGAIN`` (or a batch limit, after which the socket stays on the pending list, so
that sockets take turns), and after sending on a socket the caller calls :meth:`check`,
because a send may consume the edge of a message that arrived meanwhile. :meth:`sweep`
looks at every socket once in a while in case an edge was missed all the same.

The driver talks to a load generator through its stdin, one JSON object a line:
:class:`Control` reads them without blocking, as one more source of the same loop.
"""

from __future__ import annotations

import json
import os
import selectors
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import zmq

#: A handler reads a socket until EAGAIN or its batch limit; True means "more to read".
Handler = Callable[["zmq.Socket[bytes]"], bool]


def _readable(sock: zmq.Socket[bytes]) -> bool:
    return bool(cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


class Reactor:
    """Readiness of many ZeroMQ sockets (and plain file descriptors) through one epoll."""

    def __init__(self) -> None:
        self._selector = selectors.EpollSelector()
        self._handlers: dict[zmq.Socket[bytes], Handler] = {}
        self._pending: dict[zmq.Socket[bytes], Handler] = {}

    def add(self, sock: zmq.Socket[bytes], handler: Handler) -> None:
        self._handlers[sock] = handler
        self._selector.register(sock, selectors.EVENT_READ, sock)  # its fileno() is ZMQ_FD
        self.check(sock)

    def add_fd(self, fd: int, callback: Callable[[], None]) -> None:
        self._selector.register(fd, selectors.EVENT_READ, callback)

    def check(self, sock: zmq.Socket[bytes]) -> None:
        """Call after sending on ``sock``: queue it if a message is waiting."""
        if _readable(sock):
            self._pending[sock] = self._handlers[sock]

    def sweep(self) -> None:
        """Look at every socket (cheap once a second; catches a missed edge)."""
        for sock in self._handlers:
            self.check(sock)

    def poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for readiness; run the handlers of what is ready."""
        for key, _ in self._selector.select(0 if self._pending else max(0.0, timeout)):
            if isinstance(key.data, zmq.Socket):
                self._pending[key.data] = self._handlers[key.data]
            else:
                key.data()
        pending, self._pending = self._pending, {}
        for sock, handler in pending.items():
            if _readable(sock) and handler(sock):
                self._pending[sock] = handler

    def close(self) -> None:
        self._selector.close()


class Control:
    """Commands from the driver: JSON lines on stdin, read without blocking."""

    def __init__(self, reactor: Reactor) -> None:
        self._buffer = b""
        self.messages: deque[dict[str, Any]] = deque()
        os.set_blocking(0, False)
        reactor.add_fd(0, self._read)

    def _read(self) -> None:
        try:
            data = os.read(0, 65536)
        except BlockingIOError:
            return
        if not data:
            raise SystemExit("the driver went away")
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        self.messages.extend(json.loads(line) for line in lines if line.strip())

    def take(self, command: str) -> dict[str, Any] | None:
        """The first waiting message that carries ``command``, if any."""
        for message in self.messages:
            if command in message:
                self.messages.remove(message)
                return message
        return None

    def wait(self, reactor: Reactor, command: str, deadline: float) -> dict[str, Any]:
        """Run the loop until ``command`` arrives; SystemExit at ``deadline``."""
        while (message := self.take(command)) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SystemExit(f"no {command!r} from the driver in time")
            reactor.poll(min(left, 0.5))
        return message


def emit(**fields: Any) -> None:
    """One JSON line to the driver."""
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()
