"""The RL demo swarm (`intellect-node swarm --rl`): trainers and rollout workers as real daemons on loopback.

In order:

1. **Warm start.** The built-in RL run (`node/runs/tiny-rl.toml`: the tiny model reversing short words)
   gets a supervised warm-up on the environment's demonstrations in this process
   (`engine.rlwarmup`, what `intellect-node data init-state --warmup-steps` does); its round-0 state is
   written to `<workdir>/init/` and pinned in the manifest's `[init]` before the run is seeded.
2. **The run.** `trainers` daemons with the default role (each given the initial state file, as a
   researcher gives it to volunteers) and `workers` daemons with `--role rollout`, every one a separate
   `intellect-node start` process in its own session. Workers follow the committed policy by state sync
   and stream signed batches to the trainers; trainers check them, take GRPO steps and average every
   `inner_steps`; a committed round is a policy version.
3. **The result.** When every trainer has reached `rounds`, the workers are stopped. The summary has the
   swarm's usual per-round hashes (every trainer must hold the same state each round), plus the RL part:
   mean reward per policy version (from the trainers' `rl.jsonl`), what each worker's batches became
   (`rollouts.jsonl`), and the held-out task accuracy of the warm start and of the final state (one
   sample per prompt at the run's temperature, and greedy, on prompts of a seed no worker is assigned).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from intellect.node.cli.swarm import Swarm, finish

logger = logging.getLogger("intellect.node.cli.rlswarm")

#: The built-in RL run.
RL_MANIFEST = Path(__file__).resolve().parent.parent / "runs" / "tiny-rl.toml"


def warm_start(
    workdir: Path, steps: int, eval_prompts: int, manifest_path: Path | None = None
) -> tuple[Any, Path, dict[str, Any]]:
    """(the manifest pinning the warmed-up initial state, the state file, the warm-up's report)."""
    import torch
    from intellect.node.engine.initstate import write_init_state
    from intellect.node.engine.model import Llama, ModelConfig
    from intellect.node.engine.outer import OuterOptimizer
    from intellect.node.engine.rlenv import load_environment
    from intellect.node.engine.rlwarmup import WarmupConfig, warmup
    from intellect.node.engine.tokenizer import load_tokenizer
    from intellect.protocol.manifest import InitSpec, load_manifest_toml

    m = load_manifest_toml(manifest_path or RL_MANIFEST)
    if m.rl is None:
        raise ValueError(f'{manifest_path} is not an RL run (kind = "rl")')
    env = load_environment(m.rl.env)
    tok = load_tokenizer(
        "byte" if m.tokenizer.kind == "byte" else m.tokenizer.uri, m.tokenizer.sha256 or None
    )
    model = Llama(ModelConfig.from_dict(m.model.to_dict()), seed=m.init.seed)
    torch.manual_seed(m.init.seed)
    cfg = WarmupConfig(steps=steps, batch_size=64, lr=2e-3, eval_prompts=eval_prompts)
    report = warmup(model, env, tok, cfg, m.rl.max_new_tokens, m.rl.temperature)
    tmp = workdir / "init" / "warm.safetensors"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    sha = write_init_state(OuterOptimizer.from_model(model), tmp)
    path = tmp.with_name(f"{sha}.safetensors")
    tmp.replace(path)
    info = {
        "steps": steps,
        "seconds": round(report.seconds, 1),
        "accuracy_sampled": report.after.sampled,
        "accuracy_greedy": report.after.greedy,
        "eval_prompts": report.after.prompts,
    }
    return replace(m, init=InitSpec(seed=m.init.seed, sha256=sha)), path, info


def final_accuracy(data_dir: Path, run_id: str, manifest: Any, eval_prompts: int) -> dict[str, Any]:
    """Held-out accuracy of the newest checkpoint in `data_dir` (the warm-up's prompts and sampling seed)."""
    from intellect.node.app.export import latest_checkpoint, state_model
    from intellect.node.engine.rlenv import load_environment
    from intellect.node.engine.rlwarmup import HELDOUT_SEED
    from intellect.node.engine.rollout import evaluate
    from intellect.node.engine.tokenizer import load_tokenizer

    source = latest_checkpoint(data_dir, run_id)
    model = state_model(source, manifest).eval()
    env = load_environment(manifest.rl.env)
    tok = load_tokenizer("byte", manifest.tokenizer.sha256 or None)
    prompts = env.prompts(HELDOUT_SEED, eval_prompts)
    acc = evaluate(model, env, tok, prompts, manifest.rl.max_new_tokens, manifest.rl.temperature)
    return {"round": source.round, "accuracy_sampled": acc.sampled, "accuracy_greedy": acc.greedy}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of a per-step or per-batch log (a line cut by a kill is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return out


def rl_summary(swarm: Swarm) -> dict[str, Any]:
    """Reward per policy version (trainers' steps), and each worker's batches by outcome."""
    rewards: dict[int, list[float]] = defaultdict(list)
    trainers: dict[str, Any] = {}
    workers: dict[str, Any] = {}
    for p in swarm.peers:
        if p.role == "trainer":
            steps = read_jsonl(p.data_dir / "rl.jsonl")
            for s in steps:
                for v in set(s["batch_versions"]):
                    rewards[v].append(s["mean_reward"])
            last = steps[-1] if steps else {}
            trainers[p.name] = {
                "steps": len(steps),
                "check_cpu_s": last.get("check_cpu_s", 0.0),
                "idle_fraction": last.get("idle_fraction"),
                "verifier": last.get("verifier", {}),
                "excluded": last.get("excluded", []),
            }
        else:
            batches = read_jsonl(p.data_dir / "rollouts.jsonl")
            gen = sum(b["generation_cpu_s"] for b in batches)
            workers[p.name] = {
                "peer_id": p.peer_id,
                "batches": len(batches),
                "completions": sum(b["completions"] for b in batches),
                "outcomes": dict(Counter(b["outcome"] for b in batches)),
                "generation_cpu_s": gen,
                "completions_per_cpu_s": sum(b["completions"] for b in batches) / gen if gen > 0 else 0.0,
            }
    curve = [
        {"version": v, "mean_reward": sum(r) / len(r), "steps": len(r)} for v, r in sorted(rewards.items())
    ]
    return {"reward_curve": curve, "trainers": trainers, "workers": workers}


async def run_rl_swarm(
    trainers: int,
    workers: int,
    rounds: int,
    summary_json: Path | None = None,
    workdir: Path | None = None,
    warmup_steps: int = 150,
    eval_prompts: int = 200,
    timeout_s: float = 900.0,
    minutes: float | None = None,
) -> tuple[int, dict[str, Any]]:
    """Run the RL demo to `rounds` policy versions, or (`minutes`) for that long whatever the rounds;
    (exit code, summary). Exit 0 only if every trainer reached every round with identical hashes."""
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="intellect-rl-swarm-")
        workdir = Path(tmp.name)
    t0 = time.monotonic()
    try:
        logger.info("warm start: %d supervised steps on the environment's demonstrations", warmup_steps)
        manifest, init_file, warm = await asyncio.to_thread(warm_start, workdir, warmup_steps, eval_prompts)
        acc = (100 * warm["accuracy_sampled"], 100 * warm["accuracy_greedy"], warm["eval_prompts"])
        logger.info("warm start: %.1f%% sampled, %.1f%% greedy on %d held-out prompts", *acc)
        async with Swarm(workdir) as swarm:
            await swarm.seed(manifest)
            until = None if minutes is not None else rounds
            for i in range(trainers):
                init_dir = workdir / f"trainer{i}" / "init"
                init_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(init_file, init_dir / init_file.name)
                swarm.launch(f"trainer{i}", until_round=until, min_peers=trainers)
            t_rl = time.monotonic()
            for k in range(workers):
                swarm.launch(f"rollout{k}", role="rollout")
            ours = [p for p in swarm.peers if p.role == "trainer"]
            deadline = time.monotonic() + (timeout_s if minutes is None else minutes * 60)
            last_line = ""
            while time.monotonic() < deadline and any(p.proc.poll() is None for p in ours):
                await asyncio.sleep(1.0)
                line = " | ".join(f"{p.name}: round {p.last_round()}/{rounds}" for p in ours)
                if line != last_line:
                    logger.info("%s", line)
                    last_line = line
            if minutes is None and any(p.proc.poll() is None for p in ours):
                logger.error("the RL swarm did not finish within %.0f s; stopping it", timeout_s)
            await swarm.stop_all()
            rl_seconds = time.monotonic() - t_rl
            if minutes is not None:  # every round that every trainer finished must agree
                rounds = min(p.last_round() for p in ours)
            summary = swarm.summary(rounds)
            summary["rl"] = rl_summary(swarm)
            summary["rl"]["warm_start"] = warm
            summary["rl"]["rl_seconds"] = round(rl_seconds, 1)
            summary["rl"]["versions"] = rounds
            try:
                summary["rl"]["final"] = await asyncio.to_thread(
                    final_accuracy, ours[0].data_dir, swarm.run_id, manifest, eval_prompts
                )
            except Exception as e:  # no checkpoint (the run failed early): reported, not raised
                summary["rl"]["final"] = {"error": str(e)}
            for name, w in summary["rl"]["workers"].items():
                if w["outcomes"].get("accepted", 0) == 0:
                    summary["problems"].append(f"{name}: no batch of it was accepted")
            summary["ok"] = not summary["problems"]
            summary["seconds"] = round(time.monotonic() - t0, 1)
            summary["workdir"] = str(workdir)
    finally:
        if tmp is not None and summary_json is None:
            tmp.cleanup()
    return finish(summary, summary_json)
