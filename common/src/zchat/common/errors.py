"""zchat's one exception tree.

::

    ZchatError
     ├── ProtocolError        the peer sent something we cannot accept (carries an ErrorCode)
     ├── ConfigError          an option has a value we cannot start with (names the option)
     ├── KeyFileError         a CURVE key file is missing, malformed or readable by others
     └── ClientError          raised by the client library to its caller
          ├── RequestError     the broker answered a request with an error reply
          ├── RequestTimeout   no reply came in time
          └── ConnectionClosed the client is closed, or closed while waiting
               └── AuthenticationFailed  the CURVE handshake failed (key refused, wrong server key)

``ProtocolError`` is the peer's fault and is raised by the codec only; the broker turns it
into an ``error`` reply. ``RequestError`` is the same wire error seen from the client side.
Everything else that escapes is our fault (a bug) and is deliberately not caught broadly.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from .codes import ErrorCode


class ZchatError(Exception):
    """Base class of every exception zchat raises on purpose."""


class ProtocolError(ZchatError):
    """A frame or envelope broke the wire protocol.

    Attributes:
        code: the wire error code to answer with.
        reason: a human-readable explanation, safe to send back to the peer.
        rid: the request id, when it could be read from the offending request.
        field: the envelope field at fault, when there is one.
    """

    def __init__(
        self,
        code: ErrorCode,
        reason: str,
        *,
        rid: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(f"{code.value}: {reason}")
        self.code = code
        self.reason = reason
        self.rid = rid
        self.field = field


class ConfigError(ZchatError):
    """A configuration value is invalid; raised at start, naming the option."""

    def __init__(self, option: str, value: object, reason: str) -> None:
        super().__init__(f"invalid value for {option}: {value!r} ({reason})")
        self.option = option
        self.value = value
        self.reason = reason


class KeyFileError(ZchatError):
    """A CURVE key file or directory cannot be used; raised at start (or on reload).

    Attributes:
        path: the file or directory at fault.
        reason: what is wrong with it, and where it helps, the fix.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ClientError(ZchatError):
    """Base class of the errors the client library raises to its caller."""


class RequestError(ClientError):
    """The broker refused a request.

    Attributes:
        code: the broker's error code.
        reason: the broker's explanation.
        retry_after: seconds to wait before trying again, for retryable errors.
    """

    def __init__(self, code: ErrorCode, reason: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code.value}: {reason}")
        self.code = code
        self.reason = reason
        self.retry_after = retry_after


class RequestTimeout(ClientError):
    """No reply arrived within the request timeout."""

    def __init__(self, kind: str, timeout: float) -> None:
        super().__init__(f"no reply to {kind!r} within {timeout:g} s")
        self.kind = kind
        self.timeout = timeout


class ConnectionClosed(ClientError):
    """The client was closed (by the caller or by the broker) before the call completed."""


class AuthFailure(Enum):
    """Why a CURVE handshake failed, as the client's socket monitor reports it."""

    #: The broker's ZAP handler refused our public key (not in its authorized keys).
    KEY_REFUSED = "key_refused"
    #: The broker dropped the handshake: most likely it is not the server whose public key
    #: we were given (or its ZAP handler is missing).
    HANDSHAKE_FAILED = "handshake_failed"
    #: The broker speaks another security mechanism: CURVE on one side, none on the other.
    MECHANISM_MISMATCH = "mechanism_mismatch"


class AuthenticationFailed(ConnectionClosed):
    """The broker closed the connection during the security handshake.

    Attributes:
        failure: what kind of failure the socket monitor saw.
        endpoint: the broker endpoint the handshake was with.
    """

    def __init__(self, failure: AuthFailure, endpoint: str, message: str) -> None:
        super().__init__(message)
        self.failure = failure
        self.endpoint = endpoint
