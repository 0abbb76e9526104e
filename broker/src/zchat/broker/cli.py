"""``zchat-broker``: run the broker until SIGINT or SIGTERM; ``zchat-broker export``: dump a room.

``zchat-broker [OPTIONS]`` serves. ``zchat-broker export --room ROOM [--since WHEN]`` writes
a room's stored history as JSON lines (read-only, safe beside a running broker).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import zmq

from zchat.common.config import add_options, resolve, setup_logging
from zchat.common.errors import ConfigError, ProtocolError
from zchat.common.names import normalize_room

from . import __version__
from .config import ENV_DATA_DIR, OPTIONS, BrokerConfig
from .server import Broker
from .store import SqliteStore, default_data_dir, export_room

log = logging.getLogger("zchat.broker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zchat-broker",
        description="The zchat broker. Clients connect a DEALER to --router and a SUB to --pub. "
        "'zchat-broker export --help' for exporting a room's history.",
    )
    parser.add_argument("--version", action="version", version=f"zchat-broker {__version__}")
    add_options(parser, OPTIONS)
    return parser


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


def main(argv: list[str] | None = None) -> int:
    """Parse options, bind, serve until SIGINT/SIGTERM; return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = BrokerConfig.from_values(resolve(OPTIONS, args, os.environ))
    except ConfigError as exc:
        parser.error(str(exc))
    setup_logging(config.log_level)
    try:
        broker = Broker(config)
    except zmq.ZMQError as exc:
        print(f"zchat-broker: cannot bind {config.router} / {config.pub}: {exc}", file=sys.stderr)
        return 1

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not broker.stopping:
            log.info("received %s, stopping", signal.Signals(signum).name)
        broker.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    # Tools and tests read this line to learn the ports chosen for tcp://...:* endpoints.
    print(f"zchat-broker ready router={broker.router_endpoint} pub={broker.pub_endpoint}", flush=True)
    try:
        broker.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
