"""RL environments: deterministic prompts from a seed, a deterministic reward, and demonstrations.

An RL run (`kind = "rl"` in its manifest) names its environment by entry-point name in the group
`intellect_node.environments`; a researcher can ship one as a package that registers it there. A
registered object is a zero-argument callable (usually the class) returning an `Environment`.

Everything an environment does must be reproducible on every peer: rollout workers draw prompts from a
seed, and trainers draw the same prompts from the same seed and recompute every reward. So prompts come
from sha256 of (environment, seed, index), never from Python's `random` (whose non-`random()` methods may
change between versions), and a reward is a pure function of the prompt and the completion text.

The built-in tasks are small enough for a tiny byte-level model to learn on a CPU:
- `reverse`: "reverse: abc=" → "cba";
- `add`: "add: 12+7=" → "19".
A completion is the text the model generated after the prompt; its answer is that text up to the first
`END` ("\\n"), or all of it when there is none. The reward is 1.0 when the answer is exactly right and
0.0 otherwise: no partial credit, so a reward cannot be gamed by near misses and is trivial to check.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

#: Entry-point group environments are registered under.
ENTRY_POINT_GROUP = "intellect_node.environments"
#: What ends an answer in a completion (demonstrations end with it).
END = "\n"
_LOWER = "abcdefghijklmnopqrstuvwxyz"


class EnvironmentNotFound(LookupError):
    """No environment of that name is registered, or the registered object is not an environment."""


@dataclass(frozen=True)
class Prompt:
    """One task instance: the text the model continues and the exact answer expected."""

    text: str
    answer: str


@runtime_checkable
class Environment(Protocol):
    """A verifiable task: every method is deterministic, so any peer can recompute it."""

    #: Entry-point name ("reverse", "add").
    name: str

    def prompts(self, seed: int, n: int) -> list[Prompt]:
        """`n` prompts drawn from `seed`; prompt i depends only on (seed, i)."""
        ...

    def reward(self, prompt: Prompt, completion: str) -> float:
        """The reward of `completion` (the generated text after `prompt.text`), in [0, 1]."""
        ...

    def demonstrations(self, seed: int, n: int) -> list[tuple[Prompt, str]]:
        """(prompt, ideal completion) pairs for a supervised warm-up."""
        ...


def draw(tag: str, seed: int, index: int) -> int:
    """A 256-bit integer from sha256(tag, seed, index): portable across Python versions and platforms."""
    digest = hashlib.sha256(f"intellect-node/rlenv/{tag}/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest, "big")


def answer_of(completion: str) -> str:
    """The answer part of a completion: the text before the first END (all of it without one)."""
    return completion.split(END, 1)[0]


class _ExactAnswerEnv:
    """Shared behaviour: reward 1.0 for an exact answer, demonstrations are the answer plus END."""

    name = ""

    def prompt(self, seed: int, index: int) -> Prompt:
        raise NotImplementedError

    def prompts(self, seed: int, n: int) -> list[Prompt]:
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        return [self.prompt(seed, i) for i in range(n)]

    def reward(self, prompt: Prompt, completion: str) -> float:
        return 1.0 if answer_of(completion) == prompt.answer else 0.0

    def demonstrations(self, seed: int, n: int) -> list[tuple[Prompt, str]]:
        return [(p, p.answer + END) for p in self.prompts(seed, n)]


class ReverseEnv(_ExactAnswerEnv):
    """Reverse a lowercase string of `min_len`..`max_len` letters: "reverse: abc=" → "cba"."""

    name = "reverse"

    def __init__(self, min_len: int = 1, max_len: int = 6) -> None:
        if not 1 <= min_len <= max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
        self.min_len, self.max_len = min_len, max_len

    def prompt(self, seed: int, index: int) -> Prompt:
        x = draw(self.name, seed, index)
        x, length = divmod(x, self.max_len - self.min_len + 1)
        letters = []
        for _ in range(self.min_len + length):
            x, k = divmod(x, len(_LOWER))
            letters.append(_LOWER[k])
        word = "".join(letters)
        return Prompt(f"reverse: {word}=", word[::-1])


class AddEnv(_ExactAnswerEnv):
    """Add two integers in [0, max_value]: "add: 12+7=" → "19"."""

    name = "add"

    def __init__(self, max_value: int = 99) -> None:
        if max_value < 1:
            raise ValueError(f"max_value must be at least 1, got {max_value}")
        self.max_value = max_value

    def prompt(self, seed: int, index: int) -> Prompt:
        x = draw(self.name, seed, index)
        x, a = divmod(x, self.max_value + 1)
        b = x % (self.max_value + 1)
        return Prompt(f"add: {a}+{b}=", str(a + b))


def environment_names() -> list[str]:
    """Names of the registered environments, sorted."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def load_environment(name: str) -> Environment:
    """Instantiate the environment registered as `name`, or raise EnvironmentNotFound saying what exists."""
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        known = ", ".join(environment_names()) or "none"
        raise EnvironmentNotFound(
            f"no RL environment named {name!r} in entry-point group {ENTRY_POINT_GROUP!r} "
            f"(registered: {known})"
        )
    factory = found[0].load()
    env = factory() if callable(factory) else factory
    if not isinstance(env, Environment):
        raise EnvironmentNotFound(
            f"entry point {name!r} ({found[0].value}) gave {type(env).__name__}, not an Environment"
        )
    return env
