"""``greeter``: welcomes everyone who joins one of its rooms.

The text comes from ``--text`` (or ``ZCHAT_GREETING``), with ``{nick}`` and ``{room}``
replaced. Someone who comes back to a room within ``--cooldown`` seconds of their last
greeting there is not greeted again, so flapping connections (and everyone rejoining after
a broker restart) do not fill the room with welcomes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from zchat.client.bot import Bot, Context
from zchat.common.config import Option, parse_non_negative_float
from zchat.common.names import nick_key

from . import ShippedBot

#: The greeting; ``{nick}`` and ``{room}`` are replaced.
ENV_GREETING = "ZCHAT_GREETING"
#: Seconds during which a nick is not greeted again in the same room.
ENV_GREETER_COOLDOWN = "ZCHAT_GREETER_COOLDOWN"

DEFAULT_GREETING = "Welcome to #{room}, {nick}!"


def parse_greeting(value: str) -> str:
    """A greeting template: text with ``{nick}`` and ``{room}`` placeholders (``{{`` for a brace)."""
    if not value.strip():
        raise ValueError("the greeting is empty")
    try:
        value.format(nick="nick", room="room")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"bad placeholder {exc}; use {{nick}} and {{room}}, and {{{{ for a brace") from None
    return value


OPTIONS = (
    Option("text", "--text", ENV_GREETING, DEFAULT_GREETING, parse_greeting,
           "the greeting; {nick} and {room} are replaced", "TEXT"),
    Option("cooldown", "--cooldown", ENV_GREETER_COOLDOWN, 600.0, parse_non_negative_float,
           "seconds before the same nick is greeted again in a room (0: always)", "SECONDS"),
)


def make_bot(options: Mapping[str, Any]) -> Bot:
    template: str = options.get("text", DEFAULT_GREETING)
    cooldown: float = options.get("cooldown", 600.0)
    bot = Bot("greeter", ["general"], description="welcomes each joiner")
    greeted: dict[tuple[str, str], float] = {}

    @bot.on_join
    def greet(ctx: Context) -> str | None:
        assert ctx.room is not None
        now = time.monotonic()
        key = (ctx.room, nick_key(ctx.sender))
        if cooldown and now - greeted.get(key, -cooldown) < cooldown:
            return None
        greeted[key] = now
        if len(greeted) > 10_000:  # forget those whose cooldown is over
            for old in [k for k, t in greeted.items() if now - t >= cooldown]:
                del greeted[old]
        return template.format(nick=ctx.sender, room=ctx.room)

    return bot


SPEC = ShippedBot("greeter", "welcomes each joiner (--text with {nick} and {room})", OPTIONS, make_bot)
