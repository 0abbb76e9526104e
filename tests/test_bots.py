"""The bot framework (:mod:`zchat.client.bot`), the shipped bots and ``zchat-bot``.

Pure pieces (argument binding, the token bucket, durations, the archive's files, the outbox
with a fake sender) are tested without sockets. Everything else runs real bots against a
real broker on loopback: the bots on an asyncio loop in a thread of the test process (or in
a ``zchat-bot`` child process), people as blocking :class:`~zchat.client.Client` objects.
Nothing sleeps for a fixed time: waits read events, or poll, until a deadline.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import pytest
from tests.support import wait_until

from zchat.broker import BrokerConfig
from zchat.broker.store import MemoryStore
from zchat.client import Bot, Client, ClientState, Context, EventKind, RequestTimeout, UsageError
from zchat.client.bot import (
    BotStats,
    Outbox,
    Outgoing,
    TokenBucket,
    bind_arguments,
    parameters_of,
    parse_command,
    usage_of,
)
from zchat.client.bots import archive, echo, greeter, remind, shipped
from zchat.common.codes import ErrorCode
from zchat.common.errors import RequestError
from zchat.common.protocol import Event, Sent

if TYPE_CHECKING:
    from tests.conftest import BrokerProcess, RunningBroker

#: Seconds any single wait may take before the test fails.
WAIT = 10.0
BOTCLI = [sys.executable, "-m", "zchat.client.botcli"]

T = TypeVar("T")
MakeClient = Callable[..., Client]
pytestmark = pytest.mark.timeout(30)


# -- helpers ---------------------------------------------------------------------------------


class BotLoop:
    """An asyncio loop on a thread, where the test's bots run while the test blocks."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bots", daemon=True)
        self.thread.start()
        self.bots: list[Bot] = []

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = WAIT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, bot: Bot, router: str, pub: str) -> Bot:
        bot.router, bot.pub = router, pub
        self.bots.append(bot)
        self.call(bot.start())
        return bot

    def close(self) -> None:
        """Stop every bot, then the loop; re-raise the first failure to stop once all are done."""
        errors: list[BaseException] = []
        for bot in self.bots:
            try:
                self.call(bot.stop())
            except Exception as exc:
                errors.append(exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        if errors:
            raise errors[0]


@pytest.fixture
def broker(broker_factory: Callable[..., RunningBroker]) -> RunningBroker:
    """The test broker, with ticks five times as often as by default.

    A bot that answers someone who just joined may publish before their subscription is in
    force; their client then learns of the message from the room's next tick.
    """
    return broker_factory(BrokerConfig(tick_interval=0.2))


@pytest.fixture
def bot_loop(broker_factory: object, broker_process: object) -> Iterator[BotLoop]:
    """A loop for bots; they stop before any broker of the test does (the fixtures it depends on)."""
    bl = BotLoop()
    yield bl
    bl.close()


@pytest.fixture
def run_bot(bot_loop: BotLoop, broker: RunningBroker) -> Callable[[Bot], Bot]:
    """Start a bot on the test broker (stopped at teardown)."""
    return lambda bot: bot_loop.start(bot, broker.router, broker.pub)


def expect(client: Client, match: Callable[[Event], bool], timeout: float = WAIT) -> list[Event]:
    """Events up to and including the first that ``match``es; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    seen: list[Event] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no matching event in {timeout} s; saw {[(e.kind, e.sender, e.text) for e in seen]}")
        try:
            event = client.recv_event(remaining)
        except TimeoutError:
            continue
        seen.append(event)
        if match(event):
            return seen


def said(sender: str, text: str | None = None, kind: EventKind = EventKind.MESSAGE) -> Callable[[Event], bool]:
    return lambda e: e.kind is kind and e.sender == sender and (text is None or e.text == text)


def reply_of(client: Client, bot: str, text: str | None = None, kind: EventKind = EventKind.MESSAGE) -> Event:
    return expect(client, said(bot, text, kind))[-1]


def ask(client: Client, room: str, command: str, bot: str) -> str:
    """Say ``command`` in ``room``; the text of ``bot``'s next message."""
    client.say(room, command)
    return reply_of(client, bot).text


def in_room(client: Client, room: str, nick: str) -> None:
    wait_until(lambda: nick in client.who(room), timeout=WAIT)


# -- pure pieces -----------------------------------------------------------------------------


def test_parse_command() -> None:
    assert parse_command("!roll 2d6  3", "!") == ("roll", "2d6  3")
    assert parse_command("!HELP", "!") == ("help", "")
    assert parse_command("!echo a\nb", "!") == ("echo", "a\nb")
    assert parse_command("hello !roll", "!") is None
    assert parse_command("! roll", "!") is None
    assert parse_command(".seen bob", ".") == ("seen", "bob")


def test_arguments_bind_by_signature() -> None:
    def add(ctx: Context, a: int, b: int = 10, *more: int) -> None: ...

    def say(ctx: Context, times: int, *, text: str) -> None: ...

    def mode(ctx: Context, which: Literal["on", "off"], ratio: float | None = None, loud: bool = False) -> None: ...

    p_add, p_say, p_mode = parameters_of(add), parameters_of(say), parameters_of(mode)
    assert [usage_of(p) for p in (p_add, p_say, p_mode)] == ["A [B] [MORE...]", "TIMES TEXT", "WHICH [RATIO] [LOUD]"]
    assert bind_arguments(p_add, "1") == ([1, 10], {})
    assert bind_arguments(p_add, "1 2 3 4") == ([1, 2, 3, 4], {})
    assert bind_arguments(p_say, '2  hello   "world" ') == ([2], {"text": 'hello   "world"'})
    assert bind_arguments(p_mode, "OFF 0.5 yes") == (["off", 0.5, True], {})
    assert bind_arguments(parameters_of(lambda ctx, name: None), '"two words"') == (["two words"], {})
    for params, text, reason in [
        (p_add, "", "A is missing"),
        (p_add, "x", "A must be a whole number, not 'x'"),
        (p_add, "1 2 x", "MORE must be a whole number, not 'x'"),
        (p_say, "3", "TEXT is missing"),
        (p_mode, "maybe", "WHICH must be one of on, off, not 'maybe'"),
        (p_mode, "on nan", "RATIO must be a number, not 'nan'"),
        (parameters_of(lambda ctx: None), "extra", "too many arguments: 'extra'"),
    ]:
        with pytest.raises(UsageError) as excinfo:
            bind_arguments(params, text)
        assert excinfo.value.reason == reason
    with pytest.raises(TypeError):
        parameters_of(lambda: None)  # no context
    with pytest.raises(TypeError):
        parameters_of(lambda ctx, *words, rest: None)  # both *words and a rest of line


def test_annotations_resolve_one_by_one_and_an_unresolvable_one_is_an_error() -> None:
    # This module has ``from __future__ import annotations``: every annotation is a string.
    # A context annotated with a name that only exists for type checkers must not make the
    # other parameters lose their types.
    def roll(ctx: NotImportedHere, times: int, mode: Literal["sum", "max"] = "sum") -> None:  # type: ignore[name-defined]  # noqa: F821
        pass

    times, mode = parameters_of(roll)
    assert bind_arguments((times, mode), "3 MAX") == ([3, "max"], {})

    def convert(ctx: Any, degrees: Celsius) -> None:  # type: ignore[name-defined]  # noqa: F821
        pass

    with pytest.raises(TypeError, match="'Celsius' of 'degrees' does not resolve"):
        parameters_of(convert)


def test_token_bucket_lets_a_burst_through_then_spaces_messages() -> None:
    bucket = TokenBucket(rate=10, burst=3, now=100.0)
    assert [bucket.reserve(100.0) for _ in range(5)] == [0, 0, 0, pytest.approx(0.1), pytest.approx(0.2)]
    assert bucket.reserve(100.35) == 0  # 0.35 s refilled 3.5 tokens: the debt of 2, and 1 more
    assert bucket.reserve(101000.0) == 0  # a long pause refills at most `burst`
    assert [bucket.reserve(101000.0) for _ in range(3)] == [0, 0, pytest.approx(0.1)]


def test_durations() -> None:
    assert remind.parse_duration("10m") == 600
    assert remind.parse_duration("1h30m") == 5400
    assert remind.parse_duration("0.5s") == 0.5
    assert remind.parse_duration("2D") == 172800
    for bad in ["", "10", "m", "1h 30m", "-5s", "0s", "1x"]:
        with pytest.raises(ValueError):
            remind.parse_duration(bad)
    formatted = [remind.format_duration(s) for s in (0.5, 45, 3599.6, 5400, 90061)]
    assert formatted == ["0.5s", "45s", "1h", "1h 30m", "1d 1h"]


def test_the_outbox_waits_out_retry_after_and_gives_up_on_other_errors() -> None:
    async def scenario() -> tuple[BotStats, list[Sent | BaseException], int]:
        attempts: list[str] = []

        async def send(item: Outgoing) -> Sent:
            attempts.append(item.text)
            if item.text == "bad":
                raise RequestError(ErrorCode.NOT_MEMBER, "not in that room")
            if item.text == "full" and attempts.count("full") < 3:
                raise RequestError(ErrorCode.UNAVAILABLE, "store full", retry_after=0.01)
            return Sent(0, len(attempts), 0.0)

        stats = BotStats()
        outbox = Outbox(send, stats, rate=1000, burst=10, give_up_after=5)
        runner = asyncio.create_task(outbox.run())
        futures = [outbox.put("r", None, text) for text in ("full", "bad", "ok")]
        results = await asyncio.gather(*futures, return_exceptions=True)
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        return stats, results, len(attempts)

    stats, results, attempts = asyncio.run(scenario())
    assert isinstance(results[0], Sent) and isinstance(results[2], Sent)
    assert isinstance(results[1], RequestError) and results[1].code is ErrorCode.NOT_MEMBER
    assert (stats.retries, stats.sent, stats.failed, attempts) == (2, 2, 1, 5)


def test_the_outbox_waits_out_rate_limited_and_does_not_burst_after_it() -> None:
    """Refused for flooding once: the message is resent after retry_after, and the messages
    queued behind it go at the bucket's rate, not in a burst (the burst is spent)."""

    async def scenario() -> tuple[BotStats, list[float]]:
        loop = asyncio.get_running_loop()
        times: list[float] = []
        refused = False

        async def send(item: Outgoing) -> Sent:
            nonlocal refused
            if not refused:
                refused = True
                raise RequestError(ErrorCode.RATE_LIMITED, "slow down", retry_after=0.05)
            times.append(loop.time())
            return Sent(0, len(times), 0.0)

        stats = BotStats()
        outbox = Outbox(send, stats, rate=20, burst=10, give_up_after=5)
        runner = asyncio.create_task(outbox.run())
        await asyncio.gather(*(outbox.put("r", None, f"m{i}") for i in range(4)))
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        return stats, times

    stats, times = asyncio.run(scenario())
    assert (stats.rate_limited, stats.retries, stats.sent) == (1, 1, 4)
    # The wait refilled one token; the other two go 1/20 s apart, not in a burst.
    assert times[-1] - times[0] >= 0.09, times
    bucket = TokenBucket(2, 5, now=0.0)
    bucket.drain(0.0)
    assert bucket.reserve(0.0) == pytest.approx(0.5)  # the next token comes at the rate


def test_an_outbox_stopped_mid_send_fails_what_it_had_not_sent() -> None:
    async def scenario() -> list[BaseException | Sent]:
        started = asyncio.Event()

        async def send(item: Outgoing) -> Sent:
            started.set()
            await asyncio.Event().wait()  # the broker never answers
            raise AssertionError("unreachable")

        outbox = Outbox(send, BotStats())
        runner = asyncio.create_task(outbox.run())
        futures = [outbox.put(None, "bob", text) for text in ("in flight", "queued")]
        await started.wait()
        assert outbox.pending == 2
        runner.cancel()
        return await asyncio.gather(*futures, return_exceptions=True)

    results = asyncio.run(scenario())
    assert [type(r).__name__ for r in results] == ["ConnectionClosed", "ConnectionClosed"]


def event(room: str, text: str, ts: float, seq: int) -> Event:
    return Event(EventKind.MESSAGE, room, "alice", text, ts, int(ts * 1e6), seq=seq)


def test_archive_files_rotate_by_day_and_by_size(tmp_path: Path) -> None:
    day1 = dt.datetime(2026, 11, 21, 23, 59, tzinfo=dt.UTC).timestamp()
    day2 = day1 + 120
    store = archive.Archive(tmp_path, max_bytes=400)
    paths = [store.write(event("ops", f"message {i}", day1 + i, i)) for i in range(1, 5)]
    paths.append(store.write(event("ops", "tomorrow", day2, 5)))
    store.close()
    names = [p.name for p in paths]
    assert names[0] == "2026-11-21.jsonl" and names[-1] == "2026-11-22.jsonl"
    assert "2026-11-21_0001.jsonl" in names  # four ~190-byte lines do not fit in 400 bytes
    for path in set(paths):
        assert path.parent == tmp_path / "ops" and 0 < path.stat().st_size <= 400
    # A new archive (a restarted bot) appends to the newest part of the day, or starts the next.
    again = archive.Archive(tmp_path, max_bytes=0)
    assert again.write(event("ops", "late", day1 + 30, 6)) == paths[3]
    again.close()
    again = archive.Archive(tmp_path, max_bytes=400)
    assert again.write(event("ops", "later", day1 + 40, 7)).name == "2026-11-21_0002.jsonl"
    again.close()
    line = json.loads(paths[-1].read_text())
    assert line == {"room": "ops", "seq": 5, "id": int(day2 * 1e6), "ts": day2, "time": "2026-11-22T00:01:00.000+00:00",
                    "kind": "message", "sender": "alice", "text": "tomorrow"}


# -- the shipped bots against a real broker --------------------------------------------------


def test_greeter_greets_each_joiner_with_the_configured_text(
    run_bot: Callable[[Bot], Bot], client_factory: MakeClient
) -> None:
    bot = greeter.SPEC.make_bot({"text": "hi {nick}, this is #{room}", "cooldown": 600.0})
    bot.rooms = ["lobby"]
    run_bot(bot)
    alice = client_factory("alice", "lobby")
    reply_of(alice, "greeter", "hi alice, this is #lobby")
    alice.leave("lobby")
    alice.join("lobby", history=0)  # back within the cooldown: not greeted again
    bob = client_factory("bob", "lobby")
    seen = expect(alice, said("greeter", "hi bob, this is #lobby"))
    assert [e.text for e in seen if e.sender == "greeter"] == ["hi bob, this is #lobby"]
    reply_of(bob, "greeter", "hi bob, this is #lobby")


def test_a_bot_accepts_an_invitation_and_forgets_a_room_it_is_kicked_from(
    run_bot: Callable[[Bot], Bot], client_factory: MakeClient
) -> None:
    bot = Bot("dicebot")

    @bot.on_event(EventKind.INVITE)
    async def accept(ctx: Context) -> None:  # as in BOTS.md
        if ctx.event.nick == ctx.bot.current_nick and ctx.room not in ctx.bot.rooms:
            assert ctx.room is not None
            await ctx.bot.join(ctx.room)

    @bot.command()
    def ping(ctx: Context) -> str:
        return "pong"

    run_bot(bot)
    alice = client_factory("alice")
    alice.join("den", private=True)
    alice.invite("den", "dicebot")
    in_room(alice, "den", "dicebot")
    assert ask(alice, "den", "!ping", "dicebot") == "pong"
    alice.kick("den", "dicebot", "enough dice")
    wait_until(lambda: bot.rooms == [], timeout=WAIT)
    assert bot.client is not None and bot.client.joined == []


def test_greeter_rejects_unknown_placeholders() -> None:
    assert greeter.parse_greeting("{{literal}} {nick}") == "{{literal}} {nick}"
    with pytest.raises(ValueError, match="placeholder"):
        greeter.parse_greeting("hello {name}")


def test_echo_answers_in_a_room_and_by_dm(run_bot: Callable[[Bot], Bot], client_factory: MakeClient) -> None:
    run_bot(echo.SPEC.make_bot({}))
    alice = client_factory("alice", "general")
    assert ask(alice, "general", "!echo hello   there", "echo") == "hello   there"
    assert ask(alice, "general", "!echo", "echo") == "TEXT is missing — usage: !echo TEXT"
    alice.dm("echo", "psst")
    assert reply_of(alice, "echo", kind=EventKind.DM).text == "psst"
    alice.dm("echo", "!echo by dm")
    assert reply_of(alice, "echo", kind=EventKind.DM).text == "by dm"


def archived(directory: Path, room: str) -> list[dict[str, Any]]:
    return [json.loads(line) for path in sorted((directory / room).glob("*.jsonl")) for line in path.open()]


def test_archive_writes_the_rooms_as_json_lines_and_rotates(
    run_bot: Callable[[Bot], Bot], client_factory: MakeClient, tmp_path: Path
) -> None:
    bot = archive.SPEC.make_bot({"dir": str(tmp_path), "max_bytes": 700})
    bot.rooms = ["ops", "dev"]
    run_bot(bot)
    alice = client_factory("alice", "ops")
    sent = [alice.say("ops", f"deploy {i} done") for i in range(6)]
    alice.say("ops", "restarting", action=True)
    alice.dm("archive", "not archived")
    wait_until(lambda: len(archived(tmp_path, "ops")) == 8, timeout=WAIT)
    lines = archived(tmp_path, "ops")
    assert [(r["kind"], r["sender"]) for r in lines] == [("join", "alice")] + [("message", "alice")] * 6 + [
        ("action", "alice")
    ]
    messages = lines[1:7]
    assert [(r["text"], r["seq"], r["id"], r["ts"]) for r in messages] == [
        (f"deploy {i} done", s.seq, s.id, s.ts) for i, s in enumerate(sent)
    ]
    assert set(lines[1]) == {"room", "seq", "id", "ts", "time", "kind", "sender", "text"}
    files = sorted((tmp_path / "ops").glob("*.jsonl"))
    assert len(files) >= 2 and all(f.stat().st_size <= 700 for f in files)
    assert files[0].name == dt.datetime.fromtimestamp(sent[0].ts, dt.UTC).date().isoformat() + ".jsonl"
    assert not (tmp_path / "dev").exists() or archived(tmp_path, "dev") == []


def test_remind_fires_a_short_reminder_and_lists_the_others(
    run_bot: Callable[[Bot], Bot], client_factory: MakeClient
) -> None:
    now = [1000.0]
    run_bot(remind.make_bot({}, clock=lambda: now[0]))
    alice = client_factory("alice", "general")
    assert ask(alice, "general", "!remind 1h buy milk", "remind") == "alice: ok, in 1h (reminder #1)"
    now[0] += 1799  # the clock only tells what is left; timers run on the loop
    started = time.monotonic()
    assert ask(alice, "general", "!remind 0.3s ping", "remind") == "alice: ok, in 0.3s (reminder #2)"
    reply_of(alice, "remind", "alice: reminder: ping")
    assert time.monotonic() - started >= 0.25
    listing = ask(alice, "general", "!reminders", "remind")
    assert listing == "alice: 1 reminder: #1 in 30m 1s: buy milk"
    assert ask(alice, "general", "!remind soon x", "remind") == (
        "WHEN must be a duration like 90s, 10m or 1h30m, not 'soon' — usage: !remind DURATION TEXT"
    )
    assert ask(alice, "general", "!forget 1", "remind") == "alice: forgot #1 (buy milk)"
    assert ask(alice, "general", "!reminders", "remind") == "alice: no reminders"
    alice.dm("remind", "!remind 0.1s by dm")
    reply_of(alice, "remind", "alice: ok, in 0.1s (reminder #3)", kind=EventKind.DM)
    reply_of(alice, "remind", "reminder: by dm", kind=EventKind.DM)


# -- the decorator API -----------------------------------------------------------------------


def test_commands_parse_arguments_and_answer_usage_errors(
    run_bot: Callable[[Bot], Bot], client_factory: MakeClient
) -> None:
    bot = Bot("calc", ["math"], description="does sums")

    @bot.command("add")
    def add(ctx: Context, a: int, b: int = 10, *more: int) -> str:
        """add whole numbers"""
        return str(a + b + sum(more))

    @bot.command("repeat", usage="N TEXT")
    async def repeat(ctx: Context, times: int, *, text: str) -> None:
        if times < 1:
            raise UsageError("N must be at least 1")
        await ctx.reply(" / ".join([text] * times))

    run_bot(bot)
    alice = client_factory("alice", "math")
    assert ask(alice, "math", "!add 1", "calc") == "11"
    assert ask(alice, "math", "!ADD 1 2 3 4", "calc") == "10"
    assert ask(alice, "math", "!add one", "calc") == "A must be a whole number, not 'one' — usage: !add A [B] [MORE...]"
    assert ask(alice, "math", "!repeat 2 hi  you", "calc") == "hi  you / hi  you"
    assert ask(alice, "math", "!repeat 0 x", "calc") == "N must be at least 1 — usage: !repeat N TEXT"
    assert ask(alice, "math", "!help", "calc") == (
        "calc: does sums\n!add A [B] [MORE...] — add whole numbers\n"
        "!help [COMMAND] — list the commands, or describe one\n!repeat N TEXT"
    )
    assert ask(alice, "math", "!help add", "calc") == "!add A [B] [MORE...] — add whole numbers"
    alice.dm("calc", "!add 2 2")  # commands work by DM too; the answer comes by DM
    assert reply_of(alice, "calc", kind=EventKind.DM).text == "4"


def test_a_failing_handler_is_logged_and_the_bot_goes_on(
    run_bot: Callable[[Bot], Bot], client_factory: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    bot = Bot("fragile", ["general"])

    @bot.command("boom")
    def boom(ctx: Context) -> str:
        raise RuntimeError("kaboom")

    @bot.on_message(r"^crash")
    async def crash(ctx: Context, match: object) -> None:
        raise ValueError("bad pattern handler")

    @bot.on_message(r"^crash (\w+)")
    def survive(ctx: Context, match: Any) -> str:
        return f"still here, {match.group(1)}"

    @bot.command("ping")
    def ping(ctx: Context) -> str:
        return "pong"

    caplog.set_level(logging.ERROR, logger="zchat.bot")
    run_bot(bot)
    alice = client_factory("alice", "general")
    assert ask(alice, "general", "!boom", "fragile") == "sorry, !boom failed (the bot's log has the details)"
    assert ask(alice, "general", "crash now", "fragile") == "still here, now"
    assert ask(alice, "general", "!ping", "fragile") == "pong"
    failures = [r for r in caplog.records if r.exc_info]
    assert [type(r.exc_info[1]).__name__ for r in failures if r.exc_info] == ["RuntimeError", "ValueError"]
    assert "boom" in failures[0].getMessage() and "'!boom'" in failures[0].getMessage()
    assert bot.stats.errors == 2 and bot.state is ClientState.CONNECTED


def test_on_message_join_leave_and_dm_handlers(run_bot: Callable[[Bot], Bot], client_factory: MakeClient) -> None:
    bot = Bot("watcher", ["hall"])
    seen: list[tuple[str, str, str | None]] = []

    @bot.on_message(r"(?i)\bhello,? (\w+)")
    def hello(ctx: Context, match: Any) -> str:
        return f"{match.group(1)} says hi back"

    @bot.on_join
    def joined(ctx: Context) -> None:
        seen.append(("join", ctx.sender, ctx.room))

    @bot.on_leave
    async def left(ctx: Context) -> None:
        seen.append(("leave", ctx.sender, ctx.room))
        await ctx.reply(f"bye {ctx.sender} ({ctx.text})")

    @bot.on_dm
    def dm(ctx: Context) -> str:
        seen.append(("dm", ctx.sender, ctx.room))
        return f"you said {ctx.text!r}"

    run_bot(bot)
    alice = client_factory("alice", "hall")
    assert ask(alice, "hall", "well HELLO, watcher!", "watcher") == "watcher says hi back"
    alice.dm("watcher", "secret")
    assert reply_of(alice, "watcher", kind=EventKind.DM).text == "you said 'secret'"
    bob = client_factory("bob", "hall")
    bob.leave("hall")
    reply_of(alice, "watcher", "bye bob (left)")
    assert seen == [("join", "alice", "hall"), ("dm", "alice", None), ("join", "bob", "hall"), ("leave", "bob", "hall")]


def test_every_runs_a_periodic_task_even_after_it_fails(bot_loop: BotLoop, broker: RunningBroker) -> None:
    bot = Bot("ticker")
    runs: list[float] = []

    @bot.every(0.05)
    def tick() -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise RuntimeError("first run fails")

    @bot.every(0.05, immediately=True)
    def announce(b: Bot) -> None:
        assert b is bot

    bot_loop.start(bot, broker.router, broker.pub)
    wait_until(lambda: len(runs) >= 4, timeout=WAIT)
    assert all(later - earlier >= 0.04 for earlier, later in itertools.pairwise(runs))
    assert bot.stats.errors == 1


def test_the_bot_ignores_its_own_messages(run_bot: Callable[[Bot], Bot], client_factory: MakeClient) -> None:
    bot = Bot("parrot", ["cage"])

    @bot.on_message(".*")
    def parrot(ctx: Context, match: Any) -> str:
        return "parrot: " + ctx.text  # would answer itself forever if it heard itself

    @bot.on_join
    def hello(ctx: Context) -> str:
        return f"welcome {ctx.sender}"

    run_bot(bot)
    alice = client_factory("alice", "cage")
    reply_of(alice, "parrot", "welcome alice")  # not "welcome parrot"
    for text in ("one", "two", "three"):
        assert ask(alice, "cage", text, "parrot") == f"parrot: {text}"
    history = alice.history("cage")
    assert [(e.sender, e.text) for e in history] == [
        ("parrot", "welcome alice"), ("alice", "one"), ("parrot", "parrot: one"), ("alice", "two"),
        ("parrot", "parrot: two"), ("alice", "three"), ("parrot", "parrot: three"),
    ]


def test_a_burst_is_delayed_by_the_token_bucket_not_refused(
    run_bot: Callable[[Bot], Bot], client_factory: MakeClient
) -> None:
    bot = Bot("chatty", ["noise"], rate=20, burst=3)

    @bot.command("count")
    def count(ctx: Context, n: int) -> None:
        for i in range(n):
            ctx.reply(f"n{i}")  # not awaited: queued in order

    run_bot(bot)
    alice = client_factory("alice", "noise")
    alice.say("noise", "!count 12")
    got = [e for e in expect(alice, said("chatty", "n11")) if e.sender == "chatty"]
    assert [e.text for e in got] == [f"n{i}" for i in range(12)]
    # The first three go at once; the other nine at least a twentieth of a second apart
    # (by the broker's clock: when each was stored).
    assert got[2].ts - got[0].ts < 0.3
    assert got[11].ts - got[2].ts >= 9 / 20 * 0.8
    assert bot.stats.throttled > 0 and bot.stats.failed == 0


def test_a_refusal_with_retry_after_is_waited_out_and_resent(
    broker_factory: Callable[..., RunningBroker], bot_loop: BotLoop
) -> None:
    rb = broker_factory(BrokerConfig(store="memory"))
    store = rb.broker.store
    assert isinstance(store, MemoryStore)
    gate = threading.Event()
    bot = Bot("patient", ["disk"])

    @bot.command("hold")
    async def hold(ctx: Context) -> str:
        await asyncio.to_thread(gate.wait, WAIT)
        return "done"

    bot_loop.start(bot, rb.router, rb.pub)
    alice = Client(rb.router, rb.pub)
    try:
        alice.connect("alice")
        alice.join("disk")
        alice.say("disk", "!hold")
        wait_until(lambda: bot.stats.commands == 1)
        rb.broker.submit(lambda: setattr(store, "fail_commits", True)).result(WAIT)
        gate.set()
        wait_until(lambda: bot.stats.retries >= 1)  # refused with unavailable + retry_after
        rb.broker.submit(lambda: setattr(store, "fail_commits", False)).result(WAIT)
        reply_of(alice, "patient", "done")
        assert bot.stats.failed == 0
    finally:
        alice.close()


def test_the_bot_reconnects_after_a_broker_restart_and_answers_again(
    bot_loop: BotLoop, broker_process: Callable[..., BrokerProcess], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    options = ("--data-dir", str(tmp_path), "--session-timeout", "1")
    first = broker_process(*options)
    bot = echo.SPEC.make_bot({})
    bot.timeout = 1.0
    caplog.set_level(logging.INFO, logger="zchat.bot")
    bot_loop.start(bot, first.router, first.pub)
    alice = Client(first.router, first.pub, timeout=1.0)
    try:
        alice.connect("alice")
        alice.join("general")
        assert ask(alice, "general", "!echo before", "echo") == "before"
        first.proc.kill()  # SIGKILL: no goaway, the bot notices by its heartbeats
        first.proc.wait(WAIT)
        second = broker_process("--router", first.router, "--pub", first.pub, *options)
        assert (second.router, second.pub) == (first.router, first.pub)
        # Said while the bot may still be away: it fills the gap from history when back.
        assert ask(alice, "general", "!echo after", "echo") == "after"
        messages = [r.getMessage() for r in caplog.records if r.name == "zchat.bot"]
        assert any("reconnecting" in m for m in messages) and any("reconnected as echo" in m for m in messages)
        assert bot.state is ClientState.CONNECTED
    finally:
        alice.close()


def test_stop_from_a_handler_and_start_again(
    bot_loop: BotLoop, broker: RunningBroker, client_factory: MakeClient
) -> None:
    bot = Bot("quitter", ["general"])
    stopped: list[bool] = []

    @bot.command("quit")
    async def quit_(ctx: Context) -> None:
        await ctx.reply("bye")
        await ctx.bot.stop()

    @bot.on_stop
    def note() -> None:
        stopped.append(True)

    bot_loop.start(bot, broker.router, broker.pub)
    alice = client_factory("alice", "general")
    assert ask(alice, "general", "!quit", "quitter") == "bye"
    wait_until(lambda: bot.client is None)
    assert stopped == [True]
    bot_loop.call(bot.start())  # a stopped bot may start again
    in_room(alice, "general", "quitter")
    assert ask(alice, "general", "!help quit", "quitter") == "!quit"


# -- zchat-bot -------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without ZCHAT_* variables, plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("ZCHAT_")}, **extra}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BOTCLI, *args], capture_output=True, text=True, timeout=WAIT, env=env or clean_env(),
                          check=False)


class BotProcess:
    """``zchat-bot`` in a child process, stopped with SIGTERM (its exit status is checked)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([*BOTCLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env or clean_env())

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


@pytest.fixture
def bot_process() -> Iterator[Callable[..., BotProcess]]:
    procs: list[BotProcess] = []

    def spawn(*args: str, env: dict[str, str] | None = None) -> BotProcess:
        procs.append(BotProcess(*args, env=env))
        return procs[-1]

    yield spawn
    for p in procs:
        p.stop()


def test_cli_lists_the_shipped_bots() -> None:
    result = run_cli("--list")
    assert result.returncode == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == list(shipped()) == ["greeter", "echo", "archive", "remind"]
    assert "welcomes each joiner" in result.stdout


def test_cli_rejects_an_unknown_bot_and_bad_options(tmp_path: Path) -> None:
    result = run_cli("nosuchbot")
    assert result.returncode == 2 and "unknown bot 'nosuchbot'" in result.stderr and "greeter" in result.stderr
    result = run_cli("greeter", "--text", "hi {name}")
    assert result.returncode == 2 and "--text" in result.stderr
    result = run_cli("greeter", env=clean_env(ZCHAT_BOT_RATE="fast"))
    assert result.returncode == 2 and "ZCHAT_BOT_RATE" in result.stderr
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    result = run_cli(str(empty))
    assert result.returncode == 2 and "defines no module-level `bot = Bot(...)`" in result.stderr
    broken = tmp_path / "broken.py"
    broken.write_text("raise ImportError('missing dependency')\n")
    result = run_cli(str(broken))
    assert result.returncode == 1 and "ImportError: missing dependency" in result.stderr


def test_cli_help_documents_each_bots_options() -> None:
    for name, flags in [("greeter", ["--text", "ZCHAT_GREETING", "--cooldown"]),
                        ("archive", ["--dir", "ZCHAT_ARCHIVE_DIR", "--max-bytes"]),
                        ("remind", ["--max", "--per-nick"]), ("echo", ["--room", "--nick", "--rate"])]:
        result = run_cli(name, "--help")
        assert result.returncode == 0
        assert all(flag in result.stdout for flag in flags), (name, result.stdout)


def test_cli_runs_the_greeter_with_settings_from_the_environment_and_a_config_file(
    bot_process: Callable[..., BotProcess], broker: RunningBroker, client_factory: MakeClient, tmp_path: Path
) -> None:
    config = tmp_path / "zchat.toml"
    config.write_text('nick = "ignored"\n[bot]\nnick = "doorman"\nroom = ["lobby", "annex"]\ncooldown = 0\n')
    env = clean_env(ZCHAT_ROUTER=broker.router, ZCHAT_PUB=broker.pub, ZCHAT_CONFIG=str(config),
                    ZCHAT_GREETING="Hello {nick}, welcome to {room}.")
    proc = bot_process("greeter", env=env)
    watcher = client_factory("watcher", "annex")
    wait_until(lambda: "doorman" in watcher.who("annex") and "doorman" in watcher.who("lobby"), timeout=WAIT)
    client_factory("carol", "lobby")
    reply_of(client_factory("dave", "annex"), "doorman", "Hello dave, welcome to annex.")
    code, err = proc.stop()
    assert code == 0, err
    assert "doorman connected" in err


def test_cli_runs_a_bot_file_with_command_line_overrides(
    bot_process: Callable[..., BotProcess], broker: RunningBroker, client_factory: MakeClient, tmp_path: Path
) -> None:
    path = tmp_path / "mybot.py"
    path.write_text(textwrap.dedent('''
        from zchat.client import Bot, Context

        bot = Bot("filebot", rooms=["nowhere"], prefix="?")

        @bot.command("hello")
        def hello(ctx: Context, name: str = "you") -> str:
            """say hello"""
            return f"hello {name}, from {ctx.bot.current_nick}"

        if __name__ == "__main__":
            bot.run()
    '''))
    proc = bot_process(str(path), "--router", broker.router, "--pub", broker.pub, "--room", "files", "--room", "more",
                       "--nick", "fb")
    alice = client_factory("alice", "files", "more")
    in_room(alice, "more", "fb")
    assert "fb" in alice.who("files") and "nowhere" not in [r.name for r in alice.rooms()]
    assert ask(alice, "files", "?hello alice", "fb") == "hello alice, from fb"
    code, err = proc.stop()
    assert code == 0, err


def test_cli_exits_1_when_the_broker_is_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = sock.getsockname()[1]
        result = run_cli("echo", "--router", f"tcp://127.0.0.1:{port}", "--pub", f"tcp://127.0.0.1:{port}",
                         "--timeout", "0.3")
    assert result.returncode == 1 and "no answer from the broker" in result.stderr


def test_python_dash_m_zchat_client_bots_is_the_same_command() -> None:
    result = subprocess.run([sys.executable, "-m", "zchat.client.bots", "--list"], capture_output=True, text=True,
                            timeout=WAIT, env=clean_env(), check=False)
    assert result.returncode == 0 and result.stdout.split()[0] == "greeter"


def test_wait_stopped_returns_after_a_failed_start() -> None:
    """A bot whose start() failed (no broker) is not running: wait_stopped() must not hang."""

    async def scenario() -> None:
        with socket.socket() as probe:  # a port nobody listens on
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        bot = Bot("lonely", rooms=["general"], router=f"tcp://127.0.0.1:{port}",
                  pub=f"tcp://127.0.0.1:{port + 1}", timeout=0.3)
        with pytest.raises(RequestTimeout):
            await bot.start()
        await asyncio.wait_for(bot.wait_stopped(), 2)

    asyncio.run(scenario())
