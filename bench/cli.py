"""zchat's benchmark: every workload of BENCHMARKS.md in one run, a table and a JSON file.

    python3 dev.py bench                         # everything, 3 repeats (about 10 minutes)
    python3 dev.py bench --quick                 # a smoke run: small counts, 1 repeat
    python3 dev.py bench --only throughput,latency --servers baseline,zchat-sqlite
    python3 dev.py bench --peers                 # also Redis pub/sub and NATS, if installed

Workloads (``--only``): throughput, latency, fanout, scale, client, store. Each case starts
fresh servers (zchat with SQLite, zchat with ``--store memory``, ``baseline.py``) and load
generators in child processes (``bench.py worker ROLE CONFIG``, see loadgen.py), all on
127.0.0.1, each bounded in time and killed at exit or Ctrl-C. Every figure is the median of
the repeats; ``vs base`` columns divide zchat's figure by the baseline's of the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench import cases, libclient, peers, report, storecase
from bench.loadgen import run_worker
from bench.procs import ROOT, cleanup, install_cleanup

WORKLOADS = ("throughput", "latency", "fanout", "scale", "client", "store")
SHAPES = {"1": "S=1", "10": "S=10", "100": "S=100", "4x4": "4 pubs x 4 rooms"}
QUICK = {"messages": 2000, "repeat": 1, "latency_seconds": 1.0, "fanout_subscribers": 50,
         "fanout_seconds": 1.5, "scale": (100,), "scale_seconds": 1.5, "store_messages": 20_000,
         "client_seconds": 1.0}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts, 1 repeat: a smoke run")
    parser.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads to run")
    parser.add_argument("--peers", action="store_true",
                        help="also run the throughput (S=1, 10) and latency workloads against Redis pub/sub and NATS, "
                             "if installed (BENCHMARKS.md)")
    parser.add_argument("--servers", default=",".join(cases.SERVERS), help="servers for throughput and latency")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="throughput shapes: 1,10,100,4x4")
    parser.add_argument("--latency-subscribers", type=_ints, default=(1, 10), help="subscriber counts, e.g. 1,10")
    parser.add_argument("--messages", type=int, help="messages per throughput case (default 30000)")
    parser.add_argument("--repeat", type=int, help="runs per case; the median is reported (default 3)")
    parser.add_argument("--window", type=int, help="unacknowledged says in flight (default 100)")
    parser.add_argument("--procs", type=int, help="subscriber processes per case at most (default 4)")
    parser.add_argument("--rcvhwm", type=int, help="SUB receive high-water mark (default 1000)")
    parser.add_argument("--scale", type=_ints, help="client counts for the scale case (default 100,1000,5000)")
    parser.add_argument("--store-messages", type=int, help="messages in the big store (default 1000000)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "latest.json",
                        help="where to write the results (default bench-results/latest.json)")
    return parser


def settings_from(args: argparse.Namespace) -> cases.Settings:
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    for name in ("messages", "repeat", "window", "procs", "rcvhwm", "scale", "store_messages"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return cases.Settings(**values)


def run(args: argparse.Namespace, settings: cases.Settings) -> dict[str, Any]:
    only = set(args.only.split(","))
    unknown = only - set(WORKLOADS)
    if unknown:
        raise SystemExit(f"bench: unknown workload(s) {', '.join(sorted(unknown))}; known: {', '.join(WORKLOADS)}")
    servers = tuple(args.servers.split(","))
    shapes = tuple(s for s in cases.THROUGHPUT_SHAPES if s[0] in {SHAPES[k] for k in args.shapes.split(",")})
    results: dict[str, Any] = {"machine": report.machine(), "settings": {
        k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()}}
    started = time.monotonic()
    peer_names: tuple[str, ...] = ()  # the peers that run: their rows join zchat's in the same tables
    if args.peers:
        results["peers"] = peers.check()
        peer_names = tuple(results["peers"]["versions"])
        if not {"throughput", "latency"} & only:
            cases.log("  peers: they run with the throughput and latency workloads only (--only)")
    if "throughput" in only:
        results["throughput"] = cases.throughput(settings, shapes, servers)
        single_room = tuple(s for _, s, rooms in shapes if rooms == 1)
        results["throughput"] += peers.throughput(settings, peer_names, single_room)
        report.add_ratios(results["throughput"], ("accepted_per_s", "delivered_per_s_sub"))
        report.add_peer_ratios(results["throughput"], ("delivered_per_s_sub",))
    if "latency" in only:
        results["latency"] = cases.latency(settings, args.latency_subscribers, servers)
        results["latency"] += peers.latency(settings, peer_names, args.latency_subscribers)
        report.add_ratios(results["latency"], ("p50_ms", "p99_ms"))
        report.add_peer_ratios(results["latency"], ("p50_ms", "p99_ms"))
    if "fanout" in only:
        results["fanout"] = cases.fanout(settings)
        report.add_ratios(results["fanout"], ("p50_ms", "p99_ms"))
    if "scale" in only:
        results["scale"] = cases.scale(settings)
    if "client" in only:
        results["client"] = libclient.client_case(settings)
    if "store" in only:
        results["store"] = storecase.store_case(settings)
    results["seconds"] = time.monotonic() - started
    results["targets"] = report.targets(results)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return run_worker(argv[1], json.loads(argv[2]))
    args = build_parser().parse_args(argv)
    install_cleanup()
    try:
        results = run(args, settings_from(args))
    except KeyboardInterrupt:
        print("bench: interrupted; every child process was stopped", file=sys.stderr)
        return 130
    finally:
        cleanup()
    report.print_all(results)
    report.write_json(args.json, results)
    print(f"\nwritten: {args.json} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
