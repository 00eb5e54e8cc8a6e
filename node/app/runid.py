"""Run IDs by unique prefix, as git and docker take object IDs: `runs` prints 16 of the 64 hex characters,
and every run-ID argument (`start --run`, `peers --run`, `ticket RUN_ID`, the `run` config key) accepts any
prefix of at least `MIN_PREFIX` characters that names exactly one run.

`check_prefix` checks the spelling (no network); `resolve` picks the one run among those known.
"""

from __future__ import annotations

from collections.abc import Iterable

#: A run ID is the SHA-256 of its manifest, in lowercase hex.
RUN_ID_LEN = 64
#: The shortest prefix accepted (16 bits: a handful of runs never collide by chance).
MIN_PREFIX = 4
_HEX = frozenset("0123456789abcdef")
_SPELLING = f"a run_id is {RUN_ID_LEN} hex characters, or a unique prefix of at least {MIN_PREFIX}"


class RunIdError(ValueError):
    """A run-ID argument that is misspelt, matches no known run, or matches several."""


def is_full(run_id: str) -> bool:
    return len(run_id) == RUN_ID_LEN and set(run_id) <= _HEX


def check_prefix(text: str) -> str:
    """`text` as a run-ID prefix (lowercased), or raise RunIdError saying what is wrong with it."""
    prefix = text.strip().lower()
    if not set(prefix) <= _HEX:
        raise RunIdError(f"{text!r} is not a run ID: {_SPELLING}")
    if not MIN_PREFIX <= len(prefix) <= RUN_ID_LEN:
        raise RunIdError(f"{text!r} is too {'short' if len(prefix) < MIN_PREFIX else 'long'}: {_SPELLING}")
    return prefix


def matches(prefix: str, run_ids: Iterable[str]) -> list[str]:
    """The distinct IDs among `run_ids` that start with `prefix`, sorted."""
    return sorted({r for r in run_ids if r.startswith(prefix)})


def resolve(prefix: str, run_ids: Iterable[str]) -> str:
    """The one run ID among `run_ids` that starts with `prefix` (checked with `check_prefix` first).

    Raises RunIdError naming every match when the prefix is ambiguous, and saying so when none matches."""
    prefix = check_prefix(prefix)
    found = matches(prefix, run_ids)
    if len(found) == 1:
        return found[0]
    if not found:
        raise RunIdError(f"no run with ID {prefix} in the DHT (`intellect-node runs` lists them)")
    listed = ", ".join(found)
    raise RunIdError(f"run ID prefix {prefix} is ambiguous: it matches {listed}; give more characters")
