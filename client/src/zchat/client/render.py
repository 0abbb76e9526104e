"""How the command-line client shows events and replies: plain text or JSON lines."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from zchat.common.codes import EventKind
from zchat.common.names import nick_key
from zchat.common.protocol import Event, RoomInfo, Sent


def event_to_json(event: Event) -> dict[str, Any]:
    """The JSON object for ``event``: always kind, room, sender, text, ts and id."""
    out: dict[str, Any] = {
        "kind": event.kind.value,
        "room": event.room,
        "sender": event.sender,
        "text": event.text,
        "ts": event.ts,
        "id": event.id,
    }
    if event.to is not None:
        out["to"] = event.to
    if event.nick is not None:
        out["nick"] = event.nick
    return out


def dumps(obj: dict[str, Any]) -> str:
    """One JSON line (non-ASCII kept as is)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def format_event(event: Event, me: str | None, *, one_line: bool = True) -> str:
    """A human-readable line for ``event``; ``me`` is this session's nick (for DMs).

    With ``one_line`` a newline inside a message is shown as ``\\n`` so every event is one line.
    """
    text = event.text.replace("\n", "\\n") if one_line else event.text.replace("\n", "\n    ")
    where = f"#{event.room}" if event.room is not None else ""
    kind = event.kind
    if kind is EventKind.MESSAGE:
        body = f"{where} <{event.sender}> {text}"
    elif kind is EventKind.ACTION:
        body = f"{where} * {event.sender} {text}"
    elif kind is EventKind.JOIN:
        body = f"{where} --> {event.sender} joined"
    elif kind is EventKind.LEAVE:
        body = f"{where} <-- {event.sender} left ({text})" if text else f"{where} <-- {event.sender} left"
    elif kind is EventKind.NICK:
        body = f"{where} -- {event.sender} is now known as {event.nick}"
    elif kind is EventKind.AWAY:
        body = f"{where} -- {describe_away(event.sender, text)}"
    elif kind is EventKind.DM:
        outgoing = event.sender == me and event.to != me
        body = f"-> *{event.to}* {text}" if outgoing else f"*{event.sender}* {text}"
    elif kind in MODERATION_EVENTS:
        body = f"{where} * {describe_moderation(event, me)}"
    else:
        body = f"-- {kind.value} {text}"
    return f"{_clock(event.ts)} {body}"


#: Event kinds of private rooms and moderation, shown by :func:`describe_moderation`.
MODERATION_EVENTS = frozenset({
    EventKind.INVITE, EventKind.KICK, EventKind.BAN, EventKind.UNBAN, EventKind.OP, EventKind.DEOP, EventKind.TOPIC,
})  # fmt: skip


def describe_moderation(event: Event, me: str | None) -> str:
    """``alice kicked bob (spam)``: a moderation event in words (the room is not named).

    An invitation of ``me`` says how to accept it.
    """
    who, nick, why = event.sender, event.nick or "?", f" ({event.text})" if event.text else ""
    kind = event.kind
    if kind is EventKind.INVITE and me is not None and nick_key(nick) == nick_key(me):
        return f"{who} invites you to #{event.room} (/join {event.room})"
    if kind is EventKind.TOPIC:
        return f"{who} set the topic: {event.text}" if event.text else f"{who} cleared the topic"
    templates = {
        EventKind.INVITE: "{who} invited {nick}", EventKind.KICK: "{who} kicked {nick}{why}",
        EventKind.BAN: "{who} banned {nick}{why}", EventKind.UNBAN: "{who} unbanned {nick}",
        EventKind.OP: "{who} made {nick} an operator", EventKind.DEOP: "{who} took operator status from {nick}",
    }  # fmt: skip
    return templates.get(kind, "{who} {kind} {nick}{why}").format(who=who, nick=nick, why=why, kind=kind.value)


def describe_away(nick: str, why: str) -> str:
    """``bob is away: lunch``, or ``bob is back`` when ``why`` is empty."""
    return f"{nick} is away: {why}" if why else f"{nick} is back"


def describe_own_away(why: str) -> str:
    """What ``/away`` says: ``you are away: lunch``, or ``you are back``."""
    return f"you are away: {why}" if why else "you are back"


def describe_sent_dm(nick: str, sent: Sent) -> str | None:
    """What a DM's ``sent`` tells its sender about ``nick``, if anything: that it waits in
    their inbox, or that they are away."""
    if sent.offline:
        return f"{nick} is offline: the message waits in their inbox"
    return describe_away(nick, sent.away) if sent.away else None


def format_members(
    room: str, members: Iterable[str], ops: Iterable[str] = (), away: dict[str, str] | None = None
) -> str:
    """``-- #room: 2 here: @alice, bob (away: lunch)``."""
    names = member_names(members, ops, away)
    return f"-- #{room}: {len(names)} here: {', '.join(names)}"


def member_names(members: Iterable[str], ops: Iterable[str] = (), away: dict[str, str] | None = None) -> list[str]:
    """``members`` as IRC shows them: an ``@`` before each operator's nick, and after each
    away member's nick why it is away."""
    op_keys = {nick_key(nick) for nick in ops}
    gone = {nick_key(nick): why for nick, why in (away or {}).items()}
    names = []
    for nick in members:
        key = nick_key(nick)
        names.append(("@" if key in op_keys else "") + nick + (f" (away: {gone[key]})" if key in gone else ""))
    return names


def format_rooms(rooms: list[RoomInfo]) -> str:
    if not rooms:
        return "-- no rooms"
    return "-- rooms: " + ", ".join(f"#{r.name} ({r.members}{', private' if r.private else ''})" for r in rooms)
