"""Numbers for people: the one place the dashboard, the run view and `intellect-node watch` format them.

Pure functions of plain values, each returning a short string; None (not known yet) is shown as "–".
Byte sizes use decimal units (1 KB = 1000 B), as network rates and disk makers do.
"""

from __future__ import annotations

import math

#: What a value that is not known (yet) looks like.
UNKNOWN = "–"


def loss(x: float | None) -> str:
    """A loss to 4 significant digits: 2.364, 12.35, 0.004213 (never an exponent above 1e-4)."""
    if x is None or not math.isfinite(x):
        return UNKNOWN if x is None else str(x)
    return f"{x:.4g}"


def _scaled(x: float, units: tuple[str, ...], step: float) -> tuple[float, str]:
    unit = units[0]
    for unit in units[:-1]:
        if abs(x) < step:
            return x, unit
        x /= step
    return x, units[-1]


def _three_digits(x: float) -> str:
    """At most 3 significant digits and no exponent: 1.23, 12.3, 123."""
    if x == 0:
        return "0"
    return f"{x:.{max(0, 2 - math.floor(math.log10(abs(x))))}f}" if abs(x) < 1000 else f"{x:.0f}"


def nbytes(n: float | None) -> str:
    """Bytes as B, KB, MB, GB or TB: 999 B, 1.50 KB, 12.3 MB."""
    if n is None:
        return UNKNOWN
    if abs(n) < 1000:
        return f"{int(n)} B"
    x, unit = _scaled(float(n), ("B", "KB", "MB", "GB", "TB"), 1000.0)
    return f"{_three_digits(x)} {unit}"


def count(n: float | None) -> str:
    """A count with k, M or G: 999, 12.3k, 4.56M."""
    if n is None:
        return UNKNOWN
    if abs(n) < 1000:
        return f"{n:.0f}"
    x, unit = _scaled(float(n), ("", "k", "M", "G"), 1000.0)
    return f"{_three_digits(x)}{unit}"


def rate(tokens_per_s: float | None) -> str:
    """A throughput: 850 tokens/s, 12.3k tokens/s, 1.20M tokens/s."""
    if tokens_per_s is None:
        return UNKNOWN
    return f"{count(tokens_per_s)} tokens/s"


def duration(seconds: float | None) -> str:
    """A duration: 0.42 s, 12.3 s, 5.2 min, 2.1 h."""
    if seconds is None or not math.isfinite(seconds):
        return UNKNOWN
    if seconds < 60:
        return f"{_three_digits(seconds)} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def ago(seconds: float | None) -> str:
    """How long ago something happened, to the second: "4 s ago", "3.0 min ago"; "never" for None."""
    if seconds is None:
        return "never"
    seconds = max(0.0, seconds)
    return f"{seconds:.0f} s ago" if seconds < 60 else f"{duration(seconds)} ago"


def peer(peer_id: str) -> str:
    """A peer ID shortened to its first 4 and last 6 characters (every libp2p ID starts "12D3KooW")."""
    return peer_id if len(peer_id) <= 12 else f"{peer_id[:4]}…{peer_id[-6:]}"
