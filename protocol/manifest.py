"""Run manifests: what a run trains and how (DESIGN §6), from TOML to signed canonical bytes.

A researcher writes TOML; `load_manifest_toml` turns it into a frozen `Manifest`, or raises a
`ManifestError` whose message starts with the dotted field name (`diloco.inner_steps: …`) and says why
(missing, unknown key, wrong type, out of range). Sizes are checked from the declared numbers before
anything is allocated: a manifest whose model would not fit in memory, or that lists too many shards or
too-long strings, is refused here. A manifest carries only numbers, strings and booleans: no code, no
pickles.

On the wire a manifest is its canonical msgpack (`packb_canonical` of `Manifest.to_plain()`: sorted keys,
floats as floats), `run_id` is the sha256 hex of those bytes, and `SignedManifest` carries the bytes with
the researcher's Ed25519 signature under `domains.MANIFEST`. Decoding insists the bytes are canonical, so
one manifest has exactly one run_id.

Pure: no torch, no hivemind, no I/O besides reading the TOML file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from intellect.crypto import domains
from intellect.crypto.errors import InvalidPeerId
from intellect.crypto.identity import Identity, public_key_from_peer_id, verify
from intellect.protocol.codec import decode, encode, message, packb_canonical, unpackb_limited
from intellect.protocol.errors import ProtocolError

#: Protocol version this code speaks; a manifest for another version is refused.
PROTOCOL_VERSION = 1
#: Largest canonical manifest (it travels in a DHT value next to other runs' manifests).
MAX_MANIFEST_BYTES = 256 * 1024
#: Largest TOML file we read.
MAX_TOML_BYTES = 1 << 20
#: Most data shards one manifest may list.
MAX_SHARDS = 1024
#: Most peer IDs an allowlist may hold.
MAX_ALLOWLIST = 1024
#: Longest name, URI or other free-form string.
MAX_STR = 512
#: Largest model we accept: 20B parameters (the 10B INTELLECT-1 config with room to spare). At 4 bytes a
#: parameter for each of weights, outer momentum and the global copy, bigger is beyond any volunteer node.
MAX_PARAMS = 20_000_000_000
#: Largest logits tensor of one micro-batch in fp32 bytes (batch × seq_len × vocab × 4).
MAX_LOGITS_BYTES = 32 << 30

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

COMPRESSIONS = ("int8", "int4", "int2", "int1", "fp16", "none")
#: How a partition's contributions are combined (see node/engine/robust.py; protocol/ stays torch-free).
REDUCERS = ("mean", "centered_clip")
SCHEDULES = ("cosine", "linear", "constant")
#: How the outer step relates to the next round's inner steps (`DilocoSpec.outer_update`).
OUTER_UPDATES = ("sequential", "overlapped")
ADMISSION_POLICIES = ("open", "allowlist", "tickets")
TOKENIZER_KINDS = ("byte", "hf")
#: What a run trains: DiLoCo pretraining on data shards, or asynchronous RL (GRPO) on an environment.
RUN_KINDS = ("pretrain", "rl")


class ManifestError(ProtocolError, ValueError):
    """A manifest is invalid; the message starts with the dotted name of the offending field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


# ---- field readers: each names the field and says why ----------------------------------------------

T = TypeVar("T")


def _type_name(v: Any) -> str:
    return type(v).__name__


class _Section:
    """Reads the fields of one TOML table, tracking which keys were used so leftovers are an error."""

    def __init__(self, path: str, raw: Any) -> None:
        if not isinstance(raw, Mapping):
            raise ManifestError(path or "<root>", f"must be a table, got {_type_name(raw)}")
        self.path = path
        self.raw = raw
        self.used: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _get(self, key: str, default: Any) -> Any:
        self.used.add(key)
        if key in self.raw:
            return self.raw[key]
        if default is _REQUIRED:
            raise ManifestError(self.name(key), "missing")
        return default

    def get_int(self, key: str, lo: int, hi: int, default: Any = None) -> int:
        v = self._get(key, _REQUIRED if default is None else default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ManifestError(self.name(key), f"must be an integer, got {_type_name(v)} {v!r}")
        if not lo <= v <= hi:
            raise ManifestError(self.name(key), f"must be in [{lo}, {hi}], got {v}")
        return v

    def get_float(self, key: str, lo: float, hi: float, default: Any = None, lo_open: bool = False) -> float:
        v = self._get(key, _REQUIRED if default is None else default)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ManifestError(self.name(key), f"must be a number, got {_type_name(v)} {v!r}")
        f = float(v)
        if not math.isfinite(f) or not (lo < f if lo_open else lo <= f) or f > hi:
            bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
            raise ManifestError(self.name(key), f"must be a finite number in {bound}, got {v!r}")
        return f

    def get_bool(self, key: str, default: Any = None) -> bool:
        v = self._get(key, _REQUIRED if default is None else default)
        if not isinstance(v, bool):
            raise ManifestError(self.name(key), f"must be true or false, got {_type_name(v)} {v!r}")
        return v

    def get_str(
        self,
        key: str,
        default: Any = None,
        choices: tuple[str, ...] = (),
        check: Callable[[str], str | None] | None = None,
    ) -> str:
        v = self._get(key, _REQUIRED if default is None else default)
        if not isinstance(v, str):
            raise ManifestError(self.name(key), f"must be a string, got {_type_name(v)} {v!r}")
        if len(v) > MAX_STR:
            raise ManifestError(self.name(key), f"longer than {MAX_STR} characters")
        if choices and v not in choices:
            raise ManifestError(self.name(key), f"must be one of {', '.join(choices)}, got {v!r}")
        if check is not None and (why := check(v)) is not None:
            raise ManifestError(self.name(key), why)
        return v

    def table(self, key: str, optional: bool = False) -> _Section:
        return _Section(self.name(key), self._get(key, {} if optional else _REQUIRED))

    def array(self, key: str, max_len: int, default: Any = None) -> list[Any]:
        v = self._get(key, _REQUIRED if default is None else default)
        if not isinstance(v, list | tuple):
            raise ManifestError(self.name(key), f"must be an array, got {_type_name(v)}")
        if len(v) > max_len:
            raise ManifestError(self.name(key), f"at most {max_len} entries, got {len(v)}")
        return list(v)

    def done(self) -> None:
        extra = sorted(str(k) for k in self.raw if k not in self.used)
        if extra:
            raise ManifestError(self.name(extra[0]), "unknown key")


_REQUIRED = object()


def _hex64(v: str) -> str | None:
    return None if _HEX64.match(v) else "must be 64 lowercase hex characters (a sha256 digest)"


def _hex64_or_empty(v: str) -> str | None:
    return None if v == "" else _hex64(v)


def _run_name(v: str) -> str | None:
    if not 0 < len(v) <= 128 or not _NAME.match(v):
        return (
            "must be 1-128 characters of letters, digits, '.', '_' or '-' (starting with a letter or digit)"
        )
    return None


def _uri(v: str) -> str | None:
    if not v or any(ord(c) < 0x20 for c in v) or "://" not in v:
        return "must be a URI like builtin://corpus/0, https://… or file://…"
    return None


def _peer_id(v: str) -> str | None:
    try:
        public_key_from_peer_id(v)
    except InvalidPeerId as e:
        return str(e)
    return None


# ---- the manifest ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Model architecture. `preset` names a config ("tiny", "150m", …) for people; the dims are binding."""

    preset: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    max_seq_len: int
    rope_theta: float
    norm_eps: float

    def param_count(self) -> int:
        """Parameters of a LLaMA-style model with untied embeddings (estimate used for size limits)."""
        head_dim = self.dim // self.n_heads
        kv_dim = self.n_kv_heads * head_dim
        attn = self.dim * self.dim * 2 + self.dim * kv_dim * 2
        ffn = 3 * self.dim * self.ffn_dim
        per_layer = attn + ffn + 2 * self.dim
        return self.n_layers * per_layer + 2 * self.vocab_size * self.dim + self.dim

    def to_dict(self) -> dict[str, Any]:
        """The dims as a plain dict (what `ModelConfig.from_dict` consumes), without the preset name."""
        return {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "ffn_dim": self.ffn_dim,
            "vocab_size": self.vocab_size,
            "max_seq_len": self.max_seq_len,
            "rope_theta": self.rope_theta,
            "norm_eps": self.norm_eps,
        }


@dataclass(frozen=True)
class TokenizerSpec:
    """`kind` "byte" (built in; sha256 may be empty) or "hf" (a tokenizer.json at `uri` with this sha256)."""

    kind: str
    sha256: str
    uri: str


@dataclass(frozen=True)
class ShardSpec:
    """One data shard: where it is, its content hash, and how many tokens it holds."""

    #: `builtin://corpus/<k>`, `builtin://heldout`, a path (relative to the shard index), `file://…` or
    #: `http(s)://…` (downloaded by each node); a text shard (JSONL, Parquet, Arrow, a `datasets`
    #: directory) may carry options after `#` (`#field=content&format=parquet`).
    uri: str
    #: sha256 (hex) of the shard as stored: a token file's little-endian token array, a text file's bytes,
    #: a `datasets` directory's data files concatenated in `state.json` order.
    sha256: str
    #: Number of tokens.
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        """The shard as the manifest's canonical form and a shard index (`index.json`) list it."""
        return {"uri": self.uri, "sha256": self.sha256, "tokens": self.tokens}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardSpec:
        """Inverse of `to_dict`, for shard index entries (manifests go through `parse_manifest`)."""
        return cls(uri=str(d["uri"]), sha256=str(d["sha256"]), tokens=int(d["tokens"]))


@dataclass(frozen=True)
class DilocoSpec:
    """Inner (AdamW) and outer (Nesterov SGD) optimisation settings."""

    inner_steps: int
    inner_lr: float
    warmup_steps: int
    schedule: str
    weight_decay: float
    batch_size: int
    seq_len: int
    outer_lr: float
    outer_momentum: float
    nesterov: bool
    #: "sequential": round r's outer step before round r + 1's inner steps. "overlapped": round r's
    #: all-reduce runs while round r + 1 trains, and its outer step is applied one round late
    #: (docs/architecture.md, "Overlapped outer steps"). In the canonical form only when overlapped, so
    #: that runs published before it existed keep their run_id.
    outer_update: str = "sequential"


@dataclass(frozen=True)
class AveragingSpec:
    """Group all-reduce: target and minimum group size, pseudo-gradient compression, deadlines."""

    group_size: int
    min_group: int
    compression: str
    round_deadline_s: float
    matchmaking_s: float
    #: "mean", or "centered_clip": robust to a minority of arbitrarily bad contributions (the default,
    #: except in allowlist runs).
    reducer: str = "centered_clip"


@dataclass(frozen=True)
class AdmissionSpec:
    """Who may train: everyone ("open"), listed peer IDs ("allowlist"), or holders of researcher tickets."""

    policy: str
    peers: tuple[str, ...]


@dataclass(frozen=True)
class GossipSpec:
    """Per-author gossip rate: messages per second and burst, enforced by every node for every author."""

    author_rate: float = 20.0
    author_burst: float = 100.0


@dataclass(frozen=True)
class InitSpec:
    """Initial weights: from `seed` (when `sha256` is empty) or a published state with this hash."""

    seed: int
    sha256: str


@dataclass(frozen=True)
class RlSpec:
    """An RL run's settings (`kind = "rl"`): environment, GRPO group, generation, staleness, checks."""

    #: Entry-point name of the environment (group `intellect_node.environments`), e.g. "reverse".
    env: str
    #: Distinct prompts per policy step.
    prompts_per_step: int
    #: Completions sampled per prompt: the GRPO group whose rewards are normalised together (≥ 2).
    samples_per_prompt: int
    #: Most tokens generated per completion.
    max_new_tokens: int
    #: Sampling temperature (> 0).
    temperature: float
    #: How many policy versions a rollout may lag behind the trainer's current version.
    max_async_level: int = 2
    #: Fraction of rollout batches whose log-probabilities a trainer recomputes, in [0, 1].
    verify_rate: float = 0.1
    #: PPO clipping: the importance ratio is clipped to [1 − clip_eps, 1 + clip_eps].
    clip_eps: float = 0.2
    #: Weight of the KL penalty to the reference policy (k3 estimator); 0 disables it.
    kl_coef: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "env": self.env,
            "prompts_per_step": self.prompts_per_step,
            "samples_per_prompt": self.samples_per_prompt,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "max_async_level": self.max_async_level,
            "verify_rate": self.verify_rate,
            "clip_eps": self.clip_eps,
            "kl_coef": self.kl_coef,
        }


@dataclass(frozen=True)
class Manifest:
    """A validated run manifest: build with `load_manifest_toml`, `parse_manifest`, `from_canonical_bytes`."""

    name: str
    protocol_version: int
    token_budget: int
    model: ModelSpec
    tokenizer: TokenizerSpec
    shards: tuple[ShardSpec, ...]
    diloco: DilocoSpec
    averaging: AveragingSpec
    admission: AdmissionSpec
    init: InitSpec
    #: Gossip limits; a table in the canonical form only when it differs from the defaults (so that runs
    #: published before it existed keep their run_id).
    gossip: GossipSpec = GossipSpec()
    #: Peer ID of the researcher who signed the run. Empty in a TOML file; `SignedManifest.sign` fills it
    #: in, so the run_id covers the researcher: re-signing someone else's manifest makes another run.
    researcher: str = ""
    #: "pretrain" or "rl". `kind` and the `rl` table are in the canonical form only for RL runs, so
    #: pretraining runs published before RL existed keep their run_id.
    kind: str = "pretrain"
    #: The RL settings: present exactly when `kind == "rl"`.
    rl: RlSpec | None = None

    def to_plain(self) -> dict[str, Any]:
        """Nested dicts/lists of str, int, float and bool: the manifest's canonical content."""
        plain = self._plain()
        if self.kind != "pretrain":
            plain["kind"] = self.kind
        if self.rl is not None:
            plain["rl"] = self.rl.to_dict()
        if self.researcher:
            plain["researcher"] = self.researcher
        if self.gossip != GossipSpec():
            plain["gossip"] = {
                "author_rate": self.gossip.author_rate,
                "author_burst": self.gossip.author_burst,
            }
        return plain

    def _plain(self) -> dict[str, Any]:
        d = self.diloco
        return {
            "name": self.name,
            "protocol_version": self.protocol_version,
            "token_budget": self.token_budget,
            "model": {"preset": self.model.preset, **self.model.to_dict()},
            "tokenizer": {
                "kind": self.tokenizer.kind,
                "sha256": self.tokenizer.sha256,
                "uri": self.tokenizer.uri,
            },
            "data": {"shards": [s.to_dict() for s in self.shards]},
            "diloco": {
                "inner_steps": self.diloco.inner_steps,
                "inner_lr": self.diloco.inner_lr,
                "warmup_steps": self.diloco.warmup_steps,
                "schedule": self.diloco.schedule,
                "weight_decay": self.diloco.weight_decay,
                "batch_size": self.diloco.batch_size,
                "seq_len": self.diloco.seq_len,
                "outer_lr": self.diloco.outer_lr,
                "outer_momentum": self.diloco.outer_momentum,
                "nesterov": self.diloco.nesterov,
                **({"outer_update": d.outer_update} if d.outer_update != "sequential" else {}),
            },
            "averaging": {
                "group_size": self.averaging.group_size,
                "min_group": self.averaging.min_group,
                "compression": self.averaging.compression,
                "round_deadline_s": self.averaging.round_deadline_s,
                "matchmaking_s": self.averaging.matchmaking_s,
                "reducer": self.averaging.reducer,
            },
            "admission": {"policy": self.admission.policy, "peers": list(self.admission.peers)},
            "init": {"seed": self.init.seed, "sha256": self.init.sha256},
        }

    def canonical_bytes(self) -> bytes:
        """Deterministic msgpack (sorted keys) of `to_plain()`: what is hashed and signed."""
        return packb_canonical(self.to_plain())

    @property
    def run_id(self) -> str:
        """sha256 hex of the canonical bytes."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    @property
    def param_count(self) -> int:
        return self.model.param_count()

    @property
    def total_tokens(self) -> int:
        """Tokens across all shards."""
        return sum(s.tokens for s in self.shards)

    def max_tokens_per_round(self) -> int:
        """The most tokens one peer can honestly claim for a round (H × batch × seq_len)."""
        return self.diloco.inner_steps * self.diloco.batch_size * self.diloco.seq_len

    @classmethod
    def from_canonical_bytes(cls, data: bytes) -> Manifest:
        """Parse wire bytes; refuses oversized, malformed, invalid or non-canonical encodings."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError("<manifest>", f"{len(data)} bytes exceeds {MAX_MANIFEST_BYTES}")
        plain = unpackb_limited(data, MAX_MANIFEST_BYTES)
        manifest = parse_manifest(plain)
        if manifest.canonical_bytes() != data:
            raise ManifestError("<manifest>", "bytes are not in canonical form")
        return manifest


def parse_manifest(raw: Any) -> Manifest:
    """Validate a plain mapping (parsed TOML or decoded msgpack) into a `Manifest`, or raise ManifestError."""
    root = _Section("", raw)
    name = root.get_str("name", check=_run_name)
    version = root.get_int("protocol_version", 1, 1 << 16)
    if version != PROTOCOL_VERSION:
        raise ManifestError("protocol_version", f"this node speaks version {PROTOCOL_VERSION}, got {version}")
    token_budget = root.get_int("token_budget", 1, 1 << 60)

    m = root.table("model")
    model = ModelSpec(
        preset=m.get_str(
            "preset", default="", check=lambda v: None if len(v) <= 64 else "at most 64 characters"
        ),
        dim=m.get_int("dim", 8, 1 << 16),
        n_layers=m.get_int("n_layers", 1, 1024),
        n_heads=m.get_int("n_heads", 1, 1024),
        n_kv_heads=m.get_int("n_kv_heads", 1, 1024),
        ffn_dim=m.get_int("ffn_dim", 8, 1 << 20),
        vocab_size=m.get_int("vocab_size", 2, 1 << 22),
        max_seq_len=m.get_int("max_seq_len", 2, 1 << 20),
        rope_theta=m.get_float("rope_theta", 0.0, 1e12, lo_open=True),
        norm_eps=m.get_float("norm_eps", 0.0, 1.0, lo_open=True),
    )
    m.done()
    if model.dim % model.n_heads:
        raise ManifestError("model.n_heads", f"must divide model.dim ({model.dim}), got {model.n_heads}")
    if (model.dim // model.n_heads) % 2:
        raise ManifestError("model.n_heads", "dim / n_heads must be even (rotary embeddings)")
    if model.n_heads % model.n_kv_heads:
        raise ManifestError(
            "model.n_kv_heads", f"must divide model.n_heads ({model.n_heads}), got {model.n_kv_heads}"
        )
    params = model.param_count()
    if params > MAX_PARAMS:
        raise ManifestError(
            "model", f"~{params / 1e9:.1f}B parameters exceeds the limit of {MAX_PARAMS / 1e9:.0f}B"
        )

    t = root.table("tokenizer")
    kind = t.get_str("kind", choices=TOKENIZER_KINDS)
    tokenizer = TokenizerSpec(
        kind=kind,
        sha256=t.get_str("sha256", default="", check=_hex64 if kind == "hf" else _hex64_or_empty),
        uri=t.get_str("uri", default="", check=_uri if kind == "hf" else None),
    )
    t.done()
    if kind == "byte" and model.vocab_size < 256:
        raise ManifestError(
            "model.vocab_size", f"the byte tokenizer needs at least 256, got {model.vocab_size}"
        )

    d = root.table("data")
    shard_rows = d.array("shards", MAX_SHARDS)
    d.done()
    if not shard_rows:
        raise ManifestError("data.shards", "at least one shard is required")
    shards = []
    seen_uris: set[str] = set()
    for i, row in enumerate(shard_rows):
        s = _Section(f"data.shards[{i}]", row)
        shard = ShardSpec(
            uri=s.get_str("uri", check=_uri),
            sha256=s.get_str("sha256", check=_hex64),
            tokens=s.get_int("tokens", 1, 1 << 48),
        )
        s.done()
        if shard.uri in seen_uris:
            raise ManifestError(f"data.shards[{i}].uri", f"duplicate shard {shard.uri!r}")
        seen_uris.add(shard.uri)
        shards.append(shard)

    g = root.table("diloco")
    diloco = DilocoSpec(
        inner_steps=g.get_int("inner_steps", 1, 1_000_000),
        inner_lr=g.get_float("inner_lr", 0.0, 10.0, lo_open=True),
        warmup_steps=g.get_int("warmup_steps", 0, 10_000_000, default=0),
        schedule=g.get_str("schedule", default="cosine", choices=SCHEDULES),
        weight_decay=g.get_float("weight_decay", 0.0, 10.0, default=0.1),
        batch_size=g.get_int("batch_size", 1, 1 << 16),
        seq_len=g.get_int("seq_len", 2, 1 << 20),
        outer_lr=g.get_float("outer_lr", 0.0, 10.0, lo_open=True, default=0.7),
        outer_momentum=g.get_float("outer_momentum", 0.0, 0.999999, default=0.9),
        nesterov=g.get_bool("nesterov", default=True),
        outer_update=g.get_str("outer_update", default="sequential", choices=OUTER_UPDATES),
    )
    g.done()
    if diloco.seq_len > model.max_seq_len:
        raise ManifestError(
            "diloco.seq_len", f"must be at most model.max_seq_len ({model.max_seq_len}), got {diloco.seq_len}"
        )
    logits = diloco.batch_size * diloco.seq_len * model.vocab_size * 4
    if logits > MAX_LOGITS_BYTES:
        raise ManifestError(
            "diloco.batch_size",
            f"batch × seq_len × vocab × 4 bytes = {logits / 2**30:.1f} GiB of logits, "
            f"more than {MAX_LOGITS_BYTES >> 30} GiB",
        )

    a = root.table("averaging")
    averaging = AveragingSpec(
        group_size=a.get_int("group_size", 1, 4096),
        min_group=a.get_int("min_group", 1, 4096, default=1),
        compression=a.get_str("compression", default="int8", choices=COMPRESSIONS),
        round_deadline_s=a.get_float("round_deadline_s", 0.0, 86_400.0, lo_open=True),
        matchmaking_s=a.get_float("matchmaking_s", 0.0, 3_600.0, lo_open=True, default=5.0),
        # Filled in below: the default depends on who is admitted.
        reducer=a.get_str("reducer", default="", choices=("", *REDUCERS)),
    )
    a.done()
    if averaging.min_group > averaging.group_size:
        raise ManifestError(
            "averaging.min_group",
            f"must be at most averaging.group_size ({averaging.group_size}), got {averaging.min_group}",
        )

    ad = root.table("admission")
    policy = ad.get_str("policy", choices=ADMISSION_POLICIES)
    peer_rows = ad.array("peers", MAX_ALLOWLIST, default=[])
    ad.done()
    peers = []
    for i, p in enumerate(peer_rows):
        if not isinstance(p, str):
            raise ManifestError(f"admission.peers[{i}]", f"must be a peer ID string, got {_type_name(p)}")
        if (why := _peer_id(p)) is not None:
            raise ManifestError(f"admission.peers[{i}]", why)
        peers.append(p)
    if policy == "allowlist" and not peers:
        raise ManifestError("admission.peers", "an allowlist needs at least one peer ID")
    if policy != "allowlist" and peers:
        raise ManifestError("admission.peers", f'only used with policy = "allowlist", not {policy!r}')
    admission = AdmissionSpec(policy=policy, peers=tuple(sorted(set(peers))))
    if not averaging.reducer:
        # A run that admits strangers averages robustly unless its researcher says otherwise; one with a
        # closed allowlist keeps the exact mean (docs/decisions.md, "Robust reduction by default").
        default = "mean" if policy == "allowlist" else "centered_clip"
        averaging = dataclasses.replace(averaging, reducer=default)

    i_ = root.table("init")
    init = InitSpec(
        seed=i_.get_int("seed", 0, (1 << 63) - 1, default=0),
        sha256=i_.get_str("sha256", default="", check=_hex64_or_empty),
    )
    i_.done()
    g = root.table("gossip", optional=True)
    gossip = GossipSpec(
        author_rate=g.get_float("author_rate", 0.0, 10_000.0, lo_open=True, default=GossipSpec.author_rate),
        author_burst=g.get_float("author_burst", 1.0, 100_000.0, default=GossipSpec.author_burst),
    )
    g.done()
    researcher = root.get_str("researcher", default="", check=lambda v: _peer_id(v) if v else None)
    kind = root.get_str("kind", default="pretrain", choices=RUN_KINDS)
    rl = _parse_rl(root, kind, model)
    root.done()
    if rl is not None and diloco.outer_update != "sequential":
        # A policy version is a committed round, and round r's GRPO steps must start from version r - 1:
        # the overlapped update starts them before that version exists.
        raise ManifestError("diloco.outer_update", 'an RL run needs "sequential"')

    manifest = Manifest(
        name=name,
        protocol_version=version,
        token_budget=token_budget,
        model=model,
        tokenizer=tokenizer,
        shards=tuple(shards),
        diloco=diloco,
        averaging=averaging,
        admission=admission,
        init=init,
        gossip=gossip,
        researcher=researcher,
        kind=kind,
        rl=rl,
    )
    size = len(manifest.canonical_bytes())
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError("<manifest>", f"canonical form is {size} bytes, more than {MAX_MANIFEST_BYTES}")
    return manifest


_ENV_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def _env_name(v: str) -> str | None:
    if _ENV_NAME.match(v):
        return None
    return "must be an environment entry-point name: 1-64 of a-z, 0-9, '_', '.', '-' (starting a-z or 0-9)"


def _parse_rl(root: _Section, kind: str, model: ModelSpec) -> RlSpec | None:
    """The `[rl]` table: required when kind = "rl", refused otherwise."""
    if kind != "rl":
        if "rl" in root.raw:
            raise ManifestError("rl", f'only allowed with kind = "rl", not {kind!r}')
        return None
    if "rl" not in root.raw:
        raise ManifestError("rl", 'missing (required when kind = "rl")')
    r = root.table("rl")
    spec = RlSpec(
        env=r.get_str("env", check=_env_name),
        prompts_per_step=r.get_int("prompts_per_step", 1, 1 << 16),
        samples_per_prompt=r.get_int("samples_per_prompt", 2, 1024),
        max_new_tokens=r.get_int("max_new_tokens", 1, 1 << 16),
        temperature=r.get_float("temperature", 0.0, 10.0, lo_open=True),
        max_async_level=r.get_int("max_async_level", 0, 64, default=RlSpec.max_async_level),
        verify_rate=r.get_float("verify_rate", 0.0, 1.0, default=RlSpec.verify_rate),
        clip_eps=r.get_float("clip_eps", 0.0, 1.0, lo_open=True, default=RlSpec.clip_eps),
        kl_coef=r.get_float("kl_coef", 0.0, 100.0, default=RlSpec.kl_coef),
    )
    r.done()
    if spec.max_new_tokens >= model.max_seq_len:
        raise ManifestError(
            "rl.max_new_tokens",
            f"must be less than model.max_seq_len ({model.max_seq_len}), got {spec.max_new_tokens}",
        )
    return spec


def load_manifest_toml(path: Path | str) -> Manifest:
    """Read and validate a TOML manifest; ManifestError names the field (or the file) and the reason."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ManifestError(str(path), f"cannot read: {e.strerror}") from None
    if size > MAX_TOML_BYTES:
        raise ManifestError(str(path), f"{size} bytes is larger than the {MAX_TOML_BYTES}-byte limit")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(str(path), f"not valid TOML: {e}") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ManifestError(str(path), "nested too deeply to be a manifest") from None
    if toml_depth(raw) > MAX_TOML_DEPTH:
        raise ManifestError(str(path), f"nested deeper than {MAX_TOML_DEPTH} levels")
    return parse_manifest(raw)


#: Deepest nesting of tables and arrays a manifest may have (real ones have 3).
MAX_TOML_DEPTH = 16


def toml_depth(value: object) -> int:
    """How deeply `value` nests dicts and lists, without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


# ---- signed manifests ------------------------------------------------------------------------------


@message(100, max_size=MAX_MANIFEST_BYTES + 1024)
@dataclass(frozen=True)
class SignedManifestMsg:
    """Wire form of a signed manifest: canonical manifest bytes, researcher peer ID, Ed25519 signature."""

    manifest: bytes
    researcher: str
    sig: bytes


@dataclass(frozen=True)
class SignedManifest:
    """A manifest with its researcher's signature over `domains.MANIFEST || canonical bytes`."""

    manifest: Manifest
    researcher: str
    sig: bytes

    @classmethod
    def sign(cls, manifest: Manifest, researcher: Identity) -> SignedManifest:
        """Bind the manifest to `researcher` (its `researcher` field, hence its run_id) and sign it."""
        if manifest.researcher not in ("", researcher.peer_id):
            raise ManifestError("researcher", f"names {manifest.researcher}, not the signing key")
        bound = dataclasses.replace(manifest, researcher=researcher.peer_id)
        return cls(bound, researcher.peer_id, researcher.sign(domains.MANIFEST, bound.canonical_bytes()))

    @property
    def run_id(self) -> str:
        return self.manifest.run_id

    def verify(self) -> bool:
        """True when the manifest names this researcher and their signature covers exactly it."""
        if self.manifest.researcher != self.researcher:
            return False
        return verify(self.researcher, domains.MANIFEST, self.manifest.canonical_bytes(), self.sig)

    def to_bytes(self) -> bytes:
        return encode(SignedManifestMsg(self.manifest.canonical_bytes(), self.researcher, self.sig))

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedManifest:
        """Decode (size-limited) and parse; the caller still has to `verify()`."""
        msg = decode(data, expected=SignedManifestMsg)
        return cls(Manifest.from_canonical_bytes(msg.manifest), msg.researcher, msg.sig)
