"""What the terminal UI knows, free of widgets and sockets: conversations, input history, completion.

The app (:mod:`zchat.client.tui`) feeds events and replies in here and draws what comes out;
everything here can be tested without a terminal or a broker.

- A :class:`Conversation` is one pane: the status pane, a room, or a DM with one nick. It holds
  its scrollback (events and notes, oldest first), its unread and highlight counts and, for a
  room, its members.
- :func:`mentions` finds your nick in a message; :func:`highlights` says whether an event
  is for you (a DM, or a message naming you), as IRC clients mark them.
- :class:`Conversations` routes each event to its pane and keeps member lists current.
- :class:`InputHistory` recalls typed lines; :class:`Completer` completes nicks and /commands.
"""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from zchat.common.codes import EventKind
from zchat.common.names import nick_key
from zchat.common.protocol import Event

#: Colours for nicks; a nick always gets the same one (a CRC of its key picks it).
PALETTE = (
    "red", "green", "yellow", "blue", "magenta", "cyan",
    "bright_red", "bright_green", "bright_yellow", "bright_blue", "bright_magenta", "bright_cyan",
    "orange1", "orchid", "spring_green2", "deep_sky_blue1", "gold1", "hot_pink",
)  # fmt: skip

#: The key of the status pane (welcome, replies to /rooms, errors before any room is joined).
STATUS = "*"

#: Kinds that count as unread in a pane that is not shown.
UNREAD_KINDS = frozenset({EventKind.MESSAGE, EventKind.ACTION, EventKind.DM})

#: Commands offered by tab completion (the TUI's own and those of the line mode).
COMMANDS = (
    "/away", "/back", "/ban", "/create", "/deop", "/help", "/history", "/invite", "/join", "/kick", "/leave", "/me",
    "/msg", "/nick", "/op", "/quit", "/rooms", "/topic", "/unban", "/who",
)  # fmt: skip

#: Room events that change who is in a room, who operates it, or its topic.
ROOM_KINDS = frozenset({
    EventKind.JOIN, EventKind.LEAVE, EventKind.NICK, EventKind.INVITE, EventKind.KICK, EventKind.BAN,
    EventKind.UNBAN, EventKind.OP, EventKind.DEOP, EventKind.TOPIC, EventKind.AWAY,
})  # fmt: skip


def nick_colour(nick: str) -> str:
    """The palette colour of ``nick``: stable across runs and equal for nicks that are one nick."""
    return PALETTE[zlib.crc32(nick_key(nick).encode()) % len(PALETTE)]


def room_key(room: str) -> str:
    return "#" + room


def mentions(text: str, nick: str | None) -> list[tuple[int, int]]:
    """Where ``nick`` appears in ``text`` as a word of its own, ignoring case: the spans."""
    if not nick:
        return []
    return [m.span() for m in re.finditer(rf"(?<!\w){re.escape(nick)}(?!\w)", text, re.IGNORECASE)]


def highlights(event: Event, me: str | None) -> bool:
    """Whether ``event`` is for you: a DM from someone else, or a message or action naming you."""
    if me is None or nick_key(event.sender) == nick_key(me):
        return False
    if event.kind is EventKind.DM:
        return True
    return event.kind in (EventKind.MESSAGE, EventKind.ACTION) and bool(mentions(event.text, me))


def dm_key(nick: str) -> str:
    return "@" + nick_key(nick)


def dm_peer(event: Event, me: str | None) -> str:
    """The other side of a DM: its recipient if ``me`` sent it, else its sender."""
    mine = me is not None and nick_key(event.sender) == nick_key(me)
    return event.to if mine and event.to is not None else event.sender


@dataclass(frozen=True, slots=True)
class Note:
    """A line of the client's own in a pane: a reply, a usage hint or an error."""

    text: str
    error: bool = False
    ts: float = field(default_factory=time.time)


Line = Event | Note


@dataclass
class Conversation:
    """One pane: ``room`` set for a room, ``peer`` for a DM, neither for the status pane."""

    key: str
    room: str | None = None
    peer: str | None = None
    lines: list[Line] = field(default_factory=list)
    unread: int = 0
    highlights: int = 0  # of the unread: DMs to you and messages naming you
    members: dict[str, str] = field(default_factory=dict)  # nick key -> nick as shown
    ops: set[str] = field(default_factory=set)  # nick keys of the room's operators
    away: dict[str, str] = field(default_factory=dict)  # nick key -> why, for members who are away
    subject: str = ""  # the room's topic line
    private: bool = False  # an invite-only room
    exhausted: bool = False  # scrolled back to the first stored message

    @property
    def title(self) -> str:
        if self.room is not None:
            return "#" + self.room
        return self.peer if self.peer is not None else "zchat"

    def oldest_seq(self) -> int | None:
        """The seq of the oldest stored message shown here (None if none is)."""
        return min((line.seq for line in self.lines if isinstance(line, Event) and line.seq is not None), default=None)

    def set_members(
        self, nicks: Iterable[str], ops: Iterable[str] | None = None, away: dict[str, str] | None = None
    ) -> None:
        """The room's members (and operators, and who is away, when known)."""
        self.members = {nick_key(n): n for n in nicks}
        if ops is not None:
            self.ops = {nick_key(n) for n in ops}
        if away is not None:
            self.away = {nick_key(n): why for n, why in away.items()}

    def is_op(self, nick: str) -> bool:
        return nick_key(nick) in self.ops

    def away_why(self, nick: str) -> str:
        """Why ``nick`` is away ("": it is not)."""
        return self.away.get(nick_key(nick), "")

    def prepend(self, events: Iterable[Event]) -> list[Event]:
        """Put older ``events`` before the scrollback; return those not already shown."""
        shown = {line.id for line in self.lines if isinstance(line, Event)}
        fresh = [e for e in events if e.id not in shown]
        self.lines[:0] = fresh
        return fresh


class Conversations:
    """Every open pane, in sidebar order: the status pane, then rooms and DMs as they opened."""

    def __init__(self) -> None:
        self.by_key: dict[str, Conversation] = {STATUS: Conversation(STATUS)}

    def ordered(self) -> list[Conversation]:
        return list(self.by_key.values())

    def room(self, name: str) -> Conversation:
        """The pane of room ``name`` (opened if new)."""
        return self.by_key.setdefault(room_key(name), Conversation(room_key(name), room=name))

    def dm(self, nick: str) -> Conversation:
        """The pane of the DM conversation with ``nick`` (opened if new; shown as last seen)."""
        conv = self.by_key.setdefault(dm_key(nick), Conversation(dm_key(nick), peer=nick))
        conv.peer = nick
        return conv

    def close(self, key: str) -> None:
        if key != STATUS:
            self.by_key.pop(key, None)

    def route(self, event: Event, me: str | None) -> Conversation | None:
        """The pane ``event`` belongs in, its members updated; None for events no pane shows."""
        if event.kind is EventKind.DM:
            return self.dm(dm_peer(event, me))
        if event.room is None or (event.kind not in UNREAD_KINDS and event.kind not in ROOM_KINDS):
            return None
        if event.kind is EventKind.INVITE and room_key(event.room) not in self.by_key:
            return self.by_key[STATUS]  # an invitation to a room not open here
        conv = self.room(event.room)
        self._update(conv, event, me)
        return conv

    @staticmethod
    def _update(conv: Conversation, event: Event, me: str | None) -> None:
        """Keep ``conv``'s members, operators and topic as ``event`` changes them."""
        members, kind = conv.members, event.kind
        target = nick_key(event.nick) if event.nick is not None else None
        if kind is EventKind.JOIN:
            members[nick_key(event.sender)] = event.sender
            conv.away.pop(nick_key(event.sender), None)  # an away event follows if it is away
        elif kind is EventKind.LEAVE:
            members.pop(nick_key(event.sender), None)
            conv.ops.discard(nick_key(event.sender))
            conv.away.pop(nick_key(event.sender), None)
        elif kind is EventKind.NICK and event.nick is not None:
            members.pop(nick_key(event.sender), None)
            members[nick_key(event.nick)] = event.nick
            if nick_key(event.sender) in conv.ops:
                conv.ops = (conv.ops - {nick_key(event.sender)}) | {nick_key(event.nick)}
            if nick_key(event.sender) in conv.away:
                conv.away[nick_key(event.nick)] = conv.away.pop(nick_key(event.sender))
        elif kind in (EventKind.KICK, EventKind.BAN) and target is not None:
            if me is not None and target == nick_key(me):  # we are out: the lists are no longer ours
                members.clear()
                conv.ops.clear()
                conv.away.clear()
            members.pop(target, None)
            conv.ops.discard(target)
            conv.away.pop(target, None)
        elif kind is EventKind.OP and target is not None:
            conv.ops.add(target)
        elif kind is EventKind.DEOP and target is not None:
            conv.ops.discard(target)
        elif kind is EventKind.TOPIC:
            conv.subject = event.text
        elif kind is EventKind.AWAY:
            if event.text:
                conv.away[nick_key(event.sender)] = event.text
            else:
                conv.away.pop(nick_key(event.sender), None)


class InputHistory:
    """Lines typed so far, recalled with up/down like a shell; the line being typed is kept."""

    def __init__(self, limit: int = 500) -> None:
        self.entries: list[str] = []
        self.limit = limit
        self._pos = 0  # == len(entries): at the draft
        self._draft = ""

    def push(self, line: str) -> None:
        if line.strip() and (not self.entries or self.entries[-1] != line):
            self.entries.append(line)
            del self.entries[: -self.limit]
        self._pos, self._draft = len(self.entries), ""

    def previous(self, current: str) -> str | None:
        """The line before the one shown (None at the oldest); ``current`` is kept as the draft."""
        if self._pos == 0:
            return None
        if self._pos == len(self.entries):
            self._draft = current
        self._pos -= 1
        return self.entries[self._pos]

    def next(self) -> str | None:
        """The line after the one shown, the draft after the newest, None when at the draft."""
        if self._pos >= len(self.entries):
            return None
        self._pos += 1
        return self._draft if self._pos == len(self.entries) else self.entries[self._pos]


@dataclass
class Completer:
    """Tab completion of the word before the cursor; pressing Tab again cycles the matches."""

    _last: tuple[str, int] | None = None  # (value, cursor) this completer produced
    _matches: list[str] = field(default_factory=list)
    _index: int = 0
    _start: int = 0
    _tail: str = ""

    def complete(self, value: str, cursor: int, nicks: Iterable[str]) -> tuple[str, int] | None:
        """The new (value, cursor) after a Tab, or None when nothing matches."""
        if self._last == (value, cursor) and len(self._matches) > 1:
            self._index = (self._index + 1) % len(self._matches)
        else:
            self._start = value.rfind(" ", 0, cursor) + 1
            word, self._tail = value[self._start : cursor], value[cursor:]
            self._matches = self._candidates(word, self._start == 0, nicks)
            self._index = 0
            if not self._matches:
                self._last = None
                return None
        match = self._matches[self._index]
        suffix = ": " if self._start == 0 and not match.startswith("/") else " "
        head = value[: self._start] + match + suffix
        self._last = (head + self._tail, len(head))
        return self._last

    @staticmethod
    def _candidates(word: str, first: bool, nicks: Iterable[str]) -> list[str]:
        if first and word.startswith("/"):
            return [c for c in COMMANDS if c.startswith(word.lower())]
        if not word:
            return []
        prefix = nick_key(word)
        return sorted({n for n in nicks if nick_key(n).startswith(prefix)}, key=nick_key)
