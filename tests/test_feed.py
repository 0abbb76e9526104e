"""Client-side delivery: :class:`Feed` and ClientCore's accept / accept_history / open_feed.

A feed delivers every sequenced event of its channel once and in order, whatever order
(and however many times) events arrive live, in history pages or announced by ticks.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zchat.client.core import DM, ClientCore, Feed
from zchat.common.codec import encode
from zchat.common.codes import EventKind
from zchat.common.protocol import Event, HistoryPage, Joined, Left, Welcome

NOW = 1_700_000_000.0
TOPIC = "p/0123456789abcdef0123456789abcdef/"


def ev(seq: int, room: str | None = "general") -> Event:
    """The stored event ``seq`` of ``room`` (a DM to ann if ``room`` is None)."""
    if room is None:
        return Event(EventKind.DM, None, "bob", f"dm {seq}", NOW + seq, 1000 + seq, to="ann", seq=seq)
    return Event(EventKind.MESSAGE, room, "bob", f"{room} {seq}", NOW + seq, 1000 + seq, seq=seq)


def tick(seq: int, room: str | None = "general") -> Event:
    return Event(EventKind.TICK, room, "", "", NOW, 1, seq=seq)


def page(first: int, last: int, seq: int, room: str | None = "general", more: bool = False) -> HistoryPage:
    """A history page holding events ``first..last`` (none if ``first > last``)."""
    return HistoryPage(7, room, tuple(ev(s, room) for s in range(first, last + 1)), seq, more)


def seqs(events: list[Event]) -> list[int]:
    """The seqs of sequenced events."""
    assert all(e.seq is not None for e in events)
    return [e.seq or 0 for e in events]


def receive_joined(core: ClientCore, room: str, seq: int) -> None:
    core.receive_reply(encode(Joined(2, room, f"r/{room}/", ("ann", "bob"), seq)))


def joined(core: ClientCore, room: str, seq: int = 0, history: int = 50) -> Feed:
    """What a front end does on ``joined``: apply the reply, then open the room's feed."""
    receive_joined(core, room, seq)
    assert core.open_feed(room, seq, history) == []
    return core.feeds[room]


@pytest.fixture
def core() -> ClientCore:
    """ann, welcomed with an empty DM inbox, in #general (no messages yet)."""
    core = ClientCore()
    core.receive_reply(encode(Welcome(1, "ann", TOPIC, "", 5.0, 15.0, "x" * 16, 0)))
    joined(core, "general")
    return core


# -- Feed ---------------------------------------------------------------------------------


def test_in_order_events_are_delivered_at_once() -> None:
    feed = Feed()
    for seq in (1, 2, 3):
        assert feed.offer(ev(seq)) == [ev(seq)]
    assert (feed.last, feed.known, feed.gap()) == (3, 3, None)


def test_a_feed_starts_after_its_first_seq() -> None:
    feed = Feed(5)
    assert feed.offer(ev(4)) == []
    assert feed.offer(ev(5)) == []
    assert feed.offer(ev(6)) == [ev(6)]


def test_duplicates_are_dropped() -> None:
    feed = Feed()
    assert seqs(feed.offer(ev(1))) == [1]
    assert feed.offer(ev(1)) == []  # delivered already
    assert feed.offer(ev(3)) == []
    assert feed.offer(ev(3)) == []  # already waiting
    assert seqs(feed.offer(ev(2))) == [2, 3]
    assert feed.offer(ev(2)) == feed.offer(ev(3)) == []


def test_out_of_order_events_are_held_until_the_gap_fills() -> None:
    feed = Feed()
    for seq in (3, 5, 4):
        assert feed.offer(ev(seq)) == []
    assert (feed.last, feed.known, feed.gap()) == (0, 5, 0)
    assert seqs(feed.offer(ev(1))) == [1]
    assert feed.gap() == 1
    assert seqs(feed.offer(ev(2))) == [2, 3, 4, 5]
    assert feed.gap() is None


def test_gap_says_where_to_fetch_from() -> None:
    feed = Feed(10)
    assert feed.gap() is None
    feed.offer(ev(13))
    assert feed.gap() == 10
    feed.offer(ev(11))
    assert feed.gap() == 11


def test_note_creates_a_gap_and_never_lowers_known() -> None:
    feed = Feed(5)
    feed.note(5)
    assert feed.gap() is None
    feed.note(7)
    assert (feed.known, feed.gap()) == (7, 5)
    feed.note(3)
    assert feed.known == 7
    assert seqs(feed.offer(ev(6)) + feed.offer(ev(7))) == [6, 7]
    assert feed.gap() is None


def test_a_feed_not_started_holds_everything_until_started() -> None:
    feed = Feed(None)
    for seq in (3, 1, 4, 3):
        assert feed.offer(ev(seq)) == []
    feed.note(6)
    assert (feed.started, feed.gap()) == (False, None)  # nothing to fetch before the start is known
    assert seqs(feed.start(2)) == [3, 4]  # 1 is before the start: not wanted
    assert (feed.started, feed.last, feed.gap()) == (True, 4, 4)
    assert feed.start(0) == []  # started once only
    assert feed.last == 4


def test_a_feed_started_at_zero_delivers_from_one() -> None:
    feed = Feed(None)
    feed.offer(ev(2))
    feed.offer(ev(1))
    assert seqs(feed.start(0)) == [1, 2]


def test_skip_to_releases_held_events_after_a_pruned_range() -> None:
    feed = Feed()
    for seq in (5, 6, 8):
        feed.offer(ev(seq))
    assert seqs(feed.skip_to(4)) == [5, 6]
    assert (feed.last, feed.gap()) == (6, 6)
    assert feed.skip_to(2) == []  # behind us already: nothing changes
    assert feed.last == 6
    assert seqs(feed.skip_to(7)) == [8]
    assert (feed.last, feed.gap()) == (8, None)
    assert feed.offer(ev(7)) == []  # a straggler of the skipped range


# -- ClientCore.accept --------------------------------------------------------------------


def test_accept_delivers_through_the_rooms_feed(core: ClientCore) -> None:
    assert core.accept(ev(2)) == []
    assert seqs(core.accept(ev(1))) == [1, 2]
    assert core.accept(ev(1)) == []
    assert core.feeds["general"].last == 2


def test_accept_drops_events_of_rooms_not_joined(core: ClientCore) -> None:
    assert core.accept(ev(1, "elsewhere")) == []
    assert core.accept(tick(9, "elsewhere")) == []
    assert core.accept(Event(EventKind.JOIN, "elsewhere", "bob", "", NOW, 1)) == []
    assert "elsewhere" not in core.feeds


def test_accept_drops_events_of_a_room_left(core: ClientCore) -> None:
    core.accept(ev(1))
    core.receive_reply(encode(Left(3, "general")))
    assert "general" not in core.feeds
    assert core.accept(ev(2)) == []


def test_accept_consumes_ticks(core: ClientCore) -> None:
    assert core.accept(tick(4)) == []
    assert core.feeds["general"].gap() == 0
    assert core.accept(tick(2, None)) == []  # the DM inbox's tick, on the private topic
    assert core.feeds[DM].gap() == 0
    assert core.accept(tick(1, "general")) == []
    assert core.feeds["general"].known == 4


@pytest.mark.parametrize(
    "event",
    [
        Event(EventKind.JOIN, "general", "carol", "", NOW, 1),
        Event(EventKind.LEAVE, "general", "carol", "quit", NOW, 2),
        Event(EventKind.NICK, "general", "carol", "", NOW, 3, nick="caroline"),
    ],
)
def test_accept_passes_join_leave_and_nick_through(core: ClientCore, event: Event) -> None:
    assert core.accept(event) == [event]
    assert core.accept(event) == [event]  # not sequenced: nothing to deduplicate by
    assert core.feeds["general"].last == 0


def test_accept_dms_through_the_inbox_feed(core: ClientCore) -> None:
    assert core.accept(ev(2, None)) == []
    assert seqs(core.accept(ev(1, None))) == [1, 2]
    assert core.accept(ev(2, None)) == []


def test_accept_without_a_feed_delivers_as_is() -> None:
    core = ClientCore()  # no welcome yet, so no inbox feed
    assert core.accept(ev(9, None)) == [ev(9, None)]


@pytest.mark.parametrize(("history", "released", "gap"), [(0, [5, 6], None), (2, [3], 3), (9, [], 0)])
def test_events_racing_the_join_are_held_until_the_feed_opens(
    core: ClientCore, history: int, released: list[int], gap: int | None
) -> None:
    receive_joined(core, "dev", 4)
    for seq in (6, 3, 5):  # live, before the front end has opened the feed
        assert core.accept(ev(seq, "dev")) == []
    assert core.feeds["dev"].gap() is None
    assert seqs(core.open_feed("dev", 4, history)) == released
    assert core.feeds["dev"].gap() == gap


# -- ClientCore.accept_history ------------------------------------------------------------


def test_accept_history_delivers_a_page_in_order(core: ClientCore) -> None:
    core.accept(ev(4))
    assert seqs(core.accept_history("general", 0, page(1, 3, 5, more=True))) == [1, 2, 3, 4]
    assert core.feeds["general"].gap() == 4
    assert seqs(core.accept_history("general", 4, page(5, 5, 5))) == [5]
    assert core.feeds["general"].gap() is None


def test_accept_history_with_a_stale_after_drops_what_was_delivered(core: ClientCore) -> None:
    for seq in (1, 2, 3, 4, 5):
        core.accept(ev(seq))
    assert seqs(core.accept_history("general", 2, page(3, 7, 7))) == [6, 7]


def test_accept_history_page_starting_later_skips_the_pruned_range(core: ClientCore) -> None:
    feed = joined(core, "big", 10)
    assert feed.gap() == 0
    core.accept(ev(10, "big"))  # live, held
    assert seqs(core.accept_history("big", 0, page(6, 8, 10, "big", more=True))) == [6, 7, 8]
    assert feed.gap() == 8
    assert seqs(core.accept_history("big", 8, page(9, 9, 10, "big"))) == [9, 10]
    assert feed.gap() is None


def test_accept_history_empty_page_with_a_higher_seq_skips_everything(core: ClientCore) -> None:
    core.accept(tick(6))
    core.accept(ev(7))  # live, held: 1..6 were pruned before we asked
    assert seqs(core.accept_history("general", 0, page(1, 0, 6))) == [7]
    assert (core.feeds["general"].last, core.feeds["general"].gap()) == (7, None)


def test_accept_history_empty_page_without_news_changes_nothing(core: ClientCore) -> None:
    for seq in (1, 2, 3):
        core.accept(ev(seq))
    core.accept(tick(5))  # seq 5 may exist; the broker says its last committed is 3
    assert core.accept_history("general", 3, page(4, 3, 3)) == []
    assert core.feeds["general"].gap() == 3  # still waiting: a later tick or message will tell


def test_accept_history_of_the_dm_inbox(core: ClientCore) -> None:
    core.accept(ev(3, None))
    assert seqs(core.accept_history(DM, 0, page(1, 2, 3, None))) == [1, 2, 3]


def test_accept_history_without_a_feed_is_ignored(core: ClientCore) -> None:
    assert core.accept_history("nowhere", 0, page(1, 3, 3, "nowhere")) == []


# -- ClientCore.open_feed -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("seq", "history", "last", "gap"),
    [(120, 50, 70, 70), (3, 50, 0, 0), (0, 50, 0, None), (9, 0, 9, None)],
)
def test_open_feed_starts_history_messages_back(
    core: ClientCore, seq: int, history: int, last: int, gap: int | None
) -> None:
    feed = joined(core, "dev", seq, history)
    assert core.feeds["dev"] is feed
    assert (feed.last, feed.known, feed.gap()) == (last, seq, gap)


def test_open_feed_keeps_an_existing_feeds_position_on_rejoin(core: ClientCore) -> None:
    for seq in (1, 2, 3, 4):
        core.accept(ev(seq))
    before = core.feeds["general"]
    after = joined(core, "general", 9, 50)  # reconnected: 5..9 happened meanwhile
    assert after is before
    assert (after.last, after.gap()) == (4, 4)
    assert joined(core, "general", 9, 0).last == 4  # history 0 does not skip what was missed


def test_welcome_opens_the_inbox_feed_and_a_resume_keeps_it(core: ClientCore) -> None:
    fresh = ClientCore()
    fresh.receive_reply(encode(Welcome(1, "ann", TOPIC, "", 5.0, 15.0, "x" * 16, 3)))
    assert (fresh.feeds[DM].last, fresh.feeds[DM].gap()) == (3, None)
    core.accept(ev(1, None))
    core.receive_reply(encode(Welcome(9, "ann", TOPIC, "", 5.0, 15.0, "x" * 16, 6, True)))
    assert (core.feeds[DM].last, core.feeds[DM].gap()) == (1, 1)


# -- the property -------------------------------------------------------------------------


def drive(data: st.DataObject, n: int, pruned: int) -> list[int]:
    """Events 1..n of #general arrive live (shuffled, duplicated), by pages and by ticks.

    The room is joined when its last seq is ``at_join``; live events may arrive before the
    front end opens the feed (asking for history back to seq 1).

    Seqs up to ``pruned`` are gone from the broker's store: pages never hold them. A page
    answers ``after`` as the broker would have when it was asked (its last committed seq
    then being ``top``), and may arrive after later pages or live events.
    """
    core = ClientCore()
    core.receive_reply(encode(Welcome(1, "ann", TOPIC, "", 5.0, 15.0, "x" * 16, 0)))
    at_join = data.draw(st.integers(0, n), label="seq at join")
    receive_joined(core, "general", at_join)
    feed = core.feeds["general"]
    extra = data.draw(st.lists(st.integers(1, n), max_size=n), label="duplicates")
    live: list[int] = data.draw(st.permutations([*range(1, n + 1), *extra]), label="live order")
    if pruned:  # what was pruned may or may not have arrived live before
        live = [s for s in live if s > pruned or data.draw(st.booleans(), label=f"live {s}")]
    in_flight: list[tuple[int, HistoryPage]] = []
    out: list[Event] = []

    def open_feed() -> None:
        out.extend(core.open_feed("general", at_join, at_join))  # history reaches back to 1

    def fetch(top: int | None = None) -> None:
        after = feed.last  # a front end asks from feed.gap(), which is feed.last
        if top is None:
            top = data.draw(st.integers(max(after, pruned), n), label="top")
        limit = data.draw(st.integers(1, 5), label="limit")
        start = max(after, pruned) + 1
        last = min(start + limit - 1, top)
        in_flight.append((after, page(start, last, top, more=last - start + 1 == limit)))

    def arrive() -> None:
        after, reply = in_flight.pop(data.draw(st.integers(0, len(in_flight) - 1), label="which page"))
        out.extend(core.accept_history("general", after, reply))

    for _ in range(3 * (len(live) + 5)):
        step = data.draw(st.integers(0, 5), label="step")
        if step <= 1 and live:
            out.extend(core.accept(ev(live.pop(0))))
        elif step == 5 and not feed.started:
            open_feed()
        elif step == 2 and feed.started:  # a front end fetches once the feed is open
            fetch()
        elif step == 3 and in_flight:
            arrive()
        elif step == 4:
            out.extend(core.accept(tick(data.draw(st.integers(0, n), label="tick"))))
    if not feed.started:
        open_feed()
    while live:
        out.extend(core.accept(ev(live.pop(0))))
    while in_flight:
        arrive()
    for _ in range(n + 1):  # what a front end's fill loop does until nothing is missing
        if feed.gap() is None:
            break
        fetch(top=n)
        arrive()
    assert feed.gap() is None
    assert all(e == ev(e.seq or 0) for e in out)
    return seqs(out)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(data=st.data(), n=st.integers(1, 25))
def test_every_event_is_delivered_once_in_order(data: st.DataObject, n: int) -> None:
    assert drive(data, n, 0) == list(range(1, n + 1))


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(data=st.data(), n=st.integers(1, 25), pruned_fraction=st.floats(0, 1))
def test_after_pruning_delivery_is_in_order_and_complete_above_the_pruned(
    data: st.DataObject, n: int, pruned_fraction: float
) -> None:
    pruned = int(n * pruned_fraction)
    delivered = drive(data, n, pruned)
    assert delivered == sorted(set(delivered))  # in order, each once
    assert [s for s in delivered if s > pruned] == list(range(pruned + 1, n + 1))
