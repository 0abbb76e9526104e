"""The full-screen terminal client: ``zchat-client`` on a terminal.

::

    ┌ panes ──────┐┌──────────────────────────────────────────┐┌ 3 here ──┐
    │1 zchat      ││12:01:02 <bob> morning!                   ││alice     │
    │2 #general   ││12:01:09 * bob waves                      ││bob       │
    │3 bob (2)    ││                                          ││carol     │
    └─────────────┘└──────────────────────────────────────────┘└──────────┘
     alice │ #general │ connected
    > type a message or /help
     ^n next  ^p previous  ^q quit

The sidebar lists the status pane, joined rooms and DM conversations with unread counts
(red when some are for you: a DM, or your nick in a message, which also rings the bell);
the middle shows the current pane's scrollback; the right, its members. Events come from one
task reading :meth:`AsyncClient.events`; input lines run one at a time, in order, through
:class:`~zchat.client.tui_commands.Commands`.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from rich.text import Text
from textual import _ansi_sequences
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Container, Horizontal
from textual.widgets import Footer, Input, OptionList, Static

from zchat.common.codes import ErrorCode
from zchat.common.errors import ClientError, ProtocolError, RequestError, RequestTimeout
from zchat.common.keys import KeyPair
from zchat.common.protocol import Event

from .aio import AsyncClient, ClientState
from .cli import parse_line
from .tui_commands import DEFAULT_HISTORY, Commands
from .tui_state import STATUS, UNREAD_KINDS, Conversation, Conversations, Note, highlights
from .tui_widgets import ChatInput, ChatLog, MemberList, NickScreen, Sidebar, render_nick

_STATE_TEXT = {
    ClientState.DISCONNECTED: ("connecting…", "yellow"),
    ClientState.CONNECTED: ("connected", "green"),
    ClientState.RECONNECTING: ("reconnecting…", "bold yellow"),
    ClientState.CLOSED: ("closed", "red"),
}


@dataclass(frozen=True, slots=True)
class Settings:
    """What the TUI is started with (the ``zchat-client`` options)."""

    router: str
    pub: str
    nick: str | None = None
    room: str = "general"
    timeout: float = 5.0
    history: int = 50
    #: CURVE: the broker's public key and this client's key pair (or their files).
    server_key: str | None = None
    key: KeyPair | str | None = None

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> Settings:
        keys = ("router", "pub", "nick", "room", "timeout", "history")
        return cls(**{key: values[key] for key in keys}, server_key=values.get("server_key"), key=values.get("key"))


#: Seconds: a highlight (a DM, your nick) rings the terminal bell if it is this recent.
RING_WITHIN = 30.0


class ChatApp(App[None]):
    """The chat: panes, sidebar, member list, status line and input line over one AsyncClient."""

    TITLE = "zchat"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #main { height: 1fr; }
    #sidebar { width: 24; height: 100%; border: round $panel; border-title-color: $text-muted; }
    #panes { width: 1fr; border: round $panel; }
    #members { width: 20; height: 100%; border: round $panel; border-title-color: $text-muted; }
    ChatLog { height: 1fr; scrollbar-size-vertical: 1; }
    #status { height: 1; background: $boost; padding: 0 1; }
    #input { height: 1; margin: 0 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+n", "cycle(1)", "next pane"),
        Binding("ctrl+p", "cycle(-1)", "previous pane"),
        Binding("pageup", "page(-1)", "scroll back", priority=True),
        Binding("pagedown", "page(1)", "newer", show=False, priority=True),
        Binding("ctrl+q", "quit", "quit", priority=True),
        Binding("ctrl+c", "quit", "quit", show=False, priority=True),
        *(Binding(f"alt+{n}", f"goto({n})", show=False, priority=True) for n in range(1, 10)),
    ]

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.client = AsyncClient(
            settings.router,
            settings.pub,
            timeout=settings.timeout,
            history=settings.history,
            send_timeout=settings.timeout * 6,  # a line waits through reconnects, not for ever
            on_state=self._on_state,
            server_key=settings.server_key,
            key=settings.key,
        )
        self.convs = Conversations()
        self.commands = Commands(self)
        self.current_key = STATUS
        self.exit_message: str | None = None
        self._logs: dict[str, ChatLog] = {}
        self._pane_ids = itertools.count()
        self._lines: asyncio.Queue[str] = asyncio.Queue()
        self._was_connected = False

    # -- layout --------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            yield Sidebar(id="sidebar")
            yield Container(id="panes")
            yield MemberList(id="members")
        yield Static(id="status")
        yield ChatInput(self._completion_nicks, id="input")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#sidebar").border_title = "panes"
        self.note(f"connecting to {self.settings.router} …")
        self.show(STATUS)
        self.query_one(ChatInput).focus()
        if self.settings.nick:
            self._connect(self.settings.nick)
        else:
            self.push_screen(NickScreen())

    async def on_unmount(self) -> None:
        await self.client.close()

    @property
    def current(self) -> Conversation:
        return self.convs.by_key[self.current_key]

    def refresh_panels(self) -> None:
        """Redraw the sidebar, the member list and the status line from the state."""
        if not self.is_running:
            return
        self.query_one(Sidebar).show(self.convs.ordered(), self.current_key)
        self.query_one(MemberList).show(self.current)
        text, colour = _STATE_TEXT[self.client.state]
        nick = self.client.current_nick or self.settings.nick or "?"
        conv = self.current
        status = Text.assemble(render_nick(nick), " │ ", conv.title, " │ ", (text, colour), " │ /help")
        if self.client.away_text:
            status.append(" │ away: " + self.client.away_text, style="dim")
        if conv.subject:
            status.append(" │ topic: " + conv.subject)
        self.query_one("#status", Static).update(status)
        header = conv.title + (" (private)" if conv.private else "") + (f" — {conv.subject}" if conv.subject else "")
        self.query_one("#panes").border_title = header if conv.room else ""

    # -- panes ---------------------------------------------------------------------------------

    def pane(self, conv: Conversation) -> ChatLog:
        log = self._logs.get(conv.key)
        if log is None:
            log = self._logs[conv.key] = ChatLog(conv, id=f"pane-{next(self._pane_ids)}", me=self._me)
            log.display = conv.key == self.current_key
            self.query_one("#panes").mount(log)
        return log

    def note(self, text: str, *, error: bool = False, conv: Conversation | None = None) -> None:
        """Add a line of the client's own to ``conv`` (default: the current pane)."""
        conv = conv or self.current
        line = Note(text, error)
        conv.lines.append(line)
        self.pane(conv).add(line)

    def show(self, key: str) -> None:
        """Make ``key``'s pane the current one; its unread count is cleared."""
        conv = self.convs.by_key[key]
        self.current_key, conv.unread, conv.highlights = key, 0, 0
        self.pane(conv)
        for log in self._logs.values():
            log.display = log.conv is conv
        self.pane(conv).catch_up()
        self.refresh_panels()

    def drop(self, key: str) -> None:
        """Close a pane (a room left); show the one before it if it was current."""
        order = [conv.key for conv in self.convs.ordered()]
        self.convs.close(key)
        log = self._logs.pop(key, None)
        if log is not None:
            log.remove()
        if key == self.current_key:
            self.show(order[max(0, order.index(key) - 1)])
        else:
            self.refresh_panels()

    def redraw(self, conv: Conversation) -> None:
        self.pane(conv).rebuild()

    def quit(self) -> None:
        self.exit()

    def _me(self) -> str | None:
        return self.client.current_nick

    def _completion_nicks(self) -> list[str]:
        conv = self.current
        return [*conv.members.values(), *([conv.peer] if conv.peer else [])]

    # -- connecting ----------------------------------------------------------------------------

    def on_nick_screen_chosen(self, message: NickScreen.Chosen) -> None:
        self._connect(message.nick)

    def _connect(self, nick: str) -> None:
        self.run_worker(self._open(nick), group="connect", exclusive=True)

    async def _open(self, nick: str) -> None:
        try:
            welcome = await self.client.connect(nick)
        except (RequestError, ProtocolError) as exc:
            if exc.code in (ErrorCode.NICK_TAKEN, ErrorCode.INVALID_NICK):
                return self._ask_nick(exc.reason)
            return self._fatal(exc.reason)
        except RequestTimeout:
            where = self.settings.router
            return self._fatal(f"no answer from the broker at {where} within {self.settings.timeout:g} s")
        except ClientError as exc:
            return self._fatal(str(exc))
        if isinstance(self.screen, NickScreen):
            self.screen.dismiss()
        self._was_connected = True
        self.note(f"connected as {welcome.nick}. {welcome.motd}".rstrip(), conv=self.convs.by_key[STATUS])
        self.refresh_panels()
        self.run_worker(self._pump(), group="events")
        self.run_worker(self._run_lines(), group="lines")

    def _ask_nick(self, reason: str) -> None:
        if isinstance(self.screen, NickScreen):
            self.screen.show_error(reason)
        else:
            self.push_screen(NickScreen(reason))

    def _fatal(self, text: str) -> None:
        self.exit_message = text
        self.exit(return_code=1)

    def _on_state(self, state: ClientState) -> None:
        if not self.is_running:
            return  # closing
        if state is ClientState.RECONNECTING:
            self.note("connection lost; reconnecting…", error=True)
        elif state is ClientState.CONNECTED and self._was_connected:
            self.note("reconnected")
        self.refresh_panels()

    # -- events and input ----------------------------------------------------------------------

    async def _pump(self) -> None:
        async for event in self.client.events():
            self.on_chat_event(event)

    def on_chat_event(self, event: Event) -> None:
        conv = self.convs.route(event, self.client.current_nick)
        if conv is None:
            return
        conv.lines.append(event)
        self.pane(conv).add(event)
        if event.kind in UNREAD_KINDS and conv.key != self.current_key:
            conv.unread += 1
            if highlights(event, self.client.current_nick):
                conv.highlights += 1
                if time.time() - event.ts < RING_WITHIN:  # not for old history (join, connect)
                    self.bell()
        self.refresh_panels()

    async def _run_lines(self) -> None:
        await self.commands.run(f"/join {self.settings.room}")
        while True:
            await self.commands.run(await self._lines.get())

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if not isinstance(event.input, ChatInput):
            return
        line, event.input.value = event.value, ""
        event.input.history.push(line)
        command = parse_line(line)
        if command is not None and command.name == "quit":
            self.quit()  # at once, even while an earlier line waits for the broker
        elif command is not None:
            self._lines.put_nowait(line)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        if isinstance(event.option_list, Sidebar) and event.option.id in self.convs.by_key:
            self.show(event.option.id)
            self.query_one(ChatInput).focus()

    def on_chat_log_older(self, message: ChatLog.Older) -> None:
        if self._was_connected and message.pane.conv.key in self.convs.by_key:
            self.run_worker(self.commands.fetch_older(message.pane.conv, DEFAULT_HISTORY), group="history")

    # -- key bindings --------------------------------------------------------------------------

    def action_cycle(self, step: int) -> None:
        order = [conv.key for conv in self.convs.ordered()]
        self.show(order[(order.index(self.current_key) + step) % len(order)])

    def action_goto(self, number: int) -> None:
        order = [conv.key for conv in self.convs.ordered()]
        if number <= len(order):
            self.show(order[number - 1])

    def action_page(self, step: int) -> None:
        log = self.pane(self.current)
        if step < 0:
            log.page_up()
        else:
            log.scroll_page_down(animate=False)


def let_alt_digits_through() -> None:
    """Make Alt+1..9 reach the app as ``alt+N`` keys.

    Terminals send ESC then the digit for Alt+digit; Textual reads that pair as the character
    macOS types for Option+digit (``¡™£¢∞§¶•ª``, for WezTerm's sake), so Alt+2 would type a
    ``™`` instead of switching panes. Without the entry its parser reports ``alt+2``.
    """
    table = cast("dict[str, object]", _ansi_sequences.ANSI_SEQUENCES_KEYS)
    for digit in "123456789":
        table.pop("\x1b" + digit, None)


async def run_tui(values: dict[str, Any]) -> int:
    """Run the full-screen client until /quit; the exit status (1 if it could not connect)."""
    let_alt_digits_through()
    app = ChatApp(Settings.from_values(values))
    try:
        await app.run_async()
    finally:
        await app.client.close()
    if app.exit_message:
        print(f"zchat-client: {app.exit_message}", file=sys.stderr)
    return app.return_code or 0
