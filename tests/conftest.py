"""Shared fixtures: a real broker on loopback (OS-chosen ports) and clients that clean up.

Nothing here sleeps for a fixed time: helpers poll until a deadline.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import pytest
import zmq
from tests.support import Keys

from zchat.broker import Broker, BrokerConfig
from zchat.broker.ratelimit import RateLimits
from zchat.client import Client

LOOPBACK = "tcp://127.0.0.1:*"
READY = re.compile(rb"zchat-broker ready router=(\S+) pub=(\S+)")



@dataclass
class RunningBroker:
    """A broker serving on a thread of this process."""

    broker: Broker
    thread: threading.Thread

    @property
    def router(self) -> str:
        return self.broker.router_endpoint

    @property
    def pub(self) -> str:
        return self.broker.pub_endpoint

    def stop(self) -> None:
        self.broker.stop()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive(), "broker did not stop within 5 s"


#: The broker's default flood limits, for tests that want them: start_broker turns off limits
#: that *equal* the defaults (a config that does not mention them), so this copy differs in a
#: bound no test reaches.
DEFAULT_RATE_LIMITS = replace(RateLimits(), max_principals=RateLimits().max_principals + 1)


def start_broker(config: BrokerConfig | None = None, data_dir: Path | None = None) -> RunningBroker:
    """A broker on OS-chosen loopback ports; its SQLite store in ``data_dir`` (or a temp dir)."""
    config = config or BrokerConfig()
    if config.data_dir == BrokerConfig().data_dir:  # never the user's real data directory
        config = replace(config, data_dir=data_dir or Path(tempfile.mkdtemp(prefix="zchat-test-")))
    config = replace(config, router=LOOPBACK, pub=LOOPBACK)
    if config.rate_limits == RateLimits():
        # Tests send far faster than any person: flood control stays off unless a test
        # asks for limits of its own (tests/test_flood.py).
        config = replace(config, rate_limits=None)
    broker = Broker(config)
    thread = threading.Thread(target=broker.serve_forever, name="broker", daemon=True)
    thread.start()
    return RunningBroker(broker, thread)


@pytest.fixture
def broker_factory() -> Iterator[Callable[..., RunningBroker]]:
    """Start brokers with a given config; all are stopped at teardown."""
    started: list[RunningBroker] = []

    def factory(config: BrokerConfig | None = None) -> RunningBroker:
        running = start_broker(config)
        started.append(running)
        return running

    yield factory
    for running in started:
        running.stop()


@pytest.fixture
def broker(broker_factory: Callable[..., RunningBroker]) -> RunningBroker:
    """A broker with default settings."""
    return broker_factory()


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    """Key pairs in a 0700 directory, the broker's (``server``, not authorized) made."""
    (tmp_path / "keys").mkdir(mode=0o700)
    (tmp_path / "authorized").mkdir()
    made = Keys(tmp_path / "keys", tmp_path / "authorized")
    made.make("server", authorize=False)
    return made


@pytest.fixture
def secure(broker_factory: Callable[..., RunningBroker], keys: Keys) -> RunningBroker:
    """A broker in secure mode (CURVE, ``keys``' authorized directory), memory store."""
    config = BrokerConfig(curve_secret_key=keys.secret("server"), authorized_keys=keys.authorized, store="memory")
    return broker_factory(config)


@pytest.fixture
def curve_clients(secure: RunningBroker, keys: Keys) -> Iterator[Callable[..., Client]]:
    """``curve_clients(name)``: a Client of the secure broker with ``name``'s key (server key by default)."""
    made: list[Client] = []

    def factory(name: str | None, server: str = "server") -> Client:
        client = Client(secure.router, secure.pub, timeout=5.0,
                        server_key=str(keys.public(server)) if name else None,
                        key=keys.secret(name) if name else None)
        made.append(client)
        return client

    yield factory
    for client in made:
        client.close()


class Connect(Protocol):
    def __call__(self, rb: RunningBroker, nick: str | None, *rooms: str, timeout: float = 5.0) -> Client: ...


@pytest.fixture
def connect(broker_factory: Callable[..., RunningBroker]) -> Iterator[Connect]:
    """Make clients of any broker (``broker_factory`` ones with a custom config):
    ``connect(rb, nick, *rooms)`` connects and joins unless ``nick`` is None. Closed at
    teardown, before the brokers stop."""
    made: list[Client] = []

    def factory(rb: RunningBroker, nick: str | None, *rooms: str, timeout: float = 5.0) -> Client:
        client = Client(rb.router, rb.pub, timeout=timeout)
        made.append(client)
        if nick is not None:
            client.connect(nick)
            for room in rooms:
                client.join(room)
        return client

    yield factory
    for client in made:
        client.close()


@pytest.fixture
def client_factory(broker: RunningBroker, connect: Connect) -> Callable[..., Client]:
    """``connect`` for the default ``broker``: ``factory(nick, rooms...)``."""

    def factory(nick: str | None = None, *rooms: str, timeout: float = 5.0) -> Client:
        return connect(broker, nick, *rooms, timeout=timeout)

    return factory


@pytest.fixture
def zctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    """A raw ZeroMQ context for tests that speak the wire protocol by hand."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@dataclass
class BrokerProcess:
    """A broker running as ``python -m zchat.broker`` in a child process."""

    proc: subprocess.Popen[bytes]
    router: str
    pub: str


def spawn_broker(*args: str, env: dict[str, str] | None = None, timeout: float = 10.0) -> BrokerProcess:
    """Start a broker process on OS-chosen loopback ports and wait for its ready line."""
    cmd = [sys.executable, "-m", "zchat.broker", "--router", LOOPBACK, "--pub", LOOPBACK, *args]
    env = {"ZCHAT_DATA_DIR": tempfile.mkdtemp(prefix="zchat-test-"), "ZCHAT_NO_RATE_LIMITS": "1",
           **os.environ, **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(max(0.0, deadline - time.monotonic()))
    match = READY.search(result[0]) if result else None
    if match is None:
        proc.kill()
        proc.wait()
        raise AssertionError(f"broker did not report ready: {result!r}")
    return BrokerProcess(proc, match.group(1).decode(), match.group(2).decode())


@pytest.fixture
def broker_process() -> Iterator[Callable[..., BrokerProcess]]:
    """Start broker processes; each is killed at teardown if still running."""
    procs: list[BrokerProcess] = []

    def factory(*args: str, env: dict[str, str] | None = None) -> BrokerProcess:
        bp = spawn_broker(*args, env=env)
        procs.append(bp)
        return bp

    yield factory
    for bp in procs:
        if bp.proc.poll() is None:
            bp.proc.kill()
        bp.proc.wait(timeout=5)
        if bp.proc.stdout:
            bp.proc.stdout.close()


REPO = Path(__file__).resolve().parent.parent
