"""zchat's one exception tree.

::

    ZchatError
     ├── ProtocolError        the peer sent something we cannot accept (carries an ErrorCode)
     ├── ConfigError          an option has a value we cannot start with (names the option)
     └── ClientError          raised by the client library to its caller
          ├── RequestError     the broker answered a request with an error reply
          ├── RequestTimeout   no reply came in time
          └── ConnectionClosed the client is closed, or closed while waiting

``ProtocolError`` is the peer's fault and is raised by the codec only; the broker turns it
into an ``error`` reply. ``RequestError`` is the same wire error seen from the client side.
Everything else that escapes is our fault (a bug) and is deliberately not caught broadly.
"""

from __future__ import annotations

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
