"""Volunteer limits that pause and resume a running node: a weekly schedule, "only when idle", battery,
and the daily transfer cap. `LimitsService` samples the machine every few seconds and sets one reason per
source on the node's pause gate; the decisions themselves are pure functions of injected readings.

Idle means: no user input for N minutes (where logind can tell: `loginctl`'s IdleHint and IdleSinceHint of
the sessions on a seat; elsewhere the status says it cannot be read and only CPU load counts) and other
processes' CPU load under a threshold at every sample of the last N minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from intellect.node.app.config import NodeConfig
from intellect.node.app.schedule import Schedule, parse_schedule
from intellect.node.run.pause import PauseGate

logger = logging.getLogger(__name__)

#: Seconds between two evaluations of the limits.
INTERVAL_S = 5.0
SOURCES = ("schedule", "idle", "battery", "transfer")


@dataclass(frozen=True)
class Sample:
    """One reading of the machine."""

    #: When (monotonic seconds).
    at: float
    #: CPU load of every process but this node's, in percent of all cores; None: not measured yet.
    others_cpu: float | None = None
    #: Seconds since the last user input; None where it cannot be read.
    user_idle_s: float | None = None
    on_battery: bool = False


class IdleTracker:
    """Whether the machine has been idle for `minutes`: no sample in that window was busy."""

    def __init__(self, minutes: int, cpu_percent: float) -> None:
        self.window_s = minutes * 60.0
        self.cpu_percent = cpu_percent
        #: The last moment the machine was busy (the first sample counts as busy: idleness must be seen).
        self.busy_at: float | None = None

    def reason(self, s: Sample) -> str | None:
        if self.busy_at is None or (s.others_cpu is not None and s.others_cpu >= self.cpu_percent):
            self.busy_at = s.at
        minutes = self.window_s / 60
        if s.user_idle_s is not None and s.user_idle_s < self.window_s:
            return f"user active in the last {minutes:g} min"
        if s.at - self.busy_at < self.window_s:
            return f"other programs' CPU load above {self.cpu_percent:g}% in the last {minutes:g} min"
        return None


def decide(
    config: NodeConfig,
    schedule: Schedule | None,
    idle: IdleTracker | None,
    now: datetime,
    sample: Sample,
    moved_today: int,
) -> dict[str, str | None]:
    """The pause reason of each source (None: that source lets the node train)."""
    out: dict[str, str | None] = dict.fromkeys(SOURCES)
    if schedule is not None and not schedule.allows(now):
        out["schedule"] = f"outside the schedule ({schedule.text})"
    if idle is not None:
        out["idle"] = idle.reason(sample)
    if config.pause_on_battery and sample.on_battery:
        out["battery"] = "on battery"
    cap = config.daily_transfer_gb * 1e9
    if cap and moved_today >= cap:
        out["transfer"] = f"daily transfer cap of {config.daily_transfer_gb:g} GB reached (until 00:00 UTC)"
    return out


def parse_idle(show_session: str, now_us: int) -> float | None:
    """Seconds idle from `loginctl show-session -p IdleHint -p IdleSinceHint` output; None if not told."""
    props = dict(line.partition("=")[::2] for line in show_session.splitlines())
    if props.get("IdleHint") == "no":
        return 0.0
    since = props.get("IdleSinceHint", "")
    if props.get("IdleHint") == "yes" and since.isdigit() and int(since) > 0:
        return max(0.0, (now_us - int(since)) / 1e6)
    return None


def _loginctl(*args: str) -> str:
    return subprocess.run(["loginctl", *args], capture_output=True, text=True, timeout=3, check=True).stdout


def read_user_idle() -> tuple[float | None, str]:
    """Seconds since the last input on any seat session, and how that was read (or why it cannot be)."""
    if shutil.which("loginctl") is None:
        return None, "cannot be read: no loginctl (logind) here; only CPU load counts"
    try:
        sessions = [ln.split() for ln in _loginctl("list-sessions", "--no-legend").splitlines()]
        seated = [p[0] for p in sessions if len(p) >= 4 and p[3].startswith("seat")]
        if not seated:
            return None, "cannot be read: no session on a seat (no local user); only CPU load counts"
        now_us = time.time_ns() // 1000
        idles = [parse_idle(_loginctl("show-session", s, "-p", "IdleHint", "-p", "IdleSinceHint"), now_us)
                 for s in seated]  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"cannot be read: loginctl failed ({e}); only CPU load counts"
    known = [i for i in idles if i is not None]
    if not known:
        return None, "cannot be read: logind reports no idle hint; only CPU load counts"
    return min(known), "logind idle hint"


class CpuReader:
    """Other processes' CPU load: the machine's, less this process's and its children's."""

    def __init__(self) -> None:
        self._me = psutil.Process()
        self._procs: dict[int, psutil.Process] = {}
        psutil.cpu_percent(None)

    def others(self) -> float:
        total = psutil.cpu_percent(None)
        mine = 0.0
        live: dict[int, psutil.Process] = {}
        for p in [self._me, *self._me.children(recursive=True)]:
            proc = self._procs.get(p.pid, p)
            try:
                mine += proc.cpu_percent(None)
                live[p.pid] = proc
            except psutil.Error:
                continue
        self._procs = live
        return max(0.0, total - mine / (psutil.cpu_count() or 1))


def on_battery() -> bool:
    battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
    return battery is not None and not battery.power_plugged


class DailyTransfer:
    """Bytes moved on this UTC day through the shaped streams, kept in `<data dir>/transfer.json` so that a
    restart does not reset the day's count."""

    def __init__(self, path: Path, moved: Callable[[], int], today: Callable[[], str] | None = None) -> None:
        self.path, self._moved = path, moved
        self._today = today or (lambda: datetime.now(UTC).date().isoformat())
        self.day, self.base = self._today(), 0
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            saved = json.loads(path.read_text())
            if saved.get("day") == self.day:
                self.base = int(saved["bytes"])
        self._mark = moved()

    def __call__(self) -> int:
        """Bytes moved today (a new UTC day starts from 0)."""
        day, moved = self._today(), self._moved()
        if day != self.day:
            self.day, self.base, self._mark = day, 0, moved
        total = self.base + moved - self._mark
        with contextlib.suppress(OSError):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps({"day": self.day, "bytes": total}))
            tmp.replace(self.path)
        return total


class LimitsService:
    """Evaluates the limits every INTERVAL_S and sets their reasons on `gate`; `notes` go to the status."""

    def __init__(
        self,
        config: NodeConfig,
        gate: PauseGate,
        notes: dict[str, Any],
        moved_today: Callable[[], int] = lambda: 0,
    ) -> None:
        self.config, self.gate, self.notes = config, gate, notes
        self.schedule = parse_schedule(config.schedule) if config.schedule else None
        minutes = config.only_when_idle_minutes
        self.idle = IdleTracker(minutes, config.idle_cpu_percent) if minutes else None
        self.moved_today = moved_today
        self._cpu: CpuReader | None = None

    def needed(self) -> bool:
        c = self.config
        return bool(self.schedule or self.idle or c.pause_on_battery or c.daily_transfer_gb)

    def sample(self) -> Sample:
        """Read the machine (blocking: run it in a thread)."""
        others = user_idle = None
        if self.idle is not None:
            if self._cpu is None:
                self._cpu = CpuReader()
            others = self._cpu.others()
            user_idle, how = read_user_idle()
            self.notes["user_input"] = how
        battery = on_battery() if self.config.pause_on_battery else False
        return Sample(time.monotonic(), others, user_idle, battery)

    def evaluate(self, sample: Sample, now: datetime | None = None) -> None:
        now = now or datetime.now()
        moved = self.moved_today()
        if self.config.daily_transfer_gb:
            self.notes["transferred_today_gb"] = round(moved / 1e9, 3)
        reasons = decide(self.config, self.schedule, self.idle, now, sample, moved)
        for source, reason in reasons.items():
            if self.gate.set(source, reason):
                logger.info("%s: %s", source, reason or "no longer pausing the node")

    async def run(self) -> None:
        while True:
            self.evaluate(await asyncio.to_thread(self.sample))
            await asyncio.sleep(INTERVAL_S)
