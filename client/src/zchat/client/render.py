"""How the command-line client shows events and replies: plain text or JSON lines."""

from __future__ import annotations

import json
import time
from typing import Any

from zchat.common.codes import EventKind
from zchat.common.protocol import Event, RoomInfo


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
    elif kind is EventKind.DM:
        outgoing = event.sender == me and event.to != me
        body = f"-> *{event.to}* {text}" if outgoing else f"*{event.sender}* {text}"
    else:
        body = f"-- {kind.value} {text}"
    return f"{_clock(event.ts)} {body}"


def format_members(room: str, members: list[str]) -> str:
    return f"-- #{room}: {len(members)} here: {', '.join(members)}"


def format_rooms(rooms: list[RoomInfo]) -> str:
    if not rooms:
        return "-- no rooms"
    return "-- rooms: " + ", ".join(f"#{r.name} ({r.members})" for r in rooms)
