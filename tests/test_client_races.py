"""Races in the client library's private-room, rekey and reconnect handling, over a real broker.

Each test makes one unlucky ordering happen on purpose — a reply held back until an event
has been read, a reconnection forced at a chosen moment — and checks the client still
hears its rooms. The broker runs on loopback with OS-chosen ports; nothing waits a fixed
time: waits poll until a deadline, and every test is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest
import zmq.asyncio

from zchat.broker import BrokerConfig
from zchat.broker.ratelimit import Rate, RateLimits
from zchat.client import AsyncClient, EventKind, RequestError
from zchat.client.aio import ClientState
from zchat.client.core import Rekey
from zchat.common.codec import decode_reply
from zchat.common.errors import ConnectionClosed
from zchat.common.protocol import Event, Joined, Reply, Welcome

if TYPE_CHECKING:
    from tests.conftest import RunningBroker

#: Seconds any single wait may take before the test fails.
WAIT = 5.0

pytestmark = pytest.mark.timeout(30)


async def until(predicate: Callable[[], object], timeout: float = WAIT) -> None:
    """Poll ``predicate`` on the loop until it is true; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"condition not met within {timeout} s"
        await asyncio.sleep(0.005)


async def event_where(client: AsyncClient, match: Callable[[Event], bool], timeout: float = WAIT) -> Event:
    """The first event ``client`` delivers for which ``match`` is true (others are skipped)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        event = await client.recv_event(max(0.001, deadline - loop.time()))
        if match(event):
            return event


async def hears_the_room(alice: AsyncClient, bob: AsyncClient, room: str) -> None:
    """bob hears what alice says in ``room`` next, and once both clients' room moves are
    done they agree on the room (its topic and seq)."""
    sent = await alice.say(room, "can you hear me")
    heard = await event_where(bob, lambda e: e.kind is EventKind.MESSAGE)
    assert (heard.text, heard.seq) == ("can you hear me", sent.seq)
    await until(lambda: not bob._rekeys and not alice._rekeys)  # moves finished
    assert bob.core.rooms[room] == alice.core.rooms[room]


def watch_reads(client: AsyncClient, match: Callable[[Event], bool]) -> list[Event]:
    """The events ``client``'s SUB reader reads for which ``match`` is true, as it reads
    them (whether or not it delivers them)."""
    seen: list[Event] = []
    real = client.core.receive_event

    def receive_event(frames: list[bytes]) -> Event:
        event = real(frames)
        if match(event):
            seen.append(event)
        return event

    client.core.receive_event = receive_event  # type: ignore[method-assign]
    return seen


def gate_replies(client: AsyncClient, gate: Callable[[bytes], asyncio.Event | None]) -> None:
    """Make ``client``'s present DEALER hand over each reply only once the event ``gate``
    returns for it is set (None: at once), from the reader's next ``recv`` on."""
    dealer = client._dealer
    assert dealer is not None
    real_recv = dealer.recv

    async def recv(*args: Any, **kwargs: Any) -> bytes:
        frame: bytes = await real_recv(*args, **kwargs)
        event = gate(frame)
        if event is not None:
            await event.wait()
        return frame

    dealer.recv = recv  # type: ignore[method-assign, assignment]


def hold_replies(client: AsyncClient, held: Callable[[bytes], bool], release: asyncio.Event) -> None:
    """Make ``client``'s DEALER hand over replies for which ``held`` is true only after
    ``release`` is set (from the reader's next ``recv`` on)."""
    gate_replies(client, lambda frame: release if held(frame) else None)


def is_joined(frame: bytes) -> bool:
    return type(decode_reply(frame)) is Joined


def hold_on_reconnect(client: AsyncClient, gates: dict[type[Reply], asyncio.Event]) -> list[Reply]:
    """From ``client``'s next sockets on, hold each reply of a type in ``gates`` until its
    event is set; return the list of replies held so far (appended as they arrive)."""
    held: list[Reply] = []
    real_open = client._open_sockets

    def gate(frame: bytes) -> asyncio.Event | None:
        reply = decode_reply(frame)
        event = gates.get(type(reply))
        if event is None or event.is_set():
            return None
        held.append(reply)
        return event

    def open_sockets() -> None:
        real_open()
        gate_replies(client, gate)

    client._open_sockets = open_sockets  # type: ignore[method-assign]
    return held


def record_moves(client: AsyncClient) -> list[Rekey | None]:
    """The moves ``client``'s core computes from ``rekey`` events, as it computes them."""
    moves: list[Rekey | None] = []
    real = client.core.rekey

    def rekey(event: Event) -> Rekey | None:
        moves.append(move := real(event))
        return move

    client.core.rekey = rekey  # type: ignore[method-assign]
    return moves


def run(rb: RunningBroker, scenario: Callable[[Callable[[str], Awaitable[AsyncClient]]], Awaitable[None]]) -> None:
    """Run ``scenario(connect)`` on a fresh loop; ``connect(nick)`` makes a connected client."""

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        made: list[AsyncClient] = []

        async def connect(nick: str) -> AsyncClient:
            client = AsyncClient(rb.router, rb.pub, timeout=WAIT, context=ctx)
            made.append(client)
            await client.connect(nick)
            return client

        try:
            await scenario(connect)
        finally:
            for client in made:
                await client.close()
            ctx.term()

    asyncio.run(asyncio.wait_for(main(), 25))


def test_a_rekey_read_before_the_joined_reply_is_not_lost(broker: RunningBroker) -> None:
    """bob's join is answered, then carol is kicked: bob's client reads the ``rekey`` before
    the ``joined`` reply. It must still end up on the room's new topic and hear it."""

    async def scenario(connect: Callable[[str], Awaitable[AsyncClient]]) -> None:
        alice, bob, carol = await connect("alice"), await connect("bob"), await connect("carol")
        await alice.join("den", private=True)
        await alice.invite("den", "carol")
        await carol.join("den")
        await alice.invite("den", "bob")
        release = asyncio.Event()
        rekeys = watch_reads(bob, lambda e: e.kind is EventKind.REKEY)
        hold_replies(bob, is_joined, release)
        await bob.ping()  # the reader's pending recv returns: the next one is the held one
        joining = asyncio.create_task(bob.join("den"))
        await event_where(alice, lambda e: e.kind is EventKind.JOIN and e.sender == "bob")
        await alice.kick("den", "carol")
        await until(lambda: rekeys)
        release.set()
        await joining
        await hears_the_room(alice, bob, "den")

    run(broker, scenario)


def test_a_rekey_read_while_rejoining_after_a_move_missed_away_is_not_undone(broker: RunningBroker) -> None:
    """bob reconnects. While he is away carol is kicked (the room moves T0 -> T1: he misses
    it). While his rejoin is under way dave is kicked (T1 -> T2): bob reads that rekey before
    the rejoin's ``joined`` reply (which says T1). He must end up on T2 and hear the room."""

    async def scenario(connect: Callable[[str], Awaitable[AsyncClient]]) -> None:
        alice, bob, carol, dave = [await connect(n) for n in ("alice", "bob", "carol", "dave")]
        await alice.join("den", private=True)
        for other in (bob, carol, dave):
            await alice.invite("den", other.current_nick or "")
            await other.join("den")
        gates: dict[type[Reply], asyncio.Event] = {Welcome: asyncio.Event(), Joined: asyncio.Event()}
        held = hold_on_reconnect(bob, gates)
        moves = record_moves(bob)
        bob._lose("a test cuts the line")
        await until(lambda: [r for r in held if type(r) is Welcome])  # old sockets closed, new SUB deaf
        await alice.kick("den", "carol")  # T0 -> T1, which bob misses
        gates[Welcome].set()
        await until(lambda: [r for r in held if type(r) is Joined])  # the rejoin's reply: T1
        await alice.kick("den", "dave")  # T1 -> T2, heard by bob's new SUB
        await until(lambda: moves)
        gates[Joined].set()
        await until(lambda: bob.state is ClientState.CONNECTED)
        await hears_the_room(alice, bob, "den")

    run(broker, scenario)


def test_a_kick_read_before_the_joined_reply_is_not_lost(broker: RunningBroker) -> None:
    """bob joins and is kicked at once: his client reads the ``kick`` before the ``joined``
    reply. He must learn he is out (the kick is delivered, the room dropped), not be left
    believing he is in the room."""

    async def scenario(connect: Callable[[str], Awaitable[AsyncClient]]) -> None:
        alice, bob = await connect("alice"), await connect("bob")
        await alice.join("den", private=True)
        await alice.invite("den", "bob")
        release = asyncio.Event()
        hold_replies(bob, is_joined, release)
        await bob.ping()  # the reader's pending recv returns: the next one is the held one
        joining = asyncio.create_task(bob.join("den"))
        await event_where(alice, lambda e: e.kind is EventKind.JOIN and e.sender == "bob")
        kicks = watch_reads(bob, lambda e: e.kind is EventKind.KICK)
        await alice.kick("den", "bob", "changed my mind")
        await until(lambda: kicks)
        release.set()
        with contextlib.suppress(RequestError):
            await joining
        assert "den" not in bob.joined
        delivered = await event_where(bob, lambda e: e.kind is EventKind.KICK)
        assert (delivered.id, delivered.nick) == (kicks[0].id, "bob")

    run(broker, scenario)


def test_a_kick_read_while_rejoining_is_not_undone_by_the_joined_reply(broker: RunningBroker) -> None:
    """bob reconnects; his rejoin is answered, then he is kicked, and his client reads the
    ``kick`` before the ``joined`` reply. The reply must not bring the room back."""

    async def scenario(connect: Callable[[str], Awaitable[AsyncClient]]) -> None:
        alice, bob = await connect("alice"), await connect("bob")
        await alice.join("den", private=True)
        await alice.invite("den", "bob")
        await bob.join("den")
        gates: dict[type[Reply], asyncio.Event] = {Joined: asyncio.Event()}
        held = hold_on_reconnect(bob, gates)
        bob._lose("a test cuts the line")
        await until(lambda: held)  # the broker answered the rejoin
        kicks = watch_reads(bob, lambda e: e.kind is EventKind.KICK)
        await alice.kick("den", "bob")
        await until(lambda: kicks)
        gates[Joined].set()
        await until(lambda: bob.state is ClientState.CONNECTED)
        kick = await event_where(bob, lambda e: e.kind is EventKind.KICK)
        assert (kick.room, kick.nick) == ("den", "bob")
        assert "den" not in bob.joined

    run(broker, scenario)


def test_moves_in_a_row_then_a_kick_of_oneself(broker: RunningBroker) -> None:
    """Two members kicked back to back (two rekeys in a row), then bob himself: erin, who
    stays, hears the room on its latest topic; bob ends up out of it, with nothing left over."""

    async def scenario(connect: Callable[[str], Awaitable[AsyncClient]]) -> None:
        alice, bob, carol, dave, erin = [await connect(n) for n in ("alice", "bob", "carol", "dave", "erin")]
        await alice.join("den", private=True)
        for other in (bob, carol, dave, erin):
            await alice.invite("den", other.current_nick or "")
            await other.join("den")
        await asyncio.gather(alice.kick("den", "carol"), alice.kick("den", "dave"), alice.kick("den", "bob"))
        kick = await event_where(bob, lambda e: e.kind is EventKind.KICK and e.nick == "bob")
        assert kick.room == "den" and "den" not in bob.joined
        sent = await alice.say("den", "still here")
        heard = await event_where(erin, lambda e: e.kind is EventKind.MESSAGE)
        assert (heard.text, heard.seq) == ("still here", sent.seq)
        await until(lambda: not erin._rekeys and not bob._rekeys)
        assert erin.core.rooms["den"] == alice.core.rooms["den"]

    run(broker, scenario)


def test_close_ends_a_say_waiting_out_rate_limited_at_once(broker_factory: Callable[..., RunningBroker]) -> None:
    """A say held back by flood control (retry_after of seconds) does not hold up close(),
    and it raises instead of hanging."""
    rb = broker_factory(BrokerConfig(rate_limits=RateLimits(Rate(0.2, 1), None, None, None)))

    async def scenario(connect: Callable[[str], Awaitable[AsyncClient]]) -> None:
        alice = await connect("alice")
        await alice.join("lobby")
        await alice.say("lobby", "the burst")
        waiting = asyncio.create_task(alice.say("lobby", "over the limit"))
        await until(lambda: alice._gates["messages"].limited)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await alice.close()
        assert loop.time() - start < 2
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(waiting, WAIT)

    run(rb, scenario)
