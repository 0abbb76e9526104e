"""Configuration plumbing shared by the CLIs: flags, ``ZCHAT_*`` variables and a TOML file.

Each :class:`Option` is declared once, with its environment variable, default, parser and
help; :func:`add_options` turns a table of them into argparse flags (plus ``--config``) and
:func:`resolve` applies the precedence *flag > environment > config file > default*,
parsing every value and raising :class:`~zchat.common.errors.ConfigError` naming the
option (or the file and key) when one is invalid.

The config file (``--config FILE`` or ``ZCHAT_CONFIG``) is TOML. Keys are option names,
with ``-`` or ``_``: ``session-timeout = 30``. Top-level keys apply to the program reading
the file; a ``[broker]``, ``[client]`` or ``[bot]`` table applies to that program only and
wins over top-level keys, so one file can serve all of them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: A TOML config file to read (same as --config).
ENV_CONFIG = "ZCHAT_CONFIG"
#: Log format: text (default) or json (one JSON object per line).
ENV_LOG_FORMAT = "ZCHAT_LOG_FORMAT"
#: Program sections a config file may have.
SECTIONS = ("broker", "client", "bot")

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
#: The broker's CURVE public key for clients and bots: a key file (NAME.key) or the key itself.
ENV_SERVER_KEY = "ZCHAT_SERVER_KEY"
#: The client's or bot's own CURVE secret key file (NAME.key_secret).
ENV_KEY = "ZCHAT_KEY"

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


def parse_bool(value: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case)."""
    word = value.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


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
    #: For a switch: the value the bare flag stands for (``--insecure`` means "true").
    const: str | None = None


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    """Add ``--config`` and one flag per option (argparse default None, so unset flags show)."""
    if not any(action.dest == "config" for action in parser._actions):
        parser.add_argument(
            "--config", metavar="FILE", default=None, help=f"a TOML config file (env {ENV_CONFIG})"
        )
    for opt in options:
        help_text = f"{opt.help} (env {opt.env}; default {opt.default!r})"
        if opt.const is not None:
            parser.add_argument(opt.flag, dest=opt.name, default=None, action="store_const", const=opt.const,
                                help=help_text)
        else:
            parser.add_argument(opt.flag, dest=opt.name, default=None, metavar=opt.metavar, help=help_text)


def load_config_file(
    path: Path, options: Iterable[Option], section: str | None
) -> dict[str, tuple[str, Any]]:
    """What a TOML config file gives the options: option name -> (key as written, value).

    Raises:
        ConfigError: the file cannot be read or parsed, or names an unknown option.
    """
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError("--config", str(path), exc.strerror or str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", str(path), f"not valid TOML: {exc}") from None
    known = {opt.name for opt in options}
    values: dict[str, tuple[str, Any]] = {}
    tables = [{k: v for k, v in data.items() if not isinstance(v, dict)}]
    if section is not None and isinstance(data.get(section), dict):
        tables.append(data[section])
    for table in tables:
        for key, value in table.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"{path}: {key}", value, "no such option")
            values[name] = (key, value)
    for key, value in data.items():
        if isinstance(value, dict) and key not in SECTIONS:
            raise ConfigError(f"{path}: [{key}]", "...", f"unknown table (use one of {', '.join(SECTIONS)})")
    return values


def resolve(
    options: Iterable[Option],
    args: argparse.Namespace,
    environ: Mapping[str, str],
    *,
    section: str | None = None,
) -> dict[str, Any]:
    """Each option's value by precedence flag > environment > config file > default, parsed.

    The config file is ``args.config`` or ``$ZCHAT_CONFIG`` (none if neither is set);
    ``section`` names the table of it that is this program's own.

    Raises:
        ConfigError: naming the flag, variable or file key whose value is invalid.
    """
    options = list(options)
    config_path = getattr(args, "config", None) or environ.get(ENV_CONFIG)
    from_file = load_config_file(Path(config_path), options, section) if config_path else {}
    values: dict[str, Any] = {}
    for opt in options:
        raw: str | None = getattr(args, opt.name, None)
        source = opt.flag
        if raw is None and opt.env in environ:
            raw, source = environ[opt.env], opt.env
        if raw is None and opt.name in from_file:
            key, value = from_file[opt.name]
            raw, source = (str(value).lower() if isinstance(value, bool) else str(value)), f"{config_path}: {key}"
        if raw is None:
            values[opt.name] = opt.default
            continue
        try:
            values[opt.name] = opt.parse(raw)
        except ValueError as exc:
            raise ConfigError(source, raw, str(exc)) from None
    return values


def parse_log_format(value: str) -> str:
    name = value.strip().lower()
    if name not in ("text", "json"):
        raise ValueError("expected text or json")
    return name


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, and any ``extra=`` fields."""

    _STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str, fmt: str = "text") -> None:
    """Logs on stderr at ``level``: human-readable text, or JSON lines with ``fmt="json"``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))
