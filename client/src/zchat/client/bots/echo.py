"""``echo``: says back ``!echo TEXT`` in the room, and every private message by DM."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zchat.client.bot import Bot, Context

from . import ShippedBot


def make_bot(options: Mapping[str, Any]) -> Bot:
    bot = Bot("echo", ["general"], description="says back !echo TEXT, and every DM")

    @bot.command("echo", usage="TEXT")
    def echo(ctx: Context, *, text: str) -> str:
        """say TEXT back"""
        return text

    @bot.on_dm
    def echo_dm(ctx: Context) -> str:
        return ctx.text

    return bot


SPEC = ShippedBot("echo", "says back !echo TEXT in rooms, and every DM", (), make_bot)
