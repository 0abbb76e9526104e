"""Flood control: token buckets per principal, sans-I/O (the caller passes the clock in).

Each principal (a CURVE key, or a client-identity hash in insecure mode) has one bucket per
:class:`Kind`. A bucket holds up to ``burst`` tokens and refills at ``per_second``; a charge
of ``amount`` passes if the bucket holds that many tokens and takes them, or is refused and
takes nothing. So over any interval ``[t0, t1]`` a principal gets at most
``burst + per_second * (t1 - t0)`` of a kind through.

Refusals are *strikes*. ``strikes`` refusals within ``strike_window`` seconds *penalise* the
principal for ``penalty`` seconds: every charge meanwhile is refused (the broker ends its
sessions and refuses its hellos until :meth:`FloodControl.penalty_left` is 0).

Memory is bounded: at most ``max_principals`` are tracked; beyond that the one idle the
longest is forgotten. Forgetting a principal only gives it a fresh, full bucket (and lifts a
penalty it may be serving): limits hold per principal as long as the broker tracks fewer
principals than that, which :meth:`FloodControl.sweep` helps by forgetting idle ones.

Times are seconds on a monotonic clock. If it goes backwards, buckets do not refill until it
has caught up again (a bucket never gains tokens it would not have had).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from enum import Enum, IntEnum

__all__ = ["RATE_LIMITS_OFF", "FloodControl", "Kind", "Rate", "RateLimits", "Verdict"]


class Kind(IntEnum):
    """What a charge counts. Its name, lowercased, is its field of :class:`RateLimits`.

    An IntEnum (still an :class:`~enum.Enum`) because the value indexes a principal's
    bucket list and hashes in C: :meth:`FloodControl.charge` runs for every message.
    """

    MESSAGES = 0  # say and dm requests
    BYTES = 1  # the frame size of say and dm requests
    SUBSCRIPTIONS = 2  # join requests; in secure mode also the key's XPUB subscriptions
    HISTORY = 3  # history requests


class Verdict(Enum):
    """The outcome of :meth:`FloodControl.charge`."""

    OK = "ok"  # the tokens were taken
    LIMITED = "limited"  # refused; retry after the seconds returned with it
    PENALISED = "penalised"  # refused: the principal is kept out for the seconds returned


_OFF_WORDS = frozenset({"0", "off"})


@dataclass(frozen=True, slots=True)
class Rate:
    """A token bucket's shape: ``per_second`` tokens refill, up to ``burst`` held."""

    per_second: float
    burst: float

    def __post_init__(self) -> None:
        for name, value in (("per_second", self.per_second), ("burst", self.burst)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"rate {name} must be a positive number, not {value!r}")

    @classmethod
    def parse(cls, text: str) -> Rate | None:
        """``"RATE/BURST"`` (e.g. ``"2/20"``: 2 a second, 20 at once); ``"0"`` or ``"off"``
        disable the kind (None).

        Raises:
            ValueError: anything else, or a rate or burst that is not positive.
        """
        word = text.strip().lower()
        if word in _OFF_WORDS:
            return None
        rate, slash, burst = word.partition("/")
        if not slash:
            raise ValueError(f"a rate is RATE/BURST (like 2/20), or 0 or off, not {text!r}")
        try:
            return cls(float(rate), float(burst))
        except ValueError as exc:
            raise ValueError(f"bad rate {text!r}: {exc}") from None

    def __str__(self) -> str:
        return f"{self.per_second:g}/{self.burst:g}"


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Flood-control settings; a None rate leaves that kind unlimited.

    Args:
        strikes: refusals within ``strike_window`` seconds that penalise a principal;
            0 never penalises.
        strike_window: seconds, see ``strikes``.
        penalty: seconds a penalised principal is kept out.
        max_principals: how many principals are tracked at most (memory bound).
    """

    messages: Rate | None = Rate(2, 20)
    bytes: Rate | None = Rate(8192, 65536)
    subscriptions: Rate | None = Rate(10, 400)
    history: Rate | None = Rate(10, 200)
    strikes: int = 50
    strike_window: float = 10.0
    penalty: float = 60.0
    max_principals: int = 100_000

    def __post_init__(self) -> None:
        if self.strikes < 0:
            raise ValueError(f"strikes must be 0 or more, not {self.strikes}")
        if not (math.isfinite(self.strike_window) and self.strike_window > 0):
            raise ValueError(f"strike_window must be a positive number, not {self.strike_window}")
        if not (math.isfinite(self.penalty) and self.penalty >= 0):
            raise ValueError(f"penalty must be 0 or more seconds, not {self.penalty}")
        if self.max_principals < 1:
            raise ValueError(f"max_principals must be at least 1, not {self.max_principals}")

    def rate(self, kind: Kind) -> Rate | None:
        """The rate of ``kind`` (None: unlimited)."""
        rate: Rate | None = getattr(self, kind.name.lower())
        return rate


RATE_LIMITS_OFF = RateLimits(None, None, None, None)

_OK = (Verdict.OK, 0.0)
_NEVER = -math.inf


def _delay(now: float, until: float) -> float:
    """The least ``d >= 0`` with ``now + d >= until`` in floating point: a caller that waits
    ``d`` seconds from ``now`` is not early by a rounding error."""
    if until <= now:
        return 0.0
    d = until - now
    while now + d < until:
        d = max(math.nextafter(d, math.inf), math.nextafter(now + d, math.inf) - now)
    return d


class _Principal:
    """One principal's state: two floats per kind (tokens and when they were counted; a
    bucket never charged is ``0.0`` tokens at ``-inf``, which reads as full)."""

    __slots__ = ("last", "levels", "strikes", "until")

    def __init__(self, now: float) -> None:
        self.last = now  # when it was last charged
        self.levels = [0.0, _NEVER] * len(Kind)
        self.until = _NEVER  # penalised until then
        self.strikes: deque[float] | None = None  # times of the latest refusals


class FloodControl:
    """Token buckets for every principal that sends; see the module docstring.

    ``limits`` may be replaced at any time (a configuration reload): buckets keep their
    tokens, capped at the new bursts, and refill at the new rates from then on.
    """

    def __init__(self, limits: RateLimits) -> None:
        self._states: OrderedDict[str, _Principal] = OrderedDict()  # least recently charged first
        self.limits = limits

    @property
    def limits(self) -> RateLimits:
        return self._limits

    @limits.setter
    def limits(self, limits: RateLimits) -> None:
        self._limits = limits
        self._rates = tuple(limits.rate(kind) for kind in Kind)
        # After this long without a charge, a principal's buckets are full, its strikes out
        # of the window and its penalty over: sweep stops at the first one more recent.
        refills = [rate.burst / rate.per_second for rate in self._rates if rate is not None]
        self._quiet_after = max([limits.strike_window, limits.penalty, *refills])
        while len(self._states) > limits.max_principals:
            self._states.popitem(last=False)

    def __len__(self) -> int:
        """How many principals are tracked."""
        return len(self._states)

    def charge(
        self, principal: str, kind: Kind, now: float, amount: float = 1.0, *, strike: bool = True
    ) -> tuple[Verdict, float]:
        """Take ``amount`` (>= 0) tokens of ``kind`` from ``principal``'s bucket at ``now``.

        ``strike=False`` refuses without counting a strike: for traffic a well-behaved peer
        cannot pace by a ``retry_after`` it never sees (the SUB side's subscriptions).

        Returns:
            ``(OK, 0.0)``: taken. ``(LIMITED, retry_after)``: refused, nothing taken, a
            strike recorded; a charge of the same amount ``retry_after`` seconds later
            passes (barring other charges meanwhile). An amount above the bucket's burst can
            never pass: it is refused with the time a bucket takes to fill from empty
            (``burst / per_second``). ``(PENALISED, seconds)``: this refusal was the strike
            that penalised the principal, or it already was; the seconds are what is left
            of the penalty.
        """
        state = self._states.get(principal)
        rate = self._rates[kind]
        if state is None:
            if rate is None:
                return _OK  # unlimited: nothing worth remembering
            state = self._admit(principal, now)
        else:
            self._states.move_to_end(principal)
            state.last = now
            if state.until > now:
                return Verdict.PENALISED, _delay(now, state.until)
            if rate is None:
                return _OK
        levels = state.levels
        i = kind + kind
        tokens, stamp = levels[i], levels[i + 1]
        # Comparisons, not min() and max(): a builtin call costs more than the rest here.
        if now > stamp:  # (a clock that went backwards refills nothing until it caught up)
            tokens += (now - stamp) * rate.per_second
            stamp = now
        if tokens > rate.burst:  # noqa: PLR1730
            tokens = rate.burst
        if amount <= tokens:
            levels[i] = tokens - amount
            levels[i + 1] = stamp
            return _OK
        return self._refuse(state, rate, i, now, amount, strike=strike)

    def _refuse(
        self, state: _Principal, rate: Rate, i: int, now: float, amount: float, *, strike: bool
    ) -> tuple[Verdict, float]:
        """Record a strike; penalise if it is one too many; else say when to retry."""
        limits = self._limits
        if limits.strikes and strike:
            strikes = state.strikes
            if strikes is None or strikes.maxlen != limits.strikes:
                strikes = state.strikes = deque(strikes or (), maxlen=limits.strikes)
            strikes.append(now)
            if len(strikes) == limits.strikes and now - strikes[0] <= limits.strike_window:
                state.strikes = None
                state.until = now + limits.penalty
                return Verdict.PENALISED, _delay(now, state.until)
        if amount > rate.burst:
            return Verdict.LIMITED, rate.burst / rate.per_second
        return Verdict.LIMITED, self._retry_after(state.levels, rate, i, now, amount)

    @staticmethod
    def _retry_after(levels: list[float], rate: Rate, i: int, now: float, amount: float) -> float:
        """The least delay after which the bucket, as :meth:`charge` computes it, holds
        ``amount`` (which is at most its burst)."""
        tokens, stamp = levels[i], levels[i + 1]
        d = _delay(now, stamp + (amount - tokens) / rate.per_second)
        # Rounding in the refill may still leave the bucket a hair short: step up to it.
        while min(rate.burst, tokens + ((now + d) - stamp) * rate.per_second) < amount:
            d = max(math.nextafter(d, math.inf), math.nextafter(now + d, math.inf) - now)
        return d

    def penalty_left(self, principal: str, now: float) -> float:
        """Seconds ``principal`` stays penalised from ``now`` (0.0 if it is not)."""
        state = self._states.get(principal)
        return 0.0 if state is None else _delay(now, state.until)

    def sweep(self, now: float) -> int:
        """Forget principals whose buckets are full, penalty over and strikes out of the
        window (tracking them would change nothing); return how many.

        It walks from the least recently charged and stops at the first that is not quiet
        and was charged too recently to be sure it is: its cost follows what it forgets.
        """
        horizon = now - self._quiet_after
        doomed = []
        for principal, state in self._states.items():
            if self._quiet(state, now):
                doomed.append(principal)
            elif state.last > horizon:
                break
        for principal in doomed:
            del self._states[principal]
        return len(doomed)

    def _quiet(self, state: _Principal, now: float) -> bool:
        if state.until > now:
            return False
        if state.strikes and now - state.strikes[-1] <= self._limits.strike_window:
            return False
        levels = state.levels
        for kind, rate in enumerate(self._rates):
            if rate is not None:
                tokens, stamp = levels[2 * kind], levels[2 * kind + 1]
                if tokens + (max(now, stamp) - stamp) * rate.per_second < rate.burst:
                    return False
        return True

    def _admit(self, principal: str, now: float) -> _Principal:
        while len(self._states) >= self._limits.max_principals:
            self._states.popitem(last=False)
        state = self._states[principal] = _Principal(now)
        return state
