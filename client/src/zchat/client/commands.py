"""Bot commands, from text to arguments: ``!roll 2d6 3`` → ``roll(ctx, "2d6", 3)``.

Pure: nothing here touches a socket or a clock. :func:`parse_command` splits a message into
a command name and its argument text; :func:`parameters_of` reads a handler's signature
into :class:`Param` s (each with a converter from :func:`converter_for`); :func:`usage_of`
writes the usage line; :func:`bind_arguments` (or :meth:`Command.bind`) turns the argument
text into the handler's arguments, or raises :class:`UsageError`.

Errors extend zchat's tree (:mod:`zchat.common.errors`)::

    ZchatError
     └── BotError
          └── UsageError   a command got arguments it cannot take (replied to the sender)
"""

from __future__ import annotations

import inspect
import math
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal, Union

from zchat.common.errors import ZchatError


class BotError(ZchatError):
    """Base class of the bot framework's errors."""


class UsageError(BotError):
    """A command was given arguments it cannot take.

    The bot replies with ``reason`` and the command's usage. Command handlers may raise it
    themselves to reject input the signature cannot (``raise UsageError("sides must be > 1")``).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ParamKind(Enum):
    """How a command parameter takes its value from the command text."""

    WORD = "word"  # a positional parameter: the next word (or "quoted words")
    WORDS = "words"  # *args: every word left
    REST = "rest"  # the first keyword-only parameter: the rest of the line, verbatim


_REQUIRED: Any = inspect.Parameter.empty
_WORD = re.compile(r'"([^"]*)"|(\S+)')
_COMMAND = re.compile(r"(\S+)\s*(.*)", re.DOTALL)
_BOOLS = {"yes": True, "y": True, "true": True, "on": True, "1": True,
          "no": False, "n": False, "false": False, "off": False, "0": False}
_SIMPLE_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}


@dataclass(frozen=True, slots=True)
class Param:
    """One parameter of a command handler, after the context.

    Attributes:
        name: the parameter's name (shown upper-case in usages).
        kind: where its value comes from.
        convert: turns a word into the value; raises ValueError (or TypeError) for bad input.
        what: what ``convert`` accepts, for error messages ("a whole number").
        default: the default value, or ``inspect.Parameter.empty`` when required.
    """

    name: str
    kind: ParamKind
    convert: Callable[[str], Any]
    what: str
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED and self.kind is not ParamKind.WORDS

    def parse(self, word: str) -> Any:
        try:
            return self.convert(word)
        except (ValueError, TypeError):
            raise UsageError(f"{self.name.upper()} must be {self.what}, not {word!r}") from None


def _parse_bool(word: str) -> bool:
    try:
        return _BOOLS[word.lower()]
    except KeyError:
        raise ValueError(word) from None


def _parse_float(word: str) -> float:
    number = float(word)
    if not math.isfinite(number):
        raise ValueError(word)
    return number


def _choice_of(choices: tuple[Any, ...]) -> tuple[Callable[[str], Any], str]:
    """The converter of a ``Literal[*choices]``: the choice whose text is the word, any case."""

    def choose(word: str) -> Any:
        for choice in choices:
            if str(choice).casefold() == word.casefold():
                return choice
        raise ValueError(word)

    return choose, "one of " + ", ".join(str(c) for c in choices)


_CONVERTERS: dict[Any, tuple[Callable[[str], Any], str]] = {
    bool: (_parse_bool, "yes or no"), int: (int, "a whole number"), float: (_parse_float, "a number"),
}


def converter_for(annotation: Any) -> tuple[Callable[[str], Any], str]:
    """The converter of a parameter annotated ``annotation``, and what it accepts.

    ``str`` (or no annotation), ``int``, ``float``, ``bool`` (yes/no, on/off, true/false),
    ``Literal[...]`` (one of the values), ``X | None`` (as ``X``), or any class that can be
    called with the word (its ``description`` attribute, if any, names what it accepts).

    Raises:
        TypeError: the annotation cannot be converted to.
    """
    if annotation in (_REQUIRED, str, Any):
        return str, "text"
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) != 1:
            raise TypeError(f"cannot convert to {annotation}: use one type (or X | None)")
        return converter_for(options[0])
    if origin is Literal:
        return _choice_of(typing.get_args(annotation))
    if annotation in _CONVERTERS:
        return _CONVERTERS[annotation]
    if isinstance(annotation, type):
        return annotation, getattr(annotation, "description", f"a {annotation.__name__}")
    raise TypeError(f"cannot convert command arguments to {annotation!r}")


def _resolve(fn: Callable[..., Any], name: str, annotation: Any) -> Any:
    """The object a string annotation (``from __future__ import annotations``) names.

    Raises:
        TypeError: it names nothing importable from ``fn``'s module: a converter guessed
            from its text would turn ``"Celsius"`` into plain text without a word.
    """
    if not isinstance(annotation, str):
        return annotation
    if annotation in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[annotation]
    namespace = {"Literal": Literal, "Optional": typing.Optional, "Union": Union, **getattr(fn, "__globals__", {})}
    try:
        return eval(annotation, namespace)  # what typing.get_type_hints does, one annotation at a time
    except Exception as exc:
        raise TypeError(
            f"{getattr(fn, '__qualname__', fn)}: the annotation {annotation!r} of {name!r} does not resolve "
            f"({exc}); import what it names at module level, not only under TYPE_CHECKING"
        ) from None


def parameters_of(fn: Callable[..., Any]) -> tuple[Param, ...]:
    """The command parameters of handler ``fn``: every parameter after the first (the context).

    Positional parameters take one word each (defaults make them optional); ``*args`` takes
    every word left; the first keyword-only parameter takes the rest of the line verbatim
    (as in discord.py: ``def say(ctx, *, text: str)``). Later keyword-only parameters keep
    their defaults.

    Raises:
        TypeError: ``fn`` cannot be a command handler (no context parameter, an annotation
            that cannot be converted, both ``*args`` and a keyword-only parameter, ...).
    """
    signature = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # some annotation does not resolve (often the context's): one by one
        hints = {}
    params = list(signature.parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not params or params[0].kind not in positional:
        raise TypeError(f"{fn.__qualname__} must take the Context as its first parameter")
    out: list[Param] = []
    for p in params[1:]:
        convert, what = converter_for(hints[p.name] if p.name in hints else _resolve(fn, p.name, p.annotation))
        if p.kind in positional:
            out.append(Param(p.name, ParamKind.WORD, convert, what, p.default))
        elif p.kind is inspect.Parameter.VAR_POSITIONAL:
            out.append(Param(p.name, ParamKind.WORDS, convert, what))
        elif p.kind is inspect.Parameter.KEYWORD_ONLY and not any(q.kind is ParamKind.REST for q in out):
            out.append(Param(p.name, ParamKind.REST, convert, what, p.default))
        elif p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is _REQUIRED:
            raise TypeError(f"{fn.__qualname__}: only the first keyword-only parameter takes the rest of the line")
    kinds = {p.kind for p in out}
    if ParamKind.WORDS in kinds and ParamKind.REST in kinds:
        raise TypeError(f"{fn.__qualname__}: take *words or a keyword-only rest of the line, not both")
    return tuple(out)


def usage_of(params: Iterable[Param]) -> str:
    """A usage line from parameters: ``DICE [TIMES] [WORDS...]`` (a rest of line: ``TEXT``)."""
    parts = []
    for p in params:
        name = p.name.upper() + ("..." if p.kind is ParamKind.WORDS else "")
        parts.append(name if p.required else f"[{name}]")
    return " ".join(parts)


def _word(match: re.Match[str]) -> str:
    """The word a ``_WORD`` match found: a quoted one without its quotes, or a bare one."""
    return match.group(2) if match.group(1) is None else match.group(1)


def bind_arguments(params: Iterable[Param], text: str) -> tuple[list[Any], dict[str, Any]]:
    """Positional and keyword arguments for ``params`` from a command's argument text.

    Words are separated by white space; ``"two words"`` is one word.

    Raises:
        UsageError: a required argument is missing, a word does not convert, or words are
            left over.
    """
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    pos = 0
    rest_param: Param | None = None
    for p in params:
        if p.kind is ParamKind.WORD:
            match = _WORD.search(text, pos)
            if match is None:
                if p.required:
                    raise UsageError(f"{p.name.upper()} is missing")
                args.append(p.default)
                continue
            pos = match.end()
            args.append(p.parse(_word(match)))
        elif p.kind is ParamKind.WORDS:
            args += [p.parse(_word(m)) for m in _WORD.finditer(text, pos)]
            pos = len(text)
        else:
            rest_param = p
    rest = text[pos:].strip()
    if rest_param is not None:
        if rest:
            kwargs[rest_param.name] = rest_param.parse(rest)
        elif rest_param.required:
            raise UsageError(f"{rest_param.name.upper()} is missing")
    elif rest:
        raise UsageError(f"too many arguments: {rest!r}")
    return args, kwargs


def parse_command(text: str, prefix: str) -> tuple[str, str] | None:
    """``("roll", "2d6")`` for ``"!roll 2d6"`` with prefix ``"!"``; None if not a command."""
    if not prefix or not text.startswith(prefix):
        return None
    match = _COMMAND.fullmatch(text[len(prefix) :])
    if match is None:
        return None
    return match.group(1).lower(), match.group(2).strip()


@dataclass(frozen=True, slots=True)
class Command:
    """A registered command.

    Attributes:
        name: what follows the prefix (lower case).
        handler: called as ``handler(ctx, *args, **rest)``.
        params: how the arguments are parsed.
        usage: the arguments' synopsis shown in errors and ``!help``.
        help: one line on what it does.
        aliases: other names it answers to.
    """

    name: str
    handler: Callable[..., Any]
    params: tuple[Param, ...]
    usage: str
    help: str
    aliases: tuple[str, ...] = ()

    def bind(self, text: str) -> tuple[list[Any], dict[str, Any]]:
        """See :func:`bind_arguments`."""
        return bind_arguments(self.params, text)

    def synopsis(self, prefix: str) -> str:
        return f"{prefix}{self.name} {self.usage}".rstrip()

