"""The numpy constraint: hivemind 1.1.12's 8-bit codecs must round-trip with the installed numpy.

With numpy 2.4.x, Uniform8Bit and Quantile8Bit `extract` raise TypeError, and inside hivemind's all-reduce
that error is swallowed so `step()` reports success without averaging. pyproject pins numpy < 2.4; this
test fails loudly if an environment ever resolves to a numpy that breaks them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hivemind.compression import (
    CompressionInfo,
    Float16Compression,
    Quantile8BitQuantization,
    Uniform8BitQuantization,
)


@pytest.mark.parametrize(
    "codec",
    [Uniform8BitQuantization(), Quantile8BitQuantization(), Float16Compression()],
    ids=["uniform8bit", "quantile8bit", "fp16"],
)
def test_hivemind_codec_round_trip(codec: object) -> None:
    torch.manual_seed(0)
    tensor = torch.randn(10_000)
    serialized = codec.compress(tensor, CompressionInfo.from_tensor(tensor, key="x"))  # type: ignore[attr-defined]
    restored = codec.extract(serialized)  # type: ignore[attr-defined]
    assert restored.shape == tensor.shape
    restored = restored.float()
    # Measured on N(0, 1): mean abs error 0.0067 (uniform), 0.0076 (quantile); correlation >= 0.9994.
    # The 8-bit codecs clip a few outliers (max error ~1), so the bound is on the mean, not the max.
    assert (restored - tensor).abs().mean().item() < 0.02 * tensor.std().item()
    assert torch.corrcoef(torch.stack([restored, tensor]))[0, 1].item() > 0.999


def test_numpy_version_is_below_2_4() -> None:
    major, minor = (int(p) for p in np.__version__.split(".")[:2])
    assert (major, minor) < (2, 4), f"numpy {np.__version__} breaks hivemind 1.1.12's 8-bit decompression"
