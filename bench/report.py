"""Tables for the terminal, the issue's targets marked met or missed, and the JSON file."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

Row = dict[str, Any]
Column = tuple[str, Callable[[Row], Any], str]  # header, value, format


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "pyzmq": zmq.pyzmq_version(), "libzmq": zmq.zmq_version(), "kernel": platform.release(),
            "load_average": os.getloadavg(), "date": datetime.date.today().isoformat()}


def _cell(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


def print_table(title: str, columns: list[Column], rows: list[Row]) -> None:
    cells = [[header for header, _, _ in columns]]
    for row in rows:
        if "error" in row:
            cells.append([str(row.get("case") or row.get("server") or ""), f"failed: {row['error']}"])
            continue
        cells.append([_cell(value(row), spec) for _, value, spec in columns])
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(len(columns))]
    print(f"\n{title}")
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=False)))


def _ratio(row: Row, rows: list[Row], key: str) -> float | None:
    base = next((r for r in rows if r.get("server") == "baseline" and r.get("case") == row.get("case")), None)
    if base is None or row.get("server") == "baseline" or not base.get(key) or row.get(key) is None:
        return None
    return float(row[key]) / float(base[key])


def add_ratios(rows: list[Row], keys: tuple[str, ...]) -> None:
    """``<key>_vs_baseline`` on every row whose case has a baseline row."""
    for row in rows:
        for key in keys:
            row[f"{key}_vs_baseline"] = _ratio(row, rows, key)


ZCHAT = ("zchat-memory", "zchat-sqlite")


def is_peer(row: Row) -> bool:
    """A Redis or NATS row (bench/peers.py) among zchat's and the baseline's."""
    return row.get("server") not in (*ZCHAT, "baseline", None)


def add_peer_ratios(rows: list[Row], keys: tuple[str, ...]) -> None:
    """``<key>_zchat_vs_peer`` on every peer row: each zchat server's figure over the peer's, same case."""
    for row in filter(is_peer, rows):
        for key in keys:
            ratios = {}
            for kind in ZCHAT:
                zchat = _find(rows, case=row.get("case"), server=kind)
                if zchat and zchat.get(key) is not None and row.get(key):
                    ratios[kind] = float(zchat[key]) / float(row[key])
            row[f"{key}_zchat_vs_peer"] = ratios


def _pct(key: str) -> Callable[[Row], Any]:
    return lambda r: None if r.get(key) is None else 100 * r[key]


def _times(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f}x"


def _x(key: str) -> Callable[[Row], Any]:
    return lambda r: _times(r.get(key))


THROUGHPUT: list[Column] = [
    ("case", lambda r: r["case"], ""), ("server", lambda r: r["server"], ""),
    ("subs", lambda r: r["subscribers"], "d"), ("accepted/s", lambda r: r.get("accepted_per_s"), ",.0f"),
    ("delivered/s/sub", lambda r: r.get("delivered_per_s_sub"), ",.0f"),
    ("loss before %", _pct("loss_before"), ".2f"), ("loss after %", _pct("worst_loss_after"), ".2f"),
    ("srv cpu %", lambda r: r.get("server_cpu_pct"), ".0f"),
    ("accepted vs base", _x("accepted_per_s_vs_baseline"), ""),
    ("delivered vs base", _x("delivered_per_s_sub_vs_baseline"), ""),
]
LATENCY: list[Column] = [
    ("case", lambda r: r["case"], ""), ("server", lambda r: r["server"], ""),
    ("p50 ms", lambda r: r.get("p50_ms"), ".3f"), ("p99 ms", lambda r: r.get("p99_ms"), ".3f"),
    ("max ms", lambda r: r.get("max_ms"), ".2f"), ("offered/s", lambda r: r.get("offered_per_s"), ",.0f"),
    ("loss before %", _pct("loss_before"), ".2f"), ("loss after %", _pct("worst_loss_after"), ".2f"),
    ("srv cpu %", lambda r: r.get("server_cpu_pct"), ".0f"),
    ("p50 vs base", _x("p50_ms_vs_baseline"), ""), ("p99 vs base", _x("p99_ms_vs_baseline"), ""),
]
SCALE: list[Column] = [
    ("clients", lambda r: r["clients"], ",d"), ("rooms", lambda r: r.get("rooms"), ",d"),
    ("setup s", lambda r: r.get("setup_s"), ".1f"), ("idle RSS MB", lambda r: r.get("idle_rss_mb"), ".1f"),
    ("RSS MB", lambda r: r.get("worst_rss_mb"), ".1f"), ("ping p50 ms", lambda r: r.get("ping_p50_ms"), ".2f"),
    ("ping p99 ms", lambda r: r.get("ping_p99_ms"), ".2f"), ("ping max ms", lambda r: r.get("ping_max_ms"), ".1f"),
    ("msgs/s", lambda r: r.get("messages_per_s"), ".0f"), ("dropped", lambda r: r.get("worst_dropped"), "d"),
    ("srv cpu %", lambda r: r.get("server_cpu_pct"), ".0f"), ("note", lambda r: r.get("skipped", ""), ""),
]
CLIENT: list[Column] = [
    ("client", lambda r: r["client"], ""), ("direction", lambda r: r["direction"], ""),
    ("msg/s", lambda r: r.get("per_s"), ",.0f"), ("missing", lambda r: r.get("worst_missing"), "d"),
]


PEER_RATIOS: list[Column] = [
    ("workload", lambda r: r["workload"], ""), ("case", lambda r: r["case"], ""), ("peer", lambda r: r["peer"], ""),
    ("figure", lambda r: r["figure"], ""), ("peer's", lambda r: r["value"], ""),
    *((f"{kind} / peer", (lambda r, kind=kind: _times(r["ratios"].get(kind))), "") for kind in ZCHAT),
]
#: The peer figures compared: (workload, key, label, format).
PEER_FIGURES = (("throughput", "delivered_per_s_sub", "delivered/s/sub", ",.0f"),
                ("latency", "p50_ms", "p50 ms", ".3f"), ("latency", "p99_ms", "p99 ms", ".3f"))


def print_peers(results: dict[str, Any]) -> None:
    """zchat's figures over Redis's and NATS's, case by case, and why a peer did not run."""
    peers = results.get("peers")
    if not peers:
        return
    rows = [{"workload": workload, "case": row["case"], "peer": row["server"], "figure": label,
             "value": format(row[key], spec), "ratios": row.get(f"{key}_zchat_vs_peer", {})}
            for workload, key, label, spec in PEER_FIGURES for row in results.get(workload, [])
            if is_peer(row) and row.get(key) is not None]
    print_table("zchat vs Redis pub/sub and NATS through their Python clients (zchat's figure over the peer's, same "
                "case and run: delivered above 1.00x is better, latency above 1.00x is worse)", PEER_RATIOS, rows)
    for name, version in peers["versions"].items():
        print(f"  {name}: {version}")
    for name, why in peers["skipped"].items():
        print(f"  {name}: skipped: {why}")


def print_store(store: dict[str, Any]) -> None:
    empty, big, built = store["empty"], store["big"], store["store"]
    print(f"\nstart-up and history (store of {built['messages']:,} messages in {built['rooms']} rooms, "
          f"{built['file_mb']:.0f} MB, built in {built['build_s']:.1f} s)")
    rows = [("empty store", empty), (f"{built['messages']:,} messages", big)]
    print(f"{'store':>18}  {'ready s':>7}  {'first reply s':>13}  {'RSS MB':>6}  {'last-50 p50/p99 ms':>18}  "
          f"{'random-50 p50/p99 ms':>20}")
    for name, r in rows:
        if "error" in r:
            print(f"{name:>18}  failed: {r['error']}")
            continue
        last = f"{_cell(r.get('last50_p50_ms'), '.2f')} / {_cell(r.get('last50_p99_ms'), '.2f')}"
        anywhere = f"{_cell(r.get('random50_p50_ms'), '.2f')} / {_cell(r.get('random50_p99_ms'), '.2f')}"
        print(f"{name:>18}  {r['ready_s']:>7.2f}  {r['first_reply_s']:>13.2f}  {r['idle_rss_mb']:>6.1f}  "
              f"{last:>18}  {anywhere:>20}")
    writes = store.get("writes")
    if writes and "error" not in writes:
        print(f"writing {writes['messages']:,} more messages into it (commits of {writes['batch']}, "
              f"{writes['clients']} clients): {writes['library_us']:.1f} µs a message with the client library's cmids, "
              f"{writes['random_us']:.1f} µs with random cmids")


def _find(rows: list[Row], **match: Any) -> Row | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items()) and "error" not in r), None)


def targets(results: dict[str, Any]) -> list[Row]:
    """The issue's targets, each with the measured figure and met/missed (None: not measured)."""
    out: list[Row] = []

    def add(target: str, figure: Any, met: bool | None) -> None:
        out.append({"target": target, "figure": figure, "met": met})

    tp = results.get("throughput", [])
    for case in ("S=1", "S=10"):
        row = _find(tp, case=case, server="zchat-sqlite")
        if row:
            ratio, lost = row.get("delivered_per_s_sub_vs_baseline"), row.get("worst_loss_after")
            add(f"throughput {case}: >= 0.7x baseline per subscriber, zero loss after repair",
                f"{ratio:.2f}x, loss after repair {100 * (lost or 0):.2f}%" if ratio else None,
                None if ratio is None else ratio >= 0.7 and lost == 0)
    for peer in filter(is_peer, tp):
        ratio = peer.get("delivered_per_s_sub_zchat_vs_peer", {}).get("zchat-sqlite")
        zchat = _find(tp, case=peer["case"], server="zchat-sqlite")
        if ratio is not None and zchat:
            add(f"throughput {peer['case']}: zchat-sqlite delivers >= 1.5x what {peer['server']} delivers through "
                "its Python client, per subscriber", f"{ratio:.2f}x ({zchat['delivered_per_s_sub']:,.0f} vs "
                f"{peer['delivered_per_s_sub']:,.0f} msg/s)", ratio >= 1.5)
    row = _find(results.get("latency", []), case="S=10", server="zchat-sqlite")
    if row:
        add("latency: p99 <= 1 ms at 2,000 msg/s, S=10", f"p99 {row['p99_ms']:.2f} ms", row["p99_ms"] <= 1.0)
    row = _find(results.get("scale", []), clients=5000)
    if row and "skipped" not in row:
        add("5,000 clients: RSS <= 300 MB, ping p99 <= 50 ms, none dropped",
            f"RSS {row['worst_rss_mb']:.0f} MB, ping p99 {row['ping_p99_ms']:.1f} ms, dropped {row['worst_dropped']}",
            row["worst_rss_mb"] <= 300 and row["ping_p99_ms"] <= 50 and row["worst_dropped"] == 0)
    row = _find(results.get("fanout", []), server="zchat-sqlite")
    if row:
        lost = row.get("worst_loss_after")
        add(f"fan-out {row['case']}: complete, p99 <= 20 ms",
            f"loss after repair {100 * (lost or 0):.2f}%, p99 {row['p99_ms']:.1f} ms",
            lost == 0 and row["p99_ms"] <= 20)
    store = results.get("store")
    if store and "error" not in store["empty"]:
        add("idle RSS <= 60 MB", f"{store['empty']['idle_rss_mb']:.1f} MB", store["empty"]["idle_rss_mb"] <= 60)
    if store and "error" not in store["big"]:
        big, n = store["big"], store["store"]["messages"]
        add(f"ready in < 1 s with {n:,} stored messages", f"{big['ready_s']:.2f} s (first reply "
            f"{big['first_reply_s']:.2f} s)", big["ready_s"] < 1)
        add(f"last-50 history in < 5 ms with {n:,} stored", f"p50 {big['last50_p50_ms']:.2f} ms, "
            f"p99 {big['last50_p99_ms']:.2f} ms", big["last50_p99_ms"] < 5)
    return out


def print_all(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(f"machine: {m['cores']} cores, {m['cpu']}, Python {m['python']}, pyzmq {m['pyzmq']} / libzmq "
          f"{m['libzmq']}, load average at start {m['load_average'][0]:.2f}, {m['date']}")
    if "throughput" in results:
        window = results["settings"]["window"]
        print_table(f"throughput (as fast as a window of {window} unacknowledged says allows)", THROUGHPUT,
                    results["throughput"])
    if "latency" in results:
        print_table("latency (fixed offered rate, send time stamped in the text)", LATENCY, results["latency"])
    print_peers(results)
    if "fanout" in results:
        print_table("fan-out (one room)", LATENCY, results["fanout"])
    if "scale" in results:
        print_table("scale (N clients: DEALER + SUB, hello + join + sync; pings every 5 s; 1 msg/s per room)",
                    SCALE, results["scale"])
    if "client" in results:
        print_table("client library (one client, one process)", CLIENT, results["client"])
    if "store" in results:
        print_store(results["store"])
    print("\ntargets")
    for t in results.get("targets", []):
        mark = {True: "met   ", False: "MISSED", None: "?     "}[t["met"]]
        print(f"  {mark} {t['target']}: {t['figure']}")


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    path.write_text(json.dumps(clean(results), indent=2) + "\n")
