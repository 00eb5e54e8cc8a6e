"""Compression of pseudo-gradients Δ for averaging: blockwise int8 with error feedback, fp16, none.

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
error does not accumulate over rounds (the sum of what was sent tracks the sum of the inputs).

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
import torch.nn.functional as F

log = logging.getLogger(__name__)

FP16_MAX = 65504.0

#: kind -> (wire code, payload dtype)
_KINDS: dict[str, tuple[int, torch.dtype]] = {
    "none": (0, torch.float32),
    "fp16": (1, torch.float16),
    "int8": (2, torch.int8),
}
_KIND_BY_CODE = {code: kind for kind, (code, _) in _KINDS.items()}

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
    """One compressed tensor: flat `data` (int8 / fp16 / fp32), fp32 per-block `scales` (int8 only)."""

    #: "int8", "fp16" or "none" (fp32).
    kind: str
    #: Shape of the original tensor.
    shape: tuple[int, ...]
    #: Flat payload on CPU: int8 (numel values), fp16 or fp32.
    data: torch.Tensor
    #: fp32 scale per block (int8), else an empty fp32 tensor.
    scales: torch.Tensor
    #: Block size (int8), else 0.
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
        dtype = _KINDS[kind][1]
        itemsize = torch.empty((), dtype=dtype).element_size()
        if n_data != numel * itemsize:
            raise CompressionError(f"data length {n_data} does not match shape {shape}")
        if kind == "int8":
            if block <= 0:
                raise CompressionError("int8 payload without a block size")
            expected_scales = 4 * (-(-numel // block))
        else:
            if block != 0:
                raise CompressionError(f"{kind} payload with a block size")
            expected_scales = 0
        if n_scales != expected_scales:
            raise CompressionError(f"scales length {n_scales}, expected {expected_scales}")
        if len(view) != offset + n_data + n_scales:
            raise CompressionError(f"payload is {len(view)} bytes, header says {offset + n_data + n_scales}")
        data = _from_raw(view[offset : offset + n_data], dtype)
        scales = _from_raw(view[offset + n_data :], torch.float32)
        if kind == "int8" and not bool(torch.isfinite(scales).all()):
            raise NonFiniteError("received int8 payload with non-finite scales")
        return cls(kind=kind, shape=tuple(shape), data=data, scales=scales, block=block)


def _raw_bytes(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes()


def _from_raw(view: memoryview, dtype: torch.dtype) -> torch.Tensor:
    if len(view) == 0:
        return torch.empty(0, dtype=dtype)
    # bytearray: a writable copy, so the tensor owns its memory and torch does not warn.
    return torch.frombuffer(bytearray(view), dtype=torch.uint8).view(dtype)


# --- int8 blockwise kernels (plain torch; optionally wrapped by torch.compile) --------------------------


#: (flat fp32 padded to whole blocks, block, want residual) -> (int8 values, fp32 scale per block, residual)
Kernel = Callable[[torch.Tensor, int, bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def _int8_eager(
    flat: torch.Tensor, block: int, want_residual: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Blockwise absmax int8, vectorised, reusing one fp32 temporary (measured 2.4x faster than the
    allocate-per-op version on 10.5M values). The residual is ``x - dequantised(x)`` for error feedback."""
    blocks = flat.view(-1, block)
    # aminmax avoids materialising |x|; NaN propagates through it, so non-finite input shows in the scales.
    lo, hi = torch.aminmax(blocks, dim=1, keepdim=True)
    absmax = torch.maximum(lo.neg_(), hi)
    scales = absmax / 127.0
    inv = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    t = blocks * inv
    t.round_()  # |t| <= 127 by construction (x / absmax), so no clamp is needed
    q = t.to(torch.int8)
    residual = None
    if want_residual:
        torch.mul(t, scales, out=t)
        torch.sub(blocks, t, out=t)
        residual = t.view(-1)
    return q.view(-1), scales.view(-1), residual


def _int8_functional(
    flat: torch.Tensor, block: int, want_residual: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The same computation without in-place ops, which is what `torch.compile` fuses best."""
    blocks = flat.view(-1, block)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scales = absmax / 127.0
    inv = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    t = (blocks * inv).round()
    residual = (blocks - t * scales).view(-1) if want_residual else None
    return t.to(torch.int8).view(-1), scales.view(-1), residual


def _dequantize_int8(q: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """Padded int8 values and per-block scales -> flat fp32 (still padded); one fused mixed-dtype multiply."""
    return torch.mul(q.view(-1, block), scales.view(-1, 1)).view(-1)


def _dequantize_ct(ct: CompressedTensor) -> torch.Tensor:
    numel = ct.numel
    nblocks = ct.scales.numel()
    q = ct.data
    pad = nblocks * ct.block - numel
    if pad:
        q = F.pad(q, (0, pad))
    return _dequantize_int8(q, ct.scales, ct.block)[:numel].view(ct.shape)


def decompress(ct: CompressedTensor) -> torch.Tensor:
    """fp32 tensor of the original shape from any `CompressedTensor`."""
    if ct.kind == "int8":
        return _dequantize_ct(ct)
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

    def _with_residual(self, name: str, flat: torch.Tensor) -> torch.Tensor:
        residual = self.residuals.get(name) if self.error_feedback else None
        if residual is None:
            return flat
        if residual.shape != flat.shape:
            log.warning(
                "dropping residual of %s: shape changed from %s to %s", name, residual.shape, flat.shape
            )
            return flat
        return flat + residual

    def _keep_residual(self, name: str, sent_input: torch.Tensor, sent: torch.Tensor) -> None:
        if self.error_feedback:
            self.residuals[name] = sent_input - sent

    def decompress(self, ct: CompressedTensor) -> torch.Tensor:
        return decompress(ct)

    def reset(self) -> None:
        """Forget every residual (e.g. after a failed round whose deltas were never applied)."""
        self.residuals.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
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
        self._kernel_fn: Kernel = _int8_eager
        self._compiled_tried = False

    def _kernel(self) -> Kernel:
        if self.compile and not self._compiled_tried:
            self._compiled_tried = True
            self._kernel_fn = _compiled_kernel() or _int8_eager
        return self._kernel_fn

    def compress(self, name: str, tensor: torch.Tensor) -> CompressedTensor:
        shape = tuple(tensor.shape)
        flat = self._with_residual(name, _as_flat_fp32(tensor))
        numel = flat.numel()
        pad = -numel % self.block
        padded = F.pad(flat, (0, pad)) if pad else flat
        kernel = self._kernel()
        try:
            q, scales, residual = kernel(padded, self.block, self.error_feedback)
        except Exception as e:  # a compiled kernel failing at run time: fall back, never lose the round
            if kernel is _int8_eager:
                raise
            log.warning("compiled int8 quantiser failed (%s); using the eager one", e)
            self._kernel_fn = _int8_eager
            q, scales, residual = _int8_eager(padded, self.block, self.error_feedback)
        if not bool(torch.isfinite(scales).all()):
            # absmax propagates NaN and Inf, so checking the per-block scales checks every input value.
            raise NonFiniteError(f"tensor {name!r} contains NaN or Inf; refusing to compress it")
        if residual is not None:
            self.residuals[name] = residual[:numel] if pad else residual
        data = q[:numel] if pad else q
        return CompressedTensor(kind="int8", shape=shape, data=data, scales=scales, block=self.block)


class Fp16(_ErrorFeedback):
    """Cast to fp16 (round to nearest); a tensor beyond the fp16 range is sent as fp32 instead."""

    kind = "fp16"

    def __init__(self, error_feedback: bool = False) -> None:
        super().__init__(error_feedback)

    def compress(self, name: str, tensor: torch.Tensor) -> CompressedTensor:
        shape = tuple(tensor.shape)
        flat = self._with_residual(name, _as_flat_fp32(tensor))
        _check_finite(name, flat)
        if flat.numel() and float(flat.abs().max()) > FP16_MAX:
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
    """Compressor by manifest name: "int8" (alias "int8_blockwise"), "fp16", "none"."""
    factories: dict[str, Callable[..., Compressor]] = {
        "int8": Int8Blockwise,
        "int8_blockwise": Int8Blockwise,
        "fp16": Fp16,
        "none": NoCompression,
    }
    try:
        factory = factories[name.lower()]
    except KeyError:
        raise CompressionError(f"unknown compression {name!r}; expected one of {sorted(factories)}") from None
    return factory(**kwargs)
