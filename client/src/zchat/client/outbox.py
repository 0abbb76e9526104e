"""A bot's sending side: a token bucket, and the outbox that sends in order under it.

* :class:`TokenBucket` says how long a message must wait; it is pure (the caller passes
  the time).
* :class:`Outbox` is the one task that sends: messages leave in order, at most ``rate`` a
  second after a ``burst``, and a refusal that carries ``retry_after`` (``unavailable``: the
  broker's store is full; ``rate_limited``: the bot is over the broker's flood limits) is
  waited out and sent again. After ``rate_limited`` the bucket is emptied too, so the bot
  does not burst straight back into the limit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from zchat.common.codes import ErrorCode
from zchat.common.errors import ConnectionClosed, RequestError
from zchat.common.protocol import Sent

log = logging.getLogger("zchat.bot")


class TokenBucket:
    """A rate limit: ``rate`` messages a second on average, ``burst`` at once after a pause.

    Reservation style: :meth:`reserve` takes a token now and says how long to wait before
    using it, so messages queued one after another are spaced ``1 / rate`` apart.
    """

    def __init__(self, rate: float, burst: int, now: float = 0.0) -> None:
        if not rate > 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._stamp = now

    def reserve(self, now: float) -> float:
        """Take a token at time ``now``; return the seconds to wait before sending (0: now)."""
        self._tokens = min(float(self.burst), self._tokens + max(0.0, now - self._stamp) * self.rate)
        self._stamp = max(now, self._stamp)
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def drain(self, now: float) -> None:
        """Spend every token (the far side said slow down): what follows goes at ``rate``."""
        self._stamp = max(now, self._stamp)
        self._tokens = min(self._tokens, 0.0)  # reservations already made stay made


@dataclass
class BotStats:
    """Counters, for logs and tests."""

    events: int = 0  # events read (the bot's own included)
    commands: int = 0  # commands run (usage errors included)
    errors: int = 0  # handlers that raised
    sent: int = 0  # messages acknowledged by the broker
    throttled: int = 0  # messages delayed by the rate limit
    retries: int = 0  # resends after a refusal with retry_after
    rate_limited: int = 0  # refusals for going over the broker's flood limits
    failed: int = 0  # messages given up on


@dataclass(slots=True)
class Outgoing:
    """A message waiting in the :class:`Outbox`: to a room, or a DM to a nick."""

    room: str | None
    to: str | None
    text: str
    action: bool
    future: asyncio.Future[Sent]

    @property
    def target(self) -> str:
        return f"#{self.room}" if self.room is not None else f"*{self.to}*"


def _retrieve(future: asyncio.Future[Sent]) -> None:
    # Failures are logged by the outbox; callers need not await the future to avoid
    # asyncio's "exception was never retrieved".
    if not future.cancelled():
        future.exception()


class Outbox:
    """Sends messages one at a time, in order, under a token bucket.

    A refusal with ``retry_after`` (:class:`RequestError`) is waited out and the message sent
    again, until ``give_up_after`` seconds have passed since its first attempt. Timeouts and
    reconnects are already retried by :meth:`AsyncClient.say`.

    Args:
        send: sends one message and returns the broker's acknowledgement.
        stats: counters to update.
        rate, burst: the token bucket's.
        give_up_after: seconds to keep resending a refused message.
    """

    def __init__(
        self,
        send: Callable[[Outgoing], Awaitable[Sent]],
        stats: BotStats,
        *,
        rate: float = 2.0,
        burst: int = 10,
        give_up_after: float = 60.0,
    ) -> None:
        self._send = send
        self.stats = stats
        self._loop = asyncio.get_running_loop()
        self.bucket = TokenBucket(rate, burst, self._loop.time())
        self.give_up_after = give_up_after
        self._queue: asyncio.Queue[Outgoing] = asyncio.Queue()
        self._current: Outgoing | None = None

    def put(self, room: str | None, to: str | None, text: str, action: bool = False) -> asyncio.Future[Sent]:
        """Queue a message; the future resolves to its acknowledgement (or its failure)."""
        future: asyncio.Future[Sent] = self._loop.create_future()
        future.add_done_callback(_retrieve)
        self._queue.put_nowait(Outgoing(room, to, text, action, future))
        return future

    @property
    def pending(self) -> int:
        """Messages not yet acknowledged (or failed)."""
        return self._queue.qsize() + (self._current is not None)

    async def run(self) -> None:
        """Send until cancelled; on cancellation every unsent message fails."""
        try:
            while True:
                self._current = item = await self._queue.get()
                try:
                    await self._deliver(item)
                finally:
                    self._current = None
                    self._queue.task_done()
                    if not item.future.done():  # cancelled while sending it
                        item.future.set_exception(ConnectionClosed("the bot stopped before sending this"))
        finally:
            self._fail_pending()

    async def drain(self, timeout: float) -> bool:
        """Wait until everything queued is sent (or failed); False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            return False
        return True

    def _fail_pending(self) -> None:
        items: list[Outgoing] = []
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
            self._queue.task_done()
        for item in items:
            if not item.future.done():
                item.future.set_exception(ConnectionClosed("the bot stopped before sending this"))

    async def _deliver(self, item: Outgoing) -> None:
        if item.future.done():  # cancelled by whoever queued it
            return
        delay = self.bucket.reserve(self._loop.time())
        if delay > 0:
            self.stats.throttled += 1
            await asyncio.sleep(delay)
        try:
            sent = await self._send_retrying(item)
        except Exception as exc:
            self.stats.failed += 1
            log.warning("could not send to %s: %s", item.target, exc)
            if not item.future.done():
                item.future.set_exception(exc)
        else:
            self.stats.sent += 1
            if not item.future.done():
                item.future.set_result(sent)

    async def _send_retrying(self, item: Outgoing) -> Sent:
        deadline = self._loop.time() + self.give_up_after
        while True:
            try:
                return await self._send(item)
            except RequestError as exc:
                if exc.code is ErrorCode.RATE_LIMITED:
                    self.stats.rate_limited += 1
                    self.bucket.drain(self._loop.time())
                if exc.retry_after is None or self._loop.time() + exc.retry_after > deadline:
                    raise
                self.stats.retries += 1
                log.warning("the broker refused a message to %s (%s); resending in %.2f s",
                            item.target, exc, exc.retry_after)
                await asyncio.sleep(exc.retry_after)
