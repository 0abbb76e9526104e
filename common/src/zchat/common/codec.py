"""The one codec: protocol objects <-> msgpack frames. The only module that imports msgpack.

Every decode function either returns a fully checked protocol object or raises
:class:`~zchat.common.errors.ProtocolError`; no other exception escapes for any input bytes
(the property tests hold it to that).
"""

from __future__ import annotations

from typing import Any

import msgpack

from .codes import ErrorCode, EventKind
from .errors import ProtocolError
from .limits import DEFAULT_LIMITS, Limits
from .protocol import (
    MAX_RID,
    PROTOCOL_VERSION,
    REPLY_TYPES,
    REQUEST_TYPES,
    Event,
    Reply,
    Request,
)

# What msgpack raises on bad input: ValueError covers ExtraData, FormatError, StackError,
# UnicodeDecodeError and the max_*_len checks; UnpackException covers OutOfData.
_UNPACK_ERRORS = (ValueError, msgpack.UnpackException)


def _unpack_map(data: bytes, max_size: int) -> dict[str, Any]:
    if len(data) > max_size:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"frame of {len(data)} bytes is over the {max_size}-byte limit")
    try:
        # The max_*_len limits default to len(data), so no declared length can make
        # msgpack allocate more than the frame could hold.
        # msgpack >= 1.0 defaults: raw=False (str is UTF-8, checked), strict_map_key=True.
        obj = msgpack.unpackb(data)
    except _UNPACK_ERRORS as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"not a msgpack value: {exc}") from None
    if type(obj) is not dict:
        raise ProtocolError(ErrorCode.MALFORMED, "envelope must be a msgpack map")
    for key in obj:  # strict_map_key lets bytes keys through; envelopes have str keys only
        if type(key) is not str:
            raise ProtocolError(ErrorCode.MALFORMED, "envelope keys must be strings")
    return obj


def _bad_rid() -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID, "'rid' must be an integer from 0 to 2**63-1", field="rid")


def _read_rid(m: dict[str, Any], required: bool) -> int | None:
    rid = m.get("rid")
    if rid is None and not required:
        return None
    if type(rid) is not int or not 0 <= rid <= MAX_RID:
        raise _bad_rid()
    return rid


def _check_version(m: dict[str, Any], rid: int | None) -> None:
    version = m.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.BAD_VERSION, f"protocol version {version!r} is not spoken here (want 1)", rid=rid, field="v"
        )


def _read_kind(m: dict[str, Any], rid: int | None) -> str:
    kind = m.get("kind")
    if type(kind) is not str:
        raise ProtocolError(ErrorCode.INVALID, "'kind' must be a string", rid=rid, field="kind")
    return kind


def decode_request(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Request:
    """Decode and check one request frame.

    Raises:
        ProtocolError: with ``rid`` set whenever the request id could be read.
    """
    m = _unpack_map(data, limits.max_frame)
    rid = m.get("rid")
    if type(rid) is not int or not 0 <= rid <= MAX_RID:
        raise _bad_rid()
    version, kind = m.get("v"), m.get("kind")
    if type(version) is not int or version != PROTOCOL_VERSION:
        _check_version(m, rid)
    cls = REQUEST_TYPES.get(kind) if type(kind) is str else None
    if cls is None:
        kind = _read_kind(m, rid)
        raise ProtocolError(ErrorCode.UNKNOWN_KIND, f"unknown request kind {kind!r}", rid=rid, field="kind")
    try:
        return cls.from_map(m, rid, limits)
    except ProtocolError as exc:
        exc.rid = rid
        raise


def decode_reply(data: bytes, max_size: int = 16 * 1024 * 1024) -> Reply:
    """Decode and check one reply frame (client side)."""
    m = _unpack_map(data, max_size)
    rid = _read_rid(m, required=False)
    _check_version(m, rid)
    kind = _read_kind(m, rid)
    cls = REPLY_TYPES.get(kind)
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_KIND, f"unknown reply kind {kind!r}", rid=rid, field="kind")
    if rid is None and kind != "error":
        raise ProtocolError(ErrorCode.INVALID, f"a {kind!r} reply needs a 'rid'", field="rid")
    return cls.from_map(m, rid)  # type: ignore[arg-type]  # rid is an int for all but errors


def decode_event(data: bytes, max_size: int = 16 * 1024 * 1024) -> Event:
    """Decode and check one event frame (the second frame of a publication)."""
    m = _unpack_map(data, max_size)
    _check_version(m, None)
    return Event.from_map(m)


# One shared Packer saves building one per call. Sharing it between threads is safe: pack()
# runs entirely under the GIL (no default= hook calls back into Python).
_pack = msgpack.Packer(use_bin_type=True).pack


def encode(message: Request | Reply | Event) -> bytes:
    """Encode any protocol object as one msgpack frame."""
    return _pack(message.to_map())  # type: ignore[no-any-return]


def encode_stored_event(
    kind: EventKind, room: str | None, sender: str, text: str, *, ts: float, id: int, seq: int, to: str | None = None
) -> bytes:
    """``encode(Event(kind, room, sender, text, ts, id, to=to, seq=seq))``, without the Event.

    For the broker's message path, which would build the event only to encode it: the same
    bytes (keys in :meth:`Event.to_map`'s order; test_codec compares them).
    """
    out = {"v": PROTOCOL_VERSION, "kind": kind, "sender": sender, "text": text, "ts": ts, "id": id}
    if room is not None:
        out["room"] = room
    if to is not None:
        out["to"] = to
    out["seq"] = seq
    return _pack(out)  # type: ignore[no-any-return]


def encode_sent(rid: int, id: int, ts: float, seq: int, *, offline: bool = False, away: str = "") -> bytes:
    """``encode(Sent(rid, id, ts, seq, offline=offline, away=away))``, without the Sent (as
    :func:`encode_stored_event`)."""
    m: dict[str, object] = {"v": PROTOCOL_VERSION, "kind": "sent", "rid": rid, "id": id, "ts": ts, "seq": seq}
    if offline:
        m["offline"] = True
    if away:
        m["away"] = away
    return _pack(m)  # type: ignore[no-any-return]


def encode_map(m: dict[str, Any]) -> bytes:
    """Encode a raw map: for tests and tools that must send what no class would build."""
    return msgpack.packb(m, use_bin_type=True)  # type: ignore[no-any-return]
