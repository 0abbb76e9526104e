"""Start-up, idle memory and history latency, with an empty store and with a big one; and
what writing a message into the big store costs, with the client library's cmids and with
random ones.

The big store is built directly, without a broker: :class:`SqliteStore` creates the schema
and its own ``add``/``commit`` write the rows in batches (one ``executemany`` each), so a
million messages take seconds. Rooms hold ``messages / ROOMS`` each, below the default
retention (100,000 a room), so the broker deletes nothing when it opens the store.
"""

from __future__ import annotations

import random
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
from bench.cases import Settings, log, percentile, repeated, running
from bench.wire import TEXT, Wire, nick

from zchat.broker.store import Durability, SqliteStore, StoredMessage
from zchat.client.core import ClientCore

ROOMS = 20
BATCH = 50_000
HISTORY_CALLS = 300
#: The write case: messages added to the big store, in commits of INSERT_BATCH (a busy
#: broker's loop turn holds about that many), from INSERT_CLIENTS clients in turn.
INSERT_MESSAGES, INSERT_BATCH, INSERT_CLIENTS = 30_000, 60, 8
#: How a cmid is made: as the client library does, and as it did before (random).
CMIDS: dict[str, Callable[[], str]] = {"library": ClientCore.new_cmid, "random": lambda: secrets.token_urlsafe(12)}


def build_store(data_dir: Path, messages: int) -> dict[str, Any]:
    """Write ``messages`` room messages into ``data_dir``'s store; return how it went."""
    start = time.monotonic()
    store = SqliteStore(data_dir / SqliteStore.FILENAME, Durability.OFF)
    per_room = -(-messages // ROOMS)
    now = time.time() - messages / 1000
    client = secrets.token_hex(16)
    for first in range(0, messages, BATCH):
        for i in range(first, min(messages, first + BATCH)):
            room, seq = f"room{i % ROOMS}", i // ROOMS + 1
            store.add(StoredMessage(f"r:{room}", seq, 1_000_000 + i, now + i / 1000, "message", room,
                                    f"user{i % 97}", TEXT, None, client, f"m{i}"))
        store.commit()
    store.close()
    size = (data_dir / SqliteStore.FILENAME).stat().st_size
    return {"messages": messages, "rooms": ROOMS, "per_room": per_room, "build_s": time.monotonic() - start,
            "file_mb": size / 2**20}


def _timed_calls(wire: Wire, count: int, fields: Any) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        reply = wire.call("history", **fields())
        times.append((time.perf_counter() - start) * 1000)
        if not reply.get("events"):
            raise SystemExit("history: an empty page")
    return times


def start_and_query(settings: Settings, data_dir: Path | None, per_room: int) -> dict[str, Any]:
    """Start a broker on ``data_dir`` (a fresh empty store if None), time its readiness and history."""
    with running("zchat-sqlite", settings, data_dir=data_dir) as server:
        ctx: zmq.Context[Any] = zmq.Context()
        wire = Wire(ctx, server.router)
        try:
            wire.call("hello", nick=nick("h"))
            first_reply = time.monotonic() - server.started_at
            idle_rss = server.rss_mb()
            figures: dict[str, Any] = {"ready_s": server.startup_seconds, "first_reply_s": first_reply,
                                       "idle_rss_mb": idle_rss}
            if per_room:
                wire.call("join", room="room0")
                wire.call("history", room="room0", limit=50)  # the first read warms SQLite's cache
                last = _timed_calls(wire, HISTORY_CALLS, lambda: {"room": "room0", "limit": 50})
                anywhere = _timed_calls(wire, HISTORY_CALLS, lambda: {
                    "room": "room0", "limit": 50, "before": random.randint(51, per_room)})
                figures |= {"last50_p50_ms": percentile(last, 0.5), "last50_p99_ms": percentile(last, 0.99),
                            "random50_p50_ms": percentile(anywhere, 0.5),
                            "random50_p99_ms": percentile(anywhere, 0.99), "rss_mb": server.rss_mb()}
        finally:
            wire.close()
            ctx.destroy(linger=0)
    return figures


def insert_cost(path: Path, messages: int, make_cmid: Callable[[], str]) -> float:
    """Microseconds a message to add and commit ``messages`` more room messages to the store
    at ``path`` (synchronous=NORMAL, as the broker runs), each with a cmid from ``make_cmid``.

    The broker keeps an index of cmids by client: this is what decides how much of it each
    stored message rewrites.
    """
    store = SqliteStore(path)
    try:
        clients = [secrets.token_hex(16) for _ in range(INSERT_CLIENTS)]
        channel, room = "r:writes", "writes"
        seq, msg_id, now = store.last_seq(channel) + 1, store.last_id() + 1, time.time()
        rows = [StoredMessage(channel, seq + i, msg_id + i, now, "message", room, f"user{i % INSERT_CLIENTS}",
                              TEXT, None, clients[i % INSERT_CLIENTS], make_cmid()) for i in range(messages)]
        start = time.perf_counter()  # the store's work only: add and commit
        for first in range(0, messages, INSERT_BATCH):
            for message in rows[first : first + INSERT_BATCH]:
                store.add(message)
            store.commit()
        return (time.perf_counter() - start) / messages * 1e6
    finally:
        store.close()


def store_case(settings: Settings) -> dict[str, Any]:
    """Empty store vs. ``settings.store_messages``: ready time, first reply, RSS, history."""
    empty = repeated(settings.repeat, lambda: start_and_query(settings, None, 0))
    log("  startup, empty store done")
    with tempfile.TemporaryDirectory(prefix="zchat-bench-store-", dir=settings.tmp) as tmp:
        built = build_store(Path(tmp), settings.store_messages)
        log(f"  built a store of {built['messages']:,} messages in {built['build_s']:.1f} s")
        big = repeated(settings.repeat, lambda: start_and_query(settings, Path(tmp), built["per_room"]))
        log("  startup and history, big store done")
        path, count = Path(tmp) / SqliteStore.FILENAME, min(INSERT_MESSAGES, settings.store_messages)
        writes = repeated(settings.repeat, lambda: {f"{name}_us": insert_cost(path, count, make)
                                                   for name, make in CMIDS.items()})
        log("  writes into the big store done")
    writes |= {"messages": count, "batch": INSERT_BATCH, "clients": INSERT_CLIENTS}
    return {"empty": empty, "big": big, "store": built, "writes": writes}
