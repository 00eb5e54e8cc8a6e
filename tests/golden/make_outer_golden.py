"""Regenerate `outer_nesterov.json`: the outer Nesterov SGD step computed by hand, in float64 Python.

Independent of torch and of `intellect.node.engine.outer`: the formulas are those of torch.optim.SGD
(dampening 0): buf = g on the first step, then buf = m*buf + g; g' = g + m*buf; theta -= lr*g'.
Run `python tests/golden/make_outer_golden.py` only when the reference itself must change.
"""

from __future__ import annotations

import json
from pathlib import Path

LR, MOMENTUM = 0.7, 0.9
THETA0 = {"w": [0.5, -1.25, 2.0, 0.125], "b": [1.0, -0.5]}
# Averaged pseudo-gradients of three rounds (exactly representable in fp32).
DELTAS = [
    {"w": [0.25, -0.5, 0.125, 0.0], "b": [0.5, 0.25]},
    {"w": [-0.125, 0.25, 0.5, 1.0], "b": [0.0, -0.75]},
    {"w": [0.0625, 0.0625, -0.25, 0.5], "b": [0.125, 0.5]},
]


def main() -> None:
    theta = {k: list(v) for k, v in THETA0.items()}
    buf: dict[str, list[float]] = {}
    rounds = []
    for delta in DELTAS:
        for name, g in delta.items():
            if name not in buf:
                buf[name] = list(g)
            else:
                buf[name] = [MOMENTUM * b + gi for b, gi in zip(buf[name], g, strict=True)]
            step = [gi + MOMENTUM * b for gi, b in zip(g, buf[name], strict=True)]
            theta[name] = [t - LR * s for t, s in zip(theta[name], step, strict=True)]
        rounds.append(
            {
                "theta": {k: list(v) for k, v in theta.items()},
                "momentum": {k: list(v) for k, v in buf.items()},
            }
        )
    out = {"lr": LR, "momentum": MOMENTUM, "theta0": THETA0, "deltas": DELTAS, "rounds": rounds}
    path = Path(__file__).with_name("outer_nesterov.json")
    path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
