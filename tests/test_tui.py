"""The full-screen client (:mod:`zchat.client.tui`), driven headless by Textual's pilot.

Each test runs the app in ``App.run_test()`` against a real broker on loopback; the other
side is a blocking :class:`~zchat.client.Client` (its calls go through ``asyncio.to_thread``
so the app's loop keeps running). Waits poll the app's state until a deadline. The last test
runs the real program in tmux and reads the screen.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from textual.pilot import Pilot

from zchat.client import Client, EventKind
from zchat.client.tui import ChatApp, Settings
from zchat.client.tui_state import (
    STATUS,
    Completer,
    Conversations,
    InputHistory,
    dm_key,
    highlights,
    mentions,
    nick_colour,
)
from zchat.client.tui_widgets import ChatInput, MemberList, NickScreen, Sidebar, render_line
from zchat.common.protocol import Event

if TYPE_CHECKING:
    from tests.conftest import BrokerProcess, RunningBroker
    from tests.support import Keys

#: Seconds any single wait may take before the test fails.
WAIT = 8.0
SIZE = (120, 30)

MakeClient = Callable[..., Client]
Scenario = Callable[[ChatApp, Pilot[None]], Coroutine[Any, Any, None]]


def run_app(settings: Settings, scenario: Scenario) -> ChatApp:
    """Run ``scenario`` against a headless app, with a deadline on the whole of it."""
    app = ChatApp(settings)

    async def main() -> None:
        try:
            async with app.run_test(size=SIZE) as pilot:
                await asyncio.wait_for(scenario(app, pilot), WAIT + 2)
        finally:
            await app.client.close()

    asyncio.run(main())
    return app


def settings_for(rb: RunningBroker | BrokerProcess, nick: str | None = "alice", **kwargs: Any) -> Settings:
    return Settings(rb.router, rb.pub, nick=nick, **kwargs)


async def until(pilot: Pilot[None], predicate: Callable[[], object], timeout: float = WAIT) -> None:
    """Let the app run until ``predicate`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await pilot.pause(0.02)


def pane_text(app: ChatApp) -> str:
    """What the current pane shows (every line of its scrollback, as drawn)."""
    return "\n".join(strip.text for strip in app.pane(app.current).lines)


def status_text(app: ChatApp) -> str:
    return str(app.query_one("#status").render())


def sidebar_labels(app: ChatApp) -> list[str]:
    sidebar = app.query_one(Sidebar)
    return [str(sidebar.get_option_at_index(i).prompt) for i in range(sidebar.option_count)]


async def type_line(pilot: Pilot[None], text: str) -> None:
    await pilot.press(*text, "enter")


async def ready(app: ChatApp, pilot: Pilot[None], room: str = "general") -> None:
    """Until the app is connected and shows ``room``."""
    await until(pilot, lambda: app.current_key == f"#{room}")


async def receive(client: Client, last: Callable[[Event], bool]) -> Event:
    """The first event of ``client`` for which ``last`` is true."""

    def wait() -> Event:
        deadline = time.monotonic() + WAIT
        while True:
            event = client.recv_event(max(0.001, deadline - time.monotonic()))
            if last(event):
                return event

    return await asyncio.to_thread(wait)


# -- talking -------------------------------------------------------------------------------------


def test_typing_a_message_sends_it(broker: RunningBroker, client_factory: MakeClient) -> None:
    bob = client_factory("bob", "general")

    async def scenario(app: ChatApp, pilot: Pilot[None]) -> None:
        await ready(app, pilot)
        await type_line(pilot, "hello bob")
        event = await receive(bob, lambda e: e.kind is EventKind.MESSAGE)
        assert (event.sender, event.text) == ("alice", "hello bob")
        await until(pilot, lambda: "<alice> hello bob" in pane_text(app))
        assert app.query_one(ChatInput).value == ""

    run_app(settings_for(broker), scenario)


def test_messages_of_others_appear_with_their_nick(broker: RunningBroker, client_factory: MakeClient) -> None:
    bob = client_factory("bob", "general")

    async def scenario(app: ChatApp, pilot: Pilot[None]) -> None:
        await ready(app, pilot)
        await until(pilot, lambda: "bob" in app.current.members.values())
        await asyncio.to_thread(bob.say, "general", "morning alice")
        await asyncio.to_thread(bob.say, "general", "waves", action=True)
        await until(pilot, lambda: "* bob waves" in pane_text(app))
        assert "<bob> morning alice" in pane_text(app)
        assert "connected" in status_text(app) and "#general" in status_text(app)

    run_app(settings_for(broker), scenario)


def test_history_on_join_comes_before_live_messages(broker: RunningBroker, client_factory: MakeClient) -> None:
    bob = client_factory("bob", "general")
    for n in range(3):
        bob.say("general", f"earlier {n}")

    async def scenario(app: ChatApp, pilot: Pilot[None]) -> None:
        await ready(app, pilot)
        await until(pilot, lambda: "earlier 2" in pane_text(app))
        await asyncio.to_thread(bob.say, "general", "live now")
        await until(pilot, lambda: "live now" in pane_text(app))
        text = pane_text(app)
        positions = [text.index(s) for s in ("you joined #general", "earlier 0", "earlier 1", "earlier 2", "live now")]
        assert positions == sorted(positions)

    run_app(settings_for(broker), scenario)


# -- panes ---------------------------------------------------------------------------------------


def test_switching_rooms_shows_that_room_and_clears_its_unread_count(
    broker: RunningBroker, client_factory: MakeClient
) -> None:
    bob = client_factory("bob", "general", "random")

    async def scenario(app: ChatApp, pilot: Pilot[None]) -> None:
        await ready(app, pilot)
        await type_line(pilot, "/join random")
        await ready(app, pilot, "random")
        await asyncio.to_thread(bob.say, "general", "over in general")
        await until(pilot, lambda: "#general (1)" in sidebar_labels(app)[1])
        assert "over in general" not in pane_text(app)

        await pilot.press("ctrl+p")  # back to #general
        assert app.current_key == "#general"
        await until(pilot, lambda: "<bob> over in general" in pane_text(app))
        assert sidebar_labels(app)[1] == "2 #general"

        await pilot.press("alt+3")
        assert app.current_key == "#random"
        await pilot.press("ctrl+n")  # wraps round to the status pane
        assert app.current_key == STATUS
        await asyncio.to_thread(bob.say, "random", "and in random")
        await until(pilot, lambda: sidebar_labels(app)[2] == "3 #random (1)")
        await pilot.click(Sidebar, offset=(3, 3))  # the border, then the third line
        assert app.current_key == "#random"
        await until(pilot, lambda: "<bob> and in random" in pane_text(app))
        assert sidebar_labels(app)[2] == "3 #random"
        assert isinstance(app.focused, ChatInput)

    run_app(settings_for(broker), scenario)


def test_dm_panes_open_by_msg_and_by_an_incoming_dm(broker: RunningBroker, client_factory: MakeClient) -> None:
    bob = client_factory("bob")
    carol = client_factory("carol")

    async def scenario(app: ChatApp, pilot: Pilot[None]) -> None:
        await ready(app, pilot)
        await type_line(pilot, "/msg bob psst")
        event = await receive(bob, lambda e: e.kind is EventKind.DM)
        assert (event.sender, event.text) == ("alice", "psst")
        assert app.current_key == "@bob"
        await until(pilot, lambda: "<alice> psst" in pane_text(app))
        await type_line(pilot, "lunch?")  # plain text in a DM pane goes to the peer
        event = await receive(bob, lambda e: e.kind is EventKind.DM)
        assert event.text == "lunch?"

        await asyncio.to_thread(carol.dm, "alice", "hi from carol")
        await until(pilot, lambda: "carol (1)" in sidebar_labels(app)[-1])
        assert app.current_key == "@bob"
        await pilot.press(f"alt+{len(sidebar_labels(app))}")
        assert app.current_key == dm_key("carol")  # panes are keyed by nick_key (skeleton: "caroi")
        await until(pilot, lambda: "<carol> hi from carol" in pane_text(app))

    run_app(settings_for(broker), scenario)


def test_dms_sent_while_away_open_their_panes_and_an_offline_peer_is_noted(
    keys: Keys, secure: RunningBroker, curve_clients: MakeClient
) -> None:
    keys.make("alice")
    keys.make("bob")
    earlier = curve_clients("alice")
    earlier.connect("alice")  # the nick is alice's key's from now on
    earlier.close()
    bob = curve_clients("bob")
    bob.connect("bob")
    assert bob.dm("alice", "are you around?").offline

    async def scenario(app: ChatApp, pilot: Pilot[None]) -> None:
        await ready(app, pilot)
        await until(pilot, lambda: "bob (1)" in " ".join(sidebar_labels(app)))  # delivered at connect
        await type_line(pilot, "/msg bob")
        await until(pilot, lambda: "<bob> are you around?" in pane_text(app))
        await asyncio.to_thread(bob.close)
        await type_line(pilot, "back now")
        await until(pilot, lambda: "bob is offline: the message waits in their inbox" in pane_text(app))
        assert app.current_key == dm_key("bob")

    settings = settings_for(secure, server_key=str(keys.public("server")), key=str(keys.secret("alice")))
    run_app(settings, scenario)


def test_away_members_are_marked_and_away_is_a_command(broker: RunningBroker, client_factory: MakeClient) -> None:
    bob = client_factory("bob", "general")

    async def scenario(app: ChatApp, pilot: Pilot[None]) -> None:
        await ready(app, pilot)
        await asyncio.to_thread(bob.away, "lunch")
        await until(pilot, lambda: member_labels(app) == ["alice", "bob (away: lunch)"])
        await until(pilot, lambda: "bob is away: lunch" in pane_text(app))
        await type_line(pilot, "/away brb")
        await until(pilot, lambda: member_labels(app) == ["alice (away: brb)", "bob (away: lunch)"])
        await until(pilot, lambda: "you are away: brb" in pane_text(app))  # the reply: another socket
        assert "away: brb" in status_text(app)
        await type_line(pilot, "/msg bob are you back?")
        assert app.current_key == dm_key("bob")
        await until(pilot, lambda: "bob is away: lunch" in pane_text(app))  # said in the DM pane
        await asyncio.to_thread(bob.away)
        await type_line(pilot, "/back")
        await until(pilot, lambda: "away" not in status_text(app))
        await pilot.press("alt+2")  # #general
        await until(pilot, lambda: member_labels(app) == ["alice", "bob"])
        assert "bob is back" in pane_text(app)

    run_app(settings_for(broker), scenario)


# -- errors and status ---------------------------------------------------------------------------


def test_broker_errors_are_shown_inline_in_plain_words(broker: RunningBroker, client_factory: MakeClient) -> None:
    client_factory("bob")

    async def scenario(app: ChatApp, pilot: Pilot[None]) -> None:
        await ready(app, pilot)
        await type_line(pilot, "/nick bob")
        await until(pilot, lambda: "!! " in pane_text(app))
        assert "taken" in pane_text(app) and "Traceback" not in pane_text(app)
        await type_line(pilot, "/join -bad-")
        await until(pilot, lambda: "room name must start" in pane_text(app))
        assert app.current_key == "#general" and "#-bad-" not in " ".join(sidebar_labels(app))
        await type_line(pilot, "/topic")
        await until(pilot, lambda: "#general has no topic" in pane_text(app))
        await type_line(pilot, "/frobnicate")
        await until(pilot, lambda: "unknown command /frobnicate" in pane_text(app))

    run_app(settings_for(broker), scenario)


def test_the_status_line_shows_reconnecting_then_connected(
    broker_process: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    options = ("--data-dir", str(tmp_path))
    first = broker_process(*options)

    async def scenario(app: ChatApp, pilot: Pilot[None]) -> None:
        await ready(app, pilot)
        first.proc.terminate()  # SIGTERM: the broker says goaway, the client starts over
        await until(pilot, lambda: "reconnecting…" in status_text(app))
        await asyncio.to_thread(first.proc.wait, WAIT)
        broker_process("--router", first.router, "--pub", first.pub, *options)
        await until(pilot, lambda: "│ connected" in status_text(app))
        assert "reconnected" in pane_text(app)

    run_app(settings_for(first, timeout=1.0), scenario)


def test_who_and_leave(broker: RunningBroker, client_factory: MakeClient) -> None:
    client_factory("bob", "general", "random")

    async def scenario(app: ChatApp, pilot: Pilot[None]) -> None:
        await ready(app, pilot)
        app.convs.room("general").members.clear()  # /who fetches them again
        await type_line(pilot, "/who")
        await until(pilot, lambda: "#general: 2 here: alice, bob" in pane_text(app))
        assert set(app.current.members.values()) == {"alice", "bob"}
        await type_line(pilot, "/join random")
        await ready(app, pilot, "random")
        await type_line(pilot, "/leave")
        await until(pilot, lambda: app.current_key == "#general")
        await until(pilot, lambda: "you left #random" in pane_text(app))
        assert [label.split()[1] for label in sidebar_labels(app)] == ["zchat", "#general"]

    run_app(settings_for(broker), scenario)


def member_labels(app: ChatApp) -> list[str]:
    members = app.query_one(MemberList)
    return [str(members.get_option_at_index(i).prompt) for i in range(members.option_count)]


def test_a_private_room_and_its_moderation(broker: RunningBroker, client_factory: MakeClient) -> None:
    bob = client_factory("bob")

    async def scenario(app: ChatApp, pilot: Pilot[None]) -> None:
        await ready(app, pilot)
        await type_line(pilot, "/create den")
        await ready(app, pilot, "den")
        assert any(label.endswith("#den (private)") for label in sidebar_labels(app))
        assert member_labels(app) == ["@alice"]
        await type_line(pilot, "/invite bob")
        await receive(bob, lambda e: e.kind is EventKind.INVITE)
        await asyncio.to_thread(bob.join, "den")
        await until(pilot, lambda: "bob" in app.current.members.values())
        await type_line(pilot, "/op bob")
        await until(pilot, lambda: member_labels(app) == ["@alice", "@bob"])
        await type_line(pilot, "/topic plans for friday")
        await until(pilot, lambda: "topic: plans for friday" in status_text(app))
        assert "alice set the topic: plans for friday" in pane_text(app)
        assert app.query_one("#panes").border_title == "#den (private) — plans for friday"
        await type_line(pilot, "/kick bob spam")
        await until(pilot, lambda: "alice kicked bob (spam)" in pane_text(app))
        assert member_labels(app) == ["@alice"]
        await type_line(pilot, "/unban")
        await until(pilot, lambda: "usage: /unban NICK" in pane_text(app))

    run_app(settings_for(broker), scenario)


def test_moderation_events_keep_the_panes_state() -> None:
    convs = Conversations()
    den = convs.room("den")
    den.set_members(["alice", "bob", "carol"], ["alice"])

    def event(kind: EventKind, nick: str | None = None, text: str = "", room: str = "den", sender: str = "al") -> Event:
        return Event(kind, room, sender, text, 0.0, 1, nick=nick)

    def ops() -> list[str]:
        return sorted(nick for nick in ("alice", "bob", "carol", "robert") if den.is_op(nick))

    assert convs.route(event(EventKind.OP, "BOB"), "carol") is den
    assert ops() == ["alice", "bob"]
    convs.route(event(EventKind.NICK, "robert", sender="bob"), "carol")
    assert ops() == ["alice", "robert"]
    convs.route(event(EventKind.DEOP, "robert"), "carol")
    convs.route(event(EventKind.TOPIC, text="plans"), "carol")
    assert (ops(), den.subject) == (["alice"], "plans")
    convs.route(event(EventKind.AWAY, text="lunch", sender="robert"), "carol")
    convs.route(event(EventKind.AWAY, text="tea", sender="alice"), "carol")
    assert (den.away_why("ROBERT"), den.away_why("alice")) == ("lunch", "tea")
    convs.route(event(EventKind.KICK, "robert", "spam"), "carol")
    assert sorted(den.members.values()) == ["alice", "carol"]
    assert (den.away_why("robert"), den.away_why("alice")) == ("", "tea")  # robert's went with him
    convs.route(event(EventKind.JOIN, sender="robert"), "carol")
    assert den.away_why("robert") == ""  # back in: away again only if an away event says so
    assert convs.route(event(EventKind.INVITE, "carol", room="attic"), "carol") is convs.by_key[STATUS]
    assert "#attic" not in convs.by_key
    convs.route(event(EventKind.BAN, "carol"), "carol")  # us: the pane keeps its lines, not its lists
    assert (den.members, den.ops, den.away) == ({}, set(), {})


def test_an_unreachable_broker_ends_the_app_with_status_1() -> None:
    with socket.socket() as sock:  # bound, never listening: nothing answers there
        sock.bind(("127.0.0.1", 0))
        router = f"tcp://127.0.0.1:{sock.getsockname()[1]}"

        async def scenario(app: ChatApp, pilot: Pilot[None]) -> None:
            await until(pilot, lambda: app.exit_message is not None)

        app = run_app(Settings(router, "tcp://127.0.0.1:1", nick="alice", timeout=0.3), scenario)
    assert app.return_code == 1
    assert app.exit_message == f"no answer from the broker at {router} within 0.3 s"


def test_without_a_nick_it_asks_and_asks_again_when_taken(broker: RunningBroker, client_factory: MakeClient) -> None:
    client_factory("bob")

    async def scenario(app: ChatApp, pilot: Pilot[None]) -> None:
        await until(pilot, lambda: isinstance(app.screen, NickScreen))
        await type_line(pilot, "bob")
        await until(pilot, lambda: "taken" in str(app.screen.query_one("#nick-error").render()))
        assert isinstance(app.screen, NickScreen)
        await type_line(pilot, "alice")
        await ready(app, pilot)
        assert not isinstance(app.screen, NickScreen)
        assert "alice" in status_text(app)

    run_app(settings_for(broker, nick=None), scenario)


# -- the input line ------------------------------------------------------------------------------


def test_up_and_down_recall_typed_lines_and_tab_completes(broker: RunningBroker, client_factory: MakeClient) -> None:
    client_factory("bob", "general")
    client_factory("bella", "general")
    client_factory("zed", "elsewhere")

    async def scenario(app: ChatApp, pilot: Pilot[None]) -> None:
        field = app.query_one(ChatInput)
        await ready(app, pilot)
        await until(pilot, lambda: {"bob", "bella"} <= set(app.current.members.values()))
        await type_line(pilot, "first")
        await type_line(pilot, "second")
        await pilot.press(*"draft")
        await pilot.press("up")
        assert field.value == "second"
        await pilot.press("up", "up")
        assert field.value == "first"
        await pilot.press("down", "down")
        assert field.value == "draft"

        field.value = ""
        await pilot.press("b", "e", "tab")
        assert field.value == "bella: "
        await pilot.press(*"hi b", "tab")
        assert field.value == "bella: hi bella "
        await pilot.press("tab")  # again: the next match
        assert field.value == "bella: hi bob "
        await pilot.press("ctrl+u", *"/jo", "tab")
        assert field.value == "/join "
        await pilot.press("ctrl+u", *"z", "tab")  # zed is not in this room
        assert field.value == "z"

    run_app(settings_for(broker), scenario)


def test_mentions_and_highlights_units() -> None:
    assert mentions("hey Alice, alice2 and @alice.", "alice") == [(4, 9), (23, 28)]  # words only
    assert mentions("a.b?", "a.b") == [(0, 3)]  # the nick is text, not a pattern
    assert mentions("anything", None) == []

    def said(kind: EventKind, text: str, sender: str = "bob") -> Event:
        return Event(kind, None if kind is EventKind.DM else "g", sender, text, 0.0, 1)

    assert highlights(said(EventKind.MESSAGE, "alice: ping"), "alice")
    assert highlights(said(EventKind.ACTION, "pokes ALICE"), "alice")
    assert highlights(said(EventKind.DM, "no nick in here"), "alice")  # a DM is always for you
    assert not highlights(said(EventKind.MESSAGE, "malice"), "alice")
    assert not highlights(said(EventKind.MESSAGE, "alice said", sender="Alice"), "alice")  # your own
    assert not highlights(said(EventKind.JOIN, "alice"), "alice")
    line = render_line(said(EventKind.MESSAGE, "hi alice!"), "alice")
    assert [(span.start, span.end, str(span.style)) for span in line.spans if "reverse" in str(span.style)] == [
        (len("00:00:00 <bob> hi "), len("00:00:00 <bob> hi alice"), "bold reverse")
    ]


def test_a_highlight_in_another_pane_turns_its_count_red_and_rings(
    broker: RunningBroker, client_factory: MakeClient
) -> None:
    bob = client_factory("bob", "random")
    rings: list[float] = []

    async def scenario(app: ChatApp, pilot: Pilot[None]) -> None:
        app.bell = lambda: rings.append(time.monotonic())  # type: ignore[method-assign]
        await ready(app, pilot)
        await type_line(pilot, "/join random")
        await pilot.press("alt+2")  # back to #general
        await asyncio.to_thread(bob.say, "random", "nothing for you")
        await until(pilot, lambda: app.convs.by_key["#random"].unread == 1)
        assert (app.convs.by_key["#random"].highlights, rings) == (0, [])
        await asyncio.to_thread(bob.say, "random", "Alice, look at this")
        await until(pilot, lambda: app.convs.by_key["#random"].highlights == 1)
        assert len(rings) == 1 and app.convs.by_key["#random"].unread == 2
        await pilot.press("alt+3")
        assert (app.convs.by_key["#random"].unread, app.convs.by_key["#random"].highlights) == (0, 0)

    run_app(settings_for(broker), scenario)


def test_input_history_and_completion_units() -> None:
    history = InputHistory()
    assert history.previous("typing") is None
    for line in ("a", "b", "b", "c"):
        history.push(line)
    assert [history.previous("typing"), history.previous(""), history.previous(""), history.previous("")] == [
        "c",
        "b",
        "a",
        None,
    ]
    assert [history.next(), history.next(), history.next(), history.next()] == ["b", "c", "typing", None]

    completer = Completer()
    assert completer.complete("/he", 3, []) == ("/help ", 6)
    assert completer.complete("hi Ann", 6, ["anna", "Annie", "bob"]) == ("hi anna ", 8)
    assert completer.complete("hi anna ", 8, ["anna", "Annie", "bob"]) == ("hi Annie ", 9)
    assert completer.complete("x", 1, ["anna"]) is None
    assert nick_colour("Ann") == nick_colour("ANN")


# -- scroll-back ---------------------------------------------------------------------------------


def test_page_up_at_the_top_fetches_older_history(broker: RunningBroker, client_factory: MakeClient) -> None:
    bob = client_factory("bob", "general")
    for n in range(120):
        bob.say("general", f"old {n:03}")

    async def scenario(app: ChatApp, pilot: Pilot[None]) -> None:
        await ready(app, pilot)
        pane = app.pane(app.current)
        await until(pilot, lambda: "old 119" in pane_text(app))
        assert "old 114" not in pane_text(app)  # only the last 5 came with the join
        await pilot.press("pageup")  # at the top already: fetches a page
        await until(pilot, lambda: "old 065" in pane_text(app))
        assert "old 064" not in pane_text(app)
        assert pane.scroll_y > 0  # what was in view stays in view, the older lines above it
        for _ in range(40):  # paging up to the top fetches more, until there is no more
            if "the start of #general's history" in pane_text(app):
                break
            await pilot.press("pageup")
            await pilot.pause(0.05)
        await until(pilot, lambda: "the start of #general's history" in pane_text(app))
        text = pane_text(app)
        positions = [text.index(f"old {n:03}") for n in range(120)]
        assert positions == sorted(positions)

    run_app(settings_for(broker, history=5), scenario)


def test_history_command_prepends_older_messages(broker: RunningBroker, client_factory: MakeClient) -> None:
    bob = client_factory("bob", "general")
    for n in range(10):
        bob.say("general", f"old {n}")

    async def scenario(app: ChatApp, pilot: Pilot[None]) -> None:
        await ready(app, pilot)
        await until(pilot, lambda: "old 9" in pane_text(app))
        assert "old 7" not in pane_text(app)
        await type_line(pilot, "/history 3")
        await until(pilot, lambda: "old 5" in pane_text(app))
        text = pane_text(app)
        assert "old 4" not in text
        assert text.index("old 5") < text.index("old 6") < text.index("old 7") < text.index("old 9")

    run_app(settings_for(broker, history=2), scenario)


# -- a real terminal -----------------------------------------------------------------------------


class Tmux:
    """A private tmux server (its own socket and no config) with one 120x30 session, "chat"."""

    def __init__(self, socket: Path) -> None:
        self.base = ["tmux", "-f", "/dev/null", "-S", str(socket)]

    def run(self, *args: str) -> str:
        done = subprocess.run([*self.base, *args], check=True, capture_output=True, text=True, timeout=WAIT)
        return done.stdout

    def start(self, command: list[str]) -> None:
        self.run("new-session", "-d", "-s", "chat", "-x", "120", "-y", "30", *command)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "chat")

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not seen within {WAIT} s; the screen:\n{self.screen()}")
            time.sleep(0.05)

    def wait_for_text(self, needle: str) -> str:
        self.wait_for(lambda: needle in self.screen(), repr(needle))
        return self.screen()

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "chat", *keys)

    def type(self, text: str) -> None:
        self.run("send-keys", "-t", "chat", "-l", text)
        self.run("send-keys", "-t", "chat", "Enter")


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    path = Path(tempfile.gettempdir()) / f"zchat-tmux-{uuid.uuid4().hex[:12]}"  # short: a socket path
    session = Tmux(path)
    yield session
    subprocess.run([*session.base, "kill-server"], check=False, capture_output=True, timeout=WAIT)
    path.unlink(missing_ok=True)


def test_the_real_program_in_a_terminal(broker: RunningBroker, client_factory: MakeClient, tmux: Tmux) -> None:
    bob = client_factory("bob", "general")
    env = [f"{k}={v}" for k, v in os.environ.items() if k in ("PATH", "HOME")]
    client = ["env", "-i", *env, "LANG=C.UTF-8", "TERM=tmux-256color", sys.executable, "-m", "zchat.client",
              "--room", "general", "--nick", "tmuxer", "--router", broker.router, "--pub", broker.pub]  # fmt: skip
    # After the client, the shell says how it ended and keeps the pane (and its screen) open.
    tmux.start(["sh", "-c", '"$@"; echo "exited with status $?"; exec cat', "sh", *client])
    tmux.wait_for_text("│ connected")
    tmux.type("hello from a terminal")
    deadline = time.monotonic() + WAIT
    while (event := bob.recv_event(max(0.001, deadline - time.monotonic()))).kind is not EventKind.MESSAGE:
        pass
    assert (event.sender, event.text) == ("tmuxer", "hello from a terminal")
    bob.say("general", "hi tmuxer")
    screen = tmux.wait_for_text("<bob> hi tmuxer")
    assert "<tmuxer> hello from a terminal" in screen and "#general" in screen and "bob" in screen
    tmux.keys("M-1")  # Alt+1: the status pane
    tmux.wait_for_text("│ zchat │")
    tmux.keys("M-2")
    tmux.wait_for_text("│ #general │")
    tmux.type("/quit")
    tmux.wait_for_text("exited with status 0")
