"""The zchat client library: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Both share method names: ``connect``, ``join``, ``leave``, ``say``, ``dm``, ``who``,
``rooms``, ``nick``, ``ping``, ``recv_event``, ``events`` and ``close``.
"""

from zchat.common import ConnectionClosed, Event, EventKind, RequestError, RequestTimeout

from .aio import AsyncClient, ClientState
from .sync import Client

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "ClientState",
    "ConnectionClosed",
    "Event",
    "EventKind",
    "RequestError",
    "RequestTimeout",
    "__version__",
]
