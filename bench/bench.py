"""zchat's benchmark: throughput through the broker, zchat against a baseline, in one run.

    python3 dev.py bench                      # the default cases, 3 repeats, table + JSON
    python3 dev.py bench --messages 20000 --repeat 5 --json bench-results/run.json

Each case starts a fresh server process (zchat with the SQLite store, zchat with the memory
store, or ``baseline.py``), one publisher process and S subscriber processes. Load
generators speak the wire protocol with raw pyzmq so they are never the bottleneck: the
publisher keeps a window of unacknowledged ``say`` requests in flight; subscribers count
what arrives (and, by seq, what is missing or repeated). Figures are medians of the repeats;
ratios against the baseline are printed because absolute numbers drift on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgpack
import zmq

HERE = Path(__file__).resolve().parent
TEXT = "x" * 120  # ~120-byte messages, as the issue asks
READY = re.compile(r"ready router=(\S+) pub=(\S+)")


# -- load generators (run as child processes: `bench.py pub ...` / `bench.py sub ...`) --------


class Wire:
    """A DEALER speaking zchat's request protocol, synchronously, for setup."""

    def __init__(self, ctx: zmq.Context[Any], router: str) -> None:
        self.dealer = ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(router)
        self.rid = 0

    def call(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.rid += 1
        self.dealer.send(msgpack.packb({"v": 1, "kind": kind, "rid": self.rid, **fields}))
        if not self.dealer.poll(10_000):
            raise SystemExit(f"no reply to {kind}")
        reply: dict[str, Any] = msgpack.unpackb(self.dealer.recv())
        if reply["kind"] == "error":
            raise SystemExit(f"{kind}: {reply['code']}: {reply['reason']}")
        return reply


def publisher(router: str, room: str, count: int, window: int) -> None:
    ctx = zmq.Context()
    wire = Wire(ctx, router)
    wire.call("hello", nick=f"pub{secrets.token_hex(3)}")
    wire.call("join", room=room)
    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    frame = msgpack.packb({"v": 1, "kind": "say", "rid": 0, "room": room, "text": TEXT})
    dealer, sent, acked, errors = wire.dealer, 0, 0, 0
    start = time.perf_counter()
    while acked < count:
        while sent < count and sent - acked < window:
            dealer.send(frame)
            sent += 1
        if not dealer.poll(10_000):
            break
        while True:
            acked += 1
            errors += msgpack.unpackb(dealer.recv())["kind"] == "error"
            if not dealer.poll(0):
                break
    seconds = time.perf_counter() - start
    print(json.dumps({"acked": acked, "errors": errors, "seconds": seconds}), flush=True)


def subscriber(router: str, pub: str, room: str, count: int) -> None:
    ctx = zmq.Context()
    wire = Wire(ctx, router)
    wire.call("hello", nick=f"sub{secrets.token_hex(3)}")
    joined = wire.call("join", room=room)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    sub.connect(pub)
    sub.subscribe(joined["topic"].encode())
    # Ready once our own probe comes back: works for zchat and the baseline alike.
    while True:
        wire.call("say", room=room, text="probe")
        if sub.poll(100):
            while sub.poll(100):
                sub.recv_multipart()
            break
    print("ready", flush=True)
    seqs: set[int] = set()
    duplicates = received = 0
    first = last = 0.0
    while received < count and sub.poll(5_000):
        frames = sub.recv_multipart()
        event = msgpack.unpackb(frames[1])
        if event.get("kind") != "message" or event.get("text") == "probe":
            continue
        last = time.perf_counter()
        first = first or last
        received += 1
        seq = event.get("seq", 0)
        duplicates += seq in seqs
        seqs.add(seq)
    span = (max(seqs) - min(seqs) + 1) if seqs else 0
    print(json.dumps({"received": received, "duplicates": duplicates, "missing": span - len(seqs),
                      "seconds": last - first}), flush=True)


# -- the driver ---------------------------------------------------------------------------


@dataclass
class Result:
    server: str
    subscribers: int
    accepted_per_s: float  # acknowledged by the broker, per second
    delivered_per_s: float  # per subscriber, median over subscribers
    loss: float  # fraction of accepted messages a subscriber never got (before gap repair)
    server_cpu_s: float  # CPU seconds the server used during the case


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start(cmd: list[str]) -> tuple[subprocess.Popen[str], str, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    match = READY.search(proc.stdout.readline())
    if match is None:
        proc.kill()
        raise SystemExit(f"server did not start: {cmd}")
    return proc, match.group(1), match.group(2)


def _server(kind: str, data_dir: str) -> list[str]:
    if kind == "baseline":
        return [sys.executable, str(HERE / "baseline.py")]
    store = "memory" if kind == "zchat-memory" else "sqlite"
    return [sys.executable, "-m", "zchat.broker", "--router", "tcp://127.0.0.1:*", "--pub", "tcp://127.0.0.1:*",
            "--store", store, "--data-dir", data_dir, "--log-level", "warning"]


def _worker(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)


def run_case(kind: str, subscribers: int, count: int, window: int) -> Result:
    with tempfile.TemporaryDirectory(prefix="zchat-bench-") as data_dir:
        server, router, pub = _start(_server(kind, data_dir))
        try:
            room = "bench"
            subs = [_worker("sub", router, pub, room, str(count)) for _ in range(subscribers)]
            for s in subs:
                assert s.stdout is not None and s.stdout.readline().strip() == "ready"
            publisher_proc = _worker("pub", router, room, str(count), str(window))
            assert publisher_proc.stdout is not None and publisher_proc.stdin is not None
            assert publisher_proc.stdout.readline().strip() == "ready"
            cpu_before = _cpu_seconds(server.pid)
            publisher_proc.stdin.write("go\n")
            publisher_proc.stdin.flush()
            pub_result = json.loads(publisher_proc.stdout.readline())
            sub_results = [json.loads(s.stdout.readline()) for s in subs if s.stdout is not None]
            cpu = _cpu_seconds(server.pid) - cpu_before
            for proc in [publisher_proc, *subs]:
                proc.wait(10)
        finally:
            server.terminate()
            server.wait(10)
    accepted = pub_result["acked"] - pub_result["errors"]
    rates = [r["received"] / r["seconds"] for r in sub_results if r["seconds"] > 0]
    losses = [1 - r["received"] / accepted for r in sub_results] if accepted else [1.0]
    return Result(kind, subscribers, accepted / pub_result["seconds"], statistics.median(rates) if rates else 0.0,
                  max(losses), cpu)


def median_result(results: list[Result]) -> Result:
    first = results[0]
    return Result(
        first.server,
        first.subscribers,
        statistics.median(r.accepted_per_s for r in results),
        statistics.median(r.delivered_per_s for r in results),
        statistics.median(r.loss for r in results),
        statistics.median(r.server_cpu_s for r in results),
    )


def main(argv: list[str]) -> int:
    if argv[:1] == ["pub"]:
        publisher(argv[1], argv[2], int(argv[3]), int(argv[4]))
        return 0
    if argv[:1] == ["sub"]:
        subscriber(argv[1], argv[2], argv[3], int(argv[4]))
        return 0
    parser = argparse.ArgumentParser(prog="bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--messages", type=int, default=30_000, help="messages per case")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (the median is reported)")
    parser.add_argument("--window", type=int, default=500, help="unacknowledged requests in flight")
    parser.add_argument("--subscribers", default="1,10", help="comma-separated subscriber counts")
    parser.add_argument("--servers", default="baseline,zchat-memory,zchat-sqlite")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    table: list[Result] = []
    for subs in (int(s) for s in args.subscribers.split(",")):
        for kind in args.servers.split(","):
            runs = [run_case(kind, subs, args.messages, args.window) for _ in range(args.repeat)]
            table.append(median_result(runs))
            print(f"  {kind:>13} S={subs:<3} done", file=sys.stderr, flush=True)
    print_table(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in table], indent=2))
    return 0


def print_table(table: list[Result]) -> None:
    base = {r.subscribers: r for r in table if r.server == "baseline"}
    print(f"{'server':>13} {'S':>4} {'accepted/s':>11} {'delivered/s/sub':>16} {'loss':>7} "
          f"{'cpu s':>6} {'vs baseline':>12}")
    for r in table:
        b = base.get(r.subscribers)
        ratio = f"{r.delivered_per_s / b.delivered_per_s:.2f}x" if b and b.delivered_per_s else "-"
        print(f"{r.server:>13} {r.subscribers:>4} {r.accepted_per_s:>11,.0f} {r.delivered_per_s:>16,.0f} "
              f"{r.loss:>7.2%} {r.server_cpu_s:>6.2f} {ratio:>12}")
    mem = {r.subscribers: r for r in table if r.server == "zchat-memory"}
    for r in table:
        if r.server == "zchat-sqlite" and r.subscribers in mem and mem[r.subscribers].accepted_per_s:
            share = r.accepted_per_s / mem[r.subscribers].accepted_per_s
            print(f"persistence on/off, S={r.subscribers}: {share:.2f} of in-memory throughput")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
