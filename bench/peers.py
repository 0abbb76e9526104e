"""``--peers``: the throughput workloads against Redis pub/sub and NATS, beside zchat.

Each runs only when its server binary (``redis-server``, ``nats-server``) is on PATH and its
Python client (``redis``, ``nats-py``) is importable; otherwise the benchmark says which is
missing and how to get it. The benchmark starts the server on a free loopback port and stops
it afterwards. Neither has acknowledgements like zchat's ``sent`` (a Redis ``PUBLISH``
returns how many subscribers it reached; a NATS publish is acknowledged by nothing but
``flush``), storage or gap repair: they are fire-and-forget buses, so their figures are an
upper bound for what a broker without those duties can do on this machine. Their load
generators use the official asyncio clients, which decode every message in Python: on a
2-core machine that, not the server, may well be what limits them.

Messages carry their index in the first ten characters of the text, for loss counting.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

from bench.cases import Settings, delivery_figures, log, repeated, spread, workers
from bench.procs import BenchError, cpu_seconds, free_port, spawn, stop
from bench.reactor import emit
from bench.wire import TEXT_LENGTH

PEERS = {  # name: (binary, importable module, pip package)
    "redis": ("redis-server", "redis", "redis"),
    "nats": ("nats-server", "nats", "nats-py"),
}
CHANNEL = "bench"
QUIET = 2.0


def unavailable() -> dict[str, str]:
    """Why each peer cannot run here (absent: it can)."""
    reasons = {}
    for name, (binary, module, package) in PEERS.items():
        missing = []
        if shutil.which(binary) is None:
            missing.append(f"{binary} is not on PATH (Debian/Ubuntu: apt-get install {binary})")
        if importlib.util.find_spec(module) is None:
            missing.append(f"the Python package {package} is not installed (pip install {package})")
        if missing:
            reasons[name] = "; ".join(missing)
    return reasons


async def _close_redis(client: Any) -> None:
    await (getattr(client, "aclose", None) or client.close)()  # aclose() from redis 5.0.1 on


def _text(index: int) -> bytes:
    return f"{index:010d} ".encode() + b"x" * (TEXT_LENGTH - 11)


@contextlib.contextmanager
def peer_server(name: str) -> Iterator[tuple[int, int]]:
    """Start ``name`` on a free loopback port; yield (pid, port)."""
    port = free_port()
    if name == "redis":
        cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    else:
        cmd = ["nats-server", "-a", "127.0.0.1", "-p", str(port)]
    proc = spawn(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise BenchError(f"{name} did not start")
            time.sleep(0.05)  # polling for the port until the deadline
        yield proc.pid, port
    finally:
        stop(proc)


# -- load generators (child processes) ---------------------------------------------------------


async def _redis_pub(cfg: dict[str, Any]) -> dict[str, Any]:
    aioredis = importlib.import_module("redis.asyncio")
    client = aioredis.Redis(host="127.0.0.1", port=cfg["port"])
    emit(ready=True)
    await asyncio.get_running_loop().run_in_executor(None, input)  # "go"
    start, sent = time.monotonic(), 0
    while sent < cfg["count"]:
        pipe = client.pipeline(transaction=False)
        for i in range(sent, min(cfg["count"], sent + cfg["window"])):
            pipe.publish(CHANNEL, _text(i))
        sent += len(await pipe.execute())
    seconds = time.monotonic() - start
    await _close_redis(client)
    return {"acked": sent, "errors": 0, "sent": sent, "seconds": seconds, "finals": {}}


async def _nats_pub(cfg: dict[str, Any]) -> dict[str, Any]:
    nats = importlib.import_module("nats")
    client = await nats.connect(f"nats://127.0.0.1:{cfg['port']}")
    emit(ready=True)
    await asyncio.get_running_loop().run_in_executor(None, input)
    start = time.monotonic()
    for i in range(cfg["count"]):
        await client.publish(CHANNEL, _text(i))
        if i % cfg["window"] == 0:
            await client.flush()
    await client.flush()
    seconds = time.monotonic() - start
    await client.close()
    return {"acked": cfg["count"], "errors": 0, "sent": cfg["count"], "seconds": seconds, "finals": {}}


class _Count:
    def __init__(self) -> None:
        self.last, self.received, self.duplicates, self.missing = -1, 0, 0, 0
        self.first = self.at = 0.0

    def see(self, data: bytes) -> None:
        index = int(data[:10])
        if index <= self.last:
            self.duplicates += 1
            return
        self.missing += index - self.last - 1
        self.last, self.at = index, time.monotonic()
        self.first = self.first or self.at
        self.received += 1

    def summary(self, count: int) -> dict[str, Any]:
        return {"received": self.received, "duplicates": self.duplicates, "repaired": 0,
                "missing": self.missing + count - 1 - self.last, "seconds": self.at - self.first}


async def _until_done(counts: list[_Count], count: int, limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        if all(c.last == count - 1 for c in counts):
            return
        latest = max((c.at for c in counts), default=0.0)
        if latest and time.monotonic() - latest > QUIET:
            return


async def _redis_sub(cfg: dict[str, Any]) -> list[_Count]:
    aioredis = importlib.import_module("redis.asyncio")
    clients = [aioredis.Redis(host="127.0.0.1", port=cfg["port"]) for _ in range(cfg["subscribers"])]
    counts = [_Count() for _ in clients]
    subs = [c.pubsub() for c in clients]
    for ps in subs:
        await ps.subscribe(CHANNEL)
        while (m := await ps.get_message(timeout=5.0)) is None or m["type"] != "subscribe":
            pass

    async def read(ps: Any, tally: _Count) -> None:
        async for m in ps.listen():
            if m["type"] == "message":
                tally.see(m["data"])

    tasks = [asyncio.create_task(read(ps, c)) for ps, c in zip(subs, counts, strict=True)]
    emit(ready=True)
    await _until_done(counts, cfg["count"], cfg["limit"])
    for t in tasks:
        t.cancel()
    for c in clients:
        await _close_redis(c)
    return counts


async def _nats_sub(cfg: dict[str, Any]) -> list[_Count]:
    nats = importlib.import_module("nats")
    counts = [_Count() for _ in range(cfg["subscribers"])]
    clients = []
    for tally in counts:
        client = await nats.connect(f"nats://127.0.0.1:{cfg['port']}")

        async def on_message(msg: Any, tally: _Count = tally) -> None:
            tally.see(msg.data)

        await client.subscribe(CHANNEL, cb=on_message)
        await client.flush()  # the server has the subscription
        clients.append(client)
    emit(ready=True)
    await _until_done(counts, cfg["count"], cfg["limit"])
    for client in clients:
        await client.close()
    return counts


def peer_pub(cfg: dict[str, Any]) -> None:
    run = _redis_pub if cfg["peer"] == "redis" else _nats_pub
    start = time.process_time()
    result = asyncio.run(run(cfg))
    emit(result={**result, "cpu_s": time.process_time() - start})


def peer_sub(cfg: dict[str, Any]) -> None:
    run = _redis_sub if cfg["peer"] == "redis" else _nats_sub
    counts = asyncio.run(run(cfg))
    emit(result={"feeds": [c.summary(cfg["count"]) for c in counts], "latencies_us": [],
                 "cpu_s": time.process_time(), "mismatches": 0})


ROLES = {"peer-pub": peer_pub, "peer-sub": peer_sub}


# -- the driver's side ---------------------------------------------------------------------------


def peer_run(name: str, subscribers: int, count: int, settings: Settings) -> dict[str, Any]:
    with peer_server(name) as (pid, port):
        base = {"peer": name, "port": port, "count": count, "limit": 120}
        hosts = [("peer-sub", {**base, "subscribers": len(part)})
                 for part in spread(list(range(subscribers)), settings.procs)]
        with workers(*hosts, ("peer-pub", {**base, "window": settings.window})) as started:
            *subs, pub = started
            deadline = time.monotonic() + 60
            for w in started:
                w.expect("ready", deadline)
            cpu, start = cpu_seconds(pid), time.monotonic()
            pub.send({"go": True})
            published = pub.expect("result", time.monotonic() + 120)
            cpu, wall = cpu_seconds(pid) - cpu, time.monotonic() - start
            heard = [w.expect("result", time.monotonic() + 120) for w in subs]
    return delivery_figures({"published": published, "heard": heard, "server_cpu_s": cpu, "wall_s": wall,
                             "peak_rss_mb": 0.0}, repairs=False)


def peers(settings: Settings, shapes: tuple[int, ...] = (1, 10)) -> dict[str, Any]:
    """Throughput rows for each available peer, and why the others were skipped."""
    skipped = unavailable()
    for name, why in skipped.items():
        log(f"  peers: {name} skipped: {why}")
    rows = []
    for s in shapes:
        for name in PEERS:
            if name in skipped:
                continue
            rows.append({"case": f"S={s}", "server": name, "subscribers": s, "messages": settings.messages,
                         **repeated(settings.repeat, lambda name=name, s=s: peer_run(  # type: ignore[misc]
                             name, s, settings.messages, settings))})
            log(f"  peers S={s} {name} done")
    return {"rows": rows, "skipped": skipped}
