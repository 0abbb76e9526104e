"""The broker's I/O layer: two ZeroMQ sockets and one loop around :class:`BrokerCore`.

Each loop turn blocks in ``zmq_poll`` until something is readable, then *drains* what is
already queued without blocking (up to a batch), lets the core decide, and sends the turn's
replies and publications. Per-batch work is paid once per batch, not once per message.
Frames move with plain ``recv()``/``send()``: ``recv_multipart``/``send_multipart`` cost
several microseconds more per message.

Neither socket can block the loop: a ROUTER (without ROUTER_MANDATORY) drops a reply to a
peer that is gone or over its high-water mark, and an XPUB drops for a subscriber that is
over its high-water mark.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import zmq

from zchat.common.keys import KeyPair, load_secret_key

from ._version import __version__
from .config import BrokerConfig
from .core import BrokerCore, Subscription
from .store import Durability, MemoryStore, SqliteStore, Store
from .zap import ZAP_DOMAIN, ZAP_ENDPOINT, ZapHandler

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("zchat.broker")

#: Requests read from the ROUTER before the turn's output is committed and flushed. Small
#: enough that the first replies and publications leave (libzmq's I/O thread sends them, on
#: another core) while the next messages are handled, rather than all after the last one;
#: large enough that a commit serves many (each commit rewrites the pages its rows touch,
#: and more, smaller ones mean more WAL per message). Measured, accepted msg/s, two runs
#: each on a noisy machine (SQLite; memory):
#: one publisher:          1,024: 32k, 32k; 43-54k   128: 36k, 42k; 39-59k   32: 36k, 37k; 50-62k
#: 4 publishers x 4 rooms: 1,024: 38k, 41k; 58-61k   128: 36k, 47k; 55-69k   32: 30k, 30k; 47-52k
BATCH = 128
#: The same with --durability full, where each commit waits for an fsync (milliseconds):
#: there a commit must serve as many requests as have arrived.
BATCH_FSYNC = 1024
#: Messages read from the XPUB (subscriptions) or the ZAP socket (handshakes) in one turn:
#: neither waits for a commit, and a reconnecting crowd brings thousands at once.
BATCH_OTHER = 1024
#: Largest subscription message accepted on the XPUB: "\x01" + a room topic (at most
#: 2 + 64 * 4 + 1 UTF-8 bytes) or a sync subscription (~72 bytes). libzmq keeps a record of
#: every subscription a peer asks for, granted or not, so this bounds what each costs.
MAX_SUBSCRIPTION_FRAME = 300
#: Replies queued per peer before the ROUTER drops for it: a peer that asks and never reads
#: costs at most this many replies (history pages are capped at 256 KB of text).
ROUTER_SNDHWM = 200
#: Publications queued per subscriber before the XPUB drops for it (a burst of one loop
#: turn is up to BATCH_FSYNC messages; ~2 MB for 120-byte texts). What a slow subscriber loses
#: beyond it, it fetches from history.
XPUB_SNDHWM = 10_000
#: How long close() may spend delivering queued frames, in milliseconds.
LINGER_MS = 500
#: Pending connections the kernel queues per listening socket (capped by net.core.somaxconn).
LISTEN_BACKLOG = 4096
#: TCP keepalive: probe a connection idle this many seconds, every INTERVAL, COUNT times;
#: a peer that answers none is dropped (about a minute after it went silent).
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 30, 10, 3
#: Seconds between retention passes, and most messages one pass deletes.
PRUNE_EVERY, PRUNE_BUDGET = 1.0, 2000


def open_store(config: BrokerConfig) -> Store:
    """The store ``config`` asks for: SQLite under ``data_dir`` (default) or memory."""
    if config.store == "memory":
        return MemoryStore()
    path = config.data_dir / SqliteStore.FILENAME
    max_pages = config.store_max_mb * 1024 * 1024 // 4096 if config.store_max_mb else None
    return SqliteStore(path, config.durability, max_pages)


def _user_id(frame: zmq.Frame) -> str | None:
    """The CURVE key ZAP approved for the connection ``frame`` came from (its ZAP user id).

    None for a message libzmq made itself: the XPUB's unsubscriptions for a peer that left.
    """
    try:
        return str(frame.get("User-Id"))
    except zmq.ZMQError:  # EINVAL: the message carries no metadata
        return None


class Broker:
    """A running broker: binds on construction, serves until :meth:`stop`.

    ``router_endpoint``/``pub_endpoint`` are the endpoints actually bound (with the port the
    OS chose when the configured endpoint ends in ``:*``).

    With ``config.curve_secret_key`` (secure mode) both sockets are CURVE servers and a ZAP
    handler (:mod:`zchat.broker.zap`) served on this loop decides who may connect; it is
    bound before them, and ZAP_ENFORCE_DOMAIN makes libzmq refuse every handshake it has
    not approved. Each request and subscription then reaches the core with the client's
    public key, read from the message's ``User-Id`` property.

    Raises:
        KeyFileError: secure mode, and the secret key file or the authorized-keys directory
            cannot be used.
        zmq.ZMQError: an endpoint cannot be bound.
    """

    def __init__(
        self,
        config: BrokerConfig,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        store: Store | None = None,
    ) -> None:
        self.config = config
        #: The broker's CURVE key pair, and the ZAP handler, in secure mode.
        self.curve: KeyPair | None = None
        self.zap: ZapHandler | None = None
        if config.curve_secret_key is not None:
            assert config.authorized_keys is not None  # BrokerConfig checks it
            self.curve = load_secret_key(config.curve_secret_key)
            self.zap = ZapHandler(config.authorized_keys, self.curve.public)
        self.store = store if store is not None else open_store(config)
        self.core = BrokerCore(
            store=self.store,
            limits=config.limits,
            motd=config.motd,
            session_timeout=config.session_timeout,
            max_page=config.max_page,
            tick_interval=config.tick_interval,
            version=__version__,
            secure=self.zap is not None,
            rate_limits=config.rate_limits,
        )
        if self.zap is not None:
            zap = self.zap
            self.core.key_allowed = lambda key: key in zap.allowed
        #: Seconds the last store commit took (for metrics and the benchmark).
        self.last_commit_seconds = 0.0
        fsync_each_commit = isinstance(self.store, SqliteStore) and config.durability is Durability.FULL
        self._batch = BATCH_FSYNC if fsync_each_commit else BATCH
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._own_context = context is None
        self._closed = False
        #: The Prometheus endpoint, when --metrics-port is set; metrics.port is the real port.
        self.metrics: Metrics | None = None
        self._ctx = context or zmq.Context()
        self._stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._zap_socket: zmq.Socket[bytes] | None = None
        self.router = self._socket(zmq.ROUTER, config.limits.max_frame, config.router)
        self.xpub = self._socket(zmq.XPUB, MAX_SUBSCRIPTION_FRAME, config.pub)
        # Manual mode: a subscription takes effect only when we grant it (handle_subscription).
        self.xpub.setsockopt(zmq.XPUB_MANUAL, 1)
        self.xpub.setsockopt(zmq.SNDHWM, XPUB_SNDHWM)
        self.router.setsockopt(zmq.SNDHWM, ROUTER_SNDHWM)
        try:
            if self.zap is not None:
                # The handler first: libzmq must never see a handshake before it can ask.
                self._zap_socket = self._ctx.socket(zmq.ROUTER)
                self._zap_socket.setsockopt(zmq.LINGER, 0)
                self._zap_socket.bind(ZAP_ENDPOINT)
            self.router.bind(config.router)
            self.xpub.bind(config.pub)
        except zmq.ZMQError:
            self.close()
            raise
        self.router_endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pub_endpoint = self.xpub.getsockopt_string(zmq.LAST_ENDPOINT)
        if config.metrics_port is not None:
            # Imported only when asked for: prometheus_client and the http modules it pulls in
            # cost every broker ~7 MB and 40 ms of start-up otherwise.
            from .metrics import Metrics

            self.metrics = Metrics(lambda: self.submit(self.core.snapshot))
            try:
                self.metrics.serve(config.metrics_host, config.metrics_port)
            except OSError:
                self.close()
                raise

    def _socket(self, kind: int, max_msg_size: int, endpoint: str) -> zmq.Socket[bytes]:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        if endpoint.startswith("tcp://["):
            sock.setsockopt(zmq.IPV6, 1)
        # A peer that sends a larger frame is disconnected by libzmq before we read it.
        sock.setsockopt(zmq.MAXMSGSIZE, max_msg_size)
        # Dead peers (a crashed host, a cut cable) and their queues are reaped by TCP
        # keepalive, in the kernel, not by ZMTP heartbeats: libzmq 4.3 cancels a heartbeat
        # timer with a scan of every timer of its I/O thread, so with thousands of
        # connections heartbeats alone kept that thread busy and pings waited seconds
        # (BENCHMARKS.md). Sessions still end after --session-timeout of silence.
        # Thousands of clients may connect at once (a broker restart): libzmq's default
        # listen backlog of 100 would overflow, and the kernel would drop SYNs or fall back to
        # SYN cookies, delaying those connections by retransmission timeouts.
        sock.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE)
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_COUNT)
        if self.curve is not None:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.curve.secret.encode("ascii"))
            sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
            # Without it libzmq accepts every CURVE client when no handler answers
            # (libzmq's backward-compatible default); with it, none.
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        return sock

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` has been called."""
        return self._stopping

    def stop(self) -> None:
        """Ask the loop to finish its turn and return; safe from any thread or signal handler."""
        self._stopping = True
        self._wake()

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on the loop's thread between two turns; thread-safe.

        The returned future holds its result. For reloads, tests and tools that must touch
        the broker's state without racing the loop.
        """
        future: Future[Any] = Future()
        self._calls.put((fn, future))
        self._wake()
        return future

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError: already woken; OSError: closed
            self._wake_w.send(b"\0")

    def serve_forever(self) -> None:
        """Run the loop until :meth:`stop` is called, then close the sockets and the store."""
        log.info("zchat broker serving: router=%s pub=%s", self.router_endpoint, self.pub_endpoint)
        poller = zmq.Poller()
        for sock in (self.router, self.xpub, self._wake_r, self._zap_socket):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        # Secure mode reads each message's User-Id; the insecure hot path stays as it was.
        drain_router = self._drain_router if self.zap is None else self._drain_router_secure
        core = self.core
        now = time.monotonic()
        next_sweep = now + self._sweep_every()
        next_prune = now + PRUNE_EVERY
        metrics, turns = self.metrics, 0
        try:
            while not self._stopping:
                deadline = min(next_sweep, core.next_tick_at(), next_prune)
                ready = poller.poll(max(0, int((deadline - time.monotonic()) * 1000) + 1))
                turn_start = time.perf_counter()
                mono = time.monotonic()
                core.set_time(time.time(), mono)
                for sock, _ in ready:
                    if sock is self.router:
                        drain_router()
                    elif sock is self.xpub:
                        self._drain_xpub()
                    elif sock is self._zap_socket:
                        self._drain_zap(mono)
                    else:
                        self._drain_wakeup()
                self._commit()
                config = self.config  # reload() may replace it between turns
                if mono >= next_sweep:
                    self._sweep(mono)
                    next_sweep = mono + self._sweep_every()
                core.tick()  # the ticks that are due, if any (a heap peek when none)
                if mono >= next_prune:
                    core.prune(config.retention_messages, config.retention_seconds, PRUNE_BUDGET)
                    next_prune = mono + PRUNE_EVERY
                self._flush()
                turns += 1
                if metrics is not None:
                    metrics.turn_seconds.observe(time.perf_counter() - turn_start)
                if turns & 0xFF == 0:
                    core.io_figures["loop_turns_total"] = turns
            # Stopping: this turn's messages are committed and sent; tell every session we
            # are going, so clients reconnect to our successor at once instead of waiting
            # for a heartbeat to fail.
            core.io_figures["loop_turns_total"] = turns
            core.going_away()
            self._flush()
        finally:
            self.close()
        log.info("zchat broker stopped")

    def _sweep(self, mono: float) -> None:
        """End silent sessions; in secure mode, notice changes to the authorized keys."""
        self.core.expire_sessions()
        self._refresh_keys(mono)

    def _sweep_every(self) -> float:
        return min(1.0, self.config.session_timeout / 4)

    def reload(self, fresh: BrokerConfig) -> None:
        """Apply what can change while running (call on the loop's thread: :meth:`submit`).

        The motd, retention, tick interval and session timeout take effect (log settings are
        the caller's); endpoints, store, data directory, metrics endpoint and size limits
        need a restart, and a change to them is logged.
        """
        for name in ("router", "pub", "store", "data_dir", "durability", "metrics_port", "metrics_host"):
            if getattr(fresh, name) != getattr(self.config, name):
                log.warning("%s changed to %r: restart the broker to apply it", name, getattr(fresh, name))
        keep = {name: getattr(self.config, name) for name in ("router", "pub", "store", "data_dir", "durability",
                                                              "metrics_port", "metrics_host", "limits",
                                                              "curve_secret_key", "authorized_keys")}
        self.config = dataclasses.replace(fresh, **keep)
        self.core.motd = fresh.motd
        self.core.set_rate_limits(fresh.rate_limits)
        self.core.max_page = fresh.max_page
        self.core.tick_interval = fresh.tick_interval
        self.core.session_timeout, self.core.heartbeat = fresh.session_timeout, fresh.session_timeout / 3
        for name in ("curve_secret_key", "authorized_keys"):
            if getattr(fresh, name) != getattr(self.config, name):
                log.warning("%s changed to %r: restart the broker to apply it", name, getattr(fresh, name))
        self._refresh_keys(time.monotonic(), force=True)
        log.info("settings reloaded")

    def _commit(self) -> None:
        if self.core.staged:
            start = time.perf_counter()
            self.core.commit()
            self.last_commit_seconds = time.perf_counter() - start
            self.core.io_figures["last_commit_seconds"] = self.last_commit_seconds
            if self.metrics is not None:
                self.metrics.commit_seconds.observe(self.last_commit_seconds)

    def _drain_router(self) -> None:
        recv, core = self.router.recv, self.core
        for _ in range(self._batch):
            try:
                peer = recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            # A ROUTER message is atomic: the body frame is already here. Frame.more is about a
            # microsecond cheaper than getsockopt(RCVMORE).
            frame = recv(copy=False)
            if frame.more:
                core.handle_bad_frames(peer, 1 + self._discard_rest(self.router))
            else:
                core.handle_request(peer, frame.bytes)

    def _drain_router_secure(self) -> None:
        """:meth:`_drain_router` for secure mode: each request comes with its sender's key."""
        recv, core, zap = self.router.recv, self.core, self.zap
        assert zap is not None
        for _ in range(self._batch):
            try:
                peer = recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            frame = recv(copy=False)
            # The key ZAP approved for this connection (its reply's user id), set by libzmq.
            key = _user_id(frame)
            if frame.more:
                core.handle_bad_frames(peer, 1 + self._discard_rest(self.router))
            elif key in zap.allowed:
                core.handle_request(peer, frame.bytes, key)
            # else: its key was revoked after its handshake; the connection stays open (libzmq
            # cannot close one peer's) but is heard no more.

    def _drain_xpub(self) -> None:
        xpub, core, zap = self.xpub, self.core, self.zap
        key: str | None = None
        for _ in range(BATCH_OTHER):
            try:
                if zap is None:
                    message = xpub.recv(zmq.NOBLOCK)
                else:
                    frame = xpub.recv(zmq.NOBLOCK, copy=False)
                    message, key = frame.bytes, _user_id(frame)
            except zmq.Again:
                core.xpub_drained()
                return
            if xpub.getsockopt(zmq.RCVMORE):
                self._discard_rest(xpub)  # a multipart message from an XSUB: not ours to read
                core.handle_xpub_junk()
                continue
            if zap is not None and key not in zap.allowed and message[:1] == b"\x01":
                continue  # a revoked key's connection gets no new subscription
            # In manual mode SUBSCRIBE/UNSUBSCRIBE apply to the pipe the last message came from,
            # so the decision must be applied before the next recv.
            decision = core.handle_subscription(message, key)
            if decision is Subscription.GRANT:
                xpub.setsockopt(zmq.SUBSCRIBE, message[1:])
            elif decision is Subscription.UNSUBSCRIBE:
                xpub.setsockopt(zmq.UNSUBSCRIBE, message[1:])

    def _drain_zap(self, now: float) -> None:
        """Answer the ZAP requests libzmq sent for new connections (secure mode)."""
        sock, zap = self._zap_socket, self.zap
        assert sock is not None and zap is not None
        for _ in range(BATCH_OTHER):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            # ROUTER envelope: libzmq's routing id and the empty delimiter, then the request.
            sock.send_multipart([*frames[:2], *zap.handle(frames[2:], now)])
        self._after_keys_checked()

    def _refresh_keys(self, now: float, *, force: bool = False) -> None:
        """Re-read the authorized-keys directory if it changed (at most every CHECK_EVERY s)."""
        if self.zap is not None:
            self.zap.refresh(now, force=force)
            self._after_keys_checked()

    def _after_keys_checked(self) -> None:
        zap = self.zap
        assert zap is not None
        if zap.take_revoked():
            ended = self.core.keys_revoked(set(zap.allowed))
            log.info("authorized keys changed: %d sessions of removed keys ended", ended)
        self.core.io_figures["handshakes_accepted_total"] = zap.accepted
        self.core.io_figures["handshakes_refused_total"] = zap.refused

    @staticmethod
    def _discard_rest(sock: zmq.Socket[bytes]) -> int:
        count = 0
        while sock.getsockopt(zmq.RCVMORE):
            sock.recv()
            count += 1
        return count

    def _drain_wakeup(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(64):
                pass
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as exc:  # handed to the submitter, who re-raises it
                    future.set_exception(exc)

    def _flush(self) -> None:
        replies, publishes = self.core.take_output()
        send = self.router.send
        for peer, frame in replies:
            send(peer, zmq.SNDMORE)
            send(frame)
        send = self.xpub.send
        for topic, frame in publishes:
            send(topic, zmq.SNDMORE)
            send(frame)

    def close(self) -> None:
        """Close the sockets (delivering queued frames for up to LINGER_MS), store and context."""
        if self._closed:
            return
        self._closed = True
        if self.metrics is not None:
            self.metrics.close()
        for sock in (self.router, self.xpub):
            sock.close()
        if self._zap_socket is not None:
            self._zap_socket.close()
        self.store.close()
        self._wake_r.close()
        self._wake_w.close()
        if self._own_context:
            self._ctx.term()
