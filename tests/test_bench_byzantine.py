"""bench/byzantine.py at its smallest setting: real averagers on loopback, one sign flipper and one biased
owner among four peers; the JSON is whole, nothing crashed, and the biased owner is caught."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "byzantine.py"
KEYS = {
    "peers": int,
    "attackers": int,
    "loss_ratio_to_clean": float,
    "rounds_lost": int,
    "detection_rate": float,
    "honest_excluded": int,
    "crashes": int,
}


@pytest.mark.timeout(150)
def test_quick_byzantine_bench_prints_the_schema_and_catches_the_biased_owner() -> None:
    args = ["--quick", "--json", "--attacks", "sign_flip,biased_owner"]
    proc = subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=140, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert isinstance(out["clean_loss"], float) and 0 < out["clean_loss"] < 6
    clean = out["clean"]["4p"]
    assert clean["crashes"] == 0 and clean["honest_excluded"] == 0 and clean["forks"] == 0
    assert set(out["attacks"]) == {"sign_flip/4p1a", "biased_owner/4p1a"}
    for name, entry in out["attacks"].items():
        for key, kind in KEYS.items():
            assert isinstance(entry[key], kind), (name, key, entry[key])
        assert entry["peers"] == 4 and entry["attackers"] == 1
        assert entry["crashes"] == 0, entry["crash_details"]
        assert entry["honest_excluded"] == 0 and entry["forks"] == 0
        assert not math.isnan(entry["loss_ratio_to_clean"])
        # The baseline of the honest peers alone (the attacker's slot empty) is run and compared with.
        assert entry["honest_alone_loss"] == out["honest_alone"]["4p1a"]["loss"]
        assert math.isfinite(entry["loss_ratio_to_honest_alone"])
    biased = out["attacks"]["biased_owner/4p1a"]
    # Caught by the agreement phase in the first round it owns a partition, and never committed with.
    assert biased["attacked_rounds"] >= 1 and biased["detection_rate"] == 1.0
    assert biased["first_caught_round"] == 1
    assert "biased-result" in biased["failures"]
