"""Size and count limits, all in one place, with safe defaults.

The broker is configured with one :class:`Limits`; the codec and the broker core read it,
and the broker applies ``max_frame`` to its sockets as ZMQ_MAXMSGSIZE as well.
"""

from __future__ import annotations

from dataclasses import dataclass

from .names import MAX_NICK_LENGTH, MAX_ROOM_LENGTH


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one peer may send or hold.

    Attributes:
        max_frame: largest request frame, in bytes (also ZMQ_MAXMSGSIZE on the ROUTER).
        max_text: longest message text, in characters.
        max_nick: longest nick, in characters.
        max_room: longest room name, in characters.
        max_rooms_per_session: how many rooms one session may be in at once.
        max_sessions: how many sessions the broker holds at once.
        max_sessions_per_key: how many sessions one client key may hold at once (secure mode).
        max_nicks_per_key: how many nicks one client key may own (secure mode).
        max_subject: longest room topic (subject line), in characters (IRC's TOPICLEN).
        max_private_rooms_per_key: how many private rooms one principal may create (they
            are kept for good, so this bounds what one key can make the broker store).
    """

    max_frame: int = 64 * 1024
    max_text: int = 4000
    max_nick: int = MAX_NICK_LENGTH
    max_room: int = MAX_ROOM_LENGTH
    max_rooms_per_session: int = 100
    max_sessions: int = 20_000
    max_sessions_per_key: int = 10
    max_nicks_per_key: int = 10
    max_subject: int = 390
    max_private_rooms_per_key: int = 100


DEFAULT_LIMITS = Limits()
