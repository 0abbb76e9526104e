"""The workloads: each starts fresh servers and load generators and returns plain dicts.

Every function here runs one case ``repeat`` times and returns the median of each figure
(:func:`median_of`); figures where one bad repeat matters (loss after repair, dropped
clients) also keep their worst value. A case that fails returns ``{"error": ...}`` instead
of stopping the benchmark.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import HERE, BenchError, Server, Worker, nofile_limit, rss_mb

SERVERS = ("baseline", "zchat-memory", "zchat-sqlite")
#: Seconds any setup (processes started, sessions opened, subscriptions proven) may take.
SETUP_LIMIT = 60.0


@dataclass(frozen=True)
class Settings:
    """What the command line chose."""

    messages: int = 30_000
    repeat: int = 3
    window: int = 100  # the broker's ROUTER queues at most 200 replies a peer, then drops them
    procs: int = 4  # subscriber processes at most (the machine has 2 cores)
    rcvhwm: int = 1000  # the SUB's receive high-water mark (libzmq's default, as in the client library)
    latency_rate: float = 2000.0
    latency_seconds: float = 3.0
    fanout_subscribers: int = 500
    fanout_rate: float = 100.0
    fanout_seconds: float = 4.0
    scale: tuple[int, ...] = (100, 1000, 5000)
    scale_seconds: float = 10.0
    store_messages: int = 1_000_000
    client_seconds: float = 3.0
    tmp: Path = Path(tempfile.gettempdir())


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def server_cmd(kind: str, data_dir: Path, *extra: str) -> list[str]:
    if kind == "baseline":
        return [sys.executable, str(HERE / "baseline.py")]
    store = "memory" if kind == "zchat-memory" else "sqlite"
    return [sys.executable, "-m", "zchat.broker", "--router", "tcp://127.0.0.1:*", "--pub", "tcp://127.0.0.1:*",
            "--store", store, "--data-dir", str(data_dir), "--log-level", "warning",
            # Publishers send as fast as the broker accepts: a per-identity flood limit would
            # measure the limit, not the broker (BENCHMARKS.md).
            "--no-rate-limits", *extra]


@contextlib.contextmanager
def running(kind: str, settings: Settings, *extra: str, nofile: int = 4096,
            data_dir: Path | None = None) -> Iterator[Server]:
    """A fresh server of ``kind`` (its own data directory unless given), stopped afterwards."""
    with tempfile.TemporaryDirectory(prefix="zchat-bench-", dir=settings.tmp) as tmp:
        where = data_dir or Path(tmp)
        server = Server(server_cmd(kind, where, *extra), nofile=nofile, stderr_path=Path(tmp) / "server.log")
        try:
            yield server
        finally:
            server.close()


@contextlib.contextmanager
def workers(*pairs: tuple[str, dict[str, Any]], nofile: int = 4096) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    try:
        for role, config in pairs:
            started.append(Worker(role, config, nofile=nofile))
        yield started
    finally:
        for w in started:
            w.close()


def spread(items: list[Any], parts: int) -> list[list[Any]]:
    """``items`` dealt round-robin into at most ``parts`` non-empty lists."""
    parts = max(1, min(parts, len(items)))
    return [items[i::parts] for i in range(parts)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median_of(runs: list[dict[str, Any]], worst: tuple[str, ...] = ()) -> dict[str, Any]:
    """Each numeric figure's median over ``runs``; ``worst`` keys also get their maximum."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[-1]
    out: dict[str, Any] = dict(good[0])
    for key, value in good[0].items():
        values = [r.get(key) for r in good]
        if isinstance(value, int | float) and not isinstance(value, bool) and all(
                isinstance(v, int | float) for v in values):
            out[key] = statistics.median(values)  # type: ignore[type-var]
        elif isinstance(value, dict):
            out[key] = values  # no median of a breakdown: every repeat's
    for key in worst:
        present: list[float] = [r[key] for r in good if r.get(key) is not None]
        out[f"worst_{key}"] = max(present) if present else None
    out["repeats"] = len(good)
    if len(good) < len(runs):
        out["failed_repeats"] = [r["error"] for r in runs if "error" in r]
    return out


def repeated(n: int, run: Callable[[], dict[str, Any]], worst: tuple[str, ...] = ()) -> dict[str, Any]:
    runs = []
    for _ in range(n):
        try:
            runs.append(run())
        except (BenchError, OSError) as exc:
            log(f"    failed: {exc}")
            runs.append({"error": str(exc)})
    return median_of(runs, worst)


# -- message traffic: throughput, latency, fan-out ----------------------------------------------


def traffic(server: Server, kind: str, sub_rooms: list[str], pub_rooms: list[str], *, count: int,
            settings: Settings, rate: float | None = None, latency: bool = False,
            limit: float = 120.0) -> dict[str, Any]:
    """One run: subscribers (``sub_rooms``: each one's room) and one publisher process."""
    zchat = kind.startswith("zchat")
    base = {"router": server.router, "pub": server.pub, "limit": SETUP_LIMIT + limit + 30}
    hosts = [("subscribers", {**base, "rooms": rooms, "sync": zchat, "repair": zchat, "rcvhwm": settings.rcvhwm,
                              "latency": latency, "warmup": int((rate or 0) * 0.25)})
             for rooms in spread(sub_rooms, settings.procs)]
    pub_cfg = {**base, "rooms": pub_rooms, "count": count, "window": 10_000 if rate else settings.window,
               "rate": rate, "stamp": latency}
    with workers(*hosts, ("publisher", pub_cfg)) as started:
        *subs, pub = started
        deadline = time.monotonic() + SETUP_LIMIT
        for w in started:
            w.expect("ready", deadline)
        pub.send({"starts": True})
        starts = pub.expect("starts", deadline)
        for w in subs:
            w.send({"go": starts})
        cpu, start = server.cpu_seconds(), time.monotonic()
        pub.send({"go": True})
        published = pub.expect("result", time.monotonic() + limit)
        cpu, wall = server.cpu_seconds() - cpu, time.monotonic() - start
        for w in subs:
            w.send({"end": published["finals"]})
        heard = [w.expect("result", time.monotonic() + limit) for w in subs]
    return {"published": published, "heard": heard, "server_cpu_s": cpu, "wall_s": wall,
            "rss_mb": rss_mb(server.pid), "peak_rss_mb": rss_mb(server.pid, "VmHWM")}


def delivery_figures(run: dict[str, Any], repairs: bool) -> dict[str, Any]:
    """Accepted/delivered rates and loss before/after repair from one :func:`traffic` run."""
    published = run["published"]
    feeds = [f for h in run["heard"] for f in h["feeds"]]
    expected = sum(f["received"] + f["missing"] for f in feeds)
    missing = sum(f["missing"] for f in feeds)
    rates = [f["received"] / f["seconds"] for f in feeds if f["seconds"] > 0]
    accepted = published["acked"] - published["errors"]
    return {
        "accepted_per_s": accepted / published["seconds"] if published["seconds"] else 0.0,
        "delivered_per_s_sub": statistics.median(rates) if rates else 0.0,
        "errors": published["errors"], "unacknowledged": published["sent"] - published["acked"],
        "loss_before": missing / expected if expected else 1.0,
        "loss_after": (missing - sum(f["repaired"] for f in feeds)) / expected if repairs and expected else None,
        "duplicates": sum(f["duplicates"] for f in feeds),
        "server_cpu_s": run["server_cpu_s"],
        "server_cpu_pct": 100 * run["server_cpu_s"] / run["wall_s"] if run["wall_s"] else 0.0,
        "loadgen_cpu_s": published["cpu_s"] + sum(h["cpu_s"] for h in run["heard"]),
        "fastpath_mismatches": sum(h["mismatches"] for h in run["heard"]),
        "peak_rss_mb": run["peak_rss_mb"],
    }


def latency_figures(run: dict[str, Any]) -> dict[str, Any]:
    samples = [x / 1000 for h in run["heard"] for x in h["latencies_us"]]
    return {"p50_ms": percentile(samples, 0.50), "p99_ms": percentile(samples, 0.99),
            "max_ms": max(samples, default=float("nan")), "samples": len(samples),
            "offered_per_s": run["published"]["sent"] / run["published"]["seconds"]
            if run["published"]["seconds"] else 0.0}


def throughput_run(kind: str, sub_rooms: list[str], pub_rooms: list[str], count: int,
                   settings: Settings) -> dict[str, Any]:
    with running(kind, settings) as server:
        result = traffic(server, kind, sub_rooms, pub_rooms, count=count, settings=settings)
    return delivery_figures(result, kind.startswith("zchat"))


THROUGHPUT_SHAPES = (("S=1", 1, 1), ("S=10", 10, 1), ("S=100", 100, 1), ("4 pubs x 4 rooms", 1, 4))


def throughput(settings: Settings, shapes: tuple[tuple[str, int, int], ...] = THROUGHPUT_SHAPES,
               servers: tuple[str, ...] = SERVERS) -> list[dict[str, Any]]:
    """Publishers as fast as their window allows; S subscribers per room."""
    rows = []
    for name, per_room, rooms in shapes:
        pub_rooms = [f"tp{r}" for r in range(rooms)]
        sub_rooms = [room for room in pub_rooms for _ in range(per_room)]
        # Fan-out to 100 costs ~100x per message: fewer messages keep the case to seconds.
        count = max(100, settings.messages // (3 if per_room >= 100 else 1) // rooms)
        for kind in servers:
            run = functools.partial(throughput_run, kind, sub_rooms, pub_rooms, count, settings)
            row = {"case": name, "server": kind, "subscribers": len(sub_rooms), "messages": count * rooms,
                   **repeated(settings.repeat, run, worst=("loss_after",))}
            rows.append(row)
            log(f"  throughput {name:>16} {kind:>13} done")
    return rows


def latency(settings: Settings, subscribers: tuple[int, ...] = (1, 10),
            servers: tuple[str, ...] = SERVERS) -> list[dict[str, Any]]:
    """A fixed offered rate; each message carries its send time."""
    rows = []
    count = int(settings.latency_rate * settings.latency_seconds)
    for s in subscribers:
        for kind in servers:
            def run(kind: str = kind, s: int = s) -> dict[str, Any]:
                with running(kind, settings) as server:
                    result = traffic(server, kind, ["lat"] * s, ["lat"], count=count, settings=settings,
                                     rate=settings.latency_rate, latency=True)
                return {**latency_figures(result), **delivery_figures(result, kind.startswith("zchat"))}

            rows.append({"case": f"S={s}", "server": kind, "subscribers": s, "rate": settings.latency_rate,
                         **repeated(settings.repeat, run, worst=("loss_after", "p99_ms"))})
            log(f"  latency S={s} {kind:>13} done")
    return rows


def fanout(settings: Settings, servers: tuple[str, ...] = ("baseline", "zchat-sqlite")) -> list[dict[str, Any]]:
    """One room, many subscribers, a modest rate: is every message delivered, and how late?"""
    rows = []
    s, rate = settings.fanout_subscribers, settings.fanout_rate
    count = int(rate * settings.fanout_seconds)
    for kind in servers:
        def run(kind: str = kind) -> dict[str, Any]:
            with running(kind, settings, nofile=2 * s + 1024) as server:
                result = traffic(server, kind, ["fan"] * s, ["fan"], count=count, settings=settings, rate=rate,
                                 latency=True)
            return {**latency_figures(result), **delivery_figures(result, kind.startswith("zchat"))}

        rows.append({"case": f"S={s} at {rate:g}/s", "server": kind, "subscribers": s, "rate": rate,
                     **repeated(settings.repeat, run, worst=("loss_after", "p99_ms"))})
        log(f"  fan-out {kind:>13} done")
    return rows


# -- many clients ------------------------------------------------------------------------------------

ROOM_SIZE = 50
#: Seconds between pings of one client: the heartbeat of the broker's default session timeout
#: (15 s / 3), what an idle client library client sends.
PING_EVERY = 5.0
CLIENTS_PER_PROCESS = 1250


def scale_limits(n: int) -> tuple[int, int, str | None]:
    """Open files the broker and each client process need for ``n`` clients; why not, if not."""
    per_process = min(n, CLIENTS_PER_PROCESS)
    broker_need, client_need = 2 * n + 256, 4 * per_process + 256  # a zmq socket: a TCP fd + a mailbox fd
    _, hard = nofile_limit()
    if hard != -1 and hard < max(broker_need, client_need):
        return broker_need, client_need, f"RLIMIT_NOFILE hard limit {hard} < {max(broker_need, client_need)} needed"
    return broker_need, client_need, None


def scale_run(n: int, settings: Settings) -> dict[str, Any]:
    broker_nofile, client_nofile, _ = scale_limits(n)
    rooms = [f"s{i % max(1, n // ROOM_SIZE)}" for i in range(n)]
    parts = spread(rooms, -(-n // CLIENTS_PER_PROCESS))
    with running("zchat-sqlite", settings, nofile=broker_nofile) as server:
        idle_rss = rss_mb(server.pid)
        base = {"router": server.router, "pub": server.pub, "ping_every": PING_EVERY,
                "limit": SETUP_LIMIT * 2 + settings.scale_seconds + 30}
        # A trickle: one message per room per second, in all.
        pairs = [("clients", {**base, "rooms": p, "say_rate": len(p) / ROOM_SIZE}) for p in parts]
        with workers(*pairs, nofile=client_nofile) as crowd:
            deadline = time.monotonic() + SETUP_LIMIT * 2
            ready = [w.expect("ready", deadline) for w in crowd]
            setup_rss = rss_mb(server.pid)
            for w in crowd:
                w.send({"go": True})
            cpu, start = server.cpu_seconds(), time.monotonic()
            peak = setup_rss
            while time.monotonic() - start < settings.scale_seconds:
                time.sleep(0.25)  # sampling the broker's RSS, not waiting for a condition
                peak = max(peak, rss_mb(server.pid))
            cpu, wall = server.cpu_seconds() - cpu, time.monotonic() - start
            for w in crowd:
                w.send({"end": True})
            results = [w.expect("result", time.monotonic() + 30) for w in crowd]
    rtts = [x / 1000 for r in results for x in r["rtts_us"]]
    errors: dict[str, int] = {}
    for r in results:
        for code, count in r["errors"].items():
            errors[code] = errors.get(code, 0) + count
    failed, timeouts = sum(r["failed"] for r in results), sum(r["timeouts"] for r in results)
    why: dict[str, int] = {}
    for r in ready:
        for reason, count in r["why"].items():
            why[f"setup: {reason}"] = why.get(f"setup: {reason}", 0) + count
    return {
        "idle_rss_mb": idle_rss, "rss_mb": max(peak, setup_rss), "setup_s": max(r["seconds"] for r in ready),
        "ping_p50_ms": percentile(rtts, 0.5), "ping_p99_ms": percentile(rtts, 0.99),
        "ping_max_ms": max(rtts, default=float("nan")), "pings": len(rtts),
        "dropped": failed + timeouts + sum(errors.values()),
        "dropped_why": {"ping_timeouts": timeouts, **errors, **why},
        "messages_per_s": sum(r["says"] for r in results) / wall, "deliveries": sum(r["frames"] for r in results),
        "server_cpu_pct": 100 * cpu / wall, "processes": len(parts),
    }


def scale(settings: Settings) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for n in settings.scale:
        _, _, why_not = scale_limits(n)
        if why_not:
            log(f"  scale N={n}: skipped: {why_not}")
            rows.append({"clients": n, "skipped": why_not})
            continue
        rows.append({"clients": n, "rooms": max(1, n // ROOM_SIZE),
                     **repeated(settings.repeat, lambda n=n: scale_run(n, settings),  # type: ignore[misc]
                                worst=("dropped", "ping_p99_ms", "rss_mb"))})
        log(f"  scale N={n} done")
    return rows
