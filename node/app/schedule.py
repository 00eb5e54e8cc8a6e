"""The weekly schedule of a volunteer node: when it may train, in local time.

    "mon-fri 19:00-07:00, sat-sun 00:00-24:00"

Entries are separated by commas; each is a day or a range of days (mon tue wed thu fri sat sun, or
"daily") and a window HH:MM-HH:MM. A window that ends before it starts runs past midnight into the next
day (Friday 19:00-07:00 ends on Saturday at 07:00); 24:00 is the end of the day.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY, _WEEK = 24 * 60, 7 * 24 * 60


class ScheduleError(ValueError):
    """A schedule that does not parse; the message names the entry and what is wrong with it."""


@dataclass(frozen=True)
class Schedule:
    """Windows as (start, end) minutes of the week from Monday 00:00; an end may pass the week's end."""

    windows: tuple[tuple[int, int], ...]
    text: str = ""

    def allows(self, when: datetime) -> bool:
        """Whether the node may train at local time `when`."""
        minute = when.weekday() * _DAY + when.hour * 60 + when.minute
        return any(s <= m < e for s, e in self.windows for m in (minute, minute + _WEEK))


def _days(text: str, entry: str) -> list[int]:
    if text == "daily":
        return list(range(7))
    first, dash, last = text.partition("-")
    for d in (first, last) if dash else (first,):
        if d not in DAYS:
            raise ScheduleError(f"{entry!r}: unknown day {d!r}; days are {', '.join(DAYS)} or daily")
    a = DAYS.index(first)
    b = DAYS.index(last) if dash else a
    return [(a + i) % 7 for i in range((b - a) % 7 + 1)]


def _minute(text: str, entry: str) -> int:
    hh, colon, mm = text.partition(":")
    if not (colon and hh.isdigit() and mm.isdigit() and len(mm) == 2):
        raise ScheduleError(f"{entry!r}: {text!r} is no time; write HH:MM")
    h, m = int(hh), int(mm)
    if h > 24 or m > 59 or (h == 24 and m):
        raise ScheduleError(f"{entry!r}: {text!r} is no time of day (00:00 to 24:00)")
    return h * 60 + m


def parse_schedule(text: str) -> Schedule:
    """The schedule `text` describes, or ScheduleError naming the entry at fault."""
    windows: list[tuple[int, int]] = []
    for raw in text.split(","):
        entry = " ".join(raw.split())
        if not entry:
            raise ScheduleError(f"empty entry in {text!r}; entries look like 'mon-fri 19:00-07:00'")
        parts = entry.lower().split(" ")
        if len(parts) != 2 or parts[1].count("-") != 1:
            raise ScheduleError(f"{entry!r}: expected DAYS HH:MM-HH:MM, e.g. 'mon-fri 19:00-07:00'")
        start_text, end_text = parts[1].split("-")
        start, end = _minute(start_text, entry), _minute(end_text, entry)
        if start == end:
            raise ScheduleError(f"{entry!r}: the window is empty (a whole day is 00:00-24:00)")
        if start == _DAY:
            raise ScheduleError(f"{entry!r}: a window cannot start at 24:00")
        length = end - start if end > start else end + _DAY - start
        for day in _days(parts[0], entry):
            windows.append((day * _DAY + start, day * _DAY + start + length))
    return Schedule(tuple(windows), text)
