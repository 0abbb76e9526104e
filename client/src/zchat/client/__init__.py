"""The zchat client library: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Both share method names: ``connect``, ``join``, ``leave``, ``say``, ``dm``, ``who``,
``members``, ``rooms``, ``nick``, ``ping``, ``history``, ``recv_event``, ``events`` and
``close``, and for private rooms ``invite``, ``kick``, ``ban``, ``unban``, ``op``, ``deop``
and ``topic``. :class:`Bot` builds
bots on :class:`AsyncClient` with decorators (see BOTS.md).
"""

from zchat.common import AuthenticationFailed, ConnectionClosed, Event, EventKind, RequestError, RequestTimeout

from .aio import AsyncClient, ClientState
from .bot import Bot, BotError, Context, UsageError
from .sync import Client

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AuthenticationFailed",
    "Bot",
    "BotError",
    "Client",
    "ClientState",
    "ConnectionClosed",
    "Context",
    "Event",
    "EventKind",
    "RequestError",
    "RequestTimeout",
    "UsageError",
    "__version__",
]
