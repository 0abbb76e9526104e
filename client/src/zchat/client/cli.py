"""``zchat-client``: chat on a terminal, or pipe lines in and events out.

On a terminal (stdin and stdout both ttys, no ``--plain``/``--json``) it is a full-screen
chat (:mod:`zchat.client.tui`): panes per room and DM, members, status and an input line.
Otherwise it runs in line mode for scripts: every input line is sent to the current room (a
line that starts with ``/`` is a command), every event is printed on one line (``--json``:
one JSON object per line), and end of input ends the client once its messages are
acknowledged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from zchat.common import config as c
from zchat.common.codes import ErrorCode
from zchat.common.errors import (
    AuthenticationFailed,
    ClientError,
    ConfigError,
    KeyFileError,
    RequestError,
    RequestTimeout,
)
from zchat.common.protocol import Event, Joined, Moderated, Welcome

from . import __version__
from .aio import AsyncClient, ClientState, curve_keys
from .render import (
    describe_own_away,
    describe_sent_dm,
    dumps,
    event_to_json,
    format_event,
    format_members,
    format_rooms,
    member_names,
)

OPTIONS = (
    c.Option("router", "--router", c.ENV_ROUTER, c.DEFAULT_ROUTER, c.parse_endpoint,
             "the broker's ROUTER endpoint", "ENDPOINT"),
    c.Option("pub", "--pub", c.ENV_PUB, c.DEFAULT_PUB, c.parse_endpoint,
             "the broker's XPUB endpoint", "ENDPOINT"),
    c.Option("nick", "--nick", c.ENV_NICK, None, c.parse_text,
             "your nick (asked for on a terminal when unset)", "NICK"),
    c.Option("room", "--room", c.ENV_ROOM, "general", c.parse_text,
             "the room to join at start", "ROOM"),
    c.Option("timeout", "--timeout", c.ENV_TIMEOUT, 5.0, c.parse_positive_float,
             "seconds to wait for each reply from the broker", "SECONDS"),
    c.Option("history", "--history", c.ENV_HISTORY, 50, c.parse_non_negative_int,
             "past messages shown when joining a room, and of your DM inbox when connecting", "COUNT"),
    c.Option("server_key", "--server-key", c.ENV_SERVER_KEY, None, c.parse_text,
             "the broker's CURVE public key: its .key file, or the key itself (with --key: encrypted "
             "and authenticated)", "KEY"),
    c.Option("key", "--key", c.ENV_KEY, None, c.parse_text,
             "your CURVE secret key file (NAME.key_secret from zchat-keygen, mode 0600)", "FILE"),
)

HELP = """commands:
  /join ROOM         join ROOM and make it the current room
  /create ROOM       create the private (invite-only) room ROOM and join it (= /join -p ROOM)
  /leave [ROOM]      leave ROOM (default: the current room)
  /msg NICK TEXT     send TEXT privately to NICK
  /me TEXT           an action in the current room
  /who [ROOM]        who is in ROOM (default: the current room)
  /rooms             every room, with member counts
  /nick NEW          change your nick
  /away [TEXT]       mark yourself away (TEXT: why; none: back again); /back also
  /history [N]       the last N messages of the current room (default 20)
  /topic TEXT        set the current room's topic (/topic -delete clears it)
private rooms, for their operators (in the current room):
  /invite NICK [ROOM]  let NICK in (and tell them)
  /kick NICK [REASON]  put NICK out; /ban NICK [REASON] also keeps them out
  /unban NICK        lift NICK's ban (invite them to let them back)
  /op NICK, /deop NICK  give or take operator status
  /quit, exit        leave zchat
  //TEXT             send TEXT starting with a slash
anything else is sent to the current room"""


@dataclass(frozen=True, slots=True)
class Command:
    """One input line: a command name (``say`` for plain text) and its argument text."""

    name: str
    arg: str


#: Moderation commands and their usage (``invite`` takes a room, ``kick``/``ban`` a reason).
MODERATION_USAGE = {
    "invite": "/invite NICK [ROOM]", "kick": "/kick NICK [REASON]", "ban": "/ban NICK [REASON]",
    "unban": "/unban NICK", "op": "/op NICK", "deop": "/deop NICK",
}  # fmt: skip

#: What ``/topic`` takes to clear the topic (as irssi's ``/topic -delete``).
CLEAR_TOPIC = "-delete"

#: Past tenses for the confirmation of a moderation command.
_DONE = {"invite": "invited", "kick": "kicked", "ban": "banned", "unban": "unbanned", "op": "opped", "deop": "deopped"}


def parse_join(arg: str) -> tuple[str, bool] | None:
    """``/join`` arguments: the room, and whether ``-p`` asks for a private room; None if bad."""
    words = arg.split()
    rooms = [w for w in words if w not in ("-p", "--private")]
    return (rooms[0], len(rooms) < len(words)) if len(rooms) == 1 else None


def parse_moderation(name: str, arg: str) -> tuple[str, str] | None:
    """A moderation command's target nick and the rest (a reason, or for invite a room).

    None when the nick is missing or words are left over where none are taken.
    """
    nick, _, rest = arg.strip().partition(" ")
    rest = rest.strip()
    if not nick or (rest and name not in ("kick", "ban", "invite")) or (name == "invite" and " " in rest):
        return None
    return nick, rest


def moderate(client: AsyncClient, name: str, room: str, nick: str, reason: str = "") -> Awaitable[Moderated]:
    """Run the moderation command ``name`` (a key of :data:`MODERATION_USAGE`) on ``nick``."""
    if name == "kick":
        return client.kick(room, nick, reason)
    if name == "ban":
        return client.ban(room, nick, reason)
    calls = {"invite": client.invite, "unban": client.unban, "op": client.op, "deop": client.deop}
    return calls[name](room, nick)


def describe_joined(joined: Joined) -> str:
    """``joined #room (private, 2 here: @alice, bob (away: lunch))``, then the room's topic
    if it has one."""
    kind = "private, " if joined.private else ""
    members = ", ".join(member_names(joined.members, joined.ops, joined.away))
    topic = f"; topic: {joined.subject}" if joined.subject else ""
    return f"joined #{joined.room} ({kind}{len(joined.members)} here: {members}){topic}"


def parse_line(line: str) -> Command | None:
    """Parse an input line; None for a blank line."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    if line.strip() == "exit":
        return Command("quit", "")
    if line.startswith("//"):
        return Command("say", line[1:])
    if line.startswith("/"):
        name, _, arg = line[1:].partition(" ")
        return Command(name.lower(), arg.strip())
    return Command("say", line)


class Output:
    """Where line mode writes: events on stdout (plain lines or JSON lines), the rest on
    stderr in plain mode (so a script reading stdout sees only events) or stdout in JSON."""

    def __init__(self, *, json_mode: bool) -> None:
        self.json_mode = json_mode
        self.me: str | None = None

    def event(self, event: Event) -> None:
        if self.json_mode:
            print(dumps(event_to_json(event)), flush=True)
        else:
            print(format_event(event, self.me, one_line=True), flush=True)

    def info(self, text: str, obj: dict[str, Any]) -> None:
        """A reply worth showing: plain text to the user, or ``obj`` as JSON."""
        if self.json_mode:
            print(dumps(obj), flush=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def status(self, text: str, state: str) -> None:
        """A change of connection state (``reconnecting``, ``connected``)."""
        self.info(f"-- {text}", {"kind": "status", "state": state})

    def error(self, code: str, reason: str) -> None:
        if self.json_mode:
            print(dumps({"kind": "error", "code": code, "reason": reason}), flush=True)
        else:
            print(f"!! {reason} ({code})", file=sys.stderr, flush=True)


class Chat:
    """Runs commands against a connected client, keeping track of the current room."""

    def __init__(self, client: AsyncClient, out: Output, room: str | None) -> None:
        self.client = client
        self.out = out
        self.room = room
        #: Lines that failed (an error reply, a timeout, a usage error): line mode exits 1.
        self.failures = 0
        self._commands: dict[str, Callable[[str], Awaitable[None]]] = {
            "say": self._say,
            "join": self._join,
            "create": self._create,
            "leave": self._leave,
            "part": self._leave,
            "msg": self._msg,
            "me": self._me,
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
        """Run one input line; False when it asks to quit."""
        command = parse_line(line)
        if command is None:
            return True
        if command.name == "quit":
            return False
        handler = self._commands.get(command.name)
        if handler is None:
            self._fail("unknown_command", f"unknown command /{command.name}; try /help")
            return True
        try:
            await handler(command.arg)
        except RequestError as exc:
            self._fail(exc.code.value, exc.reason)
        except RequestTimeout as exc:
            self._fail("timeout", str(exc))
        except ClientError as exc:  # e.g. the connection closed under the request: reconnecting
            self._fail("closed", str(exc))
        return True

    def _fail(self, code: str, reason: str) -> None:
        self.failures += 1
        self.out.error(code, reason)

    def _usage(self, text: str) -> None:
        self._fail("usage", f"usage: {text}")

    def _current_room(self) -> str | None:
        if self.room is not None and self.room not in self.client.joined:  # kicked or banned
            self._fail(ErrorCode.NOT_MEMBER.value, f"you are no longer in #{self.room}: /join a room")
            self.room = None
            return None
        if self.room is None:
            self._fail(ErrorCode.NOT_MEMBER.value, "you are in no room: /join one first")
        return self.room

    async def _say(self, text: str) -> None:
        if (room := self._current_room()) is not None:
            await self.client.say(room, text)

    async def _me(self, text: str) -> None:
        if not text:
            return self._usage("/me TEXT")
        if (room := self._current_room()) is not None:
            await self.client.say(room, text, action=True)

    async def _join(self, arg: str, *, private: bool = False) -> None:
        parsed = parse_join(arg)
        if parsed is None:
            return self._usage("/create ROOM" if private else "/join [-p] ROOM")
        joined = await self.client.join(parsed[0], private=private or parsed[1])
        self.room = joined.room
        obj = {"kind": "joined", "room": joined.room, "members": list(joined.members), "private": joined.private,
               "subject": joined.subject, "ops": list(joined.ops), "away": joined.away}
        self.out.info(f"-- {describe_joined(joined)}", obj)

    async def _create(self, arg: str) -> None:
        await self._join(arg, private=True)

    def _moderation(self, name: str) -> Callable[[str], Awaitable[None]]:
        async def run(arg: str) -> None:
            parsed = parse_moderation(name, arg)
            if parsed is None:
                return self._usage(MODERATION_USAGE[name])
            nick, rest = parsed
            room = rest.lstrip("#") if name == "invite" and rest else self._current_room()
            if room is None:
                return
            done = await moderate(self.client, name, room, nick, rest)
            obj = {"kind": "moderated", "room": done.room, "action": done.action, "nick": done.nick}
            self.out.info(f"-- {_DONE[name]} {done.nick or nick} in #{done.room}", obj)

        return run

    async def _topic(self, arg: str) -> None:
        if not arg:
            return self._usage(f"/topic TEXT (or /topic {CLEAR_TOPIC} to clear it)")
        if (room := self._current_room()) is None:
            return
        done = await self.client.topic(room, "" if arg == CLEAR_TOPIC else arg)
        self.out.info(f"-- topic of #{done.room} set", {"kind": "moderated", "room": done.room, "action": "topic"})

    async def _leave(self, arg: str) -> None:
        room = arg or self._current_room()
        if room is None:
            return
        await self.client.leave(room)
        self.out.info(f"-- left #{room.lstrip('#')}", {"kind": "left", "room": room.lstrip("#")})
        if self.room is not None and self.room not in self.client.joined:
            self.room = self.client.joined[-1] if self.client.joined else None

    async def _msg(self, arg: str) -> None:
        nick, _, text = arg.partition(" ")
        if not nick or not text.strip():
            return self._usage("/msg NICK TEXT")
        sent = await self.client.dm(nick, text)
        if (notice := describe_sent_dm(nick, sent)) is not None:
            kind, extra = ("offline", {}) if sent.offline else ("peer_away", {"text": sent.away})
            self.out.info(f"-- {notice}", {"kind": kind, "nick": nick, **extra})

    async def _who(self, arg: str) -> None:
        room = arg or self._current_room()
        if room is None:
            return
        reply = await self.client.members(room)
        obj = {"kind": "members", "room": reply.room, "members": list(reply.members), "ops": list(reply.ops),
               "away": reply.away}
        self.out.info(format_members(reply.room, reply.members, reply.ops, reply.away), obj)

    async def _rooms(self, arg: str) -> None:
        rooms = await self.client.rooms()
        obj = {"kind": "rooms", "rooms": [{"room": r.name, "members": r.members, "private": r.private} for r in rooms]}
        self.out.info(format_rooms(rooms), obj)

    async def _nick(self, arg: str) -> None:
        if not arg:
            return self._usage("/nick NEW")
        self.out.me = await self.client.nick(arg)
        self.out.info(f"-- you are now {self.out.me}", {"kind": "nick", "nick": self.out.me})

    async def _away(self, arg: str) -> None:
        text = await self.client.away(arg)
        self.out.info(f"-- {describe_own_away(text)}", {"kind": "away_set", "text": text})

    async def _back(self, arg: str) -> None:
        await self._away("")

    async def _history(self, arg: str) -> None:
        if arg and not arg.isdigit():
            return self._usage("/history [N]")
        if (room := self._current_room()) is None:
            return
        events = await self.client.history(room, limit=int(arg) if arg else 20)
        self.out.info(f"-- last {len(events)} messages of #{room}:", {"kind": "history", "room": room})
        for event in events:
            self.out.event(event)

    async def _help(self, arg: str) -> None:
        self.out.info(HELP, {"kind": "help", "text": HELP})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zchat-client", description="Chat on a zchat broker.")
    parser.add_argument("--version", action="version", version=f"zchat-client {__version__}")
    c.add_options(parser, OPTIONS)
    parser.add_argument("--plain", action="store_true", help="line mode even on a terminal")
    parser.add_argument("--json", action="store_true", help="line mode, one JSON object per line")
    return parser


async def _print_events(client: AsyncClient, out: Output) -> None:
    async for event in client.events():
        out.event(event)


async def _connect(client: AsyncClient, nick: str, out: Output) -> Welcome:
    welcome = await client.connect(nick)
    out.me = welcome.nick
    out.info(
        f"-- connected as {welcome.nick}. {welcome.motd}".rstrip(),
        {"kind": "welcome", "nick": welcome.nick, "motd": welcome.motd},
    )
    return welcome


async def run_lines(client: AsyncClient, chat: Chat, lines: asyncio.Queue[str | None]) -> None:
    """Line mode: run each input line until end of input or /quit."""
    while (line := await lines.get()) is not None:
        if not await chat.run(line):
            return


def _read_stdin(loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[str | None]) -> None:
    # A thread, not connect_read_pipe: stdin may be a regular file, which asyncio cannot watch.
    for line in sys.stdin:
        loop.call_soon_threadsafe(lines.put_nowait, line)
    loop.call_soon_threadsafe(lines.put_nowait, None)


async def line_mode(client: AsyncClient, values: dict[str, Any], out: Output) -> int:
    if not values["nick"]:
        out.error("usage", f"--nick (or {c.ENV_NICK}) is required when stdin is not a terminal")
        return 2
    await _connect(client, values["nick"], out)
    chat = Chat(client, out, None)
    printer = asyncio.create_task(_print_events(client, out))
    await chat.run(f"/join {values['room']}")
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    threading.Thread(target=_read_stdin, args=(asyncio.get_running_loop(), lines), daemon=True).start()
    try:
        await run_lines(client, chat, lines)
    finally:
        await client.close()
        await printer
    return 1 if chat.failures else 0


def _state_reporter(out: Output) -> Callable[[ClientState], None]:
    def report(state: ClientState) -> None:
        if state is ClientState.RECONNECTING:
            out.status("connection lost; reconnecting…", state.value)
        elif state is ClientState.CONNECTED and out.me is not None:
            out.status("reconnected", state.value)

    return report


async def amain(values: dict[str, Any], *, json_mode: bool, tty: bool) -> int:
    if tty:
        from .tui import run_tui  # imports Textual: only on a terminal

        return await run_tui(values)
    out = Output(json_mode=json_mode)
    client = AsyncClient(
        values["router"],
        values["pub"],
        timeout=values["timeout"],
        history=values["history"],
        # A line waits for its acknowledgement through reconnects, but not for ever.
        send_timeout=values["timeout"] * 6,
        on_state=_state_reporter(out),
        server_key=values["server_key"],
        key=values["key"],
    )
    try:
        return await line_mode(client, values, out)
    except AuthenticationFailed as exc:
        out.error(exc.failure.value, str(exc))
        return 1
    except RequestTimeout:
        out.error("unreachable", f"no answer from the broker at {values['router']} within {values['timeout']:g} s")
        return 1
    except RequestError as exc:
        out.error(exc.code.value, exc.reason)
        return 1
    except ClientError as exc:
        out.error("closed", str(exc))
        return 1
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        values = c.resolve(OPTIONS, args, os.environ, section="client")
        # Read the key files now: a missing or too open one is a usage error (exit 2).
        curve = curve_keys(values["server_key"], values["key"])
    except (ConfigError, KeyFileError) as exc:
        parser.error(str(exc))
    values["server_key"], values["key"] = curve if curve is not None else (None, None)
    # The user sees connection trouble as status lines; library warnings only with the env set.
    c.setup_logging(c.parse_log_level(os.environ.get(c.ENV_LOG_LEVEL, "error")))
    tty = sys.stdin.isatty() and sys.stdout.isatty() and not args.plain and not args.json
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(amain(values, json_mode=args.json, tty=tty))
    return 130
