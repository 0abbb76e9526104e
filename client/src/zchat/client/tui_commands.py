"""The terminal UI's commands: the line mode's command language, acting on panes instead of stdout.

Lines are parsed by :func:`zchat.client.cli.parse_line`, so both front ends read the same
commands; what differs is what a reply does (a DM opens its pane, ``/history`` prepends older
messages to the pane). Errors end up inline in the current pane in the broker's own words.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from zchat.common.errors import ClientError, ProtocolError, RequestError, RequestTimeout
from zchat.common.names import normalize_room
from zchat.common.protocol import Event

from .aio import AsyncClient
from .cli import CLEAR_TOPIC, MODERATION_USAGE, describe_joined, moderate, parse_join, parse_line, parse_moderation
from .render import describe_own_away, describe_sent_dm, format_members, format_rooms
from .tui_state import Conversation, Conversations, Note, dm_key, room_key

HELP = """commands:
  /join ROOM         join ROOM and show it
  /create ROOM       create the private (invite-only) room ROOM and join it (= /join -p ROOM)
  /leave [ROOM]      leave ROOM (default: the one shown)
  /msg NICK [TEXT]   open a private conversation with NICK (and send TEXT)
  /me TEXT           an action here
  /who [ROOM]        who is in ROOM (default: the one shown)
  /rooms             every room, with member counts
  /nick NEW          change your nick
  /away [TEXT]       mark yourself away (TEXT: why; none: back again); /back also
  /history [N]       N older messages of this pane (default 50)
  /topic [TEXT]      show or set this room's topic (/topic -delete clears it)
private rooms, for their operators (in the room shown):
  /invite NICK [ROOM]  let NICK in (and tell them)
  /kick NICK [REASON]  put NICK out; /ban NICK [REASON] also keeps them out
  /unban NICK        lift NICK's ban (invite them to let them back)
  /op NICK, /deop NICK  give or take operator status (operators have an @)
  /quit, exit        leave zchat
  //TEXT             send TEXT starting with a slash
keys: Ctrl+N / Ctrl+P or Alt+1..9 switch panes, PageUp/PageDown scroll (PageUp at the top
fetches older messages), Up/Down recall what you typed, Tab completes nicks and /commands,
Ctrl+Q or Ctrl+C quit"""

#: Messages fetched by ``/history`` without a count.
DEFAULT_HISTORY = 50


class View(Protocol):
    """What the commands need of the app."""

    client: AsyncClient
    convs: Conversations

    @property
    def current(self) -> Conversation: ...

    def note(self, text: str, *, error: bool = False, conv: Conversation | None = None) -> None: ...

    def show(self, key: str) -> None: ...

    def drop(self, key: str) -> None: ...

    def redraw(self, conv: Conversation) -> None: ...

    def refresh_panels(self) -> None: ...

    def quit(self) -> None: ...


class Commands:
    """Runs input lines against the client, on behalf of a :class:`View`."""

    def __init__(self, view: View) -> None:
        self.view = view
        self.client = view.client
        self._fetching: set[str] = set()
        self._commands: dict[str, Callable[[str], Awaitable[None]]] = {
            "say": self._say,
            "me": self._me,
            "join": self._join,
            "create": self._create,
            "leave": self._leave,
            "part": self._leave,
            "msg": self._msg,
            "query": self._msg,
            "who": self._who,
            "names": self._who,
            "rooms": self._rooms,
            "nick": self._nick,
            "away": self._away,
            "back": self._back,
            "history": self._history,
            "topic": self._topic,
            "help": self._help,
            **{name: self._moderation(name) for name in MODERATION_USAGE},
        }

    async def run(self, line: str) -> bool:
        """Run one input line; False when it asks to quit. Errors become notes, never tracebacks."""
        command = parse_line(line)
        if command is None:
            return True
        if command.name == "quit":
            self.view.quit()
            return False
        handler = self._commands.get(command.name)
        if handler is None:
            self._error(f"unknown command /{command.name}; try /help")
            return True
        try:
            await handler(command.arg)
        except (RequestError, ProtocolError) as exc:
            self._error(exc.reason)
        except ClientError as exc:  # a timeout, or the connection closed under the request
            self._error(f"{exc} (is the broker there?)" if isinstance(exc, RequestTimeout) else str(exc))
        return True

    def _note(self, text: str) -> None:
        self.view.note(text)

    def _error(self, text: str) -> None:
        self.view.note(text, error=True)

    # -- talking -----------------------------------------------------------------------------

    async def _say(self, text: str, *, action: bool = False) -> None:
        conv = self.view.current
        if conv.room is not None:
            await self.client.say(conv.room, text, action=action)
        elif conv.peer is not None:
            await self._dm(conv.peer, text, action=action)
        else:
            self._error("this is the status pane: /join a room or /msg someone first")

    async def _me(self, text: str) -> None:
        if not text:
            return self._error("usage: /me TEXT")
        await self._say(text, action=True)

    async def _msg(self, arg: str) -> None:
        nick, _, text = arg.partition(" ")
        if not nick:
            return self._error("usage: /msg NICK [TEXT]")
        if text.strip():
            await self._dm(nick, text)  # an unknown nick fails here, before a pane opens
        self.view.convs.dm(nick)
        self.view.show(dm_key(nick))

    async def _dm(self, nick: str, text: str, *, action: bool = False) -> None:
        notice = describe_sent_dm(nick, await self.client.dm(nick, text, action=action))
        if notice is not None:
            self.view.note(notice, conv=self.view.convs.dm(nick))

    # -- rooms -------------------------------------------------------------------------------

    async def _join(self, arg: str, *, private: bool = False) -> None:
        parsed = parse_join(arg)
        if parsed is None:
            return self._error("usage: /create ROOM" if private else "usage: /join [-p] ROOM")
        arg, private = parsed[0], private or parsed[1]
        try:
            name: str | None = normalize_room(arg)
        except ProtocolError:
            name = None  # the broker says why, in its words
        if name is not None and name in self.client.joined:
            return self.view.show(room_key(name))
        fresh = name is not None and room_key(name) not in self.view.convs.by_key
        if name is not None and fresh:  # the note goes first: the room's history follows it
            self.view.note(f"you joined #{name}", conv=self.view.convs.room(name))
        try:
            joined = await self.client.join(arg, private=private)
        except BaseException:
            if name is not None and fresh:
                self.view.drop(room_key(name))
            raise
        conv = self.view.convs.room(joined.room)
        conv.set_members(joined.members, joined.ops, joined.away)
        conv.subject, conv.private = joined.subject, joined.private
        if joined.private or joined.subject:
            self.view.note(describe_joined(joined), conv=conv)
        self.view.show(room_key(joined.room))

    async def _create(self, arg: str) -> None:
        await self._join(arg, private=True)

    async def _leave(self, arg: str) -> None:
        room = arg.lstrip("#") if arg else self.view.current.room
        if not room:
            return self._error("usage: /leave ROOM (this pane is not a room)")
        await self.client.leave(room)
        self.view.drop(room_key(normalize_room(room)))
        self._note(f"you left #{normalize_room(room)}")

    async def _who(self, arg: str) -> None:
        room = arg.lstrip("#") if arg else self.view.current.room
        if not room:
            return self._error("usage: /who ROOM (this pane is not a room)")
        reply = await self.client.members(room)
        conv = self.view.convs.by_key.get(room_key(reply.room))
        if conv is not None:
            conv.set_members(reply.members, reply.ops, reply.away)
            self.view.refresh_panels()
        self._note(format_members(reply.room, reply.members, reply.ops, reply.away).removeprefix("-- "))

    async def _rooms(self, arg: str) -> None:
        self._note(format_rooms(await self.client.rooms()).removeprefix("-- "))

    async def _topic(self, arg: str) -> None:
        conv = self.view.current
        if conv.room is None:
            return self._error("/topic works in a room's pane")
        if not arg:
            return self._note(f"{conv.title}'s topic: {conv.subject}" if conv.subject else f"{conv.title} has no topic")
        await self.client.topic(conv.room, "" if arg == CLEAR_TOPIC else arg)

    def _moderation(self, name: str) -> Callable[[str], Awaitable[None]]:
        async def run(arg: str) -> None:
            parsed = parse_moderation(name, arg)
            if parsed is None:
                return self._error(f"usage: {MODERATION_USAGE[name]}")
            nick, rest = parsed
            room = rest.lstrip("#") if name == "invite" and rest else self.view.current.room
            if room is None:
                return self._error(f"{MODERATION_USAGE[name]} works in a room's pane (or name the room)")
            done = await moderate(self.client, name, room, nick, rest)
            self._note(f"done: {name} {done.nick or nick} in #{done.room}")

        return run

    # -- you ---------------------------------------------------------------------------------

    async def _nick(self, arg: str) -> None:
        if not arg:
            return self._error("usage: /nick NEW")
        self._note(f"you are now {await self.client.nick(arg)}")
        self.view.refresh_panels()

    async def _away(self, arg: str) -> None:
        text = await self.client.away(arg)
        self._note(describe_own_away(text))
        self.view.refresh_panels()  # the status line says it

    async def _back(self, arg: str) -> None:
        await self._away("")

    async def _help(self, arg: str) -> None:
        for line in HELP.splitlines():
            self._note(line)

    # -- scroll-back -------------------------------------------------------------------------

    async def _history(self, arg: str) -> None:
        if arg and not arg.isdigit():
            return self._error("usage: /history [N]")
        conv = self.view.current
        if conv.room is None:
            # The DM inbox is one feed for every peer: what it had at connect time was
            # delivered then (``--history`` of it), and older pages cannot be asked per peer.
            return self._error("/history works in a room's pane")
        if not await self.fetch_older(conv, int(arg) if arg else DEFAULT_HISTORY):
            self._note("no older messages")

    async def fetch_older(self, conv: Conversation, count: int) -> int:
        """Fetch up to ``count`` messages of ``conv``'s room older than those shown; prepend them.

        Returns how many were added (0 for a pane that is not a room's).
        """
        if conv.room is None or conv.exhausted or conv.key in self._fetching or count <= 0:
            return 0
        self._fetching.add(conv.key)
        try:
            older, conv.exhausted = await self._fetch(conv.room, conv.oldest_seq(), count)
        finally:
            self._fetching.discard(conv.key)
        added = conv.prepend(older)
        if conv.exhausted:
            conv.lines.insert(0, Note(f"the start of {conv.title}'s history"))
        if added or conv.exhausted:
            self.view.redraw(conv)
        return len(added)

    async def _fetch(self, room: str, before: int | None, count: int) -> tuple[list[Event], bool]:
        """Up to ``count`` messages before seq ``before`` (the newest if None), page by page,
        and whether they reach the first one kept (seq 1, or an empty page: older ones pruned).

        A short page is no sign of the end: the broker also caps a page's bytes.
        """
        older: list[Event] = []
        while len(older) < count:
            limit = min(count - len(older), self.client.core.max_page)
            page = await self.client.history(room, before=before, limit=limit)
            older[:0] = page
            if not page or page[0].seq == 1:
                return older, True
            before = page[0].seq
        return older, False
