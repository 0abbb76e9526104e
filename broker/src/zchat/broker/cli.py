"""``zchat-broker``: run the broker until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from types import FrameType

import zmq

from zchat.common.config import add_options, resolve, setup_logging
from zchat.common.errors import ConfigError

from . import __version__
from .config import OPTIONS, BrokerConfig
from .server import Broker

log = logging.getLogger("zchat.broker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zchat-broker",
        description="The zchat broker. Clients connect a DEALER to --router and a SUB to --pub.",
    )
    parser.add_argument("--version", action="version", version=f"zchat-broker {__version__}")
    add_options(parser, OPTIONS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse options, bind, serve until SIGINT/SIGTERM; return the exit status."""
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
