"""zchat's wire protocol, shared by the broker and the client.

Import the pieces from their modules (``zchat.common.protocol``, ``.codec``, ``.names``,
``.topics``, ``.errors``, ``.limits``, ``.config``); the most used are re-exported here.
"""

from .codes import ErrorCode, EventKind, ReplyKind, RequestKind
from .errors import (
    AuthenticationFailed,
    ClientError,
    ConfigError,
    ConnectionClosed,
    KeyFileError,
    ProtocolError,
    RequestError,
    RequestTimeout,
    ZchatError,
)
from .limits import DEFAULT_LIMITS, Limits
from .protocol import PROTOCOL_VERSION, Event

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LIMITS",
    "PROTOCOL_VERSION",
    "AuthenticationFailed",
    "ClientError",
    "ConfigError",
    "ConnectionClosed",
    "ErrorCode",
    "Event",
    "EventKind",
    "KeyFileError",
    "Limits",
    "ProtocolError",
    "ReplyKind",
    "RequestError",
    "RequestKind",
    "RequestTimeout",
    "ZchatError",
    "__version__",
]
