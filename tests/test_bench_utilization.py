"""bench/utilization.py's reading of the daemons' logs (the swarm itself needs root and network namespaces
and runs as a benchmark, not here): the window aligned on the inner steps' ends."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "utilization.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_utilization", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def _line(ts: float, msg: str, **extra: object) -> str:
    return json.dumps({"ts": ts, "level": "INFO", "logger": "x", "msg": msg, **extra}, separators=(",", ":"))


def _log(path: Path, rounds: int, compute: float, gap: float, tokens: int = 6144, step: float = 0.0) -> None:
    """A daemon log of `rounds` rounds: inner steps of `compute` s (+ `step` s a round), then `gap` s of
    averaging and commit."""
    lines, t = [], 100.0
    for r in range(1, rounds + 1):
        compute += step
        t += compute
        msg = f"inner steps: 48 in {compute:.2f} s, {compute:.2f} s of them computing, 0.00 s between chunks"
        lines.append(_line(t, msg, event="inner_steps", wall_s=compute, compute_s=compute))
        lines.append(
            _line(t + gap - 0.5, f"round {r} averaged with 4 peers (attempt 0) in 3.00s, total weight 1")
        )
        t += gap
        tps = round(tokens / compute)
        lines.append(
            _line(t, f"round {r} done: loss 2.0, {tokens} tokens, {tps} tok/s, group 4", event="round")
        )
    path.write_text("\n".join(lines) + "\n")


def test_the_aligned_window_holds_exactly_the_inner_steps_it_counts(
    bench: ModuleType, tmp_path: Path
) -> None:
    log = tmp_path / "peer.log"
    _log(log, rounds=6, compute=40.0, gap=10.0)
    logged = bench.read_log(log)
    assert [round(c, 2) for _, c in logged.trained] == [40.0] * 6
    out = bench.aligned(logged, [2, 3, 4, 5], tokens=4 * 6144)
    assert out["aligned_wall_s"] == pytest.approx(200.0)  # end of round 1's steps to end of round 5's
    assert out["utilization_aligned"] == pytest.approx(0.8)
    assert out["tokens_per_wall_s_aligned"] == pytest.approx(4 * 6144 / 200.0)


def test_lines_that_do_not_match_the_rounds_give_no_aligned_figure(bench: ModuleType, tmp_path: Path) -> None:
    log = tmp_path / "peer.log"
    _log(log, rounds=6, compute=40.0, gap=10.0, step=2.0)
    logged = bench.read_log(log)
    assert bench.aligned(logged, [2, 3, 4, 5], tokens=1) != {}
    logged.trained.pop(0)  # a round whose line is missing: line k is no longer round k's
    assert bench.aligned(logged, [2, 3, 4, 5], tokens=1) == {}
    assert bench.aligned(logged, [1, 2], tokens=1) == {}  # no round before the first counted one
    assert bench.aligned(bench.read_log(log), [2, 3, 9], tokens=1) == {}  # beyond what the log holds
