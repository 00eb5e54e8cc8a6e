"""A run's pinned initial state (`init.sha256`): `data init-state` writes it, the node verifies and loads it.

Real files, the real CLI and the run's own round-0 setup (`build_engine`, `GlobalState.start`), and the
round machine's refusal to train round 1 from another origin.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from click.testing import CliRunner
from intellect.node.app.body import load_run_manifest
from intellect.node.app.config import NodeConfig
from intellect.node.cli.main import cli
from intellect.node.engine.initstate import InitStateError, init_state_path, load_init_state, write_init_state
from intellect.node.engine.model import Llama, ModelConfig
from intellect.node.engine.outer import OuterOptimizer
from intellect.node.engine.statehash import blob_state_hash, serialize_state
from intellect.node.net.allreduce import get_payload_codec
from intellect.node.run.events import discard
from intellect.node.run.machine import Limits, RoundMachine
from intellect.node.run.phase import Phase, PhaseTracker
from intellect.protocol.manifest import InitSpec

if TYPE_CHECKING:  # the fixture's type; conftest is pytest's to import, not ours
    from conftest import MakeOfflineRun, OfflineRun

TINY = Path(__file__).resolve().parent.parent / "node" / "runs" / "tiny-run.toml"


def _init_state(args: list[str]) -> str:
    """Run `intellect-node data init-state`; the sha256 it prints in its [init] table."""
    result = CliRunner().invoke(cli, ["data", "init-state", *args])
    assert result.exit_code == 0, result.output
    found = re.search(r'^sha256 = "([0-9a-f]{64})"$', result.output, re.MULTILINE)
    assert found, result.output
    return found.group(1)


def _run(offline_run: MakeOfflineRun, tmp_path: Path, sha256: str) -> OfflineRun:
    """The tiny run pinned to `sha256`, built and started as `RunService.run` does."""
    manifest = load_run_manifest()
    manifest = dataclasses.replace(manifest, init=InitSpec(seed=manifest.init.seed, sha256=sha256))
    return offline_run(NodeConfig(data_dir=tmp_path / "node", listen=("/ip4/127.0.0.1/tcp/0",)), manifest)


def _weights(run: OfflineRun) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in run.engine.model.named_parameters()}


def test_pinning_the_seeded_init_changes_nothing(tmp_path: Path, offline_run: MakeOfflineRun) -> None:
    sha = _init_state([str(TINY), "--out", str(tmp_path / "init.safetensors")])
    run = _run(offline_run, tmp_path, sha)
    assert run.state.init_error is None
    assert run.state.state_hash == sha  # the file's hash is the round-0 state hash the node announces


def test_pretrained_weights_are_packed_then_verified_and_loaded(
    tmp_path: Path, offline_run: MakeOfflineRun
) -> None:
    manifest = load_run_manifest()
    pretrained = Llama(ModelConfig.from_dict(manifest.model.to_dict()), seed=1234)
    torch.save(pretrained.state_dict(), tmp_path / "pretrained.pt")
    out = tmp_path / "init.safetensors"
    sha = _init_state([str(TINY), "--weights", str(tmp_path / "pretrained.pt"), "--out", str(out)])
    target = init_state_path(tmp_path / "node", sha)  # where a volunteer puts the researcher's file
    target.parent.mkdir(parents=True)
    shutil.copy(out, target)
    run = _run(offline_run, tmp_path, sha)
    assert run.state.init_error is None and run.state.state_hash == sha
    for name, p in pretrained.named_parameters():
        assert torch.equal(run.engine.model.get_parameter(name), p), name
        assert torch.equal(run.engine.outer.global_params[name], p), name


def test_a_missing_file_is_kept_as_the_reason_and_round_0_refuses_to_train(
    tmp_path: Path, offline_run: MakeOfflineRun
) -> None:
    pinned = "ab" * 32
    run = _run(offline_run, tmp_path, pinned)
    seeded = run.state.state_hash
    assert isinstance(run.state.init_error, InitStateError)
    assert "does not exist" in str(run.state.init_error) and pinned in str(run.state.init_error)
    assert seeded != pinned  # we hold the seeded state and say so

    class NoPeers:  # nobody is past round 0: there is nothing to sync instead
        shards = run.engine.shards

        async def refresh_members(self) -> None:
            return None

        async def state(self, *args: Any) -> Any:
            raise AssertionError("nothing to sync")

    class NeverTrains:
        trainer = run.engine.trainer.trainer

        async def begin_round(self, plan: Any) -> None:
            raise AssertionError("trained round 1 without the run's initial state")

    class Unused:  # the averager and the announcer: round 1 must never get that far
        codec = get_payload_codec("none")

        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"{name} used before round 0's state was there")

    machine = RoundMachine(
        run.identity.peer_id,
        run.run_id,
        run.signed.manifest,
        (run.book, run.state, NeverTrains(), Unused(), Unused()),  # type: ignore[arg-type]
        NoPeers(),
        PhaseTracker(discard, Phase.LOADING),
        discard,
        Limits(max_rounds=3),
    )
    with pytest.raises(InitStateError, match="does not exist"):
        asyncio.run(machine.run())
    assert run.state.state_hash == seeded


def _cfg() -> ModelConfig:
    return ModelConfig.from_dict(load_run_manifest().model.to_dict())


def _outer(seed: int = 0) -> OuterOptimizer:
    return OuterOptimizer.from_model(Llama(_cfg(), seed=seed))


def _unchanged(outer: OuterOptimizer, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(outer.global_params[k], v) for k, v in before.items())


def test_bad_files_are_refused_and_leave_the_state_alone(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    sha = write_init_state(_outer(seed=5), good)
    outer = _outer()
    before = {k: v.clone() for k, v in outer.global_params.items()}

    flipped = bytearray(good.read_bytes())
    flipped[-3] ^= 0x40
    (tmp_path / "flipped").write_bytes(flipped)
    with pytest.raises(InitStateError, match="hashes to"):
        load_init_state(tmp_path / "flipped", sha, outer)

    (tmp_path / "short").write_bytes(good.read_bytes()[:-4])
    with pytest.raises(InitStateError, match="bytes; this run's initial state has"):
        load_init_state(tmp_path / "short", sha, outer)

    # A correctly hashed file that is not a round-0 state: one outer step already taken.
    stepped = _outer(seed=5)
    stepped.step({k: torch.full_like(v, 1e-3) for k, v in stepped.global_params.items()})
    blob = serialize_state(
        {k: v for k, v in stepped.state_dict().items() if not k.startswith("outer.momentum")}
    )
    (tmp_path / "stepped").write_bytes(blob)
    with pytest.raises(InitStateError, match="not a round-0 state"):
        load_init_state(tmp_path / "stepped", blob_state_hash(blob), outer)

    # Non-finite weights with a matching hash.
    nan = _outer(seed=5)
    next(iter(nan.global_params.values()))[0] = float("nan")
    nan_sha = write_init_state(nan, tmp_path / "nan")
    with pytest.raises(InitStateError, match="non-finite"):
        load_init_state(tmp_path / "nan", nan_sha, outer)

    # A model of another shape: the size check refuses it before reading it.
    other = OuterOptimizer.from_model(Llama(dataclasses.replace(_cfg(), n_layers=1), seed=0))
    other_sha = write_init_state(other, tmp_path / "other")
    with pytest.raises(InitStateError, match="bytes"):
        load_init_state(tmp_path / "other", other_sha, outer)

    assert _unchanged(outer, before)
    load_init_state(good, sha, outer)
    assert not _unchanged(outer, before) and outer.steps == 0


def test_cli_refuses_weights_that_do_not_fit(tmp_path: Path) -> None:
    def pack(weights: Path) -> Any:
        args = ["data", "init-state", str(TINY), "--weights", str(weights), "--out", str(tmp_path / "o")]
        return CliRunner().invoke(cli, args)

    torch.save({"tok_embeddings.weight": torch.zeros(3, 3)}, tmp_path / "partial.pt")
    result = pack(tmp_path / "partial.pt")
    assert result.exit_code == 1
    assert "lack" in result.output and not (tmp_path / "o").exists()
    torch.save([1, 2], tmp_path / "list.pt")
    result = pack(tmp_path / "list.pt")
    assert result.exit_code == 1 and "not a state dict" in result.output
