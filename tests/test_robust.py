"""Centered clipping per partition: bounded influence of a minority, determinism, and the real butterfly."""

from __future__ import annotations

import asyncio

import pytest
import torch
from intellect.node.engine.robust import centered_clip, reduce_partition, weighted_mean
from intellect.node.net.allreduce import butterfly_allreduce, get_payload_codec
from test_allreduce import _Planes, _spec


def _honest(n: int, d: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centre = torch.randn(d, generator=gen)
    return [centre + 0.1 * torch.randn(d, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("attack", [1e6, -1e3, float("3e30")])
def test_a_minority_moves_the_result_a_bounded_amount(attack: float) -> None:
    honest = _honest(5, 4096, 1)
    target = weighted_mean(honest, [1.0] * 5)
    evil = [torch.full((4096,), attack), torch.full((4096,), -attack)]
    values, weights = honest + evil, [1.0] * 7
    cc = centered_clip(values, weights)
    spread = max(float(torch.linalg.vector_norm(h - target)) for h in honest)
    assert float(torch.linalg.vector_norm(cc - target)) < 0.5 * spread
    plain = weighted_mean(values[:6], weights[:6])  # one attacker alone already ruins the mean
    assert float(torch.linalg.vector_norm(plain - target)) > 100 * spread


def test_a_far_outlier_is_cut_out_and_the_result_still_passes_the_owner_check() -> None:
    from intellect.node.engine.verify import Contribution, Projector, check_partition, distance

    honest = _honest(3, 4096, 3)
    flipped = -1000.0 * honest[0]  # the sign flip ×1000 of the Byzantine benchmark
    alone = centered_clip(honest, [1.0] * 3)
    cc = centered_clip([*honest, flipped], [1.0] * 4)
    spread = max(distance(h, alone) for h in honest)
    # Plain clipping let it pull by τ/4 every round; now it pulls nothing: what is left is the change of
    # τ (a median over four distances rather than three).
    assert distance(cc, alone) < 0.05 * spread
    proj = Projector(b"seed", 0, 4096)
    reports = [Contribution(1.0, proj(x), distance(x, cc)) for x in (*honest, flipped)]
    ok, worst, tol = check_partition("centered_clip", reports, cc, proj, 0.0)
    assert ok, (worst, tol)
    # An owner that kept the outlier at full clip (the old rule) fails the check under the new one.
    old = cc + (flipped - cc) * (0.25 * spread / distance(flipped, cc))
    bad = [Contribution(1.0, proj(x), distance(x, old)) for x in (*honest, flipped)]
    assert not check_partition("centered_clip", bad, old, proj, 0.0)[0]


def test_identical_contributions_of_half_the_group_are_checked_without_dividing_by_zero() -> None:
    from intellect.node.engine.verify import Contribution, Projector, check_partition, distance

    honest = _honest(2, 512, 4)
    zeros = [torch.zeros(512), torch.zeros(512)]  # two free riders at full weight: τ is 0 at their point
    cc = centered_clip([*honest, *zeros], [1.0] * 4)
    proj = Projector(b"seed", 1, 512)
    reports = [Contribution(1.0, proj(x), distance(x, cc)) for x in (*honest, *zeros)]
    ok, _worst, _tol = check_partition("centered_clip", reports, cc, proj, 0.0)
    assert ok and torch.isfinite(cc).all()


def test_half_the_group_flipping_its_own_pseudo_gradients_does_not_steer_the_result() -> None:
    from intellect.node.engine.verify import distance

    values = _honest(4, 4096, 5)
    honest = centered_clip(values[:2], [1.0] * 2)
    attacked = [*values[:2], -1000.0 * values[2], -1000.0 * values[3]]  # as the benchmark's two attackers
    cc = centered_clip(attacked, [1.0] * 4)
    spread = distance(values[0], values[1])
    # It starts from an honest contribution (the medoid), where the coordinate-wise median would sit
    # half-way to the flipped ones, and the flipped ones, far beyond 8τ, pull nothing.
    assert distance(cc, honest) <= spread


def test_agreeing_contributions_and_determinism() -> None:
    same = [torch.linspace(-1, 1, 1000)] * 4
    assert torch.equal(centered_clip(same, [1.0, 2.0, 3.0, 4.0]), same[0])
    honest = _honest(4, 1000, 2)
    a = centered_clip(honest, [1.0, 2.0, 3.0, 4.0])
    b = centered_clip([h.clone() for h in honest], [1.0, 2.0, 3.0, 4.0])
    assert torch.equal(a, b)
    # Honest contributions only: close to the mean (robustness costs a little accuracy, not much).
    mean = weighted_mean(honest, [1.0, 2.0, 3.0, 4.0])
    assert float(torch.linalg.vector_norm(a - mean)) < 0.1 * float(torch.linalg.vector_norm(honest[0] - mean))
    out = torch.empty(1000)
    assert torch.equal(reduce_partition("mean", honest, [1.0, 2.0, 3.0, 4.0], out), out)
    assert torch.allclose(out, mean, atol=1e-6)
    with pytest.raises(ValueError, match="reducer"):
        reduce_partition("median", honest, [1.0] * 4, out)


async def test_butterfly_with_centered_clip_resists_a_huge_member() -> None:
    """Four members, one of them sends a huge (finite) pseudo-gradient: with centered clipping every
    member gets the same result, close to the honest mean; with the mean it would be dominated."""
    honest = _honest(3, 6000, 3)
    xs = [*honest, torch.full((6000,), 1e4)]
    async with _Planes(4) as planes:
        spec = _spec(planes)
        codec = get_payload_codec("none")
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    butterfly_allreduce(p, spec, x, 1.0, codec, stall_timeout=10, reducer="centered_clip")
                    for p, x in zip(planes, xs, strict=True)
                )
            ),
            30,
        )
    first = results[0].flat
    assert all(torch.equal(r.flat, first) for r in results)
    target = weighted_mean(honest, [1.0] * 3)
    spread = max(float(torch.linalg.vector_norm(h - target)) for h in honest)
    assert float(torch.linalg.vector_norm(first - target)) < spread
