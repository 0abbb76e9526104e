"""Load generators: child processes that speak the wire protocol with raw pyzmq.

* :func:`publisher`: one session per room; keeps ``window`` unacknowledged ``say`` requests
  in flight (throughput), or sends at a fixed ``rate`` with the send time in the text
  (latency). Every ``say`` carries a ``cmid``, as the client library's do.
* :func:`subscribers`: many subscribers in one process, each a session (DEALER) and a SUB.
  Counting is cheap (:mod:`bench.wire`: the seq is read without decoding the frame);
  gaps in the seqs are PUB/SUB's losses; once the run ends each subscriber fetches what
  it missed with ``history after=`` over its DEALER (gap repair) and reports what is
  still missing.
* :func:`clients`: the scale case: many idle-ish clients (DEALER + SUB each) that ping on
  a schedule and say a trickle of messages; ping round trips are measured.

Each is a state machine driven by the benchmark over stdin (:mod:`bench.reactor`): it
prints ``{"ready": ...}``, waits for commands, prints ``{"result": ...}``. Every wait has
a deadline, and ``signal.alarm`` ends a worker that overruns its ``limit`` regardless.
"""

from __future__ import annotations

import heapq
import math
import secrets
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq
from bench.reactor import Control, Reactor, emit
from bench.session import Session, call_all, hello_join, subscribe_probed, subscribe_synced
from bench.wire import (
    TEXT,
    Checker,
    decode,
    message_seq,
    message_stamp,
    request,
    stamped_text,
)

SENT_PREFIX = b"\xa1v\x01\xa4kind\xa4sent"
#: Frames one handler call reads before another socket gets its turn.
BATCH = 256
#: Seconds without a new message after the run's end before a subscriber stops listening.
QUIET = 1.0
PAGE = 200
#: Seconds without a reply after which a publisher stops waiting for the rest.
STALL = 5.0


def _context(sockets: int) -> zmq.Context[Any]:
    ctx: zmq.Context[Any] = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, max(1024, sockets + 64))  # libzmq's default is 1023
    return ctx


def _reply_seq(frame: bytes) -> int:
    seq = decode(frame).get("seq", 0)
    return seq if type(seq) is int else 0


# -- publisher --------------------------------------------------------------------------------


class SayFrames:
    """``say`` requests for one room; built by concatenation, cheaper than a full encode."""

    def __init__(self, room: str, stamp: bool) -> None:
        self.room, self.stamp = room, stamp
        self._body = msgpack.packb({"v": 1, "kind": "say", "room": room, "text": TEXT})[1:]
        self._tag = secrets.token_hex(6)

    def frame(self, k: int) -> bytes:
        cmid = f"{self._tag}-{k}"
        if self.stamp:
            return request("say", k, room=self.room, text=stamped_text(), cmid=cmid)
        frame: bytes = b"\x86" + self._body + b"\xa3rid" + msgpack.packb(k) + b"\xa4cmid" + msgpack.packb(cmid)
        return frame


@dataclass
class PubState:
    session: Session
    frames: SayFrames
    sent: int = 0
    acked: int = 0
    errors: int = 0
    last_reply: bytes = b""


def _publish(pubs: list[PubState], count: int, window: int, rate: float | None, deadline: float) -> float:
    """Send ``count`` says per room; return the seconds from the first send to the last reply."""
    poller = zmq.Poller()
    by_socket = {p.session.dealer: p for p in pubs}
    for p in pubs:
        poller.register(p.session.dealer, zmq.POLLIN)
    start = end = time.monotonic()
    # A reply the broker dropped (its ROUTER keeps 200 a peer) never comes: stop after a silence.
    while time.monotonic() < min(deadline, end + STALL) and any(p.acked < count for p in pubs):
        now = time.monotonic()
        due = count if rate is None else min(count, int((now - start) * rate) + 1)
        for p in pubs:
            while p.sent < due and p.sent - p.acked < window:
                p.sent += 1
                p.session.dealer.send(p.frames.frame(p.sent))
        timeout = 1000
        if rate is not None and due < count:
            timeout = max(0, math.ceil((start + due / rate - time.monotonic()) * 1000))
        for sock, _ in poller.poll(timeout):
            p = by_socket[sock]
            while True:
                try:
                    reply = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                p.acked += 1
                if reply.startswith(SENT_PREFIX, 1):
                    p.last_reply = reply
                else:
                    p.errors += decode(reply).get("kind") == "error"
            end = time.monotonic()
    return end - start


def publisher(cfg: dict[str, Any]) -> None:
    """One session per room in ``cfg["rooms"]``; see the module docstring."""
    limit_at = time.monotonic() + cfg["limit"]
    ctx = _context(len(cfg["rooms"]))
    sessions = [Session(ctx, cfg["router"], None) for _ in cfg["rooms"]]
    if hello_join(sessions, cfg["rooms"], "pub", 20.0):
        raise SystemExit("publisher: hello/join failed")
    reactor = Reactor()
    control = Control(reactor)
    emit(ready=True)
    control.wait(reactor, "starts", limit_at)
    # The room's last seq now: the run's messages are the ones after it.
    joined = call_all(sessions, "join", [{"room": s.room} for s in sessions], 20.0)
    emit(starts={s.room: (j or {}).get("seq", 0) for s, j in zip(sessions, joined, strict=True)})
    control.wait(reactor, "go", limit_at)
    pubs = [PubState(s, SayFrames(s.room, cfg.get("stamp", False))) for s in sessions]
    cpu = time.process_time()
    seconds = _publish(pubs, cfg["count"], cfg["window"], cfg.get("rate"), limit_at)
    emit(result={
        "acked": sum(p.acked for p in pubs), "errors": sum(p.errors for p in pubs), "seconds": seconds,
        "sent": sum(p.sent for p in pubs), "finals": {p.session.room: _reply_seq(p.last_reply) if p.last_reply else 0
                                                      for p in pubs},
        "cpu_s": time.process_time() - cpu,
    })
    ctx.destroy(linger=0)


# -- subscribers ------------------------------------------------------------------------------


@dataclass
class Feed:
    """What one subscriber saw of its room's run."""

    session: Session
    start: int = 0
    last: int = 0
    final: int | None = None
    received: int = 0
    duplicates: int = 0
    gaps: list[tuple[int, int]] = field(default_factory=list)
    repaired: int = 0
    first_ns: int = 0
    last_ns: int = 0

    def missing(self) -> int:
        return sum(b - a + 1 for a, b in self.gaps)

    def summary(self) -> dict[str, Any]:
        return {"received": self.received, "duplicates": self.duplicates, "missing": self.missing(),
                "repaired": self.repaired, "seconds": (self.last_ns - self.first_ns) / 1e9}


class Listener:
    """Counts what the SUBs of a process receive, by seq, and optionally the latency."""

    def __init__(self, latency: bool, warmup: int) -> None:
        self.latency, self.warmup = latency, warmup
        self.checker = Checker()
        self.latencies_us: list[int] = []
        self.progress_ns = 0

    def handler(self, feed: Feed) -> Any:
        def read(sock: zmq.Socket[bytes]) -> bool:
            for _ in range(BATCH):
                try:
                    sock.recv(zmq.NOBLOCK)  # the topic: each SUB hears only its room (and its private topic)
                except zmq.Again:
                    return False
                self.count(feed, sock.recv(), time.monotonic_ns())
            return True

        return read

    def count(self, feed: Feed, body: bytes, now: int) -> None:
        seq = message_seq(body)
        self.checker.see(body, seq)
        if seq is None or seq <= feed.start:
            return
        if seq <= feed.last:  # PUB/SUB keeps order: anything not above the last is a repeat
            feed.duplicates += 1
            return
        if seq > feed.last + 1:
            feed.gaps.append((feed.last + 1, seq - 1))
        feed.last, feed.last_ns = seq, now
        feed.first_ns = feed.first_ns or now
        feed.received += 1
        self.progress_ns = now
        if self.latency and seq - feed.start > self.warmup:
            stamp = message_stamp(body)
            if stamp is not None:
                self.latencies_us.append((now - stamp) // 1000)


def _repair(feeds: list[Feed], deadline: float) -> None:
    """Fetch every gap with ``history after=`` over each subscriber's DEALER, all at once."""
    todo = {id(f): f for f in feeds if f.gaps}
    position = {id(f): (0, f.gaps[0][0] - 1) for f in todo.values()}  # (gap index, after)
    rids = {key: f.session.send("history", room=f.session.room, after=position[key][1], limit=PAGE)
            for key, f in todo.items()}
    while todo and time.monotonic() < deadline:
        for key, f in list(todo.items()):
            reply = f.session.reply(rids[key], deadline)
            if reply is None or reply.get("kind") != "history":
                del todo[key]
                continue
            index, after = position[key]
            low, high = f.gaps[index]
            seqs = [e["seq"] for e in reply["events"]]
            f.repaired += sum(1 for s in seqs if low <= s <= high)
            after = max(seqs, default=high)
            if after >= high:
                index += 1
                if index == len(f.gaps):
                    del todo[key]
                    continue
                after = f.gaps[index][0] - 1
            position[key] = (index, after)
            rids[key] = f.session.send("history", room=f.session.room, after=after, limit=PAGE)


def _listen(reactor: Reactor, control: Control, listener: Listener, feeds: list[Feed], limit_at: float) -> None:
    """Count until the driver says the run ended and every feed has its last message (or went quiet)."""
    ended_at = None
    while time.monotonic() < limit_at:
        reactor.poll(0.1)
        end = control.take("end")
        if end is not None:
            ended_at = time.monotonic()
            for f in feeds:
                f.final = end["end"].get(f.session.room, 0)
        if ended_at is None:
            continue
        if all(f.final is not None and f.last >= f.final for f in feeds):
            return
        quiet_since = max(ended_at, listener.progress_ns / 1e9)
        if time.monotonic() - quiet_since > QUIET:
            return


def subscribers(cfg: dict[str, Any]) -> None:
    """``cfg["rooms"]``: the room of each subscriber this process hosts."""
    limit_at = time.monotonic() + cfg["limit"]
    rooms: list[str] = cfg["rooms"]
    ctx = _context(2 * len(rooms))
    sessions = [Session(ctx, cfg["router"], cfg["pub"], cfg.get("rcvhwm", 1000)) for _ in rooms]
    failed = hello_join(sessions, rooms, "sub", 30.0)
    live = [s for s in sessions if s not in failed]
    failed += subscribe_synced(live) if cfg.get("sync", True) else subscribe_probed(live, 30.0)
    if failed:
        raise SystemExit(f"subscribers: {len(failed)} of {len(sessions)} could not subscribe")
    reactor = Reactor()
    control = Control(reactor)
    emit(ready=True)
    starts = control.wait(reactor, "go", limit_at)["go"]
    feeds = [Feed(s, start=starts.get(s.room, 0), last=starts.get(s.room, 0)) for s in sessions]
    listener = Listener(cfg.get("latency", False), cfg.get("warmup", 0))
    for f in feeds:
        assert f.session.sub is not None
        reactor.add(f.session.sub, listener.handler(f))
    cpu = time.process_time()
    _listen(reactor, control, listener, feeds, limit_at)
    cpu = time.process_time() - cpu
    for f in feeds:
        if f.final is not None and f.last < f.final:
            f.gaps.append((f.last + 1, f.final))  # the tail never came
    if cfg.get("repair", True):
        _repair(feeds, limit_at)
    emit(result={"feeds": [f.summary() for f in feeds], "latencies_us": listener.latencies_us, "cpu_s": cpu,
                 "checked": listener.checker.checked, "mismatches": listener.checker.mismatches})
    ctx.destroy(linger=0)


# -- the scale case: many clients that mostly wait ---------------------------------------------


class Crowd:
    """Many connected clients: scheduled pings (measured), a trickle of says, SUBs drained."""

    def __init__(self, sessions: list[Session], reactor: Reactor, ping_every: float, say_rate: float) -> None:
        self.sessions, self.reactor = sessions, reactor
        self.ping_every, self.say_rate = ping_every, say_rate
        self.measuring = False
        self.rtts_us: list[int] = []
        self.outstanding: dict[int, tuple[int, int]] = {}  # session index -> (rid, sent at)
        self.timeouts = self.frames = self.says = 0
        self.errors: Counter[str] = Counter()
        now = time.monotonic()
        self._pings = [(now + ping_every * (i + secrets.randbelow(1000) / 1000) / len(sessions), i)
                       for i in range(len(sessions))] or [(math.inf, -1)]  # none: nothing to ping
        heapq.heapify(self._pings)
        self._next_say, self._speaker = now, 0
        for i, s in enumerate(sessions):
            reactor.add(s.dealer, self._replies(i))
            assert s.sub is not None
            reactor.add(s.sub, self._events)

    def _replies(self, index: int) -> Any:
        def read(sock: zmq.Socket[bytes]) -> bool:
            while True:
                try:
                    reply = decode(sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    return False
                kind = reply.get("kind")
                if kind == "pong":
                    sent = self.outstanding.pop(index, None)
                    if sent is not None and sent[0] == reply.get("rid") and self.measuring:
                        self.rtts_us.append((time.monotonic_ns() - sent[1]) // 1000)
                elif kind == "error":
                    self.errors[str(reply.get("code"))] += 1

        return read

    def _events(self, sock: zmq.Socket[bytes]) -> bool:
        for _ in range(BATCH):
            try:
                sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return False
            self.frames += message_seq(sock.recv()) is not None
        return True

    def step(self, timeout: float = 5.0) -> float:
        """Send what is due; return the seconds until the next thing is."""
        now = time.monotonic()
        while self._pings[0][0] <= now:
            _, i = heapq.heappop(self._pings)
            heapq.heappush(self._pings, (now + self.ping_every, i))
            sent = self.outstanding.get(i)
            if sent is not None:
                if now - sent[1] / 1e9 < timeout:
                    continue  # still waiting for the last one
                self.timeouts += self.measuring
            session = self.sessions[i]
            self.outstanding[i] = (session.send("ping"), time.monotonic_ns())
            self.reactor.check(session.dealer)
        while self.say_rate and self.sessions and self._next_say <= now:
            self._next_say += 1 / self.say_rate
            session = self.sessions[self._speaker % len(self.sessions)]
            self._speaker += 1
            session.send("say", room=session.room, text=TEXT)
            self.says += self.measuring
            self.reactor.check(session.dealer)
        upcoming = self._pings[0][0]
        if self.say_rate and self.sessions:
            upcoming = min(upcoming, self._next_say)
        return min(1.0, max(0.0, upcoming - time.monotonic()))

    def late(self, timeout: float = 5.0) -> int:
        """Pings unanswered for longer than ``timeout`` seconds now."""
        now = time.monotonic_ns()
        return sum(1 for _, t in self.outstanding.values() if now - t > timeout * 1e9)


def clients(cfg: dict[str, Any]) -> None:
    """``cfg["rooms"]``: the room of each client this process hosts."""
    limit_at = time.monotonic() + cfg["limit"]
    rooms: list[str] = cfg["rooms"]
    ctx = _context(2 * len(rooms))
    setup = time.monotonic()
    sessions = [Session(ctx, cfg["router"], cfg["pub"]) for _ in rooms]
    failed = hello_join(sessions, rooms, "c", 60.0)
    joined_at = time.monotonic()
    unsynced = subscribe_synced([s for s in sessions if s not in failed])
    live = [s for s in sessions if s not in failed and s not in unsynced]
    reactor = Reactor()
    control = Control(reactor)
    emit(ready={"clients": len(sessions), "failed": len(failed) + len(unsynced), "seconds": time.monotonic() - setup,
                "failed_hello_join": len(failed), "hello_join_s": joined_at - setup, "failed_sync": len(unsynced),
                "why": Counter(s.failure for s in failed + unsynced)})
    failed += unsynced
    crowd = Crowd(live, reactor, cfg["ping_every"], cfg["say_rate"])
    sweep_at = time.monotonic() + 1
    while time.monotonic() < limit_at:
        reactor.poll(min(crowd.step(), 0.25))
        if time.monotonic() >= sweep_at:
            reactor.sweep()
            sweep_at = time.monotonic() + 1
        if control.take("go") is not None:
            crowd.measuring = True
        if control.take("end") is not None:
            break
    emit(result={"clients": len(sessions), "failed": len(failed), "rtts_us": crowd.rtts_us,
                 "timeouts": crowd.timeouts + crowd.late(), "errors": dict(crowd.errors), "says": crowd.says,
                 "frames": crowd.frames, "cpu_s": time.process_time()})
    ctx.destroy(linger=0)


ROLES = {"publisher": publisher, "subscribers": subscribers, "clients": clients}


def run_worker(role: str, cfg: dict[str, Any]) -> int:
    """Entry of ``bench.py worker ROLE CONFIG``."""
    signal.alarm(int(cfg.get("limit", 60)) + 10)  # a hard stop whatever happens
    try:
        if role in ROLES:
            ROLES[role](cfg)
        else:
            from bench import libclient, peers

            {**libclient.ROLES, **peers.ROLES}[role](cfg)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            emit(error=str(exc.code))
            return 1
    return 0
