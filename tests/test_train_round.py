"""`training.train_round`: chunks of inner steps that hold the model, and what may run between them."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import pytest
from intellect.node.engine.trainer import InnerStats
from intellect.node.run.training import Pacer, RoundAbandoned, RoundTrainer, train_round


class Steps:
    """A stand-in trainer: each call is one chunk; it records whether `hold` was held while it ran."""

    def __init__(self, hold: asyncio.Lock) -> None:
        self.hold = hold
        self.held: list[bool] = []
        self.log: list[str] = []
        self.trainer = None

    async def steps(self, n: int) -> InnerStats:
        self.held.append(self.hold.locked())
        self.log.append(f"chunk {len(self.held)}")
        await asyncio.sleep(0.01)
        return InnerStats(steps=n, tokens=8 * n, mean_loss=1.0, last_loss=1.0, tokens_per_s=1.0, lr=0.1)


def as_trainer(steps: Steps) -> RoundTrainer:
    return cast(RoundTrainer, steps)


def test_each_chunk_holds_the_model_and_a_waiter_gets_it_between_two_chunks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every chunk runs with `hold` held; whoever waits for it (an overlapped commit moving the local
    copy) gets it at the next pause between two chunks, before the next chunk starts, and the time it kept
    the model is what the round's log line calls "between chunks"."""

    async def go() -> tuple[Steps, InnerStats]:
        hold = asyncio.Lock()
        trainer = Steps(hold)

        async def commit() -> None:
            while not trainer.held:  # until the first chunk is computing
                await asyncio.sleep(0)
            async with hold:
                trainer.log.append("commit")
                await asyncio.sleep(0.2)

        task = asyncio.create_task(commit())
        stats = await train_round(as_trainer(trainer), 4, lambda e: None, Pacer(chunk_s=0.0), hold=hold)
        await task
        return trainer, stats

    with caplog.at_level(logging.INFO, logger="intellect.node.run.training"):
        trainer, stats = asyncio.run(go())
    assert trainer.held == [True] * 4
    assert trainer.log == ["chunk 1", "commit", "chunk 2", "chunk 3", "chunk 4"]
    assert stats.steps == 4 and stats.tokens == 32
    (line,) = [r for r in caplog.records if getattr(r, "event", "") == "inner_steps"]
    between = float(line.getMessage().split(", ")[-1].split(" s between")[0])
    assert between >= 0.15  # the commit's 0.2 s, less the timer's coarseness


def test_a_pause_between_two_chunks_gives_the_round_up() -> None:
    """`paused()` is asked before each chunk: the round is given up there, with the model let go."""

    async def go() -> Steps:
        hold = asyncio.Lock()
        trainer = Steps(hold)
        with pytest.raises(RoundAbandoned):
            paused = lambda: len(trainer.held) >= 2  # noqa: E731
            await train_round(as_trainer(trainer), 4, lambda e: None, Pacer(chunk_s=0.0), paused, hold)
        assert not hold.locked()
        return trainer

    assert len(asyncio.run(go()).held) == 2
