"""A LLaMA-3 style decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention) with named configs.

Module and parameter names follow Hugging Face's `LlamaForCausalLM` exactly (`model.embed_tokens`,
`model.layers.{i}.self_attn.q_proj`, …, `model.norm`, `lm_head`), so `state_dict()` *is* the HF
checkpoint layout and `save_hf_safetensors` needs no renaming. Rotary embeddings use HF's "rotate half"
convention (the first and second halves of each head are the pair), not Meta's interleaved one: HF's
conversion script permutes Meta's q/k weights into this layout, so our q/k weights load into
`LlamaForCausalLM` unchanged and produce the same logits.

Every peer of a run must start from identical weights: `Llama(cfg, seed=…)` initialises every tensor from
one CPU `torch.Generator` in a fixed order, independent of device and thread count.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: Vocabulary of `ByteTokenizer`: 256 byte values + BOS, EOS, PAD (kept here so `tiny` needs no import).
BYTE_VOCAB_SIZE = 259


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the decoder. Field names mirror HF's `LlamaConfig` where one exists (see `to_hf_config`)."""

    #: Model width (HF `hidden_size`).
    dim: int
    #: Number of decoder blocks.
    n_layers: int
    #: Attention heads for queries.
    n_heads: int
    #: Key/value heads (grouped-query attention); must divide `n_heads`.
    n_kv_heads: int
    #: SwiGLU hidden width (HF `intermediate_size`).
    ffn_dim: int
    #: Vocabulary size; must match the run's tokenizer.
    vocab_size: int
    #: Longest sequence the run trains on (HF `max_position_embeddings`).
    max_seq_len: int
    #: RoPE base frequency.
    rope_theta: float = 500000.0
    #: RMSNorm epsilon.
    norm_eps: float = 1e-5
    #: Standard deviation of the normal init of linear and embedding weights.
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim: {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads: {self.n_kv_heads} does not divide n_heads {self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError("dim / n_heads must be even for rotary embeddings")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def num_params(self) -> int:
        """Closed-form parameter count (untied input and output embeddings, no biases)."""
        kv_dim = self.n_kv_heads * self.head_dim
        attn = 2 * self.dim * self.dim + 2 * self.dim * kv_dim  # q, o ; k, v
        mlp = 3 * self.dim * self.ffn_dim  # gate, up, down
        norms = 2 * self.dim
        return 2 * self.vocab_size * self.dim + self.n_layers * (attn + mlp + norms) + self.dim

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the manifest (ints and floats only)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown keys are an error naming the key (a typo must not pass)."""
        known = {f.name for f in dataclasses.fields(cls)}
        # "preset" is the manifest's label for people (e.g. "tiny"); the dims are what binds.
        unknown = sorted(set(data) - known - {"preset"})
        if unknown:
            raise ValueError(f"model config: unknown keys {unknown}")
        values = {k: v for k, v in data.items() if k != "preset"}
        for name in ("rope_theta", "norm_eps", "init_std"):
            if name in values:
                values[name] = float(values[name])
        try:
            return cls(**values)
        except TypeError as e:
            raise ValueError(f"model config: {e}") from None

    def to_hf_config(self) -> dict[str, Any]:
        """The `config.json` of an equivalent HF `LlamaForCausalLM`."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.norm_eps,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "initializer_range": self.init_std,
            "torch_dtype": "float32",
        }


#: Named configs. `tiny` trains on two CPU cores in minutes; `10b` is INTELLECT-1's shape.
CONFIGS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, vocab_size=BYTE_VOCAB_SIZE, max_seq_len=128
    ),
    # ~142M parameters: GPT-2-small width and depth with GQA and the Llama-2 vocabulary (OpenDiLoCo's
    # "150m" is wider, 1024 x 12 with a 4096 MLP, ~267M counting both embeddings).
    "150m": ModelConfig(
        dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2688, vocab_size=32000, max_seq_len=1024
    ),
    # TinyLlama-1.1B's shape (also OpenDiLoCo's "1b"): 1,100,048,384 parameters.
    "1b": ModelConfig(
        dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, vocab_size=32000, max_seq_len=2048
    ),
    # INTELLECT-1 (Llama-3-8B's block, 42 layers, Llama-3 vocabulary): 10,211,381,248 parameters.
    "10b": ModelConfig(
        dim=4096, n_layers=42, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256, max_seq_len=8192
    ),
}


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 (as HF's LlamaRMSNorm), scaled by a learned weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, head_dim] in HF's layout (frequencies repeated over the two halves)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by position (HF's rotate-half convention)."""
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:
            # Query head i reads KV head i // rep, as HF's repeat_kv (works on every torch >= 2.3,
            # unlike SDPA's enable_gqa).
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    """HF's `LlamaModel`: embeddings, blocks, final norm (named so state_dict keys match HF)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # An explicit (uninitialised) weight skips nn.Embedding's own normal_ init: `Llama.init_weights`
        # overwrites it anyway, and on the meta device that init costs ~10 s of lazy prims imports.
        empty = torch.empty(cfg.vocab_size, cfg.dim)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=empty)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class Llama(nn.Module):
    """The decoder with an untied LM head. `forward(tokens[B, T]) -> logits[B, T, vocab]`."""

    def __init__(self, cfg: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = LlamaBody(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic init from `seed`: identical on every peer, device and thread count.

        Values are drawn on the CPU from one generator in `named_parameters()` order and then copied, so
        a CUDA peer and a CPU peer get bit-identical weights. Residual output projections (o_proj,
        down_proj) get std / sqrt(2 * n_layers) (GPT-2/Llama practice, keeps the residual stream's
        variance independent of depth). Parameters on the `meta` device are left alone.
        """
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed))
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
                continue
            s = (
                std / math.sqrt(2 * self.cfg.n_layers)
                if name.endswith(("o_proj.weight", "down_proj.weight"))
                else std
            )
            p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, s, generator=gen))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        t = tokens.shape[1]
        x = self.model.embed_tokens(tokens)
        cos, sin = rope_cos_sin(t, self.cfg.head_dim, self.cfg.rope_theta, x.device, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of `tokens[B, T+1]` (inputs [:, :-1], targets [:, 1:])."""
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def hf_tensors(model: Llama) -> dict[str, torch.Tensor]:
    """The model's tensors under HF Llama names, contiguous and on the CPU (detached)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_hf_safetensors(model: Llama, path: str | Path) -> Path:
    """Write the weights as one safetensors file with HF Llama names (and `format: pt` metadata).

    If `path` is a directory, writes `model.safetensors` and HF's `config.json` into it, which is the
    layout `LlamaForCausalLM.from_pretrained(dir)` opens.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir():
        (path / "config.json").write_text(json.dumps(model.cfg.to_hf_config(), indent=2) + "\n")
        path = path / "model.safetensors"
    save_file(hf_tensors(model), str(path), metadata={"format": "pt"})
    return path


def load_hf_safetensors(model: Llama, path: str | Path) -> None:
    """Load HF Llama-named weights into `model`; missing, extra or mis-shaped tensors are an error."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    tensors = load_file(str(path))
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        raise ValueError(
            f"{path}: tensor names differ from the model: missing {missing[:5]}, extra {extra[:5]}"
        )
    for name, value in tensors.items():
        if value.shape != own[name].shape:
            raise ValueError(
                f"{path}: {name} has shape {tuple(value.shape)}, model has {tuple(own[name].shape)}"
            )
    model.load_state_dict(tensors, strict=True)
    log.debug("loaded %d tensors from %s", len(tensors), path)
