"""The command-line programs, run as real processes: ``python -m zchat.client`` and ``-m zchat.broker``.

The client runs against a broker on loopback (OS-chosen ports) with stdin and stdout piped,
so it is in line mode (or JSON-lines mode with ``--json``); a blocking
:class:`~zchat.client.Client` on the other side checks what arrives. Every subprocess call has
a timeout, and the environment is stripped of ``ZCHAT_*`` variables unless a test sets them.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any

import pytest
from tests.support import events_until

from zchat.broker import __version__ as broker_version
from zchat.client import Client, EventKind
from zchat.client import __version__ as client_version
from zchat.client.cli import describe_joined, parse_join, parse_moderation
from zchat.client.render import format_event, format_members, format_rooms
from zchat.common.protocol import Event, Joined, RoomInfo

if TYPE_CHECKING:
    from tests.conftest import BrokerProcess, RunningBroker

CLIENT = [sys.executable, "-m", "zchat.client"]
BROKER = [sys.executable, "-m", "zchat.broker"]
#: Seconds any single wait may take before the test fails.
WAIT = 10.0


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without ZCHAT_* variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZCHAT_")}
    return {**env, **extra}


def run(cmd: list[str], *, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = clean_env() if env is None else env
    return subprocess.run(cmd, check=False, input=stdin, capture_output=True, text=True, timeout=WAIT, env=env)


def endpoints(rb: RunningBroker) -> list[str]:
    return ["--router", rb.router, "--pub", rb.pub]


def start_client(rb: RunningBroker, *args: str) -> subprocess.Popen[str]:
    """The line client as carol in #general (plus ``args``), with pipes to talk to it."""
    return subprocess.Popen(
        [*CLIENT, *endpoints(rb), "--nick", "carol", "--room", "general", *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
    )  # fmt: skip



@contextlib.contextmanager
def json_client(rb: RunningBroker) -> Iterator[tuple[Callable[[str], None], JsonLines, subprocess.Popen[str]]]:
    """The line client as carol in #general with ``--json``, joined: ``send(line)``, its
    output, and the process (killed at the end if still running)."""
    proc = start_client(rb, "--json")
    assert proc.stdin is not None and proc.stdout is not None
    stdin = proc.stdin

    def send(line: str) -> None:
        stdin.write(line + "\n")
        stdin.flush()

    try:
        out = JsonLines(proc.stdout)
        out.next("joined")  # #general
        yield send, out, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT)


def summary(events: list[Event]) -> list[tuple[str, str, str]]:
    return [(e.kind.value, e.sender, e.text) for e in events]


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it), not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


class JsonLines:
    """A child's stdout as parsed JSON objects, read by a thread so tests wait with a deadline."""

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in iter(stream.readline, ""):
            self._queue.put(line)
        self._queue.put("")

    def next(self, kind: str, timeout: float = WAIT) -> dict[str, Any]:
        """The next object whose kind is ``kind``; every line on the way must be one JSON object."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {kind!r} line within {timeout} s: {self.seen!r}") from None
            if not line:
                raise AssertionError(f"output ended before a {kind!r} line: {self.seen!r}")
            obj = json.loads(line)
            assert type(obj) is dict and line.endswith("\n") and "\n" not in line[:-1], line
            self.seen.append(obj)
            if obj["kind"] == kind:
                return obj


# -- line mode -------------------------------------------------------------------------------


def test_line_mode_sends_each_line_and_exits_once_acknowledged(
    broker: RunningBroker, client_factory: Callable[..., Client]
) -> None:
    bob = client_factory("bob", "general")
    lines = ["one", "two", "", "//three", "/frobnicate", "/who", "/me waves", "/msg bob hi", "four"]
    done = run([*CLIENT, *endpoints(broker), "--nick", "carol", "--room", "general"], stdin="\n".join(lines) + "\n")
    assert done.returncode == 1, done.stderr  # every line ran, but /frobnicate failed: scripts can tell
    assert "-- #general: 2 here: bob, carol" in done.stderr  # /who; replies go to stderr in line mode
    assert "unknown command /frobnicate" in done.stderr

    events = events_until(bob, lambda e: e.kind is EventKind.LEAVE)
    assert summary(events) == [
        ("join", "carol", ""),
        ("message", "carol", "one"),
        ("message", "carol", "two"),
        ("message", "carol", "/three"),
        ("action", "carol", "waves"),
        ("dm", "carol", "hi"),
        ("message", "carol", "four"),
        ("leave", "carol", "quit"),
    ]
    assert {e.room for e in events if e.kind is not EventKind.DM} == {"general"}
    assert events[5].to == "bob"


def test_line_mode_stops_reading_at_quit(broker: RunningBroker, client_factory: Callable[..., Client]) -> None:
    bob = client_factory("bob", "general")
    done = run([*CLIENT, *endpoints(broker), "--nick", "carol"], stdin="before\n/quit\nafter\n")
    assert done.returncode == 0, done.stderr
    assert summary(events_until(bob, lambda e: e.kind is EventKind.LEAVE)) == [
        ("join", "carol", ""),
        ("message", "carol", "before"),
        ("leave", "carol", "quit"),
    ]


def test_line_mode_reads_its_settings_from_the_environment(
    broker: RunningBroker, client_factory: Callable[..., Client]
) -> None:
    bob = client_factory("bob", "kitchen")
    env = clean_env(ZCHAT_ROUTER=broker.router, ZCHAT_PUB=broker.pub, ZCHAT_NICK="carol", ZCHAT_ROOM="#Kitchen")
    done = run(CLIENT, stdin="from the env\n", env=env)
    assert done.returncode == 0, done.stderr
    said = events_until(bob, lambda e: e.kind is EventKind.MESSAGE)[-1]
    assert (said.room, said.sender, said.text) == ("kitchen", "carol", "from the env")


def test_line_mode_with_a_taken_nick_exits_1(broker: RunningBroker, client_factory: Callable[..., Client]) -> None:
    client_factory("carol")
    done = run([*CLIENT, *endpoints(broker), "--nick", "CAROL"], stdin="hello\n")
    assert done.returncode == 1
    assert "nick_taken" in done.stderr


def test_json_mode_prints_one_object_per_event(broker: RunningBroker, client_factory: Callable[..., Client]) -> None:
    bob = client_factory("bob", "general")
    proc = start_client(broker, "--json")
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        out = JsonLines(proc.stdout)
        assert out.next("welcome")["nick"] == "carol"
        assert out.next("joined")["members"] == ["bob", "carol"]  # carol now hears #general

        sent = bob.say("general", "hello, json")
        message = out.next("message")
        assert message == {
            "kind": "message",
            "room": "general",
            "sender": "bob",
            "text": "hello, json",
            "ts": sent.ts,
            "id": sent.id,
        }
        sent = bob.dm("carol", "psst\nsecond line")
        dm = out.next("dm")
        assert dm == {
            "kind": "dm",
            "room": None,
            "sender": "bob",
            "text": "psst\nsecond line",
            "ts": sent.ts,
            "id": sent.id,
            "to": "carol",
        }
        bob.nick("robert")
        nick = out.next("nick")
        assert (nick["room"], nick["sender"], nick["nick"]) == ("general", "bob", "robert")
        assert {"kind", "room", "sender", "text", "ts", "id"} <= set(nick)

        proc.stdin.write("/who\n")
        proc.stdin.flush()
        members = {"kind": "members", "room": "general", "members": ["carol", "robert"], "ops": [], "away": {}}
        assert out.next("members") == members
        proc.stdin.write("from carol\n")
        proc.stdin.close()  # end of input: the client says bye once its lines are acknowledged
        assert proc.wait(WAIT) == 0, proc.stderr.read()
        said = events_until(bob, lambda e: e.kind is EventKind.MESSAGE and e.sender == "carol")[-1]
        assert said.text == "from carol"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()


# -- away -----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_line_mode_away_and_back(broker: RunningBroker, client_factory: Callable[..., Client]) -> None:
    bob = client_factory("bob", "general")
    with json_client(broker) as (send, out, proc):
        send("/away lunch, back at 2")
        assert out.next("away_set") == {"kind": "away_set", "text": "lunch, back at 2"}
        # The room's event, as every member gets it (before or after the reply: two sockets).
        seen = next((o for o in out.seen if o["kind"] == "away"), None) or out.next("away")
        assert (seen["room"], seen["sender"], seen["text"]) == ("general", "carol", "lunch, back at 2")
        assert events_until(bob, lambda e: e.kind is EventKind.AWAY)[-1].text == "lunch, back at 2"
        assert bob.members("general").away == {"carol": "lunch, back at 2"}
        assert bob.dm("carol", "ping me").away == "lunch, back at 2"
        bob.away("in a meeting")
        send("/who")
        assert out.next("members")["away"] == {"bob": "in a meeting", "carol": "lunch, back at 2"}
        send("/msg bob later")
        assert out.next("peer_away") == {"kind": "peer_away", "nick": "bob", "text": "in a meeting"}  # and sent
        assert events_until(bob, lambda e: e.kind is EventKind.DM and e.text == "later")
        send("/back")
        assert out.next("away_set") == {"kind": "away_set", "text": ""}
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(WAIT) == 0
        assert events_until(bob, lambda e: e.kind is EventKind.AWAY and e.sender == "carol" and not e.text)


# -- private rooms and moderation -------------------------------------------------------------


def test_json_mode_runs_a_private_room(broker: RunningBroker, client_factory: Callable[..., Client]) -> None:
    bob = client_factory("bob")
    with json_client(broker) as (send, out, proc):
        send("/create den")
        assert out.next("joined") == {
            "kind": "joined", "room": "den", "members": ["carol"], "private": True, "subject": "", "ops": ["carol"],
            "away": {},
        }  # fmt: skip
        send("/invite bob")
        assert out.next("moderated") == {"kind": "moderated", "room": "den", "action": "invite", "nick": "bob"}
        events_until(bob, lambda e: e.kind is EventKind.INVITE)
        bob.join("den")
        send("/topic plans")
        topic = out.next("topic")
        assert (topic["room"], topic["sender"], topic["text"]) == ("den", "carol", "plans")
        send("/who")
        assert out.next("members")["ops"] == ["carol"]
        send("/kick bob spam")
        kick = out.next("kick")
        assert (kick["room"], kick["sender"], kick["nick"], kick["text"]) == ("den", "carol", "bob", "spam")
        send("/kick")
        assert out.next("error") == {"kind": "error", "code": "usage", "reason": "usage: /kick NICK [REASON]"}
        send("still private")
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(WAIT) == 1  # the usage error
        events = events_until(bob, lambda e: e.kind is EventKind.KICK)
        assert [e.kind for e in events] == [EventKind.TOPIC, EventKind.KICK]
        assert "den" not in bob.joined


def test_line_mode_shows_moderation_in_words(broker: RunningBroker, client_factory: Callable[..., Client]) -> None:
    bob = client_factory("bob")
    lines = ["/join -p den", "/invite bob", "/op bob", "/topic -delete", "/ban", "/quit"]
    proc = start_client(broker)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write("\n".join(lines[:2]) + "\n")
        proc.stdin.flush()
        events_until(bob, lambda e: e.kind is EventKind.INVITE)
        bob.join("den")
        proc.stdin.write("\n".join(lines[2:]) + "\n")
        proc.stdin.close()
        assert proc.wait(WAIT) == 1
        stdout, stderr = proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT)
    assert "-- joined #den (private, 1 here: @carol)" in stderr
    assert "#den * carol invited bob" in stdout
    assert "#den * carol made bob an operator" in stdout
    assert "#den * carol cleared the topic" in stdout
    assert "usage: /ban NICK [REASON]" in stderr


def test_command_parsing_and_wording() -> None:
    assert parse_join("den") == ("den", False)
    assert parse_join("-p #den") == ("#den", True)
    assert parse_join("#den --private") == ("#den", True)
    assert [parse_join(arg) for arg in ("", "-p", "a b", "-p a b")] == [None] * 4
    assert parse_moderation("kick", "bob  being rude ") == ("bob", "being rude")
    assert parse_moderation("invite", "bob #den") == ("bob", "#den")
    assert parse_moderation("op", "bob") == ("bob", "")
    bad = [("kick", ""), ("op", "bob carol"), ("unban", "bob now"), ("invite", "bob a b")]
    assert [parse_moderation(name, arg) for name, arg in bad] == [None] * 4
    assert describe_joined(Joined(1, "den", "q/x/", ("bob", "carol"), 3, True, "plans", ("carol",))) == (
        "joined #den (private, 2 here: bob, @carol); topic: plans"
    )
    assert format_members("den", ["bob", "Carol"], ["carol"]) == "-- #den: 2 here: bob, @Carol"
    assert format_members("den", ["bob", "Carol"], ["carol"], {"CAROL": "lunch"}) == (
        "-- #den: 2 here: bob, @Carol (away: lunch)"
    )
    assert describe_joined(Joined(1, "g", "r/g/", ("bob", "carol"), 0, False, "", (), {"bob": "zzz"})) == (
        "joined #g (2 here: bob (away: zzz), carol)"
    )
    rooms = [RoomInfo("den", 2, True), RoomInfo("general", 5)]
    assert format_rooms(rooms) == "-- rooms: #den (2, private), #general (5)"

    def said(kind: EventKind, text: str = "", nick: str | None = "bob", me: str = "carol") -> str:
        event = Event(kind, "den", "alice", text, 0.0, 1, nick=nick)
        return format_event(event, me).split(" ", 1)[1]

    assert said(EventKind.KICK, "spam") == "#den * alice kicked bob (spam)"
    assert said(EventKind.BAN) == "#den * alice banned bob"
    assert said(EventKind.UNBAN) == "#den * alice unbanned bob"
    assert said(EventKind.INVITE) == "#den * alice invited bob"
    assert said(EventKind.INVITE, me="bob") == "#den * alice invites you to #den (/join den)"
    assert said(EventKind.OP) == "#den * alice made bob an operator"
    assert said(EventKind.DEOP) == "#den * alice took operator status from bob"
    assert said(EventKind.TOPIC, "plans", None) == "#den * alice set the topic: plans"
    assert said(EventKind.TOPIC, "", None) == "#den * alice cleared the topic"


# -- start-up failures -------------------------------------------------------------------------


def test_missing_nick_in_line_mode_exits_2(closed_port: int) -> None:
    endpoint = f"tcp://127.0.0.1:{closed_port}"
    done = run([*CLIENT, "--router", endpoint, "--pub", endpoint], stdin="hello\n")
    assert done.returncode == 2
    assert "--nick" in done.stderr and "ZCHAT_NICK" in done.stderr
    assert done.stdout == ""

    done = run([*CLIENT, "--router", endpoint, "--pub", endpoint, "--json"], stdin="hello\n")
    assert done.returncode == 2
    error = json.loads(done.stdout)
    assert error["kind"] == "error" and "--nick" in error["reason"]


def test_unreachable_broker_exits_1_quickly(closed_port: int) -> None:
    endpoint = f"tcp://127.0.0.1:{closed_port}"
    started = time.monotonic()
    done = run([*CLIENT, "--router", endpoint, "--pub", endpoint, "--nick", "carol", "--timeout", "0.5"], stdin="hi\n")
    assert done.returncode == 1
    assert f"no answer from the broker at {endpoint} within 0.5 s" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 5.0


@pytest.mark.parametrize(
    ("program", "args", "env", "named", "value"),
    [
        ("client", ["--router", "not-an-endpoint"], {}, "--router", "not-an-endpoint"),
        ("client", ["--pub", "http://127.0.0.1:1"], {}, "--pub", "http://127.0.0.1:1"),
        ("client", ["--timeout=0"], {}, "--timeout", "0"),
        ("client", [], {"ZCHAT_ROUTER": "nowhere"}, "ZCHAT_ROUTER", "nowhere"),
        ("client", [], {"ZCHAT_TIMEOUT": "soon"}, "ZCHAT_TIMEOUT", "soon"),
        ("broker", ["--router", "not-an-endpoint"], {}, "--router", "not-an-endpoint"),
        ("broker", ["--session-timeout=0"], {}, "--session-timeout", "0"),
        ("broker", ["--max-frame", "big"], {}, "--max-frame", "big"),
        ("broker", [], {"ZCHAT_PUB": "udp://x"}, "ZCHAT_PUB", "udp://x"),
        ("broker", [], {"ZCHAT_LOG_LEVEL": "loud"}, "ZCHAT_LOG_LEVEL", "loud"),
    ],
)
def test_bad_configuration_exits_2_naming_the_option(
    program: str, args: list[str], env: dict[str, str], named: str, value: str
) -> None:
    cmd = [*(CLIENT if program == "client" else BROKER), *args]
    done = run(cmd, stdin="hello\n", env=clean_env(**env))
    assert done.returncode == 2
    assert f"invalid value for {named}: {value!r}" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("cmd", "expected"), [(CLIENT, f"zchat-client {client_version}"), (BROKER, f"zchat-broker {broker_version}")]
)
def test_version(cmd: list[str], expected: str) -> None:
    done = run([*cmd, "--version"])
    assert done.returncode == 0
    assert done.stdout.strip() == expected


# -- the broker process ------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_broker_exits_0_on_signal_with_clients_connected(
    broker_process: Callable[..., BrokerProcess], sig: signal.Signals
) -> None:
    bp = broker_process("--log-level", "warning")
    with Client(bp.router, bp.pub, timeout=1.0) as alice, Client(bp.router, bp.pub, timeout=1.0) as bob:
        alice.connect("alice")
        alice.join("general")
        bob.connect("bob")
        bob.join("general")
        sent = bob.say("general", "hi")
        said = events_until(alice, lambda e: e.kind is EventKind.MESSAGE)[-1]
        assert said.id == sent.id

        started = time.monotonic()
        bp.proc.send_signal(sig)
        assert bp.proc.wait(timeout=2.0) == 0
        assert time.monotonic() - started < 2.0
