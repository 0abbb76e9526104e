"""The broker's configuration: one frozen dataclass built from flags over ``ZCHAT_*`` variables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from zchat.common import config as c
from zchat.common.limits import DEFAULT_LIMITS, Limits

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
        )
