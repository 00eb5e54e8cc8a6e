"""Compression of pseudo-gradients: int8 blockwise accuracy and error feedback, fp16, wire format, NaN."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from intellect.node.compression import (
    CompressedTensor,
    CompressionError,
    Fp16,
    Int8Blockwise,
    NoCompression,
    NonFiniteError,
    decompress,
    get_compressor,
)


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
        sent_sum += decompress(comp.compress("delta", x))
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
