"""Data parallelism inside one node: W local ranks train the node's inner steps as one trainer.

A node with W GPUs runs W ranks: this process (rank 0, the daemon's own `InnerTrainer`) and W − 1 worker
processes started here, joined by torch.distributed (NCCL on GPUs, gloo on CPU). In each inner step,
every rank takes its 1/W share of the manifest's batch from its own part of the node's shards for the
round. The gradients are averaged across ranks (one flat bucket, as DDP does with one bucket), and every
rank takes the same clipped AdamW step. So the node's step is the one the manifest describes, computed W
ways at once. Its tokens per round, and so its weight in the average, do not change. DiLoCo between
nodes is unchanged too: only rank 0 talks to the network, and its weights are the node's.

Workers hold no state of their own between rounds. Rank 0 drives them with broadcast commands:

* ``ROUND``: rank 0's weights, AdamW moments and step counter (it may have synced, resumed or taken an
  outer step since), and the round's shard list and seed;
* ``STEPS n``: n inner steps; the token and loss sums come back by all-reduce;
* ``STOP``.

A worker that dies makes rank 0's next collective fail (gloo sees the closed connection; the process
group's timeout bounds the rest). `LocalGroupError` then stops the daemon: a node cannot train its share
of a round with part of itself gone.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import multiprocessing as mp
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from intellect.node.engine.data import ShardResolver, TokenStream
from intellect.node.engine.trainer import InnerStats, InnerTrainer, TrainerConfig
from intellect.protocol.manifest import ShardSpec

log = logging.getLogger(__name__)

_STOP, _ROUND, _STEPS = 0, 1, 2
#: Command tensor: op, a, b, c, d (meaning per op).
_CMD_LEN = 5


class LocalGroupError(RuntimeError):
    """The node's local ranks could not start, or one of them failed."""


def local_batch(batch: int, world: int) -> int:
    """Each rank's share of the manifest's per-step batch; the batch must split evenly."""
    if world < 1 or batch % world:
        raise LocalGroupError(f"the run's batch_size {batch} does not split over {world} local ranks")
    return batch // world


def rank_stream(
    resolver: ShardResolver,
    shards: Sequence[ShardSpec],
    rank: int,
    world: int,
    batch: int,
    seq_len: int,
    seed: int,
) -> TokenStream:
    """Rank `rank`'s data for a round: every `world`-th of the node's shards (all when there are fewer
    shards than ranks), with a seed of its own. With one rank, exactly the node's single-process stream."""
    part = list(shards[rank::world]) or list(shards)
    return TokenStream.from_infos(
        resolver, part, batch, seq_len, seed=seed if rank == 0 else seed ^ (rank << 40)
    )


def gradient_allreduce(params: Sequence[torch.nn.Parameter], world: int) -> Callable[[], None]:
    """A `InnerTrainer.grad_sync`: average the gradients of `params` over the default process group's
    `world` ranks in one flat all-reduce (DDP with one bucket). Every rank must list the same params."""
    import torch.distributed as dist

    def sync() -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(flat[offset : offset + n].view_as(g))
            offset += n

    return sync


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to build the same trainer as rank 0 (picklable)."""

    model: dict[str, Any]
    trainer: TrainerConfig
    tokenizer: str
    tokenizer_sha256: str | None
    shards: tuple[ShardSpec, ...]
    data_dir: str
    device: str
    backend: str
    init_method: str
    world: int
    timeout_s: float


class _Replica:
    """What rank 0 and the workers share: the trainer's parameters in a fixed order, and how the ROUND
    payload maps onto them."""

    def __init__(self, trainer: InnerTrainer, world: int, device: torch.device) -> None:
        self.trainer = trainer
        self.world = world
        self.device = device
        named = dict(trainer.model.named_parameters())
        self.names = list(trainer._opt_names)
        self.params = [named[n] for n in self.names]
        self.numel = sum(p.numel() for p in self.params)
        trainer.grad_sync = gradient_allreduce(self.params, world)

    def _bcast(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        t = t.to(self.device)
        dist.broadcast(t, 0)
        return t

    def cmd(self, *values: int) -> list[int]:
        t = torch.zeros(_CMD_LEN, dtype=torch.int64)
        t[: len(values)] = torch.tensor(values, dtype=torch.int64)
        return [int(v) for v in self._bcast(t).cpu()]

    def send_state(self) -> None:
        """Rank 0: broadcast its weights, AdamW moments and step counters."""
        tr, opt = self.trainer, self.trainer.optimizer
        has = all(p in opt.state for p in self.params)
        self.cmd(int(has), tr.step)
        with torch.no_grad():
            self._bcast(torch.cat([p.detach().reshape(-1) for p in self.params]))
            if has:
                for key in ("exp_avg", "exp_avg_sq"):
                    self._bcast(torch.cat([opt.state[p][key].reshape(-1) for p in self.params]))
                steps = [float(opt.state[p]["step"]) for p in self.params]
                self._bcast(torch.tensor(steps, dtype=torch.float64))

    def recv_state(self) -> None:
        """Workers: take rank 0's weights, AdamW moments and step counters (what `send_state` sends)."""
        tr = self.trainer
        has, step = self.cmd()[:2]
        flat = self._bcast(torch.empty(self.numel, dtype=torch.float32))
        with torch.no_grad():
            offset = 0
            for p in self.params:
                p.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        if not has:
            tr.optimizer.state.clear()
            tr.step = step
            return
        avg, avg_sq = (self._bcast(torch.empty(self.numel, dtype=torch.float32)).cpu() for _ in range(2))
        steps = self._bcast(torch.empty(len(self.params), dtype=torch.float64)).cpu().tolist()
        tensors: dict[str, torch.Tensor] = {}
        offset = 0
        for name, p in zip(self.names, self.params, strict=True):
            n = p.numel()
            tensors[f"optim.{name}.exp_avg"] = avg[offset : offset + n].view_as(p)
            tensors[f"optim.{name}.exp_avg_sq"] = avg_sq[offset : offset + n].view_as(p)
            offset += n
        tr.import_state(
            tensors, {"step": step, "adam_steps": dict(zip(self.names, steps, strict=True))}, stream=False
        )

    def steps(self, n: int) -> InnerStats:
        import torch.distributed as dist

        t0 = time.perf_counter()
        stats = self.trainer.run_steps(n)
        sums = torch.tensor(
            [float(stats.tokens), stats.mean_loss * n], dtype=torch.float64, device=self.device
        )
        dist.all_reduce(sums)
        tokens, loss_sum = int(sums[0]), float(sums[1])
        elapsed = time.perf_counter() - t0
        return dataclasses.replace(
            stats,
            tokens=tokens,
            mean_loss=loss_sum / (n * self.world),
            tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0,
        )


def _worker_main(spec: WorkerSpec, rank: int) -> None:
    """A worker rank: builds the same model and trainer, then follows rank 0's commands until STOP."""
    import torch.distributed as dist
    from intellect.node.engine.model import Llama, ModelConfig
    from intellect.node.engine.tokenizer import load_tokenizer

    if spec.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(
        spec.backend,
        init_method=spec.init_method,
        rank=rank,
        world_size=spec.world,
        timeout=datetime.timedelta(seconds=spec.timeout_s),
    )
    try:
        resolver = ShardResolver(load_tokenizer(spec.tokenizer, spec.tokenizer_sha256), Path(spec.data_dir))
        model = Llama(ModelConfig.from_dict(spec.model), seed=0)  # weights come from rank 0 every round
        # No stream until the first ROUND command names this round's shards.
        trainer = InnerTrainer(model, spec.trainer, None, device=device)  # type: ignore[arg-type]
        replica = _Replica(trainer, spec.world, device if spec.backend == "nccl" else torch.device("cpu"))
        while True:
            op, a, b, _c, _d = replica.cmd()
            if op == _STOP:
                break
            if op == _ROUND:
                seed, count = a, b
                idx = replica._bcast(torch.empty(count, dtype=torch.int64)).cpu().tolist()
                replica.recv_state()
                shards = [spec.shards[i] for i in idx]
                cfg = spec.trainer
                trainer.stream = rank_stream(resolver, shards, rank, spec.world, cfg.batch, cfg.seq_len, seed)
            elif op == _STEPS:
                replica.steps(a)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalGroup:
    """Rank 0's side: starts the workers, and drives them round by round (methods block: call them from
    a worker thread, as the daemon does with its trainer)."""

    def __init__(
        self,
        trainer: InnerTrainer,
        *,
        world: int,
        model: dict[str, Any],
        tokenizer: str,
        tokenizer_sha256: str | None,
        shards: Sequence[ShardSpec],
        shards_dir: Path,
        timeout_s: float = 600.0,
    ) -> None:
        import torch.distributed as dist

        if world < 2:
            raise LocalGroupError("a local group needs at least 2 ranks")
        if dist.is_initialized():
            raise LocalGroupError("this process already belongs to a torch.distributed group")
        cuda = trainer.device.type == "cuda"
        if cuda and torch.cuda.device_count() < world:
            raise LocalGroupError(
                f"{world} local ranks need {world} GPUs; {torch.cuda.device_count()} visible"
            )
        backend = "nccl" if cuda else "gloo"
        if not cuda:
            # gloo's own connections stay on loopback, not on whatever address the hostname resolves to.
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self.world = world
        self.shards = tuple(shards)
        spec = WorkerSpec(
            model=model,
            trainer=trainer.config,
            tokenizer=tokenizer,
            tokenizer_sha256=tokenizer_sha256,
            shards=self.shards,
            data_dir=str(shards_dir),
            device="cuda" if cuda else "cpu",
            backend=backend,
            init_method=init_method,
            world=world,
            timeout_s=timeout_s,
        )
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_worker_main, args=(spec, k), daemon=True) for k in range(1, world)]
        for p in self.procs:
            p.start()
        try:
            dist.init_process_group(
                backend,
                init_method=init_method,
                rank=0,
                world_size=world,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        except Exception as e:  # torch raises several types for a rendezvous that fails
            self._reap()
            raise LocalGroupError(f"local ranks did not join: {e}") from e
        self._replica = _Replica(trainer, world, trainer.device if cuda else torch.device("cpu"))
        self.closed = False
        # Collectives must not interleave: a stop can arrive (from the event loop's thread) while a chunk
        # of steps still runs in a worker thread whose awaiting coroutine was cancelled.
        self._lock = threading.Lock()
        log.info("training with %d local ranks (%s)", world, backend)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def _check(self, what: str, fn: Callable[[], Any]) -> Any:
        with self._lock:
            if self.closed:
                raise LocalGroupError(f"the local ranks are stopped; no {what}")
            dead = [p.exitcode for p in self.procs if p.exitcode is not None]
            if dead:
                raise LocalGroupError(f"a local rank exited (codes {dead}) before {what}")
            try:
                return fn()
            except RuntimeError as e:  # gloo/NCCL report a lost peer as RuntimeError (DistBackendError)
                raise LocalGroupError(f"local ranks failed during {what}: {e}") from e

    def begin_round(self, shards: Sequence[ShardSpec], seed: int, stream: TokenStream) -> None:
        """Send rank 0's state and the round's shards; `stream` (rank 0's own part) becomes its data."""
        idx = [self.shards.index(s) for s in shards]

        def send() -> None:
            self._replica.cmd(_ROUND, seed, len(idx))
            self._replica._bcast(torch.tensor(idx, dtype=torch.int64))
            self._replica.send_state()

        self._check("a round", send)
        self._replica.trainer.stream = stream

    def steps(self, n: int) -> InnerStats:
        """`n` inner steps on every rank; the node's tokens and mean loss over all ranks."""

        def run() -> InnerStats:
            self._replica.cmd(_STEPS, n)
            return self._replica.steps(n)

        result: InnerStats = self._check("inner steps", run)
        return result

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (politely, then by force) and leave the process group."""
        import torch.distributed as dist

        # Wait for a chunk of steps in flight (seconds) to end; if it does not, stop the workers by force.
        locked = self._lock.acquire(timeout=timeout)
        try:
            if self.closed:
                return
            self.closed = True
            if locked and all(p.exitcode is None for p in self.procs):
                self._replica.cmd(_STOP)
        except RuntimeError as e:
            log.warning("could not tell the local ranks to stop: %s", e)
        finally:
            self._reap(timeout)
            if locked:
                if dist.is_initialized():
                    dist.destroy_process_group()
                self._lock.release()

    def _reap(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
