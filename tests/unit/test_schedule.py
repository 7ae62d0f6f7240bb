"""Time in the site's zone: the nightly schedule and the windows, with explicit instants (no clock is read).

Europe/Paris changes to summer time on 2027-03-28 (02:00 CET → 03:00 CEST: the
hour 02:00-03:00 does not exist) and back on 2026-10-25 (03:00 CEST → 02:00 CET:
the hour 02:00-03:00 happens twice).
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from pipeline.schedule import (
    check_cron,
    instant,
    jitter_offset,
    local_text,
    next_check,
    next_opening,
    next_slot,
    parse_window,
    spans,
    time_left,
    zone,
    zone_name,
)

PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")


def utc(*args: int) -> float:
    return dt.datetime(*args, tzinfo=dt.UTC).timestamp()  # type: ignore[misc]


def paris(*args: int, fold: int = 0) -> float:
    return dt.datetime(*args, tzinfo=PARIS, fold=fold).timestamp()  # type: ignore[misc]


def slots(expression: str, tz: dt.tzinfo, after: float, count: int) -> list[str]:
    found, moment = [], after
    for _ in range(count):
        moment = next_slot(expression, tz, moment)
        found.append(dt.datetime.fromtimestamp(moment, dt.UTC).strftime("%Y-%m-%d %H:%MZ"))
    return found


# -- wall-clock time to instants --------------------------------------------------------------


def test_a_skipped_wall_time_is_the_instant_the_clock_jumps() -> None:
    assert instant(dt.datetime(2027, 3, 28, 2, 30), PARIS) == utc(2027, 3, 28, 1, 0)  # 03:00 CEST
    assert instant(dt.datetime(2027, 3, 28, 2, 0), PARIS) == utc(2027, 3, 28, 1, 0)
    assert instant(dt.datetime(2027, 3, 28, 3, 0), PARIS) == utc(2027, 3, 28, 1, 0)
    assert instant(dt.datetime(2027, 3, 28, 1, 59), PARIS) == utc(2027, 3, 28, 0, 59)


def test_a_repeated_wall_time_is_its_first_occurrence() -> None:
    assert instant(dt.datetime(2026, 10, 25, 2, 30), PARIS) == utc(2026, 10, 25, 0, 30)  # 02:30 CEST
    assert instant(dt.datetime(2026, 10, 25, 3, 0), PARIS) == utc(2026, 10, 25, 2, 0)  # 03:00 CET


# -- the nightly schedule ------------------------------------------------------------------------


def test_midnight_in_paris_follows_the_autumn_change() -> None:
    assert slots("0 0 * * *", PARIS, utc(2026, 10, 23, 12), 3) == [
        "2026-10-23 22:00Z", "2026-10-24 22:00Z", "2026-10-25 23:00Z",  # CEST, CEST, then CET
    ]


def test_midnight_in_paris_follows_the_spring_change() -> None:
    assert slots("0 0 * * *", PARIS, utc(2027, 3, 26, 12), 3) == [
        "2027-03-26 23:00Z", "2027-03-27 23:00Z", "2027-03-28 22:00Z",
    ]


def test_a_check_scheduled_in_the_skipped_hour_runs_when_the_clock_jumps_and_once() -> None:
    # 02:30 does not exist on 2027-03-28: the check runs at 03:00 CEST, then at 02:30 CEST on later days
    assert slots("30 2 * * *", PARIS, utc(2027, 3, 27, 12), 3) == [
        "2027-03-28 01:00Z", "2027-03-29 00:30Z", "2027-03-30 00:30Z",
    ]
    # a schedule every quarter of an hour through the skipped hour runs once, at the jump
    assert slots("*/15 2 * * *", PARIS, utc(2027, 3, 28, 0), 2) == ["2027-03-28 01:00Z", "2027-03-29 00:00Z"]


def test_a_check_scheduled_in_the_repeated_hour_runs_once() -> None:
    # 02:30 happens twice on 2026-10-25: the check runs at the first (CEST), not again an hour later
    assert slots("30 2 * * *", PARIS, utc(2026, 10, 24, 12), 3) == [
        "2026-10-25 00:30Z", "2026-10-26 01:30Z", "2026-10-27 01:30Z",
    ]
    # even when asked from inside the second pass
    assert slots("30 2 * * *", PARIS, utc(2026, 10, 25, 1, 10), 1) == ["2026-10-26 01:30Z"]


def test_the_same_schedule_is_read_in_each_zone() -> None:
    assert next_slot("0 0 * * *", NEW_YORK, utc(2026, 11, 29, 12)) == utc(2026, 11, 30, 5)
    assert next_slot("0 0 * * *", PARIS, utc(2026, 11, 29, 12)) == utc(2026, 11, 29, 23)


def test_a_slot_at_the_very_instant_asked_is_the_next_one() -> None:
    assert next_slot("0 0 * * *", PARIS, paris(2026, 11, 30)) == paris(2026, 12, 1)
    assert next_slot("0 0 * * *", PARIS, paris(2026, 11, 30) - 0.5) == paris(2026, 11, 30)


def test_a_schedule_that_never_fires_is_refused() -> None:
    with pytest.raises(ValueError, match=r"the schedule '0 0 30 2 \*' never names a time"):
        check_cron("0 0 30 2 *")
    with pytest.raises(ValueError, match="names no time after"):
        next_slot("0 0 30 2 *", PARIS, utc(2026, 11, 29))


@pytest.mark.parametrize("expression", ["0 0 * *", "0 0 * * * *", "@daily", "60 0 * * *", "0 0 * * mon-", ""])
def test_only_five_field_cron_schedules_are_accepted(expression: str) -> None:
    with pytest.raises(ValueError, match="is not a cron schedule of five fields"):
        check_cron(expression)


def test_jitter_spreads_sites_and_stays_the_same_for_one_site() -> None:
    slot = paris(2026, 11, 30)
    offsets = {jitter_offset(slot, 1800, f"machine-{n}") for n in range(200)}
    assert all(0 <= offset < 1800 for offset in offsets)
    assert len(offsets) == 200 and max(offsets) - min(offsets) > 1500  # spread over the half hour
    assert jitter_offset(slot, 1800, "machine-1") == jitter_offset(slot, 1800, "machine-1")  # across restarts
    assert jitter_offset(slot, 0, "machine-1") == 0.0
    assert next_check("0 0 * * *", PARIS, slot - 60, jitter=1800, seed="machine-1") == slot + jitter_offset(
        slot, 1800, "machine-1")


def test_the_machine_zone_is_taken_from_tz(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Europe/Paris")
    assert zone_name(zone(None)) == "Europe/Paris"
    assert local_text(utc(2026, 11, 29, 23), zone(None)) == "2026-11-30 00:00:00 CET"


# -- windows -----------------------------------------------------------------------------------------------


def is_open(text: str, moment: float, tz: dt.tzinfo = PARIS) -> bool:
    return time_left([parse_window(text)], tz, moment) is not None


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (paris(2026, 11, 28, 21, 59, 59), False),  # Saturday before
        (paris(2026, 11, 28, 22, 0), True),  # opens
        (paris(2026, 11, 29, 0, 0), True),  # past midnight
        (paris(2026, 11, 29, 3, 59, 59), True),
        (paris(2026, 11, 29, 4, 0), False),  # closes
        (paris(2026, 11, 29, 22, 30), False),  # Sunday evening: not a Saturday
    ],
)
def test_a_window_from_one_day_to_the_next_crosses_midnight(moment: float, expected: bool) -> None:
    assert is_open("Sat 22:00-Sun 04:00", moment) is expected


def test_days_with_an_end_before_the_start_cross_midnight_each_night() -> None:
    weeknights = "Mon-Fri 22:00-04:00"
    assert is_open(weeknights, paris(2026, 11, 24, 2, 0))  # Tuesday 02:00, from Monday's night
    assert is_open(weeknights, paris(2026, 11, 28, 3, 0))  # Saturday 03:00, from Friday's night
    assert not is_open(weeknights, paris(2026, 11, 23, 2, 0))  # Monday 02:00: Sunday had none
    assert not is_open(weeknights, paris(2026, 11, 29, 23, 0))  # Sunday night


def test_a_week_spanning_window_and_day_ranges_that_wrap() -> None:
    assert is_open("Fri 18:00-Mon 06:00", paris(2026, 11, 29, 12))
    assert not is_open("Fri 18:00-Mon 06:00", paris(2026, 11, 30, 6))
    assert is_open("Sat-Mon 01:00-02:00", paris(2026, 11, 30, 1, 30))  # Sat, Sun, Mon
    assert not is_open("Sat-Mon 01:00-02:00", paris(2026, 12, 1, 1, 30))  # Tuesday
    assert is_open("Sun 20:00-24:00", paris(2026, 11, 29, 23, 59))


def test_a_window_in_the_skipped_hour_does_not_open_on_the_spring_forward_night() -> None:
    window = [parse_window("Sun 02:00-03:00")]
    # On 2027-03-28 the clock goes from 01:59:59 to 03:00:00: the window has no length and does not open
    for moment in (utc(2027, 3, 28, 0, 59, 59), utc(2027, 3, 28, 1, 0), utc(2027, 3, 28, 1, 30)):
        assert time_left(window, PARIS, moment) is None
    # so a run waiting on Saturday is told the window of the following Sunday (02:00 CEST)
    assert next_opening(window, PARIS, utc(2027, 3, 27, 12)) == paris(2027, 4, 4, 2, 0)
    # the week before it opened normally (02:00-03:00 CET)
    assert time_left(window, PARIS, paris(2027, 3, 21, 2, 30)) == 1800


def test_a_window_around_the_skipped_hour_is_as_long_as_the_night_really_is() -> None:
    window = [parse_window("Sun 01:00-04:00")]
    start = paris(2027, 3, 28, 1, 0)
    assert time_left(window, PARIS, start) == 2 * 3600  # 01:00 CET to 04:00 CEST: two real hours


def test_a_window_over_the_repeated_hour_stays_open_through_both_passes() -> None:
    window = [parse_window("Sun 02:00-03:00")]
    first_0230, second_0230 = paris(2026, 10, 25, 2, 30, fold=0), paris(2026, 10, 25, 2, 30, fold=1)
    assert second_0230 - first_0230 == 3600
    assert time_left(window, PARIS, paris(2026, 10, 25, 2, 0)) == 2 * 3600  # two real hours
    assert time_left(window, PARIS, first_0230) == 90 * 60
    assert time_left(window, PARIS, second_0230) == 30 * 60
    assert time_left(window, PARIS, paris(2026, 10, 25, 3, 0)) is None


def test_a_window_ending_in_the_repeated_hour_closes_at_its_first_pass() -> None:
    window = [parse_window("Sun 01:00-02:30")]
    assert time_left(window, PARIS, paris(2026, 10, 25, 1, 0)) == 90 * 60
    assert time_left(window, PARIS, paris(2026, 10, 25, 2, 30, fold=1)) is None


def test_windows_that_touch_are_one_window() -> None:
    windows = [parse_window("Mon 22:00-Tue 02:00"), parse_window("Tue 02:00-06:00")]
    assert time_left(windows, PARIS, paris(2026, 11, 23, 23, 0)) == 7 * 3600


def test_the_next_opening_skips_windows_too_short_for_the_expected_downtime() -> None:
    windows = [parse_window("Mon-Fri 12:00-13:00"), parse_window("Sat 22:00-Sun 04:00")]
    monday_noon_30 = paris(2026, 11, 23, 12, 30)
    assert next_opening(windows, PARIS, monday_noon_30) == paris(2026, 11, 24, 12, 0)  # any window
    assert next_opening(windows, PARIS, monday_noon_30, lasting=1200) == monday_noon_30  # 30 min left: fits now
    assert next_opening(windows, PARIS, monday_noon_30, lasting=2 * 3600) == paris(2026, 11, 28, 22, 0)
    assert next_opening(windows, PARIS, monday_noon_30, lasting=7 * 3600) is None


def test_the_same_window_text_opens_at_the_zones_own_local_time() -> None:
    window = [parse_window("Mon 07:00-08:00")]
    assert next_opening(window, NEW_YORK, utc(2026, 11, 22)) == utc(2026, 11, 23, 12)
    assert next_opening(window, PARIS, utc(2026, 11, 22)) == utc(2026, 11, 23, 6)


def test_spans_cover_a_week_either_side() -> None:
    found = spans([parse_window("Wed 10:00-11:00")], PARIS, paris(2026, 11, 25, 12))
    assert len(found) == 3 and all(end - start == 3600 for start, end in found)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("Mon 7", "is not like 'Mon-Tue 07:00-12:00' or 'Sat 22:00-Sun 04:00'"),
        ("mon 07:00-08:00", "is not like"),
        ("Mon 07:00-08:00 Europe/Paris", "is not like"),
        ("Mon 7:00-8:00", "is not like"),
        ("Mon 07:60-08:00", "07:60 is not a time of day"),
        ("Mon 24:00-02:00", "24:00 is not a time of day"),
        ("Mon 09:00-09:00", "opens and closes at the same time"),
        ("Sat 22:00-Sat 21:00", "ends before it opens"),
        ("Sat 22:00-Sat 22:00", "ends before it opens"),
    ],
)
def test_malformed_windows_are_refused_naming_the_problem(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse_window(text)
