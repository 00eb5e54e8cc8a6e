"""`intellect-node export` and `eval`: a trained global state as a Hugging Face Llama directory, and its loss.

The state is the real thing: the tiny run's engine and global state trained alone for two rounds, each
committed and checkpointed by `GlobalState.commit` into the data directory, as a node does. The export is
opened by transformers itself (`LlamaForCausalLM`, `AutoTokenizer`) and compared with our model and our
`ByteTokenizer`; checkpoints are corrupted on disk to see the command refuse them cleanly.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from intellect.crypto.identity import Identity
from intellect.node.app.body import load_run_manifest
from intellect.node.cli.main import cli
from intellect.node.engine.export import (
    ExportError,
    byte_tokenizer_json,
    load_hf_dir,
    model_config_from_hf,
    write_hf_dir,
)
from intellect.node.engine.model import Llama, ModelConfig
from intellect.node.engine.tokenizer import ByteTokenizer, HFTokenizer, file_sha256
from intellect.node.net.allreduce import get_payload_codec
from intellect.node.run.events import discard
from intellect.node.run.service import data_root, keep_manifest, make_global_state
from intellect.node.run.training import EngineSettings, build_engine, plan_round
from intellect.protocol.manifest import SignedManifest
from nodeproc import CLI, clean_env

TINY = Path(__file__).resolve().parent.parent / "node" / "runs" / "tiny-run.toml"
TEXTS = [
    "def f(x):\n    return x + 1\n",
    "  leading and trailing spaces  ",
    "héllo wörld, naïve café",
    "日本語のテキスト and Ελληνικά, русский",
    "emoji 🙂🚀 and a combining e\u0301",
    "<s>special</s> looking <pad> text <|endoftext|>",
    "",
]


@dataclass(frozen=True)
class Trained:
    """A data directory holding two checkpoints of a tiny run, and what the node held after round 2."""

    data_dir: Path
    run_id: str
    #: The run's manifest as a TOML file naming its researcher (so its run ID is the run's).
    manifest: Path
    weights: dict[str, torch.Tensor]
    state_hash: str
    cfg: ModelConfig
    signed: SignedManifest


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("export")
    data_dir = root / "node"
    signed = SignedManifest.sign(load_run_manifest(), Identity.generate())
    settings = EngineSettings(data_dir)
    engine = build_engine(signed.manifest, settings)
    state = make_global_state(signed.run_id, engine, settings, discard)
    me = Identity.generate().peer_id

    async def train() -> None:
        await state.start(data_dir, "")
        for r in (1, 2):
            await engine.trainer.begin_round(plan_round(signed.run_id, r, me, [me], engine.shards))
            await engine.trainer.steps(3)
            delta = await state.pseudo_gradient()
            await state.commit(
                r, {k: v.clone() for k, v in delta.items()}, delta, [me], me, get_payload_codec("none")
            )

    asyncio.run(train())
    manifest = root / "run.toml"
    text = TINY.read_text()
    manifest.write_text(
        text.replace(
            "protocol_version = 1\n", f'protocol_version = 1\nresearcher = "{signed.researcher}"\n', 1
        )
    )
    weights = {k: v.clone() for k, v in state.outer.global_params.items()}
    cfg = ModelConfig.from_dict(signed.manifest.model.to_dict())
    return Trained(data_dir, signed.run_id, manifest, weights, state.state_hash, cfg, signed)


def _cli(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def _export(t: Trained, out: Path, *args: str | Path) -> Result:
    return _cli(
        "export", t.run_id[:8], "--out", out, "--manifest", t.manifest, "--data-dir", t.data_dir, *args
    )


@pytest.fixture(scope="module")
def exported(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "model"
    result = _export(trained, out)
    assert result.exit_code == 0, result.output
    assert f"round 2 of run {trained.run_id[:16]}" in result.output
    assert trained.state_hash[:16] in result.output
    return out


def _our_model(t: Trained) -> Llama:
    model = Llama(t.cfg)
    model.load_state_dict(t.weights)
    return model.eval()


def _checkpoints(data_dir: Path, run_id: str) -> Path:
    return data_root(data_dir, run_id) / "global"


def _flip_byte(path: Path, at: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0xFF
    path.write_bytes(bytes(blob))


@pytest.mark.timeout(120)
def test_transformers_gives_our_logits(trained: Trained, exported: Path) -> None:
    from transformers import LlamaForCausalLM

    names = sorted(p.name for p in exported.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    config = json.loads((exported / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (256, 257, 258)
    hf = LlamaForCausalLM.from_pretrained(exported).eval()
    assert not hf.config.tie_word_embeddings
    tokens = torch.tensor([list("def main():\n    print('héllo')".encode()), list(b"x" * 8 + b"\n" * 23)])
    with torch.no_grad():
        ours, theirs = _our_model(trained)(tokens), hf(tokens).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    # The weights are the node's global state of round 2, not the seeded init.
    assert not torch.equal(trained.weights["lm_head.weight"], Llama(trained.cfg).lm_head.weight)


@pytest.mark.timeout(120)
def test_auto_tokenizer_encodes_like_the_byte_tokenizer(exported: Path) -> None:
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(exported)
    ours = ByteTokenizer()
    raw = HFTokenizer(exported / "tokenizer.json", file_sha256(exported / "tokenizer.json"))
    for text in TEXTS:
        want = ours.encode(text)
        assert auto(text)["input_ids"] == want, text
        assert raw.encode(text) == want, text  # the `tokenizers` library alone, as a run would use the file
        assert auto.decode(want) == text
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (256, 257, 258)
    assert (raw.bos_id, raw.eos_id) == (ours.bos_id, ours.eos_id)
    assert auto.decode([104, 256, 105, 257, 258], skip_special_tokens=True) == "hi"


@pytest.mark.timeout(120)
def test_eval_of_the_state_and_of_its_export_agree(trained: Trained, exported: Path) -> None:
    common = ("--data-dir", trained.data_dir, "--device", "cpu", "--json")
    state = _cli("eval", trained.run_id[:8], "--manifest", trained.manifest, *common)
    assert state.exit_code == 0, state.output
    hf = _cli("eval", "--hf", exported, *common)
    assert hf.exit_code == 0, hf.output
    a, b = json.loads(state.output), json.loads(hf.output)
    assert math.isfinite(a["loss"]) and 0 < a["loss"] < math.log(259) + 1
    assert a["perplexity"] == pytest.approx(math.exp(a["loss"]), rel=1e-12)
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert a["data"] == b["data"] == "builtin://heldout"
    assert a["tokens"] == b["tokens"] > 0 and a["seq_len"] == trained.cfg.max_seq_len
    assert a["round"] == 2 and a["state_hash"] == trained.state_hash
    text = _cli("eval", "--hf", exported, "--data-dir", trained.data_dir, "--device", "cpu", "--batches", "2")
    assert text.exit_code == 0 and "perplexity" in text.output and "16 windows" in text.output


@pytest.mark.timeout(120)
def test_a_corrupt_checkpoint_is_skipped_then_refused(trained: Trained, tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    shutil.copytree(trained.data_dir, data_dir)
    ckpts = _checkpoints(data_dir, trained.run_id)
    _flip_byte(ckpts / "ckpt-00000002.safetensors", -5)
    before = sorted(p.name for p in ckpts.iterdir())
    args = ["export", trained.run_id, "--manifest", str(trained.manifest), "--data-dir", str(data_dir)]
    older = _cli(*args, "--out", tmp_path / "older")
    assert older.exit_code == 0, older.output
    assert "skipped" in older.output and "round 2" in older.output and "sha256" in older.output
    assert "exported round 1" in older.output
    _flip_byte(ckpts / "ckpt-00000001.json", 40)
    # The console script, as a user runs it: one line on stderr, exit 1, no traceback, nothing written.
    proc = subprocess.run(
        [*CLI, *args, "--out", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=90,
        env=clean_env(),
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "no checkpoint of run" in proc.stderr
    assert "round 2" in proc.stderr and "round 1" in proc.stderr
    assert not (tmp_path / "none").exists()
    # Read-only: the daemon's checkpoints are neither moved nor quarantined by an export.
    assert sorted(p.name for p in ckpts.iterdir()) == before
    state = _cli(
        "export",
        "--state",
        ckpts / "ckpt-00000002.safetensors",
        "--out",
        tmp_path / "s",
        "--data-dir",
        data_dir,
    )
    assert state.exit_code == 1 and "does not verify" in state.output and state.exception is not None
    assert isinstance(state.exception, SystemExit)


@pytest.mark.timeout(120)
def test_the_manifest_must_be_the_runs(trained: Trained, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    text = trained.manifest.read_text()
    other.write_text(text.replace('name = "tiny-builtin"', 'name = "another-run"'))
    wrong = _cli(
        "export",
        trained.run_id[:8],
        "--out",
        tmp_path / "a",
        "--manifest",
        other,
        "--data-dir",
        trained.data_dir,
    )
    assert wrong.exit_code == 1 and "pass its manifest" in wrong.output
    # The plain TOML names no researcher: it cannot be matched to the run, which the command says.
    plain = _cli("export", trained.run_id[:8], "--out", tmp_path / "b", "--data-dir", trained.data_dir)
    assert plain.exit_code == 0, plain.output
    assert "cannot be matched" in plain.output
    bigger = tmp_path / "big.toml"
    bigger.write_text(TINY.read_text().replace("dim = 128", "dim = 256"))
    misfit = _cli(
        "export",
        trained.run_id[:8],
        "--out",
        tmp_path / "c",
        "--manifest",
        bigger,
        "--data-dir",
        trained.data_dir,
    )
    assert misfit.exit_code == 1 and "does not fit" in misfit.output
    unknown = _cli("export", "abcdef", "--out", tmp_path / "d", "--data-dir", trained.data_dir)
    assert unknown.exit_code == 1 and trained.run_id[:16] in unknown.output  # lists the runs held


@pytest.mark.timeout(120)
def test_initial_state_files(tmp_path: Path) -> None:
    made = _cli("data", "init-state", TINY, "--out", tmp_path / "init.safetensors")
    assert made.exit_code == 0, made.output
    sha = made.output.split('sha256 = "')[1][:64]
    plain = _cli("export", "--state", tmp_path / "init.safetensors", "--out", tmp_path / "a")
    assert plain.exit_code == 0, plain.output
    assert "not verified" in plain.output and sha[:16] in plain.output
    named = tmp_path / f"{sha}.safetensors"
    shutil.copy(tmp_path / "init.safetensors", named)
    ok = _cli("eval", "--state", named, "--device", "cpu", "--batches", "1", "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["verified"] == "verified: its name is its hash"
    _flip_byte(named, -1)
    bad = _cli("export", "--state", named, "--out", tmp_path / "b")
    assert bad.exit_code == 1 and "hashes to" in bad.output and not (tmp_path / "b").exists()


@pytest.mark.timeout(60)
def test_the_output_directory_and_unsupported_configs(
    exported: Path, trained: Trained, tmp_path: Path
) -> None:
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    (crowded / "notes.txt").write_text("mine")
    result = _export(trained, crowded)
    assert result.exit_code == 1 and "notes.txt" in result.output
    assert sorted(p.name for p in crowded.iterdir()) == ["notes.txt"]
    again = _export(trained, exported)  # an earlier export is overwritten
    assert again.exit_code == 0, again.output
    config = json.loads((exported / "config.json").read_text())
    assert model_config_from_hf(config) == trained.cfg
    for change in (
        {"tie_word_embeddings": True},
        {"rope_scaling": {"rope_type": "llama3"}},
        {"model_type": "gpt2"},
    ):
        with pytest.raises(ExportError):
            model_config_from_hf({**config, **change})
    usage = _cli("eval", trained.run_id[:8], "--hf", exported)
    assert usage.exit_code == 2


@pytest.mark.timeout(60)
def test_a_run_on_an_hf_tokenizer_ships_its_tokenizer_json(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    # Any HF tokenizer.json will do; this one is the byte tokenizer's, loaded the way a run loads its file.
    source = tmp_path / "run-tokenizer.json"
    source.write_text(byte_tokenizer_json())
    tok = HFTokenizer(source, file_sha256(source))
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=259, max_seq_len=32)
    write_hf_dir(Llama(cfg, seed=3), tok, tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == source.read_bytes()
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<s>", "</s>")
    auto = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert auto("héllo")["input_ids"] == list("héllo".encode())
    model, back = load_hf_dir(tmp_path / "hf")
    assert isinstance(back, ByteTokenizer) and model.cfg == cfg


@pytest.mark.timeout(120)
def test_the_manifest_the_node_kept_is_used_and_checked(trained: Trained, tmp_path: Path) -> None:
    """A node keeps the run's signed manifest beside its checkpoints (`keep_manifest`, what the run service
    does at start); export then needs no --manifest, and refuses a kept file that is forged or another
    run's."""
    data_dir = tmp_path / "data"
    shutil.copytree(trained.data_dir, data_dir)
    keep_manifest(data_dir, trained.signed)
    kept = data_root(data_dir, trained.run_id) / "manifest.signed"
    assert kept.read_bytes() == trained.signed.to_bytes()
    assert not kept.with_name("manifest.signed.tmp").exists()
    ok = _cli("export", trained.run_id[:8], "--out", tmp_path / "a", "--data-dir", data_dir)
    assert ok.exit_code == 0, ok.output
    assert "cannot be matched" not in ok.output
    assert json.loads((tmp_path / "a" / "config.json").read_text())["hidden_size"] == trained.cfg.dim
    # Another run's manifest (another researcher), validly signed, under this run's directory.
    other = SignedManifest.sign(load_run_manifest(), Identity.generate())
    kept.write_bytes(other.to_bytes())
    wrong = _cli("export", trained.run_id[:8], "--out", tmp_path / "b", "--data-dir", data_dir)
    assert wrong.exit_code == 1 and "is the manifest of run" in wrong.output, wrong.output
    # The run's manifest with its signature's last byte changed.
    blob = bytearray(trained.signed.to_bytes())
    blob[-1] ^= 0x01
    kept.write_bytes(bytes(blob))
    forged = _cli("export", trained.run_id[:8], "--out", tmp_path / "c", "--data-dir", data_dir)
    assert forged.exit_code == 1 and "manifest.signed" in forged.output, forged.output
