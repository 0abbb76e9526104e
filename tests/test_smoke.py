from __future__ import annotations

from collections.abc import Callable

from zchat.client import Client, EventKind


def test_two_clients_chat(client_factory: Callable[..., Client]) -> None:
    alice = client_factory("alice", "general")
    bob = client_factory("bob", "general")
    assert alice.recv_event(5).kind is EventKind.JOIN
    sent = bob.say("general", "hello")
    event = alice.recv_event(5)
    assert (event.kind, event.sender, event.text, event.id) == (EventKind.MESSAGE, "bob", "hello", sent.id)
