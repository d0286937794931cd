"""Cron schedules, purely: when a schedule's next tick is, and which tick a scheduler may fire now.

A schedule (`POST /sessions/{id}/schedules`) asks for a chat at every tick of a cron expression in a time zone.
Its state keeps `since`: the last tick it fired (or skipped), else when it was created, changed or resumed. The
next tick is the first one after `since`; ticks are never fired twice because firing one records it in the
session's log (`ScheduleFired`), and a command to fire a tick at or before `since` is refused (`TickTaken`).
A tick found later than the grace (no worker ran) is not fired late: the ticks missed are skipped, recorded in
one `ScheduleFired`, and the schedule goes on from the newest of them.
"""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime, timedelta, tzinfo
from functools import lru_cache
from typing import NamedTuple

from cronsim import CronSim, CronSimError

from shared.domain.errors import Invalid

__all__ = ["Due", "check", "due", "next_tick", "zone"]

_LOOKAHEAD = 64
"""Ticks looked at to find a schedule's shortest interval."""


class Due(NamedTuple):
    """What a scheduler does with a schedule now: fire `tick`, or (`missed_from` set) record the ticks from
    `missed_from` to `tick`, both included, as missed: they are older than the grace."""

    tick: datetime
    missed_from: datetime | None = None


@lru_cache(maxsize=512)
def zone(name: str) -> tzinfo:
    """An IANA time zone (`Invalid` if unknown)."""
    if name == "UTC":
        return UTC
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as e:
        raise _unknown_zone(name) from e


def _unknown_zone(name: str) -> Invalid:
    return Invalid(
        f"unknown time zone {name!r} (an IANA name such as Europe/Paris)",
        {"field": "timezone", "rule": "iana_time_zone", "value": name},
    )


@lru_cache(maxsize=1)
def _iana_names() -> frozenset[str]:
    """The zones a schedule may name: the IANA names this host knows, less `localtime` (the host's own zone, which
    differs between workers) and `Factory` (no zone at all); `posix/…` and `right/…` copies are not among them."""
    return frozenset(zoneinfo.available_timezones() - {"localtime", "Factory"})


def check(cron: str, timezone: str, now: datetime, min_interval_s: float) -> None:
    """`Invalid` unless `cron` is a cron expression (5 fields, or 6 with seconds first) that has ticks, in a known
    time zone, whose ticks are at least `min_interval_s` apart."""
    if timezone != "UTC" and timezone not in _iana_names():
        raise _unknown_zone(timezone)
    tz = zone(timezone)
    try:
        ticks = CronSim(cron, now.astimezone(tz))
        previous = next(ticks)
        shortest = None
        for _ in range(_LOOKAHEAD):
            tick = next(ticks)
            gap = (tick - previous).total_seconds()
            shortest = gap if shortest is None else min(shortest, gap)
            previous = tick
    except (CronSimError, StopIteration, ValueError) as e:
        raise Invalid(
            f"not a cron expression with ticks: {e}", {"field": "cron", "rule": "cron_expression", "value": cron}
        ) from e
    if shortest is not None and shortest < min_interval_s:
        raise Invalid(
            f"its ticks are {shortest:g} s apart; schedules may tick at most every {min_interval_s:g} s",
            {"field": "cron", "rule": "min_interval", "value": cron, "min_interval_s": min_interval_s},
        )


_FOLD_TICKS = 3_600
"""How many ticks of a repeated hour `next_tick` passes over at most: one a second for an hour."""


def next_tick(cron: str, timezone: str, since: datetime) -> datetime | None:
    """The first tick after `since` (UTC), None if there is none.

    In the hour a zone repeats (daylight saving time ends), a time of a fixed hour ticks once, on the hour's first
    pass, as cron does: from a `since` in the second pass CronSim answers that first-pass tick, before `since`, so
    those are passed over (else a schedule set then would show a past tick and never take another)."""
    try:
        ticks = CronSim(cron, since.astimezone(zone(timezone)))
        for _ in range(_FOLD_TICKS + 1):
            tick = next(ticks).astimezone(UTC)
            if tick > since:
                return tick
    except (CronSimError, StopIteration, Invalid):
        return None
    return None


def due(cron: str, timezone: str, since: datetime, now: datetime, grace: timedelta) -> Due | None:
    """What to do at `now` with a schedule last fired (or set) at `since`: None if its next tick is still ahead.
    Ticks are fired one at a time, oldest first, so a scheduler that fell behind within the grace catches up
    every one of them."""
    tick = next_tick(cron, timezone, since)
    if tick is None or tick > now:
        return None
    if tick >= now - grace:
        return Due(tick)
    horizon = (now - grace).astimezone(zone(timezone))  # reversed, CronSim answers ticks before it, never it
    newest_missed = next(CronSim(cron, horizon, reverse=True)).astimezone(UTC)
    return Due(max(newest_missed, tick), missed_from=tick)
