"""The wire protocol as the load generators speak it: raw pyzmq and msgpack, cheaply.

The load generators must not be the bottleneck, so a subscriber does not decode every
event. Both zchat and the baseline encode a room message as a map that starts with
``v`` and ``kind`` and ends with ``seq`` (the order of the fields in the protocol's
``Event``), so :func:`message_seq` checks a fixed prefix and reads the integer after the
last ``seq`` key in a few hundred nanoseconds. A frame that does not match the fast path is
decoded in full, and :class:`Checker` decodes one frame in :data:`CHECK_EVERY` in full
anyway and counts disagreements, so a change of field order shows up as a figure instead
of as silently wrong counts.

Texts are 120 characters. Latency runs put the sender's clock first in the text
(:func:`stamped_text`): ``time.monotonic_ns()`` reads CLOCK_MONOTONIC, one clock for every
process on a Linux machine.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import msgpack
import zmq

TEXT_LENGTH = 120
TEXT = "x" * TEXT_LENGTH
#: What every room message frame starts with after its map header (zchat and the baseline).
MESSAGE_PREFIX = b"\xa1v\x01\xa4kind\xa7message"
SEQ_KEY = b"\xa3seq"
TEXT_KEY = b"\xa4text"
STAMP_DIGITS = 19
#: One frame in this many is decoded in full to check the fast path.
CHECK_EVERY = 997
#: Seconds a setup request may take before the load generator gives up.
SETUP_TIMEOUT = 20.0

_INT_WIDTH = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}


def request(kind: str, rid: int, **fields: Any) -> bytes:
    """One request frame."""
    frame: bytes = msgpack.packb({"v": 1, "kind": kind, "rid": rid, **fields})
    return frame


def decode(frame: bytes) -> dict[str, Any]:
    """A reply or event, decoded in full."""
    value: dict[str, Any] = msgpack.unpackb(frame)
    return value


def stamped_text() -> str:
    """A 120-character text that starts with the sender's CLOCK_MONOTONIC in nanoseconds."""
    return f"{time.monotonic_ns():0{STAMP_DIGITS}d} " + "x" * (TEXT_LENGTH - STAMP_DIGITS - 1)


def _read_uint(frame: bytes, at: int) -> int | None:
    if at >= len(frame):
        return None
    tag = frame[at]
    if tag < 0x80:
        return tag
    width = _INT_WIDTH.get(tag)
    if width is None:
        return None
    return int.from_bytes(frame[at + 1 : at + 1 + width], "big")


def message_seq(frame: bytes) -> int | None:
    """The seq of a room ``message`` event frame; None for any other event.

    Fast path first; anything unusual is decoded in full.
    """
    if frame.startswith(MESSAGE_PREFIX, 1):
        at = frame.rfind(SEQ_KEY, len(frame) - 14)
        if at > 0:
            seq = _read_uint(frame, at + len(SEQ_KEY))
            if seq is not None:
                return seq
    return full_message_seq(frame)


def full_message_seq(frame: bytes) -> int | None:
    """:func:`message_seq` by a full decode."""
    try:
        event = decode(frame)
    except ValueError:
        return None
    if type(event) is not dict or event.get("kind") != "message":
        return None
    seq = event.get("seq")
    return seq if type(seq) is int else None


def message_stamp(frame: bytes) -> int | None:
    """The send time stamped at the start of a message's text (see :func:`stamped_text`)."""
    at = frame.find(TEXT_KEY)
    # A 120-character text is a str8: 0xd9, one length byte, then the characters.
    if at > 0 and frame[at + 5] == 0xD9:
        digits = frame[at + 7 : at + 7 + STAMP_DIGITS]
        if digits.isdigit():
            return int(digits)
    try:
        text = decode(frame).get("text", "")
        return int(text[:STAMP_DIGITS]) if text[:STAMP_DIGITS].isdigit() else None
    except ValueError:
        return None


class Checker:
    """Counts frames on which the fast path and a full decode disagree (should stay 0)."""

    def __init__(self) -> None:
        self.frames = 0
        self.checked = 0
        self.mismatches = 0

    def see(self, frame: bytes, seq: int | None) -> None:
        self.frames += 1
        if self.frames % CHECK_EVERY == 0:
            self.checked += 1
            self.mismatches += full_message_seq(frame) != seq


class Wire:
    """A DEALER that speaks zchat's request protocol one request at a time (for setup)."""

    def __init__(self, ctx: zmq.Context[Any], router: str) -> None:
        self.dealer = ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(router)
        self.rid = 0

    def call(self, kind: str, timeout: float = SETUP_TIMEOUT, **fields: Any) -> dict[str, Any]:
        """Send a request, return its reply; SystemExit on an error or no reply in time."""
        self.rid += 1
        self.dealer.send(request(kind, self.rid, **fields))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.dealer.poll(int(left * 1000) + 1):
                raise SystemExit(f"no reply to {kind} within {timeout} s")
            reply = decode(self.dealer.recv())
            if reply.get("rid") != self.rid:
                continue  # a late reply to an earlier request
            if reply["kind"] == "error":
                raise SystemExit(f"{kind}: {reply['code']}: {reply['reason']}")
            return reply

    def close(self) -> None:
        self.dealer.close(linger=0)


def nick(prefix: str) -> str:
    """A fresh nick (the broker refuses a nick already in use)."""
    return f"{prefix}{secrets.token_hex(4)}"
