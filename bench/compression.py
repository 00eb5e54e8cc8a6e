"""Benchmark pseudo-gradient compressors on the same Gaussian tensor: ours against hivemind's.

Measures, per method, quantise + dequantise throughput in GB/s of fp32 input, the relative L2 error
||x - x̂|| / ||x|| and the compression ratio (fp32 bytes / bytes on the wire: our `to_wire` bytes, header
included; hivemind's serialised protobuf parts). Timing is the best of `--repeat` runs (the machine may be
shared; the minimum is the least disturbed run). hivemind's quantizers are called the way its all-reduce
calls them: on parts of `--part` values (hivemind's default part size is 512 KiB = 128K fp32 values)
through `compress`/`extract`, which includes its protobuf serialisation, as ours includes building the
`CompressedTensor`.

    python bench/compression.py --json [--numel N] [--threads T] [--repeat R] [--clock wall|cpu]

Every method returns a fresh fp32 tensor of the input's size, and on Linux a fresh 40 MB buffer costs
page faults comparable to the arithmetic; `THP_MEM_ALLOC_ENABLE=1` (read by torch's CPU allocator at
start) backs large tensors with transparent huge pages where the kernel allows it (`madvise` mode) and
removes most of that cost for every method alike. The header line says whether it is set.

The last line printed is one JSON object ``{NAME: {"gbps": float, "rel_l2": float, "ratio": float}}``;
ours are "ours_int8", "ours_int4", "ours_int2", "ours_int1" (eager, error feedback on as the node runs
it), and "ours_int8_compiled" when torch.compile works here. hivemind is imported only inside this script (the
node's core never imports it for this).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Callable

import torch
from intellect.node.engine.compression import (
    CompressedTensor,
    Compressor,
    Fp16,
    Int1Blockwise,
    Int2Blockwise,
    Int4Blockwise,
    Int8Blockwise,
    _compiled_kernel,
    decompress,
)

log = logging.getLogger("bench.compression")


def _time(
    fn: Callable[[], torch.Tensor], repeat: int, clock: Callable[[], float]
) -> tuple[float, torch.Tensor]:
    # The warm-up call (allocator, lazy init) is also the one whose error is reported: with error feedback
    # later calls quantise x plus the previous residual, so only the first shows the one-round error.
    first = fn()
    best = math.inf
    for _ in range(repeat):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best, first


#: A method: (quantise + dequantise once, bytes on the wire of the last call's payload).
Method = tuple[Callable[[], torch.Tensor], Callable[[], int]]


def _ours(compressor: Compressor, x: torch.Tensor) -> Method:
    last: list[CompressedTensor] = []

    def run() -> torch.Tensor:
        ct = compressor.compress("delta", x)
        last[:] = [ct]
        return decompress(ct)

    return run, lambda: len(last[0].to_wire())


def _hivemind(kind: str, x: torch.Tensor, part: int) -> Method:
    from hivemind.compression import (
        CompressionInfo,
        Float16Compression,
        Quantile8BitQuantization,
        Uniform8BitQuantization,
    )

    comp = {
        "uniform8": Uniform8BitQuantization,
        "quantile8": Quantile8BitQuantization,
        "fp16": Float16Compression,
    }[kind]()
    info = CompressionInfo.from_tensor(x)
    parts = list(x.split(part))
    last: list = []

    def run() -> torch.Tensor:
        last[:] = [comp.compress(p, info) for p in parts]
        return torch.cat([comp.extract(m) for m in last])

    return run, lambda: sum(m.ByteSize() for m in last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=10_500_000, help="values in the test tensor")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per method (best is reported)")
    parser.add_argument("--part", type=int, default=128 * 1024, help="hivemind part size in values")
    parser.add_argument("--block", type=int, default=256, help="our int8/int4/int2/int1 block size")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--no-quantile", action="store_true", help="skip hivemind Quantile8Bit (slow)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time; cpu: process CPU time (robust on a shared, oversubscribed machine; "
        "use with --threads 1, where it then equals the uncontended single-core time)",
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line of results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
    gb = x.numel() * 4 / 1e9
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    methods: dict[str, tuple[Method, int]] = {
        "ours_int8": (_ours(Int8Blockwise(block=args.block, error_feedback=True), x), args.repeat),
        "ours_int8_no_ef": (_ours(Int8Blockwise(block=args.block, error_feedback=False), x), args.repeat),
        "ours_int4": (_ours(Int4Blockwise(block=args.block, error_feedback=True), x), args.repeat),
        "ours_int2": (_ours(Int2Blockwise(block=args.block, error_feedback=True), x), args.repeat),
        "ours_int1": (_ours(Int1Blockwise(block=args.block, error_feedback=True), x), args.repeat),
    }
    if not args.no_compile:
        start = time.perf_counter()
        compiled = _compiled_kernel()
        if compiled is not None:
            print(f"torch.compile of the int8 kernel took {time.perf_counter() - start:.1f} s")
            comp = Int8Blockwise(block=args.block, error_feedback=True, compile=True)
            methods["ours_int8_compiled"] = (_ours(comp, x), args.repeat)
    methods["ours_fp16"] = (_ours(Fp16(), x), args.repeat)
    methods["hivemind_uniform8bit"] = (_hivemind("uniform8", x, args.part), args.repeat)
    if not args.no_quantile:
        methods["hivemind_quantile8bit"] = (_hivemind("quantile8", x, args.part), max(1, args.repeat // 3))
    methods["hivemind_fp16"] = (_hivemind("fp16", x, args.part), args.repeat)

    results: dict[str, dict[str, float]] = {}
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "0")
    print(
        f"{x.numel()} Gaussian fp32 values ({gb * 1e3:.0f} MB), {args.threads} threads, "
        f"{args.clock} clock, THP_MEM_ALLOC_ENABLE={thp}, best of runs"
    )
    for name, ((fn, wire_bytes), repeat) in methods.items():
        seconds, out = _time(fn, repeat, clock)
        rel = float((out.view(-1) - x).norm() / x.norm())
        ratio = x.numel() * 4 / wire_bytes()
        results[name] = {"gbps": round(gb / seconds, 4), "rel_l2": round(rel, 6), "ratio": round(ratio, 3)}
        print(f"  {name:24s} {gb / seconds:7.3f} GB/s   rel L2 {rel:8.4%}   ratio {ratio:6.2f}")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
