"""The broker's tool subcommands: ``export``, ``status`` and ``check``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from zchat.common import config as c
from zchat.common.codec import decode_reply, encode
from zchat.common.codes import ErrorCode
from zchat.common.errors import ConfigError, KeyFileError, ProtocolError
from zchat.common.keys import KeyPair, load_secret_key
from zchat.common.names import normalize_room
from zchat.common.protocol import StatsReply, StatsRequest

from .config import ENV_DATA_DIR, OPTIONS
from .store import SqliteStore, default_data_dir, export_room

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: str, now: float | None = None) -> float:
    """``--since``: an ISO date or date-time (local time unless it says), or an age: 90m, 2h, 7d."""
    now = time.time() if now is None else now
    if match := _RELATIVE.match(value.strip()):
        return now - float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    try:
        when = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError("expected an ISO date/time (2026-11-21, 2026-11-21T09:30) or an age (90m, 2h, 7d)") from None
    return when.timestamp()  # naive means local time


def export_main(argv: list[str]) -> int:
    """``zchat-broker export``: a room's stored history as JSON lines, oldest first."""
    parser = argparse.ArgumentParser(
        prog="zchat-broker export", description="Write a room's stored history as JSON lines, oldest first."
    )
    parser.add_argument("--room", required=True, help="the room to export")
    parser.add_argument("--since", help="only messages from then on: ISO date/time or an age like 2h, 7d")
    parser.add_argument("--after", type=int, help="only messages with a greater seq")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help=f"the broker's data directory (env {ENV_DATA_DIR})"
    )
    parser.add_argument("--output", "-o", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)
    try:
        room = normalize_room(args.room)
        since = parse_since(args.since) if args.since else None
    except (ProtocolError, ValueError) as exc:
        parser.error(str(getattr(exc, "reason", exc)))
    data_dir = args.data_dir or Path(os.environ.get(ENV_DATA_DIR) or default_data_dir())
    out = args.output.open("w", encoding="utf-8") if args.output else sys.stdout
    count = 0
    try:
        for m in export_room(data_dir / SqliteStore.FILENAME, room, since=since, after=args.after):
            record = {
                "room": m.room,
                "seq": m.seq,
                "id": m.id,
                "ts": m.ts,
                "time": dt.datetime.fromtimestamp(m.ts, dt.UTC).isoformat(timespec="milliseconds"),
                "kind": m.kind,
                "sender": m.sender,
                "text": m.text,
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    except FileNotFoundError as exc:
        print(f"zchat-broker export: {exc}", file=sys.stderr)
        return 1
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"zchat-broker export: {count} messages of #{room}", file=sys.stderr)
    return 0



_ROUTER_OPTION = [opt for opt in OPTIONS if opt.name in ("router", "curve_secret_key")]


def _ask_stats(router: str, timeout: float, curve: KeyPair | None = None) -> StatsReply:
    """One ``stats`` request to the broker at ``router`` (no session needed).

    ``curve`` is the broker's own key pair in secure mode: the tool runs where the broker's
    secret key is, and the broker's ZAP handler accepts its own key.
    """
    # A broker bound to every interface (* or 0.0.0.0) is reached on loopback.
    router = re.sub(r"^tcp://(\*|0\.0\.0\.0):", "tcp://127.0.0.1:", router)
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        dealer.setsockopt(zmq.CURVE_SERVERKEY, curve.public.encode("ascii"))
        dealer.setsockopt(zmq.CURVE_PUBLICKEY, curve.public.encode("ascii"))
        dealer.setsockopt(zmq.CURVE_SECRETKEY, curve.secret.encode("ascii"))
    try:
        dealer.connect(router)
        dealer.send(encode(StatsRequest(1)))
        if not dealer.poll(int(timeout * 1000)):
            raise TimeoutError(f"no answer from the broker at {router} within {timeout:g} s")
        reply = decode_reply(dealer.recv())
    finally:
        dealer.close()
        ctx.term()
    if not isinstance(reply, StatsReply):
        raise ProtocolError(ErrorCode.INVALID, f"expected a stats reply, got {reply.KIND.value!r}")
    return reply


def _stats_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    c.add_options(parser, _ROUTER_OPTION)
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer (default 2)")
    return parser


def _router(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, KeyPair | None]:
    """The broker's router endpoint, and its key pair when it runs with CURVE."""
    # Resolve every broker option (so the broker's own config file is read as the broker
    # reads it, unknown keys and all) and keep the router and the key.
    try:
        values = c.resolve(OPTIONS, args, os.environ, section="broker")
        secret = values["curve_secret_key"]
        return str(values["router"]), load_secret_key(secret) if secret is not None else None
    except (ConfigError, KeyFileError) as exc:
        parser.error(str(exc))


def check_main(argv: list[str]) -> int:
    """``zchat-broker check``: exit 0 if the broker answers a ``stats`` request in time."""
    parser = _stats_parser("zchat-broker check", "Exit 0 if a broker answers; 1 otherwise (for health checks).")
    args = parser.parse_args(argv)
    router, curve = _router(parser, args)
    try:
        stats = _ask_stats(router, args.timeout, curve)
    except (TimeoutError, ProtocolError) as exc:
        print(f"zchat-broker check: {exc}", file=sys.stderr)
        return 1
    sessions = int(stats.counters.get("sessions", 0))
    print(f"ok: zchat-broker {stats.version} at {router}, up {stats.uptime:.0f} s, {sessions} sessions")
    return 0


def format_status(stats: StatsReply, previous: StatsReply | None, interval: float) -> str:
    """A human summary of a ``stats`` reply; with ``previous``, rates over ``interval``."""
    f = stats.counters

    def rate(key: str) -> str:
        if previous is None or interval <= 0:
            return ""
        return f" ({(f.get(key, 0) - previous.counters.get(key, 0)) / interval:,.0f}/s)"

    errors = {k.partition(":")[2]: int(v) for k, v in f.items() if k.startswith("errors_total:")}
    lines = [
        f"zchat-broker {stats.version}, up {dt.timedelta(seconds=int(stats.uptime))}",
        f"  sessions {int(f.get('sessions', 0))}, rooms {int(f.get('rooms', 0))}, "
        f"members {int(f.get('members', 0))}",
        f"  requests {int(f.get('requests_total', 0)):,}{rate('requests_total')}, "
        f"stored {int(f.get('stored_total', 0)):,}{rate('stored_total')}, "
        f"published {int(f.get('published_total', 0)):,}{rate('published_total')}",
        f"  history requests {int(f.get('history_requests_total', 0)):,} "
        f"(gap repairs {int(f.get('gap_fetches_total', 0)):,}), duplicates {int(f.get('duplicates_total', 0)):,}",
        f"  commits {int(f.get('commits_total', 0)):,}, failed {int(f.get('commit_failures_total', 0)):,}, "
        f"last {f.get('last_commit_seconds', 0) * 1000:.2f} ms",
        f"  sessions opened {int(f.get('sessions_opened_total', 0)):,}, "
        f"resumed {int(f.get('sessions_resumed_total', 0)):,}, expired {int(f.get('sessions_expired_total', 0)):,}",
        "  errors " + (", ".join(f"{k} {v:,}" for k, v in sorted(errors.items())) or "none"),
    ]
    return "\n".join(lines)


def status_main(argv: list[str]) -> int:
    """``zchat-broker status``: a running broker's figures, once or every ``--watch`` seconds."""
    parser = _stats_parser("zchat-broker status", "Show a running broker's figures.")
    parser.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until interrupted")
    parser.add_argument("--json", action="store_true", help="print the raw figures as one JSON object")
    args = parser.parse_args(argv)
    router, curve = _router(parser, args)
    previous: StatsReply | None = None
    try:
        while True:
            try:
                stats = _ask_stats(router, args.timeout, curve)
            except (TimeoutError, ProtocolError) as exc:
                print(f"zchat-broker status: {exc}", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps({"version": stats.version, "uptime": stats.uptime, **stats.counters}), flush=True)
            else:
                print(format_status(stats, previous, args.watch or 0), flush=True)
            if not args.watch:
                return 0
            previous = stats
            time.sleep(args.watch)
            if not args.json:
                print(flush=True)
    except KeyboardInterrupt:
        return 0


SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {
    "export": export_main,
    "status": status_main,
    "check": check_main,
}
