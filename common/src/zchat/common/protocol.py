"""The message classes of wire protocol v1; each parses, checks and serialises itself.

The classes are slotted dataclasses, not frozen ones: a frozen dataclass costs about half a
microsecond more to build, and the broker builds three per message. Treat them as immutable.

``from_map`` takes the map the codec decoded and either returns a fully checked object (names
normalised, types exact) or raises :class:`~zchat.common.errors.ProtocolError`; ``to_map``
returns the map to encode. Nothing here touches msgpack or a socket: see ``codec``.

Three families travel on the wire (PROTOCOL.md describes every field):

* requests, client DEALER -> broker ROUTER: :data:`Request`;
* replies, broker ROUTER -> client DEALER, one per request: :data:`Reply`;
* events, broker XPUB -> client SUB, after a topic frame: :class:`Event`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .codes import MODERATION_KINDS, ErrorCode, EventKind, ReplyKind, RequestKind
from .errors import ProtocolError
from .limits import DEFAULT_LIMITS, Limits
from .names import check_line, check_text, normalize_nick, normalize_room, text_allowed

PROTOCOL_VERSION = 1
#: Every integer field is 0 to 2**63-1 (msgpack can carry up to 2**64-1; SQLite cannot).
MAX_INT = 2**63 - 1
MAX_RID = MAX_INT

Map = dict[str, Any]


# -- field readers: exact types only (msgpack's true is not an int here) ------------------


def _invalid(field: str, what: str, rid: int | None) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID, f"{field!r} must be {what}", rid=rid, field=field)


def get_str(m: Map, field: str, rid: int | None = None, default: str | None = None) -> str:
    value = m.get(field, default)
    if type(value) is not str:
        raise _invalid(field, "a string", rid)
    return value


def get_int(m: Map, field: str, rid: int | None = None, default: int | None = None) -> int:
    value = m.get(field, default)
    if type(value) is not int or not 0 <= value <= MAX_INT:
        raise _invalid(field, "an integer from 0 to 2**63-1", rid)
    return value


def get_float(m: Map, field: str, rid: int | None = None) -> float:
    value = m.get(field)
    if type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    raise _invalid(field, "a number", rid)


def get_bool(m: Map, field: str, rid: int | None = None, default: bool = False) -> bool:
    value = m.get(field, default)
    if type(value) is not bool:
        raise _invalid(field, "true or false", rid)
    return value


def get_opt_str(m: Map, field: str, rid: int | None = None) -> str | None:
    value = m.get(field)
    if value is not None and type(value) is not str:
        raise _invalid(field, "a string or absent", rid)
    return value


def get_opt_int(m: Map, field: str, rid: int | None = None) -> int | None:
    return None if m.get(field) is None else get_int(m, field, rid)


def get_str_list(m: Map, field: str, rid: int | None = None) -> tuple[str, ...]:
    value = m.get(field)
    if type(value) is not list or any(type(item) is not str for item in value):
        raise _invalid(field, "a list of strings", rid)
    return tuple(value)


def get_str_map(m: Map, field: str, rid: int | None = None) -> dict[str, str]:
    """A map of strings to strings; absent: empty."""
    value = m.get(field, {})
    if type(value) is not dict or any(type(k) is not str or type(v) is not str for k, v in value.items()):
        raise _invalid(field, "a map of strings to strings", rid)
    return dict(value)


_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
MIN_CLIENT_ID, MAX_CLIENT_ID, MAX_CMID = 16, 64, 64


def _is_token(value: object, low: int, high: int) -> bool:
    return type(value) is str and low <= len(value) <= high and _ID_CHARS.issuperset(value)


def _token(m: Map, field: str, rid: int, low: int, high: int) -> str | None:
    """An optional ASCII token field (letters, digits, _ and -), ``low`` to ``high`` long."""
    value = get_opt_str(m, field, rid)
    if value is not None and not _is_token(value, low, high):
        raise _invalid(field, f"{low} to {high} letters, digits, _ or -", rid)
    return value


def get_map_list(m: Map, field: str, rid: int | None = None) -> list[Map]:
    value = m.get(field)
    if type(value) is not list or any(type(item) is not dict for item in value):
        raise _invalid(field, "a list of maps", rid)
    return value


def _text(m: Map, rid: int, limits: Limits) -> str:
    text = get_str(m, "text", rid)
    check_text(text, limits.max_text)
    return text


def _header(kind: RequestKind | ReplyKind, rid: int | None) -> Map:
    return {"v": PROTOCOL_VERSION, "kind": kind.value, "rid": rid}


# -- requests -----------------------------------------------------------------------------


def _put_send_flags(out: Map, action: bool, cmid: str | None, retry: bool) -> None:
    if action:
        out["action"] = True
    if cmid is not None:
        out["cmid"] = cmid
    if retry:
        out["retry"] = True


@dataclass(slots=True)
class Hello:
    """Open a session under ``nick``."""

    KIND: ClassVar[RequestKind] = RequestKind.HELLO
    rid: int
    nick: str
    client: str | None = None  # the client's identity, a secret it keeps across reconnects

    @classmethod
    def from_map(cls, m: Map, rid: int, limits: Limits = DEFAULT_LIMITS) -> Hello:
        nick = normalize_nick(get_str(m, "nick", rid), limits.max_nick)
        return cls(rid, nick, _token(m, "client", rid, MIN_CLIENT_ID, MAX_CLIENT_ID))

    def to_map(self) -> Map:
        out = {**_header(self.KIND, self.rid), "nick": self.nick}
        if self.client is not None:
            out["client"] = self.client
        return out


@dataclass(slots=True)
class Join:
    """Join ``room`` (created if it does not exist).

    With ``private`` a room that does not exist yet is created invite-only, with the joiner
    as its operator; a private room can be joined only by those on its member list.
    """

    KIND: ClassVar[RequestKind] = RequestKind.JOIN
    rid: int
    room: str
    private: bool = False

    @classmethod
    def from_map(cls, m: Map, rid: int, limits: Limits = DEFAULT_LIMITS) -> Join:
        return cls(rid, normalize_room(get_str(m, "room", rid), limits.max_room), get_bool(m, "private", rid))

    def to_map(self) -> Map:
        out = {**_header(self.KIND, self.rid), "room": self.room}
        if self.private:
            out["private"] = True
        return out


@dataclass(slots=True)
class Leave:
    """Leave ``room``."""

    KIND: ClassVar[RequestKind] = RequestKind.LEAVE
    rid: int
    room: str

    @classmethod
    def from_map(cls, m: Map, rid: int, limits: Limits = DEFAULT_LIMITS) -> Leave:
        return cls(rid, normalize_room(get_str(m, "room", rid), limits.max_room))

    def to_map(self) -> Map:
        return {**_header(self.KIND, self.rid), "room": self.room}


@dataclass(slots=True)
class Say:
    """Send ``text`` to ``room``; ``action`` makes it a ``/me`` action."""

    KIND: ClassVar[RequestKind] = RequestKind.SAY
    rid: int
    room: str
    text: str
    action: bool = False
    cmid: str | None = None  # client message id: a resend with the same one is stored once
    retry: bool = False  # this is a resend of an earlier request with the same cmid

    @classmethod
    def from_map(cls, m: Map, rid: int, limits: Limits = DEFAULT_LIMITS) -> Say:
        # Every message comes this way: a well-formed say is checked in one expression (the
        # same rules as the field readers), and only one that fails it goes through the
        # readers, which say which field is wrong. test_codec holds the two to agreement.
        room, text, cmid = m.get("room"), m.get("text"), m.get("cmid")
        action, retry = m.get("action", False), m.get("retry", False)
        if (
            type(room) is str
            and type(text) is str
            and type(action) is bool
            and type(retry) is bool
            and (cmid is None or _is_token(cmid, 1, MAX_CMID))
            and text_allowed(text, limits.max_text)
        ):
            return cls(rid, normalize_room(room, limits.max_room), text, action, cmid, retry)
        return cls.checked_from_map(m, rid, limits)

    @classmethod
    def checked_from_map(cls, m: Map, rid: int, limits: Limits = DEFAULT_LIMITS) -> Say:
        """:meth:`from_map` field by field: raises naming the first field at fault."""
        return cls(
            rid,
            normalize_room(get_str(m, "room", rid), limits.max_room),
            _text(m, rid, limits),
            get_bool(m, "action", rid),
            _token(m, "cmid", rid, 1, MAX_CMID),
            get_bool(m, "retry", rid),
        )

    def to_map(self) -> Map:
        out = {"v": PROTOCOL_VERSION, "kind": "say", "rid": self.rid, "room": self.room, "text": self.text}
        _put_send_flags(out, self.action, self.cmid, self.retry)
        return out


@dataclass(slots=True)
class Dm:
    """Send ``text`` privately to the nick ``to``: to its live sessions, or (in secure mode,
    for a nick registered to a key) into its key's inbox while it is offline."""

    KIND: ClassVar[RequestKind] = RequestKind.DM
    rid: int
    to: str
    text: str
    action: bool = False
    cmid: str | None = None
    retry: bool = False

    @classmethod
    def from_map(cls, m: Map, rid: int, limits: Limits = DEFAULT_LIMITS) -> Dm:
        return cls(
            rid,
            normalize_nick(get_str(m, "to", rid), limits.max_nick),
            _text(m, rid, limits),
            get_bool(m, "action", rid),
            _token(m, "cmid", rid, 1, MAX_CMID),
            get_bool(m, "retry", rid),
        )

    def to_map(self) -> Map:
        out = {**_header(self.KIND, self.rid), "to": self.to, "text": self.text}
        _put_send_flags(out, self.action, self.cmid, self.retry)
        return out


@dataclass(slots=True)
class Who:
    """List the members of ``room``."""

    KIND: ClassVar[RequestKind] = RequestKind.WHO
    rid: int
    room: str

    @classmethod
    def from_map(cls, m: Map, rid: int, limits: Limits = DEFAULT_LIMITS) -> Who:
        return cls(rid, normalize_room(get_str(m, "room", rid), limits.max_room))

    def to_map(self) -> Map:
        return {**_header(self.KIND, self.rid), "room": self.room}


@dataclass(slots=True)
class Nick:
    """Change this session's nick to ``nick``."""

    KIND: ClassVar[RequestKind] = RequestKind.NICK
    rid: int
    nick: str

    @classmethod
    def from_map(cls, m: Map, rid: int, limits: Limits = DEFAULT_LIMITS) -> Nick:
        return cls(rid, normalize_nick(get_str(m, "nick", rid), limits.max_nick))

    def to_map(self) -> Map:
        return {**_header(self.KIND, self.rid), "nick": self.nick}


@dataclass(slots=True)
class Moderate:
    """An operator's action on ``nick`` in the private room ``room``.

    ``kind`` is one of invite, kick, ban, unban, op, deop (:data:`MODERATION_KINDS`);
    ``reason`` is shown with a kick or ban.
    """

    kind: RequestKind
    rid: int
    room: str
    nick: str
    reason: str = ""

    @classmethod
    def from_map(cls, m: Map, rid: int, limits: Limits = DEFAULT_LIMITS) -> Moderate:
        kind = RequestKind(get_str(m, "kind", rid))
        reason = get_str(m, "reason", rid, default="")
        if reason:
            check_text(reason, limits.max_subject)
        return cls(
            kind,
            rid,
            normalize_room(get_str(m, "room", rid), limits.max_room),
            normalize_nick(get_str(m, "nick", rid), limits.max_nick),
            reason,
        )

    def to_map(self) -> Map:
        out = {**_header(self.kind, self.rid), "room": self.room, "nick": self.nick}
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass(slots=True)
class SetTopic:
    """Set the topic (subject line) of ``room``; ``""`` clears it. Private rooms: operators only."""

    KIND: ClassVar[RequestKind] = RequestKind.TOPIC
    rid: int
    room: str
    text: str

    @classmethod
    def from_map(cls, m: Map, rid: int, limits: Limits = DEFAULT_LIMITS) -> SetTopic:
        text = get_str(m, "text", rid)
        if text:
            check_text(text, limits.max_subject)
        return cls(rid, normalize_room(get_str(m, "room", rid), limits.max_room), text)

    def to_map(self) -> Map:
        return {**_header(self.KIND, self.rid), "room": self.room, "text": self.text}


@dataclass(slots=True)
class History:
    """A page of a room's stored messages (``room``) or of this client's DMs (``dm``).

    With ``after``: the oldest ``limit`` messages with a greater seq (paging forwards, and
    gap repair). Otherwise the newest ``limit`` messages with a seq below ``before`` (or the
    newest of all): paging backwards.
    """

    KIND: ClassVar[RequestKind] = RequestKind.HISTORY
    rid: int
    room: str | None = None
    dm: bool = False
    before: int | None = None
    after: int | None = None
    limit: int | None = None

    @classmethod
    def from_map(cls, m: Map, rid: int, limits: Limits = DEFAULT_LIMITS) -> History:
        raw_room = get_opt_str(m, "room", rid)
        room = None if raw_room is None else normalize_room(raw_room, limits.max_room)
        dm = get_bool(m, "dm", rid)
        if (room is None) == (not dm):
            raise ProtocolError(ErrorCode.INVALID, "give exactly one of 'room' and 'dm': true", rid=rid, field="room")
        before, after = get_opt_int(m, "before", rid), get_opt_int(m, "after", rid)
        if before is not None and after is not None:
            raise ProtocolError(ErrorCode.INVALID, "give at most one of 'before' and 'after'", rid=rid, field="before")
        return cls(rid, room, dm, before, after, get_opt_int(m, "limit", rid))

    def to_map(self) -> Map:
        out = _header(self.KIND, self.rid)
        for key in ("room", "before", "after", "limit"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.dm:
            out["dm"] = True
        return out


@dataclass(slots=True)
class _Bare:
    """A request with no fields besides the header."""

    KIND: ClassVar[RequestKind]
    rid: int

    @classmethod
    def from_map(cls, m: Map, rid: int, limits: Limits = DEFAULT_LIMITS) -> Any:
        return cls(rid)

    def to_map(self) -> Map:
        return _header(self.KIND, self.rid)


@dataclass(slots=True)
class StatsRequest(_Bare):
    """The broker's counters (works without a session: health checks and ``status`` use it)."""

    KIND: ClassVar[RequestKind] = RequestKind.STATS


@dataclass(slots=True)
class Rooms(_Bare):
    """List the rooms that exist, with their member counts."""

    KIND: ClassVar[RequestKind] = RequestKind.ROOMS


@dataclass(slots=True)
class Ping(_Bare):
    """Keep the session alive and measure the round trip."""

    KIND: ClassVar[RequestKind] = RequestKind.PING


@dataclass(slots=True)
class Bye(_Bare):
    """End the session: leave every room and free the nick."""

    KIND: ClassVar[RequestKind] = RequestKind.BYE


@dataclass(slots=True)
class Away:
    """Mark this session away, ``text`` saying why (or until when); ``""`` marks it back."""

    KIND: ClassVar[RequestKind] = RequestKind.AWAY
    rid: int
    text: str = ""

    @classmethod
    def from_map(cls, m: Map, rid: int, limits: Limits = DEFAULT_LIMITS) -> Away:
        text = get_str(m, "text", rid, default="")
        if text:
            check_line(text, limits.max_subject)
        return cls(rid, text)

    def to_map(self) -> Map:
        return {**_header(self.KIND, self.rid), "text": self.text}


Request = (
    Hello | Join | Leave | Say | Dm | Who | Rooms | Nick | Ping | Bye | History | StatsRequest | Moderate | SetTopic
    | Away
)

REQUEST_TYPES: dict[str, type[Request]] = {
    **{
        cls.KIND.value: cls
        for cls in (Hello, Join, Leave, Say, Dm, Who, Rooms, Nick, Ping, Bye, History, StatsRequest, SetTopic, Away)
    },
    **{kind.value: Moderate for kind in MODERATION_KINDS},
}


# -- replies ------------------------------------------------------------------------------


@dataclass(slots=True)
class Welcome:
    """Reply to ``hello``: the session is open.

    ``topic`` is the session's private topic (its DMs arrive there); ``heartbeat`` is how
    often an idle client should ping, ``timeout`` how long a silent session lives;
    ``client`` is the client identity (the one sent, or one made up for the client);
    ``dm_seq`` the last seq of the client's DM inbox; ``resumed`` is true when the hello
    took over this client's live session from an earlier connection; ``max_page`` caps
    ``history`` pages; ``epoch`` identifies the broker's message history: when it differs
    from the one a reconnecting client saw before, the history started over (sequence
    numbers begin again) and the client must forget the ones it remembers. ``key`` is the
    client's CURVE public key (Z85) as the broker authenticated it, or "" in insecure mode.
    """

    KIND: ClassVar[ReplyKind] = ReplyKind.WELCOME
    rid: int
    nick: str
    topic: str
    motd: str
    heartbeat: float
    timeout: float
    client: str = ""
    dm_seq: int = 0
    resumed: bool = False
    max_page: int = 200
    epoch: int = 0
    key: str = ""

    @classmethod
    def from_map(cls, m: Map, rid: int) -> Welcome:
        return cls(
            rid,
            get_str(m, "nick"),
            get_str(m, "topic"),
            get_str(m, "motd"),
            get_float(m, "heartbeat"),
            get_float(m, "timeout"),
            # Fields added after the first v1 brokers: optional, so such a broker still works.
            get_str(m, "client", default=""),
            get_int(m, "dm_seq", default=0),
            get_bool(m, "resumed"),
            get_int(m, "max_page", default=200),
            get_int(m, "epoch", default=0),
            get_str(m, "key", default=""),
        )

    def to_map(self) -> Map:
        return {
            **_header(self.KIND, self.rid),
            "nick": self.nick,
            "topic": self.topic,
            "motd": self.motd,
            "heartbeat": self.heartbeat,
            "timeout": self.timeout,
            "client": self.client,
            "dm_seq": self.dm_seq,
            "resumed": self.resumed,
            "max_page": self.max_page,
            "epoch": self.epoch,
            "key": self.key,
        }


@dataclass(slots=True)
class Joined:
    """Reply to ``join``: subscribe to ``topic``; ``seq`` is the room's last message's seq.

    ``private`` says whether the room is invite-only; ``subject`` is the room's topic line
    (set with ``topic``); ``ops`` the nicks of the operators among the members; ``away``
    the members who are away, with why.
    """

    KIND: ClassVar[ReplyKind] = ReplyKind.JOINED
    rid: int
    room: str
    topic: str
    members: tuple[str, ...]
    seq: int = 0
    private: bool = False
    subject: str = ""
    ops: tuple[str, ...] = ()
    away: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_map(cls, m: Map, rid: int) -> Joined:
        members = get_str_list(m, "members")
        ops = get_str_list(m, "ops") if "ops" in m else ()
        return cls(rid, get_str(m, "room"), get_str(m, "topic"), members, get_int(m, "seq", default=0),
                   get_bool(m, "private"), get_str(m, "subject", default=""), ops, get_str_map(m, "away"))

    def to_map(self) -> Map:
        return {
            **_header(self.KIND, self.rid),
            "room": self.room,
            "topic": self.topic,
            "members": list(self.members),
            "seq": self.seq,
            "private": self.private,
            "subject": self.subject,
            "ops": list(self.ops),
            "away": dict(self.away),
        }


@dataclass(slots=True)
class Left:
    """Reply to ``leave``."""

    KIND: ClassVar[ReplyKind] = ReplyKind.LEFT
    rid: int
    room: str

    @classmethod
    def from_map(cls, m: Map, rid: int) -> Left:
        return cls(rid, get_str(m, "room"))

    def to_map(self) -> Map:
        return {**_header(self.KIND, self.rid), "room": self.room}


@dataclass(slots=True)
class Sent:
    """Reply to ``say`` and ``dm``, sent once the message is stored.

    ``id`` and ``ts`` are the message's; ``seq`` its place in the room (for a DM: in the
    sender's inbox); ``dup`` is true when a resend matched a stored message by ``cmid``
    (the original's id, ts and seq are returned and nothing new is stored); ``offline`` is
    true when no live session has the nick a DM named: it waits in the inbox of the key the
    nick is registered to; ``away`` is why a DM's recipient is away (``""``: not away).
    """

    KIND: ClassVar[ReplyKind] = ReplyKind.SENT
    rid: int
    id: int
    ts: float
    seq: int = 0
    dup: bool = False
    offline: bool = False
    away: str = ""

    @classmethod
    def from_map(cls, m: Map, rid: int) -> Sent:
        seq, dup, offline = get_int(m, "seq", default=0), get_bool(m, "dup"), get_bool(m, "offline")
        return cls(rid, get_int(m, "id"), get_float(m, "ts"), seq, dup, offline, get_str(m, "away", default=""))

    def to_map(self) -> Map:
        out = {"v": PROTOCOL_VERSION, "kind": "sent", "rid": self.rid, "id": self.id, "ts": self.ts, "seq": self.seq}
        if self.dup:
            out["dup"] = True
        if self.offline:
            out["offline"] = True
        if self.away:
            out["away"] = self.away
        return out


@dataclass(slots=True)
class Members:
    """Reply to ``who``: the room's members' nicks, sorted, which of them are operators, and
    which are away (nick -> why)."""

    KIND: ClassVar[ReplyKind] = ReplyKind.MEMBERS
    rid: int
    room: str
    members: tuple[str, ...]
    ops: tuple[str, ...] = ()
    away: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_map(cls, m: Map, rid: int) -> Members:
        ops = get_str_list(m, "ops") if "ops" in m else ()
        return cls(rid, get_str(m, "room"), get_str_list(m, "members"), ops, get_str_map(m, "away"))

    def to_map(self) -> Map:
        return {**_header(self.KIND, self.rid), "room": self.room, "members": list(self.members),
                "ops": list(self.ops), "away": dict(self.away)}


@dataclass(slots=True)
class RoomInfo:
    """One room in a ``rooms`` reply (private rooms are listed only to their members)."""

    name: str
    members: int
    private: bool = False


@dataclass(slots=True)
class RoomList:
    """Reply to ``rooms``: every room with its member count, sorted by name."""

    KIND: ClassVar[ReplyKind] = ReplyKind.ROOMS
    rid: int
    rooms: tuple[RoomInfo, ...]

    @classmethod
    def from_map(cls, m: Map, rid: int) -> RoomList:
        raw = get_map_list(m, "rooms", rid)
        return cls(rid, tuple(RoomInfo(get_str(r, "room"), get_int(r, "members"), get_bool(r, "private"))
                              for r in raw))

    def to_map(self) -> Map:
        return {
            **_header(self.KIND, self.rid),
            "rooms": [{"room": r.name, "members": r.members, "private": r.private} for r in self.rooms],
        }


@dataclass(slots=True)
class NickChanged:
    """Reply to ``nick``: the session's nick from now on."""

    KIND: ClassVar[ReplyKind] = ReplyKind.NICK
    rid: int
    nick: str

    @classmethod
    def from_map(cls, m: Map, rid: int) -> NickChanged:
        return cls(rid, get_str(m, "nick"))

    def to_map(self) -> Map:
        return {**_header(self.KIND, self.rid), "nick": self.nick}


@dataclass(slots=True)
class AwayChanged:
    """Reply to ``away``: the session's away text from now on (``""``: back)."""

    KIND: ClassVar[ReplyKind] = ReplyKind.AWAY
    rid: int
    text: str

    @classmethod
    def from_map(cls, m: Map, rid: int) -> AwayChanged:
        return cls(rid, get_str(m, "text"))

    def to_map(self) -> Map:
        return {**_header(self.KIND, self.rid), "text": self.text}


@dataclass(slots=True)
class Moderated:
    """Reply to invite, kick, ban, unban, op, deop and topic: done. ``nick`` is "" for topic."""

    KIND: ClassVar[ReplyKind] = ReplyKind.MODERATED
    rid: int
    room: str
    action: str
    nick: str = ""

    @classmethod
    def from_map(cls, m: Map, rid: int) -> Moderated:
        return cls(rid, get_str(m, "room"), get_str(m, "action"), get_str(m, "nick", default=""))

    def to_map(self) -> Map:
        return {**_header(self.KIND, self.rid), "room": self.room, "action": self.action, "nick": self.nick}


@dataclass(slots=True)
class Pong:
    """Reply to ``ping``: the broker's clock."""

    KIND: ClassVar[ReplyKind] = ReplyKind.PONG
    rid: int
    ts: float

    @classmethod
    def from_map(cls, m: Map, rid: int) -> Pong:
        return cls(rid, get_float(m, "ts"))

    def to_map(self) -> Map:
        return {**_header(self.KIND, self.rid), "ts": self.ts}


@dataclass(slots=True)
class Goodbye:
    """Reply to ``bye``: the session is over."""

    KIND: ClassVar[ReplyKind] = ReplyKind.GOODBYE
    rid: int

    @classmethod
    def from_map(cls, m: Map, rid: int) -> Goodbye:
        return cls(rid)

    def to_map(self) -> Map:
        return _header(self.KIND, self.rid)


@dataclass(slots=True)
class ErrorReply:
    """The broker refused a request. ``rid`` is None when the request was unreadable."""

    KIND: ClassVar[ReplyKind] = ReplyKind.ERROR
    rid: int | None
    code: ErrorCode
    reason: str
    retry_after: float | None = None

    @classmethod
    def from_map(cls, m: Map, rid: int | None) -> ErrorReply:
        code = get_str(m, "code")
        try:
            error_code = ErrorCode(code)
        except ValueError:
            raise _invalid("code", "a known error code", rid) from None
        retry = m.get("retry_after")
        return cls(rid, error_code, get_str(m, "reason"), None if retry is None else get_float(m, "retry_after"))

    @classmethod
    def from_exception(cls, exc: ProtocolError) -> ErrorReply:
        return cls(exc.rid, exc.code, exc.reason)

    def to_map(self) -> Map:
        out = {**_header(self.KIND, self.rid), "code": self.code.value, "reason": self.reason}
        if self.retry_after is not None:
            out["retry_after"] = self.retry_after
        return out


# -- events -------------------------------------------------------------------------------

#: Event kinds that are stored and sequenced.
STORED_KINDS = frozenset({EventKind.MESSAGE, EventKind.ACTION, EventKind.DM})


@dataclass(slots=True)
class Event:
    """Something that happened, published on a room's topic or a private topic.

    Attributes:
        kind: what happened.
        room: the room, or None for DMs and sync markers.
        sender: the nick of the session that caused it, stamped by the broker.
        text: the message text; a leave's, kick's or ban's reason; a sync marker's nonce; a
            topic event's new topic; a rekey's new topic to subscribe to; else "".
        ts: the broker's clock when it happened (seconds since the epoch).
        id: the broker's id for it, unique and increasing.
        to: for a DM, the recipient's nick.
        nick: for a nick change, the new nick (``sender`` is the old one); for invite, kick,
            ban, unban, op and deop, the nick acted on (``sender`` is the operator).
        seq: for stored kinds (message, action, dm) the place in its channel, gapless; for
            a tick, the channel's last seq; for a rekey, the room's last seq published on
            the old topic; else None.
    """

    kind: EventKind
    room: str | None
    sender: str
    text: str
    ts: float
    id: int
    to: str | None = None
    nick: str | None = None
    seq: int | None = None

    @classmethod
    def from_map(cls, m: Map) -> Event:
        kind = get_str(m, "kind")
        try:
            event_kind = EventKind(kind)
        except ValueError:
            raise ProtocolError(ErrorCode.UNKNOWN_KIND, f"unknown event kind {kind!r}") from None
        return cls(
            event_kind,
            get_opt_str(m, "room"),
            get_str(m, "sender"),
            get_str(m, "text"),
            get_float(m, "ts"),
            get_int(m, "id"),
            get_opt_str(m, "to"),
            get_opt_str(m, "nick"),
            get_opt_int(m, "seq"),
        )

    def to_map(self) -> Map:
        out: Map = {
            "v": PROTOCOL_VERSION,
            "kind": self.kind,  # a StrEnum packs as its value; .value costs a descriptor call
            "sender": self.sender,
            "text": self.text,
            "ts": self.ts,
            "id": self.id,
        }
        if self.room is not None:
            out["room"] = self.room
        if self.to is not None:
            out["to"] = self.to
        if self.nick is not None:
            out["nick"] = self.nick
        if self.seq is not None:
            out["seq"] = self.seq
        return out


@dataclass(slots=True)
class HistoryPage:
    """Reply to ``history``: stored events in seq order, and the channel's last seq.

    ``more`` is true when the page is full, so a further page may exist in the direction read.
    """

    KIND: ClassVar[ReplyKind] = ReplyKind.HISTORY
    rid: int
    room: str | None
    events: tuple[Event, ...]
    seq: int
    more: bool

    @classmethod
    def from_map(cls, m: Map, rid: int) -> HistoryPage:
        raw = get_map_list(m, "events", rid)
        events = tuple(Event.from_map(item) for item in raw)
        return cls(rid, get_opt_str(m, "room"), events, get_int(m, "seq"), get_bool(m, "more"))

    def to_map(self) -> Map:
        out = {
            **_header(self.KIND, self.rid),
            "events": [event.to_map() for event in self.events],
            "seq": self.seq,
            "more": self.more,
        }
        if self.room is not None:
            out["room"] = self.room
        return out


@dataclass(slots=True)
class StatsReply:
    """Reply to ``stats``: the broker's version, uptime and counters (name -> number)."""

    KIND: ClassVar[ReplyKind] = ReplyKind.STATS
    rid: int
    version: str
    uptime: float
    counters: dict[str, float]

    @classmethod
    def from_map(cls, m: Map, rid: int) -> StatsReply:
        raw = m.get("counters")
        if type(raw) is not dict or any(
            type(k) is not str or type(v) not in (int, float) for k, v in raw.items()
        ):
            raise _invalid("counters", "a map of names to numbers", rid)
        return cls(rid, get_str(m, "version"), get_float(m, "uptime"), dict(raw))

    def to_map(self) -> Map:
        return {**_header(self.KIND, self.rid), "version": self.version, "uptime": self.uptime,
                "counters": self.counters}


Reply = (
    Welcome | Joined | Left | Sent | Members | RoomList | NickChanged | Pong | Goodbye | ErrorReply | HistoryPage
    | StatsReply | Moderated | AwayChanged
)

REPLY_TYPES: dict[str, type[Reply]] = {
    cls.KIND.value: cls
    for cls in (
        Welcome, Joined, Left, Sent, Members, RoomList, NickChanged, Pong, Goodbye, ErrorReply, HistoryPage,
        StatsReply, Moderated, AwayChanged,
    )
}
