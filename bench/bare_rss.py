"""What libzmq alone holds for N connected clients: the floor under the scale case's RSS.

A bare server (a ROUTER and a manual XPUB with the broker's socket options, answering every
request with a 100-byte reply and a 150-byte publication, granting every subscription; no
sessions, no store) and N clients (a DEALER and a SUB each, spread over processes of 1,250,
each SUB subscribed to one of 100 room topics) on loopback. It prints the server's RSS when
idle, once every client is connected and subscribed, and after 10 rounds of one request per
client. Compare with the scale case's zchat figures in BENCHMARKS.md.

    python bench/bare_rss.py                 # 5,000 clients (needs ~10,100 open files)
    python bench/bare_rss.py --clients 1000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import zmq

if __name__ == "__main__":  # as bench.py: the repository root, so that "bench" is the folder
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
from bench.procs import BenchError, install_cleanup, nofile_limit, read_line, spawn, stop

PER_PROCESS = 1250
ROUNDS = 10
LIMIT = 120.0  # seconds any step may take


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))


def serve() -> None:
    """The bare server: prints its endpoints, then answers; b"rss" gets its RSS in kB."""
    ctx = zmq.Context()
    router, xpub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.XPUB)
    for sock in (router, xpub):  # as zchat.broker.server sets them
        sock.setsockopt(zmq.BACKLOG, 4096)
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    xpub.setsockopt(zmq.XPUB_MANUAL, 1)
    router.setsockopt(zmq.SNDHWM, 200)
    xpub.setsockopt(zmq.SNDHWM, 10_000)
    router.bind("tcp://127.0.0.1:*")
    xpub.bind("tcp://127.0.0.1:*")
    print(router.getsockopt_string(zmq.LAST_ENDPOINT), xpub.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(xpub, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            while True:
                try:
                    first = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if sock is xpub:
                    if first[:1] == b"\x01":
                        xpub.setsockopt(zmq.SUBSCRIBE, first[1:])
                    continue
                body = router.recv()
                router.send(first, zmq.SNDMORE)
                router.send(str(rss_kb()).encode() if body == b"rss" else b"x" * 100)
                if body != b"rss":
                    xpub.send(b"r/room%d/" % (len(first) % 100), zmq.SNDMORE)
                    xpub.send(b"y" * 150)


def clients(router: str, pub: str, count: int) -> None:
    """``count`` DEALER + SUB pairs; on each line from stdin, one round of requests."""
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 4 * count + 100)
    pairs: list[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]] = []
    for i in range(count):
        dealer, sub = ctx.socket(zmq.DEALER), ctx.socket(zmq.SUB)
        for sock in (dealer, sub):
            sock.setsockopt(zmq.LINGER, 0)
        dealer.connect(router)
        sub.connect(pub)
        sub.setsockopt(zmq.SUBSCRIBE, b"r/room%d/" % (i % 100))
        pairs.append((dealer, sub))
    for dealer, _ in pairs:  # a round trip each: every connection is up
        dealer.send(b"hello")
    for dealer, _ in pairs:
        dealer.recv()
    print("up", flush=True)
    for _ in sys.stdin:
        for dealer, _ in pairs:
            dealer.send(b"ping")
        for dealer, sub in pairs:
            dealer.recv()
            while sub.poll(0):
                sub.recv_multipart()
        print("round", flush=True)


def probe(router: str) -> int:
    """The server's RSS in kB."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(LIMIT * 1000))
    sock.connect(router)
    try:
        sock.send(b"rss")
        return int(sock.recv())
    finally:
        ctx.destroy(linger=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--clients-of", nargs=3, metavar=("ROUTER", "PUB", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    if args.clients_of:
        clients(args.clients_of[0], args.clients_of[1], int(args.clients_of[2]))
        return
    install_cleanup()
    need = 2 * args.clients + 200
    if nofile_limit()[1] < need:
        raise SystemExit(f"the open-file hard limit {nofile_limit()[1]} is below the {need} the server needs")
    me = [sys.executable, str(Path(__file__).resolve())]
    server = spawn([*me, "--serve"], nofile=need, stdin=None)
    try:
        assert server.stdout is not None
        router, pub = read_line(server.stdout, time.monotonic() + LIMIT, "server").split()
        idle = probe(router)
        sizes = [min(PER_PROCESS, args.clients - start) for start in range(0, args.clients, PER_PROCESS)]
        procs = [spawn([*me, "--clients-of", router, pub, str(size)], nofile=4 * size + 200) for size in sizes]
        deadline = time.monotonic() + LIMIT
        for proc in procs:
            assert proc.stdout is not None
            read_line(proc.stdout, deadline, "clients")
        connected = probe(router)
        for _ in range(ROUNDS):
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("\n")
                proc.stdin.flush()
            deadline = time.monotonic() + LIMIT
            for proc in procs:
                assert proc.stdout is not None
                read_line(proc.stdout, deadline, "clients")
        after = probe(router)
        print(f"bare ROUTER + XPUB, {args.clients:,} clients (DEALER + SUB each): RSS idle {idle / 1024:.1f} MB, "
              f"connected {connected / 1024:.1f} MB, after {ROUNDS} rounds of a request, a reply and a publication "
              f"per client {after / 1024:.1f} MB ({(after - idle) / args.clients:.1f} KB a client)")
        for proc in procs:
            stop(proc)
    except BenchError as exc:
        raise SystemExit(f"bare_rss: {exc}") from None
    finally:
        stop(server)


if __name__ == "__main__":
    main()
