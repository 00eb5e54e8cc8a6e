"""Golden and property tests of the DiLoCo outer optimizer (`intellect.node.engine.outer`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from intellect.node.engine.outer import OuterError, OuterOptimizer
from intellect.node.engine.statehash import deserialize_state, serialize_state
from torch import nn

GOLDEN = Path(__file__).parent / "golden" / "outer_nesterov.json"


def _tensors(plain: dict[str, list[float]]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in plain.items()}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)


def test_lr1_no_momentum_equals_plain_average() -> None:
    torch.manual_seed(0)
    theta = {"a": torch.randn(5, 3), "b": torch.randn(7)}
    locals_ = [{k: v + torch.randn_like(v) for k, v in theta.items()} for _ in range(4)]
    opt = OuterOptimizer(theta, lr=1.0, momentum=0.0, nesterov=False)
    deltas = [opt.pseudo_gradient(loc) for loc in locals_]
    avg = {k: torch.stack([d[k] for d in deltas]).mean(0) for k in theta}
    opt.step(avg)
    for k in theta:
        expected = torch.stack([loc[k] for loc in locals_]).mean(0)
        torch.testing.assert_close(opt.global_params[k], expected, rtol=0, atol=1e-6)


def test_nesterov_matches_hand_computed_golden() -> None:
    golden = json.loads(GOLDEN.read_text())
    opt = OuterOptimizer(_tensors(golden["theta0"]), lr=golden["lr"], momentum=golden["momentum"])
    for delta, expected in zip(golden["deltas"], golden["rounds"], strict=True):
        opt.step(_tensors(delta))
        for name, values in expected["theta"].items():
            torch.testing.assert_close(opt.global_params[name], torch.tensor(values), rtol=0, atol=1e-6)
        for name, values in expected["momentum"].items():
            torch.testing.assert_close(opt.momentum_buffers[name], torch.tensor(values), rtol=0, atol=1e-6)
    assert opt.steps == 3


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.9, True), (0.5, False), (0.0, False)])
def test_matches_torch_sgd_bit_for_bit(momentum: float, nesterov: bool) -> None:
    torch.manual_seed(1)
    theta = {"x": torch.randn(64), "y": torch.randn(8, 8)}
    opt = OuterOptimizer(theta, lr=0.7, momentum=momentum, nesterov=nesterov)
    ref = {k: nn.Parameter(v.clone()) for k, v in theta.items()}
    sgd = torch.optim.SGD(list(ref.values()), lr=0.7, momentum=momentum, nesterov=nesterov)
    for _ in range(5):
        delta = {k: torch.randn_like(v) for k, v in theta.items()}
        opt.step(delta)
        for k, p in ref.items():
            p.grad = delta[k].clone()
        sgd.step()
    for k, p in ref.items():
        assert torch.equal(opt.global_params[k], p.detach())


def test_pseudo_gradient_and_copy_to_model() -> None:
    torch.manual_seed(2)
    model = Tiny()
    opt = OuterOptimizer.from_model(model)
    snapshot = {k: v.detach().clone() for k, v in model.named_parameters()}
    inner = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.lin(torch.randn(2, 4)).sum().backward()
    inner.step()
    delta = opt.pseudo_gradient(model)
    for k, p in model.named_parameters():
        torch.testing.assert_close(delta[k], snapshot[k] - p.detach())
    # The global copy is not aliased to the model: training moved the model, not the global weights.
    for k, v in snapshot.items():
        assert torch.equal(opt.global_params[k], v)
    opt.step(delta)
    state_before = {
        id(p): {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
        for p, s in inner.state.items()
    }
    opt.copy_to(model)
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), opt.global_params[k])
    # Inner optimizer state (moments, step) is the trainer's: kept as it was, values and all.
    assert {id(p) for p in inner.state} == set(state_before)
    for p, s in inner.state.items():
        for k, v in state_before[id(p)].items():
            assert torch.equal(s[k], v), k


def test_copy_to_keeps_local_dtype() -> None:
    model = Tiny().to(torch.bfloat16)
    opt = OuterOptimizer.from_model(model)
    assert all(t.dtype == torch.float32 for t in opt.global_params.values())
    opt.copy_to(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_state_dict_round_trip_is_bit_exact_through_safetensors() -> None:
    torch.manual_seed(3)
    theta = {"a": torch.randn(10), "b": torch.randn(3, 3)}
    opt = OuterOptimizer(theta)
    for _ in range(3):
        opt.step({k: torch.randn_like(v) for k, v in theta.items()})
    blob = serialize_state(opt.state_dict())
    other = OuterOptimizer({k: torch.zeros_like(v) for k, v in theta.items()})
    other.load_state_dict(deserialize_state(blob))
    assert serialize_state(other.state_dict()) == blob
    assert list(other.global_params) == list(opt.global_params)
    delta = {k: torch.randn_like(v) for k, v in theta.items()}
    opt.step(delta)
    other.step(delta)
    for k in theta:
        assert torch.equal(opt.global_params[k], other.global_params[k])
        assert torch.equal(opt.momentum_buffers[k], other.momentum_buffers[k])


def test_rejects_bad_inputs_without_changing_state() -> None:
    opt = OuterOptimizer({"a": torch.ones(3), "b": torch.ones(2)})
    before = {k: v.clone() for k, v in opt.global_params.items()}
    with pytest.raises(OuterError, match="NaN"):
        opt.step({"a": torch.zeros(3), "b": torch.tensor([0.0, float("nan")])})
    with pytest.raises(OuterError, match="lacks"):
        opt.step({"a": torch.zeros(3)})
    with pytest.raises(OuterError, match="shape"):
        opt.step({"a": torch.zeros(4), "b": torch.zeros(2)})
    assert all(torch.equal(before[k], opt.global_params[k]) for k in before)
    assert opt.steps == 0 and not opt.momentum_buffers
    with pytest.raises(OuterError):
        opt.load_state_dict({"outer.step": torch.tensor(0), "outer.global.a": torch.ones(3)})


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.9, False), (0.9, True)])
def test_preview_is_the_step_it_would_take_and_changes_nothing(momentum: float, nesterov: bool) -> None:
    g = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(5, 4, generator=g), "b": torch.randn(4, generator=g)}
    a = OuterOptimizer(params, lr=0.7, momentum=momentum, nesterov=nesterov)
    a.step({n: torch.randn(t.shape, generator=g) for n, t in params.items()})  # a momentum buffer to use
    before = {k: v.clone() for k, v in a.state_dict().items()}
    delta = {n: torch.randn(t.shape, generator=g) for n, t in params.items()}
    seen = a.preview(delta)
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())  # nothing moved
    a.step(delta)
    assert all(torch.equal(seen[n], a.global_params[n]) for n in params)  # bit for bit what the step did
    local = {n: torch.zeros_like(t) for n, t in params.items()}
    a.copy_to(local, seen)  # the model starts at the preview (what an overlapped round does)
    assert all(torch.equal(local[n], seen[n]) for n in params)
    with pytest.raises(OuterError):
        a.preview({"w": delta["w"]})
