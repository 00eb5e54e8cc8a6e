"""Checking an owner's reduced partition from a few numbers per contribution (no re-download, no re-run).

In the butterfly all-reduce one member, the partition's *owner*, alone sees every contribution to its
partition and computes their reduction. Nobody else can recompute it without every contribution. What they
can check cheaply is that the result satisfies the equation that defines it:

- `mean`: r = Σ wᵢ pᵢ / W, i.e. the residual Σ wᵢ (pᵢ − r) / W is zero;
- `centered_clip` (as computed by `node.engine.robust.centered_clip`): r is a fixed point of centered
  clipping, Σ wᵢ mᵢ (pᵢ − r) / W ≈ 0 with mᵢ = min(1, τ / ‖pᵢ − r‖) (redescending to 0 beyond
  `REJECT`·τ, `clip_factor`) and τ the median of the distances ‖pᵢ − r‖.

Both are linear in the contributions once the distances are known. So after the all-gather, when every
member holds the same result r̂ and a seed nobody could know before the owners sent it (a hash of every
reduced partition), the owner reports per contribution its hash, its weight, k random projections
tᵢ = s·pᵢ (s a ±1/√n Rademacher vector drawn from the seed) and its distance dᵢ = ‖pᵢ − r̂‖. Every member
then evaluates the residual in projection, Σ wᵢ mᵢ (tᵢ − s·r̂) / W, and each sender also checks the owner's
line about its own contribution against its own computation. An owner that biased its result, scaled it,
or reported inputs other than those it received fails one of the two, with probability near 1 for any
bias well above the tolerance below.

Tolerance: an honest residual is at most `CONVERGED`·τ (the owner iterates to that) plus what the payload
codec's quantisation of r moves it by, at most three times the codec's error bound q on r̂ (once directly,
twice through the clip factors). A fixed vector v projected on a random unit s gives about ‖v‖/√n times a
standard normal, so the bound is `Z` standard deviations of that: Z·(CONVERGED·τ + 3q + f)/√n (Z·(q + f)/√n
for the mean, whose residual is exactly the codec's error), where f bounds the fp32 rounding of the
owner's sums. A bias far below q (a fraction of one quantisation
step per value) is not detectable, and not distinguishable from compression noise either.

Pure tensor code; the wire side is `intellect.node.net.agreement`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

#: Random projections per partition. A bias is missed only if every one lands near its orthogonal
#: complement: with one projection's miss probability p (about 0.5 for a bias 1.5x the tolerance, 0.2 at
#: 4x), eight miss together with probability p^8 (0.004, 3e-6). Measured in docs/decisions.md.
SKETCHES = 8
#: Standard deviations of an honest residual allowed (two-sided false alarm about 2e-9 per projection).
Z = 6.0
#: The owner iterates centered clipping until the residual is at most this fraction of τ.
CONVERGED = 1e-3
#: Centered clipping redescends: a contribution farther than `REJECT`·τ from the centre pulls less the
#: farther it is, and one beyond 2·`REJECT`·τ not at all (its clip factor falls linearly from τ/d to 0).
#: Plain clipping lets every outlier pull by τ, whatever its size: a sign flip ×1000 by one of four members
#: moved the result by a quarter of τ every round (docs/decisions.md). Honest contributions lie within a
#: few τ of the centre (τ is the median distance), so they are never cut; continuous, so the owner's
#: iteration settles as plain clipping does.
REJECT = 4.0
#: Values per chunk when projecting (bounds the temporaries to about 40 MiB).
_CHUNK = 1 << 21


def seed_of(group_id: bytes, part_hashes: Sequence[bytes]) -> bytes:
    """The projection seed of one attempt: known only once every owner has sent its reduced partition."""
    h = hashlib.blake2b(b"intellect-verify-v1", digest_size=32)
    h.update(group_id)
    for x in part_hashes:
        h.update(len(x).to_bytes(2, "big") + x)
    return h.digest()


#: Sign of projection j (column) for a SHAKE byte of value v (row): bit j of v, most significant first.
_SIGNS = torch.tensor(
    [[1.0 if (v >> (7 - j)) & 1 else -1.0 for j in range(SKETCHES)] for v in range(256)], dtype=torch.float64
)


def _sign_bytes(seed: bytes, part: int, chunk: int, numel: int) -> torch.Tensor:
    """One byte per value of chunk `chunk` of partition `part`: its 8 bits are the value's signs in the 8
    projections. The same on every machine (SHAKE-256, not a torch generator)."""
    stream = hashlib.shake_256(seed + part.to_bytes(4, "big") + chunk.to_bytes(4, "big")).digest(numel)
    return torch.from_numpy(np.frombuffer(stream, dtype=np.uint8).astype(np.int64))


class Projector:
    """The k = 8 random unit projections of one partition of one attempt.

    Each projection is Σ sᵢ xᵢ / √n with sᵢ = ±1. Rather than expanding 8 sign vectors, the values are
    summed per sign byte (`bincount`: 256 sums, one pass) and the 256 sums projected by the sign table, so
    eight projections cost one pass over the values and one byte of SHAKE output per value."""

    def __init__(self, seed: bytes, part: int, numel: int) -> None:
        self.seed, self.part, self.numel = seed, part, numel
        self._scale = 1.0 / math.sqrt(max(numel, 1))

    def __call__(self, x: torch.Tensor) -> tuple[float, ...]:
        if x.numel() != self.numel:
            raise ValueError(f"projecting {x.numel()} values with a projector of {self.numel}")
        flat = x.reshape(-1)
        sums = torch.zeros(256, dtype=torch.float64)
        for c, lo in enumerate(range(0, self.numel, _CHUNK)):
            chunk = flat[lo : lo + _CHUNK].to(torch.float64)
            sums += torch.bincount(_sign_bytes(self.seed, self.part, c, chunk.numel()), chunk, minlength=256)
        return tuple(float(v) * self._scale for v in sums @ _SIGNS)


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ in float64 (what owners and senders both report, so they agree to rounding)."""
    total = 0.0
    fa, fb = a.reshape(-1), b.reshape(-1)
    for lo in range(0, fa.numel(), _CHUNK):
        d = fa[lo : lo + _CHUNK].to(torch.float64) - fb[lo : lo + _CHUNK].to(torch.float64)
        total += float(torch.dot(d, d))
    return math.sqrt(total)


@dataclass(frozen=True)
class Contribution:
    """What an owner reports about one contribution to its partition."""

    weight: float
    sketch: tuple[float, ...]
    dist: float


def clip_tau(dists: Sequence[float]) -> float:
    """τ of centered clipping: the lower median of the distances (torch's `median`), or their maximum for
    two contributions or fewer (which makes it the weighted mean)."""
    if not dists:
        return 0.0
    ordered = sorted(dists)
    return ordered[-1] if len(ordered) <= 2 else ordered[(len(ordered) - 1) // 2]


def clip_factor(d: float, tau: float) -> float:
    """mᵢ of centered clipping at distance `d` from the centre: 1 within τ, τ/d up to `REJECT`·τ, then
    falling linearly to 0 at 2·`REJECT`·τ (see `REJECT`)."""
    if d <= tau:
        return 1.0
    if tau <= 0.0:  # half the contributions sit exactly on the centre: the rest pull nothing
        return 0.0
    return tau / d * min(1.0, max(0.0, 2.0 - d / (REJECT * tau)))


def clip_factors(reducer: str, dists: Sequence[float]) -> list[float]:
    """mᵢ of the residual: 1 for `mean`; `clip_factor(dᵢ, τ)` with τ = `clip_tau(d)` for `centered_clip`."""
    if reducer == "mean":
        return [1.0] * len(dists)
    if reducer != "centered_clip":
        raise ValueError(f"no residual check for reducer {reducer!r}")
    tau = clip_tau(dists)
    return [clip_factor(d, tau) for d in dists]


def residual(
    reducer: str, contributions: Sequence[Contribution], result_sketch: Sequence[float]
) -> tuple[float, ...]:
    """The projected residual Σ wᵢ mᵢ (tᵢ − s·r̂) / W, one value per projection."""
    total = sum(c.weight for c in contributions)
    if total <= 0:
        raise ValueError("no weight")
    m = clip_factors(reducer, [c.dist for c in contributions])
    return tuple(
        sum(c.weight * f * (c.sketch[j] - result_sketch[j]) for c, f in zip(contributions, m, strict=True))
        / total
        for j in range(len(result_sketch))
    )


def tolerance(
    reducer: str, contributions: Sequence[Contribution], quant_bound: float, numel: int, result_norm: float
) -> float:
    """The largest projected residual an honest owner can produce (see the module docstring)."""
    dists = [c.dist for c in contributions]
    # The owner reduces in fp32: each of its sums rounds every value by up to 2^-24 of the operands.
    fp32 = 2.0**-23 * (len(contributions) + 2) * (result_norm + max(dists, default=0.0))
    scale = max((abs(x) for c in contributions for x in c.sketch), default=0.0)
    # Float64 rounding of the sums above, far below any real bias.
    rounding = 1e-9 * (scale + max(dists, default=0.0) + 1e-30)
    # The mean's residual is exactly the codec's error on the result; centered clipping's is at most
    # CONVERGED·τ plus the codec's error, once directly and twice through the clip factors.
    mean = reducer == "mean"
    bound = fp32 + (quant_bound if mean else CONVERGED * clip_tau(dists) + 3.0 * quant_bound)
    return Z * bound / math.sqrt(max(numel, 1)) + rounding


def check_partition(
    reducer: str, contributions: Sequence[Contribution], result: torch.Tensor, proj: Projector,
    quant_bound: float,
) -> tuple[bool, float, float]:  # fmt: skip
    """(passes, worst |residual|, tolerance) of one owner's report against the result everyone holds."""
    worst = max((abs(v) for v in residual(reducer, contributions, proj(result))), default=0.0)
    norm = distance(result, torch.zeros(()).expand(result.shape))
    tol = tolerance(reducer, contributions, quant_bound, result.numel(), norm)
    return worst <= tol, worst, tol


def same_report(a: Contribution, b: Contribution, rel: float = 1e-6) -> bool:
    """Whether an owner's line about a contribution matches the sender's own computation (both float64
    over the same decoded values; only summation order may differ)."""

    # Relative to the contribution's scale: a projection near zero is a difference of large sums.
    scale = max(a.dist, b.dist, *(abs(x) for x in (*a.sketch, *b.sketch)), 1e-30)

    def close(x: float, y: float) -> bool:
        return abs(x - y) <= rel * scale

    return (
        abs(a.weight - b.weight) <= rel * max(abs(a.weight), abs(b.weight))
        and close(a.dist, b.dist)
        and len(a.sketch) == len(b.sketch)
        and all(close(x, y) for x, y in zip(a.sketch, b.sketch, strict=True))
    )
