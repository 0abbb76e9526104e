"""The widgets of the terminal UI: the message pane, the input line, the sidebar and the nick prompt.

They know how to draw and what keys do; what happens next is the app's business, told by
messages (:class:`ChatLog.Older`, :class:`NickScreen.Chosen`) or asked of the app's state
(the nicks to complete).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList, RichLog
from textual.widgets.option_list import Option

from zchat.common.codes import EventKind
from zchat.common.protocol import Event

from .render import MODERATION_EVENTS, describe_moderation
from .tui_state import Completer, Conversation, InputHistory, Line, Note, mentions, nick_colour


def _clock(ts: float) -> Text:
    return Text(time.strftime("%H:%M:%S ", time.localtime(ts)), style="dim")


def render_nick(nick: str) -> Text:
    """``nick`` in its colour."""
    return Text(nick, style=f"bold {nick_colour(nick)}")


def render_line(line: Line, me: str | None = None) -> Text:
    """One line of a pane: the time, then the event or the note (user text is never markup).

    ``me`` (this session's nick) words an invitation of this session as one.
    """
    if isinstance(line, Note):
        style = "bold red" if line.error else "italic dim"
        return Text.assemble(_clock(line.ts), Text(("!! " if line.error else "-- ") + line.text, style=style))
    return Text.assemble(_clock(line.ts), _render_event(line, me))


def _render_event(event: Event, me: str | None = None) -> Text:
    kind, who = event.kind, render_nick(event.sender)
    if kind in (EventKind.MESSAGE, EventKind.DM, EventKind.ACTION):
        text = Text(event.text)
        if kind is not EventKind.DM and me is not None and event.sender != me:
            for start, end in mentions(event.text, me):  # your nick, as IRC clients show it
                text.stylize("bold reverse", start, end)
        return Text.assemble("* ", who, " ", text) if kind is EventKind.ACTION else Text.assemble("<", who, "> ", text)
    if kind is EventKind.JOIN:
        return Text.assemble(Text("--> ", style="green"), who, Text(f" joined #{event.room}", style="dim"))
    if kind is EventKind.LEAVE:
        why = f" ({event.text})" if event.text else ""
        return Text.assemble(Text("<-- ", style="red"), who, Text(f" left #{event.room}{why}", style="dim"))
    if kind is EventKind.NICK:
        return Text.assemble(
            Text("-- ", style="dim"), who, Text(" is now known as ", style="dim"), render_nick(event.nick or "")
        )
    if kind in MODERATION_EVENTS:
        return Text.assemble(Text("* ", style="bold magenta"), Text(describe_moderation(event, me), style="magenta"))
    if kind is EventKind.AWAY:
        said = f" is away: {event.text}" if event.text else " is back"
        return Text.assemble(Text("-- ", style="dim"), who, Text(said, style="dim"))
    return Text(f"-- {kind.value} {event.text}", style="dim")


class ChatLog(RichLog):
    """One conversation's scrollback. Asks for older history when scrolled past its top."""

    class Older(Message):
        """The user wants messages older than the first shown."""

        def __init__(self, pane: ChatLog) -> None:
            super().__init__()
            self.pane = pane

    def __init__(self, conv: Conversation, *, id: str, me: Callable[[], str | None] = lambda: None) -> None:
        super().__init__(wrap=True, min_width=20, id=id)
        self.conv = conv
        self._me = me
        self._rebuilding = False
        self._stale = False  # lines came while hidden: draw them when shown
        self._width = 0

    def at_bottom(self) -> bool:
        return self.scroll_y >= self.max_scroll_y

    def add(self, line: Line) -> None:
        """Draw one new line at the bottom; follow it only if the view was at the bottom.

        A hidden pane does not know its width (RichLog wraps lines as they are written), so
        it only remembers to draw its scrollback when shown.
        """
        if self.display and self.scrollable_content_region.width > 0 and not self._stale:
            self.write(render_line(line, self._me()), scroll_end=self.at_bottom())
        else:
            self._stale = True

    def catch_up(self) -> None:
        """Called when shown: draw what came while hidden, once the pane has its width again."""

        def draw() -> None:
            if self._stale and self.scrollable_content_region.width > 0:
                self.rebuild()

        self.call_after_refresh(draw)

    def rebuild(self) -> None:
        """Draw the whole scrollback again: at the bottom if it was, else with the same lines in view."""
        follow, height, y = self.at_bottom(), len(self.lines), self.scroll_y
        self._rebuilding, self._stale = True, False  # the scroll position passes 0: that asks for nothing
        try:
            self.clear()
            for line in self.conv.lines:
                self.write(render_line(line, self._me()), scroll_end=False)
            if follow:
                self.scroll_end(animate=False, immediate=True, x_axis=False)
            else:
                self.scroll_to(y=y + len(self.lines) - height, animate=False, immediate=True)
        finally:
            self._rebuilding = False

    def on_resize(self, event: events.Resize) -> None:
        """A new width: wrap every line again (RichLog keeps lines as first wrapped)."""
        width, self._width = self._width, event.size.width
        if self._stale or (width and event.size.width != width):
            self.rebuild()

    def page_up(self) -> None:
        """PageUp: one page back; at the top, ask for older messages."""
        if self.scroll_y <= 0:
            self.post_message(self.Older(self))
        else:
            self.scroll_page_up(animate=False)

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if new_value <= 0 < old_value and self.max_scroll_y > 0 and not self._rebuilding:
            self.post_message(self.Older(self))

    def on_mouse_scroll_up(self, event: events.MouseScrollUp) -> None:
        if self.scroll_y <= 0:
            self.post_message(self.Older(self))


class ChatInput(Input):
    """The input line: Enter sends, Up/Down recall typed lines, Tab completes nicks and /commands."""

    BINDINGS = [  # noqa: RUF012 - Textual's own annotation is the ClassVar
        Binding("up", "recall(-1)", "older line", show=False),
        Binding("down", "recall(1)", "newer line", show=False),
        Binding("tab", "complete", "complete", show=False),
    ]

    def __init__(self, nicks: Callable[[], Iterable[str]], *, id: str) -> None:
        super().__init__(placeholder="type a message or /help", select_on_focus=False, compact=True, id=id)
        self.history = InputHistory()
        self.completer = Completer()
        self._nicks = nicks

    def action_recall(self, step: int) -> None:
        line = self.history.previous(self.value) if step < 0 else self.history.next()
        if line is not None:
            self.value = line
            self.cursor_position = len(line)

    def action_complete(self) -> None:
        done = self.completer.complete(self.value, self.cursor_position, self._nicks())
        if done is not None:
            self.value, self.cursor_position = done


class Sidebar(OptionList):
    """The open conversations, numbered for Alt+number, with unread counts. Clicks switch."""

    can_focus = False

    def show(self, convs: list[Conversation], current: str) -> None:
        self.clear_options()
        for n, conv in enumerate(convs, 1):
            label = Text.assemble(Text(f"{n} ", style="dim"), conv.title)
            if conv.private:
                label.append(" (private)", style="dim")
            if conv.unread:  # red when some of it is for you
                label.append(f" ({conv.unread})", style="bold red" if conv.highlights else "bold yellow")
            self.add_option(Option(label, id=conv.key))
        self.highlighted = next((i for i, conv in enumerate(convs) if conv.key == current), None)


class MemberList(OptionList):
    """The current room's members in their colours, operators first with an ``@``, those who
    are away dimmed with why (a DM's peer; nothing for the status pane)."""

    can_focus = False

    def show(self, conv: Conversation) -> None:
        self.clear_options()
        if conv.room:
            nicks = sorted(conv.members.values(), key=lambda nick: (not conv.is_op(nick), nick.casefold()))
        else:
            nicks = [conv.peer or ""]
        for nick in nicks:
            if nick:
                mark = Text("@", style="bold") if conv.room and conv.is_op(nick) else Text("")
                line = Text.assemble(mark, render_nick(nick))
                if why := conv.away_why(nick):
                    line.stylize("dim")
                    line.append(f" (away: {why})", style="dim italic")
                self.add_option(line)
        self.border_title = f"{len(conv.members)} here" if conv.room else ""


class NickScreen(ModalScreen[None]):
    """Asks for a nick until the app accepts one (the app dismisses it after connecting)."""

    DEFAULT_CSS = """
    NickScreen { align: center middle; }
    NickScreen > Vertical { width: 50; height: auto; border: round $accent; padding: 1 2; }
    NickScreen #nick-error { color: $error; }
    """

    class Chosen(Message):
        """The user typed a nick to try."""

        def __init__(self, nick: str) -> None:
            super().__init__()
            self.nick = nick

    def __init__(self, error: str = "") -> None:
        super().__init__()
        self._error = error

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Your nick:")
            yield Input(id="nick-input", max_length=64)
            yield Label(self._error, id="nick-error")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if nick := event.value.strip():
            self.query_one("#nick-error", Label).update("connecting…")
            self.post_message(self.Chosen(nick))

    def show_error(self, reason: str) -> None:
        """The broker refused the nick: say why and ask again."""
        self.query_one("#nick-error", Label).update(reason)
        field = self.query_one("#nick-input", Input)
        field.value = ""
        field.focus()
