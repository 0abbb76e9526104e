"""``remind``: ``!remind 10m TEXT`` answers, after ten minutes, ``nick: reminder: TEXT``.

Durations are numbers with units, run together: ``90s``, ``10m``, ``1h30m``, ``2d``, and
fractions (``0.5s``, ``1.5h``). The reminder comes in the room it was asked in (or by DM,
if asked by DM), mentioning whoever asked. ``!reminders`` lists your pending reminders,
``!forget ID`` drops one.

Reminders live in the bot process: they survive the broker going away and coming back
(the bot reconnects and rejoins by itself), not a restart of the bot.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from zchat.client.bot import Bot, Context, UsageError
from zchat.common.config import Option, parse_positive_int
from zchat.common.names import nick_key

from . import ShippedBot

#: The longest reminder accepted, as a duration (``30d``).
ENV_REMIND_MAX = "ZCHAT_REMIND_MAX"
#: How many pending reminders one nick may have.
ENV_REMIND_PER_NICK = "ZCHAT_REMIND_PER_NICK"

_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)([dhms])")


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``90s``, ``10m``, ``1h30m``, ``0.5s``, ``2d``.

    Raises:
        ValueError: not a duration, or not positive.
    """
    text = text.strip().lower()
    pos, seconds = 0, 0.0
    while pos < len(text):
        match = _PART.match(text, pos)
        if match is None:
            raise ValueError(f"not a duration: {text!r}")
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not seconds > 0:
        raise ValueError(f"not a positive duration: {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``1h 30m``, ``45s``, ``0.5s``: what is left, for people."""
    if seconds < 10:
        return f"{max(seconds, 0):.1f}s".replace(".0s", "s")
    whole = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    return " ".join(parts[:2])


class Duration(float):
    """A command argument that is a duration (``!remind 1h30m ...``), in seconds."""

    description = "a duration like 90s, 10m or 1h30m"

    def __new__(cls, text: str) -> Duration:
        return super().__new__(cls, parse_duration(text))


@dataclass
class Reminder:
    """One pending reminder; ``due`` is on the reminders' clock (wall time by default)."""

    id: int
    nick: str
    room: str | None
    text: str
    due: float
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Reminders:
    """Pending reminders, each with a timer task that fires it through ``bot``.

    Args:
        bot: sends the reminders.
        max_seconds: the longest delay accepted.
        per_nick: pending reminders one nick may have.
        clock: the time, for listing what is left (injectable for tests).
    """

    def __init__(self, bot: Bot, *, max_seconds: float = 30 * 86400.0, per_nick: int = 20,
                 clock: Callable[[], float] = time.time) -> None:
        self.bot, self.max_seconds, self.per_nick, self.clock = bot, max_seconds, per_nick, clock
        self.pending: dict[int, Reminder] = {}
        self._next_id = 1

    def of(self, nick: str) -> list[Reminder]:
        key = nick_key(nick)
        return sorted((r for r in self.pending.values() if nick_key(r.nick) == key), key=lambda r: r.due)

    def add(self, nick: str, room: str | None, delay: float, text: str) -> Reminder:
        """Schedule a reminder; must be called on the bot's event loop.

        Raises:
            UsageError: too long a delay, or too many pending for ``nick``.
        """
        if delay > self.max_seconds:
            raise UsageError(f"that is too far ahead: at most {format_duration(self.max_seconds)}")
        if len(self.of(nick)) >= self.per_nick:
            raise UsageError(f"you have {self.per_nick} reminders already; !forget one first")
        reminder = Reminder(self._next_id, nick, room, text, self.clock() + delay)
        self._next_id += 1
        reminder.task = asyncio.create_task(self._fire(reminder, delay), name=f"reminder-{reminder.id}")
        self.pending[reminder.id] = reminder
        return reminder

    def forget(self, nick: str, reminder_id: int) -> Reminder:
        reminder = self.pending.get(reminder_id)
        if reminder is None or nick_key(reminder.nick) != nick_key(nick):
            raise UsageError(f"you have no reminder #{reminder_id}")
        del self.pending[reminder_id]
        if reminder.task is not None:
            reminder.task.cancel()
        return reminder

    def cancel_all(self) -> None:
        for reminder in self.pending.values():
            if reminder.task is not None:
                reminder.task.cancel()
        self.pending.clear()

    async def _fire(self, reminder: Reminder, delay: float) -> None:
        await asyncio.sleep(delay)
        self.pending.pop(reminder.id, None)
        if reminder.room is not None:
            await self.bot.say(reminder.room, f"{reminder.nick}: reminder: {reminder.text}")
        else:
            await self.bot.dm(reminder.nick, f"reminder: {reminder.text}")


def _parse_max(value: str) -> float:
    return parse_duration(value)


OPTIONS = (
    Option("max", "--max", ENV_REMIND_MAX, "30d", _parse_max, "the longest reminder accepted", "DURATION"),
    Option("per_nick", "--per-nick", ENV_REMIND_PER_NICK, 20, parse_positive_int,
           "pending reminders one nick may have", "COUNT"),
)


def make_bot(options: Mapping[str, Any], *, clock: Callable[[], float] = time.time) -> Bot:
    bot = Bot("remind", ["general"], description="!remind 10m TEXT: reminds you of TEXT in ten minutes")
    max_seconds = options.get("max", "30d")
    reminders = Reminders(bot, max_seconds=parse_duration(max_seconds) if isinstance(max_seconds, str) else max_seconds,
                          per_nick=options.get("per_nick", 20), clock=clock)

    @bot.command("remind", usage="DURATION TEXT")
    def remind(ctx: Context, when: Duration, *, text: str) -> str:
        """remind you of TEXT after DURATION (90s, 10m, 1h30m, 2d)"""
        reminder = reminders.add(ctx.sender, ctx.room, when, text)
        return f"{ctx.sender}: ok, in {format_duration(when)} (reminder #{reminder.id})"

    @bot.command("reminders", usage="")
    def listing(ctx: Context) -> str:
        """list your pending reminders"""
        mine = reminders.of(ctx.sender)
        if not mine:
            return f"{ctx.sender}: no reminders"
        now = reminders.clock()
        items = "; ".join(f"#{r.id} in {format_duration(r.due - now)}: {r.text}" for r in mine)
        return f"{ctx.sender}: {len(mine)} reminder{'s' if len(mine) > 1 else ''}: {items}"

    @bot.command("forget", usage="ID")
    def forget(ctx: Context, reminder_id: int) -> str:
        """drop your reminder ID"""
        reminder = reminders.forget(ctx.sender, reminder_id)
        return f"{ctx.sender}: forgot #{reminder.id} ({reminder.text})"

    @bot.on_stop
    def stop() -> None:
        reminders.cancel_all()

    return bot


SPEC = ShippedBot("remind", "!remind 10m TEXT: reminds whoever asked, in the same room", OPTIONS, make_bot)
