"""Compression of pseudo-gradients Δ for averaging: blockwise int8, int4, int2 and int1 with error feedback,
fp16, none.

Pure tensor code, no I/O. A compressor turns one named fp32 tensor into a self-describing
`CompressedTensor` (flat payload tensor + per-block scales + shape + kind), which

* `decompress(ct)` turns back into an fp32 tensor of the original shape (any peer can do it: the payload
  says how it was made, so an averager may reduce either in decompressed fp32 or block by block on the
  int8 data and scales), and
* `ct.to_wire()` / `CompressedTensor.from_wire(data)` turn into and out of bytes with a fixed binary
  header (no pickle, no msgpack: the payload is raw little-endian arrays, bounds-checked on decode).

Int8 blockwise: the flat tensor is cut into blocks of `block` values (the last one zero-padded); each block
is scaled by its absolute maximum to [-127, 127] and rounded to nearest. With **error feedback** the
quantisation error of a tensor is kept per name and added to the next round's tensor of that name, so the
error does not accumulate over rounds (the sum of what was sent tracks the sum of the inputs). The eager
quantiser works in cache-sized chunks and updates the kept residual in place, so a round allocates no
full-size fp32 temporary (see docs/decisions.md for the measurements against hivemind's quantizers).

Int4, int2 and int1 blockwise (`Int4Blockwise`, `Int2Blockwise`, `Int1Blockwise`) pack two, four or
eight codes per byte (kinds "int4", "int2", "int1", payload uint8, first value in the lowest bits, unused
bits of the last byte zero). Int4 scales each block by its absmax to the levels -7..7 (code q + 8, code 0
is invalid); int2 uses the levels {-3, -1, 1, 3} × s with s = max(RMS / 2, absmax / 6) of the block (code
(q + 3) / 2); int1 sends the sign, ±s with s = the block's RMS (code 1 for x >= 0): see those classes for
why. All keep error feedback exactly like int8, and refuse a block whose scale would exceed 2^100 as they
refuse NaN/Inf.

Non-finite input (NaN/Inf) raises `NonFiniteError`: a NaN pseudo-gradient must never be sent. Fp16 values
beyond the fp16 range (|x| > 65504) are not clamped: that tensor *falls back to an uncompressed fp32
payload* (kind "none"), so a large Δ is sent exactly rather than silently altered.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

log = logging.getLogger(__name__)

FP16_MAX = 65504.0

#: kind -> (wire code, payload dtype)
_KINDS: dict[str, tuple[int, torch.dtype]] = {
    "none": (0, torch.float32),
    "fp16": (1, torch.float16),
    "int8": (2, torch.int8),
    "int4": (3, torch.uint8),
    "int2": (4, torch.uint8),
    "int1": (5, torch.uint8),
}
_KIND_BY_CODE = {code: kind for kind, (code, _) in _KINDS.items()}
#: Packed kinds -> bits per value (values per byte = 8 // bits).
_BITS = {"int4": 4, "int2": 2, "int1": 1}
#: Kinds with one fp32 scale per block of `block` values.
_BLOCKWISE = ("int8", "int4", "int2", "int1")
#: Largest scale an int4/int2/int1 block may have (encoder and decoder): larger values are refused like NaN,
#: so a decoded value (at most 7 times the scale) is always finite.
MAX_LOWBIT_SCALE = 2.0**100

_WIRE_MAGIC = b"ICT1"
# magic, kind code, ndim, block, data bytes, scales bytes
_WIRE_HEAD = struct.Struct("<4sBBIQQ")
_MAX_NDIM = 8
#: Default upper bound on the elements of one decoded tensor (larger than any single 10B-model tensor).
MAX_WIRE_NUMEL = 1 << 31


class CompressionError(ValueError):
    """A payload is malformed, or a tensor cannot be compressed."""


class NonFiniteError(CompressionError):
    """The tensor to compress contains NaN or Inf (never send such a pseudo-gradient)."""


@dataclass(frozen=True, eq=False)
class CompressedTensor:
    """One compressed tensor: flat `data` (int8 / packed uint8 / fp16 / fp32), fp32 per-block `scales`
    (int8, int4, int2, int1 only)."""

    #: "int8", "int4", "int2", "int1", "fp16" or "none" (fp32).
    kind: str
    #: Shape of the original tensor.
    shape: tuple[int, ...]
    #: Flat payload on CPU: int8 (numel values), uint8 (int4: ⌈numel / 2⌉ bytes, int2: ⌈numel / 4⌉, int1:
    #: ⌈numel / 8⌉), fp16 or fp32.
    data: torch.Tensor
    #: fp32 scale per block (int8, int4, int2, int1), else an empty fp32 tensor.
    scales: torch.Tensor
    #: Block size (int8, int4, int2, int1), else 0.
    block: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of payload (data + scales), what the wire carries beyond a small header."""
        return self.data.numel() * self.data.element_size() + self.scales.numel() * 4

    def to_wire(self) -> bytes:
        """Fixed little-endian header, shape as u64s, then the raw data and scales bytes."""
        code = _KINDS[self.kind][0]
        data = _raw_bytes(self.data)
        scales = _raw_bytes(self.scales)
        head = _WIRE_HEAD.pack(_WIRE_MAGIC, code, len(self.shape), self.block, len(data), len(scales))
        return head + struct.pack(f"<{len(self.shape)}Q", *self.shape) + data + scales

    @classmethod
    def from_wire(
        cls, payload: bytes | bytearray | memoryview, max_numel: int = MAX_WIRE_NUMEL
    ) -> CompressedTensor:
        """Parse `to_wire` bytes; every length is checked against the header before any array is built."""
        view = memoryview(payload)
        if len(view) < _WIRE_HEAD.size:
            raise CompressionError("compressed tensor shorter than its header")
        magic, code, ndim, block, n_data, n_scales = _WIRE_HEAD.unpack_from(view)
        if magic != _WIRE_MAGIC:
            raise CompressionError("not a compressed tensor (bad magic)")
        if code not in _KIND_BY_CODE:
            raise CompressionError(f"unknown compression kind code {code}")
        if ndim > _MAX_NDIM:
            raise CompressionError(f"too many dimensions ({ndim})")
        kind = _KIND_BY_CODE[code]
        offset = _WIRE_HEAD.size
        if len(view) < offset + 8 * ndim:
            raise CompressionError("compressed tensor truncated in its shape")
        shape = struct.unpack_from(f"<{ndim}Q", view, offset)
        offset += 8 * ndim
        numel = math.prod(shape)
        if numel > max_numel:
            raise CompressionError(f"tensor of {numel} elements exceeds the limit of {max_numel}")
        if n_data != _data_len(kind, numel):
            raise CompressionError(f"data length {n_data} does not match shape {shape}")
        if kind in _BLOCKWISE:
            if block <= 0:
                raise CompressionError(f"{kind} payload without a block size")
            expected_scales = 4 * (-(-numel // block))
        else:
            if block != 0:
                raise CompressionError(f"{kind} payload with a block size")
            expected_scales = 0
        if n_scales != expected_scales:
            raise CompressionError(f"scales length {n_scales}, expected {expected_scales}")
        if len(view) != offset + n_data + n_scales:
            raise CompressionError(f"payload is {len(view)} bytes, header says {offset + n_data + n_scales}")
        data = _from_raw(view[offset : offset + n_data], _KINDS[kind][1])
        scales = _from_raw(view[offset + n_data :], torch.float32)
        if kind in _BLOCKWISE and not bool(torch.isfinite(scales).all()):
            raise NonFiniteError(f"received {kind} payload with non-finite scales")
        if kind in _BITS:
            _check_lowbit(kind, data, scales, numel)
        return cls(kind=kind, shape=tuple(shape), data=data, scales=scales, block=block)


def _data_len(kind: str, numel: int) -> int:
    """Bytes of `data` for `numel` values of `kind` (packed kinds round up to whole bytes)."""
    if kind in _BITS:
        per = 8 // _BITS[kind]
        return -(-numel // per)
    return numel * torch.empty((), dtype=_KINDS[kind][1]).element_size()


def _check_lowbit(kind: str, data: torch.Tensor, scales: torch.Tensor, numel: int) -> None:
    """Received int4/int2/int1: scales in [0, MAX_LOWBIT_SCALE], unused bits of the last byte zero, and (int4)
    no code 0, which no encoder emits (it would stand for -8, outside the symmetric levels)."""
    if not bool(((scales >= 0) & (scales <= MAX_LOWBIT_SCALE)).all()):
        raise CompressionError(f"{kind} payload with a scale outside [0, 2^100]")
    bits = _BITS[kind]
    used = numel % (8 // bits)
    if used and int(data[-1]) >> (bits * used):
        raise CompressionError(f"{kind} payload with nonzero padding bits")
    if kind == "int4" and numel:
        full = numel // 2
        if bool(((data & 15) == 0).any()) or bool(((data[:full] >> 4) == 0).any()):
            raise CompressionError("int4 payload with the invalid code 0")


def _raw_bytes(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes()


def _from_raw(view: memoryview, dtype: torch.dtype) -> torch.Tensor:
    if len(view) == 0:
        return torch.empty(0, dtype=dtype)
    # bytearray: a writable copy, so the tensor owns its memory and torch does not warn.
    return torch.frombuffer(bytearray(view), dtype=torch.uint8).view(dtype)


# --- int8 blockwise kernels ----------------------------------------------------------------------------

#: Values per chunk of the eager quantiser: 1 MiB of fp32, so the passes over a chunk (abs, max, scale,
#: round, convert, residual) hit the cache instead of streaming a full-size temporary through memory.
_CHUNK_VALUES = 1 << 18


def _quantize_blocks(
    xb: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor, tb: torch.Tensor, rb: torch.Tensor | None
) -> None:
    """Quantise rows of `xb` [m, block]: int8 into `qb`, absmax / 127 into `sb` [m, 1], the residual
    ``xb - qb * sb`` (computed exactly as `decompress` computes the dequantised value) into `rb`, which may
    be `xb` itself. `tb` is an fp32 scratch of `xb`'s shape. absmax propagates NaN and Inf into `sb`."""
    torch.abs(xb, out=tb)
    torch.amax(tb, dim=1, keepdim=True, out=sb)
    inv = 127.0 / sb
    inv.masked_fill_(sb == 0, 0.0)  # an all-zero block: scale 0, values 0
    torch.mul(xb, inv, out=tb)
    tb.round_()  # |x * 127 / absmax| <= 127 by construction, so no clamp is needed
    qb.copy_(tb)
    sb.div_(127.0)
    if rb is not None:
        torch.mul(tb, sb, out=tb)
        torch.sub(xb, tb, out=rb)


def _quantize_int8(
    x: torch.Tensor, block: int, residual_out: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax int8 of flat fp32 `x` (any length; the last block is implicitly zero-padded).

    Returns (int8 values [numel], fp32 scales [blocks]); with `residual_out` (flat, `x`'s length, may be
    `x` itself) also writes ``x - dequantised(x)`` there. Works chunk by chunk with one small scratch
    buffer: no full-size temporary is allocated, which is what made the whole-tensor version slow (each
    fresh 40 MB buffer costs more in page faults than the arithmetic on it).
    """
    numel = x.numel()
    q = torch.empty(numel, dtype=torch.int8)
    scales = torch.empty(-(-numel // block), dtype=torch.float32)
    full = numel // block
    rows = max(1, _CHUNK_VALUES // block)
    if full:
        scratch = torch.empty(min(rows, full), block, dtype=torch.float32)
        for s in range(0, full, rows):
            e = min(full, s + rows)
            lo, hi = s * block, e * block
            _quantize_blocks(
                x[lo:hi].view(-1, block),
                q[lo:hi].view(-1, block),
                scales[s:e].view(-1, 1),
                scratch[: e - s],
                None if residual_out is None else residual_out[lo:hi].view(-1, block),
            )
    rem = numel - full * block
    if rem:
        tail = torch.zeros(1, block, dtype=torch.float32)
        tail[0, :rem] = x[full * block :]
        q_tail = torch.empty(1, block, dtype=torch.int8)
        r_tail = None if residual_out is None else torch.empty(1, block, dtype=torch.float32)
        _quantize_blocks(tail, q_tail, scales[full:].view(1, 1), torch.empty_like(tail), r_tail)
        q[full * block :] = q_tail[0, :rem]
        if residual_out is not None and r_tail is not None:
            residual_out[full * block :] = r_tail[0, :rem]
    return q, scales


#: (flat fp32 padded to whole blocks, block, want residual) -> (int8 values, fp32 scale per block, residual)
Kernel = Callable[[torch.Tensor, int, bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def _int8_functional(
    flat: torch.Tensor, block: int, want_residual: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The same computation on whole tensors without in-place ops, which is what `torch.compile` fuses."""
    blocks = flat.view(-1, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scales = absmax / 127.0
    inv = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    t = (blocks * inv).round()
    residual = (blocks - t * scales).view(-1) if want_residual else None
    return t.to(torch.int8).view(-1), scales.view(-1), residual


def _dequantize_ct(ct: CompressedTensor) -> torch.Tensor:
    """Whole blocks in one multiply written straight into the output, then the short tail (no pad copy)."""
    numel, block = ct.numel, ct.block
    full = numel // block * block
    out = torch.empty(numel, dtype=torch.float32)
    if full:
        torch.mul(
            ct.data[:full].view(-1, block),
            ct.scales[: full // block].view(-1, 1),
            out=out[:full].view(-1, block),
        )
    if numel > full:
        torch.mul(ct.data[full:], ct.scales[full // block], out=out[full:])
    return out.view(ct.shape)


# --- int4 / int2 / int1 blockwise kernels ----------------------------------------------------------------

#: (x rows [m, w], codes out [m, w] uint8, scales out [m, 1], two fp32 scratches [m, w], residual out or None)
BlockKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], None
]


def _int4_blocks(
    xb: torch.Tensor,
    cb: torch.Tensor,
    sb: torch.Tensor,
    tb: torch.Tensor,
    _: torch.Tensor,
    rb: torch.Tensor | None,
) -> None:
    """Rows of `xb` to int4 codes q + 8 (q = round(7 x / absmax) in -7..7) in `cb`, absmax / 7 in `sb`, and
    ``xb - q * scale`` (exactly what `decompress` subtracts) in `rb`, which may be `xb` itself.

    x / absmax is in [-1, 1] exactly (a correctly rounded quotient of |x| <= absmax), so q needs no clamp,
    even where absmax is subnormal and absmax / 7 would have lost precision."""
    torch.abs(xb, out=tb)
    torch.amax(tb, dim=1, keepdim=True, out=sb)  # propagates NaN and Inf into the scale
    torch.div(xb, torch.where(sb > 0, sb, 1.0), out=tb)  # an all-zero block: scale 0, q 0
    tb.mul_(7.0).round_()
    tb.add_(8.0)
    cb.copy_(tb)
    sb.div_(7.0)
    if rb is not None:
        tb.sub_(8.0).mul_(sb)
        torch.sub(xb, tb, out=rb)


def _rms_into(xb: torch.Tensor, sb: torch.Tensor, tb: torch.Tensor, tb2: torch.Tensor) -> torch.Tensor:
    """The RMS of each row of `xb` into `sb`; |xb| left in `tb`; the rows' absmax returned (NaN and Inf make
    the scale NaN). The RMS is taken of x / absmax (in [-1, 1]: no overflow or underflow of the squares) and
    multiplied back, so every finite block whose scale stays under `MAX_LOWBIT_SCALE` gets an accurate one."""
    torch.abs(xb, out=tb)
    absmax = torch.amax(tb, dim=1, keepdim=True)
    torch.div(tb, torch.where(absmax > 0, absmax, 1.0), out=tb2)
    norm = torch.linalg.vector_norm(tb2, dim=1, keepdim=True)
    torch.mul(absmax, norm, out=sb)
    sb.mul_(1.0 / math.sqrt(xb.shape[1]))
    return absmax


def _int2_blocks(
    xb: torch.Tensor,
    cb: torch.Tensor,
    sb: torch.Tensor,
    tb: torch.Tensor,
    tb2: torch.Tensor,
    rb: torch.Tensor | None,
) -> None:
    """Rows of `xb` to int2: s = max(RMS(row) / 2, absmax(row) / 6) in `sb`, q = the nearest of
    {-3, -1, 1, 3} to x / s (|x| >= 2s goes out, a tie to the outer level; x = ±0 to ±1), code (q + 3) / 2
    in `cb`, ``xb - q * s`` in `rb`.

    The RMS is taken as `_rms_into` takes it."""
    absmax = _rms_into(xb, sb, tb, tb2)
    sb.mul_(0.5)
    torch.maximum(sb, absmax / 6.0, out=sb)
    torch.ge(tb, sb * 2.0, out=tb2)  # 1.0 for the outer level |q| = 3
    tb2.mul_(2.0).add_(1.0)
    torch.copysign(tb2, xb, out=tb2)  # q
    torch.add(tb2, 3.0, out=tb)
    tb.mul_(0.5)
    cb.copy_(tb)
    if rb is not None:
        tb2.mul_(sb)
        torch.sub(xb, tb2, out=rb)


def _int1_blocks(
    xb: torch.Tensor,
    cb: torch.Tensor,
    sb: torch.Tensor,
    tb: torch.Tensor,
    tb2: torch.Tensor,
    rb: torch.Tensor | None,
) -> None:
    """Rows of `xb` to int1: s = RMS(row) in `sb`, q = +1 for x >= 0 else -1, code (q + 1) / 2 in `cb`,
    ``xb - q * s`` in `rb`."""
    _rms_into(xb, sb, tb, tb2)
    torch.ge(xb, 0.0, out=tb)  # the code: 1.0 for x >= 0
    cb.copy_(tb)
    if rb is not None:
        tb.mul_(2.0).sub_(1.0).mul_(sb)
        torch.sub(xb, tb, out=rb)


_BLOCK_KERNELS: dict[str, BlockKernel] = {"int4": _int4_blocks, "int2": _int2_blocks, "int1": _int1_blocks}


def _quantize_lowbit(
    kind: str, x: torch.Tensor, block: int, residual_out: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise int4/int2/int1 codes of flat fp32 `x`: (uint8 codes, one per value, zero-padded to whole
    bytes; fp32 scales [blocks]); with `residual_out` (may be `x` itself) also ``x - dequantised(x)``.

    Chunked like `_quantize_int8`. The last, partial block is quantised over its own values only (its
    scale is not diluted by padding zeros; `CompressorCodec.error_bound` relies on that for int2 and
    int1)."""
    kernel = _BLOCK_KERNELS[kind]
    numel = x.numel()
    padded = _data_len(kind, numel) * (8 // _BITS[kind])
    codes = torch.empty(padded, dtype=torch.uint8)
    codes[numel:] = 0
    scales = torch.empty(-(-numel // block), dtype=torch.float32)
    full = numel // block
    rows = max(1, _CHUNK_VALUES // block)
    if full:
        scratch = torch.empty(2, min(rows, full), block, dtype=torch.float32)
        for s in range(0, full, rows):
            e = min(full, s + rows)
            lo, hi = s * block, e * block
            kernel(
                x[lo:hi].view(-1, block),
                codes[lo:hi].view(-1, block),
                scales[s:e].view(-1, 1),
                scratch[0, : e - s],
                scratch[1, : e - s],
                None if residual_out is None else residual_out[lo:hi].view(-1, block),
            )
    rem = numel - full * block
    if rem:
        lo = full * block
        tail = torch.empty(2, 1, rem, dtype=torch.float32)
        kernel(
            x[lo:].view(1, rem),
            codes[lo:numel].view(1, rem),
            scales[full:].view(1, 1),
            tail[0],
            tail[1],
            None if residual_out is None else residual_out[lo:].view(1, rem),
        )
    return codes, scales


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (length a multiple of 8 // bits) to bytes, the first value in the lowest bits."""
    per = 8 // bits
    lanes = codes.view(-1, per)
    out = lanes[:, 0].clone()
    for k in range(1, per):
        out.bitwise_or_(lanes[:, k] << (bits * k))
    return out


def _unpack_into(data: torch.Tensor, bits: int, lanes: torch.Tensor) -> torch.Tensor:
    """Codes of packed `data` into `lanes` (uint8 [len(data), 8 // bits]), flat; the inverse of `_pack`."""
    per = 8 // bits
    for k in range(per):
        torch.bitwise_right_shift(data, bits * k, out=lanes[:, k])
        if k < per - 1:
            lanes[:, k].bitwise_and_((1 << bits) - 1)
    return lanes.view(-1)


def _dequantize_lowbit(ct: CompressedTensor) -> torch.Tensor:
    """q × scale per value, q = code - 8 (int4), 2 code - 3 (int2) or 2 code - 1 (int1): the product the
    kernels subtract for the residual, so both sides compute the same fp32 values. Works in cache-sized
    chunks of whole blocks (a multiple of the values a byte holds, so each chunk starts on a byte)."""
    numel, block, bits = ct.numel, ct.block, _BITS[ct.kind]
    per = 8 // bits
    data = ct.data.view(-1)
    if (
        block <= 0
        or data.dtype != torch.uint8
        or data.numel() != _data_len(ct.kind, numel)
        or ct.scales.numel() != -(-numel // block)
    ):
        raise CompressionError(f"inconsistent {ct.kind} tensor (data, scales and shape do not match)")
    out = torch.empty(numel, dtype=torch.float32)
    rows = per * max(1, _CHUNK_VALUES // (per * block))
    step = rows * block
    lanes = torch.empty(-(-min(step, numel) // per), per, dtype=torch.uint8)
    for lo in range(0, numel, step):
        hi = min(numel, lo + step)
        nbytes = -(-(hi - lo) // per)
        codes = _unpack_into(data[lo // per : lo // per + nbytes], bits, lanes[:nbytes])
        chunk = out[lo:hi]
        chunk.copy_(codes[: hi - lo])
        if bits == 4:
            chunk.sub_(8.0)
        else:
            chunk.mul_(2.0).sub_(3.0 if bits == 2 else 1.0)
        b0, full = lo // block, (hi - lo) // block * block
        if full:
            chunk[:full].view(-1, block).mul_(ct.scales[b0 : b0 + full // block].view(-1, 1))
        if hi - lo > full:
            chunk[full:].mul_(ct.scales[b0 + full // block])
    return out.view(ct.shape)


def decompress(ct: CompressedTensor) -> torch.Tensor:
    """fp32 tensor of the original shape from any `CompressedTensor`."""
    if ct.kind == "int8":
        return _dequantize_ct(ct)
    if ct.kind in _BITS:
        return _dequantize_lowbit(ct)
    if ct.kind in ("fp16", "none"):
        return ct.data.to(torch.float32).view(ct.shape)
    raise CompressionError(f"unknown compression kind {ct.kind!r}")


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"tensor {name!r} contains NaN or Inf; refusing to compress it")


def _as_flat_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().view(-1)


class Compressor(Protocol):
    """What the averager needs: compress named tensors, decompress payloads, keep/restore residuals."""

    kind: str

    def compress(self, name: str, tensor: torch.Tensor) -> CompressedTensor: ...

    def decompress(self, ct: CompressedTensor) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None: ...


class _ErrorFeedback:
    """Per-name residuals: what was lost to quantisation last time, added back before the next one."""

    def __init__(self, error_feedback: bool) -> None:
        self.error_feedback = error_feedback
        self.residuals: dict[str, torch.Tensor] = {}

    def _residual_for(self, name: str, numel: int) -> torch.Tensor | None:
        residual = self.residuals.get(name) if self.error_feedback else None
        if residual is not None and residual.numel() != numel:
            log.warning("dropping residual of %s: size changed from %d to %d", name, residual.numel(), numel)
            return None
        return residual

    def _with_residual(self, name: str, flat: torch.Tensor) -> torch.Tensor:
        residual = self._residual_for(name, flat.numel())
        return flat if residual is None else flat + residual

    def _keep_residual(self, name: str, sent_input: torch.Tensor, sent: torch.Tensor) -> None:
        if self.error_feedback:
            self.residuals[name] = sent_input - sent

    def decompress(self, ct: CompressedTensor) -> torch.Tensor:
        return decompress(ct)

    def reset(self) -> None:
        """Forget every residual (e.g. after a failed round whose deltas were never applied)."""
        self.residuals.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The residuals as `residual.<name>` tensors. These are the live buffers (int8 updates them in
        place on the next `compress` of that name): serialise or clone them before compressing again."""
        return {f"residual.{name}": t for name, t in self.residuals.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        residuals = {}
        for key, t in state.items():
            if not key.startswith("residual."):
                raise CompressionError(f"unexpected tensor {key!r} in compressor state")
            residuals[key[len("residual.") :]] = t.detach().to("cpu", torch.float32).clone().view(-1)
        self.residuals = residuals


class Int8Blockwise(_ErrorFeedback):
    """Blockwise absmax int8 (round to nearest) with optional error feedback.

    `compile=True` wraps the quantiser in `torch.compile` on first use; if compiling fails (no C++
    compiler, unsupported platform) it logs once and stays on the eager kernel, which is always correct.
    """

    kind = "int8"

    def __init__(self, block: int = 256, error_feedback: bool = True, compile: bool = False) -> None:
        super().__init__(error_feedback)
        if block <= 0:
            raise ValueError("block must be positive")
        self.block = block
        self.compile = compile
        self._kernel_fn: Kernel | None = None
        self._compiled_tried = False

    def _kernel(self) -> Kernel | None:
        """The compiled kernel when `compile` is on and compiling works here, else None (eager)."""
        if self.compile and not self._compiled_tried:
            self._compiled_tried = True
            self._kernel_fn = _compiled_kernel()
        return self._kernel_fn

    def compress(self, name: str, tensor: torch.Tensor) -> CompressedTensor:
        """Quantise `tensor` (plus the residual kept under `name`); raises `NonFiniteError` on NaN/Inf,
        in which case the residual of `name` is dropped (it may have been partly overwritten)."""
        shape = tuple(tensor.shape)
        src = _as_flat_fp32(tensor)
        numel = src.numel()
        residual_in = self._residual_for(name, numel)
        compiled = self._kernel()
        if compiled is not None:
            try:
                q, scales, residual = self._compress_compiled(compiled, src, residual_in)
            except Exception as e:  # a compiled kernel failing at run time: fall back, never lose the round
                log.warning("compiled int8 quantiser failed (%s); using the eager one", e)
                self._kernel_fn = None
                q, scales, residual = self._compress_eager(src, residual_in)
        else:
            q, scales, residual = self._compress_eager(src, residual_in)
        if not bool(torch.isfinite(scales).all()):
            # absmax propagates NaN and Inf, so checking the per-block scales checks every input value.
            self.residuals.pop(name, None)
            raise NonFiniteError(f"tensor {name!r} contains NaN or Inf; refusing to compress it")
        if residual is not None:
            self.residuals[name] = residual
        return CompressedTensor(kind="int8", shape=shape, data=q, scales=scales, block=self.block)

    def _compress_eager(
        self, src: torch.Tensor, residual_in: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if not self.error_feedback:
            q, scales = _quantize_int8(src, self.block, None)
            return q, scales, None
        if residual_in is not None:
            # The kept residual is our own buffer: add this round's input into it and let the quantiser
            # overwrite it with the new residual, so a round allocates nothing of the tensor's size but q.
            x = residual_in.add_(src)
            q, scales = _quantize_int8(x, self.block, x)
            return q, scales, x
        residual = torch.empty_like(src)
        q, scales = _quantize_int8(src, self.block, residual)
        return q, scales, residual

    def _compress_compiled(
        self, kernel: Kernel, src: torch.Tensor, residual_in: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        numel = src.numel()
        pad = -numel % self.block
        padded = torch.zeros(numel + pad, dtype=torch.float32)
        if residual_in is not None:
            torch.add(src, residual_in, out=padded[:numel])
        else:
            padded[:numel].copy_(src)
        q, scales, residual = kernel(padded, self.block, self.error_feedback)
        return q[:numel], scales, None if residual is None else residual[:numel]


class Fp16(_ErrorFeedback):
    """Cast to fp16 (round to nearest); a tensor beyond the fp16 range is sent as fp32 instead."""

    kind = "fp16"

    def __init__(self, error_feedback: bool = False) -> None:
        super().__init__(error_feedback)

    def compress(self, name: str, tensor: torch.Tensor) -> CompressedTensor:
        shape = tuple(tensor.shape)
        flat = self._with_residual(name, _as_flat_fp32(tensor))
        # One pass gives both checks: min/max propagate NaN and Inf, and bound |x|.
        lo, hi = (float(v) for v in torch.aminmax(flat)) if flat.numel() else (0.0, 0.0)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise NonFiniteError(f"tensor {name!r} contains NaN or Inf; refusing to compress it")
        if max(-lo, hi) > FP16_MAX:
            log.debug("tensor %s exceeds the fp16 range; sending it as fp32", name)
            self._keep_residual(name, flat, flat)
            return CompressedTensor(kind="none", shape=shape, data=flat.clone(), scales=_NO_SCALES, block=0)
        half = flat.to(torch.float16)
        if self.error_feedback:
            self._keep_residual(name, flat, half.to(torch.float32))
        return CompressedTensor(kind="fp16", shape=shape, data=half, scales=_NO_SCALES, block=0)


class NoCompression(_ErrorFeedback):
    """fp32 as is (still refuses NaN/Inf)."""

    kind = "none"

    def __init__(self) -> None:
        super().__init__(error_feedback=False)

    def compress(self, name: str, tensor: torch.Tensor) -> CompressedTensor:
        flat = _as_flat_fp32(tensor)
        _check_finite(name, flat)
        return CompressedTensor(
            kind="none", shape=tuple(tensor.shape), data=flat.clone(), scales=_NO_SCALES, block=0
        )


class _LowBitBlockwise(_ErrorFeedback):
    """Shared body of `Int4Blockwise`, `Int2Blockwise` and `Int1Blockwise`: chunked kernel, error feedback,
    packing."""

    kind = ""

    def __init__(self, block: int = 256, error_feedback: bool = True) -> None:
        super().__init__(error_feedback)
        if block <= 0:
            raise ValueError("block must be positive")
        self.block = block

    def compress(self, name: str, tensor: torch.Tensor) -> CompressedTensor:
        """Quantise `tensor` (plus the residual kept under `name`). Raises `NonFiniteError` on NaN/Inf or a
        block whose scale would exceed `MAX_LOWBIT_SCALE` and then drops the residual of `name` (it may
        have been partly overwritten), like `Int8Blockwise`."""
        shape = tuple(tensor.shape)
        src = _as_flat_fp32(tensor)
        residual_in = self._residual_for(name, src.numel())
        x, residual = src, None
        if self.error_feedback and residual_in is not None:
            # As int8: add this round's input into our own residual buffer, which then receives the new
            # residual in place; the caller's tensor is never written.
            x = residual = residual_in.add_(src)
        elif self.error_feedback:
            residual = torch.empty_like(src)
        codes, scales = _quantize_lowbit(self.kind, x, self.block, residual)
        # NaN compares false, so this also catches NaN/Inf input (absmax and the RMS propagate them).
        if not bool((scales <= MAX_LOWBIT_SCALE).all()):
            self.residuals.pop(name, None)
            raise NonFiniteError(
                f"tensor {name!r} contains NaN or Inf (or values beyond 2^100); refusing to compress it"
            )
        if residual is not None:
            self.residuals[name] = residual
        return CompressedTensor(
            kind=self.kind, shape=shape, data=_pack(codes, _BITS[self.kind]), scales=scales, block=self.block
        )


class Int4Blockwise(_LowBitBlockwise):
    """Blockwise absmax int4: levels -7..7 × absmax / 7 per block, round to nearest, two values a byte.

    Why symmetric absmax levels: every value moves by at most half a step (absmax / 14), with no clipping,
    so the receiver's error bound is exact per block; zero is a level (a zero stays zero); and for Gaussian
    blocks of 256 (absmax ≈ 2.9σ) the step ≈ 0.41σ is near the optimum of a 15-level uniform quantiser
    (≈ 0.35σ with clipping), which would gain a few percent of error for an unbounded worst case. The
    sixteenth code (−8) is unused and refused on receipt."""

    kind = "int4"


class Int2Blockwise(_LowBitBlockwise):
    """Blockwise int2: levels {−3, −1, 1, 3} × s per block, s = max(RMS / 2, absmax / 6), four values a byte.

    Why these levels: for a Gaussian the best 4-level quantiser (Lloyd–Max) has MSE 0.1175σ²; the best
    *uniform* one, step 0.996σ, has 0.1188σ², which these levels reach with step 2s = RMS ≈ σ (relative L2
    error ≈ 0.345). Scaling by absmax alone (levels ±absmax/3, ±absmax: no clipping) makes the step ≈ 1.9σ
    for blocks of 256, error ≈ 0.59; sign × mean |x| (signSGD-style, one bit of the two used) has
    1 − 2/π = 0.36σ², error ≈ 0.60. Why the floor absmax / 6: with RMS / 2 alone a value beyond 3s is
    clipped to ±3s, and under error feedback a coordinate that stays large round after round (a steady
    part of the pseudo-gradient) piles its clipped excess into the residual until the block's RMS grows to
    cover it: the residual settled at 1.6× the input's norm on a steady signal with 10% noise, against
    0.62× with the floor, which costs 0.350 instead of 0.345 on one Gaussian round (docs/decisions.md).
    With it the outer level is at least half the block's largest value, every value moves by at most 3s,
    and Σx² <= 4ns² still holds: the two facts `CompressorCodec.error_bound` builds on."""

    kind = "int2"


class Int1Blockwise(_LowBitBlockwise):
    """Blockwise int1: the sign, ±s per value with s = the block's RMS, eight values a byte (1.125 bits a
    value with the scale of a block of 256: half of int2's bytes).

    Why the RMS and not mean |x|, which minimises the error (1 − 2/π = 0.36σ² for a Gaussian, against
    0.40σ² with the RMS): the receivers must bound the error from the decoded values alone
    (`CompressorCodec.error_bound`, what an owner's reduced partition is checked against). With s = RMS,
    Σx² = ns² and Σ|x| >= √(Σx²), so ‖x − x̂‖² = Σ(|x| − s)² = 2ns² − 2sΣ|x| <= 2s²(n − √n); with mean |x|
    one large value in a block of small ones can be arbitrarily far from its ±s, and no bound holds.
    Error feedback carries what the sign loses to the next round, as for the other codecs."""

    kind = "int1"


_NO_SCALES = torch.empty(0, dtype=torch.float32)

_COMPILED: dict[str, Kernel | None] = {}


def _compiled_kernel() -> Kernel | None:
    """`torch.compile`d int8 kernel, built once per process, or None where compiling does not work."""
    if "int8" not in _COMPILED:
        try:
            fn = torch.compile(_int8_functional, dynamic=True)
            # Compile both variants now, so a missing compiler shows here and not in the middle of a round.
            fn(torch.randn(1024), 256, True)
            fn(torch.randn(1024), 256, False)
            _COMPILED["int8"] = fn
        except Exception as e:  # inductor raises many types (missing compiler, backend errors)
            log.warning("torch.compile unavailable for int8 compression (%s); using eager torch", e)
            _COMPILED["int8"] = None
    return _COMPILED["int8"]


def get_compressor(name: str, **kwargs: object) -> Compressor:
    """Compressor by manifest name: "int8" (alias "int8_blockwise"), "int4", "int2", "int1", "fp16" or
    "none"."""
    factories: dict[str, Callable[..., Compressor]] = {
        "int8": Int8Blockwise,
        "int8_blockwise": Int8Blockwise,
        "int4": Int4Blockwise,
        "int2": Int2Blockwise,
        "int1": Int1Blockwise,
        "fp16": Fp16,
        "none": NoCompression,
    }
    try:
        factory = factories[name.lower()]
    except KeyError:
        raise CompressionError(f"unknown compression {name!r}; expected one of {sorted(factories)}") from None
    return factory(**kwargs)
