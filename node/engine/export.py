"""A global state as a Hugging Face Llama directory, and back; and a model's loss on held-out windows.

The global state (`OuterOptimizer.state_dict`) holds the fp32 weights under ``outer.global.<name>``, and
`<name>` is already HF's `LlamaForCausalLM` parameter name (`engine.model`). Exporting is therefore: keep
the weights, drop the outer optimizer's momentum and step, and write HF's directory layout:

* ``config.json``: `ModelConfig.to_hf_config` plus the tokenizer's BOS/EOS/PAD ids, because transformers'
  defaults (1 and 2, Llama-2's) name byte values of our byte tokenizer, and `generate` would stop on them;
  ``generation_config.json`` repeats the ids, where transformers 5 looks for them;
* ``model.safetensors``: `save_hf_safetensors`;
* the tokenizer. A run on an HF tokenizer has a ``tokenizer.json``, copied byte for byte. The built-in
  `ByteTokenizer` has no file, so `byte_tokenizer_json` builds one with the `tokenizers` library: a BPE
  without merges over GPT-2's byte-level alphabet, whose vocabulary maps the character standing for byte
  b to id b, so any text gives its UTF-8 bytes as ids. BOS, EOS and PAD (256-258) are plain vocabulary
  entries, not "added tokens": the `tokenizers` library matches added tokens inside the text, so a
  document containing "</s>" would give one id where `ByteTokenizer` gives four. transformers registers
  them as special tokens all the same, so ``tokenizer_config.json`` sets ``split_special_tokens``, which
  keeps it from matching them in text too.

`load_hf_dir` reads such a directory back into our `Llama` (`load_hf_safetensors`) and refuses a config
that our model does not implement (tied embeddings, biases, RoPE scaling), instead of loading it wrong.

`evaluate` measures the mean next-token loss, weighted by tokens, over held-out batches
(`losscheck.check_batches` picks the windows), and its perplexity exp(loss).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import torch
from intellect.node.engine.model import Llama, ModelConfig, load_hf_safetensors, save_hf_safetensors
from intellect.node.engine.outer import GLOBAL_PREFIX
from intellect.node.engine.tokenizer import ByteTokenizer, HFTokenizer, file_sha256

#: The files an export writes (a directory holding only these may be exported into again).
EXPORT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
#: Names of `ByteTokenizer`'s special ids in the exported tokenizer (Llama-2's spelling).
BYTE_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}

#: The tokenizers a run can have (`load_tokenizer`).
RunTokenizer: TypeAlias = ByteTokenizer | HFTokenizer


class ExportError(ValueError):
    """A state or an HF directory cannot be exported or loaded as our Llama (the message says why)."""


# ---- the byte tokenizer as tokenizer.json ---------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → character table, which the `ByteLevel` pre-tokenizer applies to the UTF-8 bytes:
    printable Latin-1 bytes stand for themselves, the others for characters from U+0100 on."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer_json() -> str:
    """A `tokenizer.json` that encodes any text to the ids `ByteTokenizer.encode` gives (see the module
    docstring for why the special tokens are vocabulary entries)."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers

    tok = ByteTokenizer()
    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    vocab.update({BYTE_SPECIALS["bos_token"]: tok.bos_id, BYTE_SPECIALS["eos_token"]: tok.eos_id})
    vocab[BYTE_SPECIALS["pad_token"]] = tok.pad_id
    out = HFTok(models.BPE(vocab=vocab, merges=[]))
    # No prefix space and no regex split: the text's bytes, nothing added, nothing removed.
    out.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    out.decoder = decoders.ByteLevel()
    return str(out.to_str(pretty=True))


def is_byte_tokenizer(path: Path) -> bool:
    """True when `path` is the tokenizer.json `byte_tokenizer_json` writes (compared as JSON)."""
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")) == json.loads(byte_tokenizer_json()))
    except (OSError, ValueError):
        return False


def tokenizer_files(tok: RunTokenizer, max_len: int) -> dict[str, str]:
    """The tokenizer's files of an export, by name (`tokenizer.json` of an HF tokenizer is copied apart)."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
    files: dict[str, str] = {}
    specials: dict[str, str | None]
    if isinstance(tok, ByteTokenizer):
        specials = {**BYTE_SPECIALS}
        config.update(specials, split_special_tokens=True, add_bos_token=False, add_eos_token=False)
        files["tokenizer.json"] = byte_tokenizer_json()
    else:
        from tokenizers import Tokenizer as HFTok

        vocab = HFTok.from_file(str(tok.path))
        specials = {
            key: vocab.id_to_token(i)
            for key, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id))
            if i is not None
        }
        config.update(specials)
    files["tokenizer_config.json"] = json.dumps(config, indent=2) + "\n"
    files["special_tokens_map.json"] = json.dumps(specials, indent=2) + "\n"
    return files


# ---- weights --------------------------------------------------------------------------------------------


def weights_from_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The global weights of an outer state, by parameter name (momentum and step dropped)."""
    weights = {k[len(GLOBAL_PREFIX) :]: t for k, t in state.items() if k.startswith(GLOBAL_PREFIX)}
    if not weights:
        raise ExportError(f"not a global state: no tensor is named {GLOBAL_PREFIX}<parameter>")
    return weights


def model_from_weights(cfg: ModelConfig, weights: Mapping[str, torch.Tensor]) -> Llama:
    """A `Llama` of shape `cfg` holding `weights` (fp32, finite, exactly its parameters), without a
    second copy: the model is built on the meta device and the tensors are assigned to it."""
    with torch.device("meta"):
        model = Llama(cfg)
    own = model.state_dict()
    if own.keys() != weights.keys():
        diff = sorted(own.keys() ^ weights.keys())
        raise ExportError(f"the state's tensors are not this model's: {len(diff)} differ, e.g. {diff[0]!r}")
    for name, t in weights.items():
        if t.shape != own[name].shape:
            raise ExportError(f"{name} has shape {tuple(t.shape)}, the model's is {tuple(own[name].shape)}")
        if t.dtype != torch.float32 or not bool(torch.isfinite(t).all()):
            raise ExportError(f"{name} is not finite fp32 ({t.dtype})")
    model.load_state_dict({n: t.to("cpu") for n, t in weights.items()}, strict=True, assign=True)
    return model.eval()


# ---- the HF directory -----------------------------------------------------------------------------------


def hf_config(cfg: ModelConfig, tok: RunTokenizer) -> dict[str, Any]:
    """`config.json`: the model's HF config with the tokenizer's special ids."""
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    if isinstance(tok, ByteTokenizer):
        ids["pad_token_id"] = tok.pad_id
    return {**cfg.to_hf_config(), **{k: v for k, v in ids.items() if v is not None}}


def check_out_dir(out: Path) -> None:
    """Refuse an output path that is a file, or a directory holding anything but an earlier export."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES)
        if others:
            raise ExportError(f"{out} holds other files ({', '.join(others[:3])}): choose a new directory")


def write_hf_dir(model: Llama, tok: RunTokenizer, out: Path) -> list[Path]:
    """Write the HF Llama directory of `model` and `tok` to `out` (see `check_out_dir`); the files."""
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(model.cfg, tok)
    texts = {
        "config.json": json.dumps(config, indent=2) + "\n",
        "generation_config.json": json.dumps(
            {k: v for k, v in config.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")},
            indent=2,
        )
        + "\n",
        **tokenizer_files(tok, model.cfg.max_seq_len),
    }
    if isinstance(tok, HFTokenizer):
        shutil.copyfile(tok.path, out / "tokenizer.json")
    for name, text in texts.items():
        (out / name).write_text(text, encoding="utf-8")
    weights = save_hf_safetensors(model, out / "model.safetensors")
    # safetensors creates its file 0600; an export is for sharing, so it gets the umask's mode as the rest.
    shutil.copymode(out / "config.json", weights)
    return sorted(out / name for name in EXPORT_FILES if (out / name).exists())


def _rope_theta(hf: Mapping[str, Any]) -> float:
    """RoPE base of an HF config (transformers 5 nests it in `rope_parameters`); plain RoPE only."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise ExportError(f"RoPE type {kind!r}: our model implements plain RoPE only")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """The `ModelConfig` of an HF Llama `config.json`; ExportError for what our `Llama` does not do."""
    if hf.get("model_type") != "llama":
        raise ExportError(f"model_type {hf.get('model_type')!r}: only llama loads into our model")
    unsupported = [
        key
        for key, ok in (
            ("tie_word_embeddings", not hf.get("tie_word_embeddings", False)),
            ("attention_bias", not hf.get("attention_bias", False)),
            ("mlp_bias", not hf.get("mlp_bias", False)),
            ("hidden_act", hf.get("hidden_act", "silu") == "silu"),
        )
        if not ok
    ]
    if unsupported:
        raise ExportError(f"our model does not implement this config's {', '.join(unsupported)}")
    try:
        heads = int(hf["num_attention_heads"])
        cfg = ModelConfig(
            dim=int(hf["hidden_size"]),
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or heads),
            ffn_dim=int(hf["intermediate_size"]),
            vocab_size=int(hf["vocab_size"]),
            max_seq_len=int(hf["max_position_embeddings"]),
            rope_theta=_rope_theta(hf),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            init_std=float(hf.get("initializer_range", 0.02)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"config.json: {e}") from None
    if hf.get("head_dim") not in (None, cfg.head_dim):
        raise ExportError(f"head_dim {hf['head_dim']} is not hidden_size / num_attention_heads")
    return cfg


def load_hf_dir(path: Path) -> tuple[Llama, RunTokenizer]:
    """Our `Llama` and tokenizer from an HF Llama directory (an export, or any plain Llama checkpoint in
    one safetensors file); the byte tokenizer when its tokenizer.json is the one an export writes."""
    try:
        hf = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} has no readable config.json: {e}") from None
    model = Llama(model_config_from_hf(hf))
    try:
        load_hf_safetensors(model, path)
    except ValueError as e:
        raise ExportError(str(e)) from None
    except Exception as e:  # safetensors raises its own error type for a malformed file
        raise ExportError(f"{path / 'model.safetensors'}: {e}") from None
    tok_path = path / "tokenizer.json"
    if not tok_path.is_file():
        raise ExportError(f"{path} has no tokenizer.json")
    tok: RunTokenizer = (
        ByteTokenizer() if is_byte_tokenizer(tok_path) else HFTokenizer(tok_path, file_sha256(tok_path))
    )
    return model.eval(), tok


# ---- evaluation -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalResult:
    """Mean next-token cross-entropy (nats) over every predicted token of the batches."""

    loss: float
    #: Tokens predicted (each window of T+1 tokens predicts T).
    tokens: int
    #: Windows evaluated.
    windows: int

    @property
    def perplexity(self) -> float:
        """exp(loss); infinite where that overflows a float."""
        return math.exp(self.loss) if self.loss < 700 else math.inf


def evaluate(model: Llama, batches: Iterable[torch.Tensor], device: torch.device) -> EvalResult:
    """The loss of `model` on `batches` [B, T+1], weighted by tokens (the last batch may be smaller)."""
    model.to(device).eval()
    total, tokens, windows = 0.0, 0, 0
    with torch.no_grad():
        for batch in batches:
            if int(batch.max()) >= model.cfg.vocab_size:  # the tokenizer is not the model's: no IndexError
                raise ExportError(f"token id {int(batch.max())} is beyond the model's {model.cfg.vocab_size}")
            n = batch.shape[0] * (batch.shape[1] - 1)
            total += float(model.loss(batch.to(device))) * n
            tokens += n
            windows += batch.shape[0]
    if not tokens:
        raise ExportError("no held-out window to evaluate on")
    return EvalResult(total / tokens, tokens, windows)


__all__ = [
    "BYTE_SPECIALS",
    "EXPORT_FILES",
    "EvalResult",
    "ExportError",
    "RunTokenizer",
    "byte_tokenizer_json",
    "check_out_dir",
    "evaluate",
    "hf_config",
    "is_byte_tokenizer",
    "load_hf_dir",
    "model_config_from_hf",
    "model_from_weights",
    "tokenizer_files",
    "weights_from_state",
    "write_hf_dir",
]
