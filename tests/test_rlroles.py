"""The RL roles' glue inside one process: the trainer's inbox and GRPO step behind the round machine's
`RoundTrainer` interface, evidence gossiped from one trainer and re-checked by another, the policy archive,
and how workers spread batches over trainers. The roles as real daemons are in test_rl_swarm.py."""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from intellect.crypto.identity import Identity
from intellect.node.engine.model import Llama
from intellect.node.engine.rollout import Policy, rollout_batch
from intellect.node.run.rltrainer import RL_LOG, ROLLOUT_EVIDENCE, PolicyArchive, RlRoundTrainer
from intellect.node.run.rolloutworker import rank_trainers
from intellect.node.run.training import EngineSettings, RoundPlan, build_engine
from intellect.protocol.codec import encode
from intellect.protocol.gossip_messages import Misbehaviour
from intellect.protocol.manifest import SignedManifest, load_manifest_toml
from intellect.protocol.rollouts import RolloutBatch, RolloutEvidence, encode_batch

RL_RUN = Path(__file__).resolve().parent.parent / "node" / "runs" / "tiny-rl.toml"


class Committed:
    """The committed round a trainer starts from (what `GlobalState` answers)."""

    def __init__(self, round_: int, state_hash: str, params: Mapping[str, torch.Tensor]) -> None:
        self.round, self.state_hash = round_, state_hash
        self.outer = SimpleNamespace(global_params=params)


def trainer(tmp_path: Path, name: str, signed: SignedManifest) -> RlRoundTrainer:
    (tmp_path / name).mkdir()
    engine = build_engine(signed.manifest, EngineSettings(tmp_path / name, device="cpu"))
    assert isinstance(engine.trainer, RlRoundTrainer)
    assert engine.loss_check is None  # an RL policy is not judged by the shards' text loss
    return engine.trainer


def fabricated(batch: RolloutBatch, worker: Identity) -> RolloutBatch:
    rewards = batch.reward_values()
    rewards[rewards.index(0.0)] = 1.0
    return replace(batch, rewards=struct.pack(f"<{len(rewards)}f", *rewards)).signed(worker)


@pytest.mark.timeout(300)
async def test_a_trainer_checks_queues_and_trains_and_its_evidence_convinces_another(tmp_path: Path) -> None:
    torch.manual_seed(0)
    signed = SignedManifest.sign(load_manifest_toml(RL_RUN), Identity.generate())
    a, b = trainer(tmp_path, "a", signed), trainer(tmp_path, "b", signed)
    rl = signed.manifest.rl
    assert rl is not None
    model = a.trainer.model
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = Committed(0, "ab" * 32, params)
    for t in (a, b):
        t.attach(state)
    assert a.archive.versions == [0]
    published: list[Misbehaviour] = []
    a.publish = published.append

    honest_worker, cheat = Identity.generate(), Identity.generate()
    policy = Policy(0, state.state_hash, Llama(model.cfg).eval())
    policy.model.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(1)

    def batch(worker: Identity, seq: int) -> RolloutBatch:
        return rollout_batch(worker, signed.run_id, rl, a.env, a.tokenizer, policy, seq, gen, 0.0)

    # A fabricated reward is refused with evidence, which is gossiped; the worker is excluded.
    good = batch(cheat, 0)
    reply = await a.offer(cheat.peer_id, encode_batch(fabricated(good, cheat)))
    assert (reply.outcome, reply.reason) == ("refused", "fabricated-reward")
    assert cheat.peer_id in a.verifier.excluded
    assert (await a.offer(cheat.peer_id, encode_batch(good))).reason == "excluded"
    assert a.screen(cheat.peer_id) is not None and a.screen(honest_worker.peer_id) is None
    assert (await a.offer(cheat.peer_id, b"\x93garbage")).outcome == "undecodable"
    [msg] = published
    assert (msg.kind, msg.accused) == (ROLLOUT_EVIDENCE, cheat.peer_id)

    # The other trainer believes the evidence only after checking it itself; a framed honest worker is not
    # excluded, and evidence whose message names someone else is dropped.
    framed = RolloutEvidence("fabricated-reward", batch(honest_worker, 7))
    assert not b.on_gossip("liar", Misbehaviour(honest_worker.peer_id, 0, ROLLOUT_EVIDENCE, encode(framed)))
    assert not b.on_gossip("liar", replace(msg, accused=honest_worker.peer_id))
    assert not b.on_gossip("liar", replace(msg, evidence=b"\x00\x01"))
    assert honest_worker.peer_id not in b.verifier.excluded
    assert b.on_gossip("peer-a", msg) and cheat.peer_id in b.verifier.excluded
    assert (await b.offer(cheat.peer_id, encode_batch(batch(cheat, 1)))).reason == "excluded"

    # Honest batches are accepted until the inbox holds two steps' worth; then "full", before any check.
    for seq in range(2):
        reply = await a.offer(honest_worker.peer_id, encode_batch(batch(honest_worker, seq)))
        assert (reply.outcome, reply.version) == ("accepted", 0)
    assert (await a.offer(honest_worker.peer_id, encode_batch(batch(honest_worker, 9)))).outcome == "full"

    # The round machine's view: one inner step is one GRPO step on what the inbox holds, with the node's
    # InnerTrainer's optimizer (so it is checkpointed) and a line in rl.jsonl.
    # (The seeded model never reverses a word, so every GRPO group has equal rewards and the step moves
    # nothing; test_rltrain.py shows steps that learn.)
    await a.begin_round(RoundPlan(1, (), 0))
    stats = await a.steps(1)
    assert stats.steps == 1 and stats.tokens > 0 and a.trainer.step == 1
    assert a.trainer.optimizer.state  # the moments live in the checkpointed optimizer
    [line] = [json.loads(x) for x in (tmp_path / "a" / RL_LOG).read_text().splitlines()]
    assert line["version"] == 0 and line["completions"] == 2 * rl.prompts_per_step * rl.samples_per_prompt
    assert line["excluded"] == [cheat.peer_id]


def test_the_archive_keeps_the_newest_versions_and_finds_them_by_hash() -> None:
    model = torch.nn.Linear(2, 2)
    template = model.weight.detach().clone()
    archive = PolicyArchive(model, keep=3)
    for v in range(5):
        params = {n: torch.full_like(p, float(v)) for n, p in model.named_parameters()}
        archive.add(v, f"{v:064x}", params)
    assert archive.versions == [2, 3, 4]
    found = archive.lookup(4)
    assert found is not None and found[0] == f"{4:064x}"
    assert float(found[1].weight[0, 0]) == 4.0 and not found[1].weight.requires_grad
    assert archive.by_hash(f"{1:064x}") is None and archive.by_hash(f"{3:064x}") is not None
    assert torch.equal(model.weight, template)  # the live model is copied, never written


def test_batches_spread_over_trainers_without_coordination() -> None:
    trainers = ["t-a", "t-b", "t-c"]
    firsts = Counter(rank_trainers("run", 3, "w", seq, trainers)[0] for seq in range(3000))
    assert set(firsts) == set(trainers) and all(800 < n < 1200 for n in firsts.values())
    assert rank_trainers("run", 3, "w", 5, trainers) == rank_trainers(
        "run", 3, "w", 5, list(reversed(trainers))
    )


def test_the_rollout_role_needs_an_rl_run_and_the_role_is_checked(tmp_path: Path) -> None:
    from intellect.node.app.config import ConfigError, NodeConfig
    from intellect.node.run.rolloutworker import RolloutWorker

    pretrain = SignedManifest.sign(load_manifest_toml(RL_RUN.with_name("tiny-run.toml")), Identity.generate())
    with pytest.raises(ValueError, match="is not an RL run"):
        RolloutWorker(Identity.generate(), pretrain, (None, None), tmp_path, lambda e: None)  # type: ignore[arg-type]
    assert NodeConfig(data_dir=tmp_path, role="rollout").role == "rollout"
    with pytest.raises(ConfigError, match="role: must be one of trainer, rollout"):
        NodeConfig(data_dir=tmp_path, role="validator")
