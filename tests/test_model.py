"""LLaMA model: parameter counts, shapes, causality, deterministic init, HF-named safetensors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from intellect.node.engine.model import CONFIGS, Llama, ModelConfig, load_hf_safetensors, save_hf_safetensors
from safetensors.torch import load_file

torch.set_num_threads(1)

SMALL = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=50, max_seq_len=32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_param_count_matches_closed_form(name: str) -> None:
    cfg = CONFIGS[name]
    with torch.device("meta"):
        model = Llama(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_closed_form_matches_published_llama_counts() -> None:
    """The closed form against parameter counts published for real Llama checkpoints (untied embeddings)."""
    llama3_8b = ModelConfig(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256, max_seq_len=8192
    )
    llama2_7b = ModelConfig(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, vocab_size=32000, max_seq_len=4096
    )
    assert llama3_8b.num_params() == 8_030_261_248
    assert llama2_7b.num_params() == 6_738_415_616
    assert CONFIGS["1b"].num_params() == 1_100_048_384  # TinyLlama-1.1B
    # INTELLECT-1 is Llama-3-8B's block with 42 layers instead of 32.
    per_layer = (llama3_8b.num_params() - 2 * 128256 * 4096 - 4096) // 32
    assert CONFIGS["10b"].num_params() == 2 * 128256 * 4096 + 4096 + 42 * per_layer == 10_211_381_248


def test_named_config_sizes() -> None:
    # The names promise an order of magnitude; 10b is INTELLECT-1's exact shape.
    assert 0.5e6 < CONFIGS["tiny"].num_params() < 2e6
    assert 1.2e8 < CONFIGS["150m"].num_params() < 1.8e8
    assert 1.0e9 < CONFIGS["1b"].num_params() < 1.3e9
    ten = CONFIGS["10b"]
    assert (ten.n_layers, ten.dim, ten.n_heads, ten.n_kv_heads, ten.ffn_dim, ten.vocab_size) == (
        42, 4096, 32, 8, 14336, 128256,
    )  # fmt: skip
    assert 1.0e10 < ten.num_params() < 1.05e10


def test_forward_shapes_and_loss() -> None:
    model = Llama(CONFIGS["tiny"], seed=1)
    tokens = torch.randint(0, CONFIGS["tiny"].vocab_size, (3, 17))
    logits = model(tokens)
    assert logits.shape == (3, 17, CONFIGS["tiny"].vocab_size)
    loss = model.loss(tokens)
    # Untrained with std-0.02 init: close to the uniform cross-entropy ln(vocab).
    assert abs(float(loss.detach()) - math.log(CONFIGS["tiny"].vocab_size)) < 0.5
    with pytest.raises(ValueError):
        model(tokens[0])


def test_causal_mask() -> None:
    model = Llama(SMALL, seed=3).eval()
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, SMALL.vocab_size, (2, 20), generator=gen)
    b = a.clone()
    b[:, 12:] = (b[:, 12:] + 7) % SMALL.vocab_size
    with torch.no_grad():
        la, lb = model(a), model(b)
    assert torch.equal(la[:, :12], lb[:, :12]) or torch.allclose(la[:, :12], lb[:, :12], atol=1e-6)
    assert not torch.allclose(la[:, 12:], lb[:, 12:], atol=1e-3)


def test_init_is_deterministic_from_seed() -> None:
    a, b, c = Llama(SMALL, seed=7), Llama(SMALL, seed=7), Llama(SMALL, seed=8)
    for (name, pa), pb, pc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name
    # Thread count does not change the draw.
    torch.set_num_threads(2)
    try:
        d = Llama(SMALL, seed=7)
    finally:
        torch.set_num_threads(1)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), d.state_dict().values(), strict=True)
    )


def test_config_dict_round_trip_and_validation() -> None:
    for cfg in CONFIGS.values():
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    # The manifest's [model] table carries a "preset" label, which is not binding.
    assert ModelConfig.from_dict({**CONFIGS["tiny"].to_dict(), "preset": "tiny"}) == CONFIGS["tiny"]
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_dict({**SMALL.to_dict(), "n_layer": 3})
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=3, ffn_dim=8, vocab_size=10, max_seq_len=8)
    with pytest.raises(ValueError, match="dim"):
        ModelConfig(dim=65, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=8, vocab_size=10, max_seq_len=8)


def _hf_names(n_layers: int) -> set[str]:
    """Tensor names of transformers' LlamaForCausalLM (modeling_llama.py), untied embeddings."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        names |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        names |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
    return names


def _reference_hf_forward(t: dict[str, torch.Tensor], cfg: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    """HF Llama's math written out independently from the named tensors: explicit masked softmax,
    repeat_kv by expand, rotate-half RoPE with inv_freq = 1 / theta^(2i/d)."""

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps))

    b, n = tokens.shape
    hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.arange(n).float()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

    def rope(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = t["model.embed_tokens.weight"][tokens]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        h = rms(x, t[p + "input_layernorm.weight"])
        q = (h @ t[p + "self_attn.q_proj.weight"].T).view(b, n, nh, hd).transpose(1, 2)
        k = (h @ t[p + "self_attn.k_proj.weight"].T).view(b, n, nkv, hd).transpose(1, 2)
        v = (h @ t[p + "self_attn.v_proj.weight"].T).view(b, n, nkv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        rep = nh // nkv
        k = k[:, :, None].expand(b, nkv, rep, n, hd).reshape(b, nh, n, hd)
        v = v[:, :, None].expand(b, nkv, rep, n, hd).reshape(b, nh, n, hd)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, n, nh * hd)
        x = x + o @ t[p + "self_attn.o_proj.weight"].T
        h = rms(x, t[p + "post_attention_layernorm.weight"])
        g = F.silu(h @ t[p + "mlp.gate_proj.weight"].T) * (h @ t[p + "mlp.up_proj.weight"].T)
        x = x + g @ t[p + "mlp.down_proj.weight"].T
    return rms(x, t["model.norm.weight"]) @ t["lm_head.weight"].T


def test_hf_safetensors_round_trip_and_reference_forward(tmp_path: Path) -> None:
    model = Llama(SMALL, seed=5).eval()
    path = save_hf_safetensors(model, tmp_path)
    assert path == tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    assert set(tensors) == _hf_names(SMALL.n_layers)
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (
        SMALL.n_kv_heads * SMALL.head_dim,
        SMALL.dim,
    )
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    assert hf_cfg["architectures"] == ["LlamaForCausalLM"]
    assert hf_cfg["num_key_value_heads"] == SMALL.n_kv_heads and hf_cfg["tie_word_embeddings"] is False

    # The HF-layout tensors, run through an independent HF-math forward, give our logits.
    tokens = torch.randint(0, SMALL.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
        ref = _reference_hf_forward(tensors, SMALL, tokens)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)

    other = Llama(SMALL, seed=99)
    load_hf_safetensors(other, path)
    for name, value in model.state_dict().items():
        assert torch.equal(value, other.state_dict()[name]), name

    wrong = Llama(ModelConfig(**{**SMALL.to_dict(), "n_layers": 3}), seed=0)
    with pytest.raises(ValueError, match="missing"):
        load_hf_safetensors(wrong, path)
