"""The client library itself: how fast one ``Client`` / ``AsyncClient`` sends and receives.

* send: ``say`` with its acknowledgement, one at a time for the blocking :class:`Client`,
  and ``asyncio.gather`` over a window of concurrent ``say`` calls for :class:`AsyncClient`;
* receive: a raw publisher (:mod:`bench.loadgen`) floods a room; the client reads events
  (``recv_event``) until it has every message — the library repairs gaps itself, so
  "received" must equal "sent".

The workers run in their own processes (``bench.py worker client-send|client-recv``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.cases import Settings, log, repeated, running, workers
from bench.procs import BenchError, Server
from bench.reactor import emit
from bench.wire import TEXT, nick

from zchat.client import AsyncClient, Client, EventKind

WINDOW = 64


async def _async_send(cfg: dict[str, Any]) -> dict[str, Any]:
    async with AsyncClient(cfg["router"], cfg["pub"], history=0) as client:
        await client.connect(nick("lib"))
        await client.join("libsend")
        emit(ready=True)
        sent, start = 0, time.monotonic()
        while time.monotonic() - start < cfg["seconds"]:
            await asyncio.gather(*(client.say("libsend", TEXT) for _ in range(WINDOW)))
            sent += WINDOW
        return {"messages": sent, "seconds": time.monotonic() - start}


def _sync_send(cfg: dict[str, Any]) -> dict[str, Any]:
    with Client(cfg["router"], cfg["pub"], history=0) as client:
        client.connect(nick("lib"))
        client.join("libsend")
        emit(ready=True)
        sent, start = 0, time.monotonic()
        while time.monotonic() - start < cfg["seconds"]:
            client.say("libsend", TEXT)
            sent += 1
        return {"messages": sent, "seconds": time.monotonic() - start}


def client_send(cfg: dict[str, Any]) -> None:
    result = asyncio.run(_async_send(cfg)) if cfg["mode"] == "async" else _sync_send(cfg)
    emit(result=result)


class _Tally:
    def __init__(self) -> None:
        self.seqs: set[int] = set()
        self.first = self.last = 0.0

    def see(self, kind: EventKind, seq: int | None) -> None:
        if kind is EventKind.MESSAGE and seq is not None:
            self.last = time.monotonic()
            self.first = self.first or self.last
            self.seqs.add(seq)


async def _async_recv(cfg: dict[str, Any]) -> dict[str, Any]:
    async with AsyncClient(cfg["router"], cfg["pub"], history=0) as client:
        await client.connect(nick("lib"))
        await client.join("librecv")
        emit(ready=True)
        tally, deadline = _Tally(), time.monotonic() + cfg["limit"]
        while len(tally.seqs) < cfg["count"] and time.monotonic() < deadline:
            try:
                event = await client.recv_event(timeout=5.0)
            except TimeoutError:
                break
            tally.see(event.kind, event.seq)
        return {"messages": len(tally.seqs), "seconds": tally.last - tally.first}


def _sync_recv(cfg: dict[str, Any]) -> dict[str, Any]:
    with Client(cfg["router"], cfg["pub"], history=0) as client:
        client.connect(nick("lib"))
        client.join("librecv")
        emit(ready=True)
        tally, deadline = _Tally(), time.monotonic() + cfg["limit"]
        while len(tally.seqs) < cfg["count"] and time.monotonic() < deadline:
            try:
                event = client.recv_event(timeout=5.0)
            except TimeoutError:
                break
            tally.see(event.kind, event.seq)
        return {"messages": len(tally.seqs), "seconds": tally.last - tally.first}


def client_recv(cfg: dict[str, Any]) -> None:
    result = asyncio.run(_async_recv(cfg)) if cfg["mode"] == "async" else _sync_recv(cfg)
    emit(result=result)


ROLES = {"client-send": client_send, "client-recv": client_recv}


def send_run(server: Server, mode: str, seconds: float) -> dict[str, Any]:
    cfg = {"router": server.router, "pub": server.pub, "mode": mode, "seconds": seconds, "limit": seconds + 60}
    with workers(("client-send", cfg)) as (worker,):
        worker.expect("ready", time.monotonic() + 30)
        result = worker.expect("result", time.monotonic() + seconds + 30)
    if not result["seconds"]:
        raise BenchError("client-send: no time measured")
    return {"per_s": result["messages"] / result["seconds"], "messages": result["messages"]}


def recv_run(server: Server, mode: str, count: int, window: int) -> dict[str, Any]:
    base = {"router": server.router, "pub": server.pub, "limit": 120}
    reader = ("client-recv", {**base, "mode": mode, "count": count})
    writer = ("publisher", {**base, "rooms": ["librecv"], "count": count, "window": window})
    with workers(reader, writer) as (client, pub):
        deadline = time.monotonic() + 30
        client.expect("ready", deadline)
        pub.expect("ready", deadline)
        pub.send({"starts": True})
        pub.expect("starts", deadline)
        pub.send({"go": True})
        pub.expect("result", time.monotonic() + 120)
        result = client.expect("result", time.monotonic() + 120)
    return {"per_s": result["messages"] / result["seconds"] if result["seconds"] else 0.0,
            "messages": result["messages"], "missing": count - result["messages"]}


def client_case(settings: Settings) -> list[dict[str, Any]]:
    """Send (acknowledged) and receive rates of one blocking Client and one AsyncClient."""
    rows = []
    count = max(1000, settings.messages // 3)
    for mode, name in (("sync", "Client"), ("async", f"AsyncClient (gather x{WINDOW})")):
        def send(mode: str = mode) -> dict[str, Any]:
            with running("zchat-sqlite", settings) as server:
                return send_run(server, mode, settings.client_seconds)

        def recv(mode: str = mode) -> dict[str, Any]:
            with running("zchat-sqlite", settings) as server:
                return recv_run(server, mode, count, settings.window)

        rows.append({"client": name, "direction": "send", **repeated(settings.repeat, send)})
        rows.append({"client": name, "direction": "receive", "messages": count,
                     **repeated(settings.repeat, recv, worst=("missing",))})
        log(f"  client library {name} done")
    return rows
