"""The message stores: one set of behavioural tests run over MemoryStore and SqliteStore.

Then what only SqliteStore promises (durability across a reopen, WAL, ``synchronous``, the
size quota, read-only export connections), and a property test that the two stores agree
on every page after any interleaving of staging, commits and failed commits.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zchat.broker.store import (
    _DELETE_RANGE,
    _FIRST_NEWER,
    _OLDEST,
    Durability,
    MemoryStore,
    RoomAcl,
    SqliteStore,
    Store,
    StoredMessage,
    StoreError,
    export_room,
    open_history,
)

T0 = 1_700_000_000.0
ROOM = "r:general"
OTHER = "r:dev"
INBOX = "d:0123456789abcdef0123456789abcdef"
#: Text that needs pages of its own: SQLite must grow the file to store it.
BIG = "x" * 64 * 1024
#: A quota no test reaches (SQLite's default is about as large).
NO_QUOTA = 2**30


def msg(
    channel: str,
    seq: int,
    *,
    id: int | None = None,
    ts: float | None = None,
    text: str | None = None,
    client: str | None = None,
    cmid: str | None = None,
) -> StoredMessage:
    """A room message (or, for an inbox channel, a DM) with defaults derived from ``seq``."""
    room = channel[2:] if channel.startswith("r:") else None
    return StoredMessage(
        channel,
        seq,
        id if id is not None else seq,
        ts if ts is not None else T0 + seq,
        "message" if room is not None else "dm",
        room,
        "ann",
        text if text is not None else f"message {seq}",
        None if room is not None else "bob",
        client,
        cmid,
    )


def fill(store: Store, channel: str, first: int, last: int, *, id_base: int = 0, ts_base: float = T0) -> None:
    """Stage and commit messages ``first..last`` of ``channel`` (ids and ts offset by seq)."""
    for seq in range(first, last + 1):
        store.add(msg(channel, seq, id=id_base + seq, ts=ts_base + seq))
    store.commit()


def seqs(messages: list[StoredMessage]) -> list[int]:
    return [m.seq for m in messages]


def everything(store: Store, channel: str) -> list[StoredMessage]:
    return store.page(channel, before=None, after=0, limit=1_000_000)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Each behavioural test runs once per store."""
    made: Store = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / SqliteStore.FILENAME)
    yield made
    made.close()


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / SqliteStore.FILENAME


# -- the Store behaviour, for both ----------------------------------------------------------


def test_a_new_store_is_empty(store: Store) -> None:
    assert store.last_seq(ROOM) == 0
    assert store.last_seq(INBOX) == 0
    assert store.last_id() == 0
    assert store.page(ROOM, before=None, after=None, limit=10) == []
    assert store.find_cmid("client", "cmid") is None
    assert store.commit() == 0


def test_commit_makes_messages_visible(store: Store) -> None:
    first, second = msg(ROOM, 1, id=10), msg(ROOM, 2, id=11, client="c1", cmid="m2")
    store.add(first)
    store.add(second)
    assert store.commit() == 2
    assert store.page(ROOM, before=None, after=None, limit=10) == [first, second]
    assert store.last_seq(ROOM) == 2
    assert store.last_id() == 11
    assert store.last_seq(OTHER) == 0  # channels count separately


def test_staged_messages_are_invisible_before_commit(store: Store) -> None:
    fill(store, ROOM, 1, 2)
    store.add(msg(ROOM, 3, id=99, client="c1", cmid="m3"))
    store.add(msg(INBOX, 1, id=99))
    assert seqs(everything(store, ROOM)) == [1, 2]
    assert store.page(INBOX, before=None, after=None, limit=10) == []
    assert store.last_seq(ROOM) == 2
    assert store.last_seq(INBOX) == 0
    assert store.last_id() == 2
    assert store.find_cmid("c1", "m3") is None
    assert store.commit() == 2
    assert seqs(everything(store, ROOM)) == [1, 2, 3]
    assert store.find_cmid("c1", "m3") is not None


def test_commit_counts_only_what_was_staged_since_the_last(store: Store) -> None:
    store.add(msg(ROOM, 1))
    assert store.commit() == 1
    assert store.commit() == 0
    store.add(msg(ROOM, 2))
    store.add(msg(OTHER, 1))
    assert store.commit() == 2


def test_page_after_is_oldest_first_with_limit(store: Store) -> None:
    fill(store, ROOM, 1, 10)
    assert seqs(store.page(ROOM, before=None, after=0, limit=3)) == [1, 2, 3]
    assert seqs(store.page(ROOM, before=None, after=4, limit=3)) == [5, 6, 7]
    assert seqs(store.page(ROOM, before=None, after=8, limit=3)) == [9, 10]
    assert store.page(ROOM, before=None, after=10, limit=3) == []
    assert store.page(ROOM, before=None, after=0, limit=0) == []


def test_page_before_is_the_newest_page_below_in_ascending_order(store: Store) -> None:
    fill(store, ROOM, 1, 10)
    assert seqs(store.page(ROOM, before=8, after=None, limit=3)) == [5, 6, 7]
    assert seqs(store.page(ROOM, before=3, after=None, limit=5)) == [1, 2]
    assert store.page(ROOM, before=1, after=None, limit=5) == []
    assert store.page(ROOM, before=8, after=None, limit=0) == []


def test_page_without_bounds_is_the_newest(store: Store) -> None:
    fill(store, ROOM, 1, 10)
    fill(store, OTHER, 1, 3, id_base=100)
    assert seqs(store.page(ROOM, before=None, after=None, limit=4)) == [7, 8, 9, 10]
    assert seqs(store.page(ROOM, before=None, after=None, limit=50)) == list(range(1, 11))
    assert [m.channel for m in store.page(OTHER, before=None, after=None, limit=50)] == [OTHER] * 3


def test_find_cmid_matches_client_and_cmid(store: Store) -> None:
    mine = msg(ROOM, 1, client="c1", cmid="m1")
    store.add(mine)
    store.add(msg(ROOM, 2, client="c2", cmid="m2"))
    store.add(msg(INBOX, 1, id=3, client="c1", cmid="dm1"))
    store.add(msg(INBOX, 2, id=4))  # a recipient's copy: no client, no cmid
    store.commit()
    assert store.find_cmid("c1", "m1") == mine
    found = store.find_cmid("c1", "dm1")
    assert found is not None and (found.channel, found.seq, found.id) == (INBOX, 1, 3)
    assert store.find_cmid("c2", "m1") is None  # another client's cmid space
    assert store.find_cmid("c1", "m2") is None
    assert store.find_cmid("c1", "nope") is None


def test_prune_keeps_the_newest_per_channel(store: Store) -> None:
    fill(store, ROOM, 1, 10)
    fill(store, OTHER, 1, 2, id_base=100)
    assert store.prune(T0 + 100, 3, None, 1000) == 7
    assert seqs(everything(store, ROOM)) == [8, 9, 10]
    assert seqs(everything(store, OTHER)) == [1, 2]
    assert store.prune(T0 + 100, 3, None, 1000) == 0


def test_prune_by_age(store: Store) -> None:
    fill(store, ROOM, 1, 10)  # ts = T0 + seq
    fill(store, OTHER, 1, 3, id_base=100, ts_base=T0 + 100)
    assert store.prune(T0 + 20, 1000, 14.5, 1000) == 5  # cutoff T0 + 5.5
    assert seqs(everything(store, ROOM)) == [6, 7, 8, 9, 10]
    assert seqs(everything(store, OTHER)) == [1, 2, 3]


def test_prune_respects_its_budget(store: Store) -> None:
    fill(store, ROOM, 1, 10)
    fill(store, OTHER, 1, 10, id_base=100)
    passes = []
    while removed := store.prune(T0 + 100, 2, None, 3):
        assert removed <= 3
        passes.append(removed)
    assert sum(passes) == 16
    assert seqs(everything(store, ROOM)) == [9, 10]
    assert seqs(everything(store, OTHER)) == [9, 10]
    passes.clear()
    while removed := store.prune(T0 + 100, 2, 50.0, 1):  # every message is older than T0 + 50
        passes.append(removed)
    assert passes == [1, 1, 1, 1]
    assert everything(store, ROOM) == everything(store, OTHER) == []


def test_prune_forgets_the_cmids_of_what_it_deletes(store: Store) -> None:
    store.add(msg(ROOM, 1, client="c1", cmid="old"))
    store.add(msg(ROOM, 2, client="c1", cmid="new"))
    store.commit()
    store.prune(T0 + 100, 1, None, 1000)
    assert store.find_cmid("c1", "old") is None
    assert store.find_cmid("c1", "new") is not None


def test_seqs_are_never_reused_after_pruning_everything(store: Store) -> None:
    fill(store, ROOM, 1, 5)
    assert store.prune(T0 + 100, 0, None, 1000) == 5
    assert everything(store, ROOM) == []
    assert store.last_seq(ROOM) == 5
    assert store.last_id() == 5
    store.add(msg(ROOM, store.last_seq(ROOM) + 1))
    store.commit()
    assert seqs(everything(store, ROOM)) == [6]
    assert store.last_seq(ROOM) == 6


def test_close_drops_what_is_staged(tmp_path: Path) -> None:
    path = tmp_path / SqliteStore.FILENAME
    for store in (MemoryStore(), SqliteStore(path)):
        store.add(msg(ROOM, 1))
        store.close()
    reopened = SqliteStore(path)
    assert reopened.last_seq(ROOM) == 0
    reopened.close()


def test_memory_store_failing_commit_writes_nothing() -> None:
    store = MemoryStore()
    fill(store, ROOM, 1, 2)
    store.fail_commits = True
    assert store.commit() == 0  # nothing staged: nothing to fail
    store.add(msg(ROOM, 3, client="c1", cmid="m3"))
    with pytest.raises(StoreError):
        store.commit()
    assert (store.last_seq(ROOM), store.last_id()) == (2, 2)
    assert store.find_cmid("c1", "m3") is None
    store.fail_commits = False
    assert store.commit() == 0  # the failed batch is gone, not retried
    store.add(msg(ROOM, 3))
    assert store.commit() == 1
    assert seqs(everything(store, ROOM)) == [1, 2, 3]


# -- SqliteStore only ---------------------------------------------------------------------


def test_sqlite_creates_its_directory_and_survives_a_reopen(sqlite_path: Path) -> None:
    store = SqliteStore(sqlite_path)
    dm = msg(INBOX, 1, id=50, client="c1", cmid="dm1")
    fill(store, ROOM, 1, 3, id_base=10)
    store.add(dm)
    store.commit()
    store.close()

    again = SqliteStore(sqlite_path)
    assert again.last_seq(ROOM) == 3
    assert again.last_seq(INBOX) == 1
    assert again.last_id() == 50
    assert seqs(everything(again, ROOM)) == [1, 2, 3]
    assert again.page(INBOX, before=None, after=None, limit=5) == [dm]
    assert again.find_cmid("c1", "dm1") == dm
    again.close()


def test_sqlite_keeps_last_seq_and_last_id_across_a_reopen_after_pruning(sqlite_path: Path) -> None:
    store = SqliteStore(sqlite_path)
    fill(store, ROOM, 1, 4, id_base=20)
    store.prune(T0 + 100, 0, None, 1000)
    store.close()
    again = SqliteStore(sqlite_path)
    assert everything(again, ROOM) == []
    assert again.last_seq(ROOM) == 4
    assert again.last_id() == 24
    again.close()


def test_sqlite_prunes_by_count_after_a_reopen(sqlite_path: Path) -> None:
    """Channels not written to since the reopen are pruned too (the limit may have changed)."""
    store = SqliteStore(sqlite_path)
    fill(store, ROOM, 1, 10)
    store.close()
    again = SqliteStore(sqlite_path)
    try:
        assert again.prune(T0 + 100, 3, None, 1000) == 7
        assert seqs(everything(again, ROOM)) == [8, 9, 10]
    finally:
        again.close()


def test_sqlite_prunes_by_age_a_slice_of_channels_per_pass(
    sqlite_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention by age visits AGE_CHANNELS channels a pass, in name order, wrapping
    around; a pass that runs out of budget in a channel starts the next one there."""
    monkeypatch.setattr(SqliteStore, "AGE_CHANNELS", 3)
    store = SqliteStore(sqlite_path)
    try:
        channels = [f"r:room{n}" for n in range(7)]
        for n, channel in enumerate(channels):
            fill(store, channel, 1, 4, id_base=10 * n)  # ts T0 + 1 .. T0 + 4
        fill(store, "r:fresh", 1, 4, id_base=100, ts_base=T0 + 50)  # none of it old
        cutoff_age = 100 - 2.5  # now T0 + 100: seqs 1 and 2 of the old channels are old
        # 14 old messages, 5 a pass at most, 3 of 8 channels a pass: two laps are plenty.
        passes = [store.prune(T0 + 100, 1000, cutoff_age, 5) for _ in range(8)]
        assert max(passes) <= 5 and sum(passes) == 2 * len(channels)
        for channel in channels:
            assert seqs(everything(store, channel)) == [3, 4]
        assert seqs(everything(store, "r:fresh")) == [1, 2, 3, 4]
    finally:
        store.close()


def test_sqlite_prune_by_age_goes_through_the_primary_key(sqlite_path: Path) -> None:
    """No full scan and no index on ts: each query of a pass is a primary-key search."""
    store = SqliteStore(sqlite_path)
    try:
        fill(store, ROOM, 1, 3)
        for query, args in ((_OLDEST, (ROOM,)), (_FIRST_NEWER, (ROOM, 1, 10, T0)), (_DELETE_RANGE, (ROOM, 1, 2))):
            plan = " ".join(str(row[-1]) for row in store._db.execute("EXPLAIN QUERY PLAN " + query, args))
            assert "SCAN" not in plan and "USING PRIMARY KEY" in plan, (query, plan)
    finally:
        store.close()


def test_prune_by_age_stops_at_the_first_message_that_is_not_old(store: Store) -> None:
    """A wall clock stepped back leaves an old message behind a newer one: retention takes
    the old prefix only, in both stores (seqs stay contiguous from the first kept)."""
    for seq, ts in enumerate((1.0, 2.0, 50.0, 3.0, 4.0), start=1):
        store.add(msg(ROOM, seq, id=seq, ts=T0 + ts))
    store.commit()
    assert store.prune(T0 + 100, 1000, 100 - 10, 1000) == 2  # cutoff T0 + 10
    assert seqs(everything(store, ROOM)) == [3, 4, 5]


def test_sqlite_uses_wal(sqlite_path: Path) -> None:
    store = SqliteStore(sqlite_path)
    fill(store, ROOM, 1, 1)
    reader = open_history(sqlite_path)
    try:
        assert reader.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        reader.close()
        store.close()


@pytest.mark.parametrize(
    ("durability", "level"),
    [(Durability.OFF, 0), (Durability.NORMAL, 1), (Durability.FULL, 2)],
)
def test_sqlite_durability_is_pragma_synchronous(sqlite_path: Path, durability: Durability, level: int) -> None:
    store = SqliteStore(sqlite_path, durability)
    try:
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == level
    finally:
        store.close()


def test_sqlite_default_durability_is_normal(sqlite_path: Path) -> None:
    store = SqliteStore(sqlite_path)
    try:
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 1
    finally:
        store.close()


def test_sqlite_quota_fails_the_commit_and_writes_nothing(sqlite_path: Path) -> None:
    store = SqliteStore(sqlite_path)
    fill(store, ROOM, 1, 2)
    store.set_max_pages(store.page_count())
    store.add(msg(ROOM, 3, id=30, text=BIG, client="c1", cmid="m3"))
    store.add(msg(INBOX, 1, id=31))
    with pytest.raises(StoreError):
        store.commit()
    assert seqs(everything(store, ROOM)) == [1, 2]
    assert store.page(INBOX, before=None, after=None, limit=5) == []
    assert (store.last_seq(ROOM), store.last_seq(INBOX), store.last_id()) == (2, 0, 2)
    assert store.find_cmid("c1", "m3") is None

    store.set_max_pages(NO_QUOTA)
    assert store.commit() == 0  # the failed batch was cleared, not kept for later
    store.add(msg(ROOM, 3, id=30, text=BIG))
    assert store.commit() == 1
    assert seqs(everything(store, ROOM)) == [1, 2, 3]
    assert store.last_id() == 30
    store.close()


def test_sqlite_quota_given_to_the_constructor(sqlite_path: Path) -> None:
    probe = SqliteStore(sqlite_path)
    pages = probe.page_count()
    probe.close()
    store = SqliteStore(sqlite_path, max_pages=pages)
    store.add(msg(ROOM, 1, text=BIG))
    with pytest.raises(StoreError):
        store.commit()
    assert store.last_seq(ROOM) == 0
    store.close()


def test_read_only_history_connection_sees_committed_data(sqlite_path: Path) -> None:
    store = SqliteStore(sqlite_path)
    fill(store, ROOM, 1, 3)
    store.add(msg(ROOM, 4))  # staged only
    reader = open_history(sqlite_path)
    try:
        rows = reader.execute("SELECT seq, text FROM messages WHERE channel = ? ORDER BY seq", (ROOM,)).fetchall()
        assert rows == [(1, "message 1"), (2, "message 2"), (3, "message 3")]
        with pytest.raises(sqlite3.OperationalError):
            reader.execute("DELETE FROM messages")
        store.commit()
        assert reader.execute("SELECT max(seq) FROM messages").fetchone()[0] == 4
    finally:
        reader.close()
        store.close()


# -- MemoryStore and SqliteStore agree ----------------------------------------------------

CHANNELS = (ROOM, OTHER, INBOX)

Op = tuple[str, int]  # ("add", channel index) | ("commit", 0) | ("fail", 0)

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, len(CHANNELS) - 1)),
        st.tuples(st.sampled_from(["commit", "fail"]), st.just(0)),
    ),
    max_size=40,
)


def fail_commit(store: Store, staged: bool) -> None:
    """Make ``store``'s next commit fail the way it would in production, and check it did."""
    if isinstance(store, MemoryStore):
        store.fail_commits = True
        if staged:
            with pytest.raises(StoreError):
                store.commit()
        else:
            assert store.commit() == 0  # nothing to write, nothing to fail
        store.fail_commits = False
    else:
        assert isinstance(store, SqliteStore)
        store.set_max_pages(store.page_count())
        store.add(msg("r:poison", 1, text=BIG))  # never fits: the batch fails even if small
        with pytest.raises(StoreError):
            store.commit()
        store.set_max_pages(NO_QUOTA)


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=ops)
def test_memory_and_sqlite_agree(tmp_path_factory: pytest.TempPathFactory, ops: list[Op]) -> None:
    memory = MemoryStore()
    sqlite = SqliteStore(tmp_path_factory.mktemp("agree") / SqliteStore.FILENAME)
    stores: tuple[Store, Store] = (memory, sqlite)
    # What a broker core does: seqs and ids handed out per staged message, seqs given back on failure.
    handed = dict.fromkeys(CHANNELS, 0)
    committed = dict(handed)
    next_id = 0
    try:
        for op, index in ops:
            if op == "add":
                channel = CHANNELS[index]
                handed[channel] += 1
                next_id += 1
                message = msg(channel, handed[channel], id=next_id, client="c", cmid=f"m{next_id}")
                for store in stores:
                    store.add(message)
            elif op == "commit":
                assert memory.commit() == sqlite.commit()
                committed = dict(handed)
            else:
                for store in stores:
                    fail_commit(store, handed != committed)
                handed = dict(committed)
            for channel in CHANNELS:
                assert memory.last_seq(channel) == sqlite.last_seq(channel) == committed[channel]
                for before, after, limit in ((None, None, 5), (None, 0, 100), (3, None, 2), (None, 2, 3)):
                    assert memory.page(channel, before=before, after=after, limit=limit) == sqlite.page(
                        channel, before=before, after=after, limit=limit
                    )
            assert memory.last_id() == sqlite.last_id()
            for cmid in range(1, next_id + 1):
                assert memory.find_cmid("c", f"m{cmid}") == sqlite.find_cmid("c", f"m{cmid}")
        assert memory.page("r:poison", before=None, after=None, limit=5) == []
        assert sqlite.page("r:poison", before=None, after=None, limit=5) == []
    finally:
        memory.close()
        sqlite.close()


# -- nick ownership and private rooms ---------------------------------------------------------

ANN_KEY = "A" * 40
BOB_KEY = "B" * 40


def acl(name: str = "secret", *, subject: str = "") -> RoomAcl:
    return RoomAcl(name, ANN_KEY, T0, {ANN_KEY, BOB_KEY}, {ANN_KEY}, {"C" * 40}, subject)


def test_a_new_store_has_no_nicks_or_rooms(store: Store) -> None:
    assert store.nick_owner("ann") is None
    assert store.nicks_owned(ANN_KEY) == 0
    assert store.private_rooms() == {}


def test_registered_nicks_are_read_back_staged_and_committed(store: Store) -> None:
    store.register_nick("ann", ANN_KEY, "Ann", T0)
    store.register_nick("annie", ANN_KEY, "Annie", T0 + 1)
    store.register_nick("bob", BOB_KEY, "bob", T0 + 2)
    assert (store.nick_owner("ann"), store.nick_owner("bob"), store.nick_owner("carol")) == (ANN_KEY, BOB_KEY, None)
    assert (store.nicks_owned(ANN_KEY), store.nicks_owned(BOB_KEY), store.nicks_owned("C" * 40)) == (2, 1, 0)
    assert store.commit() == 0  # no messages, but the registrations are written
    assert (store.nick_owner("ann"), store.nick_owner("bob"), store.nick_owner("carol")) == (ANN_KEY, BOB_KEY, None)
    assert (store.nicks_owned(ANN_KEY), store.nicks_owned(BOB_KEY)) == (2, 1)
    store.register_nick("ann", ANN_KEY, "ANN", T0 + 3)  # the same owner again: still one key
    assert store.nicks_owned(ANN_KEY) == 2
    assert (store.registered_nick("ann"), store.registered_nick("carol")) == ((ANN_KEY, "ANN"), None)  # staged
    store.commit()
    assert (store.registered_nick("ann"), store.registered_nick("bob")) == ((ANN_KEY, "ANN"), (BOB_KEY, "bob"))


def test_registering_a_nick_again_moves_it_to_the_new_owner(store: Store) -> None:
    store.register_nick("ann", ANN_KEY, "ann", T0)
    store.commit()
    store.register_nick("ann", BOB_KEY, "ann", T0 + 1)
    assert store.nick_owner("ann") == BOB_KEY  # staged already
    assert (store.nicks_owned(ANN_KEY), store.nicks_owned(BOB_KEY)) == (0, 1)
    store.commit()
    assert store.nick_owner("ann") == BOB_KEY
    assert (store.nicks_owned(ANN_KEY), store.nicks_owned(BOB_KEY)) == (0, 1)


def test_saved_rooms_are_read_back_staged_and_committed(store: Store) -> None:
    room = acl()
    store.save_room(room)
    assert store.private_rooms() == {"secret": acl()}
    room.members.add("D" * 40)  # the store keeps what was saved, not the caller's object
    room.subject = "changed"
    assert store.private_rooms() == {"secret": acl()}
    assert store.commit() == 0
    loaded = store.private_rooms()
    assert loaded == {"secret": acl()}
    loaded["secret"].banned.clear()  # nor does it hand out its own
    assert store.private_rooms() == {"secret": acl()}
    store.save_room(room)  # an upsert
    store.save_room(acl("other", subject="hush"))
    assert store.private_rooms() == {"secret": room, "other": acl("other", subject="hush")}
    store.commit()
    assert store.private_rooms() == {"secret": room, "other": acl("other", subject="hush")}


def test_nicks_and_rooms_commit_with_the_turns_messages(store: Store) -> None:
    store.add(msg(ROOM, 1))
    store.register_nick("ann", ANN_KEY, "ann", T0)
    store.save_room(acl())
    assert store.commit() == 1  # counts the messages only
    assert seqs(everything(store, ROOM)) == [1]
    assert store.nick_owner("ann") == ANN_KEY
    assert store.private_rooms() == {"secret": acl()}
    assert store.commit() == 0


def test_a_failed_commit_keeps_nicks_and_rooms_for_the_next(store: Store) -> None:
    fill(store, ROOM, 1, 1)
    store.add(msg(ROOM, 2))
    store.register_nick("ann", ANN_KEY, "ann", T0)
    store.save_room(acl())
    fail_commit(store, True)
    assert seqs(everything(store, ROOM)) == [1]  # the message is gone: the core sequences it again
    assert store.nick_owner("ann") == ANN_KEY  # still staged, still read
    assert store.private_rooms() == {"secret": acl()}
    fail_commit(store, True)  # with nothing but them staged (and a poison message in SQLite)
    assert store.commit() == 0  # written now
    assert store.nick_owner("ann") == ANN_KEY
    assert store.private_rooms() == {"secret": acl()}
    assert seqs(everything(store, ROOM)) == [1]


def test_memory_store_failing_commit_of_only_nicks_and_rooms() -> None:
    store = MemoryStore()
    store.fail_commits = True
    store.register_nick("ann", ANN_KEY, "ann", T0)
    with pytest.raises(StoreError):
        store.commit()
    store.fail_commits = False
    store.save_room(acl())
    assert store.commit() == 0
    store.fail_commits = True
    assert store.commit() == 0  # nothing staged any more: nothing to fail
    assert (store.nick_owner("ann"), list(store.private_rooms())) == (ANN_KEY, ["secret"])


def test_close_drops_staged_nicks_and_rooms(tmp_path: Path) -> None:
    path = tmp_path / SqliteStore.FILENAME
    for store in (MemoryStore(), SqliteStore(path)):
        store.register_nick("ann", ANN_KEY, "ann", T0)
        store.save_room(acl())
        store.close()
    reopened = SqliteStore(path)
    assert (reopened.nick_owner("ann"), reopened.private_rooms()) == (None, {})
    reopened.close()


def test_sqlite_nicks_and_rooms_survive_a_reopen(sqlite_path: Path) -> None:
    store = SqliteStore(sqlite_path)
    store.register_nick("ann", ANN_KEY, "Ann", T0)
    store.register_nick("bob", BOB_KEY, "bob", T0)
    store.save_room(acl())
    store.save_room(RoomAcl("empty", BOB_KEY, T0 + 0.25, set(), set(), set()))
    store.add(msg(ROOM, 1))
    store.commit()
    store.close()

    again = SqliteStore(sqlite_path)
    try:
        assert (again.nick_owner("ann"), again.nick_owner("bob")) == (ANN_KEY, BOB_KEY)
        assert (again.nicks_owned(ANN_KEY), again.nicks_owned(BOB_KEY)) == (1, 1)
        assert again.private_rooms() == {
            "secret": acl(),
            "empty": RoomAcl("empty", BOB_KEY, T0 + 0.25, set(), set(), set()),
        }
        row = again._db.execute("SELECT nick, ts FROM nicks WHERE nkey = 'ann'").fetchone()
        assert row == ("Ann", T0)
        members = again._db.execute("SELECT members FROM private_rooms WHERE name = 'secret'").fetchone()[0]
        assert members == f'["{ANN_KEY}", "{BOB_KEY}"]'  # a sorted JSON array of strings
    finally:
        again.close()
    assert [m.seq for m in export_room(sqlite_path, "general")] == [1]


def test_sqlite_refuses_a_corrupt_room_row(sqlite_path: Path) -> None:
    store = SqliteStore(sqlite_path)
    try:
        store.save_room(acl())
        store.commit()
        store._db.execute("UPDATE private_rooms SET ops = '[1, 2]'")
        with pytest.raises(StoreError, match="secret"):
            store.private_rooms()
        store._db.execute("UPDATE private_rooms SET ops = 'not json'")
        with pytest.raises(StoreError, match="secret"):
            store.private_rooms()
    finally:
        store.close()


#: The schema before nick ownership and private rooms (SCHEMA_VERSION 1).
SCHEMA_1 = """
CREATE TABLE messages (
    channel TEXT NOT NULL, seq INTEGER NOT NULL, id INTEGER NOT NULL, ts REAL NOT NULL,
    kind TEXT NOT NULL, room TEXT, sender TEXT NOT NULL, text TEXT NOT NULL,
    recipient TEXT, client TEXT, cmid TEXT, PRIMARY KEY (channel, seq)
) WITHOUT ROWID;
CREATE INDEX messages_by_cmid ON messages (client, cmid) WHERE cmid IS NOT NULL;
CREATE INDEX messages_by_ts ON messages (ts);
CREATE TABLE channels (channel TEXT PRIMARY KEY, last_seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO meta VALUES ('schema', 1), ('last_id', 7), ('epoch', 12345);
INSERT INTO channels VALUES ('r:general', 7);
INSERT INTO messages VALUES ('r:general', 7, 7, 1700000007.0, 'message', 'general', 'ann', 'hi', NULL, NULL, NULL);
"""


def test_sqlite_opens_a_database_of_schema_1(sqlite_path: Path) -> None:
    sqlite_path.parent.mkdir(parents=True)
    old = sqlite3.connect(sqlite_path)
    old.executescript(SCHEMA_1)
    old.close()
    store = SqliteStore(sqlite_path)
    try:
        assert (store.epoch, store.last_id(), store.last_seq(ROOM)) == (12345, 7, 7)
        assert [m.text for m in everything(store, ROOM)] == ["hi"]
        assert (store.nick_owner("ann"), store.private_rooms()) == (None, {})
        store.register_nick("ann", ANN_KEY, "ann", T0)
        store.save_room(acl())
        assert store.commit() == 0
        assert store._meta("schema") == 3
        indexes = {row[0] for row in store._db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "messages_by_ts" not in indexes  # schema 3: retention by age needs no index
    finally:
        store.close()
    again = SqliteStore(sqlite_path)
    try:
        assert (again.epoch, again.nick_owner("ann"), list(again.private_rooms())) == (12345, ANN_KEY, ["secret"])
    finally:
        again.close()


NICK_KEYS = ("ann", "bob", "carol")
OWNERS = (ANN_KEY, BOB_KEY)
ROOMS = ("secret", "hidden")

acl_ops = st.lists(
    st.one_of(
        st.tuples(st.just("nick"), st.integers(0, len(NICK_KEYS) - 1), st.integers(0, len(OWNERS) - 1)),
        st.tuples(st.just("room"), st.integers(0, len(ROOMS) - 1), st.integers(0, len(OWNERS) - 1)),
        st.tuples(st.sampled_from(["commit", "fail", "message"]), st.just(0), st.just(0)),
    ),
    max_size=30,
)


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=acl_ops)
def test_memory_and_sqlite_agree_on_nicks_and_rooms(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, int]]
) -> None:
    """Any mix of registrations, room saves, messages, commits and failed commits: both stores
    read the same, and what they read is the last thing staged (failures lose none of it)."""
    path = tmp_path_factory.mktemp("acl") / SqliteStore.FILENAME
    memory, sqlite = MemoryStore(), SqliteStore(path)
    stores: tuple[Store, Store] = (memory, sqlite)
    owners: dict[str, str] = {}
    rooms: dict[str, RoomAcl] = {}
    handed = committed = 0  # the room's seqs, as a core hands them out
    staged_acl = False  # nick registrations or room saves staged
    try:
        for step, (op, a, b) in enumerate(ops):
            if op == "nick":
                owners[NICK_KEYS[a]] = OWNERS[b]
                staged_acl = True
            elif op == "room":
                rooms[ROOMS[a]] = RoomAcl(ROOMS[a], OWNERS[b], T0, {OWNERS[b]}, {OWNERS[b]}, set(), f"s{step}")
                staged_acl = True
            elif op == "message":
                handed += 1
            for store in stores:
                if op == "nick":
                    store.register_nick(NICK_KEYS[a], OWNERS[b], NICK_KEYS[a], T0 + step)
                elif op == "room":
                    store.save_room(rooms[ROOMS[a]])
                elif op == "message":
                    store.add(msg(ROOM, handed))
                elif op == "commit":
                    store.commit()
                elif op == "fail":
                    fail_commit(store, staged_acl or handed > committed)
            if op == "commit":
                committed, staged_acl = handed, False
            elif op == "fail":
                handed = committed
            for store in stores:
                assert {nkey: store.nick_owner(nkey) for nkey in NICK_KEYS} == {k: owners.get(k) for k in NICK_KEYS}
                assert [store.nicks_owned(owner) for owner in OWNERS] == [
                    sum(1 for o in owners.values() if o == owner) for owner in OWNERS
                ]
                assert store.private_rooms() == rooms
                assert store.last_seq(ROOM) == committed
        for store in stores:
            store.commit()
        sqlite.close()
        sqlite = SqliteStore(path)
        stores = (memory, sqlite)
        assert {nkey: sqlite.nick_owner(nkey) for nkey in NICK_KEYS} == {k: owners.get(k) for k in NICK_KEYS}
        assert sqlite.private_rooms() == memory.private_rooms() == rooms
    finally:
        memory.close()
        sqlite.close()


# -- background checkpoints -------------------------------------------------------------------


def test_a_checkpoint_is_due_after_enough_bytes_or_when_the_oldest_write_is_old(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "z.sqlite3")
    try:
        assert not store._checkpoint_due(1e9)
        store.add(msg(ROOM, 1))
        store.commit()
        since = store._unchecked_since
        assert not store._checkpoint_due(since + store.CHECKPOINT_MAX_AGE / 2)
        assert store._checkpoint_due(since + store.CHECKPOINT_MAX_AGE)
        for seq in range(2, 2 + store.CHECKPOINT_BYTES // len(BIG) + 1):
            store.add(msg(ROOM, seq, text=BIG))
        store.commit()
        assert store._checkpoint_due(since)  # enough bytes: at once
    finally:
        store.close()


def test_the_background_thread_copies_the_wal_into_the_database(tmp_path: Path) -> None:
    class Eager(SqliteStore):
        CHECKPOINT_BYTES, CHECKPOINT_POLL = 64 * 1024, 0.01

    path = tmp_path / "z.sqlite3"
    store = Eager(path)
    try:
        before = path.stat().st_size
        for seq in range(1, 11):
            store.add(msg(ROOM, seq, text=BIG))
        store.commit()
        deadline = time.monotonic() + 10
        while path.stat().st_size < before + 10 * len(BIG):  # the pages reached the main file
            assert time.monotonic() < deadline, "no checkpoint within 10 s"
            time.sleep(0.01)
        assert store._unchecked_bytes == 0
    finally:
        store.close()
