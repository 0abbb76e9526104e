"""The codec: every message kind round-trips, and malformed input raises ProtocolError only.

Property tests hold the codec's promise from its docstring: whatever bytes arrive, a decode
function returns a fully checked object or raises ProtocolError, never anything else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from zchat.common.codec import (
    decode_event,
    decode_reply,
    decode_request,
    encode,
    encode_map,
    encode_sent,
    encode_stored_event,
)
from zchat.common.codes import MODERATION_KINDS, ErrorCode, EventKind, ReplyKind, RequestKind
from zchat.common.errors import ProtocolError
from zchat.common.limits import DEFAULT_LIMITS, Limits
from zchat.common.names import check_text, normalize_nick, normalize_room
from zchat.common.protocol import (
    MAX_RID,
    PROTOCOL_VERSION,
    Away,
    AwayChanged,
    Bye,
    Dm,
    ErrorReply,
    Event,
    Goodbye,
    Hello,
    History,
    HistoryPage,
    Join,
    Joined,
    Leave,
    Left,
    Members,
    Moderate,
    Moderated,
    Nick,
    NickChanged,
    Ping,
    Pong,
    Reply,
    Request,
    RoomInfo,
    RoomList,
    Rooms,
    Say,
    Sent,
    SetTopic,
    StatsReply,
    StatsRequest,
    Welcome,
    Who,
)

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
Decoder = Callable[[bytes], object]
DECODERS: list[Decoder] = [decode_request, decode_reply, decode_event]
TOPIC = "p/0123456789abcdef0123456789abcdef/"

REQUESTS: list[Request] = [
    Hello(1, "ann"),
    Hello(0, "Ωmega"),
    Join(2, "general"),
    Leave(3, "general"),
    Say(4, "general", "hello\nworld"),
    Say(5, "general", "waves", True),
    Dm(6, "bob", "psst"),
    Dm(7, "bob", "nods", True),
    Who(8, "general"),
    Rooms(9),
    Nick(10, "anne"),
    Ping(11),
    Bye(MAX_RID),
    Hello(12, "ann", "c" * 32),
    Say(13, "general", "again", False, "m-1", True),
    Dm(14, "bob", "again", False, "m-2", True),
    History(15, room="general", before=10, limit=20),
    History(16, dm=True, after=3),
    History(17, room="general"),
    StatsRequest(18),
    Join(19, "ops", True),
    *(Moderate(kind, 20, "ops", "bob", "why not") for kind in MODERATION_KINDS),
    Moderate(RequestKind.INVITE, 21, "ops", "bob"),
    SetTopic(22, "ops", "plans for friday"),
    SetTopic(23, "ops", ""),
    Away(24, "lunch, back at 2"),
    Away(25),
]
REPLIES: list[Reply] = [
    Welcome(1, "ann", TOPIC, "be nice", 5.0, 15.0),
    Welcome(1, "ann", TOPIC, "", 0.5, 1.5),
    Welcome(1, "ann", TOPIC, "", 0.5, 1.5, "c" * 32, 7, True, 100),
    Joined(2, "general", "r/general/", ("ann", "bob")),
    Joined(2, "general", "r/general/", ()),
    Left(3, "general"),
    Sent(4, 1_700_000_000_000_001, 1_700_000_000.25),
    Sent(4, 1_700_000_000_000_001, 1_700_000_000.25, 42, True),
    Joined(2, "general", "r/general/", ("ann",), 42),
    Joined(2, "ops", "q/0123456789abcdef0123456789abcdef/", ("ann", "bob"), 42, True, "plans", ("ann",)),
    Moderated(14, "ops", "kick", "bob"),
    Moderated(14, "ops", "topic"),
    Members(5, "ops", ("ann", "bob"), ("ann",)),
    Members(5, "general", ("ann", "bob"), (), {"bob": "lunch"}),
    Joined(2, "general", "r/general/", ("ann", "bob"), 3, False, "", (), {"bob": "in a meeting"}),
    Sent(4, 1_700_000_000_000_001, 1_700_000_000.25, 42, away="lunch"),
    AwayChanged(15, "lunch"),
    AwayChanged(15, ""),
    RoomList(6, (RoomInfo("ops", 0, True),)),
    HistoryPage(12, "general", (Event(EventKind.MESSAGE, "general", "ann", "hi", 1.5, 1, seq=1),), 1, False),
    HistoryPage(12, None, (), 0, False),
    StatsReply(13, "0.1.0", 12.5, {"sessions": 3, "requests_total": 1234, "last_commit_seconds": 0.0005}),
    Members(5, "general", ("ann", "bob")),
    RoomList(6, (RoomInfo("dev", 1), RoomInfo("general", 2))),
    RoomList(6, ()),
    NickChanged(7, "anne"),
    Pong(8, 1_700_000_000.5),
    Goodbye(9),
    ErrorReply(None, ErrorCode.MALFORMED, "not a msgpack value"),
    ErrorReply(10, ErrorCode.SERVER_FULL, "full", 2.5),
    *(ErrorReply(11, code, f"because {code.value}") for code in ErrorCode),
]
EVENTS: list[Event] = [
    Event(EventKind.MESSAGE, "general", "ann", "hi", 1.5, 1),
    Event(EventKind.ACTION, "general", "ann", "waves", 1.5, 2),
    Event(EventKind.JOIN, "general", "ann", "", 1.5, 3),
    Event(EventKind.AWAY, "general", "ann", "lunch", 1.5, 3),
    Event(EventKind.LEAVE, "general", "ann", "timed out", 1.5, 4),
    Event(EventKind.NICK, "general", "ann", "", 1.5, 5, nick="anne"),
    Event(EventKind.DM, None, "ann", "psst", 1.5, 6, to="bob"),
    Event(EventKind.SYNC, None, "", "a1b2c3", 1.5, 7),
    *(Event(kind, "ops", "ann", "spam", 1.5, 8, nick="bob") for kind in (
        EventKind.INVITE, EventKind.KICK, EventKind.BAN, EventKind.UNBAN, EventKind.OP, EventKind.DEOP)),
    Event(EventKind.TOPIC, "ops", "ann", "plans", 1.5, 9),
    Event(EventKind.REKEY, "ops", "", "q/0123456789abcdef0123456789abcdef/", 1.5, 10, seq=41),
    Event(EventKind.MESSAGE, "general", "ann", "hi", 1.5, 8, seq=3),
    Event(EventKind.TICK, "general", "", "", 1.5, 9, seq=3),
    Event(EventKind.GOAWAY, None, "", "the broker is shutting down", 1.5, 10),
]


def _raises(decoder: Decoder, frame: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as exc:
        decoder(frame)
    return exc.value


def _request_map(**fields: Any) -> dict[str, Any]:
    """A valid ping request map with ``fields`` changed (a value of ... removes the field)."""
    m: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": "ping", "rid": 7}
    m.update(fields)
    return {k: v for k, v in m.items() if v is not ...}


def _decode_request_map(**fields: Any) -> ProtocolError:
    return _raises(decode_request, encode_map(_request_map(**fields)))


# -- every kind round-trips ---------------------------------------------------------------


def test_samples_cover_every_kind() -> None:
    assert {r.kind if isinstance(r, Moderate) else r.KIND for r in REQUESTS} == set(RequestKind)
    assert {r.KIND for r in REPLIES} == set(ReplyKind)
    assert {e.kind for e in EVENTS} == set(EventKind)


@pytest.mark.parametrize("request_", REQUESTS, ids=repr)
def test_request_round_trip(request_: Request) -> None:
    frame = encode(request_)
    assert decode_request(frame) == request_
    assert encode(decode_request(frame)) == frame


@pytest.mark.parametrize("reply", REPLIES, ids=repr)
def test_reply_round_trip(reply: Reply) -> None:
    frame = encode(reply)
    assert decode_reply(frame) == reply
    assert encode(decode_reply(frame)) == frame


@pytest.mark.parametrize("event", EVENTS, ids=repr)
def test_event_round_trip(event: Event) -> None:
    frame = encode(event)
    assert decode_event(frame) == event
    assert encode(decode_event(frame)) == frame


def test_families_do_not_cross() -> None:
    """A reply is not a request and an event is not a reply: the kinds tell them apart."""
    assert _raises(decode_request, encode(Goodbye(1))).code is ErrorCode.UNKNOWN_KIND
    assert _raises(decode_reply, encode(Hello(1, "ann"))).code is ErrorCode.UNKNOWN_KIND
    assert _raises(decode_event, encode(Joined(1, "a", "r/a/", ()))).code is ErrorCode.UNKNOWN_KIND


def test_decode_normalises_names() -> None:
    say = decode_request(encode_map({"v": 1, "kind": "say", "rid": 1, "room": "#ＧＥＮ", "text": "x"}))
    assert say == Say(1, "gen", "x")
    assert decode_request(encode_map({"v": 1, "kind": "hello", "rid": 1, "nick": "Ａｎｎ"})) == Hello(1, "Ann")


def test_extra_fields_are_ignored() -> None:
    m = {"v": 1, "kind": "say", "rid": 1, "room": "gen", "text": "x", "sender": "mallory", "id": 5}
    assert decode_request(encode_map(m)) == Say(1, "gen", "x")


def test_int_where_float_expected_is_accepted() -> None:
    m = Welcome(1, "ann", TOPIC, "", 5.0, 15.0).to_map() | {"heartbeat": 5, "timeout": 15}
    reply = decode_reply(encode_map(m))
    assert type(reply) is Welcome
    assert (reply.heartbeat, reply.timeout) == (5.0, 15.0)
    assert type(reply.heartbeat) is float


# -- envelope errors ----------------------------------------------------------------------


def test_oversize_frames_are_too_large() -> None:
    limits = Limits(max_frame=64)
    small = encode(Ping(1))
    assert decode_request(small, limits) == Ping(1)
    big = encode(Say(1, "general", "x" * 100))
    assert _raises(lambda f: decode_request(f, limits), big).code is ErrorCode.TOO_LARGE
    junk = b"\xc1" * (DEFAULT_LIMITS.max_frame + 1)  # checked before it is parsed
    assert _raises(decode_request, junk).code is ErrorCode.TOO_LARGE
    exact = encode(Say(1, "g", "x" * 10))
    assert decode_request(exact, Limits(max_frame=len(exact))) == Say(1, "g", "x" * 10)
    assert _raises(lambda f: decode_reply(f, 10), encode(Goodbye(1))).code is ErrorCode.TOO_LARGE
    assert _raises(lambda f: decode_event(f, 10), encode(EVENTS[0])).code is ErrorCode.TOO_LARGE


@pytest.mark.parametrize("version", [0, 2, -1, 2**64 - 1, True, 1.0, "1", None, ..., [1], {"v": 1}])
def test_wrong_version_is_bad_version_with_rid(version: Any) -> None:
    exc = _decode_request_map(v=version)
    assert (exc.code, exc.rid, exc.field) == (ErrorCode.BAD_VERSION, 7, "v")
    reply = Goodbye(3).to_map()
    reply["v"] = version
    if version is ...:
        del reply["v"]
    exc = _raises(decode_reply, encode_map(reply))
    assert (exc.code, exc.rid) == (ErrorCode.BAD_VERSION, 3)
    event = EVENTS[0].to_map()
    event["v"] = version
    if version is ...:
        del event["v"]
    assert _raises(decode_event, encode_map(event)).code is ErrorCode.BAD_VERSION


@pytest.mark.parametrize("kind", ["hi", "HELLO", "Hello", "welcome", "message", "", "hello\x00"])
def test_unknown_request_kind_keeps_rid(kind: str) -> None:
    exc = _decode_request_map(kind=kind, nick="ann")
    assert (exc.code, exc.rid, exc.field) == (ErrorCode.UNKNOWN_KIND, 7, "kind")


@pytest.mark.parametrize("kind", [..., None, 1, True, b"ping", ["ping"]])
def test_kind_not_a_string_is_invalid_with_rid(kind: Any) -> None:
    exc = _decode_request_map(kind=kind)
    assert (exc.code, exc.rid, exc.field) == (ErrorCode.INVALID, 7, "kind")


def test_unknown_reply_and_event_kinds() -> None:
    exc = _raises(decode_reply, encode_map({"v": 1, "kind": "hi", "rid": 4}))
    assert (exc.code, exc.rid) == (ErrorCode.UNKNOWN_KIND, 4)
    event = EVENTS[0].to_map() | {"kind": "shout"}
    assert _raises(decode_event, encode_map(event)).code is ErrorCode.UNKNOWN_KIND


@pytest.mark.parametrize("rid", [..., None, True, False, -1, -(2**63), MAX_RID + 1, 2**64 - 1, 1.0, "7", b"\x07", [7]])
def test_bad_rid_is_rejected(rid: Any) -> None:
    exc = _decode_request_map(rid=rid)
    assert (exc.code, exc.rid, exc.field) == (ErrorCode.INVALID, None, "rid")


@pytest.mark.parametrize("rid", [0, 1, 2**32, MAX_RID])
def test_good_rids(rid: int) -> None:
    assert decode_request(encode_map(_request_map(rid=rid))) == Ping(rid)
    assert decode_reply(encode(Goodbye(rid))) == Goodbye(rid)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"kind": "hello"}, "nick"),
        ({"kind": "hello", "nick": None}, "nick"),
        ({"kind": "hello", "nick": 5}, "nick"),
        ({"kind": "hello", "nick": b"ann"}, "nick"),
        ({"kind": "hello", "nick": ["ann"]}, "nick"),
        ({"kind": "join"}, "room"),
        ({"kind": "join", "room": True}, "room"),
        ({"kind": "leave", "room": {"x": 1}}, "room"),
        ({"kind": "say", "room": "gen"}, "text"),
        ({"kind": "say", "text": "hi"}, "room"),
        ({"kind": "say", "room": "gen", "text": 1}, "text"),
        ({"kind": "say", "room": "gen", "text": "hi", "action": 1}, "action"),
        ({"kind": "say", "room": "gen", "text": "hi", "action": "yes"}, "action"),
        ({"kind": "say", "room": "gen", "text": "hi", "action": None}, "action"),
        ({"kind": "dm", "text": "hi"}, "to"),
        ({"kind": "dm", "to": "bob", "text": b"hi"}, "text"),
        ({"kind": "dm", "to": "bob", "text": "hi", "action": 0}, "action"),
        ({"kind": "who", "room": 3.5}, "room"),
        ({"kind": "nick", "nick": None}, "nick"),
    ],
)
def test_missing_or_wrong_typed_field_is_invalid_with_rid(fields: dict[str, Any], field: str) -> None:
    exc = _decode_request_map(**fields)
    assert (exc.code, exc.rid, exc.field) == (ErrorCode.INVALID, 7, field)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"kind": "hello", "nick": "1ann"}, ErrorCode.INVALID_NICK),
        ({"kind": "hello", "nick": "server"}, ErrorCode.INVALID_NICK),
        ({"kind": "hello", "nick": "a" * 33}, ErrorCode.INVALID_NICK),
        ({"kind": "nick", "nick": "a\u202eb"}, ErrorCode.INVALID_NICK),
        ({"kind": "dm", "to": "", "text": "hi"}, ErrorCode.INVALID_NICK),
        ({"kind": "join", "room": "#"}, ErrorCode.INVALID_ROOM),
        ({"kind": "who", "room": "a b"}, ErrorCode.INVALID_ROOM),
        ({"kind": "say", "room": "gen", "text": ""}, ErrorCode.INVALID_TEXT),
        ({"kind": "say", "room": "gen", "text": "\x1b[2J"}, ErrorCode.INVALID_TEXT),
        ({"kind": "dm", "to": "bob", "text": "x" * 4001}, ErrorCode.INVALID_TEXT),
        ({"kind": "away", "text": "gone\nbob (away: forged)"}, ErrorCode.INVALID_TEXT),  # one line only
        ({"kind": "away", "text": "a\tb"}, ErrorCode.INVALID_TEXT),
        ({"kind": "away", "text": "   "}, ErrorCode.INVALID_TEXT),
        ({"kind": "away", "text": "x" * 391}, ErrorCode.INVALID_TEXT),
        ({"kind": "away", "text": 5}, ErrorCode.INVALID),
    ],
)
def test_bad_names_and_text_keep_rid(fields: dict[str, Any], code: ErrorCode) -> None:
    exc = _decode_request_map(**fields)
    assert (exc.code, exc.rid) == (code, 7)


def test_limits_apply_to_names_and_text() -> None:
    limits = Limits(max_text=3, max_nick=4, max_room=5)

    def decode(frame: bytes) -> Request:
        return decode_request(frame, limits)

    good = encode_map({"v": 1, "kind": "say", "rid": 1, "room": "abcde", "text": "abc"})
    assert decode(good) == Say(1, "abcde", "abc")
    assert decode(encode(Hello(1, "abcd"))) == Hello(1, "abcd")
    for m, code in [
        ({"v": 1, "kind": "say", "rid": 1, "room": "abcde", "text": "abcd"}, ErrorCode.INVALID_TEXT),
        ({"v": 1, "kind": "join", "rid": 1, "room": "abcdef"}, ErrorCode.INVALID_ROOM),
        ({"v": 1, "kind": "hello", "rid": 1, "nick": "abcde"}, ErrorCode.INVALID_NICK),
    ]:
        assert _raises(decode, encode_map(m)).code is code


@pytest.mark.parametrize(
    "reply",
    [
        {"v": 1, "kind": "goodbye"},  # only errors may lack a rid
        {"v": 1, "kind": "goodbye", "rid": None},
        {"v": 1, "kind": "welcome", "rid": 1, "nick": "ann", "topic": TOPIC, "motd": "", "heartbeat": 5.0},
        {"v": 1, "kind": "welcome", "rid": 1, "nick": "a", "topic": TOPIC, "motd": "", "heartbeat": True, "timeout": 1},
        {"v": 1, "kind": "joined", "rid": 1, "room": "g", "topic": "r/g/", "members": ["a", 1]},
        {"v": 1, "kind": "joined", "rid": 1, "room": "g", "topic": "r/g/", "members": "ab"},
        {"v": 1, "kind": "sent", "rid": 1, "id": -1, "ts": 1.0},
        {"v": 1, "kind": "sent", "rid": 1, "id": True, "ts": 1.0},
        {"v": 1, "kind": "sent", "rid": 1, "id": 1, "ts": "now"},
        {"v": 1, "kind": "rooms", "rid": 1, "rooms": [["g", 1]]},
        {"v": 1, "kind": "members", "rid": 1, "room": "g", "members": ["a"], "away": ["a"]},
        {"v": 1, "kind": "members", "rid": 1, "room": "g", "members": ["a"], "away": {"a": 1}},
        {"v": 1, "kind": "members", "rid": 1, "room": "g", "members": ["a"], "away": {"a": {"b": "c"}}},
        {"v": 1, "kind": "joined", "rid": 1, "room": "g", "topic": "r/g/", "members": [], "away": "a"},
        {"v": 1, "kind": "sent", "rid": 1, "id": 1, "ts": 1.0, "away": True},
        {"v": 1, "kind": "away", "rid": 1},
        {"v": 1, "kind": "away", "rid": 1, "text": None},
        {"v": 1, "kind": "rooms", "rid": 1, "rooms": [{"room": "g", "members": -1}]},
        {"v": 1, "kind": "rooms", "rid": 1, "rooms": [{"room": "g"}]},
        {"v": 1, "kind": "rooms", "rid": 1, "rooms": {"room": "g", "members": 1}},
        {"v": 1, "kind": "error", "rid": 1, "code": "oops", "reason": "x"},
        {"v": 1, "kind": "error", "rid": 1, "code": "invalid"},
        {"v": 1, "kind": "error", "rid": 1, "code": "invalid", "reason": "x", "retry_after": "soon"},
        {"v": 1, "kind": "error", "rid": -1, "code": "invalid", "reason": "x"},
    ],
)
def test_malformed_replies_are_invalid(reply: dict[str, Any]) -> None:
    assert _raises(decode_reply, encode_map(reply)).code is ErrorCode.INVALID


@pytest.mark.parametrize(
    "change",
    [
        {"sender": None},
        {"sender": 1},
        {"text": None},
        {"ts": None},
        {"ts": True},
        {"id": -1},
        {"id": 1.0},
        {"room": 1},
        {"to": b"bob"},
        {"nick": 1},
        {"kind": None},
    ],
)
def test_malformed_events_are_invalid(change: dict[str, Any]) -> None:
    m = {k: v for k, v in (EVENTS[0].to_map() | change).items() if v is not None}  # None: left out
    assert _raises(decode_event, encode_map(m)).code is ErrorCode.INVALID


# -- malformed bytes ----------------------------------------------------------------------

BOMBS = [
    b"",
    b"\xc1",  # never used
    b"\x81",  # a map of one pair, then nothing
    b"\xdd\xff\xff\xff\xff",  # array32 of 2**32-1 items
    b"\xdf\xff\xff\xff\xff",  # map32 of 2**32-1 pairs
    b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
    b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
    b"\xc9\xff\xff\xff\xff\x01",  # ext32 of 4 GiB
    b"\xdf\xff\xff\xff\xff" + b"\xa1a\x01" * 100,
    b"\x91" * 100_000,  # arrays nested 100 000 deep
    b"\x81\xa1a" * 100_000,  # maps nested 100 000 deep
    b"\xd4\x01\x00",  # fixext1
    b"\xd6\xff\x00\x00\x00\x00",  # timestamp32
    b"\xd7\xff" + b"\xff" * 8,  # timestamp64 with nanoseconds out of range
    b"\xc7\x0c\xff" + b"\xff" * 12,  # timestamp96 at the far end of time
    b"\xc7\x03\xff\x00\x00\x00",  # timestamp of a length no timestamp has
    b"\x81\xd4\x01\x00\x01",  # ext as a map key
    b"\x81\x91\x01\x01",  # array as a map key
    b"\x81\x80\x01",  # map as a map key
    b"\x81\x01\x01",  # int as a map key
    b"\x81\xc0\x01",  # nil as a map key
    b"\x81\xa2\xff\xfe\x01",  # invalid UTF-8 in a key
    b"\x81\xa1v\xa2\xed\xa0",  # a surrogate in UTF-8 (and truncated)
    b"\x81\xa1v\xa3\xed\xa0\x80",  # a surrogate in UTF-8
    b"\x80\x00",  # trailing bytes
    b"\x80\x80",
    b"\xa4ping",  # a string, not a map
    b"\x90",  # an array
    b"\x01",
    b"\xc0",
    b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # NaN
]


@pytest.mark.parametrize("decoder", DECODERS, ids=lambda d: d.__name__)
@pytest.mark.parametrize("frame", BOMBS, ids=lambda f: f[:12].hex() + (f"..({len(f)})" if len(f) > 12 else ""))
def test_bombs_and_junk_are_protocol_errors(decoder: Decoder, frame: bytes) -> None:
    exc = _raises(decoder, frame)
    assert exc.code in {ErrorCode.MALFORMED, ErrorCode.TOO_LARGE}


@pytest.mark.parametrize("message", [*REQUESTS[:3], *REPLIES[:3], *EVENTS[:3]], ids=repr)
def test_trailing_bytes_are_malformed(message: Request | Reply | Event) -> None:
    for decoder in DECODERS:
        assert _raises(decoder, encode(message) + b"\x00").code is ErrorCode.MALFORMED
        assert _raises(decoder, encode(message) + encode(message)).code is ErrorCode.MALFORMED


@pytest.mark.parametrize("message", [*REQUESTS, *REPLIES[:12], *EVENTS], ids=repr)
def test_truncated_frames_are_malformed(message: Request | Reply | Event) -> None:
    frame = encode(message)
    for end in range(len(frame)):
        for decoder in DECODERS:
            _raises(decoder, frame[:end])


def test_fields_under_bytes_keys_do_not_count() -> None:
    """A bytes key never names a field: the request is refused, however the codec words it."""
    frame = b"\x83\xc4\x01v\x01\xc4\x04kind\xa4ping\xc4\x03rid\x07"  # {b"v": 1, b"kind": "ping", b"rid": 7}
    for decoder in DECODERS:
        assert _raises(decoder, frame).code in {ErrorCode.MALFORMED, ErrorCode.INVALID, ErrorCode.BAD_VERSION}
    frame = b"\x84\xa1v\x01\xa4kind\xa4ping\xa3rid\x07\xc4\x03rid\x08"  # str and bytes "rid" both
    try:
        assert decode_request(frame) == Ping(7)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.MALFORMED


def test_bytes_keys_are_malformed() -> None:
    # {"v": 1, "kind": "ping", "rid": 7, b"x": 1}: a valid ping plus one bin key.
    frame = b"\x84\xa1v\x01\xa4kind\xa4ping\xa3rid\x07\xc4\x01x\x01"
    for decoder in DECODERS:
        assert _raises(decoder, frame).code is ErrorCode.MALFORMED


def test_invalid_utf8_in_a_value_is_malformed() -> None:
    frame = encode_map(_request_map(kind="hello", nick="ann")).replace(b"\xa3ann", b"\xa3a\xffn")
    assert _raises(decode_request, frame).code is ErrorCode.MALFORMED


def test_ext_values_in_fields_are_invalid() -> None:
    for value in (msgpack.ExtType(1, b"\x00"), msgpack.Timestamp(0)):
        assert _decode_request_map(rid=value).code is ErrorCode.INVALID
        exc = _decode_request_map(kind="hello", nick=value)
        assert (exc.code, exc.rid) == (ErrorCode.INVALID, 7)
        assert _decode_request_map(v=value).code is ErrorCode.BAD_VERSION


# -- properties ---------------------------------------------------------------------------

_NAME_CHARS = st.one_of(st.characters(categories=("L", "M", "N"), codec="utf-8"), st.sampled_from("_-."))
_FIRST_NICK_CHAR = st.characters(categories=["L"], codec="utf-8") | st.just("_")


def _normalized(fn: Callable[[str], str]) -> Callable[[str], str | None]:
    def apply(raw: str) -> str | None:
        try:
            return fn(raw)
        except ProtocolError:
            return None

    return apply


def _valid_text(text: str) -> str | None:
    try:
        check_text(text, DEFAULT_LIMITS.max_text)
    except ProtocolError:
        return None
    return text


def _keep(strategy: st.SearchStrategy[str | None]) -> st.SearchStrategy[str]:
    return strategy.filter(lambda x: x is not None).map(str)


nicks = _keep(
    st.builds(
        lambda a, b: a + b,
        _FIRST_NICK_CHAR,
        st.text(_NAME_CHARS, max_size=20),
    ).map(_normalized(normalize_nick))
)
rooms = _keep(
    st.builds(
        lambda a, b: a + b, st.characters(categories=("L", "N"), codec="utf-8"), st.text(_NAME_CHARS, max_size=30)
    ).map(_normalized(normalize_room))
)
texts = _keep(st.text(st.characters(codec="utf-8"), min_size=1, max_size=200).map(_valid_text))
rids = st.integers(0, MAX_RID)
any_text = st.text(st.characters(codec="utf-8"), max_size=30)
floats = st.floats(allow_nan=False)
counts = st.integers(0, 2**63 - 1)  # every integer field is 0 to 2**63-1 (protocol.MAX_INT)

away_texts = texts.filter(lambda t: len(t) <= 390 and bool(t.strip()) and "\n" not in t and "\t" not in t)

requests: st.SearchStrategy[Request] = st.one_of(
    st.builds(Hello, rids, nicks),
    st.builds(Join, rids, rooms),
    st.builds(Leave, rids, rooms),
    st.builds(Say, rids, rooms, texts, st.booleans()),
    st.builds(Dm, rids, nicks, texts, st.booleans()),
    st.builds(Who, rids, rooms),
    st.builds(Rooms, rids),
    st.builds(Nick, rids, nicks),
    st.builds(Ping, rids),
    st.builds(Bye, rids),
    st.builds(Away, rids, st.just("") | away_texts),
)
replies: st.SearchStrategy[Reply] = st.one_of(
    st.builds(Welcome, rids, any_text, any_text, any_text, floats, floats),
    st.builds(Joined, rids, any_text, any_text, st.lists(any_text).map(tuple)),
    st.builds(Left, rids, any_text),
    st.builds(Sent, rids, counts, floats, counts, st.booleans(), st.booleans(), any_text),
    st.builds(Members, rids, any_text, st.lists(any_text).map(tuple), st.lists(any_text).map(tuple),
              st.dictionaries(any_text, any_text, max_size=3)),
    st.builds(AwayChanged, rids, any_text),
    st.builds(RoomList, rids, st.lists(st.builds(RoomInfo, any_text, counts)).map(tuple)),
    st.builds(NickChanged, rids, any_text),
    st.builds(Pong, rids, floats),
    st.builds(Goodbye, rids),
    st.builds(ErrorReply, st.none() | rids, st.sampled_from(ErrorCode), any_text, st.none() | floats),
)
events: st.SearchStrategy[Event] = st.builds(
    Event,
    st.sampled_from(EventKind),
    st.none() | any_text,
    any_text,
    any_text,
    floats,
    counts,
    st.none() | any_text,
    st.none() | any_text,
)


@PROPERTY
@given(requests)
def test_valid_requests_round_trip(request_: Request) -> None:
    frame = encode(request_)
    assert decode_request(frame) == request_
    assert encode(decode_request(frame)) == frame


@PROPERTY
@given(replies)
def test_replies_round_trip(reply: Reply) -> None:
    assert decode_reply(encode(reply)) == reply


@PROPERTY
@given(events)
def test_events_round_trip(event: Event) -> None:
    assert decode_event(encode(event)) == event


def _check_decode(decoder: Decoder, frame: bytes) -> None:
    """Decoding gives a checked object whose encoding decodes to itself, or ProtocolError."""
    try:
        message = decoder(frame)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert isinstance(exc.reason, str)
        assert exc.rid is None or (type(exc.rid) is int and 0 <= exc.rid <= MAX_RID)
        return
    assert isinstance(message, Request | Reply | Event)
    again = encode(message)
    decoded = decoder(again)
    assert isinstance(decoded, Request | Reply | Event)
    # Compare encodings rather than objects: NaN is a legal float and NaN != NaN.
    assert encode(decoded) == again


@PROPERTY
@given(st.binary(max_size=300))
@example(b"\x83\xa1v\x01\xa4kind\xa4ping\xa3rid\x07")
def test_arbitrary_bytes_raise_only_protocol_error(frame: bytes) -> None:
    for decoder in DECODERS:
        _check_decode(decoder, frame)


msgpack_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(st.characters(codec="utf-8"), max_size=20)
    | st.binary(max_size=20)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
    | st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 999_999_999)),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(st.characters(codec="utf-8"), max_size=8), children, max_size=5),
    max_leaves=30,
)
FIELDS = [
    *("v", "kind", "rid", "nick", "room", "text", "to", "action", "topic", "motd", "heartbeat", "timeout"),
    *("members", "rooms", "id", "ts", "code", "reason", "retry_after", "sender"),
]
KINDS = [k.value for k in (*RequestKind, *ReplyKind, *EventKind)] + ["", "nope"]
field_values: st.SearchStrategy[Any] = st.one_of(
    msgpack_values,
    st.sampled_from(KINDS),
    st.sampled_from([0, 1, 2, -1, True, False, 1.0, MAX_RID, MAX_RID + 1, 2**64 - 1, -(2**63)]),
    nicks,
    rooms,
    texts,
    st.sampled_from(list(ErrorCode)).map(lambda c: c.value),
)
random_maps = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), field_values, max_size=10)


@PROPERTY
@given(random_maps)
def test_random_maps_raise_only_protocol_error(m: dict[str, Any]) -> None:
    for decoder in DECODERS:
        _check_decode(decoder, encode_map(m))


@PROPERTY
@given(st.one_of(requests, replies, events), st.sampled_from(FIELDS), field_values | st.just(...))
def test_one_field_changed_raises_only_protocol_error(
    message: Request | Reply | Event, field: str, value: Any
) -> None:
    """Start from a valid message and break (or delete, for ...) one field."""
    m = message.to_map()
    if value is ...:
        m.pop(field, None)
    else:
        m[field] = value
    for decoder in DECODERS:
        _check_decode(decoder, encode_map(m))


@PROPERTY
@given(msgpack_values)
def test_any_msgpack_value_raises_only_protocol_error(value: Any) -> None:
    frame = msgpack.packb(value, use_bin_type=True)
    for decoder in DECODERS:
        _check_decode(decoder, frame)


@PROPERTY
@given(st.one_of(requests, replies, events), st.data())
def test_corrupted_valid_frames_raise_only_protocol_error(
    message: Request | Reply | Event, data: st.DataObject
) -> None:
    frame = bytearray(encode(message))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(frame) - 1))
        frame[index] = data.draw(st.integers(0, 255))
    for decoder in DECODERS:
        _check_decode(decoder, bytes(frame))


# -- the message path's shortcuts agree with the general code ---------------------------------

cmids = st.none() | st.text("abcXYZ019_-", min_size=1, max_size=64)
say_values = st.one_of(field_values, cmids, st.text("ab_-é!", max_size=70), st.booleans())


@PROPERTY
@given(
    st.builds(Say, rids, rooms, texts, st.booleans(), cmids, st.booleans()),
    st.sampled_from(["room", "text", "action", "cmid", "retry"]),
    say_values | st.just(...),
)
def test_say_from_map_agrees_with_the_field_readers(say: Say, field: str, value: Any) -> None:
    """Say.from_map's one-expression check accepts exactly what checked_from_map accepts,
    with the same result; what it refuses gets checked_from_map's error."""
    m = say.to_map()
    if value is ...:
        m.pop(field, None)
    else:
        m[field] = value
    try:
        expected: Say | ProtocolError = Say.checked_from_map(m, say.rid)
    except ProtocolError as exc:
        expected = exc
    try:
        got: Say | ProtocolError = Say.from_map(m, say.rid)
    except ProtocolError as exc:
        got = exc
    if isinstance(expected, ProtocolError):
        assert isinstance(got, ProtocolError)
        assert (got.code, got.field, str(got)) == (expected.code, expected.field, str(expected))
    else:
        assert got == expected


stored_events = st.builds(
    Event,
    st.sampled_from([EventKind.MESSAGE, EventKind.ACTION, EventKind.DM]),
    st.none() | any_text,
    any_text,
    any_text,
    floats,
    counts,
    to=st.none() | any_text,
    seq=counts,
)


@PROPERTY
@given(stored_events)
def test_encode_stored_event_is_encode_of_the_event(event: Event) -> None:
    assert event.seq is not None
    frame = encode_stored_event(
        event.kind, event.room, event.sender, event.text, ts=event.ts, id=event.id, seq=event.seq, to=event.to
    )
    assert frame == encode(event)


@PROPERTY
@given(rid=rids, id=counts, ts=floats, seq=counts, offline=st.booleans(), away=st.sampled_from(["", "lunch", "3 ☕"]))
def test_encode_sent_is_encode_of_the_reply(
    *, rid: int, id: int, ts: float, seq: int, offline: bool, away: str
) -> None:
    frame = encode_sent(rid, id, ts, seq, offline=offline, away=away)
    assert frame == encode(Sent(rid, id, ts, seq, offline=offline, away=away))
    assert decode_reply(frame) == Sent(rid, id, ts, seq, offline=offline, away=away)
