"""Compression of pseudo-gradients: int8 blockwise accuracy and error feedback, fp16, wire format, NaN."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from intellect.node.engine.compression import (
    _CHUNK_VALUES,
    CompressedTensor,
    CompressionError,
    Fp16,
    Int8Blockwise,
    NoCompression,
    NonFiniteError,
    _int8_functional,
    decompress,
    get_compressor,
)

BENCH = Path(__file__).parent.parent / "bench" / "compression.py"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("shape", [(1000, 257), (4096,), (3, 5, 7), (1,)])
def test_int8_gaussian_error_under_one_percent(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    comp = Int8Blockwise(error_feedback=False)
    x = torch.randn(shape) * 0.01
    ct = comp.compress("x", x)
    assert ct.kind == "int8" and ct.shape == shape and ct.data.dtype == torch.int8
    assert ct.data.numel() == x.numel() and ct.scales.numel() == -(-x.numel() // comp.block)
    y = decompress(ct)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert _rel(y, x) < 0.01


def _naive_int8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: one block at a time, in the plainest torch (zero-padded last block)."""
    flat = x.reshape(-1).float()
    qs, scales = [torch.zeros(0, dtype=torch.int8)], [torch.zeros(0)]
    for start in range(0, flat.numel(), block):
        b = flat[start : start + block]
        absmax = b.abs().max()
        scales.append((absmax / 127.0).view(1))
        inv = 127.0 / absmax if absmax > 0 else torch.tensor(0.0)
        qs.append(torch.round(b * inv).to(torch.int8))
    return torch.cat(qs), torch.cat(scales)


@pytest.mark.parametrize(("numel", "block"), [(1000, 7), (777, 256), (512, 256), (5, 256), (0, 256)])
def test_int8_matches_a_naive_blockwise_reference(numel: int, block: int) -> None:
    torch.manual_seed(4)
    x = torch.randn(numel) * 3
    if numel > 300:
        x[256:300] = 0.0  # an all-zero stretch (a whole zero block for block 7)
    comp = Int8Blockwise(block=block, error_feedback=True)
    ct = comp.compress("x", x)
    q, scales = _naive_int8(x, block)
    assert torch.equal(ct.data, q) and torch.equal(ct.scales, scales)
    y = decompress(ct)
    expected = (q.float().view(-1)[:numel] * scales.repeat_interleave(block)[:numel]).view(x.shape)
    assert torch.equal(y, expected)
    # The residual is exactly what was lost: input minus what the receiver decodes.
    if numel:
        assert torch.equal(comp.residuals["x"], x - y)


@pytest.mark.parametrize("error_feedback", [False, True])
def test_chunked_kernel_equals_whole_tensor_kernel_across_chunks(error_feedback: bool) -> None:
    """Several chunks of the eager quantiser plus a tail block give the whole-tensor computation's bits."""
    torch.manual_seed(5)
    numel = 2 * _CHUNK_VALUES + 3 * 256 + 100
    x = torch.randn(numel)
    padded = torch.cat([x, torch.zeros(-numel % 256)])
    ref_q, ref_scales, ref_res = _int8_functional(padded, 256, True)
    comp = Int8Blockwise(block=256, error_feedback=error_feedback)
    ct = comp.compress("x", x)
    assert torch.equal(ct.data, ref_q[:numel]) and torch.equal(ct.scales, ref_scales)
    assert ref_res is not None
    if error_feedback:
        assert torch.equal(comp.residuals["x"], ref_res[:numel])
        # Round two adds the kept residual (in place, in our own buffer) and matches the reference again.
        x2 = torch.randn(numel)
        q2, s2, r2 = _int8_functional(torch.cat([x2 + ref_res[:numel], torch.zeros(-numel % 256)]), 256, True)
        ct2 = comp.compress("x", x2)
        assert torch.equal(ct2.data, q2[:numel]) and torch.equal(ct2.scales, s2)
        assert r2 is not None and torch.equal(comp.residuals["x"], r2[:numel])
    else:
        assert comp.residuals == {}


def test_compress_never_modifies_its_input() -> None:
    x = torch.randn(3 * 256 + 5)
    keep = x.clone()
    comp = Int8Blockwise()
    for _ in range(3):
        comp.compress("x", x)
    assert torch.equal(x, keep)


def test_int8_payload_is_about_a_quarter_of_fp32() -> None:
    ct = Int8Blockwise().compress("x", torch.randn(1 << 16))
    assert ct.nbytes / (4 << 16) < 0.26


def test_error_feedback_keeps_accumulated_error_bounded() -> None:
    torch.manual_seed(1)
    comp = Int8Blockwise(block=256, error_feedback=True)
    plain = Int8Blockwise(block=256, error_feedback=False)
    # A structured signal plus noise: without feedback, rounding bias accumulates over rounds.
    base = torch.randn(20_000) * 0.01
    sent_sum = torch.zeros_like(base)
    plain_sum = torch.zeros_like(base)
    input_sum = torch.zeros_like(base)
    residual_norms = []
    for _ in range(100):
        x = base + torch.randn_like(base) * 0.001
        input_sum += x
        target = x + comp.residuals.get("delta", torch.zeros_like(x))  # what this round quantises
        sent = decompress(comp.compress("delta", x))
        assert _rel(sent, target) < 0.01  # each round's quantisation error stays under 1%
        sent_sum += sent
        plain_sum += decompress(plain.compress("delta", x))
        residual_norms.append(float(comp.residuals["delta"].norm()))
    # With feedback, sum(sent) = sum(inputs) - final residual, exactly up to float rounding.
    torch.testing.assert_close(sent_sum + comp.residuals["delta"], input_sum, rtol=0, atol=1e-4)
    ef_err = _rel(sent_sum, input_sum)
    assert ef_err < 0.001
    assert ef_err < _rel(plain_sum, input_sum) / 10
    # The residual stays at the size of one round's quantisation error; it does not grow.
    assert max(residual_norms[50:]) < 2 * max(residual_norms[:10])


def test_error_feedback_state_round_trip() -> None:
    comp = Int8Blockwise()
    comp.compress("a", torch.randn(300))
    other = Int8Blockwise()
    other.load_state_dict(comp.state_dict())
    x = torch.randn(300)
    assert torch.equal(decompress(comp.compress("a", x)), decompress(other.compress("a", x)))
    comp.reset()
    assert comp.state_dict() == {}


def test_non_finite_input_drops_that_residual_and_later_rounds_work() -> None:
    comp = Int8Blockwise(block=64)
    comp.compress("a", torch.randn(1000))
    comp.compress("b", torch.randn(100))
    bad = torch.randn(1000)
    bad[999] = float("nan")
    with pytest.raises(NonFiniteError):
        comp.compress("a", bad)
    assert set(comp.residuals) == {"b"}  # "a" may have been partly overwritten: it is dropped, not kept
    assert all(bool(torch.isfinite(t).all()) for t in comp.state_dict().values())
    x = torch.randn(1000)
    assert _rel(decompress(comp.compress("a", x)), x) < 0.01


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("make", [Int8Blockwise, Fp16, NoCompression])
def test_non_finite_input_raises(bad: float, make: type) -> None:
    x = torch.randn(1000)
    x[517] = bad
    comp = make()
    with pytest.raises(NonFiniteError, match="'g'"):
        comp.compress("g", x)
    assert comp.state_dict() == {}  # nothing of a bad tensor leaks into the residuals


def test_fp16_exact_small_values_and_overflow_falls_back_to_fp32() -> None:
    comp = Fp16()
    x = torch.randn(100)
    ct = comp.compress("x", x)
    assert ct.kind == "fp16" and ct.data.dtype == torch.float16
    assert _rel(decompress(ct), x) < 1e-3
    big = torch.tensor([1.0, -70000.0, 3.0e5])
    ct = comp.compress("big", big)
    assert ct.kind == "none"
    assert torch.equal(decompress(ct), big)


def test_none_is_exact() -> None:
    x = torch.randn(4, 4, dtype=torch.float64)
    ct = NoCompression().compress("x", x)
    assert torch.equal(decompress(ct), x.float())


@pytest.mark.parametrize("name", ["int8", "int8_blockwise", "fp16", "none"])
def test_wire_round_trip(name: str) -> None:
    torch.manual_seed(2)
    x = torch.randn(33, 31)
    ct = get_compressor(name).compress("x", x)
    back = CompressedTensor.from_wire(ct.to_wire())
    assert back.kind == ct.kind and back.shape == ct.shape and back.block == ct.block
    assert torch.equal(decompress(back), decompress(ct))


def test_wire_rejects_malformed() -> None:
    wire = Int8Blockwise().compress("x", torch.randn(1000)).to_wire()
    with pytest.raises(CompressionError, match="header"):
        CompressedTensor.from_wire(wire[:10])
    with pytest.raises(CompressionError, match="magic"):
        CompressedTensor.from_wire(b"XXXX" + wire[4:])
    with pytest.raises(CompressionError):
        CompressedTensor.from_wire(wire[:-1])
    with pytest.raises(CompressionError):
        CompressedTensor.from_wire(wire + b"\x00")
    with pytest.raises(CompressionError, match="limit"):
        CompressedTensor.from_wire(wire, max_numel=999)
    # A header claiming a huge shape is refused before any allocation.
    huge = struct.pack("<4sBBIQQ", b"ICT1", 2, 1, 256, 1 << 40, 1 << 34) + struct.pack("<Q", 1 << 40)
    with pytest.raises(CompressionError, match="limit"):
        CompressedTensor.from_wire(huge)
    with pytest.raises(CompressionError, match="unknown"):
        get_compressor("zstd")


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=200))
def test_wire_fuzz_never_crashes(data: bytes) -> None:
    try:
        ct = CompressedTensor.from_wire(b"ICT1" + data)
    except CompressionError:
        return
    assert decompress(ct).numel() == ct.numel


def test_compiled_path_matches_eager() -> None:
    # compile=True must give the same payload as eager where a compiler exists, and fall back where not;
    # tiny tensor so compiling (once per process) stays cheap.
    torch.manual_seed(3)
    x = torch.randn(2000)
    eager = Int8Blockwise(error_feedback=False).compress("x", x)
    comp = Int8Blockwise(error_feedback=False, compile=True).compress("x", x)
    # Fused arithmetic may round a value sitting exactly on .5 the other way: allow one step, rarely.
    diff = (comp.data.int() - eager.data.int()).abs()
    assert int(diff.max()) <= 1 and int(diff.sum()) <= 5
    torch.testing.assert_close(comp.scales, eager.scales)


def test_bench_json_schema() -> None:
    """`bench/compression.py --json` ends with one JSON object {NAME: {"gbps", "rel_l2"}} (tiny input)."""
    out = subprocess.run(
        [sys.executable, str(BENCH), "--json", "--numel", "50000", "--repeat", "1", "--no-compile"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"ours_int8", "hivemind_uniform8bit", "hivemind_quantile8bit"} <= set(results)
    for name, entry in results.items():
        assert set(entry) == {"gbps", "rel_l2"}, name
        assert isinstance(entry["gbps"], float) and entry["gbps"] > 0, name
        assert isinstance(entry["rel_l2"], float) and 0 <= entry["rel_l2"] < 0.05, name
    assert results["ours_int8"]["rel_l2"] < 0.01
