"""The inner loop of DiLoCo: H steps of AdamW on local data, in a worker thread.

`InnerTrainer.run_steps(n)` is synchronous; `await run_inner(n)` runs it via `asyncio.to_thread` so the
daemon's event loop keeps serving the DHT, gossip and the control API while torch computes (torch releases
the GIL inside its kernels). Learning rate: linear warm-up, then cosine decay to `min_lr`, computed from
the trainer's own step counter (no scheduler object, so its state is one integer). bf16 autocast is used
on CUDA only; on CPU it is slower than fp32 and changes the numerics the tests pin down.

State for checkpoints (`state_dict` / `load_state_dict`) covers the AdamW moments, the step counter, the
data stream's cursor and the torch RNG, but not the model weights (the caller saves those with the outer
state). `export_state()` flattens it into safetensors-ready tensors plus JSON-able metadata, so nothing
is ever pickled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from intellect.node.engine.data import TokenStream
from intellect.node.engine.model import Llama

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerConfig:
    """Inner-optimizer settings (from the manifest's DiLoCo section)."""

    #: Peak learning rate of AdamW.
    lr: float = 1e-3
    #: Linear warm-up steps from 0 to `lr`.
    warmup_steps: int = 50
    #: Steps of the whole run over which the cosine decays to `min_lr` (constant afterwards).
    total_steps: int = 1000
    #: Floor of the cosine schedule.
    min_lr: float = 1e-4
    #: AdamW decoupled weight decay (applied to matrices only, not norms).
    weight_decay: float = 0.1
    #: Global gradient-norm clip (0 disables).
    grad_clip: float = 1.0
    #: AdamW betas.
    beta1: float = 0.9
    beta2: float = 0.95
    #: AdamW epsilon.
    eps: float = 1e-8
    #: Sequences per step.
    batch: int = 8
    #: Tokens per sequence (inputs; each sample holds seq_len + 1 tokens).
    seq_len: int = 128
    #: "cpu", "cuda", "cuda:N" or "auto".
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("lr", "beta1", "beta2", "eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr: must be in [0, lr], got {self.min_lr!r}")
        for name in ("warmup_steps", "total_steps", "batch", "seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name == "warmup_steps" else 1):
                raise ValueError(
                    f"{name}: must be a {'non-negative' if name == 'warmup_steps' else 'positive'} int"
                )
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if not (self.device in ("cpu", "cuda", "auto") or self.device.startswith("cuda:")):
            raise ValueError(f"device: must be cpu, cuda[:N] or auto, got {self.device!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class InnerStats:
    """What one call of `run_steps` did."""

    steps: int
    tokens: int
    mean_loss: float
    last_loss: float
    tokens_per_s: float
    #: Learning rate of the last step.
    lr: float = 0.0


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class InnerTrainer:
    """AdamW over `model` fed by `stream`; the optimizer persists across DiLoCo rounds."""

    def __init__(
        self,
        model: Llama,
        config: TrainerConfig,
        stream: TokenStream,
        device: str | torch.device | None = None,
    ) -> None:
        self.config = config
        self.device = resolve_device(device if device is not None else config.device)
        self.model = model.to(self.device)
        self.stream = stream
        self.step = 0
        #: Called after each backward, before clipping: averages gradients across a node's local ranks
        #: (`intellect.node.engine.localgroup`); None when the node trains alone.
        self.grad_sync: Callable[[], None] | None = None
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        decay = [params[n] for n in self._names if params[n].dim() >= 2]
        no_decay = [params[n] for n in self._names if params[n].dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.lr_at(0),
            betas=(config.beta1, config.beta2),
            eps=config.eps,
            # The fused/foreach kernels differ in the last bit between versions; the default is fine here.
        )
        # Optimizer param order (decay group then no_decay) mapped back to names for export_state.
        self._opt_names = [n for n in self._names if params[n].dim() >= 2] + [
            n for n in self._names if params[n].dim() < 2
        ]

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def run_steps(self, n: int) -> InnerStats:
        """Run `n` optimizer steps synchronously (call from a worker thread in the daemon)."""
        self.model.train()
        losses: list[float] = []
        tokens = 0
        lr = self.config.lr_at(self.step)
        start = time.perf_counter()
        for _ in range(n):
            batch = self.stream.next_batch().to(self.device, non_blocking=True)
            lr = self.config.lr_at(self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with self._autocast():
                loss = self.model.loss(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_sync is not None:
                self.grad_sync()
            if self.config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            self.optimizer.step()
            self.step += 1
            losses.append(float(loss.detach()))
            tokens += batch.shape[0] * (batch.shape[1] - 1)
        elapsed = time.perf_counter() - start
        mean = sum(losses) / len(losses) if losses else float("nan")
        stats = InnerStats(
            steps=n,
            tokens=tokens,
            mean_loss=mean,
            last_loss=losses[-1] if losses else float("nan"),
            tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0,
            lr=lr,
        )
        log.debug("inner: %d steps, loss %.4f, %.0f tok/s", n, stats.mean_loss, stats.tokens_per_s)
        return stats

    async def run_inner(self, n: int) -> InnerStats:
        """`run_steps(n)` in a worker thread, so the event loop keeps running meanwhile."""
        return await asyncio.to_thread(self.run_steps, n)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[torch.Tensor]) -> float:
        """Mean loss over `batches` (e.g. `heldout_batches(...)`), without touching any state."""
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        try:
            for batch in batches:
                with self._autocast():
                    total += float(self.model.loss(batch.to(self.device)))
                count += 1
        finally:
            self.model.train(was_training)
        return total / count if count else float("nan")

    # ---- state ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Optimizer moments, step counter, stream cursor and RNG (not the model weights)."""
        tensors, meta = self.export_state()
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.import_state(state["tensors"], state["meta"])

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Safetensors-ready tensors (`optim.<param>.exp_avg`, …, `rng.cpu`) and JSON-able metadata."""
        tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        adam_steps: dict[str, float] = {}
        for name, p in zip(self._opt_names, params, strict=True):
            st = self.optimizer.state.get(p)
            if not st:
                continue
            tensors[f"optim.{name}.exp_avg"] = st["exp_avg"].detach().to("cpu").contiguous()
            tensors[f"optim.{name}.exp_avg_sq"] = st["exp_avg_sq"].detach().to("cpu").contiguous()
            adam_steps[name] = float(st["step"])
        meta = {"step": self.step, "adam_steps": adam_steps, "stream": self.stream.state_dict()}
        return tensors, meta

    def import_state(
        self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], *, stream: bool = True
    ) -> None:
        """Inverse of `export_state`. Everything is checked before anything changes: a state for a different
        model (names or shapes) or a cursor for a different stream raises and leaves the trainer as it was.

        `stream=False` keeps the current stream and its position (for a caller that builds a fresh stream
        per round, where the saved cursor belongs to a round that is over).
        """
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        adam_steps = meta.get("adam_steps", {})
        unknown = set(adam_steps) - set(self._opt_names)
        if unknown:
            raise ValueError(f"trainer state: moments for unknown parameters {sorted(unknown)[:3]}")
        new_state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for name, p in zip(self._opt_names, params, strict=True):
            if name not in adam_steps:
                continue
            try:
                exp_avg = tensors[f"optim.{name}.exp_avg"]
                exp_avg_sq = tensors[f"optim.{name}.exp_avg_sq"]
            except KeyError as e:
                raise ValueError(f"trainer state: missing tensor {e.args[0]!r}") from None
            if exp_avg.shape != p.shape or exp_avg_sq.shape != p.shape:
                raise ValueError(f"trainer state: optimizer moment of {name} has the wrong shape")
            new_state[p] = {
                "step": torch.tensor(float(adam_steps[name])),
                "exp_avg": exp_avg.to(self.device, p.dtype).clone(),
                "exp_avg_sq": exp_avg_sq.to(self.device, p.dtype).clone(),
            }
        step = int(meta["step"])
        if stream:
            # Validates the cursor against this stream without moving it yet.
            self.stream.check_state(meta["stream"])
        rng = tensors.get("rng.cpu")
        if rng is not None and rng.shape != torch.get_rng_state().shape:
            raise ValueError(f"trainer state: rng.cpu has shape {tuple(rng.shape)}")
        self.optimizer.state.clear()
        self.optimizer.state.update(new_state)
        self.step = step
        if stream:
            self.stream.load_state_dict(meta["stream"])
        if rng is not None:
            torch.set_rng_state(rng.to(torch.uint8))
