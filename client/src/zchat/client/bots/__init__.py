"""The bots that ship with zchat, run by ``zchat-bot NAME``.

Each module defines ``SPEC``, a :class:`ShippedBot`: its name, a one-line description, its
own options (flags over ``ZCHAT_*`` variables, like every zchat option) and ``make_bot``,
which builds an unstarted :class:`~zchat.client.bot.Bot` from those options' values. The
command line then sets the bot's nick, rooms and endpoints from the common options.

==========  ===========================================================================
greeter     welcomes each joiner (``--text``, ``--cooldown``)
echo        says back ``!echo TEXT`` and every DM
archive     writes its rooms to JSON-lines files, one per room per day (``--dir``, ``--max-bytes``)
remind      ``!remind 10m TEXT``: reminders, mentioning whoever asked
==========  ===========================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from zchat.client.bot import Bot
from zchat.common.config import Option


@dataclass(frozen=True, slots=True)
class ShippedBot:
    """A bot ``zchat-bot`` can run by name.

    Attributes:
        name: what to type after ``zchat-bot`` (also the default nick).
        description: one line, for ``zchat-bot --list``.
        options: the bot's own options (flags and ``ZCHAT_*`` variables).
        make_bot: builds the bot from the parsed values of ``options`` (keyed by option name).
    """

    name: str
    description: str
    options: tuple[Option, ...]
    make_bot: Callable[[Mapping[str, Any]], Bot]


def shipped() -> dict[str, ShippedBot]:
    """Every shipped bot, by name."""
    from . import archive, echo, greeter, remind

    return {m.SPEC.name: m.SPEC for m in (greeter, echo, archive, remind)}
