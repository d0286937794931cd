"""Admissions: a tenant's requests admitted from leases of its rate, one `Limits` call per lease, the rate exact."""

from __future__ import annotations

import asyncio

from shared.adapters.memory.limits import MemoryLimits
from shared.adapters.memory.store import Memory
from shared.app.admission import Admissions
from shared.app.ports import Admission
from shared.domain.wire import TenantLimits


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Counted(MemoryLimits):
    """The memory limits, counting the calls that would be Redis round trips."""

    calls = 0

    async def admit(self, tenant: str, want: int = 1, unused: int = 0, unused_day: str = "") -> Admission:
        self.calls += 1
        return await super().admit(tenant, want, unused, unused_day)


def setup(limits: TenantLimits, processes: int = 1) -> tuple[Clock, Counted, list[Admissions]]:
    clock = Clock()
    shared = Counted(Memory(4, clock), limits)
    return (
        clock,
        shared,
        [Admissions(shared, max_lease=64, lease_s=0.05, ttl_s=1.0, clock=clock) for _ in range(processes)],
    )


async def requests_counted(limits: Counted) -> int:
    return (await limits.usage("acme", 1))[0].requests


async def test_a_busy_tenant_costs_one_call_per_lease_and_its_counter_ends_exact() -> None:
    _, limits, (admissions,) = setup(TenantLimits(rps=1000, burst=2000))
    answers = [await admissions.admit("acme") for _ in range(200)]
    assert all(a.admitted for a in answers)
    assert [a.remaining for a in answers[1:4]] == [1998, 1997, 1996]  # what is left counts the lease's unspent
    await asyncio.sleep(0.01)  # the next lease, asked for when the last was down to a quarter, lands
    # the first learns the tenant's limits; then leases of 50 (50 ms of its rate), each asked for while the one
    # before still had 12 left: 199 requests spend four, and the fifth is there for the next
    assert limits.calls == 1 + 5
    assert await requests_counted(limits) == 1 + 5 * 50  # a lease counts as made when taken...
    await admissions.settle(everything=True)
    assert await requests_counted(limits) == 200  # ...and its unspent requests go back


async def test_the_rate_holds_exactly_across_processes_taking_leases() -> None:
    _, limits, processes = setup(TenantLimits(rps=100, burst=40), processes=3)  # leases of 5
    admitted = [0, 0, 0]
    refused = [False, False, False]
    i = 0
    while not all(refused):
        p = i % 3
        i += 1
        if (await processes[p].admit("acme")).admitted:
            admitted[p] += 1
        else:
            refused[p] = True
    assert sum(admitted) == 40  # the burst, not a request more: a process is refused only once its lease is spent
    assert min(admitted) > 0 and limits.calls < 40
    assert await requests_counted(limits) == 40


async def test_a_small_tenant_is_asked_about_every_request() -> None:
    _, limits, (admissions,) = setup(TenantLimits(rps=10, burst=20))  # half a request per 50 ms: no lease
    answers = [await admissions.admit("acme") for _ in range(21)]
    assert [a.admitted for a in answers] == [True] * 20 + [False]
    assert limits.calls == 21 and [a.remaining for a in answers[:3]] == [19, 18, 17]


async def test_a_lease_past_its_time_gives_its_unspent_requests_back_to_the_other_processes() -> None:
    # no refill: every request counts
    clock, limits, (first, second) = setup(TenantLimits(rps=0.01, burst=40), processes=2)
    first.lease_s = second.lease_s = 1_000.0  # leases of 5 (an eighth of the burst) despite the slow rate
    for _ in range(2):
        assert (await first.admit("acme")).admitted  # one to learn the limits, then a lease of 5: 4 unspent
    while (await second.admit("acme")).admitted:
        pass
    assert await requests_counted(limits) == 40  # the second got all but the first's lease
    clock.now += 1.0
    await first.settle()
    assert await requests_counted(limits) == 36
    served = 0
    while (await second.admit("acme")).admitted:
        served += 1
    assert served == 4


async def test_an_expired_lease_goes_back_with_the_next_grant_and_a_failed_return_is_dropped() -> None:
    clock, limits, (admissions,) = setup(TenantLimits(rps=1000, burst=2000))
    await admissions.admit("acme")
    await admissions.admit("acme")  # a lease of 50, one spent
    clock.now += 0.5  # (the rate refills meanwhile; the counter is what shows the return)
    assert await requests_counted(limits) == 51
    clock.now += 0.6
    calls = limits.calls
    await admissions.admit("acme")  # the lease ran out: its 49 go back in the call that takes the next one
    assert limits.calls == calls + 1 and await requests_counted(limits) == 2 + 50

    async def broken(*_: object) -> Admission:
        raise ConnectionError("gone")

    clock.now += 1.1
    limits.admit = broken  # type: ignore[method-assign]
    await admissions.settle()  # the store is gone: those requests stay counted, nothing raises


class Slow(Counted):
    """Counted limits whose answers take a turn of the event loop, as a Redis round trip does."""

    wants: list[int]

    async def admit(self, tenant: str, want: int = 1, unused: int = 0, unused_day: str = "") -> Admission:
        self.wants = [*getattr(self, "wants", []), want]
        await asyncio.sleep(0.001)
        return await super().admit(tenant, want, unused, unused_day)


async def test_requests_that_arrive_while_a_lease_is_asked_for_wait_for_it_instead_of_each_taking_one() -> None:
    """50 requests at once used to take 50 leases of 50: the tenant's whole burst of 2,000, then 429s."""
    clock = Clock()
    limits = Slow(Memory(4, clock), TenantLimits(rps=1000, burst=2000))
    admissions = Admissions(limits, max_lease=64, lease_s=0.05, ttl_s=1.0, clock=clock)
    assert (await admissions.admit("acme")).admitted  # learns the tenant's limits: leases of 50 from now on
    for _ in range(3):
        answers = await asyncio.gather(*(admissions.admit("acme") for _ in range(120)))
        assert all(a.admitted for a in answers)
    assert limits.wants == [1] + [50] * 8  # 1 + 360 requests: one lease at a time, each spent before the next
    assert await requests_counted(limits) == 1 + 8 * 50


async def test_a_refused_lease_refuses_the_requests_that_waited_for_it_and_a_failed_one_fails_them() -> None:
    clock = Clock()
    limits = Slow(Memory(4, clock), TenantLimits(rps=1000, burst=16))  # leases of 2 (an eighth of the burst)
    admissions = Admissions(limits, max_lease=64, lease_s=0.05, ttl_s=1.0, clock=clock)
    answers = [await admissions.admit("acme") for _ in range(15)]
    assert all(a.admitted for a in answers)
    waited = await asyncio.gather(*(admissions.admit("acme") for _ in range(5)))
    assert [a.admitted for a in waited] == [True, False, False, False, False]  # the burst's last one, then none
    assert limits.wants.count(2) == len(limits.wants) - 1  # the refusals came from the one grant they waited on

    class Down(Exception):
        pass

    async def failing(*args: object) -> Admission:
        await asyncio.sleep(0.001)
        raise Down

    limits.admit = failing  # type: ignore[method-assign]
    clock.now += 10  # the burst is whole again; the store is not there
    results = await asyncio.gather(*(admissions.admit("acme") for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, Down) for r in results)


async def test_a_request_that_goes_away_while_its_lease_is_asked_for_does_not_lose_it_for_the_others() -> None:
    clock = Clock()
    limits = Slow(Memory(4, clock), TenantLimits(rps=1000, burst=2000))
    admissions = Admissions(limits, max_lease=64, lease_s=0.05, ttl_s=1.0, clock=clock)
    await admissions.admit("acme")  # leases of 50 from now on
    first = asyncio.create_task(admissions.admit("acme"))  # asks for the lease
    await asyncio.sleep(0)
    others = [asyncio.create_task(admissions.admit("acme")) for _ in range(3)]
    await asyncio.sleep(0)
    first.cancel()  # its client went away while the lease was asked for
    answers = await asyncio.gather(*others)
    assert first.cancelled() and all(a.admitted for a in answers)
    assert limits.wants == [1, 50]  # the lease it asked for serves the others; nobody asked again
    assert answers[-1].remaining == 2000 - 51 + 47


async def test_the_next_lease_is_asked_for_while_requests_still_spend_the_last_one() -> None:
    """Asked for once a lease is down to a quarter: the requests spend what it has left meanwhile, and only those
    that find it spent wait for the ask."""
    clock = Clock()
    gate = asyncio.Event()

    class Gated(Counted):
        async def admit(self, tenant: str, want: int = 1, unused: int = 0, unused_day: str = "") -> Admission:
            if want > 1 and self.calls >= 2:  # the second lease on waits for the gate
                self.calls += 1
                await gate.wait()
                self.calls -= 1
            return await super().admit(tenant, want, unused, unused_day)

    limits = Gated(Memory(4, clock), TenantLimits(rps=1000, burst=2000))
    admissions = Admissions(limits, max_lease=64, lease_s=0.05, ttl_s=1.0, clock=clock)
    await admissions.admit("acme")  # learns the limits
    spent = [await admissions.admit("acme") for _ in range(38)]  # the first lease of 50, down to 12: the next asked
    await asyncio.sleep(0)
    assert limits.calls == 3 and all(a.admitted for a in spent)
    for _ in range(12):  # the rest of the first lease, each without waiting for the ask in flight
        request = asyncio.ensure_future(admissions.admit("acme"))
        await asyncio.sleep(0)
        assert request.done() and request.result().admitted
    waiting = asyncio.ensure_future(admissions.admit("acme"))
    await asyncio.sleep(0)
    assert not waiting.done()  # the lease is spent: this one waits for the next
    gate.set()
    assert (await waiting).admitted
    await admissions.settle(everything=True)
    assert await requests_counted(limits) == 1 + 50 + 1


async def test_what_is_left_never_counts_more_than_the_burst() -> None:
    """A lease asked for early carries the last one's unspent requests over; meanwhile the tenant's bucket refilled,
    so the bucket and both leases together could count more than the burst: `RateLimit`'s `r` stays below it."""
    clock, _, (admissions,) = setup(TenantLimits(rps=400, burst=200))
    answers = []
    for _ in range(300):
        answers.append(await admissions.admit("acme"))
        await asyncio.sleep(0)  # the early ask lands while the requests go on
        clock.now += 0.005  # 2 requests' worth of refill between requests: the bucket stays near full
    assert all(a.admitted for a in answers)
    assert max(a.remaining for a in answers) < 200 and min(a.remaining for a in answers) > 0  # this one spent


def test_a_request_whose_lease_another_spent_in_the_same_turn_asks_anew_and_does_not_spin() -> None:
    """An ask answers a lease of one (a tenant at its limit). Two requests that start in the turn the ask ends: the
    first spends the lease; the second, finding the ask still registered (its done callback runs a turn later),
    awaited it again at once, without yielding, for ever (a CI run's API spun at 100 % CPU for 20 minutes). The
    loop runs in a thread the test can give up on: a spinning loop never lets a timeout fire."""
    import threading

    class OneAtATime(Counted):
        gate: asyncio.Event

        async def admit(self, tenant: str, want: int = 1, unused: int = 0, unused_day: str = "") -> Admission:
            if self.calls == 1:
                await self.gate.wait()  # the lease's ask: held until both requests are about to start
            return await super().admit(tenant, 1, unused, unused_day)  # a lease of one

    async def main() -> list[Admission]:
        clock = Clock()
        limits = OneAtATime(Memory(4, clock), TenantLimits(rps=1000, burst=2000))
        limits.gate = asyncio.Event()
        admissions = Admissions(limits, max_lease=64, lease_s=0.05, ttl_s=1.0, clock=clock)
        await admissions.admit("acme")  # learns the limits: leases of 50 from now on
        first = asyncio.ensure_future(admissions.admit("acme"))  # asks for a lease (granted: one)
        await asyncio.sleep(0)
        limits.gate.set()  # the ask ends in the next turn, and so do these two start
        others = [asyncio.ensure_future(admissions.admit("acme")) for _ in range(2)]
        return await asyncio.gather(first, *others)

    answers: list[Admission] = []
    loop = threading.Thread(target=lambda: answers.extend(asyncio.run(main())), daemon=True)
    loop.start()
    loop.join(10)
    assert not loop.is_alive(), "a request spins on an ask that already answered"
    assert len(answers) == 3 and all(a.admitted for a in answers)
