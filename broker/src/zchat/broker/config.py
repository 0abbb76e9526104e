"""The broker's configuration: one frozen dataclass built from flags over ``ZCHAT_*`` variables."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zchat.common import config as c
from zchat.common.errors import ConfigError
from zchat.common.limits import DEFAULT_LIMITS, Limits

from .ratelimit import Rate, RateLimits
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
#: The broker's CURVE secret key file (NAME.key_secret); setting it turns secure mode on.
ENV_CURVE_SECRET_KEY = "ZCHAT_CURVE_SECRET_KEY"
#: The directory of client public key files (NAME.key) allowed to connect in secure mode.
ENV_AUTHORIZED_KEYS = "ZCHAT_AUTHORIZED_KEYS"
ENV_RATE_MESSAGES = "ZCHAT_RATE_MESSAGES"
ENV_RATE_BYTES = "ZCHAT_RATE_BYTES"
ENV_RATE_SUBSCRIPTIONS = "ZCHAT_RATE_SUBSCRIPTIONS"
ENV_RATE_HISTORY = "ZCHAT_RATE_HISTORY"
ENV_FLOOD_STRIKES = "ZCHAT_FLOOD_STRIKES"
ENV_FLOOD_PENALTY = "ZCHAT_FLOOD_PENALTY"
ENV_NO_RATE_LIMITS = "ZCHAT_NO_RATE_LIMITS"
ENV_MAX_SESSIONS_PER_KEY = "ZCHAT_MAX_SESSIONS_PER_KEY"

_RATES = RateLimits()


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
             "seconds of quiet after a channel's last message before its first tick (then 2, 4, ... times)",
             "SECONDS"),
    c.Option("log_format", "--log-format", c.ENV_LOG_FORMAT, "text", c.parse_log_format,
             "log format: text or json (one object per line)", "FORMAT"),
    c.Option("metrics_port", "--metrics-port", ENV_METRICS_PORT, None, _port,
             "serve Prometheus metrics over HTTP on this port (unset: off)", "PORT"),
    c.Option("metrics_host", "--metrics-host", ENV_METRICS_HOST, "127.0.0.1", c.parse_text,
             "address the metrics endpoint binds", "HOST"),
    c.Option("insecure", "--insecure", ENV_INSECURE, False, c.parse_bool,
             "allow binding addresses other than loopback without encryption or authentication",
             const="true"),
    c.Option("curve_secret_key", "--curve-secret-key", ENV_CURVE_SECRET_KEY, None, Path,
             "the broker's CURVE secret key file (zchat-keygen); turns on encryption and authentication",
             "FILE"),
    c.Option("authorized_keys", "--authorized-keys", ENV_AUTHORIZED_KEYS, None, Path,
             "directory of the client public keys (NAME.key) allowed to connect; re-read when it changes",
             "DIR"),
    c.Option("rate_messages", "--rate-messages", ENV_RATE_MESSAGES, _RATES.messages, Rate.parse,
             "messages (say, dm) per second per identity / burst, or 0 for no limit", "RATE/BURST"),
    c.Option("rate_bytes", "--rate-bytes", ENV_RATE_BYTES, _RATES.bytes, Rate.parse,
             "bytes of messages per second per identity / burst, or 0", "RATE/BURST"),
    c.Option("rate_subscriptions", "--rate-subscriptions", ENV_RATE_SUBSCRIPTIONS, _RATES.subscriptions,
             Rate.parse, "joins (and, with CURVE, subscriptions) per second per identity / burst, or 0",
             "RATE/BURST"),
    c.Option("rate_history", "--rate-history", ENV_RATE_HISTORY, _RATES.history, Rate.parse,
             "history requests per second per identity / burst, or 0", "RATE/BURST"),
    c.Option("flood_strikes", "--flood-strikes", ENV_FLOOD_STRIKES, _RATES.strikes, c.parse_non_negative_int,
             "refusals within 10 s that disconnect an identity for --flood-penalty (0: never)", "COUNT"),
    c.Option("flood_penalty", "--flood-penalty", ENV_FLOOD_PENALTY, _RATES.penalty, c.parse_non_negative_float,
             "seconds a flooding identity is kept out", "SECONDS"),
    c.Option("no_rate_limits", "--no-rate-limits", ENV_NO_RATE_LIMITS, False, c.parse_bool,
             "turn flood control off (benchmarks, trusted networks)", const="true"),
    c.Option("max_sessions_per_key", "--max-sessions-per-key", ENV_MAX_SESSIONS_PER_KEY,
             DEFAULT_LIMITS.max_sessions_per_key, c.parse_positive_int,
             "sessions one client key may hold at once (CURVE mode)", "COUNT"),
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
    #: The CURVE secret key file; None runs without encryption or authentication.
    curve_secret_key: Path | None = None
    #: The directory of authorized client public keys (required with curve_secret_key).
    authorized_keys: Path | None = None
    #: Flood control per identity; None turns it off.
    rate_limits: RateLimits | None = field(default_factory=RateLimits)

    @property
    def retention_seconds(self) -> float | None:
        """The age limit in seconds, or None for none."""
        return self.retention_days * 86400 if self.retention_days > 0 else None

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> BrokerConfig:
        """Build from :func:`zchat.common.config.resolve`'s output for :data:`OPTIONS`."""
        limits = Limits(max_frame=values["max_frame"], max_text=values["max_text"],
                        max_sessions_per_key=values["max_sessions_per_key"])
        rates = RateLimits(values["rate_messages"], values["rate_bytes"], values["rate_subscriptions"],
                           values["rate_history"], values["flood_strikes"], penalty=values["flood_penalty"])
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
            curve_secret_key=values["curve_secret_key"],
            authorized_keys=values["authorized_keys"],
            rate_limits=None if values["no_rate_limits"] else rates,
        )

    def __post_init__(self) -> None:
        if self.curve_secret_key is not None and self.authorized_keys is None:
            raise ConfigError("--authorized-keys", None, "required with --curve-secret-key: the directory of "
                              "the client public keys allowed to connect")
        if self.authorized_keys is not None and self.curve_secret_key is None:
            raise ConfigError("--authorized-keys", str(self.authorized_keys),
                              "needs --curve-secret-key (the broker's own key) to take effect")

    @property
    def secure(self) -> bool:
        """CURVE encryption and authentication are on."""
        return self.curve_secret_key is not None

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
