"""The Art. 19 deadline: evidence must reach the platform within 3 working days after the step.

"Working day" is the official Chinese one: public holidays are off, the make-up working days
(调休) that the State Council moves onto a Saturday or Sunday are on, and other weekends are
off. The days come from the ``chinesecalendar`` package, which carries each year's State
Council notice; days are judged on the calendar in China Standard Time (``TZ``), whatever the
gateway's own clock zone, because that is where the step happened and where the rule applies.

Counting rule
-------------
"N working days after the step ends" is computed as:

1. The end day is the China-time date of the step's end. It never counts, whether or not
   it is a working day itself: the step may end at 23:59 and that afternoon is not a day.
2. Count the working days strictly after the end day, one by one.
3. The deadline is the end of the N-th of them: 23:59:59.999 China time on that day.
   Evidence received at that millisecond is on time; one millisecond later it is late.

Worked example, National Day and Mid-Autumn 2025 (as the library has them): Oct 1-8 are
holidays (Oct 6 is Mid-Autumn), Sun Sep 28 and Sat Oct 11 are make-up working days.

====================  ========================================  ==============================
step ends (China)     working days counted                      due (China time)
====================  ========================================  ==============================
Fri 2025-09-26 18:00  Sun 09-28 (make-up), Mon 09-29, Tue 09-30  2025-09-30 23:59:59.999
Mon 2025-09-29 23:30  Tue 09-30, Thu 10-09, Fri 10-10            2025-10-10 23:59:59.999
Tue 2025-09-30 23:30  Thu 10-09, Fri 10-10, Sat 10-11 (make-up)  2025-10-11 23:59:59.999
Thu 2025-10-02 10:00  Thu 10-09, Fri 10-10, Sat 10-11 (make-up)  2025-10-11 23:59:59.999
====================  ========================================  ==============================

The China date is what matters: a step ending 2025-09-29 16:30 UTC ended on Sep 30 in China
(00:30), so its deadline is Oct 11, not Oct 10.

Years without data
------------------
The library only knows the years whose notice it carries (``calendar_known``); the notice
for a year is published late in the year before. For any other year this module falls back
to Monday-Friday and marks the deadline ``estimated``, rather than failing: a deadline that
may be a few days off is still worth showing, as long as it says so. The last days of a
known year (Dec 29-31) are also treated as uncertain while the next year is unknown, because
the next year's New Year arrangement has moved them before (in 2006, 2007, 2011 and 2018).

This module is pure: no I/O, and it never reads the clock; the caller passes ``now_ms``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

import chinese_calendar

TZ = ZoneInfo("Asia/Shanghai")

ART19_WORKING_DAYS = 3

Lateness = Literal["on_time", "late", "overdue", "pending"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
_ONE_DAY = timedelta(days=1)
# From this day of December on, the following year's notice may change a day's status.
_NEXT_NOTICE_REACHES = (12, 29)


@dataclass(frozen=True)
class Deadline:
    """When evidence for one step is due, and whether that rests on a known calendar.

    ``estimated`` is true when a day counted towards the deadline was judged by the
    Monday-Friday fallback, so the real legal deadline may differ; show it as such.
    """

    due_ms: int
    due_day: date
    estimated: bool

    def __post_init__(self) -> None:
        # A Deadline built by hand must still mean "the end of due_day in China", or
        # lateness() would classify against a different instant than the one displayed.
        if self.due_ms != end_of_day_ms(self.due_day):
            raise ValueError(
                f"Deadline due_ms={self.due_ms} is not the end of {self.due_day} in China "
                f"time ({end_of_day_ms(self.due_day)}); build it with due_date()"
            )


def calendar_known(year: int) -> bool:
    """Whether the library has the State Council notice for ``year``.

    Asked of the library itself rather than of its data tables, so that a newer release
    that adds years is picked up without a change here.
    """
    try:
        chinese_calendar.is_workday(date(year, 1, 1))
    except NotImplementedError:
        return False
    return True


def is_working_day(d: date) -> bool:
    """Whether ``d`` is an official working day in China (Monday-Friday for unknown years)."""
    if calendar_known(d.year):
        return bool(chinese_calendar.is_workday(d))
    return d.weekday() < 5


def china_day(ms: int) -> date:
    """The China-time calendar date of a Unix-ms instant."""
    # Integer timedelta arithmetic, not fromtimestamp(ms / 1000): a float would round an
    # instant a millisecond before midnight onto the next day.
    return (_EPOCH + ms * _ONE_MS).astimezone(TZ).date()


def end_of_day_ms(d: date) -> int:
    """The last millisecond of ``d`` in China time, as Unix ms."""
    next_midnight = datetime.combine(d + _ONE_DAY, time(0), tzinfo=TZ)
    return (next_midnight - _EPOCH) // _ONE_MS - 1


def due_date(step_end_ms: int, working_days: int = ART19_WORKING_DAYS) -> Deadline:
    """The deadline for evidence of a step that ended at ``step_end_ms`` (Unix ms).

    See the module docstring for the counting rule: the end day never counts; the deadline
    is the end of the ``working_days``-th working day after it, in China time.
    """
    if working_days < 1:
        raise ValueError(
            f"working_days must be at least 1, got {working_days}: the end day itself "
            "never counts, so a deadline needs at least one working day after it"
        )
    day = china_day(step_end_ms)
    counted = 0
    estimated = False
    while counted < working_days:
        day += _ONE_DAY
        estimated = estimated or not _day_known(day)
        if is_working_day(day):
            counted += 1
    return Deadline(due_ms=end_of_day_ms(day), due_day=day, estimated=estimated)


def lateness(received_ms: int | None, due: Deadline, now_ms: int) -> Lateness:
    """Where a step's evidence stands against its deadline.

    ``on_time`` and ``late`` are final (the evidence arrived); ``pending`` becomes
    ``overdue`` once ``now_ms`` passes the deadline with nothing received. The deadline's
    own last millisecond is still on time.
    """
    if received_ms is not None:
        return "on_time" if received_ms <= due.due_ms else "late"
    return "overdue" if now_ms > due.due_ms else "pending"


def working_days_between(a: date, b: date) -> int:
    """The number of working days in ``(a, b]``; negative, ``-(b, a]``, when ``b < a``.

    The same half-open interval as the counting rule, so for any deadline
    ``working_days_between(end_day, due_day) == working_days``, and
    ``working_days_between(due_day, received_day)`` is how many working days late.
    """
    if b < a:
        return -working_days_between(b, a)
    count = 0
    day = a
    while day < b:
        day += _ONE_DAY
        if is_working_day(day):
            count += 1
    return count


def _day_known(d: date) -> bool:
    """Whether ``d``'s working-day status comes from a published notice, not a guess."""
    if not calendar_known(d.year):
        return False
    if (d.month, d.day) >= _NEXT_NOTICE_REACHES:
        return calendar_known(d.year + 1)
    return True
