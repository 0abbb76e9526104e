"""Nick and room-name rules, message-text checks and topic naming (zchat.common.names, .topics)."""

from __future__ import annotations

import itertools
import re
import unicodedata

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from zchat.common.codes import ErrorCode
from zchat.common.errors import ProtocolError
from zchat.common.names import (
    MAX_NICK_LENGTH,
    MAX_ROOM_LENGTH,
    RESERVED_NICKS,
    check_text,
    nick_key,
    normalize_nick,
    normalize_room,
)
from zchat.common.topics import (
    MAX_NONCE_LENGTH,
    PRIVATE_TOPIC_LENGTH,
    new_private_topic,
    room_topic,
    split_sync,
    sync_subscription,
)

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)

#: Characters that must never appear in a name: controls, format (zero-width, bidi), spaces.
HIDDEN = [
    "\x00",
    "\x1b",
    "\x7f",
    "\x85",
    "\t",
    "\n",
    "\r",
    " ",
    "\u00a0",  # no-break space (NFKC: space)
    "\u2007",  # figure space
    "\u3000",  # ideographic space
    "\u200b",  # zero-width space
    "\u200c",  # zero-width non-joiner
    "\u200d",  # zero-width joiner
    "\u2060",  # word joiner
    "\ufeff",  # byte-order mark
    "\u00ad",  # soft hyphen
    "\u200e",  # left-to-right mark
    "\u200f",  # right-to-left mark
    "\u202a",  # left-to-right embedding
    "\u202e",  # right-to-left override
    "\u2066",  # left-to-right isolate
    "\u2069",  # pop directional isolate
    "\u2028",  # line separator
    "\u2029",  # paragraph separator
    "\U000e0041",  # tag latin capital A
]
PUNCTUATION = ["/", "#", "@", ":", "!", "*", "?", ",", "'", '"', "<", ">", "\\", "+", "=", "(", "~"]

#: Invisible characters that Unicode calls letters or marks (Default_Ignorable_Code_Point).
INVISIBLE_LETTERS_AND_MARKS = [
    "\u034f",  # combining grapheme joiner (Mn)
    "\u115f",  # hangul choseong filler (Lo)
    "\u1160",  # hangul jungseong filler (Lo)
    "\u17b4",  # khmer vowel inherent aq (Mn)
    "\u180b",  # mongolian free variation selector one (Mn)
    "\u3164",  # hangul filler (Lo)
    "\ufe0f",  # variation selector-16 (Mn)
    "\uffa0",  # halfwidth hangul filler (Lo)
    "\U000e0100",  # variation selector-17 (Mn)
]


def _code(exc: pytest.ExceptionInfo[ProtocolError]) -> ErrorCode:
    return exc.value.code


# -- strategies ---------------------------------------------------------------------------

_NAME_CHARS = st.one_of(
    st.characters(categories=("L", "M", "N"), codec="utf-8"),
    st.sampled_from("_-."),
)
_FIRST_NICK_CHAR = st.characters(categories=["L"], codec="utf-8") | st.just("_")


def _valid_or_none_nick(raw: str) -> str | None:
    try:
        return normalize_nick(raw)
    except ProtocolError:
        return None


def _valid_or_none_room(raw: str) -> str | None:
    try:
        return normalize_room(raw)
    except ProtocolError:
        return None


raw_nicks = st.builds(
    lambda first, rest: first + rest,
    _FIRST_NICK_CHAR,
    st.text(_NAME_CHARS, max_size=MAX_NICK_LENGTH - 1),
)
valid_nicks = raw_nicks.map(_valid_or_none_nick).filter(lambda n: n is not None).map(str)

raw_rooms = st.builds(
    lambda hash_, first, rest: hash_ + first + rest,
    st.sampled_from(["", "#"]),
    st.characters(categories=("L", "N"), codec="utf-8"),
    st.text(_NAME_CHARS, max_size=MAX_ROOM_LENGTH - 1),
)
valid_rooms = raw_rooms.map(_valid_or_none_room).filter(lambda r: r is not None).map(str)


# -- nicks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "display"),
    [
        ("ann", "ann"),
        ("Ann", "Ann"),  # the display form keeps its case
        ("ａｎｎ", "ann"),  # full-width letters: NFKC
        ("Ａｎｎ", "Ann"),
        ("ﬁona", "fiona"),  # ligature: NFKC
        ("_bot", "_bot"),
        ("ann-b.c_d9", "ann-b.c_d9"),
        ("Ωmega", "Ωmega"),
        ("日本語", "日本語"),
        ("e\u0301", "é"),  # combining accent composes
    ],
)
def test_nick_display_form_is_nfkc(raw: str, display: str) -> None:
    assert normalize_nick(raw) == display


def test_nick_key_is_case_and_width_insensitive() -> None:
    keys = {nick_key(n) for n in ("Ann", "ANN", "ann", "ａｎｎ", "ＡＮＮ", "aNn")}
    assert keys == {"ann"}
    assert nick_key("Straße") == nick_key("STRASSE")  # full case folding, not lower()
    assert nick_key("Ann") != nick_key("Anne")


@pytest.mark.parametrize("reserved", sorted(RESERVED_NICKS))
def test_reserved_nicks_are_rejected_in_any_case_or_width(reserved: str) -> None:
    fullwidth = "".join(chr(ord(ch) - ord("a") + ord("Ａ")) for ch in reserved)
    for raw in (reserved, reserved.upper(), reserved.capitalize(), fullwidth):
        with pytest.raises(ProtocolError) as exc:
            normalize_nick(raw)
        assert _code(exc) is ErrorCode.INVALID_NICK
    assert normalize_nick(reserved + "s") == reserved + "s"  # only the exact nick is reserved


def test_nick_length_is_counted_after_nfkc() -> None:
    assert normalize_nick("a" * MAX_NICK_LENGTH) == "a" * MAX_NICK_LENGTH
    with pytest.raises(ProtocolError) as exc:
        normalize_nick("a" * (MAX_NICK_LENGTH + 1))
    assert _code(exc) is ErrorCode.INVALID_NICK
    expands = "a" + "ﬃ" * 11  # 12 characters typed, 34 after NFKC
    assert len(expands) <= MAX_NICK_LENGTH
    with pytest.raises(ProtocolError):
        normalize_nick(expands)


def test_nick_max_length_argument() -> None:
    assert normalize_nick("abcd", max_length=4) == "abcd"
    with pytest.raises(ProtocolError):
        normalize_nick("abcde", max_length=4)


@pytest.mark.parametrize("ch", HIDDEN + PUNCTUATION)
def test_nick_rejects_control_format_space_and_punctuation(ch: str) -> None:
    for raw in ("an" + ch + "n", "ann" + ch, ch + "ann"):
        with pytest.raises(ProtocolError) as exc:
            normalize_nick(raw)
        assert _code(exc) is ErrorCode.INVALID_NICK


@pytest.mark.parametrize("raw", ["", "1ann", "-ann", ".ann", "\u0301ann", "٣ann", "²ann"])
def test_nick_must_start_with_letter_or_underscore(raw: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        normalize_nick(raw)
    assert _code(exc) is ErrorCode.INVALID_NICK


@pytest.mark.parametrize("ch", INVISIBLE_LETTERS_AND_MARKS)
def test_nick_rejects_invisible_letters_and_marks(ch: str) -> None:
    # "ann\ufe0f" renders exactly like "ann" but has another nick_key: an impersonation,
    # and "\u3164" alone is a nick nobody can see.
    for raw in ("ann" + ch, ch):
        with pytest.raises(ProtocolError):
            normalize_nick(raw)


@PROPERTY
@given(valid_nicks)
def test_valid_nicks_are_fixed_points(nick: str) -> None:
    assert normalize_nick(nick) == nick
    assert nick_key(nick_key(nick)) == nick_key(nick)
    assert all(ch in "_-." or unicodedata.category(ch)[0] in "LMN" for ch in nick)


@PROPERTY
@given(st.text(st.characters(codec="utf-8"), max_size=40))
def test_normalize_nick_raises_only_protocol_error(raw: str) -> None:
    try:
        nick = normalize_nick(raw)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.INVALID_NICK
    else:
        assert 0 < len(nick) <= MAX_NICK_LENGTH
        assert nick_key(nick) not in RESERVED_NICKS


# -- rooms --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("general", "general"),
        ("#general", "general"),
        ("#General", "general"),
        ("GENERAL", "general"),
        ("ＧＥＮＥＲＡＬ", "general"),
        ("#ＧＥＮＥＲＡＬ", "general"),
        ("Straße", "strasse"),
        ("2024", "2024"),
        ("dev-ops.eu_1", "dev-ops.eu_1"),
        ("Ωμέγα", "ωμέγα"),
    ],
)
def test_room_names_are_casefolded_keys_without_hash(raw: str, name: str) -> None:
    assert normalize_room(raw) == name


@pytest.mark.parametrize(
    "raw",
    ["", "#", "##general", "_general", "-general", ".general", "\u0301x", "gen eral", "gen/eral", "gen#eral"],
)
def test_room_rejects_bad_names(raw: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        normalize_room(raw)
    assert _code(exc) is ErrorCode.INVALID_ROOM


@pytest.mark.parametrize("ch", HIDDEN + PUNCTUATION)
def test_room_rejects_control_format_space_and_punctuation(ch: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        normalize_room("gen" + ch + "eral")
    assert _code(exc) is ErrorCode.INVALID_ROOM


def test_room_length() -> None:
    assert normalize_room("a" * MAX_ROOM_LENGTH) == "a" * MAX_ROOM_LENGTH
    assert normalize_room("#" + "a" * MAX_ROOM_LENGTH) == "a" * MAX_ROOM_LENGTH  # '#' is not counted
    with pytest.raises(ProtocolError) as exc:
        normalize_room("a" * (MAX_ROOM_LENGTH + 1))
    assert _code(exc) is ErrorCode.INVALID_ROOM
    assert normalize_room("abc", max_length=3) == "abc"
    with pytest.raises(ProtocolError):
        normalize_room("abcd", max_length=3)


@pytest.mark.parametrize("ch", ["\u034f", "\u3164", "\ufe0f"])
def test_room_rejects_invisible_letters_and_marks(ch: str) -> None:
    # "general\ufe0f" renders like "general" but is another room.
    with pytest.raises(ProtocolError):
        normalize_room("general" + ch)


@PROPERTY
@given(valid_rooms)
def test_valid_rooms_are_fixed_points(room: str) -> None:
    assert normalize_room(room) == room
    assert normalize_room("#" + room) == room
    assert "/" not in room
    assert not room.startswith("#")


@PROPERTY
@given(st.text(st.characters(codec="utf-8"), max_size=70))
def test_normalize_room_raises_only_protocol_error(raw: str) -> None:
    try:
        room = normalize_room(raw)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.INVALID_ROOM
    else:
        assert 0 < len(room) <= MAX_ROOM_LENGTH
        assert normalize_room(room) == room


# -- text ---------------------------------------------------------------------------------

CONTROLS = [chr(cp) for cp in [*range(0x20), *range(0x7F, 0xA0)] if chr(cp) not in "\n\t"]


@pytest.mark.parametrize("text", ["hi", "line one\nline two", "col\tcol", "\n", "😀 ünïcödé ½", "x" * 4000])
def test_check_text_accepts(text: str) -> None:
    check_text(text, 4000)


@pytest.mark.parametrize("ch", CONTROLS, ids=[f"U+{ord(ch):04X}" for ch in CONTROLS])
def test_check_text_rejects_control_characters(ch: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        check_text("before" + ch + "after", 4000)
    assert _code(exc) is ErrorCode.INVALID_TEXT


@pytest.mark.parametrize("text", ["", "\x1b[2J\x1b[H", "x" * 4001])
def test_check_text_rejects_empty_escape_and_long(text: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        check_text(text, 4000)
    assert _code(exc) is ErrorCode.INVALID_TEXT


def test_check_text_counts_characters_not_bytes() -> None:
    check_text("é" * 10, 10)
    with pytest.raises(ProtocolError):
        check_text("é" * 11, 10)


@PROPERTY
@given(st.text(st.characters(codec="utf-8"), max_size=50))
def test_check_text_agrees_with_its_rule(text: str) -> None:
    allowed = bool(text) and all(ch in "\n\t" or unicodedata.category(ch) != "Cc" for ch in text)
    try:
        check_text(text, 50)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.INVALID_TEXT
        assert not allowed
    else:
        assert allowed


# -- topics -------------------------------------------------------------------------------

PRIVATE_TOPIC = re.compile(rb"p/[0-9a-f]{32}/")
WELL_FORMED_SYNC = re.compile(rb"(p/[0-9a-f]{32}/)sync/([A-Za-z0-9]{1,%d})" % MAX_NONCE_LENGTH)


def test_room_topic() -> None:
    assert room_topic("general") == b"r/general/"
    assert room_topic("ωμέγα") == b"r/" + "ωμέγα".encode() + b"/"


def test_new_private_topics_are_well_formed_and_distinct() -> None:
    topics = {new_private_topic() for _ in range(100)}
    assert len(topics) == 100
    for topic in topics:
        assert PRIVATE_TOPIC.fullmatch(topic)
        assert len(topic) == PRIVATE_TOPIC_LENGTH


@PROPERTY
@given(valid_rooms, valid_rooms)
def test_room_topics_are_prefix_free(a: str, b: str) -> None:
    ta, tb = room_topic(a), room_topic(b)
    if a != b:
        assert not tb.startswith(ta)
        assert not ta.startswith(tb)
    assert not ta.startswith(b"p/")
    assert not new_private_topic().startswith(ta)


@PROPERTY
@given(st.lists(valid_rooms, max_size=8))
def test_room_topics_prefix_free_as_a_set(rooms: list[str]) -> None:
    topics = sorted({room_topic(r) for r in rooms})
    # In sorted order a prefix would sit right before a string it prefixes.
    for before, after in itertools.pairwise(topics):
        assert not after.startswith(before)


@PROPERTY
@given(st.text(st.sampled_from("abcdefABCDEF0123456789xyzXYZ"), min_size=1, max_size=MAX_NONCE_LENGTH))
def test_sync_subscription_round_trips(nonce: str) -> None:
    topic = new_private_topic()
    assert split_sync(sync_subscription(topic, nonce)) == (topic, nonce)


@pytest.mark.parametrize(
    "subscription",
    [
        b"",
        b"p/",
        b"r/general/sync/abc",
        b"p/0123456789abcdef0123456789abcdef/",
        b"p/0123456789abcdef0123456789abcdef/sync/",
        b"p/0123456789abcdef0123456789abcdef/sync",
        b"p/0123456789abcdef0123456789abcdef/SYNC/abc",
        b"p/0123456789abcdef0123456789abcdef/sync/" + b"a" * (MAX_NONCE_LENGTH + 1),
        b"p/0123456789abcdef0123456789abcdef/sync/ab-c",
        b"p/0123456789abcdef0123456789abcdef/sync/ab/c",
        b"p/0123456789abcdef0123456789abcdef/sync/ab c",
        b"p/0123456789abcdef0123456789abcdef/sync/\xc3\xa9",
        b"p/0123456789abcdef0123456789abcdef/sync/\x00",
        b"p/0123456789abcdef/sync/abc",
        b"p/0123456789abcdef0123456789abcdef0/sync/abc",
        b"\x01p/0123456789abcdef0123456789abcdef/sync/abc",
    ],
)
def test_split_sync_rejects(subscription: bytes) -> None:
    assert split_sync(subscription) is None


@PROPERTY
@given(st.binary(max_size=80))
@example(b"p/0123456789abcdef0123456789abcdef/sync/abc")
def test_split_sync_accepts_only_what_sync_subscription_builds(subscription: bytes) -> None:
    result = split_sync(subscription)
    if result is not None:
        topic, nonce = result
        assert sync_subscription(topic, nonce) == subscription
        assert topic.startswith(b"p/") and len(topic) == PRIVATE_TOPIC_LENGTH
        assert 0 < len(nonce) <= MAX_NONCE_LENGTH and nonce.isascii() and nonce.isalnum()


@pytest.mark.parametrize(
    "subscription",
    [
        b"p/" + b"z" * 32 + b"/sync/abc",  # not hex
        b"p/" + b"\xff" * 33 + b"sync/abc",  # no '/' closing the topic, not hex, not UTF-8
        b"p/0123456789abcdef0123456789abcdef" + b"xsync/abc",
    ],
)
def test_split_sync_rejects_malformed_private_topic(subscription: bytes) -> None:
    assert WELL_FORMED_SYNC.fullmatch(subscription) is None
    assert split_sync(subscription) is None
