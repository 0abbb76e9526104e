"""``zchat-bot``: run a shipped bot by name, or a bot of your own from a Python file.

::

    zchat-bot --list
    zchat-bot greeter --room general --text "Hi {nick}, welcome to #{room}!"
    zchat-bot path/to/mybot.py --room dev --nick helper

A bot file defines a module-level ``bot = Bot(...)`` with its handlers (see BOTS.md); its
nick, rooms, endpoints and rate limit are its own unless given on the command line or in
the environment. Options come after the bot's name (the bot's own options, like the
greeter's ``--text``, only there); ``zchat-bot NAME --help`` lists them all.

Exit status: 0 when stopped by SIGINT or SIGTERM, 1 when the broker cannot be reached or
refuses the bot (a taken nick, a bad room name, its CURVE key) or the bot file fails to load,
2 for bad options (an unusable key file too), an unknown bot or a file that defines no bot.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zchat.common import config as c
from zchat.common.errors import AuthenticationFailed, ConfigError, KeyFileError, RequestError, RequestTimeout

from . import __version__
from .aio import curve_keys
from .bot import Bot
from .bots import ShippedBot, shipped

log = logging.getLogger("zchat.bot")

#: Outgoing messages a second a bot may send (its token bucket's rate).
ENV_BOT_RATE = "ZCHAT_BOT_RATE"
#: Messages a bot may send at once after a pause (its token bucket's size).
ENV_BOT_BURST = "ZCHAT_BOT_BURST"
#: What starts a command (``!`` in ``!help``).
ENV_BOT_PREFIX = "ZCHAT_BOT_PREFIX"

EXIT_FAILED = 1
EXIT_USAGE = 2


class BotNotFound(Exception):
    """The target is neither a shipped bot nor a bot file; ``message`` says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Target:
    """What to run: the options it adds, the defaults it brings, and how to build it.

    Attributes:
        label: the bot's name, or the file's path.
        options: the bot's own options (shipped bots only).
        defaults: nick, rooms, router, pub, timeout, rate, burst and prefix when not given.
        build: makes the bot from the values of ``options``.
    """

    label: str
    options: tuple[c.Option, ...]
    defaults: Mapping[str, Any]
    build: Callable[[Mapping[str, Any]], Bot]


def _defaults_of(bot: Bot) -> dict[str, Any]:
    return {"nick": bot.nick, "rooms": tuple(bot.rooms), "router": bot.router, "pub": bot.pub,
            "timeout": bot.timeout, "rate": bot.rate, "burst": bot.burst, "prefix": bot.prefix,
            "server_key": bot.server_key, "key": bot.key}


def _shipped_target(spec: ShippedBot) -> Target:
    defaults = {**_defaults_of(Bot(spec.name, help_command=False)), "rooms": ("general",)}
    return Target(spec.name, spec.options, defaults, spec.make_bot)


def load_bot_file(path: Path) -> Bot:
    """Run the Python file at ``path`` and return its module-level ``bot``.

    The file's directory goes on ``sys.path`` first, so it can import its neighbours; its
    ``if __name__ == "__main__":`` block does not run.

    Raises:
        BotNotFound: no such file, or it defines no ``bot`` that is a :class:`Bot`.
        Exception: whatever running the file raised.
    """
    if not path.is_file():
        raise BotNotFound(f"no such bot file: {path}")
    sys.path.insert(0, str(path.resolve().parent))
    spec = importlib.util.spec_from_file_location(f"zchat_bot_file_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise BotNotFound(f"cannot load {path} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    bot = getattr(module, "bot", None)
    if not isinstance(bot, Bot):
        raise BotNotFound(f"{path} defines no module-level `bot = Bot(...)`")
    return bot


def find_target(name: str) -> Target:
    """The shipped bot called ``name``, or the bot file at path ``name`` (it has a ``/`` or ends in .py).

    Raises:
        BotNotFound: neither.
        Exception: the bot file raised while loading.
    """
    bots = shipped()
    if name in bots:
        return _shipped_target(bots[name])
    if name.endswith(".py") or os.sep in name or "/" in name:
        bot = load_bot_file(Path(name))
        return Target(name, (), _defaults_of(bot), lambda _values: bot)
    raise BotNotFound(f"unknown bot {name!r}; shipped bots: {', '.join(bots)} (or give a path to a .py file)")


def common_options(defaults: Mapping[str, Any]) -> tuple[c.Option, ...]:
    """The options every bot takes, defaulting to ``defaults`` (the bot's own settings).

    ``--room`` is special: it may be repeated, and ``ZCHAT_ROOM`` (or the config file's
    ``room``) may name several rooms, separated by commas.
    """
    return (
        c.Option("room", "--room", c.ENV_ROOM, list(defaults["rooms"]), parse_rooms,
                 "a room to join; repeat the flag for more (or ROOM1,ROOM2)", "ROOM"),
        c.Option("nick", "--nick", c.ENV_NICK, defaults["nick"], c.parse_text, "the bot's nick", "NICK"),
        c.Option("router", "--router", c.ENV_ROUTER, defaults["router"], c.parse_endpoint,
                 "the broker's ROUTER endpoint", "ENDPOINT"),
        c.Option("pub", "--pub", c.ENV_PUB, defaults["pub"], c.parse_endpoint,
                 "the broker's XPUB endpoint", "ENDPOINT"),
        c.Option("timeout", "--timeout", c.ENV_TIMEOUT, defaults["timeout"], c.parse_positive_float,
                 "seconds to wait for each reply from the broker", "SECONDS"),
        c.Option("rate", "--rate", ENV_BOT_RATE, defaults["rate"], c.parse_positive_float,
                 "messages a second the bot may send", "PER_SECOND"),
        c.Option("burst", "--burst", ENV_BOT_BURST, defaults["burst"], c.parse_positive_int,
                 "messages the bot may send at once after a pause", "COUNT"),
        c.Option("prefix", "--prefix", ENV_BOT_PREFIX, defaults["prefix"], _parse_prefix,
                 "what starts a command", "TEXT"),
        c.Option("server_key", "--server-key", c.ENV_SERVER_KEY, defaults.get("server_key"), c.parse_text,
                 "the broker's CURVE public key: its .key file, or the key itself", "KEY"),
        c.Option("key", "--key", c.ENV_KEY, defaults.get("key"), c.parse_text,
                 "the bot's CURVE secret key file (NAME.key_secret, mode 0600)", "FILE"),
        c.Option("log_level", "--log-level", c.ENV_LOG_LEVEL, "INFO", c.parse_log_level,
                 "debug, info, warning or error", "LEVEL"),
        c.Option("log_format", "--log-format", c.ENV_LOG_FORMAT, "text", c.parse_log_format,
                 "text, or json: one object per line", "FORMAT"),
    )


class _JoinRooms(argparse.Action):
    """``--room a --room b`` → ``"a,b"``: one string, parsed like ZCHAT_ROOM."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        previous = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, f"{previous},{values}" if previous else values)


def _parse_prefix(value: str) -> str:
    if not value or any(ch.isspace() for ch in value):
        raise ValueError("expected one or more characters, no spaces")
    return value


def parse_rooms(value: str) -> list[str]:
    """Room names separated by commas or spaces (a TOML list works too: ``["a", "b"]``)."""
    for ch in "[]'\"":  # never part of a room name
        value = value.replace(ch, " ")
    rooms = value.replace(",", " ").split()
    if not rooms:
        raise ValueError("expected one or more room names, separated by commas")
    return rooms


def _epilog() -> str:
    bots = shipped()
    width = max(len(name) for name in bots)
    lines = [f"  {name:<{width}}  {spec.description}" for name, spec in bots.items()]
    return "shipped bots (zchat-bot NAME --help shows a bot's own options):\n" + "\n".join(lines)


def _add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, options: Sequence[c.Option]) -> None:
    for opt in options:
        kwargs: dict[str, Any] = {"action": _JoinRooms} if opt.name == "room" else {}
        shown = ", ".join(opt.default) if opt.name == "room" else repr(opt.default)
        parser.add_argument(opt.flag, dest=opt.name, default=None, metavar=opt.metavar,
                            help=f"{opt.help} (env {opt.env}; default {shown})", **kwargs)


def build_parser(target: Target | None) -> argparse.ArgumentParser:
    """The full parser: ``--config``, the common options and the target's own options."""
    parser = argparse.ArgumentParser(
        prog="zchat-bot",
        description="Run a zchat bot: a shipped one by name, or your own from a .py file defining `bot = Bot(...)`.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"zchat-bot {__version__}")
    parser.add_argument("--list", action="store_true", help="list the shipped bots and exit")
    parser.add_argument("target", nargs="?", metavar="BOT", help="a shipped bot's name, or a path to a bot file")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help=f"a TOML config file; its [bot] table is read (env {c.ENV_CONFIG})")
    _add_options(parser, common_options(target.defaults if target is not None else _defaults_of(Bot("bot"))))
    if target is not None and target.options:
        _add_options(parser.add_argument_group(f"options of {target.label}"), target.options)
    return parser


def _preparse(argv: Sequence[str]) -> argparse.Namespace:
    """Find the target (and ``--list``) before the target's own options are known."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("target", nargs="?")
    pre.add_argument("--list", action="store_true")
    pre.add_argument("--config")
    for opt in common_options(_defaults_of(Bot("bot", help_command=False))):
        pre.add_argument(opt.flag)
    known, _ = pre.parse_known_args(argv)
    return known


def list_bots() -> str:
    bots = shipped()
    width = max(len(name) for name in bots)
    return "\n".join(f"{name:<{width}}  {spec.description}" for name, spec in bots.items())


def configure(bot: Bot, values: Mapping[str, Any]) -> Bot:
    """Apply the command line's (environment's, config file's) settings to ``bot``."""
    bot.nick, bot.rooms = values["nick"], list(values["room"])
    bot.router, bot.pub, bot.timeout = values["router"], values["pub"], values["timeout"]
    bot.rate, bot.burst, bot.prefix = values["rate"], values["burst"], values["prefix"]
    bot.server_key, bot.key = values["server_key"], values["key"]
    return bot


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    known = _preparse(argv)
    if known.list:
        print(list_bots())
        return 0
    target: Target | None = None
    if known.target is not None:
        try:
            target = find_target(known.target)
        except BotNotFound as exc:
            print(f"zchat-bot: {exc.message}", file=sys.stderr)
            return EXIT_USAGE
        except Exception:
            print(f"zchat-bot: {known.target} failed to load:\n{traceback.format_exc()}", file=sys.stderr, end="")
            return EXIT_FAILED
    parser = build_parser(target)
    args = parser.parse_args(argv)
    if target is None:
        parser.error("name a bot (see --list) or a bot file")
    options = (*common_options(target.defaults), *target.options)
    try:
        values = c.resolve(options, args, os.environ, section="bot")
        # Read the key files now: a missing or too open one is a usage error (exit 2).
        curve = curve_keys(values["server_key"], values["key"])
    except (ConfigError, KeyFileError) as exc:
        parser.error(str(exc))
    values["server_key"], values["key"] = curve if curve is not None else (None, None)
    c.setup_logging(values["log_level"], values["log_format"])
    bot = configure(target.build({opt.name: values[opt.name] for opt in target.options}), values)
    return run(bot)


def run(bot: Bot) -> int:
    """Run ``bot`` until a signal stops it; the exit status."""
    try:
        bot.run()
    except AuthenticationFailed as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    except RequestTimeout:
        log.error("no answer from the broker at %s within %g s", bot.router, bot.timeout)
        return EXIT_FAILED
    except RequestError as exc:
        log.error("the broker refused %s: %s", bot.nick, exc)
        return EXIT_FAILED
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
