"""When a schedule ticks next (`shared.domain.schedules.next_tick`): always after the time it is asked from, in the
hour a zone repeats too."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from shared.domain.schedules import next_tick

NY = ZoneInfo("America/New_York")
SECOND_PASS = datetime(2026, 11, 1, 1, 30, fold=1, tzinfo=NY).astimezone(UTC)
"""01:30 EST on the day daylight saving time ends: the second 01:30 of New York's day (06:30 UTC)."""


@pytest.mark.parametrize(
    ("cron", "tick"),
    [
        # 01:45 ticked on the hour's first pass (05:45 UTC, before `since`): the next is tomorrow's, in EST
        ("45 1 * * *", datetime(2026, 11, 2, 6, 45, tzinfo=UTC)),
        ("*/5 * * * *", datetime(2026, 11, 1, 6, 35, tzinfo=UTC)),
        ("* * * * *", datetime(2026, 11, 1, 6, 31, tzinfo=UTC)),
        ("0 3 * * *", datetime(2026, 11, 1, 8, 0, tzinfo=UTC)),
    ],
)
def test_a_tick_asked_for_in_the_repeated_hour_is_after_it(cron: str, tick: datetime) -> None:
    assert next_tick(cron, "America/New_York", SECOND_PASS) == tick


def test_every_tick_is_after_the_time_it_is_asked_from_around_each_zone_change_of_a_year() -> None:
    for name in ("America/New_York", "Europe/Berlin", "Australia/Lord_Howe"):  # Lord Howe shifts by 30 minutes
        zone = ZoneInfo(name)
        days = [datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=d) for d in range(366)]
        changes = [
            d for d in days if d.astimezone(zone).utcoffset() != (d + timedelta(days=1)).astimezone(zone).utcoffset()
        ]
        assert len(changes) == 2, name
        for day in changes:
            since = day - timedelta(hours=12)
            while since < day + timedelta(days=2):
                for cron in ("45 1 * * *", "30 2 * * *", "*/20 * * * *"):
                    tick = next_tick(cron, name, since)
                    assert tick is not None and since < tick <= since + timedelta(days=2), (name, cron, since)
                since += timedelta(minutes=7)
