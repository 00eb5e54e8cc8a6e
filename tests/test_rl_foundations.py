"""RL foundations (issue 18): the `kind = "rl"` manifest, environments, and the GRPO math."""

from __future__ import annotations

import copy
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
from intellect.node.engine.grpo import (
    completion_logprobs,
    group_advantages,
    grpo_loss,
    pack,
)
from intellect.node.engine.model import Llama, ModelConfig
from intellect.node.engine.rlenv import (
    END,
    AddEnv,
    Environment,
    EnvironmentNotFound,
    ReverseEnv,
    environment_names,
    load_environment,
)
from intellect.node.engine.tokenizer import ByteTokenizer
from intellect.protocol.manifest import Manifest, ManifestError, RlSpec, load_manifest_toml, parse_manifest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-run.toml"
#: The example's run_id before RL existed: adding `kind` and `[rl]` must not change it.
EXAMPLE_RUN_ID = "6b35ac06c92c55fb467406c9e30446b2ac5b3f3d2949368674439bbc3ff59edb"
RL_TABLE = {
    "env": "reverse",
    "prompts_per_step": 8,
    "samples_per_prompt": 4,
    "max_new_tokens": 16,
    "temperature": 1.0,
}


def rl_raw(**changes: Any) -> dict[str, Any]:
    raw = tomllib.loads(EXAMPLE.read_text())
    raw["kind"] = "rl"
    raw["rl"] = {**copy.deepcopy(RL_TABLE), **changes}
    return raw


# ---- manifest --------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_rl_manifest_parses_with_defaults() -> None:
    m = parse_manifest(rl_raw())
    assert m.kind == "rl"
    assert m.rl == RlSpec(
        env="reverse", prompts_per_step=8, samples_per_prompt=4, max_new_tokens=16, temperature=1.0
    )
    assert m.rl.max_async_level == 2
    plain = m.to_plain()
    assert plain["kind"] == "rl" and plain["rl"]["max_async_level"] == 2


@pytest.mark.timeout(30)
def test_pretrain_run_ids_unchanged() -> None:
    m = load_manifest_toml(EXAMPLE)
    assert m.kind == "pretrain" and m.rl is None
    assert m.run_id == EXAMPLE_RUN_ID
    raw = tomllib.loads(EXAMPLE.read_text())
    raw["kind"] = "pretrain"  # the default, spelled out: same manifest, same run_id
    assert parse_manifest(raw).run_id == EXAMPLE_RUN_ID
    assert "kind" not in m.to_plain() and "rl" not in m.to_plain()


@pytest.mark.timeout(30)
def test_rl_fields_are_in_the_run_id_and_round_trip() -> None:
    base = parse_manifest(rl_raw())
    assert base.run_id != EXAMPLE_RUN_ID
    ids = {base.run_id}
    for key, value in [
        ("env", "add"),
        ("prompts_per_step", 9),
        ("samples_per_prompt", 5),
        ("max_new_tokens", 17),
        ("temperature", 0.7),
        ("max_async_level", 1),
        ("verify_rate", 0.5),
        ("clip_eps", 0.3),
        ("kl_coef", 0.01),
    ]:
        ids.add(parse_manifest(rl_raw(**{key: value})).run_id)
    assert len(ids) == 10
    again = Manifest.from_canonical_bytes(base.canonical_bytes())
    assert again == base and again.run_id == base.run_id


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("key", "value", "field", "reason"),
    [
        ("samples_per_prompt", 1, "rl.samples_per_prompt", "must be in [2,"),
        ("prompts_per_step", 0, "rl.prompts_per_step", "must be in"),
        ("temperature", 0.0, "rl.temperature", "finite number in (0.0"),
        ("temperature", float("inf"), "rl.temperature", "finite"),
        ("verify_rate", 1.5, "rl.verify_rate", "[0.0, 1.0]"),
        ("verify_rate", -0.1, "rl.verify_rate", "[0.0, 1.0]"),
        ("clip_eps", 0.0, "rl.clip_eps", "(0.0, 1.0]"),
        ("kl_coef", -1.0, "rl.kl_coef", "[0.0"),
        ("max_async_level", -1, "rl.max_async_level", "must be in [0,"),
        ("max_async_level", 1.5, "rl.max_async_level", "must be an integer"),
        ("max_new_tokens", 512, "rl.max_new_tokens", "less than model.max_seq_len"),
        ("env", "Bad Name!", "rl.env", "entry-point name"),
        ("env", 3, "rl.env", "must be a string"),
        ("extra", 1, "rl.extra", "unknown key"),
    ],
)
def test_rl_fields_are_bounds_checked(key: str, value: Any, field: str, reason: str) -> None:
    with pytest.raises(ManifestError) as e:
        parse_manifest(rl_raw(**{key: value}))
    assert e.value.field == field and reason in e.value.reason, str(e.value)


@pytest.mark.timeout(30)
def test_rl_table_required_for_rl_and_refused_otherwise() -> None:
    raw = rl_raw()
    del raw["rl"]
    with pytest.raises(ManifestError, match=r'^rl: missing \(required when kind = "rl"\)'):
        parse_manifest(raw)
    raw = rl_raw()
    del raw["rl"]["env"]
    with pytest.raises(ManifestError, match=r"^rl.env: missing"):
        parse_manifest(raw)
    raw = rl_raw()
    del raw["kind"]
    with pytest.raises(ManifestError, match=r'^rl: only allowed with kind = "rl"'):
        parse_manifest(raw)
    with pytest.raises(ManifestError, match=r"^kind: must be one of pretrain, rl"):
        parse_manifest(rl_raw() | {"kind": "ppo"})


@pytest.mark.timeout(30)
def test_an_rl_run_refuses_the_overlapped_outer_update() -> None:
    raw = rl_raw()
    raw["diloco"]["outer_update"] = "overlapped"
    with pytest.raises(ManifestError, match=r'^diloco.outer_update: an RL run needs "sequential"'):
        parse_manifest(raw)


@pytest.mark.timeout(30)
def test_non_canonical_kind_is_refused_on_the_wire() -> None:
    from intellect.protocol.codec import packb_canonical

    plain = load_manifest_toml(EXAMPLE).to_plain()
    plain["kind"] = "pretrain"  # valid, but the canonical form omits the default
    with pytest.raises(ManifestError, match="canonical"):
        Manifest.from_canonical_bytes(packb_canonical(plain))


# ---- environments ----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_entry_points_find_both_builtins() -> None:
    names = environment_names()
    assert {"reverse", "add"} <= set(names)
    assert isinstance(load_environment("reverse"), ReverseEnv)
    assert isinstance(load_environment("add"), AddEnv)
    with pytest.raises(EnvironmentNotFound, match=r"no RL environment named 'nope'.*registered: .*add"):
        load_environment("nope")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("env", [ReverseEnv(), AddEnv()], ids=["reverse", "add"])
def test_prompts_deterministic_from_seed(env: Environment) -> None:
    a, b = env.prompts(7, 50), env.prompts(7, 50)
    assert a == b
    assert env.prompts(7, 10) == a[:10]  # prompt i depends only on (seed, i)
    assert env.prompts(8, 50) != a
    assert len({p.text for p in a}) > 25  # varied
    demos = env.demonstrations(7, 5)
    assert [p for p, _ in demos] == a[:5]
    assert all(c == p.answer + END and env.reward(p, c) == 1.0 for p, c in demos)


@pytest.mark.timeout(30)
def test_builtin_prompts_have_the_documented_shape() -> None:
    for p in ReverseEnv(min_len=2, max_len=4).prompts(0, 100):
        word = p.text.removeprefix("reverse: ").removesuffix("=")
        assert p.text == f"reverse: {word}=" and 2 <= len(word) <= 4 and word.isalpha() and word.islower()
        assert p.answer == word[::-1]
    for p in AddEnv(max_value=20).prompts(0, 100):
        a, b = p.text.removeprefix("add: ").removesuffix("=").split("+")
        assert 0 <= int(a) <= 20 and 0 <= int(b) <= 20 and p.answer == str(int(a) + int(b))


@pytest.mark.timeout(30)
def test_rewards_right_wrong_garbled() -> None:
    rev, add = ReverseEnv(), AddEnv()
    p = rev.prompts(3, 1)[0]
    assert rev.reward(p, p.answer) == 1.0
    assert rev.reward(p, p.answer + "\nanything after the end marker") == 1.0
    assert rev.reward(p, p.answer[::-1] + "x") == 0.0
    assert rev.reward(p, p.answer + "x\n") == 0.0
    assert rev.reward(p, " " + p.answer) == 0.0
    assert rev.reward(p, "") == 0.0
    assert rev.reward(p, "\ufffd\x00\x7f") == 0.0
    q = add.prompts(3, 1)[0]
    assert add.reward(q, q.answer + "\n") == 1.0
    assert add.reward(q, str(int(q.answer) + 1)) == 0.0
    assert add.reward(q, "0" + q.answer) == 0.0  # exact text, not the number
    # Decoded model output: bytes that are not UTF-8 become replacement characters and earn nothing.
    garbled = ByteTokenizer().decode([0xFF, 0xFE, *q.answer.encode()])
    assert add.reward(q, garbled) == 0.0


# ---- GRPO ------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_group_advantages_hand_computed() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    adv = group_advantages(rewards)
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.equal(adv[1], torch.zeros(4))  # zero variance: exactly zero
    std = math.sqrt((3 * 0.75**2 + 2.25**2) / 4)
    want = torch.tensor([-0.75, -0.75, -0.75, 2.25]) / std
    assert torch.allclose(adv[2], want, atol=1e-5)
    assert torch.equal(group_advantages(torch.full((2, 3), 0.1)), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="samples >= 2"):
        group_advantages(torch.zeros(3, 1))


@pytest.mark.timeout(30)
def test_grpo_loss_clips_both_sides() -> None:
    # One token per completion. eps = 0.2, ratios e^{±0.5} ≈ 1.6487 / 0.6065.
    old = torch.zeros(4, 1)
    new = torch.tensor([[0.5], [-0.5], [0.5], [-0.5]], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    out = grpo_loss(new, old, adv, torch.ones(4, 1), clip_eps=0.2)
    up, down = math.exp(0.5), math.exp(-0.5)
    # A>0 & ratio high: clipped to 1.2. A>0 & ratio low: unclipped. A<0 & high: unclipped. A<0 & low: 0.8.
    objectives = [1.2, down, -up, -0.8]
    assert out.loss.item() == pytest.approx(-sum(objectives) / 4, abs=1e-6)
    assert out.clip_fraction.item() == pytest.approx(0.5)
    assert out.kl.item() == 0.0
    out.loss.backward()
    assert new.grad is not None
    # d/dlogp of −ratio·A/4 where unclipped, zero where the clip is active.
    want = torch.tensor([[0.0], [-down / 4], [up / 4], [0.0]])
    assert torch.allclose(new.grad, want, atol=1e-6)


@pytest.mark.timeout(30)
def test_grpo_loss_masks_tokens() -> None:
    old = torch.tensor([[0.0, 0.0, 5.0], [0.0, 9.0, 9.0]])
    new = torch.tensor([[0.1, -0.1, -7.0], [0.05, -3.0, 2.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    out = grpo_loss(new, old, adv, mask, clip_eps=0.2)
    kept = [2 * math.exp(0.1), 2 * math.exp(-0.1), -math.exp(0.05)]  # all within [0.8, 1.2]
    assert out.loss.item() == pytest.approx(-sum(kept) / 3, abs=1e-6)
    out.loss.backward()
    assert new.grad is not None
    assert torch.equal(new.grad * (1 - mask), torch.zeros_like(new.grad))
    assert (new.grad * mask).abs().sum() > 0
    # Padding values never matter.
    other = grpo_loss(new.detach() * mask, old * mask, adv, mask, clip_eps=0.2)
    assert other.loss.item() == pytest.approx(out.loss.item(), abs=1e-6)


@pytest.mark.timeout(30)
def test_grpo_kl_term_k3() -> None:
    new = torch.zeros(1, 2, requires_grad=True)
    ref = torch.tensor([[0.5, -0.3]])
    out = grpo_loss(
        new, new.detach(), torch.zeros(1), torch.ones(1, 2), clip_eps=0.2, kl_coef=0.1, logp_ref=ref
    )
    k3 = [math.exp(d) - d - 1 for d in (0.5, -0.3)]
    assert out.kl.item() == pytest.approx(sum(k3) / 2, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.1 * sum(k3) / 2, abs=1e-6)
    out.loss.backward()
    assert new.grad is not None
    # d/dnew (e^{ref−new} − (ref−new) − 1) = 1 − e^{ref−new}
    want = torch.tensor([[0.1 * (1 - math.exp(0.5)) / 2, 0.1 * (1 - math.exp(-0.3)) / 2]])
    assert torch.allclose(new.grad, want, atol=1e-6)
    with pytest.raises(ValueError, match="logp_ref"):
        grpo_loss(new, new.detach(), torch.zeros(1), torch.ones(1, 2), clip_eps=0.2, kl_coef=0.1)


@pytest.mark.timeout(60)
def test_completion_logprobs_match_direct_logits_and_gradient_flows() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=259, max_seq_len=32)
    model = Llama(cfg, seed=1)
    tok = ByteTokenizer()
    prompts = [tok.encode("reverse: abc="), tok.encode("add: 1+2=")]
    completions = [tok.encode("cba\n"), tok.encode("3\n")]
    batch = pack(prompts, completions, pad_id=258)
    assert batch.mask.sum().item() == 6
    logp = completion_logprobs(model, batch, temperature=0.7)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        seq = torch.tensor([p + c])
        logits = model(seq)[0].float() / 0.7
        direct = torch.log_softmax(logits, dim=-1)
        for j, t in enumerate(c):
            pos = len(p) - 1 + j  # logits at pos predict token pos + 1
            assert logp[i, pos].item() == pytest.approx(direct[pos, t].item(), abs=1e-5)
    assert torch.equal(logp * (1 - batch.mask), torch.zeros_like(logp))
    # The whole pipeline: advantages → loss → gradients reach the model's weights.
    adv = group_advantages(torch.tensor([[1.0, 0.0]])).reshape(-1)
    out = grpo_loss(
        logp, logp.detach(), adv, batch.mask, clip_eps=0.2, kl_coef=0.05, logp_ref=logp.detach() + 0.1
    )
    out.loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
