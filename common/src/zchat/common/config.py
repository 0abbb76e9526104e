"""Configuration plumbing shared by the CLIs: options that are flags and ``ZCHAT_*`` variables.

Each :class:`Option` is declared once, with its environment variable, default, parser and
help; :func:`add_options` turns a table of them into argparse flags and :func:`resolve`
applies the precedence *flag > environment > default*, parsing every value and raising
:class:`~zchat.common.errors.ConfigError` naming the option when one is invalid.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

#: The broker's ROUTER endpoint (clients connect their DEALER here).
ENV_ROUTER = "ZCHAT_ROUTER"
#: The broker's XPUB endpoint (clients connect their SUB here).
ENV_PUB = "ZCHAT_PUB"
#: Message of the day sent in every welcome.
ENV_MOTD = "ZCHAT_MOTD"
#: Seconds of silence after which the broker ends a session.
ENV_SESSION_TIMEOUT = "ZCHAT_SESSION_TIMEOUT"
#: Log level name (debug, info, warning, error).
ENV_LOG_LEVEL = "ZCHAT_LOG_LEVEL"
#: Largest request frame in bytes.
ENV_MAX_FRAME = "ZCHAT_MAX_FRAME"
#: Longest message text in characters.
ENV_MAX_TEXT = "ZCHAT_MAX_TEXT"
#: The client's nick.
ENV_NICK = "ZCHAT_NICK"
#: The room the client joins at start.
ENV_ROOM = "ZCHAT_ROOM"
#: Seconds the client waits for each reply.
ENV_TIMEOUT = "ZCHAT_TIMEOUT"
#: Past messages the client shows when joining a room.
ENV_HISTORY = "ZCHAT_HISTORY"

DEFAULT_ROUTER = "tcp://127.0.0.1:5555"
DEFAULT_PUB = "tcp://127.0.0.1:5556"
DEFAULT_SESSION_TIMEOUT = 15.0

_TRANSPORTS = ("tcp://", "ipc://", "inproc://")


def parse_endpoint(value: str) -> str:
    """A ZeroMQ endpoint: tcp://host:port, ipc://path or inproc://name."""
    if not value.startswith(_TRANSPORTS) or value.endswith("://"):
        raise ValueError("expected tcp://HOST:PORT, ipc://PATH or inproc://NAME")
    return value


def parse_positive_float(value: str) -> float:
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise ValueError("expected a positive number")
    return number


def parse_positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("expected a positive whole number")
    return number


def parse_non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("expected a whole number >= 0")
    return number


def parse_non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError("expected a number >= 0")
    return number


def parse_log_level(value: str) -> str:
    name = value.strip().upper()
    if name not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("expected debug, info, warning or error")
    return name


def parse_text(value: str) -> str:
    return value


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: ``--flag``, ``ZCHAT_*`` variable and default, parsed by ``parse``."""

    name: str
    flag: str
    env: str
    default: Any
    parse: Callable[[str], Any]
    help: str
    metavar: str | None = None


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    """Add one flag per option; its argparse default is None so that unset flags show."""
    for opt in options:
        parser.add_argument(
            opt.flag,
            dest=opt.name,
            default=None,
            metavar=opt.metavar,
            help=f"{opt.help} (env {opt.env}; default {opt.default!r})",
        )


def resolve(
    options: Iterable[Option], args: argparse.Namespace, environ: Mapping[str, str]
) -> dict[str, Any]:
    """Each option's value by precedence flag > environment > default, parsed.

    Raises:
        ConfigError: naming the flag or variable whose value is invalid.
    """
    values: dict[str, Any] = {}
    for opt in options:
        raw: str | None = getattr(args, opt.name, None)
        source = opt.flag
        if raw is None and opt.env in environ:
            raw, source = environ[opt.env], opt.env
        if raw is None:
            values[opt.name] = opt.default
            continue
        try:
            values[opt.name] = opt.parse(raw)
        except ValueError as exc:
            raise ConfigError(source, raw, str(exc)) from None
    return values


def setup_logging(level: str) -> None:
    """Human-readable logs on stderr at ``level``."""
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
