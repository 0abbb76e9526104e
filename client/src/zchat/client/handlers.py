"""What a bot answers to: the registration decorators :class:`~zchat.client.bot.Bot` inherits.

:class:`Handlers` keeps a bot's handlers by what triggers them (commands by name, room
messages by pattern, joins, leaves, DMs, events by kind, timers, start and stop hooks) and
registers them with decorators the way people already write bots (Slack Bolt
``@app.command``, discord.py ``@bot.command``). It only records them: the bot decides when
to run them. Flask splits its ``App`` from the route decorators of its ``Scaffold`` the
same way.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from zchat.common.codes import EventKind

from .commands import Command, parameters_of, usage_of

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Periodic:
    """A handler registered with :meth:`Handlers.every`."""

    seconds: float
    handler: Callable[..., Any]
    immediately: bool


class Handlers:
    """A bot's handlers, by what triggers them; the decorators register them."""

    def __init__(self) -> None:
        self.commands: dict[str, Command] = {}
        self._on_message: list[tuple[re.Pattern[str], Callable[..., Any]]] = []
        self._on_join: list[Callable[..., Any]] = []
        self._on_leave: list[Callable[..., Any]] = []
        self._on_dm: list[Callable[..., Any]] = []
        self._on_event: list[tuple[frozenset[EventKind] | None, Callable[..., Any]]] = []
        self._periodic: list[Periodic] = []
        self._on_start: list[Callable[..., Any]] = []
        self._on_stop: list[Callable[..., Any]] = []

    def command(
        self, name: str | None = None, *, usage: str | None = None, help: str | None = None, aliases: Iterable[str] = ()
    ) -> Callable[[F], F]:
        """Register ``handler(ctx, ...)`` for ``<prefix><name> ARGS`` in a room or a DM.

        Arguments are parsed from the text after the name according to the handler's
        signature (see :func:`parameters_of`): ``def roll(ctx, dice: str, times: int = 1)``.
        Bad input is answered with the reason and the usage. ``usage`` defaults to one made
        from the signature, ``help`` to the first line of the docstring. A returned string is
        the reply.
        """

        def register(fn: F) -> F:
            params = parameters_of(fn)
            doc = (inspect.getdoc(fn) or "").strip().splitlines()
            cmd_name = (name or fn.__name__).lower()
            names = (cmd_name, *(a.lower() for a in aliases))
            if any(not n or any(ch.isspace() for ch in n) for n in names):
                raise ValueError(f"command names must be non-empty words: {names!r}")
            cmd = Command(cmd_name, fn, params, usage_of(params) if usage is None else usage,
                          (doc[0] if doc else "") if help is None else help, names[1:])
            for n in names:
                self.commands[n] = cmd
            return fn

        return register

    def on_message(self, pattern: str | re.Pattern[str], flags: int = 0) -> Callable[[F], F]:
        """Register ``handler(ctx, match)`` for room messages whose text matches ``pattern``.

        ``re.search`` semantics (anchor with ``^`` to match at the start). A message that
        runs a command is not offered to these handlers.
        """
        compiled = re.compile(pattern, flags) if isinstance(pattern, str) else pattern

        def register(fn: F) -> F:
            self._on_message.append((compiled, fn))
            return fn

        return register

    def on_join(self, fn: F) -> F:
        """Register ``handler(ctx)`` for someone joining one of the bot's rooms."""
        self._on_join.append(fn)
        return fn

    def on_leave(self, fn: F) -> F:
        """Register ``handler(ctx)`` for someone leaving one of the bot's rooms (``ctx.text``: why)."""
        self._on_leave.append(fn)
        return fn

    def on_dm(self, fn: F) -> F:
        """Register ``handler(ctx)`` for private messages to the bot that are not commands."""
        self._on_dm.append(fn)
        return fn

    def on_event(self, *kinds: EventKind) -> Callable[[F], F]:
        """Register ``handler(ctx)`` for every event of ``kinds`` (all kinds if none given)."""
        wanted = frozenset(kinds) or None

        def register(fn: F) -> F:
            self._on_event.append((wanted, fn))
            return fn

        return register

    def every(self, seconds: float, *, immediately: bool = False) -> Callable[[F], F]:
        """Register ``handler(bot)`` (or ``handler()``) to run every ``seconds`` while the bot runs.

        The first run is ``seconds`` after :meth:`start` (at once with ``immediately``). A
        run that overlaps the next slot makes that slot skipped, not queued.
        """
        if not seconds > 0:
            raise ValueError("every() needs a positive number of seconds")

        def register(fn: F) -> F:
            self._periodic.append(Periodic(seconds, fn, immediately))
            return fn

        return register

    def on_start(self, fn: F) -> F:
        """Register ``handler(bot)`` (or ``handler()``) to run once connected, before events flow."""
        self._on_start.append(fn)
        return fn

    def on_stop(self, fn: F) -> F:
        """Register ``handler(bot)`` (or ``handler()``) to run when the bot stops."""
        self._on_stop.append(fn)
        return fn
