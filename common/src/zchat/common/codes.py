"""The enums of the wire protocol: request, reply and event kinds, and error codes.

Their values are the strings that travel in envelopes; PROTOCOL.md documents each one.
"""

from __future__ import annotations

from enum import StrEnum


class RequestKind(StrEnum):
    """``kind`` of a request a client sends to the broker's ROUTER socket."""

    HELLO = "hello"
    JOIN = "join"
    LEAVE = "leave"
    SAY = "say"
    DM = "dm"
    WHO = "who"
    ROOMS = "rooms"
    NICK = "nick"
    PING = "ping"
    BYE = "bye"
    HISTORY = "history"
    STATS = "stats"
    # Moderation of private rooms (operators only); one request shape, see Moderate.
    INVITE = "invite"
    KICK = "kick"
    BAN = "ban"
    UNBAN = "unban"
    OP = "op"
    DEOP = "deop"
    TOPIC = "topic"  # set a room's topic (its subject line)
    AWAY = "away"  # mark the session away (with a reason) or back


#: The request kinds :class:`~zchat.common.protocol.Moderate` carries.
MODERATION_KINDS = frozenset(
    {RequestKind.INVITE, RequestKind.KICK, RequestKind.BAN, RequestKind.UNBAN, RequestKind.OP, RequestKind.DEOP}
)


class ReplyKind(StrEnum):
    """``kind`` of a reply the broker sends back over ROUTER/DEALER."""

    WELCOME = "welcome"  # hello
    JOINED = "joined"  # join
    LEFT = "left"  # leave
    SENT = "sent"  # say, dm
    MEMBERS = "members"  # who
    ROOMS = "rooms"  # rooms
    NICK = "nick"  # nick
    PONG = "pong"  # ping
    GOODBYE = "goodbye"  # bye
    HISTORY = "history"  # history
    STATS = "stats"  # stats
    MODERATED = "moderated"  # invite, kick, ban, unban, op, deop, topic
    AWAY = "away"  # away
    ERROR = "error"  # any request


class EventKind(StrEnum):
    """``kind`` of an envelope the broker publishes on its XPUB socket."""

    MESSAGE = "message"
    ACTION = "action"
    JOIN = "join"
    LEAVE = "leave"
    NICK = "nick"
    DM = "dm"
    SYNC = "sync"
    TICK = "tick"
    GOAWAY = "goaway"
    # Moderation, published on the room's topic (invite and kick also on the target's
    # private topic); rekey on each remaining member's private topic.
    INVITE = "invite"
    KICK = "kick"
    BAN = "ban"
    UNBAN = "unban"
    OP = "op"
    DEOP = "deop"
    TOPIC = "topic"
    REKEY = "rekey"  # a private room moved to a new topic: subscribe to it (text) instead
    AWAY = "away"  # a member went away (text: why) or came back (text "")


class ErrorCode(StrEnum):
    """``code`` of an error reply. Documented, with who is at fault, in PROTOCOL.md."""

    # The request could not be read.
    MALFORMED = "malformed"  # not msgpack, not a map, or trailing bytes
    BAD_FRAMES = "bad_frames"  # not exactly one non-empty frame
    TOO_LARGE = "too_large"  # frame over the size limit
    BAD_VERSION = "bad_version"  # protocol version not spoken by this broker
    UNKNOWN_KIND = "unknown_kind"  # kind is not a request kind
    INVALID = "invalid"  # a field is missing or has the wrong type
    INVALID_NICK = "invalid_nick"
    INVALID_ROOM = "invalid_room"
    INVALID_TEXT = "invalid_text"
    # The request was read but cannot be done.
    NO_SESSION = "no_session"  # say hello first (or the session expired)
    ALREADY_HELLO = "already_hello"  # this connection already has a session
    NICK_TAKEN = "nick_taken"
    NO_SUCH_NICK = "no_such_nick"
    NO_SUCH_ROOM = "no_such_room"
    NOT_MEMBER = "not_member"
    TOO_MANY_ROOMS = "too_many_rooms"
    SERVER_FULL = "server_full"  # the broker's session limit is reached
    # The broker cannot do it now; retry after retry_after seconds.
    NOT_INVITED = "not_invited"  # the room is private and you are not on its member list
    BANNED = "banned"  # you are banned from this private room
    NOT_OPERATOR = "not_operator"  # only the room's operators may do that
    NOT_PRIVATE = "not_private"  # moderation applies to private rooms only
    ROOM_EXISTS = "room_exists"  # a private room was asked for, but a public one has that name
    TOO_MANY_NICKS = "too_many_nicks"  # the key owns as many nicks as it may
    TOO_MANY_SESSIONS = "too_many_sessions"  # the key has as many sessions open as it may
    UNAUTHORIZED = "unauthorized"  # the connection's key may not do that (e.g. resume another key's session)
    # The broker cannot do it now; retry after retry_after seconds.
    UNAVAILABLE = "unavailable"  # the message store refused the write (disk full, I/O error)
    RATE_LIMITED = "rate_limited"  # over a flood-control limit: wait retry_after seconds
