"""Volunteer limits (#16, finding 2): config keys and flags with one-line errors, the weekly schedule, the
decisions that pause a node (idle, battery, schedule, transfer cap) on injected readings, the CPU limits
as applied, and a started node that stays paused outside its schedule."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from intellect.node.app.conditions import (
    DailyTransfer,
    IdleTracker,
    LimitsService,
    Sample,
    decide,
    parse_idle,
)
from intellect.node.app.config import ConfigError, NodeConfig, load_config
from intellect.node.app.schedule import DAYS, ScheduleError, parse_schedule
from intellect.node.app.status import fetch_status
from intellect.node.app.volunteer import apply_cpu, own_cgroup, set_cpu_weight
from intellect.node.cli.main import cli
from intellect.node.net.shaping import Shaper, TokenBucket, mbps
from intellect.node.net.transport import StreamConn
from intellect.node.run.pause import PauseGate
from nodeproc import kill_session, seeded_bootstrap, start_node, wait_for, wait_joining

REPO = Path(__file__).resolve().parent.parent
TINY_RUN = REPO / "node" / "runs" / "tiny-run.toml"
MON = datetime(2026, 11, 30)  # a Monday


# ---- the schedule ---------------------------------------------------------------------------------------


def test_schedule_windows_by_day_and_past_midnight() -> None:
    s = parse_schedule("mon-fri 19:00-07:00, sat-sun 00:00-24:00")
    assert s.allows(MON + timedelta(hours=19)) and s.allows(MON + timedelta(hours=23, minutes=59))
    assert not s.allows(MON + timedelta(hours=18, minutes=59)) and not s.allows(MON + timedelta(hours=12))
    assert s.allows(MON + timedelta(days=1, hours=6, minutes=59))  # Tuesday early: Monday's night
    assert not s.allows(MON + timedelta(days=1, hours=7))
    assert s.allows(MON + timedelta(days=5, hours=12)) and s.allows(MON + timedelta(days=6, hours=23))
    assert not s.allows(MON + timedelta(hours=6))  # Monday early: Sunday's window ended at 24:00
    night = parse_schedule("sun 22:00-02:00")  # Sunday night runs into Monday: across the week's end
    assert night.allows(MON + timedelta(hours=1)) and not night.allows(MON + timedelta(hours=2))
    assert parse_schedule("daily 09:00-10:00").allows(MON + timedelta(days=3, hours=9, minutes=30))
    assert parse_schedule("fri-mon 00:00-24:00").allows(MON)  # a range that wraps the week


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("mon-fri", "expected DAYS HH:MM-HH:MM"),
        ("monday 19:00-07:00", "unknown day 'monday'"),
        ("mon 25:00-26:00", "no time of day"),
        ("mon 7-9", "is no time; write HH:MM"),
        ("mon 10:00-10:00", "the window is empty"),
        ("mon 10:00-11:00,", "empty entry"),
    ],
)
def test_schedule_errors_name_the_entry(text: str, error: str) -> None:
    with pytest.raises(ScheduleError, match=error):
        parse_schedule(text)


def test_limits_are_config_keys_and_flags_with_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('cpu_threads = 2\nschedule = "sat-sun 00:00-24:00"\n')
    c = load_config(tmp_path, flags={"max_upload_mbps": "12.5"}, environ={"INTELLECT_NODE_NICE": "5"})
    assert (c.cpu_threads, c.nice, c.max_upload_mbps, c.schedule) == (2, 5, 12.5, "sat-sun 00:00-24:00")
    for bad, msg in [
        ({"nice": -1}, "nice: must be 0 to 19"),
        ({"gpu_memory_fraction": 1.5}, "gpu_memory_fraction"),
        ({"daily_transfer_gb": -1.0}, "daily_transfer_gb: must be 0"),
        ({"schedule": "someday 1-2"}, "schedule: 'someday 1-2'"),
    ]:
        with pytest.raises(ConfigError, match=msg) as e:
            NodeConfig(data_dir=tmp_path, **bad)  # type: ignore[arg-type]
        assert "\n" not in str(e.value)
    result = CliRunner().invoke(cli, ["start", "--data-dir", str(tmp_path), "--schedule", "mon 9-5"])
    assert result.exit_code == 2 and "schedule: 'mon 9-5': '9' is no time" in result.output


# ---- decisions on injected readings --------------------------------------------------------------------


def test_idle_needs_n_quiet_minutes_of_other_programs_and_of_the_user() -> None:
    idle = IdleTracker(minutes=10, cpu_percent=25)
    assert idle.reason(Sample(0, others_cpu=5)) is not None  # idleness must be seen first
    assert idle.reason(Sample(599, others_cpu=5)) is not None
    assert idle.reason(Sample(600, others_cpu=5)) is None
    assert "CPU load above 25%" in (idle.reason(Sample(601, others_cpu=80)) or "")
    assert idle.reason(Sample(1100, others_cpu=5)) is not None and idle.reason(Sample(1201, 5)) is None
    assert "user active" in (idle.reason(Sample(1300, 5, user_idle_s=30)) or "")
    assert idle.reason(Sample(1300, 5, user_idle_s=3600)) is None


def test_decide_names_each_source() -> None:
    config = NodeConfig(pause_on_battery=True, daily_transfer_gb=1.0)
    weekend = parse_schedule("sat-sun 00:00-24:00")
    got = decide(config, weekend, None, MON, Sample(0, on_battery=True), moved_today=2 * 10**9)
    assert got["schedule"] == "outside the schedule (sat-sun 00:00-24:00)"
    assert got["battery"] == "on battery" and "daily transfer cap of 1 GB" in (got["transfer"] or "")
    assert got["idle"] is None
    saturday = MON + timedelta(days=5)
    assert set(decide(config, weekend, None, saturday, Sample(0), 10).values()) == {None}


def test_the_service_sets_and_lifts_reasons_on_the_gate() -> None:
    gate = PauseGate()
    service = LimitsService(NodeConfig(schedule="sat-sun 00:00-24:00"), gate, {})
    assert service.needed()
    service.evaluate(Sample(0), now=MON)
    assert gate.reasons == {"schedule": "outside the schedule (sat-sun 00:00-24:00)"}
    service.evaluate(Sample(5), now=MON + timedelta(days=5))
    assert not gate.paused


def test_user_idle_from_logind_properties() -> None:
    now_us = 1_000_000_000_000
    assert parse_idle("IdleHint=no\nIdleSinceHint=0\n", now_us) == 0.0
    assert parse_idle(f"IdleHint=yes\nIdleSinceHint={now_us - 90_000_000}\n", now_us) == 90.0
    assert parse_idle("IdleHint=yes\nIdleSinceHint=0\n", now_us) is None


# ---- CPU ------------------------------------------------------------------------------------------------


def test_cpu_threads_reach_the_workers_and_the_cgroup_weight_is_never_faked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    got = apply_cpu(NodeConfig(data_dir=tmp_path, cpu_threads=3))
    assert got == {"cpu_threads": 3} and os.environ["OMP_NUM_THREADS"] == "3"
    proc = tmp_path / "cgroup"
    proc.write_text("0::/user.slice/node.scope\n")
    group = own_cgroup(proc, tmp_path / "fs")
    assert group == tmp_path / "fs" / "user.slice" / "node.scope"
    assert set_cpu_weight(20, group).startswith("unavailable: ")  # no cpu controller there
    group.mkdir(parents=True)
    (group / "cpu.weight").write_text("100\n")
    assert set_cpu_weight(20, group) == "20" and (group / "cpu.weight").read_text() == "20\n"
    assert set_cpu_weight(20, None) == "unavailable: no cgroup v2 hierarchy"


# ---- a started node outside its schedule ----------------------------------------------------------------


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with seeded_bootstrap(
        tmp_path_factory.mktemp("boot"), tmp_path_factory.mktemp("researcher"), TINY_RUN
    ) as boot:
        yield boot


def test_a_node_outside_its_schedule_stays_paused(tmp_path: Path, seeded: str) -> None:
    other_day = DAYS[(datetime.now().weekday() + 3) % 7]  # neither today nor tomorrow morning
    schedule = f"{other_day} 00:00-24:00"
    data = tmp_path / "node"
    proc = start_node(data, seeded, "--device", "cpu", "--schedule", schedule, log=tmp_path / "node")
    try:
        wait_joining(data, proc, 90)
        wait_for(lambda: fetch_status(data)["phase"] == "paused", 120, "the node did not pause")
        for _ in range(3):
            s = fetch_status(data)
            assert s["phase"] == "paused" and s["pause_reasons"] == {
                "schedule": f"outside the schedule ({schedule})"
            }
            assert s["tokens_per_s"] == 0 and s["rounds_ok"] == s["rounds_failed"] == 0
            assert s["limits"]["schedule"] == schedule
            assert proc.poll() is None
            time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert proc.returncode == 0
    finally:
        kill_session(proc)


# ---- transfer limits ------------------------------------------------------------------------------------


async def test_a_token_bucket_waits_off_its_debt_on_an_injected_clock() -> None:
    now, slept = [0.0], []

    async def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    bucket = TokenBucket(1000.0, burst=100.0, clock=lambda: now[0], sleep=sleep)
    await bucket.take(100)  # the burst: no wait
    await bucket.take(500)  # 500 bytes of debt at 1000 B/s
    await bucket.take(1000)
    assert slept == [0.5, 1.0] and now[0] == 1.5
    assert mbps(0) is None and mbps(8).rate == 1e6  # type: ignore[union-attr]


async def test_a_shaped_stream_pair_moves_n_bytes_no_faster_than_the_limit(tmp_path: Path) -> None:
    """A real asyncio stream pair (what the p2p daemon hands the data plane) through `StreamConn`s with a
    200 kB/s upload limit on one side and a 200 kB/s download limit on the other: 600 kB take at least
    (600 kB - burst) / rate. A correctness property of the limiter, not a speed benchmark."""
    rate, n = 200_000.0, 600_000
    up, down = TokenBucket(rate, burst=50_000.0), TokenBucket(rate, burst=50_000.0)
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = StreamConn(reader, writer, "sender", Shaper(down=down))
        buf = bytearray(n)
        view = memoryview(buf)
        for i in range(0, n, 60_000):
            await conn.recv_into(view[i : i + 60_000])
        got.set_result(bytes(buf))
        conn.close()

    path = str(tmp_path / "s")
    server = await asyncio.start_unix_server(serve, path)
    async with server:
        reader, writer = await asyncio.open_unix_connection(path)
        shaper = Shaper(up=up)
        conn = StreamConn(reader, writer, "receiver", shaper)
        payload = os.urandom(n)
        t0 = time.monotonic()
        for i in range(0, n, 100_000):
            await conn.send(payload[i : i + 50_000], payload[i + 50_000 : i + 100_000])
        assert await asyncio.wait_for(got, 30) == payload
        elapsed = time.monotonic() - t0
        conn.close()
    assert elapsed >= (n - 50_000) / rate * 0.98, elapsed
    assert shaper.sent == n and shaper.moved == n


def test_the_daily_transfer_count_survives_a_restart_and_starts_again_each_utc_day(tmp_path: Path) -> None:
    moved, day = [0], ["2026-12-02"]
    path = tmp_path / "transfer.json"
    count = DailyTransfer(path, lambda: moved[0], lambda: day[0])
    moved[0] = 700
    assert count() == 700
    again = DailyTransfer(path, lambda: 5, lambda: day[0])  # a restart: a new shaper counts from 5
    assert again() == 700
    day[0] = "2026-12-03"
    assert count() == 0
    moved[0] = 900
    assert count() == 200
