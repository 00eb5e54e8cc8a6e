"""The supervised warm-up of an RL run's initial policy (`data init-state --warmup-steps`), for real."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from intellect.node.cli.main import cli
from intellect.node.engine.initstate import load_init_state
from intellect.node.engine.model import CONFIGS, Llama
from intellect.node.engine.outer import OuterOptimizer
from intellect.node.engine.rlenv import ReverseEnv
from intellect.node.engine.rlwarmup import WarmupConfig, warmup
from intellect.node.engine.tokenizer import ByteTokenizer

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny-run.toml"
RL_TABLE = """
[rl]
env = "reverse"
prompts_per_step = 8
samples_per_prompt = 4
max_new_tokens = 8
temperature = 1.0
"""


def rl_manifest(tmp_path: Path) -> Path:
    path = tmp_path / "rl.toml"
    # `kind` is a top-level key: it must come before the first table.
    path.write_text('kind = "rl"\n' + TINY.read_text() + RL_TABLE)
    return path


@pytest.mark.timeout(900)
def test_warmup_makes_a_policy_that_sometimes_succeeds(tmp_path: Path) -> None:
    # One thread: on a shared 2-core machine, two spinning torch threads slow each other down.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _warmup_cli(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _warmup_cli(tmp_path: Path) -> None:
    out = tmp_path / "init.safetensors"
    args = ["data", "init-state", str(rl_manifest(tmp_path)), "--out", str(out)]
    result = CliRunner().invoke(cli, [*args, "--warmup-steps", "100", "--eval-prompts", "100"])
    assert result.exit_code == 0, result.output
    acc = {
        name: (float(s) / 100, float(g) / 100)
        for name, s, g in re.findall(
            r"#\s+(before|after)\s*:\s*([\d.]+)% sampled.*?([\d.]+)% greedy", result.output
        )
    }
    assert acc["before"] == (0.0, 0.0)  # a random byte model never answers exactly
    sampled, greedy = acc["after"]
    assert sampled < 1.0 and 0.05 < greedy < 1.0, result.output  # sometimes, not always: GRPO has signal
    sha = re.search(r'sha256 = "([0-9a-f]{64})"', result.output)
    assert sha is not None
    # The file is a valid round-0 state of this run's model, and not the seeded init.
    outer = OuterOptimizer.from_model(Llama(CONFIGS["tiny"], seed=0))
    seeded = {k: v.clone() for k, v in outer.global_params.items()}
    load_init_state(out, sha.group(1), outer)
    assert any(not torch.equal(seeded[k], v) for k, v in outer.global_params.items())


def test_warmup_needs_an_rl_manifest(tmp_path: Path) -> None:
    args = ["data", "init-state", str(TINY), "--out", str(tmp_path / "x"), "--warmup-steps", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0 and "RL manifest" in result.output
    combo = ["data", "init-state", str(rl_manifest(tmp_path)), "--out", str(tmp_path / "y")]
    weights = tmp_path / "w.pt"
    torch.save(Llama(CONFIGS["tiny"]).state_dict(), weights)
    result = CliRunner().invoke(cli, [*combo, "--warmup-steps", "1", "--weights", str(weights)])
    assert result.exit_code != 0 and "--weights" in result.output


def test_warmup_is_deterministic() -> None:
    cfg = WarmupConfig(steps=4, batch_size=8, eval_prompts=4)
    models = [Llama(CONFIGS["tiny"], seed=0) for _ in range(2)]
    for m in models:
        warmup(m, ReverseEnv(), ByteTokenizer(), cfg, 8, 1.0)
    a, b = (m.state_dict() for m in models)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], Llama(CONFIGS["tiny"], seed=0).state_dict()["lm_head.weight"])
