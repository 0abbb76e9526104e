"""Message stores: where sequenced messages live, behind one small interface.

The broker core writes through :class:`Store` only, so another backend (a networked one for
several brokers) can be added without touching the core. Two are here:

* :class:`SqliteStore`, the default: one SQLite file in WAL mode under the data directory.
* :class:`MemoryStore`: the same behaviour in memory, for ``--store memory`` and tests.

A *channel* is what a sequence number counts in: ``r:<room>`` for a room, ``d:<client>``
for one client's DM inbox. Messages are staged with :meth:`Store.add` during a loop turn and
written together by :meth:`Store.commit` (group commit); nothing staged is visible to
:meth:`Store.page` or :meth:`Store.find_cmid` before it is committed.

The store also keeps what must outlive the process besides messages: which principal (a
CURVE key) owns which nick (:meth:`Store.register_nick`), and the access lists of private
rooms (:meth:`Store.save_room`). Those are staged the same way and go into the same
transaction as the turn's messages; unlike messages, a failed commit keeps them staged for
the next one, and reads see them staged already.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple, Protocol

log = logging.getLogger("zchat.broker.store")


class StoreError(Exception):
    """The store could not commit (disk full, I/O error, database locked), or found a row
    it cannot read.

    The staged batch is rolled back; the error is retryable from the client's side.
    """


class Durability(StrEnum):
    """SQLite ``synchronous`` levels offered (WAL mode)."""

    OFF = "off"  # no fsync: fastest; a crash of the OS may lose recent commits
    NORMAL = "normal"  # fsync at checkpoints: survives a process crash (kill -9), not power loss
    FULL = "full"  # fsync every commit: survives power loss


class StoredMessage(NamedTuple):
    """One stored message (a room message or action, or one inbox's copy of a DM).

    A named tuple, in the column order of the ``messages`` table, so that a staged batch
    goes to ``executemany`` as it is, with no per-row conversion.
    """

    channel: str
    seq: int
    id: int
    ts: float
    kind: str
    room: str | None
    sender: str
    text: str
    to: str | None = None
    client: str | None = None  # the sender's client identity (hashed), for idempotent retry
    cmid: str | None = None  # the sender's client message id


@dataclass(slots=True)
class RoomAcl:
    """A private room's access list, persisted so the room outlives its last member.

    Principals are CURVE keys (Z85) in secure mode, client-identity hashes otherwise.
    """

    name: str
    creator: str  # the principal that created the room
    created: float  # when, seconds since the epoch
    members: set[str]  # principals invited (the creator included)
    ops: set[str]  # principals that are operators
    banned: set[str]  # principals that may not join
    subject: str = ""

    def copy(self) -> RoomAcl:
        """A copy whose sets are its own (stores keep snapshots, not the caller's object)."""
        return RoomAcl(
            self.name, self.creator, self.created, set(self.members), set(self.ops), set(self.banned), self.subject
        )


class _NickRow(NamedTuple):
    owner: str
    nick: str
    ts: float


def _owned(committed: Iterable[str], staged: dict[str, _NickRow], owner: str) -> int:
    """How many nick keys ``owner`` holds: the ``committed`` ones it owns, as changed by the
    ``staged`` registrations."""
    keys = {nkey for nkey in committed if nkey not in staged}
    keys.update(nkey for nkey, row in staged.items() if row.owner == owner)
    return len(keys)


class Store(Protocol):
    """What the broker core needs from a message store."""

    @property
    def epoch(self) -> int:
        """A random number fixed when the history began: it changes only when the history
        starts over (a memory store restarted, a database replaced), which tells clients
        that sequence numbers they remember no longer apply."""
        ...

    def last_seq(self, channel: str) -> int:
        """The highest committed sequence number of ``channel`` (0 if none ever)."""
        ...

    def last_id(self) -> int:
        """The highest message id ever committed (0 if none)."""
        ...

    def add(self, message: StoredMessage) -> None:
        """Stage ``message`` for the next commit."""
        ...

    def commit(self) -> int:
        """Write every staged message, nick registration and room save in one transaction;
        return how many messages.

        Raises:
            StoreError: nothing staged was written; the staged messages are dropped (the
                core sequences them again), nick registrations and room saves stay staged
                for the next commit.
        """
        ...

    def find_cmid(self, client: str, cmid: str) -> StoredMessage | None:
        """The committed message ``client`` sent with client message id ``cmid``, if any."""
        ...

    def page(self, channel: str, *, before: int | None, after: int | None, limit: int) -> list[StoredMessage]:
        """Committed messages of ``channel`` in sequence order.

        With ``after``: the first ``limit`` messages whose seq is greater. Otherwise the last
        ``limit`` messages whose seq is below ``before`` (or the newest, if None).
        """
        ...

    def prune(self, now: float, max_per_channel: int, max_age: float | None, budget: int) -> int:
        """Delete up to ``budget`` messages beyond the retention limits; return how many."""
        ...

    def nick_owner(self, nkey: str) -> str | None:
        """The principal owning the nick whose :func:`~zchat.common.names.nick_key` is
        ``nkey`` (registered, staged included), or None."""
        ...

    def registered_nick(self, nkey: str) -> tuple[str, str] | None:
        """``(owner, nick as its owner typed it)`` for a registered nick key (staged
        included), or None."""
        ...

    def nicks_owned(self, owner: str) -> int:
        """How many nick keys ``owner`` owns (staged registrations included)."""
        ...

    def register_nick(self, nkey: str, owner: str, nick: str, ts: float) -> None:
        """Stage: ``owner`` owns ``nkey`` (``nick`` as typed, since ``ts``); it replaces any
        earlier owner (the core checks first). Written by the next successful commit."""
        ...

    def private_rooms(self) -> dict[str, RoomAcl]:
        """Every private room's access list by name (staged saves included), as copies."""
        ...

    def save_room(self, acl: RoomAcl) -> None:
        """Stage a snapshot of ``acl`` (replacing the room's earlier one). Written by the
        next successful commit."""
        ...

    def close(self) -> None:
        """Release the store (after a final commit)."""
        ...


class MemoryStore:
    """A :class:`Store` in memory: nothing survives the process."""

    def __init__(self) -> None:
        self.epoch = secrets.randbits(62)
        self._channels: dict[str, deque[StoredMessage]] = {}
        self._last_seq: dict[str, int] = {}
        self._cmids: dict[tuple[str, str], StoredMessage] = {}
        self._staged: list[StoredMessage] = []
        self._last_id = 0
        self._nicks: dict[str, _NickRow] = {}
        self._owned: dict[str, set[str]] = {}  # owner -> its committed nick keys
        self._rooms: dict[str, RoomAcl] = {}
        self._staged_nicks: dict[str, _NickRow] = {}
        self._staged_rooms: dict[str, RoomAcl] = {}
        #: Tests set this to make commits fail, as a full disk would.
        self.fail_commits = False

    def last_seq(self, channel: str) -> int:
        return self._last_seq.get(channel, 0)

    def last_id(self) -> int:
        return self._last_id

    def add(self, message: StoredMessage) -> None:
        self._staged.append(message)

    def commit(self) -> int:
        staged, self._staged = self._staged, []
        if self.fail_commits and (staged or self._staged_nicks or self._staged_rooms):
            raise StoreError("commits are failing (simulated)")
        for nkey, row in self._staged_nicks.items():
            old = self._nicks.get(nkey)
            if old is not None:
                self._owned[old.owner].discard(nkey)
                if not self._owned[old.owner]:
                    del self._owned[old.owner]
            self._nicks[nkey] = row
            self._owned.setdefault(row.owner, set()).add(nkey)
        self._staged_nicks.clear()
        self._rooms.update(self._staged_rooms)
        self._staged_rooms.clear()
        for m in staged:
            self._channels.setdefault(m.channel, deque()).append(m)
            self._last_seq[m.channel] = max(self._last_seq.get(m.channel, 0), m.seq)
            self._last_id = max(self._last_id, m.id)
            if m.cmid is not None and m.client is not None:
                self._cmids[(m.client, m.cmid)] = m
        return len(staged)

    def find_cmid(self, client: str, cmid: str) -> StoredMessage | None:
        return self._cmids.get((client, cmid))

    def page(self, channel: str, *, before: int | None, after: int | None, limit: int) -> list[StoredMessage]:
        messages = self._channels.get(channel)
        if not messages or limit <= 0:
            return []
        # The seqs in a channel's deque are contiguous: positions follow from the first one,
        # so a page costs O(limit), not a scan of the channel.
        first = messages[0].seq
        if after is not None:
            start = min(len(messages), max(0, after + 1 - first))
            return list(itertools.islice(messages, start, start + limit))
        end = len(messages) if before is None else max(0, min(len(messages), before - first))
        return list(itertools.islice(messages, max(0, end - limit), end))

    def prune(self, now: float, max_per_channel: int, max_age: float | None, budget: int) -> int:
        removed = 0
        cutoff = now - max_age if max_age is not None else None
        for messages in self._channels.values():
            while (
                messages
                and removed < budget
                and (len(messages) > max_per_channel or (cutoff is not None and messages[0].ts < cutoff))
            ):
                gone = messages.popleft()
                if gone.cmid is not None and gone.client is not None:
                    self._cmids.pop((gone.client, gone.cmid), None)
                removed += 1
        return removed

    def nick_owner(self, nkey: str) -> str | None:
        record = self.registered_nick(nkey)
        return record[0] if record is not None else None

    def registered_nick(self, nkey: str) -> tuple[str, str] | None:
        row = self._staged_nicks.get(nkey) or self._nicks.get(nkey)
        return (row.owner, row.nick) if row is not None else None

    def nicks_owned(self, owner: str) -> int:
        return _owned(self._owned.get(owner, ()), self._staged_nicks, owner)

    def register_nick(self, nkey: str, owner: str, nick: str, ts: float) -> None:
        self._staged_nicks[nkey] = _NickRow(owner, nick, ts)

    def private_rooms(self) -> dict[str, RoomAcl]:
        return {name: acl.copy() for name, acl in (self._rooms | self._staged_rooms).items()}

    def save_room(self, acl: RoomAcl) -> None:
        self._staged_rooms[acl.name] = acl.copy()

    def close(self) -> None:
        self._staged.clear()
        self._staged_nicks.clear()
        self._staged_rooms.clear()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    channel   TEXT    NOT NULL,
    seq       INTEGER NOT NULL,
    id        INTEGER NOT NULL,
    ts        REAL    NOT NULL,
    kind      TEXT    NOT NULL,
    room      TEXT,
    sender    TEXT    NOT NULL,
    text      TEXT    NOT NULL,
    recipient TEXT,
    client    TEXT,
    cmid      TEXT,
    PRIMARY KEY (channel, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_by_cmid ON messages (client, cmid) WHERE cmid IS NOT NULL;
DROP INDEX IF EXISTS messages_by_ts;
CREATE TABLE IF NOT EXISTS channels (
    channel  TEXT    PRIMARY KEY,
    last_seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nicks (
    nkey  TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    nick  TEXT NOT NULL,
    ts    REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS nicks_by_owner ON nicks (owner);
CREATE TABLE IF NOT EXISTS private_rooms (
    name    TEXT PRIMARY KEY,
    creator TEXT NOT NULL,
    created REAL NOT NULL,
    members TEXT NOT NULL,
    ops     TEXT NOT NULL,
    banned  TEXT NOT NULL,
    subject TEXT NOT NULL
) WITHOUT ROWID;
"""
#: 2 added the nicks and private_rooms tables (created in a database of version 1 when it
#: is opened: nothing else changed). 3 dropped the index on ``ts``: it cost about 2 µs of
#: every message's insert (a third of the store's time per message) for retention by age
#: only, which now reads each channel's oldest row through the primary key instead. A
#: broker of version 2 opening the file again recreates the index; both read it alike.
SCHEMA_VERSION = 3
#: Retention by age, in one channel: its oldest row; the first row in a range of seqs that
#: is not old; and the deletion of a range of seqs. All three go through the primary key.
_OLDEST = "SELECT seq, ts FROM messages WHERE channel = ? ORDER BY seq LIMIT 1"
_FIRST_NEWER = "SELECT seq FROM messages WHERE channel = ? AND seq > ? AND seq < ? AND ts >= ? ORDER BY seq LIMIT 1"
_DELETE_RANGE = "DELETE FROM messages WHERE channel = ? AND seq >= ? AND seq < ?"
_COLUMNS = "channel, seq, id, ts, kind, room, sender, text, recipient, client, cmid"
_ROOM_COLUMNS = "name, creator, created, members, ops, banned, subject"


def _room_row(acl: RoomAcl) -> tuple[str, str, float, str, str, str, str]:
    """``acl`` as a row of ``private_rooms``: its sets as sorted JSON arrays of strings."""
    members, ops, banned = (json.dumps(sorted(names)) for names in (acl.members, acl.ops, acl.banned))
    return acl.name, acl.creator, acl.created, members, ops, banned, acl.subject


def _room_from_row(row: tuple[str, str, float, str, str, str, str]) -> RoomAcl:
    name, creator, created, *sets, subject = row

    def names(text: str) -> set[str]:
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise StoreError(f"private room {name!r}: not a JSON array of strings: {text[:80]!r}")
        return set(value)

    members, ops, banned = (names(text) for text in sets)
    return RoomAcl(name, creator, float(created), members, ops, banned, subject)


class SqliteStore:
    """A :class:`Store` in one SQLite database (``<data_dir>/zchat.sqlite3``), WAL mode.

    Args:
        path: the database file (created with its directory if missing).
        durability: the ``synchronous`` level; NORMAL survives kill -9.
        max_pages: a quota on the database's size in pages (``max_page_count``); a commit
            that would exceed it fails with :class:`StoreError` until space is freed.
    """

    FILENAME = "zchat.sqlite3"
    #: A background WAL checkpoint runs once about this many bytes were committed since the
    #: last (SQLite's own autocheckpoint size: 1,000 pages), or once the oldest of them is
    #: CHECKPOINT_MAX_AGE seconds old. Each checkpoint fsyncs the WAL and the database, and
    #: a commit that coincides with one waits: checkpointing every 0.5 s whatever the load
    #: made the p99 latency at 2,000 messages a second 3.9 ms instead of 1.3 ms.
    CHECKPOINT_BYTES = 4 * 1024 * 1024
    CHECKPOINT_MAX_AGE = 10.0
    #: How often the checkpoint thread looks (seconds).
    CHECKPOINT_POLL = 0.25
    #: Channels one retention pass looks at, at most: those written to, for the count limit;
    #: and, for the age limit, the next AGE_CHANNELS of all of them (one primary-key probe
    #: each, ~8 µs: a pass runs every second, so a lap over N channels takes N / 64 s).
    PRUNE_CHANNELS = 500
    AGE_CHANNELS = 64

    def __init__(self, path: Path, durability: Durability = Durability.NORMAL, max_pages: int | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, once per batch.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={durability.value.upper()}")
        # Checkpoints (copying the WAL into the database, with an fsync) would cost the loop
        # about a microsecond a message; a thread of ours runs them on its own connection
        # instead, and SQLite lets writers go on meanwhile (PASSIVE).
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._stop_checkpoints = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="zchat-checkpoint", daemon=True)
        self._db.executescript(_SCHEMA)
        self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
        self._db.execute("UPDATE meta SET value = MAX(value, ?) WHERE key = 'schema'", (SCHEMA_VERSION,))
        self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('last_id', 0)")
        self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?)", (secrets.randbits(62),))
        if max_pages is not None:
            self.set_max_pages(max_pages)
        self._staged: list[StoredMessage] = []
        self._staged_nicks: dict[str, _NickRow] = {}
        self._staged_rooms: dict[str, RoomAcl] = {}
        self._last_id = self._meta("last_id")
        self.epoch = self._meta("epoch")
        self._last_seq: dict[str, int] = {}
        # Channels retention must look at: all of them after opening (one may have grown
        # past the limit, or aged, while the limits were different), then those written to.
        self._touched: set[str] = {row[0] for row in self._db.execute("SELECT channel FROM channels")}
        # Where the next pass of retention by age starts, in channel-name order.
        self._age_cursor = ""
        # Bytes committed since the last checkpoint (an estimate), and when the first of them
        # was; written by the loop's thread, read and reset by the checkpoint thread (a lost
        # update only moves one checkpoint a little).
        self._unchecked_bytes = 0
        self._unchecked_since = 0.0
        self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            while not self._stop_checkpoints.wait(self.CHECKPOINT_POLL):
                if not self._checkpoint_due(time.monotonic()):
                    continue
                self._unchecked_bytes = 0
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # busy or I/O trouble: the next round retries
                    log.debug("background checkpoint failed: %s", exc)
        finally:
            db.close()

    def _checkpoint_due(self, now: float) -> bool:
        written = self._unchecked_bytes
        return written >= self.CHECKPOINT_BYTES or (
            written > 0 and now - self._unchecked_since >= self.CHECKPOINT_MAX_AGE
        )

    def set_max_pages(self, pages: int) -> None:
        """Set (or raise) the size quota, in database pages."""
        self._db.execute(f"PRAGMA max_page_count={int(pages)}")

    def page_count(self) -> int:
        return int(self._db.execute("PRAGMA page_count").fetchone()[0])

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def last_seq(self, channel: str) -> int:
        seq = self._last_seq.get(channel)
        if seq is None:
            row = self._db.execute("SELECT last_seq FROM channels WHERE channel = ?", (channel,)).fetchone()
            if row is None:
                return 0  # not cached: a stream of new, empty channels must not grow memory
            seq = self._last_seq[channel] = int(row[0])
        return seq

    def last_id(self) -> int:
        return self._last_id

    def add(self, message: StoredMessage) -> None:
        self._staged.append(message)

    def commit(self) -> int:
        staged, self._staged = self._staged, []
        if not (staged or self._staged_nicks or self._staged_rooms):
            return 0
        last: dict[str, int] = {}
        for m in staged:
            last[m.channel] = m.seq
        top_id = staged[-1].id if staged else 0  # ids are handed out in increasing order
        db = self._db
        try:
            db.execute("BEGIN")
            # Only the statements with rows to write: each one costs a few microseconds even
            # with none, and a busy loop commits a thousand times a second.
            if staged:
                db.executemany(f"INSERT INTO messages ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", staged)
                db.executemany(
                    "INSERT INTO channels (channel, last_seq) VALUES (?, ?) "
                    "ON CONFLICT (channel) DO UPDATE SET last_seq = MAX(last_seq, excluded.last_seq)",
                    last.items(),
                )
                db.execute("UPDATE meta SET value = MAX(value, ?) WHERE key = 'last_id'", (top_id,))
            if self._staged_nicks:
                db.executemany(
                    "INSERT OR REPLACE INTO nicks (nkey, owner, nick, ts) VALUES (?, ?, ?, ?)",
                    [(nkey, *row) for nkey, row in self._staged_nicks.items()],
                )
            if self._staged_rooms:
                db.executemany(
                    f"INSERT OR REPLACE INTO private_rooms ({_ROOM_COLUMNS}) VALUES (?,?,?,?,?,?,?)",
                    map(_room_row, self._staged_rooms.values()),
                )
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StoreError(str(exc)) from exc
        self._staged_nicks.clear()
        self._staged_rooms.clear()
        for channel, seq in last.items():
            self._last_seq[channel] = max(self._last_seq.get(channel, 0), seq)
        self._touched.update(last)
        self._last_id = max(self._last_id, top_id)
        if not self._unchecked_bytes:
            self._unchecked_since = time.monotonic()
        # A row, its index entries and page overhead: about 200 bytes besides the text.
        self._unchecked_bytes += sum(len(m.text) for m in staged) + 200 * len(staged) + 1
        return len(staged)

    def find_cmid(self, client: str, cmid: str) -> StoredMessage | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE client = ? AND cmid = ? LIMIT 1", (client, cmid)
        ).fetchone()
        return StoredMessage(*row) if row else None

    def page(self, channel: str, *, before: int | None, after: int | None, limit: int) -> list[StoredMessage]:
        if after is not None:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE channel = ? AND seq > ? ORDER BY seq LIMIT ?",
                (channel, after, limit),
            ).fetchall()
            return [StoredMessage(*row) for row in rows]
        bound = before if before is not None else 2**63 - 1
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE channel = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
            (channel, bound, limit),
        ).fetchall()
        return [StoredMessage(*row) for row in reversed(rows)]

    def prune(self, now: float, max_per_channel: int, max_age: float | None, budget: int) -> int:
        removed = 0
        db = self._db
        try:
            # At most a slice of the touched channels per pass: after a restart all of them
            # are, and one pass over a million channels would stall the loop for seconds.
            for channel in list(itertools.islice(self._touched, self.PRUNE_CHANNELS)):
                floor = self.last_seq(channel) - max_per_channel
                cur = db.execute(
                    "DELETE FROM messages WHERE channel = ? AND seq IN "
                    "(SELECT seq FROM messages WHERE channel = ? AND seq <= ? ORDER BY seq LIMIT ?)",
                    (channel, channel, floor, budget - removed),
                )
                removed += cur.rowcount
                if removed >= budget:
                    break
                self._touched.discard(channel)
            if max_age is not None and removed < budget:
                removed += self._prune_by_age(now - max_age, budget - removed)
        except sqlite3.Error as exc:
            log.warning("retention pass failed, will retry: %s", exc)
        return removed

    def _prune_by_age(self, cutoff: float, budget: int) -> int:
        """Delete up to ``budget`` messages older than ``cutoff``, looking at the next
        AGE_CHANNELS channels in name order (wrapping around), from where the last pass
        stopped.

        A channel's messages are in time order by seq (a wall clock stepped back can only
        delay retention), so each channel costs one primary-key probe of its oldest row,
        and a deletion reads the rows it deletes and one more: no index on ``ts`` to keep
        up on every insert.
        """
        db, removed = self._db, 0
        want = self.AGE_CHANNELS + 1  # one more: where the next pass starts
        channels = [row[0] for row in db.execute(
            "SELECT channel FROM channels WHERE channel >= ? ORDER BY channel LIMIT ?", (self._age_cursor, want)
        )]
        if len(channels) < want:  # the end: go on from the first channel
            channels += [row[0] for row in db.execute(
                "SELECT channel FROM channels WHERE channel < ? ORDER BY channel LIMIT ?",
                (self._age_cursor, want - len(channels)),
            )]
        for index, channel in enumerate(channels[: self.AGE_CHANNELS]):
            oldest = db.execute(_OLDEST, (channel,)).fetchone()
            if oldest is not None and oldest[1] < cutoff:
                # The old prefix of the channel, as far as the budget goes: up to its first
                # row that is not old (as MemoryStore, which pops from the left).
                first, bound = oldest[0], oldest[0] + budget - removed
                newer = db.execute(_FIRST_NEWER, (channel, first, bound, cutoff)).fetchone()
                cur = db.execute(_DELETE_RANGE, (channel, first, newer[0] if newer else bound))
                removed += cur.rowcount
                if removed >= budget:  # this channel may hold more: start the next pass here
                    self._age_cursor = channel
                    return removed
            self._age_cursor = channels[index + 1] if index + 1 < len(channels) else ""
        return removed

    def nick_owner(self, nkey: str) -> str | None:
        record = self.registered_nick(nkey)
        return record[0] if record is not None else None

    def registered_nick(self, nkey: str) -> tuple[str, str] | None:
        staged = self._staged_nicks.get(nkey)
        if staged is not None:
            return staged.owner, staged.nick
        row = self._db.execute("SELECT owner, nick FROM nicks WHERE nkey = ?", (nkey,)).fetchone()
        return (str(row[0]), str(row[1])) if row else None

    def nicks_owned(self, owner: str) -> int:
        committed = [row[0] for row in self._db.execute("SELECT nkey FROM nicks WHERE owner = ?", (owner,))]
        return _owned(committed, self._staged_nicks, owner)

    def register_nick(self, nkey: str, owner: str, nick: str, ts: float) -> None:
        self._staged_nicks[nkey] = _NickRow(owner, nick, ts)

    def private_rooms(self) -> dict[str, RoomAcl]:
        rows = self._db.execute(f"SELECT {_ROOM_COLUMNS} FROM private_rooms")
        rooms = {acl.name: acl for acl in map(_room_from_row, rows)}
        rooms.update((name, acl.copy()) for name, acl in self._staged_rooms.items())
        return rooms

    def save_room(self, acl: RoomAcl) -> None:
        self._staged_rooms[acl.name] = acl.copy()

    def close(self) -> None:
        self._staged.clear()
        self._staged_nicks.clear()
        self._staged_rooms.clear()
        self._stop_checkpoints.set()
        self._checkpointer.join()
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.execute("PRAGMA optimize")
        except sqlite3.Error:
            log.debug("final checkpoint or optimize failed at close", exc_info=True)
        self._db.close()


def open_history(path: Path) -> sqlite3.Connection:
    """A read-only connection to a store's database (safe beside a running broker: WAL)."""
    if not path.exists():
        raise FileNotFoundError(f"no zchat store at {path}")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def export_room(
    path: Path, room: str, *, since: float | None = None, after: int | None = None
) -> Iterator[StoredMessage]:
    """Every stored message of ``room`` (its canonical name) in seq order, read-only.

    ``since`` keeps messages at or after that time (seconds since the epoch); ``after``
    those with a greater seq.
    """
    db = open_history(path)
    try:
        query = f"SELECT {_COLUMNS} FROM messages WHERE channel = ? AND seq > ? AND ts >= ? ORDER BY seq"
        cursor = db.execute(query, ("r:" + room, after or 0, since if since is not None else float("-inf")))
        for row in cursor:
            yield StoredMessage(*row)
    finally:
        db.close()


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/zchat``, or ``~/.local/share/zchat``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "zchat"
