"""Robust aggregation of one partition's contributions (pure, no I/O): centered clipping.

The butterfly gives each member one partition of the flat vector to reduce, with every member's
contribution to it. `mean` is the weighted average. `centered_clip` (Karimireddy, He & Jaggi 2021, as used
per partition by BTARD's ButterflyClip) starts from the coordinate-wise median and moves towards each
contribution by at most `tau` in L2 norm per iteration:

    v <- v + sum_i w_i * (x_i - v) * min(1, tau / ||x_i - v||) / sum_i w_i

so a minority of contributions, however large, moves the result by a bounded amount, while contributions
within `tau` of the centre average exactly as the mean does. `tau` defaults to the median distance of the
contributions from the starting point (a scale estimate a minority cannot inflate), times `tau_scale`.
Deterministic: the same inputs in the same order give bit-identical output on every machine, which the
all-gather relies on (only the partition's owner computes it, and everyone receives its bytes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

REDUCERS = ("mean", "centered_clip")


def weighted_mean(values: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = float(sum(weights))
    out = torch.zeros_like(values[0], dtype=torch.float32)
    for x, w in zip(values, weights, strict=True):
        out.add_(x, alpha=w / total)
    return out


def centered_clip(
    values: Sequence[torch.Tensor], weights: Sequence[float], iters: int = 3, tau_scale: float = 1.0
) -> torch.Tensor:
    """Centered clipping of `values` (same shape, fp32) with non-negative `weights` (positive total)."""
    if not values:
        raise ValueError("no contributions")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must have a positive total")
    if len(values) == 1:
        return values[0].to(torch.float32).clone()
    stacked = torch.stack([v.to(torch.float32) for v in values])
    centre = stacked.median(dim=0).values if len(values) > 2 else weighted_mean(values, weights)
    dists = torch.linalg.vector_norm(stacked - centre, dim=1)
    tau = float(dists.median()) * tau_scale
    if tau <= 0.0:
        return centre
    w = torch.tensor([float(x) / total for x in weights], dtype=torch.float32)
    for _ in range(iters):
        diff = stacked - centre
        norms = torch.linalg.vector_norm(diff, dim=1)
        scale = torch.clamp(tau / torch.clamp(norms, min=1e-30), max=1.0)
        centre = centre + (diff * (w * scale).unsqueeze(1)).sum(dim=0)
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
