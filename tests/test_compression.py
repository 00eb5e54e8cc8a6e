"""Compression of pseudo-gradients: int8/int4/int2/int1 blockwise accuracy and error feedback, fp16, wire
format, NaN, and the receivers' error bound of the 4-, 2- and 1-bit codecs."""

from __future__ import annotations

import asyncio
import json
import math
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
    Int1Blockwise,
    Int2Blockwise,
    Int4Blockwise,
    Int8Blockwise,
    NoCompression,
    NonFiniteError,
    _int8_functional,
    decompress,
    get_compressor,
)
from intellect.node.engine.robust import weighted_mean
from intellect.node.net.allreduce import butterfly_allreduce, get_payload_codec
from test_allreduce import _Planes, _spec

BENCH = Path(__file__).parent.parent / "bench" / "compression.py"
PROTOCOL_DOC = Path(__file__).parent.parent / "docs" / "protocol.md"


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
@pytest.mark.parametrize(
    "make", [Int8Blockwise, Int4Blockwise, Int2Blockwise, Int1Blockwise, Fp16, NoCompression]
)
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


@pytest.mark.parametrize("name", ["int8", "int8_blockwise", "int4", "int2", "int1", "fp16", "none"])
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
    """`bench/compression.py --json` ends with one JSON object {NAME: {"gbps", "rel_l2", "ratio"}} (tiny
    input)."""
    out = subprocess.run(
        [sys.executable, str(BENCH), "--json", "--numel", "50000", "--repeat", "1", "--no-compile"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"ours_int8", "ours_int4", "ours_int2", "ours_int1", "hivemind_uniform8bit"} <= set(results)
    assert "hivemind_quantile8bit" in results
    for name, entry in results.items():
        assert set(entry) == {"gbps", "rel_l2", "ratio"}, name
        assert isinstance(entry["gbps"], float) and entry["gbps"] > 0, name
        limit = {"ours_int4": 0.15, "ours_int2": 0.4, "ours_int1": 0.7}.get(name, 0.05)
        assert isinstance(entry["rel_l2"], float) and 0 <= entry["rel_l2"] < limit, name
        assert isinstance(entry["ratio"], float) and 1 <= entry["ratio"] < 32.5, name
    assert results["ours_int8"]["rel_l2"] < 0.01
    assert results["ours_int4"]["ratio"] > 7.5 and results["ours_int2"]["ratio"] > 14.5
    assert results["ours_int1"]["ratio"] > 27


# --- int4, int2 and int1 ------------------------------------------------------------------------------

LOWBIT = [Int4Blockwise, Int2Blockwise, Int1Blockwise]
#: Bits a value, and the relative L2 error each may make on Gaussian data (near the optimum of each).
BITS = {"int4": 4, "int2": 2, "int1": 1}
GAUSS_ERR = {"int4": 0.13, "int2": 0.36, "int1": 0.65}


def _blocks(x: torch.Tensor, block: int) -> list[torch.Tensor]:
    return list(x.reshape(-1).double().split(block)) if x.numel() else []


@pytest.mark.parametrize("shape", [(1000, 257), (4096,), (3, 5, 7), (1,), (0,)])
@pytest.mark.parametrize("make", LOWBIT)
def test_lowbit_round_trip_within_the_theoretical_bound(shape: tuple[int, ...], make: type) -> None:
    """int4: every value within half a step (absmax / 14) of its block; int2: the levels are ±s, ±3s with
    s = max(RMS / 2, absmax / 6) of the block, every value at the nearest one; int1: ±s with s = the
    block's RMS, the sign of each value (+ for 0); Gaussian error near the optimum of each."""
    torch.manual_seed(6)
    comp = make(error_feedback=False)
    x = torch.randn(shape) * 0.01
    ct = comp.compress("x", x)
    per = 8 // BITS[comp.kind]
    assert ct.kind == comp.kind and ct.shape == shape and ct.data.dtype == torch.uint8
    assert ct.data.numel() == -(-x.numel() // per) and ct.scales.numel() == -(-x.numel() // comp.block)
    y = decompress(ct)
    assert y.shape == x.shape and y.dtype == torch.float32
    for xb, yb, scale in zip(_blocks(x, comp.block), _blocks(y, comp.block), ct.scales.tolist(), strict=True):
        if comp.kind == "int4":
            assert scale == pytest.approx(float(xb.abs().max()) / 7, rel=1e-6)
            assert float((xb - yb).abs().max()) <= scale / 2 * (1 + 1e-5)
        elif comp.kind == "int1":
            assert scale == pytest.approx(float(xb.pow(2).mean().sqrt()), rel=1e-5)
            assert torch.equal(yb, torch.where(xb >= 0, 1.0, -1.0).double() * scale)
        else:
            expected = max(float(xb.pow(2).mean().sqrt()) / 2, float(xb.abs().max()) / 6)
            assert scale == pytest.approx(expected, rel=1e-5)
            q = yb / scale
            assert set(q.round().abs().unique().tolist()) <= {1.0, 3.0}
            torch.testing.assert_close(q, q.round(), rtol=0, atol=1e-5)
            # Nearest level: inside ±2s the inner level ±s, at or beyond it the outer ±3s.
            assert torch.equal(q.abs().round() == 3, xb.abs() >= 2 * scale * (1 - 1e-6))
            assert bool((torch.sign(q) == torch.where(xb >= 0, 1.0, -1.0)).all())
    if x.numel() > 1000:
        assert _rel(y, x) < GAUSS_ERR[comp.kind]


@pytest.mark.parametrize("numel", [1, 2, 3, 5, 7, 255, 256, 257, 513, 1001])
@pytest.mark.parametrize("block", [7, 256])
@pytest.mark.parametrize("make", LOWBIT)
def test_lowbit_odd_lengths_and_the_last_partial_block(numel: int, block: int, make: type) -> None:
    torch.manual_seed(numel)
    x = torch.randn(numel) * 3
    comp = make(block=block, error_feedback=True)
    ct = comp.compress("x", x)
    wire = ct.to_wire()
    back = CompressedTensor.from_wire(wire)
    y = decompress(back)
    assert torch.equal(y, decompress(ct)) and torch.equal(back.data, ct.data)
    # The residual is exactly what was lost, also in the partial last block and the padded last byte.
    assert torch.equal(comp.residuals["x"], x - y)
    # Unused bits of the last byte are zero, and the partial block's scale is over its own values only.
    bits = BITS[comp.kind]
    used = numel % (8 // bits)
    assert not used or int(ct.data[-1]) >> (bits * used) == 0
    tail = x[numel // block * block :] if numel % block else x[-block:]
    absmax, rms = float(tail.abs().max()), float(tail.double().pow(2).mean().sqrt())
    expected = {4: absmax / 7, 2: max(rms / 2, absmax / 6), 1: rms}[bits]
    assert float(ct.scales[-1]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("make", LOWBIT)
def test_lowbit_is_deterministic(make: type) -> None:
    """Same inputs, fresh compressors: bit-identical bytes, round after round with error feedback, also
    across the quantiser's chunk boundaries and for ties (integers: x = 2s, x / absmax × 7 = n + 0.5)."""
    torch.manual_seed(7)
    xs = [torch.randn(2 * _CHUNK_VALUES + 300) for _ in range(3)]
    xs.append(torch.randint(-4, 5, (3000,)).float())
    a, b = make(), make()
    for i, x in enumerate(xs):
        assert a.compress(f"t{i}", x).to_wire() == b.compress(f"t{i}", x.clone()).to_wire()
        assert a.compress(f"t{i}", x).to_wire() == b.compress(f"t{i}", x.clone()).to_wire()
    ties = torch.tensor([1.0, -1.0, 0.0, -0.0, 0.5, -0.5, 1 / 14, 3 / 14] * 32)
    assert make().compress("t", ties).to_wire() == make().compress("t", ties).to_wire()


@pytest.mark.parametrize("make", LOWBIT)
def test_lowbit_wire_rejects_malformed(make: type) -> None:
    wire = make().compress("x", torch.randn(1001)).to_wire()
    head = struct.Struct("<4sBBIQQ")
    magic, code, ndim, block, n_data, n_scales = head.unpack_from(wire)
    body = wire[head.size + 8 * ndim :]
    shape = wire[head.size : head.size + 8 * ndim]
    assert CompressedTensor.from_wire(wire).kind == make.kind
    with pytest.raises(CompressionError, match="header says"):
        CompressedTensor.from_wire(wire[:-1])  # truncated
    with pytest.raises(CompressionError, match="header"):
        CompressedTensor.from_wire(wire[:20])
    with pytest.raises(CompressionError, match="scales length"):  # one scale too few, bytes consistent
        CompressedTensor.from_wire(
            head.pack(magic, code, ndim, block, n_data, n_scales - 4) + shape + body[:-4]
        )
    with pytest.raises(CompressionError, match="scales length"):  # one scale too many
        extra = struct.pack("<f", 1.0)
        CompressedTensor.from_wire(
            head.pack(magic, code, ndim, block, n_data, n_scales + 4) + shape + body + extra
        )
    with pytest.raises(CompressionError, match="data length"):  # numel's packing needs n_data bytes exactly
        CompressedTensor.from_wire(
            head.pack(magic, code, ndim, block, n_data + 1, n_scales) + shape + body + b"\0"
        )
    with pytest.raises(CompressionError, match="block"):
        CompressedTensor.from_wire(head.pack(magic, code, ndim, 0, n_data, n_scales) + shape + body)
    with pytest.raises(CompressionError, match="limit"):
        CompressedTensor.from_wire(wire, max_numel=1000)
    # An absurd shape is refused from the header alone, before anything of its size is allocated.
    huge = head.pack(magic, code, 2, 256, 1 << 40, 1 << 34) + struct.pack("<2Q", 1 << 40, 1 << 40)
    with pytest.raises(CompressionError, match="limit"):
        CompressedTensor.from_wire(huge)
    data = bytearray(wire)
    start = head.size + 8 * ndim
    scales_at = start + n_data
    for bad_scale, match in ((float("nan"), "non-finite"), (-1.0, "outside"), (2.0**101, "outside")):
        evil = bytearray(data)
        struct.pack_into("<f", evil, scales_at, bad_scale)
        with pytest.raises(CompressionError, match=match):
            CompressedTensor.from_wire(evil)
    evil = bytearray(data)
    evil[start + n_data - 1] |= 0x80  # 1001 values: the last byte has unused high bits
    with pytest.raises(CompressionError, match="padding"):
        CompressedTensor.from_wire(evil)
    if make is Int4Blockwise:
        for nibble in (0x0F, 0xF0):  # code 0 (q = -8) in the low or high half of a byte
            evil = bytearray(data)
            evil[start] &= nibble
            with pytest.raises(CompressionError, match="invalid code"):
                CompressedTensor.from_wire(evil)


@pytest.mark.parametrize("make", LOWBIT)
def test_lowbit_refuses_values_beyond_its_scale_range_and_keeps_working(make: type) -> None:
    comp = make(error_feedback=True)
    comp.compress("a", torch.randn(1000))
    big = torch.randn(1000)
    big[3] = 3e38  # finite, but its block's scale would pass 2^100
    with pytest.raises(NonFiniteError, match="'a'"):
        comp.compress("a", big)
    assert comp.state_dict() == {}
    x = torch.randn(1000)
    assert _rel(decompress(comp.compress("a", x)), x) < GAUSS_ERR[comp.kind] * 1.1
    # Small and subnormal values are fine (and an all-zero block has scale 0).
    tiny = torch.tensor([1e-38, -5e-39, 0.0, 2e-45] * 100)
    assert torch.isfinite(decompress(make().compress("t", tiny))).all()
    zeros = make().compress("z", torch.zeros(300))
    assert torch.equal(decompress(zeros), torch.zeros(300)) and not bool(zeros.scales.any())


@pytest.mark.parametrize("make", LOWBIT)
def test_lowbit_error_feedback_makes_the_sums_track_over_50_rounds(make: type) -> None:
    torch.manual_seed(8)
    comp = make(error_feedback=True)
    plain = make(error_feedback=False)
    base = torch.randn(20_000) * 0.01
    sent_sum = torch.zeros_like(base)
    plain_sum = torch.zeros_like(base)
    input_sum = torch.zeros_like(base)
    for _ in range(50):
        x = base + torch.randn_like(base) * 0.001
        input_sum += x
        sent_sum += decompress(comp.compress("delta", x))
        plain_sum += decompress(plain.compress("delta", x))
    # sum(sent) = sum(inputs) - final residual, exactly up to float rounding, and the residual stays at the
    # size of one round's error, so the relative error of the sums falls like 1 / rounds.
    torch.testing.assert_close(sent_sum + comp.residuals["delta"], input_sum, rtol=0, atol=1e-4)
    ef_err = _rel(sent_sum, input_sum)
    # (int1 makes 0.050 here: its residual settles at 2.7× the input's norm, against 0.61× for int2.)
    assert ef_err < {"int4": 0.005, "int2": 0.02, "int1": 0.06}[make.kind]
    assert ef_err < _rel(plain_sum, input_sum) / 10


def _bound_cases() -> list[torch.Tensor]:
    """Gaussian and hostile inputs: heavy tails, one spike per block, one magnitude, integer ties, sparse,
    subnormal, huge, a wide dynamic range, partial last blocks."""
    gen = torch.Generator().manual_seed(9)
    cases = []
    for i in range(120):
        n = int(torch.randint(1, 2000, (1,), generator=gen))
        x = torch.randn(n, generator=gen)
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        cases.append(
            [
                x,
                x**3,
                torch.zeros(n).index_fill_(0, torch.randint(0, n, (1 + n // 256,), generator=gen), 5.0),
                0.3 * sign,
                torch.randint(-3, 4, (n,), generator=gen).float(),
                torch.where(torch.rand(n, generator=gen) < 0.98, 0.0, 1.0) * x,
                torch.rand(n, generator=gen) * 1e-40,
                x * 1e25,
                torch.exp(torch.randn(n, generator=gen) * 8) * sign,
                torch.empty(n).cauchy_(generator=gen),
            ][i % 10]
        )
    return cases


@pytest.mark.parametrize("name", ["int4", "int2", "int1"])
def test_error_bound_holds_for_every_input(name: str) -> None:
    """The receivers' bound (computed from decoded values alone) is never below the true error, and
    `max_bytes` is never below the payload: else honest owners would be convicted."""
    codec = get_payload_codec(name)
    ratios = []
    for x in _bound_cases():
        payload, decoded = codec.roundtrip(x)
        assert len(payload) <= codec.max_bytes(x.numel())
        err = float(torch.linalg.vector_norm(x.double() - decoded.double()))
        bound = codec.error_bound(decoded)
        assert err <= bound, (err, bound)
        if err:
            ratios.append(err / bound)
    # And it is not vacuous: within a small factor of the error actually made on Gaussian data.
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(10))
    _, decoded = codec.roundtrip(x)
    err = float(torch.linalg.vector_norm(x - decoded))
    assert codec.error_bound(decoded) < (2.0 if name == "int4" else 2.5) * err
    assert max(ratios) > 0.5


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-(2.0**96), max_value=2.0**96),
        max_size=700,
    ),
    st.sampled_from(["int4", "int2", "int1"]),
)
def test_error_bound_property(values: list[float], name: str) -> None:
    codec = get_payload_codec(name)
    x = torch.tensor(values, dtype=torch.float32)
    payload, decoded = codec.roundtrip(x)
    assert len(payload) <= codec.max_bytes(x.numel())
    assert float(torch.linalg.vector_norm(x.double() - decoded.double())) <= codec.error_bound(decoded)


def test_lowbit_protocol_doc_examples() -> None:
    """docs/protocol.md 10.4 shows int4, int2 and int1 of [1, -0.5, 0.25, 0, 3] with block 4, as we encode
    them."""
    doc = "".join(PROTOCOL_DOC.read_text().split())
    x = torch.tensor([1, -0.5, 0.25, 0, 3])
    for make in (Int8Blockwise, *LOWBIT):
        wire = make(block=4, error_feedback=False).compress("x", x).to_wire()
        assert wire.hex() in doc, make.kind


@pytest.mark.parametrize("reducer", ["mean", "centered_clip"])
@pytest.mark.parametrize("name", ["int4", "int2", "int1"])
async def test_butterfly_with_lowbit_codecs_passes_the_owner_checks(name: str, reducer: str) -> None:
    """Three members over loopback: the all-reduce completes with its agreement phase (every owner's result
    checked against its error bound by every member), bit-identical everywhere, near the exact mean."""
    gen = torch.Generator().manual_seed(11)
    centre = torch.randn(12_001, generator=gen)
    xs = [centre + 0.3 * torch.randn(12_001, generator=gen) for _ in range(3)]
    ws = [1.0, 2.0, 3.0]
    async with _Planes(3) as planes:
        spec = _spec(planes)
        codec = get_payload_codec(name)
        outs = await asyncio.wait_for(
            asyncio.gather(
                *(
                    butterfly_allreduce(p, spec, x, w, codec, stall_timeout=10, reducer=reducer)
                    for p, x, w in zip(planes, xs, ws, strict=True)
                )
            ),
            60,
        )
    assert all(torch.equal(o.flat, outs[0].flat) for o in outs)
    assert all(o.timings["agree"] > 0 and o.total_weight == sum(ws) for o in outs)
    # Two quantisations (each contribution, then the reduced part): about √2 × one codec's error.
    exact = weighted_mean(xs, ws)
    one = GAUSS_ERR[name]
    assert _rel(outs[0].flat, exact) < math.sqrt(2) * one * 1.2


def test_every_manifest_compression_has_a_payload_codec() -> None:
    from intellect.protocol.manifest import COMPRESSIONS

    assert {"int4", "int2", "int1"} <= set(COMPRESSIONS)
    x = torch.randn(1000)
    for name in COMPRESSIONS:
        codec = get_payload_codec(name)
        payload, decoded = codec.roundtrip(x)
        assert torch.equal(codec.decode(payload, x.numel()), decoded)
        assert float(torch.linalg.vector_norm(x - decoded)) <= codec.error_bound(decoded)
