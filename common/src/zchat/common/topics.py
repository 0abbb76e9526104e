"""Topic naming for the broker's XPUB socket.

Every topic ends in ``/`` and no name contains ``/``, so no topic is a prefix of another
(``r/gen/`` does not match ``r/general/``): a ZeroMQ prefix subscription to a granted topic
receives that topic and nothing else.

* ``r/<room>/``: a public room (``<room>`` is the room's canonical name in UTF-8).
* ``p/<32 hex digits>/``: a session's private topic, random, handed out only in its welcome.
* ``q/<32 hex digits>/``: a private room's topic, random, handed out only to its members in
  ``joined`` and ``rekey``; replaced by a fresh one whenever someone is removed from the room.
* ``p/<32 hex digits>/sync/<nonce>``: not a topic anything is published on, but a
  subscription the broker answers with a ``sync`` event on the private topic, so a client
  knows that every subscription it made before is in force.
"""

from __future__ import annotations

import secrets

ROOM_PREFIX = b"r/"
PRIVATE_PREFIX = b"p/"
PRIVATE_ROOM_PREFIX = b"q/"
SYNC_INFIX = b"sync/"
#: Length of a private topic: "p/" + 32 hex digits + "/".
PRIVATE_TOPIC_LENGTH = len(PRIVATE_PREFIX) + 32 + 1
#: Longest nonce a sync subscription may carry.
MAX_NONCE_LENGTH = 32


def room_topic(room: str) -> bytes:
    """The topic of the room whose canonical name is ``room``."""
    return ROOM_PREFIX + room.encode() + b"/"


def new_private_topic() -> bytes:
    """A fresh, unguessable private topic (128 random bits)."""
    return PRIVATE_PREFIX + secrets.token_hex(16).encode() + b"/"


def new_private_room_topic() -> bytes:
    """A fresh, unguessable topic for a private room (128 random bits)."""
    return PRIVATE_ROOM_PREFIX + secrets.token_hex(16).encode() + b"/"


def sync_subscription(private_topic: bytes, nonce: str) -> bytes:
    """The subscription that asks the broker for a ``sync`` event carrying ``nonce``."""
    return private_topic + SYNC_INFIX + nonce.encode()


def split_sync(subscription: bytes) -> tuple[bytes, str] | None:
    """``(private_topic, nonce)`` if ``subscription`` is a sync subscription, else None."""
    n = PRIVATE_TOPIC_LENGTH
    if not subscription.startswith(PRIVATE_PREFIX) or subscription[n : n + len(SYNC_INFIX)] != SYNC_INFIX:
        return None
    token = subscription[len(PRIVATE_PREFIX) : n - 1]
    if subscription[n - 1 : n] != b"/" or len(token) != 32 or token.strip(b"0123456789abcdef"):
        return None
    nonce = subscription[n + len(SYNC_INFIX) :]
    if not 0 < len(nonce) <= MAX_NONCE_LENGTH or not nonce.isalnum() or not nonce.isascii():
        return None
    return subscription[:n], nonce.decode()
