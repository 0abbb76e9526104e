"""``--peers``: the throughput and latency workloads against Redis pub/sub and NATS, beside zchat.

Each peer runs only when its server binary (``redis-server``, ``nats-server``) is found and
its Python client (``redis``, ``nats-py``) is importable; otherwise the benchmark says what
is missing and how to get it. Every run starts a fresh server on a free loopback port (with
no persistence) and stops it afterwards; the load generators are child processes like
zchat's, bounded by a deadline and an ``alarm()``.

The workloads are zchat's: one channel, S = 1 or 10 subscribers (each its own connection,
spread over the same ``--procs`` processes), 120-byte payloads, ``--messages`` of them as
fast as a window of ``--window`` allows (throughput), or ``rate`` a second with the send time
in the payload (latency). What the figures measure:

* *accepted/s*: messages the server confirmed. Redis: each ``PUBLISH`` reply, publishing
  through a redis-py pipeline of ``window`` commands (one write, one round trip per batch:
  how redis-py is meant to send many commands). NATS: a publish has no reply; nats-py
  buffers publishes and writes them from its flusher task, and ``flush()`` (PING/PONG)
  after every ``window`` publishes confirms the server has processed them. zchat's
  publisher keeps a *sliding* window of ``window`` unacknowledged says, while these two
  wait for each whole batch: fewer messages in flight on average, but one round trip per
  batch instead of per message.
* *delivered/s per subscriber*: as for zchat, each subscriber's messages over the time
  from its first to its last; counted in redis-py's ``listen()`` loop and in nats-py's
  subscription callback, that is after the client has parsed each message (zchat's
  subscribers only check a byte prefix): at these rates the Python clients, not the
  servers, are usually what limits these figures, which is what the issue's target
  compares ("what Redis pub/sub and NATS deliver from their Python clients").
* *loss*: each payload starts with its index; a jump is a loss, a tail that never came
  (the driver says how many were published) too. Neither has history: no repair. Neither
  drops on its own at these sizes: Redis disconnects a pub/sub client past 32 MB of output
  buffer, nats-py keeps 512 Ki messages a subscription before it drops.
* *latency*: ``time.monotonic_ns()`` in the payload, subtracted on receipt; the first 0.25 s
  is warm-up, as for zchat.

Both clients run on the default asyncio event loop (not uvloop), as the client library's
``AsyncClient`` does. redis-py uses hiredis's parser when ``hiredis`` is installed (the
``peers`` dependency group installs it): its documented way to go fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from bench.cases import SETUP_LIMIT, Settings, delivery_figures, latency_figures, log, repeated, spread, workers
from bench.procs import BenchError, cpu_seconds, free_port, rss_mb, spawn, stop
from bench.reactor import emit
from bench.wire import STAMP_DIGITS, TEXT_LENGTH

PEERS = {  # name: (server binary, importable module, pip package)
    "redis": ("redis-server", "redis", "redis"),
    "nats": ("nats-server", "nats", "nats-py"),
}
#: Debian installs nats-server in /usr/sbin, which is not on an ordinary user's PATH.
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
#: The throughput shapes (subscribers to one channel) the peers run, when selected.
SHAPES = (1, 10)
CHANNEL = "bench"
#: Seconds without a new message after the run's end before a subscriber stops listening.
QUIET = 1.0
#: Seconds the publisher may take, and each subscriber after it (as zchat's traffic()).
LIMIT = 120.0
INDEX_DIGITS = 10


def binary(name: str) -> str | None:
    """Where the executable ``name`` is: PATH first, then the sbin folders."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def unavailable() -> dict[str, str]:
    """Why each peer cannot run here (absent: it can)."""
    reasons = {}
    for name, (exe, module, package) in PEERS.items():
        missing = []
        if binary(exe) is None:
            missing.append(f"{exe} is not on PATH (Debian/Ubuntu: apt-get install {exe})")
        if importlib.util.find_spec(module) is None:
            missing.append(f"the Python package {package} is not installed (pip install {package})")
        if missing:
            reasons[name] = "; ".join(missing)
    return reasons


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions(names: tuple[str, ...]) -> dict[str, str]:
    """Each peer's server and client versions, e.g. ``redis-server 7.0.15, redis-py 8.1.0 + hiredis 3.5.0``."""
    out = {}
    for name in names:
        exe, _, package = PEERS[name]
        try:
            banner = subprocess.run([binary(exe) or exe, "--version"], capture_output=True, text=True, timeout=10,
                                    check=False).stdout
        except (OSError, subprocess.TimeoutExpired):
            banner = ""
        found = re.search(r"\bv=?(\d[\w.\-]*)", banner)
        client = f"{'redis-py' if name == 'redis' else package} {_version(package)}"
        if name == "redis" and _version("hiredis"):
            client += f" + hiredis {_version('hiredis')}"
        out[name] = f"{exe} {found.group(1) if found else '?'}, {client}"
    return out


@contextlib.contextmanager
def peer_server(name: str) -> Iterator[tuple[int, int]]:
    """Start ``name`` on a free loopback port, without persistence; yield (pid, port)."""
    port = free_port()
    exe = binary(PEERS[name][0]) or PEERS[name][0]
    if name == "redis":
        cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--loglevel", "warning"]
    else:
        cmd = [exe, "-a", "127.0.0.1", "-p", str(port)]
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


# -- load generators (child processes: bench.py worker peer-pub|peer-sub CONFIG) -----------------
# The clients are imported by name, so that the benchmark (and mypy) works without them.


def _payload(index: int, stamp: bool) -> bytes:
    """``TEXT_LENGTH`` bytes: the index, then (latency runs) the sender's CLOCK_MONOTONIC in ns."""
    head = f"{index:0{INDEX_DIGITS}d} " + (f"{time.monotonic_ns():0{STAMP_DIGITS}d} " if stamp else "")
    return head.encode() + b"x" * (TEXT_LENGTH - len(head))


async def _driver() -> asyncio.StreamReader:
    """The driver's commands (JSON lines on stdin), read without blocking the event loop."""
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _expect(reader: asyncio.StreamReader, key: str, deadline: float) -> Any:
    while True:
        try:
            line = await asyncio.wait_for(reader.readline(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise SystemExit(f"no {key!r} from the driver in time") from None
        if not line:
            raise SystemExit("the driver went away")
        message = json.loads(line)
        if key in message:
            return message[key]


class _RedisPub:
    def __init__(self, port: int) -> None:
        self.client = importlib.import_module("redis.asyncio").Redis(host="127.0.0.1", port=port)

    async def open(self) -> None:
        await self.client.ping()

    async def send(self, payloads: list[bytes], confirm: bool) -> int:
        pipe = self.client.pipeline(transaction=False)
        for p in payloads:
            pipe.publish(CHANNEL, p)
        return len(await pipe.execute())  # every PUBLISH answered: always confirmed

    async def close(self) -> int:
        await self.client.aclose()
        return 0


class _NatsPub:
    def __init__(self, port: int) -> None:
        self.url, self.unconfirmed = f"nats://127.0.0.1:{port}", 0
        self.client: Any = None  # a nats.aio.client.Client once open()

    async def open(self) -> None:
        self.client = await importlib.import_module("nats").connect(self.url, allow_reconnect=False)

    async def send(self, payloads: list[bytes], confirm: bool) -> int:
        assert self.client is not None
        for p in payloads:
            await self.client.publish(CHANNEL, p)
        self.unconfirmed += len(payloads)
        return await self.confirm() if confirm else 0

    async def confirm(self) -> int:
        assert self.client is not None
        await self.client.flush()  # PING/PONG: the server has processed everything before it
        done, self.unconfirmed = self.unconfirmed, 0
        return done

    async def close(self) -> int:
        assert self.client is not None
        done = await self.confirm()
        await self.client.close()
        return done


async def _publish(cfg: dict[str, Any]) -> dict[str, Any]:
    limit_at = time.monotonic() + cfg["limit"]
    pub = _RedisPub(cfg["port"]) if cfg["peer"] == "redis" else _NatsPub(cfg["port"])
    await pub.open()
    reader = await _driver()
    emit(ready=True)
    await _expect(reader, "go", limit_at)
    count, window, rate, stamp = cfg["count"], cfg["window"], cfg.get("rate"), cfg.get("stamp", False)
    cpu, start = time.process_time(), time.monotonic()
    sent = acked = 0
    while sent < count and time.monotonic() < limit_at:
        due = min(count, sent + window)
        if rate is not None:  # message k is due at start + k / rate
            due = min(count, int((time.monotonic() - start) * rate) + 1)
            if due <= sent:
                await asyncio.sleep(max(0.0, start + sent / rate - time.monotonic()))
                continue
        acked += await pub.send([_payload(i, stamp) for i in range(sent, due)], confirm=rate is None)
        sent = due
    acked += await pub.close()
    return {"acked": acked, "errors": 0, "sent": sent, "seconds": time.monotonic() - start,
            "cpu_s": time.process_time() - cpu}


class _Count:
    """What one subscriber saw: indexes in order, jumps are losses; latencies if stamped."""

    def __init__(self, latencies: list[int] | None, warmup: int) -> None:
        self.latencies, self.warmup = latencies, warmup
        self.last, self.received, self.duplicates, self.missing = -1, 0, 0, 0
        self.first_ns = self.last_ns = 0

    def see(self, data: bytes) -> None:
        now = time.monotonic_ns()
        index = int(data[:INDEX_DIGITS])
        if index <= self.last:
            self.duplicates += 1
            return
        self.missing += index - self.last - 1
        self.last, self.last_ns = index, now
        self.first_ns = self.first_ns or now
        self.received += 1
        if self.latencies is not None and index >= self.warmup:
            at = INDEX_DIGITS + 1
            self.latencies.append((now - int(data[at : at + STAMP_DIGITS])) // 1000)

    def summary(self, published: int) -> dict[str, Any]:
        return {"received": self.received, "duplicates": self.duplicates, "repaired": 0,
                "missing": self.missing + max(0, published - 1 - self.last),
                "seconds": (self.last_ns - self.first_ns) / 1e9}


async def _redis_subscribe(port: int, counts: list[_Count], deadline: float) -> Any:
    """One redis-py client and pub/sub connection per subscriber; returns a closer."""
    aioredis = importlib.import_module("redis.asyncio")
    clients = [aioredis.Redis(host="127.0.0.1", port=port) for _ in counts]
    subs = [c.pubsub() for c in clients]
    for ps in subs:
        await ps.subscribe(CHANNEL)
        while (m := await ps.get_message(timeout=1.0)) is None or m["type"] != "subscribe":
            if time.monotonic() > deadline:
                raise SystemExit("redis: no subscribe confirmation in time")

    async def read(ps: Any, tally: _Count) -> None:
        async for m in ps.listen():
            if m["type"] == "message":
                tally.see(m["data"])

    tasks = [asyncio.create_task(read(ps, c)) for ps, c in zip(subs, counts, strict=True)]

    async def close() -> None:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ps, c in zip(subs, clients, strict=True):
            await ps.aclose()
            await c.aclose()

    return close


async def _nats_subscribe(port: int, counts: list[_Count], deadline: float) -> Any:
    """One nats-py connection per subscriber, a callback each; returns a closer."""
    nats = importlib.import_module("nats")
    clients = []
    for tally in counts:
        client = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False,
                                    connect_timeout=max(1, int(deadline - time.monotonic())))
        clients.append(client)

        async def on_message(msg: Any, tally: _Count = tally) -> None:
            tally.see(msg.data)

        await client.subscribe(CHANNEL, cb=on_message)
        await client.flush()  # the server has the subscription

    async def close() -> None:
        for client in clients:
            await client.close()

    return close


async def _listen(cfg: dict[str, Any]) -> dict[str, Any]:
    limit_at = time.monotonic() + cfg["limit"]
    latencies: list[int] | None = [] if cfg.get("latency") else None
    counts = [_Count(latencies, cfg.get("warmup", 0)) for _ in range(cfg["subscribers"])]
    subscribe = _redis_subscribe if cfg["peer"] == "redis" else _nats_subscribe
    close = await subscribe(cfg["port"], counts, time.monotonic() + SETUP_LIMIT)
    reader = await _driver()
    emit(ready=True)
    cpu = time.process_time()
    published = await _expect(reader, "end", limit_at)  # how many the publisher sent
    ended = time.monotonic()
    while time.monotonic() < limit_at and not all(c.last >= published - 1 for c in counts):
        if time.monotonic() - max(ended, max(c.last_ns for c in counts) / 1e9) > QUIET:
            break
        await asyncio.sleep(0.02)  # polling the counts until complete, quiet, or the deadline
    cpu = time.process_time() - cpu
    await asyncio.wait_for(close(), 10)
    return {"feeds": [c.summary(published) for c in counts], "latencies_us": latencies or [], "cpu_s": cpu,
            "mismatches": 0}


def peer_pub(cfg: dict[str, Any]) -> None:
    emit(result=asyncio.run(_publish(cfg)))


def peer_sub(cfg: dict[str, Any]) -> None:
    emit(result=asyncio.run(_listen(cfg)))


ROLES = {"peer-pub": peer_pub, "peer-sub": peer_sub}


# -- the driver's side ---------------------------------------------------------------------------


def peer_run(name: str, subscribers: int, count: int, settings: Settings, rate: float | None = None) -> dict[str, Any]:
    """One run against a fresh server: what cases.traffic() returns for zchat."""
    with peer_server(name) as (pid, port):
        base = {"peer": name, "port": port, "limit": SETUP_LIMIT + LIMIT + 30}
        hosts = [("peer-sub", {**base, "subscribers": len(part), "latency": rate is not None,
                               "warmup": int((rate or 0) * 0.25)})
                 for part in spread(list(range(subscribers)), settings.procs)]
        pub_cfg = {**base, "count": count, "window": settings.window, "rate": rate, "stamp": rate is not None}
        with workers(*hosts, ("peer-pub", pub_cfg)) as started:
            *subs, pub = started
            deadline = time.monotonic() + SETUP_LIMIT
            for w in started:
                w.expect("ready", deadline)
            cpu, start = cpu_seconds(pid), time.monotonic()
            pub.send({"go": True})
            published = pub.expect("result", time.monotonic() + LIMIT)
            cpu, wall = cpu_seconds(pid) - cpu, time.monotonic() - start
            for w in subs:
                w.send({"end": published["sent"]})
            heard = [w.expect("result", time.monotonic() + LIMIT) for w in subs]
            peak = rss_mb(pid, "VmHWM")
    return {"published": published, "heard": heard, "server_cpu_s": cpu, "wall_s": wall, "peak_rss_mb": peak}


def throughput(settings: Settings, names: tuple[str, ...], shapes: tuple[int, ...] = SHAPES) -> list[dict[str, Any]]:
    """Throughput rows (as cases.throughput's) for each peer in ``names``, S in ``shapes`` and SHAPES."""
    rows = []
    for s in (s for s in SHAPES if s in shapes):
        for name in names:
            def run(name: str = name, s: int = s) -> dict[str, Any]:
                return delivery_figures(peer_run(name, s, settings.messages, settings), repairs=False)

            rows.append({"case": f"S={s}", "server": name, "subscribers": s, "messages": settings.messages,
                         **repeated(settings.repeat, run, worst=("loss_after",))})
            log(f"  throughput {f'S={s}':>16} {name:>13} done")
    return rows


def latency(settings: Settings, names: tuple[str, ...], subscribers: tuple[int, ...]) -> list[dict[str, Any]]:
    """Latency rows (as cases.latency's) for each peer in ``names``."""
    rows = []
    count = int(settings.latency_rate * settings.latency_seconds)
    for s in subscribers:
        for name in names:
            def run(name: str = name, s: int = s) -> dict[str, Any]:
                result = peer_run(name, s, count, settings, rate=settings.latency_rate)
                return {**latency_figures(result), **delivery_figures(result, repairs=False)}

            rows.append({"case": f"S={s}", "server": name, "subscribers": s, "rate": settings.latency_rate,
                         **repeated(settings.repeat, run, worst=("loss_after", "p99_ms"))})
            log(f"  latency S={s} {name:>13} done")
    return rows


def check() -> dict[str, Any]:
    """Which peers can run (``versions``) and why the others cannot (``skipped``), logged."""
    skipped = unavailable()
    for name, why in skipped.items():
        log(f"  peers: {name} skipped: {why}")
    return {"skipped": skipped, "versions": versions(tuple(n for n in PEERS if n not in skipped))}
