"""``zchat-broker``: run the broker; its subcommands ``export``, ``status`` and ``check``.

* ``zchat-broker [OPTIONS]`` serves until SIGINT or SIGTERM; SIGHUP reloads the settings
  that can change while it runs (log level and format, motd, retention, tick interval) and
  re-reads the authorized-keys directory in secure mode.
* ``zchat-broker export --room ROOM`` writes a room's stored history as JSON lines.
* ``zchat-broker status`` prints a running broker's figures; ``zchat-broker check`` exits 0
  if a broker answers (the Docker HEALTHCHECK).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from types import FrameType

import zmq

from zchat.common.config import add_options, resolve, setup_logging
from zchat.common.errors import ConfigError, KeyFileError

from . import tools
from ._version import __version__
from .config import OPTIONS, BrokerConfig
from .server import Broker

log = logging.getLogger("zchat.broker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zchat-broker",
        description="The zchat broker. Clients connect a DEALER to --router and a SUB to --pub. "
        "Subcommands: export (a room's history as JSON lines), status (a running broker's figures), "
        "check (exit 0 if a broker answers); 'zchat-broker SUBCOMMAND --help'.",
    )
    parser.add_argument("--version", action="version", version=f"zchat-broker {__version__}")
    add_options(parser, OPTIONS)
    return parser


#: Allocations between two collections of the youngest generation (CPython's default: 700).
GC_THRESHOLD = 50_000


def tune_gc() -> None:
    """Collect garbage far less often: the broker's process is ours.

    The loop allocates a handful of short-lived objects per message (envelopes, replies,
    stored rows) and makes no reference cycles of its own, so the cyclic collector finds
    nothing, yet at full speed its generation-0 passes every 700 allocations cost ~15 % of
    the loop's time (a BrokerCore micro-benchmark: 11.7 -> 9.5 µs a message). Objects made
    at start-up are moved out of the collector's sight (``gc.freeze``).
    """
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 50, 100)


def main(argv: list[str] | None = None) -> int:
    """Parse options, bind, serve until SIGINT/SIGTERM; return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    subcommand = tools.SUBCOMMANDS.get(argv[0]) if argv else None
    if subcommand is not None:
        return subcommand(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = BrokerConfig.from_values(resolve(OPTIONS, args, os.environ, section="broker"))
    except ConfigError as exc:
        parser.error(str(exc))
    setup_logging(config.log_level, config.log_format)
    exposed = [] if config.secure else config.exposed_endpoints()  # CURVE: any address
    if exposed and not config.insecure:
        parser.error(
            f"refusing to bind {', '.join(exposed)}: only loopback is served without encryption and "
            "authentication; give the broker a key (--curve-secret-key and --authorized-keys), or pass "
            "--insecure (or ZCHAT_INSECURE=1) to accept anyone who can reach it"
        )
    if exposed:
        log.warning("serving %s WITHOUT encryption or authentication (--insecure): anyone who can "
                    "reach these ports can read public rooms and post", ", ".join(exposed))
    try:
        broker = Broker(config)
    except KeyFileError as exc:
        parser.error(f"secure mode: {exc}")
    except zmq.ZMQError as exc:
        print(f"zchat-broker: cannot bind {config.router} / {config.pub}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the metrics endpoint
        where = f"{config.metrics_host}:{config.metrics_port}"
        print(f"zchat-broker: cannot serve metrics on {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not broker.stopping:
            log.info("received %s, stopping", signal.Signals(signum).name)
        broker.stop()

    def reload() -> None:
        try:
            fresh = BrokerConfig.from_values(resolve(OPTIONS, args, os.environ, section="broker"))
        except ConfigError as exc:
            log.error("reload refused, keeping the running settings: %s", exc)
            return
        setup_logging(fresh.log_level, fresh.log_format)
        broker.reload(fresh)

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        log.info("received SIGHUP, reloading settings")
        broker.submit(reload)

    handlers = {signal.SIGINT: on_signal, signal.SIGTERM: on_signal, signal.SIGHUP: on_hangup}
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    tune_gc()
    # Tools and tests read this line to learn the ports chosen for tcp://...:* endpoints.
    print(f"zchat-broker ready router={broker.router_endpoint} pub={broker.pub_endpoint}", flush=True)
    try:
        broker.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
