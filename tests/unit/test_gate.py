"""The API's adaptive in-flight limit (`services.api.guard.Gate`), driven by a synthetic clock: it shrinks when
requests queue, grows back one by one while they do not and the limit is reached, and never leaves its bounds."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from services.api import guard
from services.api.guard import Gate
from shared.app.ports import Admission


def run_window(gate: Gate, now: float, took_s: float, n: int = 20) -> float:
    """`n` requests that each took `took_s` end during one window starting at `now`; returns the next window's start."""
    for i in range(n):
        gate.finished(took_s, now + i * gate.window_s / n)
    return now + gate.window_s


def fill(gate: Gate) -> int:
    """Admit requests until the gate refuses one; returns how many it admitted (they stay waiting)."""
    admitted = 0
    while gate.admit():
        admitted += 1
    return admitted


def test_the_limit_shrinks_when_requests_queue_and_sheds_beyond_it():
    gate = Gate(64, min_limit=4)
    now = run_window(gate, 0.0, 0.001)  # the floor: 1 ms
    now = run_window(gate, now, 0.001)
    assert gate.limit == 64
    for _ in range(10):
        now = run_window(gate, now, 0.050)  # 50x the floor: they queue
    assert gate.limit < 64 * 0.9**9 + 1
    for _ in range(40):
        now = run_window(gate, now, 0.050)
    assert gate.limit == 4  # never below its bound
    assert fill(gate) == 4 and gate.shed == 1


def test_a_standing_queue_is_never_learnt_as_normal():
    gate = Gate(64, min_limit=4)
    now = run_window(gate, 0.0, 0.001)
    for _ in range(600):  # a minute of overload: every window full, every request queued
        fill(gate)
        now = run_window(gate, now, 0.050)
        gate.waiting = 0
    assert gate.limit == 4


def test_a_slower_workload_is_learnt_while_the_process_is_not_full():
    gate = Gate(64, min_limit=4)
    now = run_window(gate, 0.0, 0.001)
    for _ in range(500):  # from now on every request takes 10 ms, few at once
        now = run_window(gate, now, 0.010)
    assert 0.009 < gate.floor_s <= 0.010
    before = gate.limit
    for _ in range(10):  # 10 ms is now normal: a full process grows its limit again
        fill(gate)
        now = run_window(gate, now, 0.010)
        gate.waiting = 0
    assert gate.limit == before + 10


def test_the_limit_grows_back_one_by_one_only_while_it_is_reached():
    gate = Gate(64, min_limit=4)
    now = run_window(gate, 0.0, 0.001)
    for _ in range(50):
        now = run_window(gate, now, 0.050)
    assert gate.limit == 4
    for _ in range(5):  # fast again, but nobody reaches the limit: an idle process keeps what it learnt
        now = run_window(gate, now, 0.001)
    assert gate.limit == 4
    grown = []
    for _ in range(100):  # fast and full: one more per window, up to the most allowed
        fill(gate)
        now = run_window(gate, now, 0.001)
        grown.append(gate.limit)
        gate.waiting = 0
    assert grown[:3] == [5, 6, 7] and grown[-1] == 64


def test_latency_within_tolerance_of_the_floor_is_not_queueing():
    gate = Gate(64, min_limit=4)
    now = run_window(gate, 0.0, 0.001)
    for _ in range(20):  # twice the floor plus the slack: what a busy but not queueing process looks like
        now = run_window(gate, now, 0.001 * gate.tolerance + gate.slack_s * 0.9)
    assert gate.limit == 64


def test_a_window_with_too_few_requests_changes_nothing():
    gate = Gate(64, min_limit=4)
    now = run_window(gate, 0.0, 0.001)
    for _ in range(20):
        now = run_window(gate, now, 1.0, n=3)
    assert gate.limit == 64


# -- the tenants this process refuses without Redis ---------------------------------------------------------------
def gcra(rps: float, burst: int) -> Callable[..., Admission]:
    """The ADMIT script's arithmetic (shared/adapters/redis/lua/admit.lua), in ms: admit(now) → Admission."""
    state = {"tat": 0.0}
    step, span, milli = 1000 / rps, 1000 / rps * burst, math.floor(rps * 1000)

    def admit(now: float, peek: bool = False) -> Admission:
        tat = max(state["tat"], now)
        next_tat = tat + step
        if next_tat - now > span or peek:
            return Admission(False, burst, 0, math.ceil(next_tat - now - span), milli / 1000)
        state["tat"] = next_tat
        return Admission(
            True, burst, math.floor((span - (next_tat - now)) / step), math.ceil(next_tat - now), milli / 1000
        )

    return admit


def test_an_admission_that_spends_the_burst_refuses_the_key_here_never_longer_than_the_rate_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [0.0]
    monkeypatch.setattr(guard, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    spent_windows = 0
    for rps, burst in ((50, 50), (2, 10), (1, 1), (3, 1), (7.5, 4), (1000, 1000), (0.333, 2)):
        gate, admit = Gate(64), gcra(rps, burst)
        now = 1_000_000
        for i in range(400):  # requests far faster than the rate, then a pause, then again
            now += 1 if i % 100 else 3000
            clock[0] = now / 1000
            if gate.refusal("k1") is not None:
                assert not admit(now).admitted  # what this process refuses, the rate refuses too
                continue
            a = admit(now)
            if a.admitted:
                gate.spent("k1", "t", a)
                refused = gate.refusal("k1")
                if refused is not None:
                    spent_windows += 1
                    assert a.remaining == 0
                    # refused here as long as the rate refuses, give or take the 2 ms its rounding costs
                    ends = now + refused[1] * 1000
                    assert admit(ends - 0.001, peek=True).wait_ms > 0
                    assert admit(ends + 2, peek=True).wait_ms <= 0
    assert spent_windows > 0  # the shortcut was taken at all


def test_a_refusal_at_parse_time_is_the_whole_429_answer_with_whole_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [10.0]
    monkeypatch.setattr(guard, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    gate = Gate(64)
    assert gate.early_answer([(b"authorization", b"Bearer k1")]) is None
    gate.spent("k1", "t", Admission(True, 50, 0, 995, 50.0))  # 1000 ms of burst, 995 used: refused for 14 ms
    gate.spent("k2", "t", Admission(True, 50, 1, 975, 50.0))  # one left: nothing to refuse
    assert gate.early_answer([(b"authorization", b"Bearer k2")]) is None
    clock[0] += 0.0139
    answer = gate.early_answer([(b"authorization", b"Bearer k1")])
    assert answer is not None and answer.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    assert b"\r\nretry-after: 1\r\n" in answer and b'"rate_limited"' in answer
    clock[0] += 0.0002
    assert gate.early_answer([(b"authorization", b"Bearer k1")]) is None
