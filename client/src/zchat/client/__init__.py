"""The zchat client library: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Both share method names: ``connect``, ``join``, ``leave``, ``say``, ``dm``, ``who``,
``rooms``, ``nick``, ``ping``, ``recv_event``, ``events`` and ``close``. :class:`Bot` builds
bots on :class:`AsyncClient` with decorators (see BOTS.md).
"""

from zchat.common import ConnectionClosed, Event, EventKind, RequestError, RequestTimeout

from .aio import AsyncClient, ClientState
from .bot import Bot, BotError, Context, UsageError
from .sync import Client

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
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
