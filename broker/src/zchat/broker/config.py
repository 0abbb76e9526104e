"""The broker's configuration: one frozen dataclass built from flags over ``ZCHAT_*`` variables."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zchat.common import config as c
from zchat.common.limits import DEFAULT_LIMITS, Limits

from .store import Durability, default_data_dir

ENV_DATA_DIR = "ZCHAT_DATA_DIR"
ENV_STORE = "ZCHAT_STORE"
ENV_DURABILITY = "ZCHAT_DURABILITY"
ENV_RETENTION_MESSAGES = "ZCHAT_RETENTION_MESSAGES"
ENV_RETENTION_DAYS = "ZCHAT_RETENTION_DAYS"
ENV_STORE_MAX_MB = "ZCHAT_STORE_MAX_MB"
ENV_MAX_PAGE = "ZCHAT_MAX_PAGE"
ENV_TICK_INTERVAL = "ZCHAT_TICK_INTERVAL"
ENV_METRICS_PORT = "ZCHAT_METRICS_PORT"
ENV_METRICS_HOST = "ZCHAT_METRICS_HOST"
ENV_INSECURE = "ZCHAT_INSECURE"


def _port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError("expected a port number, 0 to 65535")
    return number


def _choice(*allowed: str) -> Any:
    def parse(value: str) -> str:
        value = value.strip().lower()
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return value

    return parse

#: Every broker option: flag, environment variable, default, parser.
OPTIONS = (
    c.Option("router", "--router", c.ENV_ROUTER, c.DEFAULT_ROUTER, c.parse_endpoint,
             "endpoint the ROUTER binds (requests)", "ENDPOINT"),
    c.Option("pub", "--pub", c.ENV_PUB, c.DEFAULT_PUB, c.parse_endpoint,
             "endpoint the XPUB binds (events)", "ENDPOINT"),
    c.Option("motd", "--motd", c.ENV_MOTD, "Welcome to zchat.", c.parse_text,
             "message of the day sent in every welcome", "TEXT"),
    c.Option("session_timeout", "--session-timeout", c.ENV_SESSION_TIMEOUT, c.DEFAULT_SESSION_TIMEOUT,
             c.parse_positive_float, "seconds of silence before a session ends", "SECONDS"),
    c.Option("max_frame", "--max-frame", c.ENV_MAX_FRAME, DEFAULT_LIMITS.max_frame,
             c.parse_positive_int, "largest request frame in bytes", "BYTES"),
    c.Option("max_text", "--max-text", c.ENV_MAX_TEXT, DEFAULT_LIMITS.max_text,
             c.parse_positive_int, "longest message text in characters", "CHARS"),
    c.Option("log_level", "--log-level", c.ENV_LOG_LEVEL, "INFO", c.parse_log_level,
             "log level: debug, info, warning, error", "LEVEL"),
    c.Option("data_dir", "--data-dir", ENV_DATA_DIR, default_data_dir(), Path,
             "directory of the message store", "DIR"),
    c.Option("store", "--store", ENV_STORE, "sqlite", _choice("sqlite", "memory"),
             "message store: sqlite (durable) or memory (nothing survives a restart)", "KIND"),
    c.Option("durability", "--durability", ENV_DURABILITY, Durability.NORMAL,
             lambda v: Durability(_choice(*Durability)(v)),
             "SQLite synchronous level: off, normal (survives kill -9), full (survives power loss)", "LEVEL"),
    c.Option("retention_messages", "--retention-messages", ENV_RETENTION_MESSAGES, 100_000,
             c.parse_positive_int, "messages kept per room or DM inbox", "COUNT"),
    c.Option("retention_days", "--retention-days", ENV_RETENTION_DAYS, 0.0, c.parse_non_negative_float,
             "days a message is kept (0: no age limit)", "DAYS"),
    c.Option("store_max_mb", "--store-max-mb", ENV_STORE_MAX_MB, 0, c.parse_non_negative_int,
             "size quota of the SQLite store in MiB (0: none); over it, sends get 'unavailable'", "MIB"),
    c.Option("max_page", "--max-page", ENV_MAX_PAGE, 200, c.parse_positive_int,
             "most messages one history reply holds", "COUNT"),
    c.Option("tick_interval", "--tick-interval", ENV_TICK_INTERVAL, 1.0, c.parse_positive_float,
             "seconds between ticks announcing active channels' last seq", "SECONDS"),
    c.Option("log_format", "--log-format", c.ENV_LOG_FORMAT, "text", c.parse_log_format,
             "log format: text or json (one object per line)", "FORMAT"),
    c.Option("metrics_port", "--metrics-port", ENV_METRICS_PORT, None, _port,
             "serve Prometheus metrics over HTTP on this port (unset: off)", "PORT"),
    c.Option("metrics_host", "--metrics-host", ENV_METRICS_HOST, "127.0.0.1", c.parse_text,
             "address the metrics endpoint binds", "HOST"),
    c.Option("insecure", "--insecure", ENV_INSECURE, False, c.parse_bool,
             "allow binding addresses other than loopback without encryption or authentication",
             const="true"),
)


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Everything the broker needs to start. Defaults bind loopback only."""

    router: str = c.DEFAULT_ROUTER
    pub: str = c.DEFAULT_PUB
    motd: str = "Welcome to zchat."
    session_timeout: float = c.DEFAULT_SESSION_TIMEOUT
    log_level: str = "INFO"
    limits: Limits = field(default=DEFAULT_LIMITS)
    data_dir: Path = field(default_factory=default_data_dir)
    store: str = "sqlite"
    durability: Durability = Durability.NORMAL
    retention_messages: int = 100_000
    retention_days: float = 0.0
    store_max_mb: int = 0
    max_page: int = 200
    tick_interval: float = 1.0
    log_format: str = "text"
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    insecure: bool = False

    @property
    def retention_seconds(self) -> float | None:
        """The age limit in seconds, or None for none."""
        return self.retention_days * 86400 if self.retention_days > 0 else None

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> BrokerConfig:
        """Build from :func:`zchat.common.config.resolve`'s output for :data:`OPTIONS`."""
        limits = Limits(max_frame=values["max_frame"], max_text=values["max_text"])
        return cls(
            router=values["router"],
            pub=values["pub"],
            motd=values["motd"],
            session_timeout=values["session_timeout"],
            log_level=values["log_level"],
            limits=limits,
            data_dir=values["data_dir"],
            store=values["store"],
            durability=values["durability"],
            retention_messages=values["retention_messages"],
            retention_days=values["retention_days"],
            store_max_mb=values["store_max_mb"],
            max_page=values["max_page"],
            tick_interval=values["tick_interval"],
            log_format=values["log_format"],
            metrics_port=values["metrics_port"],
            metrics_host=values["metrics_host"],
            insecure=values["insecure"],
        )

    def exposed_endpoints(self) -> list[str]:
        """The endpoints that other machines could reach (not loopback, ipc or inproc)."""
        return [e for e in (self.router, self.pub) if not is_local_endpoint(e)]


def is_local_endpoint(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address (127.0.0.0/8, ::1, a name
    that resolves only to loopback). A wildcard (*, 0.0.0.0, ::) or an interface is not."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    if host in ("*", "0.0.0.0", "::", ""):
        return False
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False  # an interface name (eth0) or an unknown host: treat as exposed
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
