"""The client's sans-I/O core: request ids, session state and decoding.

Front ends (:class:`~zchat.client.aio.AsyncClient`, :class:`~zchat.client.sync.Client`) ask
the core for a request frame, send it, and hand back whatever their sockets receive; the
core decodes, keeps the session's state (nick, private topic, rooms and their topics) and
tells them which topics to subscribe to. It opens no socket.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass
from typing import Any

from zchat.common.codec import decode_event, decode_reply, encode
from zchat.common.codes import ErrorCode
from zchat.common.errors import ProtocolError, RequestError
from zchat.common.protocol import (
    ErrorReply,
    Event,
    Goodbye,
    Joined,
    Left,
    NickChanged,
    Reply,
    Request,
    Welcome,
)
from zchat.common.topics import sync_subscription


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A request ready to send: its id, its frame, and its kind for messages."""

    rid: int
    frame: bytes
    kind: str


class ClientCore:
    """State of one client session, independent of any socket.

    Attributes:
        nick: the session's nick once welcomed, else None.
        topic: the session's private topic once welcomed, else None.
        rooms: room name -> room topic, for every room joined.
        heartbeat: how often to ping when idle (from the welcome).
        motd: the broker's message of the day.
    """

    def __init__(self) -> None:
        self._rids = itertools.count(1)
        self.nick: str | None = None
        self.topic: bytes | None = None
        self.rooms: dict[str, bytes] = {}
        self.heartbeat = 5.0
        self.session_timeout = 15.0
        self.motd = ""

    def request(self, cls: type[Request], *args: Any) -> Outgoing:
        """Build and encode a request of type ``cls`` with a fresh request id."""
        rid = next(self._rids)
        return Outgoing(rid, encode(cls(rid, *args)), cls.KIND.value)

    def receive_reply(self, frame: bytes) -> Reply:
        """Decode a reply frame and apply it to the session state.

        Raises:
            ProtocolError: the frame is not a valid reply.
        """
        reply = decode_reply(frame)
        if type(reply) is Welcome:
            self.nick, self.topic = reply.nick, reply.topic.encode()
            self.heartbeat, self.session_timeout, self.motd = reply.heartbeat, reply.timeout, reply.motd
        elif type(reply) is Joined:
            self.rooms[reply.room] = reply.topic.encode()
        elif type(reply) is Left:
            self.rooms.pop(reply.room, None)
        elif type(reply) is NickChanged:
            self.nick = reply.nick
        elif type(reply) is Goodbye:
            self.reset()
        return reply

    def receive_event(self, frames: list[bytes]) -> Event:
        """Decode a publication (topic frame, envelope frame).

        Raises:
            ProtocolError: the publication is malformed.
        """
        if len(frames) != 2:
            raise ProtocolError(ErrorCode.BAD_FRAMES, f"a publication is 2 frames, not {len(frames)}")
        return decode_event(frames[1])

    def new_sync(self) -> tuple[str, bytes]:
        """A fresh nonce and the subscription that asks the broker to echo it.

        Subscribe to the returned bytes after other subscriptions; when a ``sync`` event with
        this nonce arrives on the private topic, those subscriptions are in force.
        """
        if self.topic is None:
            raise RuntimeError("sync needs a session: connect first")
        nonce = secrets.token_hex(8)
        return nonce, sync_subscription(self.topic, nonce)

    def reset(self) -> None:
        """Forget the session (after bye, or when the broker has forgotten it)."""
        self.nick = None
        self.topic = None
        self.rooms.clear()


def raise_for_error(reply: Reply) -> Reply:
    """Return ``reply``, or raise :class:`RequestError` if it is an error reply."""
    if type(reply) is ErrorReply:
        raise RequestError(reply.code, reply.reason, reply.retry_after)
    return reply
