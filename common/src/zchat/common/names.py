"""Rules for nicks and room names.

Both are Unicode, normalised to NFKC, and made only of letters, marks, digits and ``_ - .``
so that no control, format (zero-width, bidi override) or space character can hide in a name.

* A **nick** keeps the form its owner typed (after NFKC) for display; two nicks are the same
  nick when their :func:`nick_key` is equal: case-folded, NFKC, and with lookalike letters
  reduced to one skeleton, so ``Ann``, ``ANN``, ``ａｎｎ`` (full-width), ``Аnn`` (Cyrillic А),
  ``Bi11`` and ``BiII`` (``Bill``) and ``rnary`` (``mary``) are one nick.
* A **room** name is case-insensitive and stored in its key form: ``#General`` is ``general``.
  A leading ``#`` is accepted and dropped, as IRC users type it.

The functions are pure, so they are memoised: the broker checks the room of every message,
and a cache hit costs a dict lookup instead of a Unicode walk.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

from .codes import ErrorCode
from .errors import ProtocolError

MAX_NICK_LENGTH = 32
MAX_ROOM_LENGTH = 64
_PUNCTUATION = frozenset("_-.")
#: Unicode category Cc (C0, DEL, C1) but newline and tab.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
#: Nicks that would read as the system speaking.
RESERVED_NICKS = frozenset({"server", "broker", "system", "zchat"})


#: Letters and marks that render as nothing (Unicode Default_Ignorable_Code_Point minus the
#: format characters, which the category check already refuses): a name holding one would
#: look exactly like another name.
_INVISIBLE = frozenset(
    chr(c)
    for lo, hi in (
        (0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F), (0x3164, 0x3164),
        (0xFE00, 0xFE0F), (0xFFA0, 0xFFA0), (0xE0100, 0xE01EF),
    )
    for c in range(lo, hi + 1)
)


#: Letters (after case folding) that look like a Latin letter or digit in common fonts, from
#: Unicode's confusables (UTS #39) for the scripts nicks mix most: Cyrillic, Greek, Armenian,
#: plus digits and the i/l/1 and o/0 families. Merging too much only refuses a nick; merging
#: too little lets one user pass for another.
_SKELETON = str.maketrans({
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p",
    "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "ԁ": "d",
    "һ": "h", "ԛ": "q", "ԝ": "w", "ӏ": "i", "ү": "y", "ɡ": "g", "ь": "b", "п": "n", "г": "r",
    # Greek
    "α": "a", "β": "b", "ε": "e", "ζ": "z", "η": "n", "ι": "i", "κ": "k", "μ": "u", "ν": "v",
    "ο": "o", "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ϲ": "c", "ϳ": "j", "ω": "w",
    # Armenian
    "օ": "o", "ս": "u", "ց": "g", "հ": "h", "ո": "n", "զ": "q",
    # Latin letters and digits that pass for one another
    "l": "i", "1": "i", "ı": "i", "ℓ": "i", "ɩ": "i", "0": "o", "ɑ": "a", "5": "s", "ƅ": "b",
})


def _allowed(ch: str) -> bool:
    return ch in _PUNCTUATION or (unicodedata.category(ch)[0] in "LMN" and ch not in _INVISIBLE)


def _check_chars(name: str, what: str, code: ErrorCode) -> None:
    for ch in name:
        if not _allowed(ch):
            raise ProtocolError(
                code,
                f"{what} may contain only letters, digits and _ - . (not U+{ord(ch):04X})",
            )


@lru_cache(maxsize=8192)
def normalize_nick(raw: str, max_length: int = MAX_NICK_LENGTH) -> str:
    """Return the display form of a nick, or raise :class:`ProtocolError`.

    The first character must be a letter or ``_``; at most ``max_length`` characters.
    """
    nick = unicodedata.normalize("NFKC", raw)
    if not nick:
        raise ProtocolError(ErrorCode.INVALID_NICK, "nick is empty")
    if len(nick) > max_length:
        raise ProtocolError(ErrorCode.INVALID_NICK, f"nick is longer than {max_length} characters")
    _check_chars(nick, "nick", ErrorCode.INVALID_NICK)
    if not (nick[0] == "_" or unicodedata.category(nick[0])[0] == "L"):
        raise ProtocolError(ErrorCode.INVALID_NICK, "nick must start with a letter or _")
    if nick_key(nick) in RESERVED_NICKS:
        raise ProtocolError(ErrorCode.INVALID_NICK, f"nick {nick!r} is reserved")
    return nick


@lru_cache(maxsize=8192)
def nick_key(nick: str) -> str:
    """The form two nicks are compared in: the skeleton of NFKC(casefold(NFKC(nick))).

    Lookalike letters map to one Latin letter (``_SKELETON``), and ``rn`` and ``vv`` to the
    ``m`` and ``w`` they pass for, so a nick cannot be impersonated by one that renders the same.
    """
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", nick).casefold())
    return folded.translate(_SKELETON).replace("rn", "m").replace("vv", "w")


@lru_cache(maxsize=8192)
def normalize_room(raw: str, max_length: int = MAX_ROOM_LENGTH) -> str:
    """Return a room's canonical name (its key), or raise :class:`ProtocolError`.

    A leading ``#`` is dropped; the name is case-folded; the first character must be a
    letter or digit; at most ``max_length`` characters.
    """
    name = raw[1:] if raw.startswith("#") else raw
    name = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())
    if not name:
        raise ProtocolError(ErrorCode.INVALID_ROOM, "room name is empty")
    if len(name) > max_length:
        raise ProtocolError(ErrorCode.INVALID_ROOM, f"room name is longer than {max_length} characters")
    _check_chars(name, "room name", ErrorCode.INVALID_ROOM)
    if unicodedata.category(name[0])[0] not in "LN":
        raise ProtocolError(ErrorCode.INVALID_ROOM, "room name must start with a letter or digit")
    return name


def text_allowed(text: str, max_length: int) -> bool:
    """True when :func:`check_text` would accept ``text`` (a predicate for hot paths, which
    call check_text only to say what is wrong)."""
    return 0 < len(text) <= max_length and _CONTROL.search(text) is None


def check_text(text: str, max_length: int) -> None:
    """Raise :class:`ProtocolError` (code ``invalid_text``) unless ``text`` may be sent.

    Text is 1 to ``max_length`` characters; newline and tab are allowed, no other control
    character is (an escape sequence in a message could rewrite a reader's terminal).
    """
    if not text:
        raise ProtocolError(ErrorCode.INVALID_TEXT, "text is empty")
    if len(text) > max_length:
        raise ProtocolError(ErrorCode.INVALID_TEXT, f"text is longer than {max_length} characters")
    bad = _CONTROL.search(text)
    if bad is not None:
        raise ProtocolError(ErrorCode.INVALID_TEXT, f"text contains control character U+{ord(bad.group()):04X}")


def check_line(text: str, max_length: int) -> None:
    """:func:`check_text`, and one line that is not blank: for text shown inline in lists
    (an away reason), where a line break could forge more lines."""
    check_text(text, max_length)
    if not text.strip() or "\n" in text or "\t" in text:
        raise ProtocolError(ErrorCode.INVALID_TEXT, "text must be one line, not blank, without tabs")
