"""Bots: commands, patterns, joins, DMs and timers as decorators on top of :class:`AsyncClient`.

::

    bot = Bot("dice", rooms=["games"])

    @bot.command("roll", usage="NdM")
    def roll(ctx: Context, dice: str, times: int = 1) -> str:
        ...                                # the returned text is the reply

    bot.run()                              # or: await bot.start() ... await bot.stop()

Layers, as everywhere in zchat, from the pure to the noisy:

* :mod:`.commands` (:func:`parse_command`, :func:`parameters_of`, :meth:`Command.bind`)
  turns ``!roll 2d6 3`` into ``roll(ctx, "2d6", 3)`` or a :class:`UsageError`, and
  :class:`TokenBucket` (in :mod:`.outbox`) says how long a message must wait. None of them
  touches a socket or a clock.
* :mod:`.handlers` records what the bot answers to (the decorators :class:`Bot` inherits).
* :mod:`.outbox`: :class:`Outbox` is the one task that sends: messages leave in order, at
  most ``rate`` a second after a ``burst``, and a refusal that carries ``retry_after`` (the
  broker's store is full, or it asks the bot to slow down) is waited out and sent again.
* This module: :class:`Bot` reads events from its :class:`AsyncClient` (which reconnects by
  itself and rejoins the bot's rooms) and runs the matching handlers, each event in a task
  of its own, so a slow handler delays nobody else. A handler that raises is logged with
  its traceback and the bot goes on.

The names of :mod:`.commands` and :mod:`.outbox` are importable from here too.

Errors extend zchat's tree (:mod:`zchat.common.errors`)::

    ZchatError
     └── BotError
          └── UsageError   a command got arguments it cannot take (replied to the sender)

Handlers may be plain functions or coroutines. Plain ones run on the bot's event loop, so
they must be quick: do blocking work in ``async def`` handlers with ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import re
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zchat.common.codes import EventKind
from zchat.common.config import DEFAULT_PUB, DEFAULT_ROUTER
from zchat.common.keys import KeyPair
from zchat.common.names import nick_key
from zchat.common.protocol import Event, Sent

from .aio import AsyncClient, ClientState
from .commands import (
    BotError,
    Command,
    Param,
    ParamKind,
    UsageError,
    bind_arguments,
    converter_for,
    parameters_of,
    parse_command,
    usage_of,
)
from .handlers import Handlers, Periodic
from .outbox import BotStats, Outbox, Outgoing, TokenBucket

__all__ = [
    "Bot",
    "BotError",
    "BotStats",
    "Command",
    "Context",
    "Outbox",
    "Outgoing",
    "Param",
    "ParamKind",
    "TokenBucket",
    "UsageError",
    "bind_arguments",
    "converter_for",
    "parameters_of",
    "parse_command",
    "usage_of",
]

log = logging.getLogger("zchat.bot")


@dataclass(slots=True)
class Context:
    """What a handler gets first: the event, the bot, and a way to answer.

    Attributes:
        bot: the bot running the handler.
        event: the event that triggered it.
        args: a command's parsed arguments (positional ones).
        match: for :meth:`Bot.on_message` handlers, the regex match.
        command: the command's name, for command handlers.
    """

    bot: Bot
    event: Event
    args: tuple[Any, ...] = ()
    match: re.Match[str] | None = None
    command: str | None = None

    @property
    def sender(self) -> str:
        return self.event.sender

    @property
    def room(self) -> str | None:
        """The event's room; None for a DM."""
        return self.event.room

    @property
    def text(self) -> str:
        return self.event.text

    def reply(self, text: str, *, action: bool = False, mention: bool = False) -> asyncio.Future[Sent]:
        """Answer where the event came from: its room, or by DM to its sender.

        ``mention`` puts ``sender: `` in front. The message is queued at once (so replies
        keep their order even unawaited); await the result to wait for the broker's ack.
        """
        if mention:
            text = f"{self.event.sender}: {text}"
        if self.event.room is not None:
            return self.bot.say(self.event.room, text, action=action)
        return self.bot.dm(self.event.sender, text, action=action)


def _takes_argument(fn: Callable[..., Any]) -> bool:
    try:
        return len(inspect.signature(fn).parameters) > 0
    except (TypeError, ValueError):
        return True


@dataclass(slots=True)
class _Run:
    """What one handler call needs: the function, its arguments, and how to answer."""

    handler: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    ctx: Context | None = None
    command: Command | None = None
    usage_error: UsageError | None = None  # the command's arguments did not parse


class Bot(Handlers):
    """A zchat bot: register handlers with decorators, then :meth:`run` (or :meth:`start`).

    The decorators (:meth:`command`, :meth:`on_message`, :meth:`on_join`, :meth:`on_leave`,
    :meth:`on_dm`, :meth:`on_event`, :meth:`every`, :meth:`on_start`, :meth:`on_stop`) come
    from :class:`~zchat.client.handlers.Handlers`.

    Args:
        nick: the bot's nick (if taken while reconnecting, ``_`` is appended).
        rooms: rooms to join at start.
        router, pub: the broker's endpoints.
        prefix: what starts a command (``!`` in ``!roll 2d6``).
        description: one line on what the bot does (shown by ``!help``).
        rate, burst: outgoing messages a second, and how many may go at once after a pause.
        timeout: seconds to wait for each reply from the broker.
        history: past messages of each room delivered when joining it, and of the DM inbox
            at connect (0: only new ones, so a restarted bot does not answer old commands).
        give_up_after: seconds to keep resending a message the broker refuses with
            ``retry_after``.
        max_text: longer messages are cut to this many characters (the broker's limit).
        max_handlers: events handled at once; reading waits while this many are running.
        server_key, key: the broker's CURVE public key (or its ``.key`` file) and the bot's
            secret key file, for a broker in secure mode (both or neither).
        help_command: register the built-in ``help`` command.

    Attributes ``nick``, ``rooms``, ``router``, ``pub``, ``prefix``, ``timeout``, ``rate``,
    ``burst``, ``server_key`` and ``key`` may be changed until :meth:`start` (``zchat-bot``
    does, from its options).
    """

    def __init__(
        self,
        nick: str,
        rooms: Iterable[str] = (),
        *,
        router: str = DEFAULT_ROUTER,
        pub: str = DEFAULT_PUB,
        prefix: str = "!",
        description: str = "",
        rate: float = 2.0,
        burst: int = 10,
        timeout: float = 5.0,
        history: int = 0,
        give_up_after: float = 60.0,
        max_text: int = 4000,
        max_handlers: int = 100,
        help_command: bool = True,
        server_key: str | Path | None = None,
        key: str | Path | KeyPair | None = None,
    ) -> None:
        super().__init__()
        self.nick, self.rooms = nick, list(rooms)
        self.router, self.pub, self.prefix, self.description = router, pub, prefix, description
        self.rate, self.burst, self.timeout, self.history = rate, burst, timeout, history
        self.give_up_after, self.max_text, self.max_handlers = give_up_after, max_text, max_handlers
        self.server_key, self.key = server_key, key
        self.stats = BotStats()
        self.client: AsyncClient | None = None
        self._outbox: Outbox | None = None
        self._tasks: list[asyncio.Task[None]] = []  # reader, timers
        self._sender: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()  # handler calls
        self._slots: asyncio.Semaphore | None = None
        self._stopping = False
        self._closed: asyncio.Event | None = None
        self._ever_connected = False
        if help_command:
            self.command("help", usage="[COMMAND]", help="list the commands, or describe one")(self._help)

    # -- sending -----------------------------------------------------------------------------

    @property
    def current_nick(self) -> str | None:
        """The nick the bot has on the broker now (None when not connected)."""
        return self.client.current_nick if self.client is not None else None

    @property
    def state(self) -> ClientState:
        return self.client.state if self.client is not None else ClientState.DISCONNECTED

    def say(self, room: str, text: str, *, action: bool = False) -> asyncio.Future[Sent]:
        """Queue ``text`` for ``room``; see :meth:`Context.reply`. Call it on the bot's loop."""
        return self._queue(room, None, text, action)

    def dm(self, nick: str, text: str, *, action: bool = False) -> asyncio.Future[Sent]:
        """Queue a private message to ``nick``. Call it on the bot's loop."""
        return self._queue(None, nick, text, action)

    def _queue(self, room: str | None, to: str | None, text: str, action: bool) -> asyncio.Future[Sent]:
        if self._outbox is None:
            raise RuntimeError("the bot is not running")
        if not text.strip():
            raise ValueError("cannot send an empty message")
        if len(text) > self.max_text:
            text = text[: self.max_text - 1] + "…"
        return self._outbox.put(room, to, text, action)

    async def _send(self, item: Outgoing) -> Sent:
        assert self.client is not None
        if item.room is not None:
            return await self.client.say(item.room, item.text, action=item.action)
        assert item.to is not None
        return await self.client.dm(item.to, item.text, action=item.action)

    async def join(self, room: str) -> None:
        """Join ``room`` now (and again after every reconnect)."""
        if self.client is None:
            raise RuntimeError("the bot is not running")
        joined = await self.client.join(room, history=self.history)
        if joined.room not in self.rooms:
            self.rooms.append(joined.room)

    async def leave(self, room: str) -> None:
        """Leave ``room``."""
        if self.client is None:
            raise RuntimeError("the bot is not running")
        await self.client.leave(room)
        self.rooms = [r for r in self.rooms if r.lstrip("#").casefold() != room.lstrip("#").casefold()]

    # -- life --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, join the rooms, run the start hooks, then handle events in the background.

        Raises:
            RequestError: the broker refused (``nick_taken``, ``invalid_room``, ...).
            RequestTimeout: the broker did not answer.
        """
        if self.client is not None:
            raise RuntimeError("the bot is already running")
        self._stopping = False
        self._slots = asyncio.Semaphore(self.max_handlers)
        self._running = set()
        self._ever_connected = False
        client = await self._connect()
        self._closed = asyncio.Event()  # only once running: wait_stopped() returns at once otherwise
        self._outbox = Outbox(self._send, self.stats, rate=self.rate, burst=self.burst,
                              give_up_after=self.give_up_after)
        self._sender = asyncio.create_task(self._outbox.run(), name=f"bot-{self.nick}-outbox")
        for hook in self._on_start:
            await self._invoke(self._hook_run(hook))
        self._tasks = [asyncio.create_task(self._read(client), name=f"bot-{self.nick}-events")]
        self._tasks += [asyncio.create_task(self._every(p), name=f"bot-{self.nick}-every") for p in self._periodic]

    async def _connect(self) -> AsyncClient:
        """A new client, connected and in the bot's rooms; closed again if that fails."""
        client = AsyncClient(self.router, self.pub, timeout=self.timeout, history=self.history,
                             on_state=self._state_changed, server_key=self.server_key, key=self.key)
        self.client = client
        try:
            welcome = await client.connect(self.nick)
            for room in self.rooms:
                await client.join(room, history=self.history)
        except BaseException:
            await client.close()
            self.client = None
            raise
        self.rooms = client.joined  # canonical names
        self._ever_connected = True
        log.info("%s connected to %s as %s; in %s", self.nick, self.router, welcome.nick,
                 ", ".join(f"#{r}" for r in client.joined) or "no room")
        return client

    async def stop(self, *, grace: float = 2.0) -> None:
        """Stop reading, let running handlers and queued messages finish (``grace`` s each), close.

        Safe to call twice, and from a handler.
        """
        if self.client is None or self._closed is None:
            return
        if self._stopping:
            await self._closed.wait()
            return
        self._stopping = True
        client, closed = self.client, self._closed
        try:
            await _cancel(self._tasks)
            me = asyncio.current_task()
            running = [t for t in self._running if t is not me]
            if running:
                _, late = await asyncio.wait(running, timeout=grace)
                await _cancel(late)
            for hook in self._on_stop:
                await self._invoke(self._hook_run(hook))
            if self._outbox is not None and not await self._outbox.drain(grace):
                log.warning("%s: %d messages not sent before stopping", self.nick, self._outbox.pending)
            await _cancel([self._sender] if self._sender is not None else [])
            await client.close()
        finally:
            self.client, self._outbox, self._sender, self._tasks = None, None, None, []
            closed.set()
            log.info("%s stopped", self.nick)

    async def wait_stopped(self) -> None:
        """Return once the bot has stopped (at once if it is not running)."""
        if self._closed is not None:
            await self._closed.wait()

    async def serve(self) -> None:
        """:meth:`start`, then run until :meth:`stop` (or until cancelled, which stops the bot)."""
        await self.start()
        try:
            await self.wait_stopped()
        finally:
            await self.stop()

    def run(self) -> None:
        """Run the bot until SIGINT or SIGTERM (or :meth:`stop`); blocks. Stops cleanly on either."""
        asyncio.run(self._serve_until_signal())

    async def _serve_until_signal(self) -> None:
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        stoppers: set[asyncio.Task[None]] = set()
        interrupted = False

        def on_signal() -> None:
            nonlocal interrupted
            interrupted = True
            if self._outbox is None and main is not None:  # still starting: give up on it
                main.cancel()
                return
            task = asyncio.create_task(self.stop())
            stoppers.add(task)
            task.add_done_callback(stoppers.discard)

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError):  # Windows
                    loop.add_signal_handler(sig, on_signal)
        try:
            await self.serve()
        except asyncio.CancelledError:
            if not interrupted:
                raise

    async def __aenter__(self) -> Bot:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _state_changed(self, state: ClientState) -> None:
        if state is ClientState.RECONNECTING:
            log.warning("%s: connection to the broker lost; reconnecting", self.nick)
        elif state is ClientState.CONNECTED and self._ever_connected and self.client is not None:
            log.info("%s: reconnected as %s; back in %s", self.nick, self.client.current_nick,
                     ", ".join(f"#{r}" for r in self.client.joined) or "no room")

    # -- dispatch ----------------------------------------------------------------------------

    async def _read(self, client: AsyncClient) -> None:
        slots, running = self._slots, self._running
        assert slots is not None

        def handled(task: asyncio.Task[None]) -> None:
            running.discard(task)
            slots.release()

        async for event in client.events():
            self.stats.events += 1
            if event.room in self.rooms and event.room not in client.joined:
                self.rooms.remove(event.room)  # kicked, banned, or not let back in: not rejoined
            if self._is_own(event):
                continue
            await slots.acquire()
            task = asyncio.create_task(self._dispatch(event), name=f"bot-{self.nick}-{event.kind.value}")
            running.add(task)
            task.add_done_callback(handled)

    def _is_own(self, event: Event) -> bool:
        me = self.current_nick
        return me is not None and nick_key(event.sender) == nick_key(me)

    def _runs_for(self, event: Event) -> list[_Run]:
        """The handler calls an event asks for, in order (commands first, then patterns, ...)."""
        runs: list[_Run] = []
        kind = event.kind
        if kind is EventKind.MESSAGE or kind is EventKind.DM:
            command = self._command_run(event)
            if command is not None:
                runs.append(command)
            elif kind is EventKind.MESSAGE:
                for pattern, fn in self._on_message:
                    if (match := pattern.search(event.text)) is not None:
                        runs.append(_Run(fn, (match,), ctx=Context(self, event, match=match)))
            else:
                runs += [_Run(fn, ctx=Context(self, event)) for fn in self._on_dm]
        elif kind is EventKind.JOIN:
            runs += [_Run(fn, ctx=Context(self, event)) for fn in self._on_join]
        elif kind is EventKind.LEAVE:
            runs += [_Run(fn, ctx=Context(self, event)) for fn in self._on_leave]
        runs += [_Run(fn, ctx=Context(self, event)) for kinds, fn in self._on_event if kinds is None or kind in kinds]
        return runs

    def _command_run(self, event: Event) -> _Run | None:
        parsed = parse_command(event.text, self.prefix)
        if parsed is None or parsed[0] not in self.commands:
            return None
        cmd = self.commands[parsed[0]]
        self.stats.commands += 1
        ctx = Context(self, event, command=cmd.name)
        try:
            args, kwargs = cmd.bind(parsed[1])
        except UsageError as exc:
            return _Run(cmd.handler, ctx=ctx, command=cmd, usage_error=exc)
        ctx.args = tuple(args)
        return _Run(cmd.handler, tuple(args), kwargs, ctx=ctx, command=cmd)

    async def _dispatch(self, event: Event) -> None:
        for run in self._runs_for(event):
            await self._invoke(run)

    async def _invoke(self, run: _Run) -> None:
        """Call a handler; reply what it returns; log (never raise) what it raises."""
        ctx = run.ctx
        try:
            if run.usage_error is not None:
                raise run.usage_error
            result = run.handler(*((ctx,) if ctx is not None else ()), *run.args, **run.kwargs)
            if inspect.isawaitable(result):
                result = await result
        except UsageError as exc:
            if ctx is not None:
                usage = f" — usage: {run.command.synopsis(self.prefix)}" if run.command is not None else ""
                ctx.reply(exc.reason + usage)
            return
        except Exception:
            self.stats.errors += 1
            name = getattr(run.handler, "__qualname__", repr(run.handler))
            where = f" on {ctx.event.kind.value} from {ctx.sender}: {ctx.text!r}" if ctx is not None else ""
            log.exception("%s: handler %s failed%s", self.nick, name, where)
            if ctx is not None and run.command is not None:
                ctx.reply(f"sorry, {self.prefix}{run.command.name} failed (the bot's log has the details)")
            return
        if ctx is not None and isinstance(result, str) and result.strip():
            ctx.reply(result)

    def _hook_run(self, fn: Callable[..., Any]) -> _Run:
        """A call of a start/stop hook or a timer: ``fn(bot)``, or ``fn()`` if it takes nothing."""
        return _Run(fn, (self,) if _takes_argument(fn) else ())

    async def _every(self, periodic: Periodic) -> None:
        loop = asyncio.get_running_loop()
        run = self._hook_run(periodic.handler)
        due = loop.time() + (0.0 if periodic.immediately else periodic.seconds)
        while not self._stopping:
            await asyncio.sleep(max(0.0, due - loop.time()))
            if self._stopping:
                return
            await self._invoke(run)
            due += periodic.seconds
            if due < loop.time():  # the run overran: skip the missed slots
                due += math.ceil((loop.time() - due) / periodic.seconds) * periodic.seconds

    def _help(self, ctx: Context, name: str = "") -> str:
        """List the commands (or describe one)."""
        if name:
            cmd = self.commands.get(name.lower().removeprefix(self.prefix))
            if cmd is None:
                raise UsageError(f"no command {name!r}")
            aliases = f" (also: {', '.join(self.prefix + a for a in cmd.aliases)})" if cmd.aliases else ""
            return cmd.synopsis(self.prefix) + (f" — {cmd.help}" if cmd.help else "") + aliases
        unique = sorted({id(c): c for c in self.commands.values()}.values(), key=lambda c: c.name)
        lines = [f"{self.nick}: {self.description}" if self.description else f"{self.nick} commands:"]
        lines += [f"{c.synopsis(self.prefix)}" + (f" — {c.help}" if c.help else "") for c in unique]
        return "\n".join(lines)


async def _cancel(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` (but not the caller's own) and wait for them; their errors are dropped."""
    me = asyncio.current_task()
    tasks = [t for t in tasks if t is not me]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
