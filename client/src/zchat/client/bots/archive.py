"""``archive``: writes every event of its rooms to JSON-lines files.

Layout: ``DIR/ROOM/YYYY-MM-DD.jsonl``, one file per room per day (the UTC date of each
event's broker timestamp). With ``--max-bytes``, a day's file that would grow past that
size is continued in ``YYYY-MM-DD_0001.jsonl``, ``_0002.jsonl``, … (names that sort in
order, so ``cat DIR/ROOM/*.jsonl`` reads the room from the start); a restarted archive
appends to the newest. Each line is one event::

    {"room": "general", "seq": 7, "id": 1795277899175862, "ts": 1795277899.17,
     "time": "2026-11-21T10:18:19.175+00:00", "kind": "message", "sender": "alice", "text": "hi"}

the same fields as ``zchat-broker export`` (``seq`` is null for join, leave and nick events;
a nick event adds ``"nick"``, the new nick). Lines are flushed as they are written, so
``tail -f`` shows them at once.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from zchat.client.bot import Bot, Context
from zchat.common.codes import EventKind
from zchat.common.config import Option, parse_non_negative_int, parse_text
from zchat.common.protocol import Event

from . import ShippedBot

#: Where the archive bot writes its files.
ENV_ARCHIVE_DIR = "ZCHAT_ARCHIVE_DIR"
#: Size in bytes at which an archive file is continued in the next one (0: one file a day).
ENV_ARCHIVE_MAX_BYTES = "ZCHAT_ARCHIVE_MAX_BYTES"

ARCHIVED = (EventKind.MESSAGE, EventKind.ACTION, EventKind.JOIN, EventKind.LEAVE, EventKind.NICK)

OPTIONS = (
    Option("dir", "--dir", ENV_ARCHIVE_DIR, "archive", parse_text,
           "directory of the archive (one subdirectory per room)", "DIR"),
    Option("max_bytes", "--max-bytes", ENV_ARCHIVE_MAX_BYTES, 0, parse_non_negative_int,
           "start a new file for the day when one would grow past this size (0: never)", "BYTES"),
)


def record(event: Event) -> dict[str, Any]:
    """The JSON object archived for ``event``."""
    out: dict[str, Any] = {
        "room": event.room,
        "seq": event.seq,
        "id": event.id,
        "ts": event.ts,
        "time": dt.datetime.fromtimestamp(event.ts, dt.UTC).isoformat(timespec="milliseconds"),
        "kind": event.kind.value,
        "sender": event.sender,
        "text": event.text,
    }
    if event.nick is not None:
        out["nick"] = event.nick
    return out


@dataclass
class _Open:
    day: str
    part: int
    file: IO[bytes]
    size: int


class Archive:
    """Appends events to per-room, per-day JSON-lines files under ``directory``.

    Args:
        directory: the archive's root; created if missing.
        max_bytes: a file that would grow past this size is continued in the next part
            (0: no limit). A single line larger than it gets a file of its own.
    """

    def __init__(self, directory: Path, max_bytes: int = 0) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._open: dict[str, _Open] = {}

    def path(self, room: str, day: str, part: int) -> Path:
        return self.directory / room / (f"{day}.jsonl" if part == 0 else f"{day}_{part:04d}.jsonl")

    def write(self, event: Event) -> Path:
        """Append ``event`` (a room event) to its room's file; return that file's path."""
        if event.room is None:
            raise ValueError("only room events are archived")
        line = (json.dumps(record(event), ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        day = dt.datetime.fromtimestamp(event.ts, dt.UTC).date().isoformat()
        current = self._open.get(event.room)
        if current is None or current.day != day:
            current = self._reopen(event.room, day, self._newest_part(event.room, day))
        if self.max_bytes and current.size and current.size + len(line) > self.max_bytes:
            current = self._reopen(event.room, day, current.part + 1)
        current.file.write(line)
        current.file.flush()
        current.size += len(line)
        return self.path(event.room, day, current.part)

    def close(self) -> None:
        for current in self._open.values():
            current.file.close()
        self._open.clear()

    def _newest_part(self, room: str, day: str) -> int:
        pattern = re.compile(rf"{re.escape(day)}(?:_(\d+))?\.jsonl")
        parts = [int(m.group(1) or 0) for p in (self.directory / room).glob(f"{day}*.jsonl")
                 if (m := pattern.fullmatch(p.name))]
        return max(parts, default=0)

    def _reopen(self, room: str, day: str, part: int) -> _Open:
        old = self._open.pop(room, None)
        if old is not None:
            old.file.close()
        path = self.path(room, day, part)
        path.parent.mkdir(parents=True, exist_ok=True)
        file = path.open("ab")
        self._open[room] = current = _Open(day, part, file, os.fstat(file.fileno()).st_size)
        return current


def make_bot(options: Mapping[str, Any]) -> Bot:
    archive = Archive(Path(options.get("dir", "archive")), options.get("max_bytes", 0))
    bot = Bot("archive", ["general"], description=f"archives its rooms to {archive.directory}")

    @bot.on_event(*ARCHIVED)
    def keep(ctx: Context) -> None:
        if ctx.room is not None:
            archive.write(ctx.event)

    @bot.on_stop
    def close() -> None:
        archive.close()

    return bot


SPEC = ShippedBot("archive", "writes its rooms to JSON-lines files, one per room per day (or by size)",
                  OPTIONS, make_bot)
