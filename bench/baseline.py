"""The baseline the benchmark compares zchat with: the simplest honest pyzmq forwarder.

ROUTER in; msgpack decode; check the kind and types; stamp the sender from the connection;
encode; PUB out (topic frame + envelope), and a reply to the sender. No store, no sessions
beyond a dict of nicks, no subscription control, no history. It speaks just enough of zchat's
protocol (hello, join, say, ping) for the benchmark's load generators; like zchat it counts
a ``seq`` per room (one dict lookup a message), so that subscribers find gaps the same way.

    python bench/baseline.py            # prints "baseline ready router=... pub=..."
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

import msgpack
import zmq


def serve() -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    pub = ctx.socket(zmq.PUB)
    router.bind("tcp://127.0.0.1:*")
    pub.bind("tcp://127.0.0.1:*")
    router_ep = router.getsockopt_string(zmq.LAST_ENDPOINT)
    pub_ep = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    print(f"baseline ready router={router_ep} pub={pub_ep}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    nicks: dict[bytes, str] = {}
    seqs: dict[str, int] = {}
    packb, unpackb = msgpack.Packer().pack, msgpack.unpackb
    next_id = 0
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    while True:
        poller.poll()
        now = time.time()
        for _ in range(1024):
            try:
                peer = router.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            body = router.recv()
            try:
                m: Any = unpackb(body)
            except ValueError:
                continue
            if type(m) is not dict:
                continue
            kind, rid = m.get("kind"), m.get("rid")
            if kind == "say" and type(m.get("room")) is str and type(m.get("text")) is str:
                next_id += 1
                room = m["room"]
                seq = seqs[room] = seqs.get(room, 0) + 1
                sender = nicks.get(peer, "?")
                event = {"v": 1, "kind": "message", "room": room, "sender": sender,
                         "text": m["text"], "ts": now, "id": next_id, "seq": seq}
                pub.send(b"r/" + room.encode() + b"/", zmq.SNDMORE)
                pub.send(packb(event))
                reply = {"v": 1, "kind": "sent", "rid": rid, "id": next_id, "ts": now, "seq": seq}
            elif kind == "hello":
                nicks[peer] = str(m.get("nick"))
                reply = {"v": 1, "kind": "welcome", "rid": rid, "nick": nicks[peer], "topic": "p/0/"}
            elif kind == "join":
                room = str(m.get("room"))
                reply = {"v": 1, "kind": "joined", "rid": rid, "room": room, "topic": f"r/{room}/",
                         "seq": seqs.get(room, 0)}
            else:
                reply = {"v": 1, "kind": "pong", "rid": rid, "ts": now}
            router.send(peer, zmq.SNDMORE)
            router.send(packb(reply))


if __name__ == "__main__":
    serve()
