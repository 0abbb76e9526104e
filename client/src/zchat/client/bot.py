"""Bots: commands, patterns, joins, DMs and timers as decorators on top of :class:`AsyncClient`.

::

    bot = Bot("dice", rooms=["games"])

    @bot.command("roll", usage="NdM")
    def roll(ctx: Context, dice: str, times: int = 1) -> str:
        ...                                # the returned text is the reply

    bot.run()                              # or: await bot.start() ... await bot.stop()

Layers, as everywhere in zchat, from the pure to the noisy:

* :func:`parse_command`, :func:`parameters_of` and :meth:`Command.bind` turn ``!roll 2d6 3``
  into ``roll(ctx, "2d6", 3)`` or a :class:`UsageError`; :class:`TokenBucket` says how long
  a message must wait. None of them touches a socket or a clock.
* :class:`Outbox` is the one task that sends: messages leave in order, at most ``rate`` a
  second after a ``burst``, and a refusal that carries ``retry_after`` (the broker's store
  is full, or it asks the bot to slow down) is waited out and sent again.
* :class:`Bot` reads events from its :class:`AsyncClient` (which reconnects by itself and
  rejoins the bot's rooms) and runs the matching handlers, each event in a task of its own,
  so a slow handler delays nobody else. A handler that raises is logged with its traceback
  and the bot goes on.

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
import types
import typing
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, TypeVar, Union

from zchat.common.codes import EventKind
from zchat.common.config import DEFAULT_PUB, DEFAULT_ROUTER
from zchat.common.errors import ConnectionClosed, RequestError, ZchatError
from zchat.common.names import nick_key
from zchat.common.protocol import Event, Sent

from .aio import AsyncClient, ClientState

log = logging.getLogger("zchat.bot")

F = TypeVar("F", bound=Callable[..., Any])


class BotError(ZchatError):
    """Base class of the bot framework's errors."""


class UsageError(BotError):
    """A command was given arguments it cannot take.

    The bot replies with ``reason`` and the command's usage. Command handlers may raise it
    themselves to reject input the signature cannot (``raise UsageError("sides must be > 1")``).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- commands: text to arguments (pure) ------------------------------------------------------


class ParamKind(Enum):
    """How a command parameter takes its value from the command text."""

    WORD = "word"  # a positional parameter: the next word (or "quoted words")
    WORDS = "words"  # *args: every word left
    REST = "rest"  # the first keyword-only parameter: the rest of the line, verbatim


_REQUIRED: Any = inspect.Parameter.empty
_WORD = re.compile(r'"([^"]*)"|(\S+)')
_COMMAND = re.compile(r"(\S+)\s*(.*)", re.DOTALL)
_BOOLS = {"yes": True, "y": True, "true": True, "on": True, "1": True,
          "no": False, "n": False, "false": False, "off": False, "0": False}
_SIMPLE_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}


@dataclass(frozen=True, slots=True)
class Param:
    """One parameter of a command handler, after the context.

    Attributes:
        name: the parameter's name (shown upper-case in usages).
        kind: where its value comes from.
        convert: turns a word into the value; raises ValueError (or TypeError) for bad input.
        what: what ``convert`` accepts, for error messages ("a whole number").
        default: the default value, or ``inspect.Parameter.empty`` when required.
    """

    name: str
    kind: ParamKind
    convert: Callable[[str], Any]
    what: str
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED and self.kind is not ParamKind.WORDS

    def parse(self, word: str) -> Any:
        try:
            return self.convert(word)
        except (ValueError, TypeError):
            raise UsageError(f"{self.name.upper()} must be {self.what}, not {word!r}") from None


def _parse_bool(word: str) -> bool:
    try:
        return _BOOLS[word.lower()]
    except KeyError:
        raise ValueError(word) from None


def _parse_float(word: str) -> float:
    number = float(word)
    if not math.isfinite(number):
        raise ValueError(word)
    return number


def converter_for(annotation: Any) -> tuple[Callable[[str], Any], str]:
    """The converter of a parameter annotated ``annotation``, and what it accepts.

    ``str`` (or no annotation), ``int``, ``float``, ``bool`` (yes/no, on/off, true/false),
    ``Literal[...]`` (one of the values), ``X | None`` (as ``X``), or any class that can be
    called with the word (its ``description`` attribute, if any, names what it accepts).

    Raises:
        TypeError: the annotation cannot be converted to.
    """
    if isinstance(annotation, str):  # an annotation that could not be resolved
        annotation = _SIMPLE_TYPES.get(annotation, str)
    if annotation in (_REQUIRED, str, Any):
        return str, "text"
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) != 1:
            raise TypeError(f"cannot convert to {annotation}: use one type (or X | None)")
        return converter_for(options[0])
    if origin is Literal:
        choices = typing.get_args(annotation)

        def choose(word: str) -> Any:
            for choice in choices:
                if str(choice).casefold() == word.casefold():
                    return choice
            raise ValueError(word)

        return choose, "one of " + ", ".join(str(c) for c in choices)
    simple: dict[Any, tuple[Callable[[str], Any], str]] = {
        bool: (_parse_bool, "yes or no"), int: (int, "a whole number"), float: (_parse_float, "a number"),
    }
    if annotation in simple:
        return simple[annotation]
    if isinstance(annotation, type):
        return annotation, getattr(annotation, "description", f"a {annotation.__name__}")
    raise TypeError(f"cannot convert command arguments to {annotation!r}")


def parameters_of(fn: Callable[..., Any]) -> tuple[Param, ...]:
    """The command parameters of handler ``fn``: every parameter after the first (the context).

    Positional parameters take one word each (defaults make them optional); ``*args`` takes
    every word left; the first keyword-only parameter takes the rest of the line verbatim
    (as in discord.py: ``def say(ctx, *, text: str)``). Later keyword-only parameters keep
    their defaults.

    Raises:
        TypeError: ``fn`` cannot be a command handler (no context parameter, an annotation
            that cannot be converted, both ``*args`` and a keyword-only parameter, ...).
    """
    signature = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation naming something not importable: fall back to names
        hints = {}
    params = list(signature.parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not params or params[0].kind not in positional:
        raise TypeError(f"{fn.__qualname__} must take the Context as its first parameter")
    out: list[Param] = []
    for p in params[1:]:
        convert, what = converter_for(hints.get(p.name, p.annotation))
        if p.kind in positional:
            out.append(Param(p.name, ParamKind.WORD, convert, what, p.default))
        elif p.kind is inspect.Parameter.VAR_POSITIONAL:
            out.append(Param(p.name, ParamKind.WORDS, convert, what))
        elif p.kind is inspect.Parameter.KEYWORD_ONLY and not any(q.kind is ParamKind.REST for q in out):
            out.append(Param(p.name, ParamKind.REST, convert, what, p.default))
        elif p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is _REQUIRED:
            raise TypeError(f"{fn.__qualname__}: only the first keyword-only parameter takes the rest of the line")
    kinds = {p.kind for p in out}
    if ParamKind.WORDS in kinds and ParamKind.REST in kinds:
        raise TypeError(f"{fn.__qualname__}: take *words or a keyword-only rest of the line, not both")
    return tuple(out)


def usage_of(params: Iterable[Param]) -> str:
    """A usage line from parameters: ``DICE [TIMES] [WORDS...]`` (a rest of line: ``TEXT``)."""
    parts = []
    for p in params:
        name = p.name.upper() + ("..." if p.kind is ParamKind.WORDS else "")
        parts.append(name if p.required else f"[{name}]")
    return " ".join(parts)


def bind_arguments(params: Iterable[Param], text: str) -> tuple[list[Any], dict[str, Any]]:
    """Positional and keyword arguments for ``params`` from a command's argument text.

    Words are separated by white space; ``"two words"`` is one word.

    Raises:
        UsageError: a required argument is missing, a word does not convert, or words are
            left over.
    """
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    pos = 0
    rest_param: Param | None = None
    for p in params:
        if p.kind is ParamKind.WORD:
            match = _WORD.search(text, pos)
            if match is None:
                if p.required:
                    raise UsageError(f"{p.name.upper()} is missing")
                args.append(p.default)
                continue
            pos = match.end()
            args.append(p.parse(match.group(2) if match.group(1) is None else match.group(1)))
        elif p.kind is ParamKind.WORDS:
            args += [p.parse(m.group(2) if m.group(1) is None else m.group(1)) for m in _WORD.finditer(text, pos)]
            pos = len(text)
        else:
            rest_param = p
    rest = text[pos:].strip()
    if rest_param is not None:
        if rest:
            kwargs[rest_param.name] = rest_param.parse(rest)
        elif rest_param.required:
            raise UsageError(f"{rest_param.name.upper()} is missing")
    elif rest:
        raise UsageError(f"too many arguments: {rest!r}")
    return args, kwargs


def parse_command(text: str, prefix: str) -> tuple[str, str] | None:
    """``("roll", "2d6")`` for ``"!roll 2d6"`` with prefix ``"!"``; None if not a command."""
    if not prefix or not text.startswith(prefix):
        return None
    match = _COMMAND.fullmatch(text[len(prefix) :])
    if match is None:
        return None
    return match.group(1).lower(), match.group(2).strip()


@dataclass(frozen=True, slots=True)
class Command:
    """A registered command.

    Attributes:
        name: what follows the prefix (lower case).
        handler: called as ``handler(ctx, *args, **rest)``.
        params: how the arguments are parsed.
        usage: the arguments' synopsis shown in errors and ``!help``.
        help: one line on what it does.
        aliases: other names it answers to.
    """

    name: str
    handler: Callable[..., Any]
    params: tuple[Param, ...]
    usage: str
    help: str
    aliases: tuple[str, ...] = ()

    def bind(self, text: str) -> tuple[list[Any], dict[str, Any]]:
        """See :func:`bind_arguments`."""
        return bind_arguments(self.params, text)

    def synopsis(self, prefix: str) -> str:
        return f"{prefix}{self.name} {self.usage}".rstrip()


# -- rate limit (pure) -----------------------------------------------------------------------


class TokenBucket:
    """A rate limit: ``rate`` messages a second on average, ``burst`` at once after a pause.

    Reservation style: :meth:`reserve` takes a token now and says how long to wait before
    using it, so messages queued one after another are spaced ``1 / rate`` apart.
    """

    def __init__(self, rate: float, burst: int, now: float = 0.0) -> None:
        if not rate > 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._stamp = now

    def reserve(self, now: float) -> float:
        """Take a token at time ``now``; return the seconds to wait before sending (0: now)."""
        self._tokens = min(float(self.burst), self._tokens + max(0.0, now - self._stamp) * self.rate)
        self._stamp = max(now, self._stamp)
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


# -- sending ---------------------------------------------------------------------------------


@dataclass
class BotStats:
    """Counters, for logs and tests."""

    events: int = 0  # events read (the bot's own included)
    commands: int = 0  # commands run (usage errors included)
    errors: int = 0  # handlers that raised
    sent: int = 0  # messages acknowledged by the broker
    throttled: int = 0  # messages delayed by the rate limit
    retries: int = 0  # resends after a refusal with retry_after
    failed: int = 0  # messages given up on


@dataclass(slots=True)
class Outgoing:
    """A message waiting in the :class:`Outbox`: to a room, or a DM to a nick."""

    room: str | None
    to: str | None
    text: str
    action: bool
    future: asyncio.Future[Sent]

    @property
    def target(self) -> str:
        return f"#{self.room}" if self.room is not None else f"*{self.to}*"


def _retrieve(future: asyncio.Future[Sent]) -> None:
    # Failures are logged by the outbox; callers need not await the future to avoid
    # asyncio's "exception was never retrieved".
    if not future.cancelled():
        future.exception()


class Outbox:
    """Sends messages one at a time, in order, under a token bucket.

    A refusal with ``retry_after`` (:class:`RequestError`) is waited out and the message sent
    again, until ``give_up_after`` seconds have passed since its first attempt. Timeouts and
    reconnects are already retried by :meth:`AsyncClient.say`.

    Args:
        send: sends one message and returns the broker's acknowledgement.
        stats: counters to update.
        rate, burst: the token bucket's.
        give_up_after: seconds to keep resending a refused message.
    """

    def __init__(
        self,
        send: Callable[[Outgoing], Awaitable[Sent]],
        stats: BotStats,
        *,
        rate: float = 5.0,
        burst: int = 10,
        give_up_after: float = 60.0,
    ) -> None:
        self._send = send
        self.stats = stats
        self._loop = asyncio.get_running_loop()
        self.bucket = TokenBucket(rate, burst, self._loop.time())
        self.give_up_after = give_up_after
        self._queue: asyncio.Queue[Outgoing] = asyncio.Queue()
        self._current: Outgoing | None = None

    def put(self, room: str | None, to: str | None, text: str, action: bool = False) -> asyncio.Future[Sent]:
        """Queue a message; the future resolves to its acknowledgement (or its failure)."""
        future: asyncio.Future[Sent] = self._loop.create_future()
        future.add_done_callback(_retrieve)
        self._queue.put_nowait(Outgoing(room, to, text, action, future))
        return future

    @property
    def pending(self) -> int:
        """Messages not yet acknowledged (or failed)."""
        return self._queue.qsize() + (self._current is not None)

    async def run(self) -> None:
        """Send until cancelled; on cancellation every unsent message fails."""
        try:
            while True:
                self._current = item = await self._queue.get()
                try:
                    await self._deliver(item)
                finally:
                    self._current = None
                    self._queue.task_done()
                    if not item.future.done():  # cancelled while sending it
                        item.future.set_exception(ConnectionClosed("the bot stopped before sending this"))
        finally:
            self._fail_pending()

    async def drain(self, timeout: float) -> bool:
        """Wait until everything queued is sent (or failed); False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            return False
        return True

    def _fail_pending(self) -> None:
        items: list[Outgoing] = []
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
            self._queue.task_done()
        for item in items:
            if not item.future.done():
                item.future.set_exception(ConnectionClosed("the bot stopped before sending this"))

    async def _deliver(self, item: Outgoing) -> None:
        if item.future.done():  # cancelled by whoever queued it
            return
        delay = self.bucket.reserve(self._loop.time())
        if delay > 0:
            self.stats.throttled += 1
            await asyncio.sleep(delay)
        try:
            sent = await self._send_retrying(item)
        except Exception as exc:
            self.stats.failed += 1
            log.warning("could not send to %s: %s", item.target, exc)
            if not item.future.done():
                item.future.set_exception(exc)
        else:
            self.stats.sent += 1
            if not item.future.done():
                item.future.set_result(sent)

    async def _send_retrying(self, item: Outgoing) -> Sent:
        deadline = self._loop.time() + self.give_up_after
        while True:
            try:
                return await self._send(item)
            except RequestError as exc:
                if exc.retry_after is None or self._loop.time() + exc.retry_after > deadline:
                    raise
                self.stats.retries += 1
                log.warning("the broker refused a message to %s (%s); resending in %.2f s",
                            item.target, exc, exc.retry_after)
                await asyncio.sleep(exc.retry_after)


# -- the bot ---------------------------------------------------------------------------------


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


@dataclass(frozen=True, slots=True)
class _Periodic:
    seconds: float
    handler: Callable[..., Any]
    immediately: bool


@dataclass(slots=True)
class _Run:
    """What one handler call needs: the function, its arguments, and how to answer."""

    handler: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    ctx: Context | None = None
    command: Command | None = None
    usage_error: UsageError | None = None  # the command's arguments did not parse


class Bot:
    """A zchat bot: register handlers with decorators, then :meth:`run` (or :meth:`start`).

    Args:
        nick: the bot's nick (if taken while reconnecting, ``_`` is appended).
        rooms: rooms to join at start.
        router, pub: the broker's endpoints.
        prefix: what starts a command (``!`` in ``!roll 2d6``).
        description: one line on what the bot does (shown by ``!help``).
        rate, burst: outgoing messages a second, and how many may go at once after a pause.
        timeout: seconds to wait for each reply from the broker.
        history: past messages of each room delivered when joining it (0: only new ones,
            so a restarted bot does not answer old commands).
        give_up_after: seconds to keep resending a message the broker refuses with
            ``retry_after``.
        max_text: longer messages are cut to this many characters (the broker's limit).
        max_handlers: events handled at once; reading waits while this many are running.
        help_command: register the built-in ``help`` command.

    Attributes ``nick``, ``rooms``, ``router``, ``pub``, ``prefix``, ``timeout``, ``rate``
    and ``burst`` may be changed until :meth:`start` (``zchat-bot`` does, from its options).
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
        rate: float = 5.0,
        burst: int = 10,
        timeout: float = 5.0,
        history: int = 0,
        give_up_after: float = 60.0,
        max_text: int = 4000,
        max_handlers: int = 100,
        help_command: bool = True,
    ) -> None:
        self.nick, self.rooms = nick, list(rooms)
        self.router, self.pub, self.prefix, self.description = router, pub, prefix, description
        self.rate, self.burst, self.timeout, self.history = rate, burst, timeout, history
        self.give_up_after, self.max_text, self.max_handlers = give_up_after, max_text, max_handlers
        self.commands: dict[str, Command] = {}
        self.stats = BotStats()
        self.client: AsyncClient | None = None
        self._on_message: list[tuple[re.Pattern[str], Callable[..., Any]]] = []
        self._on_join: list[Callable[..., Any]] = []
        self._on_leave: list[Callable[..., Any]] = []
        self._on_dm: list[Callable[..., Any]] = []
        self._on_event: list[tuple[frozenset[EventKind] | None, Callable[..., Any]]] = []
        self._periodic: list[_Periodic] = []
        self._on_start: list[Callable[..., Any]] = []
        self._on_stop: list[Callable[..., Any]] = []
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

    # -- registration ------------------------------------------------------------------------

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
            self._periodic.append(_Periodic(seconds, fn, immediately))
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
        self._closed = asyncio.Event()
        self._slots = asyncio.Semaphore(self.max_handlers)
        self._running = set()
        self._ever_connected = False
        client = AsyncClient(self.router, self.pub, timeout=self.timeout, history=self.history,
                             on_state=self._state_changed)
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
        self._outbox = Outbox(self._send, self.stats, rate=self.rate, burst=self.burst,
                              give_up_after=self.give_up_after)
        self._sender = asyncio.create_task(self._outbox.run(), name=f"bot-{self.nick}-outbox")
        for hook in self._on_start:
            await self._invoke(_Run(hook, (self,) if _takes_argument(hook) else ()))
        self._tasks = [asyncio.create_task(self._read(client), name=f"bot-{self.nick}-events")]
        self._tasks += [asyncio.create_task(self._every(p), name=f"bot-{self.nick}-every") for p in self._periodic]

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
                await self._invoke(_Run(hook, (self,) if _takes_argument(hook) else ()))
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

    async def _every(self, periodic: _Periodic) -> None:
        loop = asyncio.get_running_loop()
        run = _Run(periodic.handler, (self,) if _takes_argument(periodic.handler) else ())
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
