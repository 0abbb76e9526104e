"""Flood control (zchat.broker.ratelimit): token buckets, strikes and penalties, memory bound.

Pure and clock-injected, so every test states its times; the properties check the promises
of the module docstring over any sequence of charges: the interval bound, that refusals
change nothing, and that ``retry_after`` is exact.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zchat.broker.ratelimit import RATE_LIMITS_OFF, FloodControl, Kind, Rate, RateLimits, Verdict

T0 = 1_000.0  # a monotonic clock's reading
ANN, BOB = "ann-key", "bob-key"
OK = (Verdict.OK, 0.0)

#: Only messages limited (2 a second, 4 at once), 3 strikes in 10 s cost 60 s.
SMALL = RateLimits(Rate(2, 4), None, None, None, strikes=3, strike_window=10.0, penalty=60.0)
NO_STRIKES = replace(SMALL, strikes=0)


def drain(flood: FloodControl, principal: str, kind: Kind, now: float, count: int) -> None:
    for _ in range(count):
        assert flood.charge(principal, kind, now) == OK


# -- Rate and RateLimits --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("2/20", Rate(2, 20)),
        ("0.5/5", Rate(0.5, 5)),
        (" 8192/65536 ", Rate(8192, 65536)),
        ("1e3/1e4", Rate(1000, 10000)),
    ],
)
def test_rate_parses_rate_slash_burst(text: str, rate: Rate) -> None:
    assert Rate.parse(text) == rate
    assert Rate.parse(str(rate)) == rate


@pytest.mark.parametrize("text", ["0", "off", "OFF", " Off "])
def test_rate_zero_or_off_disables(text: str) -> None:
    assert Rate.parse(text) is None


@pytest.mark.parametrize("text", ["", "2", "2/", "/20", "a/b", "0/20", "2/0", "-1/5", "inf/5", "2/nan", "2/20/3"])
def test_rate_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError):
        Rate.parse(text)


def test_rate_must_be_positive_and_finite() -> None:
    for per_second, burst in ((0, 1), (1, 0), (-1, 1), (math.inf, 1), (1, math.nan)):
        with pytest.raises(ValueError):
            Rate(per_second, burst)
    assert str(Rate(2, 20)) == "2/20"


def test_rate_limits_defaults_and_off() -> None:
    limits = RateLimits()
    assert (limits.messages, limits.bytes, limits.subscriptions, limits.history) == (
        Rate(2, 20),
        Rate(8192, 65536),
        Rate(10, 400),
        Rate(10, 200),
    )
    assert (limits.strikes, limits.strike_window, limits.penalty, limits.max_principals) == (50, 10.0, 60.0, 100_000)
    assert [limits.rate(kind) for kind in Kind] == [limits.messages, limits.bytes, limits.subscriptions, limits.history]
    assert [RATE_LIMITS_OFF.rate(kind) for kind in Kind] == [None] * 4


@pytest.mark.parametrize(
    "bad", [{"strikes": -1}, {"strike_window": 0.0}, {"penalty": -1.0}, {"penalty": math.inf}, {"max_principals": 0}]
)
def test_rate_limits_refuse_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RateLimits(**bad)  # type: ignore[arg-type]


# -- buckets --------------------------------------------------------------------------------


def test_a_full_bucket_takes_a_burst_then_refuses_until_it_refills() -> None:
    flood = FloodControl(NO_STRIKES)
    drain(flood, ANN, Kind.MESSAGES, T0, 4)
    assert flood.charge(ANN, Kind.MESSAGES, T0) == (Verdict.LIMITED, 0.5)
    assert flood.charge(ANN, Kind.MESSAGES, T0 + 0.25) == (Verdict.LIMITED, 0.25)
    assert flood.charge(ANN, Kind.MESSAGES, T0 + 0.5) == OK
    assert flood.charge(ANN, Kind.MESSAGES, T0 + 0.5)[0] is Verdict.LIMITED
    drain(flood, ANN, Kind.MESSAGES, T0 + 100, 4)  # refilled to the burst, not beyond
    assert flood.charge(ANN, Kind.MESSAGES, T0 + 100)[0] is Verdict.LIMITED


def test_principals_and_kinds_have_their_own_buckets() -> None:
    flood = FloodControl(RateLimits(strikes=0))
    drain(flood, ANN, Kind.MESSAGES, T0, 20)
    assert flood.charge(ANN, Kind.MESSAGES, T0)[0] is Verdict.LIMITED
    assert flood.charge(BOB, Kind.MESSAGES, T0) == OK
    assert flood.charge(ANN, Kind.HISTORY, T0) == OK
    assert flood.charge(ANN, Kind.SUBSCRIPTIONS, T0) == OK
    assert flood.charge(ANN, Kind.BYTES, T0, 65536) == OK
    assert flood.charge(ANN, Kind.BYTES, T0, 1) == (Verdict.LIMITED, 1 / 8192)
    assert len(flood) == 2


def test_an_amount_above_the_burst_never_passes() -> None:
    flood = FloodControl(RateLimits(strikes=0))
    for now in (T0, T0 + 10, T0 + 1000):
        assert flood.charge(ANN, Kind.BYTES, now, 65537) == (Verdict.LIMITED, 8.0)  # 65536 / 8192
    assert flood.charge(ANN, Kind.BYTES, T0 + 1000, 65536) == OK  # and took nothing meanwhile


def test_a_zero_amount_always_passes() -> None:
    flood = FloodControl(NO_STRIKES)
    drain(flood, ANN, Kind.MESSAGES, T0, 4)
    assert flood.charge(ANN, Kind.MESSAGES, T0, 0.0) == OK


def test_unlimited_kinds_pass_and_track_nobody() -> None:
    flood = FloodControl(RATE_LIMITS_OFF)
    for kind in Kind:
        drain(flood, ANN, kind, T0, 1000)
    assert len(flood) == 0
    flood = FloodControl(SMALL)
    drain(flood, ANN, Kind.BYTES, T0, 1000)
    assert len(flood) == 0


def test_a_clock_going_backwards_refills_nothing() -> None:
    flood = FloodControl(NO_STRIKES)
    drain(flood, ANN, Kind.MESSAGES, T0, 4)
    assert flood.charge(ANN, Kind.MESSAGES, T0 - 50)[0] is Verdict.LIMITED
    assert flood.charge(ANN, Kind.MESSAGES, T0 + 0.5) == OK  # refill counts from T0, not T0 - 50
    assert flood.charge(ANN, Kind.MESSAGES, T0 + 0.5)[0] is Verdict.LIMITED


# -- strikes and penalties ------------------------------------------------------------------


def test_strikes_within_the_window_penalise() -> None:
    flood = FloodControl(SMALL)
    drain(flood, ANN, Kind.MESSAGES, T0, 4)
    assert flood.charge(ANN, Kind.MESSAGES, T0)[0] is Verdict.LIMITED
    assert flood.charge(ANN, Kind.MESSAGES, T0 + 0.1)[0] is Verdict.LIMITED
    assert flood.charge(ANN, Kind.MESSAGES, T0 + 0.2) == (Verdict.PENALISED, 60.0)
    assert flood.penalty_left(ANN, T0 + 10.2) == pytest.approx(50.0)
    # Everything is refused meanwhile, unlimited kinds included; nobody else is affected.
    verdict, left = flood.charge(ANN, Kind.MESSAGES, T0 + 30.2)
    assert verdict is Verdict.PENALISED and left == pytest.approx(30.0)
    assert flood.charge(ANN, Kind.BYTES, T0 + 30.2)[0] is Verdict.PENALISED
    assert flood.charge(BOB, Kind.MESSAGES, T0 + 30.2) == OK
    # Over: a full bucket again, and a clean slate of strikes.
    assert flood.penalty_left(ANN, T0 + 60.2) == 0.0
    drain(flood, ANN, Kind.MESSAGES, T0 + 60.2, 4)
    assert flood.charge(ANN, Kind.MESSAGES, T0 + 60.2)[0] is Verdict.LIMITED
    assert flood.charge(ANN, Kind.MESSAGES, T0 + 60.2)[0] is Verdict.LIMITED


def test_strikes_spread_wider_than_the_window_do_not_penalise() -> None:
    flood = FloodControl(SMALL)
    for second in range(0, 100, 6):  # a strike every 6 s: never 3 within 10 s
        now = T0 + second
        drain(flood, ANN, Kind.MESSAGES, now, 4)
        assert flood.charge(ANN, Kind.MESSAGES, now)[0] is Verdict.LIMITED
    assert flood.penalty_left(ANN, T0 + 100) == 0.0


def test_zero_strikes_never_penalise() -> None:
    flood = FloodControl(NO_STRIKES)
    drain(flood, ANN, Kind.MESSAGES, T0, 4)
    for _ in range(1000):
        assert flood.charge(ANN, Kind.MESSAGES, T0)[0] is Verdict.LIMITED
    assert flood.penalty_left(ANN, T0) == 0.0


def test_penalty_left_of_a_stranger_is_zero() -> None:
    assert FloodControl(SMALL).penalty_left("nobody", T0) == 0.0


# -- memory -----------------------------------------------------------------------------------


def test_beyond_max_principals_the_longest_idle_is_forgotten() -> None:
    flood = FloodControl(replace(NO_STRIKES, max_principals=3))
    for index, principal in enumerate("abc"):
        drain(flood, principal, Kind.MESSAGES, T0 + index * 0.01, 4)
    assert flood.charge("a", Kind.MESSAGES, T0 + 0.1)[0] is Verdict.LIMITED  # a: charged last now
    assert flood.charge("d", Kind.MESSAGES, T0 + 0.1) == OK  # forgets b, the longest idle
    assert len(flood) == 3
    assert flood.charge("a", Kind.MESSAGES, T0 + 0.1)[0] is Verdict.LIMITED  # still tracked
    assert flood.charge("c", Kind.MESSAGES, T0 + 0.1)[0] is Verdict.LIMITED
    drain(flood, "b", Kind.MESSAGES, T0 + 0.1, 4)  # forgotten: a fresh, full bucket


def test_sweep_forgets_only_quiet_principals() -> None:
    flood = FloodControl(SMALL)
    drain(flood, "full", Kind.MESSAGES, T0, 1)  # full again 0.5 s later
    drain(flood, "empty", Kind.MESSAGES, T0, 4)  # full again 2 s later
    drain(flood, "penalised", Kind.MESSAGES, T0, 4)
    for _ in range(3):
        flood.charge("penalised", Kind.MESSAGES, T0)
    assert flood.sweep(T0) == 0
    assert flood.sweep(T0 + 1) == 1
    assert len(flood) == 2
    assert flood.sweep(T0 + 2) == 1
    assert flood.sweep(T0 + 59) == 0
    assert flood.penalty_left("penalised", T0 + 59) == pytest.approx(1.0)
    assert flood.sweep(T0 + 60) == 1
    assert len(flood) == 0


def test_sweep_keeps_a_principal_with_recent_strikes() -> None:
    flood = FloodControl(SMALL)
    assert flood.charge(ANN, Kind.MESSAGES, T0, 5)[0] is Verdict.LIMITED  # above the burst: a strike
    assert flood.sweep(T0 + 5) == 0  # its bucket is full, but forgetting it would forget the strike
    assert flood.sweep(T0 + 10.5) == 1


def test_sweep_stops_at_the_first_recent_principal_that_is_not_quiet() -> None:
    flood = FloodControl(SMALL)
    drain(flood, "old", Kind.MESSAGES, T0, 1)
    drain(flood, "busy", Kind.MESSAGES, T0 + 99.9, 4)
    drain(flood, "new", Kind.MESSAGES, T0 + 99.9, 1)
    # old is quiet; busy is not and recent, so new (quiet too by now) waits for a later sweep.
    assert flood.sweep(T0 + 100.5) == 1
    assert flood.sweep(T0 + 102) == 2


# -- reloading limits -------------------------------------------------------------------------


def test_new_limits_apply_to_existing_buckets() -> None:
    flood = FloodControl(NO_STRIKES)
    drain(flood, ANN, Kind.MESSAGES, T0, 1)  # 3 tokens left
    flood.limits = replace(NO_STRIKES, messages=Rate(1, 2))
    assert flood.limits.messages == Rate(1, 2)
    drain(flood, ANN, Kind.MESSAGES, T0, 2)  # capped at the new burst
    assert flood.charge(ANN, Kind.MESSAGES, T0) == (Verdict.LIMITED, 1.0)  # the new rate
    flood.limits = replace(NO_STRIKES, messages=None)
    drain(flood, ANN, Kind.MESSAGES, T0, 100)


def test_new_limits_shrink_the_tracked_set_and_the_strike_count() -> None:
    flood = FloodControl(replace(SMALL, strikes=10))
    for principal in "abcde":
        drain(flood, principal, Kind.MESSAGES, T0, 4)
    assert flood.charge("e", Kind.MESSAGES, T0)[0] is Verdict.LIMITED  # one strike of 10
    flood.limits = replace(SMALL, strikes=2, max_principals=2)
    assert len(flood) == 2
    assert flood.charge("e", Kind.MESSAGES, T0)[0] is Verdict.PENALISED  # the old strike counts


# -- properties -------------------------------------------------------------------------------

rates = st.builds(
    Rate,
    st.floats(min_value=0.01, max_value=1e4, allow_nan=False, allow_infinity=False),
    st.floats(min_value=0.5, max_value=1e5, allow_nan=False, allow_infinity=False),
)
#: (seconds since the previous charge, amount as a fraction of the burst)
steps = st.lists(
    st.tuples(
        st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=20.0, allow_nan=False)),
        st.one_of(st.just(1.0), st.floats(min_value=0.0, max_value=1.2, allow_nan=False)),
    ),
    max_size=40,
)
PROPERTY = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def run(flood: FloodControl, rate: Rate, start: float, plan: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Charge ``plan`` as ANN's messages from ``start``; return (time, amount) of each charge."""
    charges = []
    now = start
    for dt, fraction in plan:
        now += dt
        charges.append((now, fraction * rate.burst))
    return charges


@PROPERTY
@given(rate=rates, strikes=st.integers(0, 5), start=st.floats(0, 1e7), plan=steps)
def test_no_interval_gets_more_than_burst_plus_rate_times_its_length(
    rate: Rate, strikes: int, start: float, plan: list[tuple[float, float]]
) -> None:
    flood = FloodControl(RateLimits(rate, None, None, None, strikes=strikes, penalty=5.0))
    accepted = [(t, a) for t, a in run(flood, rate, start, plan) if flood.charge(ANN, Kind.MESSAGES, t, a) == OK]
    for i, (t0, _) in enumerate(accepted):
        total = 0.0
        for t1, amount in accepted[i:]:
            total += amount
            bound = rate.burst + rate.per_second * (t1 - t0)
            assert total <= bound * (1 + 1e-9) + 1e-9


@PROPERTY
@given(rate=rates, start=st.floats(0, 1e7), plan=steps)
def test_refusals_change_nothing(rate: Rate, start: float, plan: list[tuple[float, float]]) -> None:
    """After a refused charge, the controller answers every later charge exactly as a copy
    taken before it does (strikes off: counting them is the one thing a refusal does)."""
    flood = FloodControl(RateLimits(rate, None, None, None, strikes=0))
    charges = run(flood, rate, start, plan)
    for index, (t, amount) in enumerate(charges):
        before = copy.deepcopy(flood)
        if flood.charge(ANN, Kind.MESSAGES, t, amount)[0] is Verdict.OK:
            continue
        for later, later_amount in charges[index + 1 :]:
            assert flood.charge(ANN, Kind.MESSAGES, later, later_amount) == before.charge(
                ANN, Kind.MESSAGES, later, later_amount
            )
        return


@PROPERTY
@given(rate=rates, start=st.floats(0, 1e7), plan=steps)
def test_retry_after_is_exact(rate: Rate, start: float, plan: list[tuple[float, float]]) -> None:
    """A refused charge passes when made again ``retry_after`` later, and not much sooner."""
    flood = FloodControl(RateLimits(rate, None, None, None, strikes=0))
    for t, amount in run(flood, rate, start, plan):
        verdict, retry_after = flood.charge(ANN, Kind.MESSAGES, t, amount)
        if verdict is Verdict.OK:
            assert retry_after == 0.0
            continue
        assert verdict is Verdict.LIMITED and retry_after > 0
        if amount > rate.burst:
            assert retry_after == rate.burst / rate.per_second
            continue
        if retry_after > 1e-6:
            early = copy.deepcopy(flood)
            assert early.charge(ANN, Kind.MESSAGES, t + retry_after * 0.999, amount)[0] is Verdict.LIMITED
        retry = copy.deepcopy(flood)
        assert retry.charge(ANN, Kind.MESSAGES, t + retry_after, amount) == OK


@PROPERTY
@given(
    strikes=st.integers(1, 6),
    penalty=st.floats(0, 1000),
    start=st.floats(0, 1e7),
    gaps=st.lists(st.floats(0, 3), max_size=30),
)
def test_penalties_last_exactly_their_time(strikes: int, penalty: float, start: float, gaps: list[float]) -> None:
    """Whatever ``PENALISED`` says is left, the penalty is over then and not before."""
    flood = FloodControl(RateLimits(Rate(1, 1), None, None, None, strikes=strikes, penalty=penalty))
    now = start
    for gap in gaps:
        now += gap
        verdict, left = flood.charge(ANN, Kind.MESSAGES, now, 2.0)  # above the burst: always refused
        assert verdict is not Verdict.OK
        if verdict is Verdict.PENALISED:
            assert flood.penalty_left(ANN, now) == left
            assert flood.penalty_left(ANN, now + left) == 0.0
            if left > 1e-6:
                assert flood.penalty_left(ANN, now + left * 0.999) > 0.0
