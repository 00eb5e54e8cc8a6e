"""DiLoCo outer optimizer: pure math on the fp32 global weights, no I/O, no networking.

Every peer holds the same global weights θ (fp32, on CPU so a GPU only carries the training copy). After H
inner steps it computes the pseudo-gradient Δ = θ − θ_local, the peers average their Δ, and every peer
applies the *same* outer step with the averaged Δ as the gradient, so all global copies stay bit-identical.

The outer step is `torch.optim.SGD` with Nesterov momentum (lr 0.7, momentum 0.9 by default, as in DiLoCo,
OpenDiLoCo and INTELLECT-1), written out here so that the state is a flat, named tensor dict that
serialises with safetensors and hashes with `statehash`:

    buf  = g                         on the first step (torch initialises the buffer with the gradient)
    buf  = momentum · buf + g        afterwards (dampening 0)
    g'   = g + momentum · buf        if nesterov, else buf (or g when momentum is 0)
    θ    = θ − lr · g'

The caller gates `step` on a completed all-reduce (a failed round must not step; STYLE.md rule 11).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Names in `OuterOptimizer.state_dict` (the global state that is hashed, checkpointed and synced).
GLOBAL_PREFIX = "outer.global."
MOMENTUM_PREFIX = "outer.momentum."
STEP_KEY = "outer.step"


class OuterError(ValueError):
    """An outer-step input does not match the global weights (names, shapes) or is not finite."""


def _named_tensors(source: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Parameters of a module (by their `named_parameters` names), or the mapping itself."""
    if isinstance(source, nn.Module):
        return dict(source.named_parameters())
    return source


class OuterOptimizer:
    """Holds the global weights in fp32 on CPU and applies outer SGD (Nesterov) steps with averaged Δ."""

    def __init__(
        self,
        global_params: Mapping[str, torch.Tensor],
        lr: float = 0.7,
        momentum: float = 0.9,
        nesterov: bool = True,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"outer lr must be positive, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"outer momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov needs a non-zero momentum (as in torch.optim.SGD)")
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        # Our own fp32 CPU copy: the caller's tensors (often the live model parameters) must not alias it.
        self.global_params: dict[str, torch.Tensor] = {
            name: t.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()
            for name, t in global_params.items()
        }
        self.momentum_buffers: dict[str, torch.Tensor] = {}
        self.steps = 0

    @classmethod
    def from_model(
        cls, model: nn.Module, lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True
    ) -> OuterOptimizer:
        """Snapshot a model's parameters as the global weights."""
        return cls(dict(model.named_parameters()), lr=lr, momentum=momentum, nesterov=nesterov)

    def _check_keys(self, other: Mapping[str, torch.Tensor], what: str) -> None:
        missing = self.global_params.keys() - other.keys()
        if missing:
            raise OuterError(f"{what} lacks {len(missing)} tensors, e.g. {sorted(missing)[0]!r}")

    def pseudo_gradient(
        self,
        local_state: nn.Module | Mapping[str, torch.Tensor],
        base: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Δ = θ_global − θ_local in fp32 on CPU, for every global tensor (extra local tensors ignored); with
        `base` (where the round's inner steps started, when that was not θ_global), Δ = base − θ_local."""
        local = _named_tensors(local_state)
        self._check_keys(local, "local state")
        if base is not None:
            self._check_keys(base, "base")
        delta: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, g0 in self.global_params.items():
                g = g0 if base is None else base[name]
                loc = local[name]
                if loc.shape != g.shape:
                    raise OuterError(f"local {name!r} has shape {tuple(loc.shape)}, global {tuple(g.shape)}")
                delta[name] = g - loc.detach().to(device="cpu", dtype=torch.float32)
        return delta

    def step(self, avg_delta: Mapping[str, torch.Tensor]) -> None:
        """Apply one outer step with the averaged Δ (must be finite; checked before any change)."""
        self._check_keys(avg_delta, "averaged delta")
        grads: dict[str, torch.Tensor] = {}
        for name, g in self.global_params.items():
            d = avg_delta[name].detach().to(device="cpu", dtype=torch.float32)
            if d.shape != g.shape:
                raise OuterError(f"delta {name!r} has shape {tuple(d.shape)}, global {tuple(g.shape)}")
            if not bool(torch.isfinite(d).all()):
                # Checked for every tensor before touching any, so a bad delta leaves the state unchanged.
                raise OuterError(f"averaged delta {name!r} contains NaN or Inf")
            grads[name] = d
        with torch.no_grad():
            for name, param in self.global_params.items():
                grad = grads[name]
                if self.momentum:
                    buf = self.momentum_buffers.get(name)
                    if buf is None:
                        buf = grad.clone()
                        self.momentum_buffers[name] = buf
                    else:
                        buf.mul_(self.momentum).add_(grad)
                    grad = grad.add(buf, alpha=self.momentum) if self.nesterov else buf
                param.add_(grad, alpha=-self.lr)
        self.steps += 1
        log.debug("outer step %d applied to %d tensors", self.steps, len(grads))

    def preview(self, delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The global weights `step(delta)` would give, as new tensors; the state is unchanged.

        The overlapped outer update starts a round's inner steps here, with our own Δ standing in for the
        average that is still in flight (the "eager" update of Kale et al. 2025); the average itself is
        applied by `step` when it arrives, so the global state never holds the guess."""
        self._check_keys(delta, "delta")
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, param in self.global_params.items():
                grad = delta[name].detach().to(device="cpu", dtype=torch.float32)
                if grad.shape != param.shape:
                    raise OuterError(f"delta {name!r} has shape {tuple(grad.shape)}")
                if self.momentum:
                    buf = self.momentum_buffers.get(name)
                    buf = grad if buf is None else buf.mul(self.momentum).add_(grad)
                    grad = grad.add(buf, alpha=self.momentum) if self.nesterov else buf
                out[name] = param.add(grad, alpha=-self.lr)
        return out

    def copy_to(
        self,
        model: nn.Module | Mapping[str, torch.Tensor],
        weights: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Reset the local weights to the global ones, or to `weights` (names of the global ones, e.g. a
        `preview`), in place, keeping their dtype and device.

        Only weights are touched; the inner optimizer's state belongs to the trainer and is kept.
        """
        target = _named_tensors(model)
        self._check_keys(target, "model")
        source = self.global_params if weights is None else weights
        self._check_keys(source, "weights")
        with torch.no_grad():
            for name in self.global_params:
                target[name].copy_(source[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict (global weights, momentum buffers, step count): safetensors- and hash-ready.

        The tensors are the live ones (no copy); serialise or clone before the next `step`.
        """
        state: dict[str, torch.Tensor] = {GLOBAL_PREFIX + n: t for n, t in self.global_params.items()}
        state.update({MOMENTUM_PREFIX + n: t for n, t in self.momentum_buffers.items()})
        state[STEP_KEY] = torch.tensor(self.steps, dtype=torch.int64)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore exactly what `state_dict` produced; the tensor names and shapes must match ours."""
        params, buffers = self.check_state_dict(state)
        # Keep the model's tensor order (the state dict may come from a file in sorted order).
        self.global_params = {
            n: params[n].detach().to("cpu").clone().contiguous() for n in self.global_params
        }
        self.momentum_buffers = {n: t.detach().to("cpu").clone().contiguous() for n, t in buffers.items()}
        self.steps = int(state[STEP_KEY].item())

    def check_state_dict(
        self, state: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """`OuterError` unless `load_state_dict(state)` would succeed (names, shapes, dtypes, finiteness);
        the state's weights and momentum buffers by parameter name (not copied). Changes nothing."""
        params: dict[str, torch.Tensor] = {}
        buffers: dict[str, torch.Tensor] = {}
        if STEP_KEY not in state:
            raise OuterError(f"outer state lacks {STEP_KEY!r}")
        for key, t in state.items():
            if key.startswith(GLOBAL_PREFIX):
                params[key[len(GLOBAL_PREFIX) :]] = t
            elif key.startswith(MOMENTUM_PREFIX):
                buffers[key[len(MOMENTUM_PREFIX) :]] = t
            elif key != STEP_KEY:
                raise OuterError(f"unexpected tensor {key!r} in outer state")
        if params.keys() != self.global_params.keys():
            diff = sorted(params.keys() ^ self.global_params.keys())
            raise OuterError(f"outer state names differ from the model's, e.g. {diff[0]!r}")
        if not buffers.keys() <= params.keys():
            raise OuterError("outer state has momentum buffers for unknown tensors")
        for name, t in [*params.items(), *buffers.items()]:
            if t.shape != self.global_params[name].shape:
                raise OuterError(f"outer state tensor {name!r} has shape {tuple(t.shape)}")
            if t.dtype != torch.float32:
                raise OuterError(f"outer state tensor {name!r} has dtype {t.dtype}, expected float32")
            if not bool(torch.isfinite(t).all()):
                raise OuterError(f"outer state tensor {name!r} holds NaN or infinite values")
        return params, buffers
