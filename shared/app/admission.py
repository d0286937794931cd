"""Admitting a tenant's requests against its rate without a Redis round trip for each: leases.

Asking the shared limiter about every request costs every request a round trip, which doubles the round trips
of a read that is otherwise one (benchmark rows P1/P2). So a process takes a *lease* of a few requests at once
from the tenant's rate (`Limits.admit(want=n)`) and admits them itself. The lease is charged to the tenant up
front, as if its requests were all made when it was taken, so the rate holds across every process exactly as it
did per request: no process can admit more than the tenant's budget granted it. Near the limit a grant shrinks to
what fits (one, then none), so a tenant at its limit is refused as before.

A lease is small against the tenant's budget: at most `lease_s` of its rate, an eighth of its burst and
`max_lease` requests, and a tenant whose rate gives less than two per `lease_s` (most small tenants) is asked
about per request, exactly as before. It lives at most `ttl_s`; what it did not spend goes back to the rate and
comes off the day's request counter (with the next grant, or `settle` for a tenant gone quiet). The costs, and
what `/usage` shows: while a lease lives, its unspent requests are this process's and count as made; a process
that dies keeps its last lease's unspent requests counted (one lease per tenant, at most `max_lease`).
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable

from shared.app.ports import Admission, Limits

__all__ = ["Admissions"]

TENANTS_REMEMBERED = 10_000
"""Lease sizes kept per process (a tenant not seen since the map was cleared starts from a lease of one)."""


REFILL_AT = 0.25
"""The share of a lease left when the process asks for the next one, so its requests spend the old one meanwhile
instead of all waiting for the ask (a round trip: about 4 % of a busy tenant's throughput, benchmark row P2)."""


class _Lease:
    __slots__ = ("grant", "left", "refill", "taken", "until")

    def __init__(self, grant: Admission, left: int, taken: float, until: float) -> None:
        self.grant, self.left, self.taken, self.until = grant, left, taken, until
        self.refill = math.floor(grant.granted * REFILL_AT)
        """Ask for the next lease once `left` is down to this."""

    def live(self, now: float) -> bool:
        return self.left > 0 and now < self.until


class Admissions:
    """One process's admissions of its tenants' requests: leases taken from `Limits`, spent locally."""

    def __init__(
        self,
        limits: Limits,
        *,
        max_lease: int = 256,
        lease_s: float = 0.05,
        ttl_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.max_lease = max(1, max_lease)
        self.lease_s = lease_s
        self.ttl_s = ttl_s
        self.clock = clock
        self._leases: dict[str, _Lease] = {}
        self._sizes: dict[str, int] = {}
        """tenant → the lease to ask for, from its limits in its last grant (unknown: 1)."""
        self._asking: dict[str, asyncio.Future[Admission]] = {}
        """tenant → the lease this process is asking for now, which its other requests wait for."""
        self._retired: list[tuple[str, _Lease]] = []
        """Leases replaced before they ran out by one counted on another day: `settle` gives back what is left."""

    def lease_size(self, grant: Admission) -> int:
        """What to ask for next, from the limits a grant carried."""
        if grant.burst <= 0 or grant.rps <= 0:  # unlimited: the lease only saves counting each request
            return self.max_lease
        size = min(self.max_lease, grant.burst // 8, math.floor(grant.rps * self.lease_s))
        return size if size >= 2 else 1

    async def admit(self, tenant: str) -> Admission:
        """One request of the tenant's: from this process's lease if it has one, else from a new grant. One lease
        is asked for at a time per tenant, and every request that finds none waits for it and then spends from it:
        each asking for its own would charge the tenant a lease apiece (50 requests at once, 50 leases of 50: its
        whole burst of 2,000, and 429s for a tenant far below its rate). The ask is a task of its own, so a request
        that goes away meanwhile does not lose the lease it was asking for."""
        while True:
            now = self.clock()
            lease = self._leases.get(tenant)
            if lease is not None and lease.live(now):
                lease.left -= 1
                if lease.left <= lease.refill and tenant not in self._asking:  # the next, while this one lasts
                    self._ask_lease(tenant, self._sizes.get(tenant, 1))
                return self._from(lease, now)
            asking = self._asking.get(tenant)
            if asking is None:
                want = self._sizes.get(tenant, 1)
                if want <= 1:  # a tenant asked about per request: its requests ask side by side, as without leases
                    return await self._ask(tenant, 1)
                asking = self._ask_lease(tenant, want)
            try:
                grant = await asyncio.shield(asking)
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if asking.cancelled() and not (me is not None and me.cancelling()):
                    self._asked(tenant, asking)
                    continue  # the ask was cancelled (the process is stopping), not this request
                raise
            # An ask done in this turn of the event loop is still registered until its callback runs; awaiting it
            # again answers at once, without yielding. A request that finds its lease spent by one that ran first in
            # the same turn (a lease of one, a tenant at its limit) would spin on it for ever: it asks anew instead.
            self._asked(tenant, asking)
            if not grant.admitted:
                return grant  # refused: so is every request that waited for it

    def _ask_lease(self, tenant: str, want: int) -> asyncio.Future[Admission]:
        asking = self._asking[tenant] = asyncio.ensure_future(self._lease(tenant, want))
        asking.add_done_callback(functools.partial(self._asked, tenant))
        return asking

    def _asked(self, tenant: str, asking: asyncio.Future[Admission]) -> None:
        if self._asking.get(tenant) is asking:
            del self._asking[tenant]
        if not asking.cancelled():
            asking.exception()  # retrieved: every request that waited for it may have gone

    async def _lease(self, tenant: str, want: int) -> Admission:
        """Ask for `want` requests and keep what is granted as the tenant's lease, for the requests to spend."""
        grant = await self._ask(tenant, want)
        if grant.admitted:
            now = self.clock()
            lease = _Lease(grant, grant.granted, now, now + self.ttl_s)
            current = self._leases.get(tenant)
            if current is not None and current.live(now):  # asked for before it ran out: what it has left
                if current.grant.day == grant.day:  # was charged already, and stays spendable in the new one
                    lease.left += current.left
                else:  # counted on another day: given back to that day's counter by `settle`
                    self._retired.append((tenant, current))
            self._leases[tenant] = lease
        return grant

    async def _ask(self, tenant: str, want: int) -> Admission:
        """`Limits.admit` for `want` requests, giving back what a spent or expired lease did not spend (a live
        one stays: requests spend it while the next is asked for)."""
        unused, unused_day = 0, ""
        lease = self._leases.get(tenant)
        if lease is not None and not lease.live(self.clock()):
            del self._leases[tenant]
            unused, unused_day = lease.left, lease.grant.day
        grant = await self.limits.admit(tenant, want, unused, unused_day)
        if len(self._sizes) >= TENANTS_REMEMBERED:
            self._sizes.clear()
        self._sizes[tenant] = self.lease_size(grant)
        return grant

    @staticmethod
    def _from(lease: _Lease, now: float) -> Admission:
        """The admission of one request of a lease: what is left counts this lease's unspent requests too, and is
        less than the burst, this request being one of it (a lease asked for early carries the last one's over
        while the tenant's bucket refills: the sum alone counted up to 204 of 200)."""
        g = lease.grant
        wait_ms = max(0, g.wait_ms - math.floor((now - lease.taken) * 1000)) if g.burst else 0
        left = min(g.burst - 1, g.remaining + lease.left) if g.burst else 0
        return Admission(True, g.burst, left, wait_ms, g.rps, 1, g.day)

    async def settle(self, everything: bool = False) -> None:
        """Give back what the leases past their time (or all of them: shutting down, once the asks in flight
        have landed) did not spend."""
        if everything:
            await asyncio.gather(*self._asking.values(), return_exceptions=True)
        now = self.clock()
        done = [(t, lease) for t, lease in self._leases.items() if everything or now >= lease.until]
        for tenant, _ in done:
            del self._leases[tenant]
        done += self._retired
        self._retired = []
        returns = [self.limits.admit(t, 0, lease.left, lease.grant.day) for t, lease in done if lease.left > 0]
        # A return that fails leaves those requests counted as made: the cost of a lost lease, documented above.
        await asyncio.gather(*returns, return_exceptions=True)

    async def run(self) -> None:
        """A part of the API process: settles the leases that ran out, every `ttl_s`."""
        while True:
            await asyncio.sleep(self.ttl_s)
            await self.settle()
