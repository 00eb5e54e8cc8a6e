"""Robust aggregation of one partition's contributions (pure, no I/O): centered clipping.

The butterfly gives each member one partition of the flat vector to reduce, with every member's
contribution to it. `mean` is the weighted average. `centered_clip` (Karimireddy, He & Jaggi 2021, as used
per partition by BTARD's ButterflyClip) starts from the medoid of the contributions and moves towards each
contribution by at most `tau` in L2 norm per iteration, until it reaches the fixed point:

    v <- v + sum_i w_i * (x_i - v) * min(1, tau / ||x_i - v||) / sum_i w_i

so a minority of contributions, however large, moves the result by a bounded amount, while contributions
within `tau` of the centre average exactly as the mean does. The clip redescends: a contribution beyond
`verify.REJECT` x tau pulls less the farther it is, and one beyond twice that not at all. `tau` is the
median distance of the contributions from the current centre (a scale estimate a minority cannot
inflate), times `tau_scale`, recomputed every iteration, so that the result is the fixed point of one
equation every member can check (`intellect.node.engine.verify`).
Deterministic: the same inputs in the same order give bit-identical output on every machine, which the
all-gather relies on (only the partition's owner computes it, and everyone receives its bytes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from intellect.node.engine.verify import CONVERGED, REJECT, clip_tau, distance

REDUCERS = ("mean", "centered_clip")


def weighted_mean(values: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = float(sum(weights))
    out = torch.zeros_like(values[0], dtype=torch.float32)
    for x, w in zip(values, weights, strict=True):
        out.add_(x, alpha=w / total)
    return out


def medoid(stacked: torch.Tensor) -> torch.Tensor:
    """The row with the least sum of distances to the others (the first on a tie): where centered clipping
    starts. Unlike the coordinate-wise median it is one of the contributions, and with half of them
    outliers that disagree with one another (each attacker flipping or scaling its own pseudo-gradient)
    it is an honest one; the coordinate-wise median of two honest and two huge rows is half-way to the
    huge ones, and clipping then settles there (the Byzantine benchmark's 4 peers, 2 attackers)."""
    n = stacked.shape[0]
    sums = [0.0] * n
    for i in range(n):
        for j in range(i + 1, n):
            d = distance(stacked[i], stacked[j])
            sums[i] += d
            sums[j] += d
    best = min(range(n), key=lambda i: (sums[i], i))
    return stacked[best].clone()


def centered_clip(
    values: Sequence[torch.Tensor], weights: Sequence[float], iters: int = 100, tau_scale: float = 1.0
) -> torch.Tensor:
    """Centered clipping of `values` (same shape, fp32) with non-negative `weights` (positive total),
    iterated to its fixed point: stops when the clipped residual is at most `CONVERGED` x tau, which is
    what `intellect.node.engine.verify` lets every member check from a few numbers per contribution."""
    if not values:
        raise ValueError("no contributions")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must have a positive total")
    if len(values) == 1:
        return values[0].to(torch.float32).clone()
    stacked = torch.stack([v.to(torch.float32) for v in values])
    centre = medoid(stacked) if len(values) > 2 else weighted_mean(values, weights)
    w = torch.tensor([float(x) / total for x in weights], dtype=torch.float32)
    for _ in range(iters):
        diff = stacked - centre
        # Float64 norms: verifiers recompute these distances in float64 from the decoded values.
        norms = torch.linalg.vector_norm(diff.to(torch.float64), dim=1)
        tau = clip_tau(norms.tolist()) * tau_scale
        if tau <= 0.0:
            break
        # verify.clip_factor, vectorised: min(1, τ/d), redescending to 0 between REJECT·τ and 2·REJECT·τ.
        scale = torch.clamp(tau / torch.clamp(norms, min=1e-300), max=1.0)
        scale = (scale * torch.clamp(2.0 - norms / (REJECT * tau), min=0.0, max=1.0)).to(torch.float32)
        step = (diff * (w * scale).unsqueeze(1)).sum(dim=0)
        if float(torch.linalg.vector_norm(step.to(torch.float64))) <= CONVERGED * tau:
            break
        centre = centre + step
    return centre


def reduce_partition(
    reducer: str, values: Sequence[torch.Tensor], weights: Sequence[float], out: torch.Tensor
) -> torch.Tensor:
    """Reduce into `out` with the named reducer; returns `out`."""
    if reducer == "mean":
        total = float(sum(weights))
        torch.mul(values[0], weights[0] / total, out=out)
        for x, w in zip(values[1:], weights[1:], strict=True):
            out.add_(x, alpha=w / total)
        return out
    if reducer == "centered_clip":
        return out.copy_(centered_clip(values, weights))
    raise ValueError(f"unknown reducer {reducer!r}; expected one of {REDUCERS}")
