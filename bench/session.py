"""Raw protocol sessions for the load generators: many at once, set up in pipelined phases.

A load-generator process hosts many :class:`Session` s (a DEALER, and a SUB when it
listens). Setup sends one request on every session, then collects the replies (so a
thousand hellos cost about one round trip, not a thousand), and subscribes the way
PROTOCOL.md §7 says: the private topic and a sync, then the room topic and a second sync
whose epoch must equal the first; a missing answer or a changed epoch means subscribe
again. The baseline has no sync: there a session is ready once its SUB hears a probe
message it said in its room.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import zmq
from bench.wire import TEXT, decode, nick, request

#: Seconds a sync may take before it is asked again (doubling), as the client library does.
SYNC_RETRY = 0.25
SYNC_ATTEMPTS = 6
#: Seconds between keep-alive pings while a slow setup goes on (the broker's default
#: heartbeat is 5 s): a real client pings while it waits, so the load generator must too.
KEEPALIVE = 4.0


class Keepalive:
    """Pings every open session now and then during setup (replies are dropped by rid)."""

    def __init__(self, sessions: list[Session]) -> None:
        self.sessions, self.last = sessions, time.monotonic()

    def __call__(self) -> None:
        if time.monotonic() - self.last > KEEPALIVE:
            for s in self.sessions:
                if s.private:
                    s.send("ping")
            self.last = time.monotonic()


class Session:
    """One raw client: a DEALER for requests and, optionally, a SUB for events."""

    def __init__(self, ctx: zmq.Context[Any], router: str, pub: str | None, rcvhwm: int = 1000) -> None:
        self.dealer = ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(router)
        self.sub: zmq.Socket[bytes] | None = None
        if pub is not None:
            self.sub = ctx.socket(zmq.SUB)
            self.sub.setsockopt(zmq.LINGER, 0)
            self.sub.setsockopt(zmq.RCVHWM, rcvhwm)
            self.sub.connect(pub)
        self.rid = 0
        self.nick = ""
        self.private = b""
        self.room = ""
        self.room_topic = b""
        self.joined_seq = 0
        self.epoch: int | None = None
        #: Why setup failed for this session: an error code, or "no reply to KIND".
        self.failure = ""

    def send(self, kind: str, **fields: Any) -> int:
        self.rid += 1
        self.dealer.send(request(kind, self.rid, **fields))
        return self.rid

    def reply(self, rid: int, deadline: float) -> dict[str, Any] | None:
        """The reply to request ``rid`` (others are dropped), or None at ``deadline``."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.dealer.poll(int(left * 1000) + 1):
                return None
            reply = decode(self.dealer.recv())
            if reply.get("rid") == rid:
                return reply

    def close(self) -> None:
        self.dealer.close(linger=0)
        if self.sub is not None:
            self.sub.close(linger=0)


def _checked(session: Session, kind: str, reply: dict[str, Any] | None) -> dict[str, Any] | None:
    """``reply`` if it answers ``kind``; otherwise None, and why in ``session.failure``."""
    if reply is None:
        session.failure = f"no reply to {kind}"
    elif reply.get("kind") == "error":
        session.failure = f"{kind}: {reply.get('code')}"
    else:
        return reply
    return None


def call_all(sessions: list[Session], kind: str, fields: list[dict[str, Any]], timeout: float) -> list[Any]:
    """Send ``kind`` on every session, then collect the replies (None: none or an error)."""
    rids = [s.send(kind, **f) for s, f in zip(sessions, fields, strict=True)]
    deadline = time.monotonic() + timeout
    replies: list[Any] = []
    keepalive = Keepalive(sessions)
    for session, rid in zip(sessions, rids, strict=True):
        keepalive()
        replies.append(_checked(session, kind, session.reply(rid, deadline)))
    return replies


def hello_join(sessions: list[Session], rooms: list[str], prefix: str, timeout: float) -> list[Session]:
    """Open a session on each and join its room; return those that failed.

    Every hello goes out at once; each session sends its join as soon as its welcome is read,
    as a client would (a session left waiting for the others' welcomes could time out).
    """
    hellos = [s.send("hello", nick=nick(prefix)) for s in sessions]
    deadline = time.monotonic() + timeout
    keepalive = Keepalive(sessions)
    joins: list[tuple[Session, int]] = []
    for s, rid, room in zip(sessions, hellos, rooms, strict=True):
        keepalive()
        welcome = _checked(s, "hello", s.reply(rid, deadline))
        if welcome is not None:
            s.nick, s.private = welcome["nick"], welcome["topic"].encode()
            joins.append((s, s.send("join", room=room)))
    for s, rid in joins:
        keepalive()
        joined = _checked(s, "join", s.reply(rid, deadline))
        if joined is not None:
            s.room, s.room_topic, s.joined_seq = joined["room"], joined["topic"].encode(), joined.get("seq", 0)
    return [s for s in sessions if not s.room_topic]


def _request_sync(session: Session) -> bytes:
    assert session.sub is not None
    nonce = secrets.token_hex(8)
    session.sub.subscribe(session.private + b"sync/" + nonce.encode())
    return nonce.encode()


def _await_sync(session: Session, nonce: bytes, deadline: float) -> int | None:
    """The epoch of the sync answer carrying ``nonce``; other events are read and dropped."""
    sub = session.sub
    assert sub is not None
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sub.poll(int(left * 1000) + 1):
                return None
            topic = sub.recv()
            body = sub.recv() if sub.getsockopt(zmq.RCVMORE) else b""
            if topic == session.private:
                event = decode(body)
                if event.get("kind") == "sync" and event.get("text") == nonce.decode():
                    seq = event.get("seq")
                    return seq if type(seq) is int else 0
    finally:
        sub.unsubscribe(session.private + b"sync/" + nonce)


def _sync_round(sessions: list[Session], topic_of: Any, timeout: float, keepalive: Keepalive) -> list[Session]:
    """Subscribe each to ``topic_of(session)`` and sync; return those not yet proven."""
    nonces = []
    for s in sessions:
        assert s.sub is not None
        topic = topic_of(s)
        s.sub.unsubscribe(topic)  # harmless when not subscribed; a retry sends it anew
        s.sub.subscribe(topic)
        nonces.append(_request_sync(s))
    deadline = time.monotonic() + timeout
    unproven = []
    for s, nonce in zip(sessions, nonces, strict=True):
        keepalive()
        epoch = _await_sync(s, nonce, deadline)
        private = topic_of(s) == s.private
        if epoch is None or not (private or epoch == s.epoch):
            unproven.append(s)
        if epoch is not None:
            s.epoch = epoch
    return unproven


def subscribe_synced(sessions: list[Session]) -> list[Session]:
    """Subscribe to the private and room topics, proven by syncs; return those that failed."""
    failed: list[Session] = []
    keepalive = Keepalive(sessions)
    for topic_of in (lambda s: s.private, lambda s: s.room_topic):
        todo, wait = sessions, SYNC_RETRY * 4
        for _ in range(SYNC_ATTEMPTS):
            if not todo:
                break
            todo = _sync_round(todo, topic_of, wait, keepalive)
            wait *= 2
        for s in todo:
            s.failure = "sync unanswered"
        failed.extend(todo)
        sessions = [s for s in sessions if s not in todo]
    return failed


def subscribe_probed(sessions: list[Session], timeout: float) -> list[Session]:
    """Subscribe to the room topic; ready once a probe said in the room comes back."""
    for s in sessions:
        assert s.sub is not None
        s.sub.subscribe(s.room_topic)
    todo, deadline = list(sessions), time.monotonic() + timeout
    while todo and time.monotonic() < deadline:
        for s in todo:
            s.send("say", room=s.room, text="probe " + TEXT[:20])
        round_end = time.monotonic() + 0.2
        still = []
        for s in todo:
            assert s.sub is not None
            if s.sub.poll(max(0, int((round_end - time.monotonic()) * 1000))):
                while s.sub.poll(0):
                    s.sub.recv()
            else:
                still.append(s)
        todo = still
    for s in sessions:  # the probes' replies: not wanted later
        while s.dealer.poll(0):
            s.dealer.recv()
    return todo
