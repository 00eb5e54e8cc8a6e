"""Node configuration: one frozen dataclass, layered file < environment < command-line flags.

The file is TOML (`<data dir>/config.toml`, written commented by `intellect-node init`); every field can
be overridden by `INTELLECT_NODE_<FIELD>` in the environment, and an environment variable with that
prefix that names no field is an error rather than a silent typo.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
from intellect.node.app.runid import RunIdError, check_prefix
from intellect.protocol.manifest import MAX_TOML_DEPTH, toml_depth

ENV_PREFIX = "INTELLECT_NODE_"
CONFIG_FILE_NAME = "config.toml"
IDENTITY_FILE_NAME = "identity.key"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the field."""


def default_data_dir() -> Path:
    """The per-user data directory by platform convention (XDG on Linux, ~/Library on macOS)."""
    return Path(platformdirs.user_data_dir("intellect-node", appauthor=False))


#: The roles a node can take (`NodeConfig.role`).
ROLES = ("trainer", "rollout")


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node needs to start. Each field is documented where it is declared."""

    #: Where the identity, config, checkpoints and shards live.
    data_dir: Path = field(default_factory=default_data_dir)
    #: Multiaddrs of DHT entry nodes (`/ip4/…/tcp/…/p2p/12D3KooW…`).
    bootstrap: tuple[str, ...] = ()
    #: Multiaddrs the p2p daemon listens on.
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    #: Multiaddrs announced to others instead of the listen ones (a NAT's public address).
    announce: tuple[str, ...] = ()
    #: Join the DHT as a client only: reachable peers do not store records on us (behind NAT).
    client_mode: bool = False
    #: Accept relayed connections (libp2p circuit relay v2).
    use_relay: bool = True
    #: Look for relays automatically when we are not publicly reachable.
    use_auto_relay: bool = False
    #: Whether others can dial us: "auto" (libp2p's AutoNAT decides), "public" (say so: e.g. a bootstrap
    #: node, which then serves as a circuit relay), or "private" (behind a NAT with no forwarding: keep a
    #: relay reservation on the bootstrap nodes, announce only relayed addresses, join the DHT as a client).
    reachability: str = "auto"
    #: Run to join (its ID or a unique prefix); empty means the best run this node can verify and is
    #: admitted to.
    run: str = ""
    #: What the node does in its run: "trainer" (a member: trains and averages; the only role of a
    #: pretraining run) or "rollout" (an RL run's rollout worker: generates verified rollouts for the
    #: trainers, is never a member of a group).
    role: str = "trainer"
    #: Training device: auto (CUDA when present), cpu or cuda.
    device: str = "auto"
    #: Ranks that train inside this node with torch.distributed, each on its share of the batch (one per
    #: GPU; on CPU, processes with gloo). 0: one per visible GPU when training on CUDA, else 1.
    local_ranks: int = 0
    #: Port of the local control API on 127.0.0.1 (0 picks a free port and writes it to the data dir).
    http_port: int = 0
    #: Also serve `/metrics` (and nothing else) on this HOST:PORT, e.g. "0.0.0.0:9100" for a Prometheus
    #: outside the container or pod; empty: metrics only on the control API (127.0.0.1).
    metrics_addr: str = ""
    #: Log format: "text" (rich on a terminal) or "json" (one object per line).
    log_format: str = "text"
    #: Log level name.
    log_level: str = "INFO"
    # ---- volunteer limits (docs/user-guide.md, "Limits and pausing") ----
    #: CPU threads torch trains with (OMP_NUM_THREADS of the node and its local-rank workers); 0: torch's.
    cpu_threads: int = 0
    #: Niceness added at start (0..19): the lower priority that lets the owner's programs run first.
    nice: int = 0
    #: cgroup v2 `cpu.weight` of the node's own cgroup (1..10000, 100 is the default share); 0: leave it.
    cpu_weight: int = 0
    #: Cap on the GPU memory this process may use, as a fraction of the device's (0 < f <= 1); 0: no cap.
    gpu_memory_fraction: float = 0.0
    #: Train only when the machine has been idle this many minutes: no user input (where it can be read)
    #: and other processes' CPU load under `idle_cpu_percent`; 0: always.
    only_when_idle_minutes: int = 0
    #: What "idle" allows of other processes' CPU load, in percent of all cores.
    idle_cpu_percent: float = 25.0
    #: Pause while the machine runs on battery.
    pause_on_battery: bool = False
    #: When the node may train, in local time: e.g. "mon-fri 19:00-07:00, sat-sun 00:00-24:00"; "": always.
    schedule: str = ""
    #: Upload and download rate limits of the data plane and state sync, in megabits per second; 0: none.
    max_upload_mbps: float = 0.0
    max_download_mbps: float = 0.0
    #: Pause for the rest of the UTC day once this many gigabytes moved (both ways); 0: no cap.
    daily_transfer_gb: float = 0.0
    #: Disk cap for checkpoints and shards, in gigabytes; 0: no cap.
    max_disk_gb: float = 0.0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"role: must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device: must be auto, cpu or cuda, got {self.device!r}")
        if self.reachability not in ("auto", "public", "private"):
            raise ConfigError(f"reachability: must be auto, public or private, got {self.reachability!r}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format: must be text or json, got {self.log_format!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level: must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        if not 0 <= self.local_ranks <= 64:
            raise ConfigError(f"local_ranks: must be 0 (one per GPU) to 64, got {self.local_ranks}")
        if not 0 <= self.http_port <= 65535:
            raise ConfigError(f"http_port: must be a port number 0..65535, got {self.http_port}")
        self._check_limits()
        if self.metrics_addr:
            parse_host_port(self.metrics_addr, "metrics_addr")
        if self.run:
            try:  # a run ID or a unique prefix of one, lowercased
                object.__setattr__(self, "run", check_prefix(self.run))
            except RunIdError as e:
                raise ConfigError(f"run: {e}") from None

    def _check_limits(self) -> None:
        if not 0 <= self.cpu_threads <= 1024:
            raise ConfigError(f"cpu_threads: must be 0 (torch's default) to 1024, got {self.cpu_threads}")
        if not 0 <= self.nice <= 19:
            raise ConfigError(f"nice: must be 0 to 19 (a node only lowers its priority), got {self.nice}")
        if not 0 <= self.cpu_weight <= 10000:
            raise ConfigError(f"cpu_weight: must be 0 (leave it) or 1 to 10000, got {self.cpu_weight}")
        if not 0.0 <= self.gpu_memory_fraction <= 1.0:
            raise ConfigError(
                f"gpu_memory_fraction: must be 0 (no cap) or in (0, 1], got {self.gpu_memory_fraction}"
            )
        if not 0 <= self.only_when_idle_minutes <= 24 * 60:
            raise ConfigError(
                f"only_when_idle_minutes: must be 0 (always) to 1440, got {self.only_when_idle_minutes}"
            )
        if not 0.0 <= self.idle_cpu_percent <= 100.0:
            raise ConfigError(f"idle_cpu_percent: must be 0 to 100, got {self.idle_cpu_percent}")
        for name in ("max_upload_mbps", "max_download_mbps", "daily_transfer_gb", "max_disk_gb"):
            value = getattr(self, name)
            if not 0.0 <= value < 1e9 or value != value:
                raise ConfigError(f"{name}: must be 0 (no limit) or a positive number, got {value}")
        if self.schedule:
            from intellect.node.app.schedule import ScheduleError, parse_schedule

            try:
                parse_schedule(self.schedule)
            except ScheduleError as e:
                raise ConfigError(f"schedule: {e}") from None

    @property
    def identity_path(self) -> Path:
        return self.data_dir / IDENTITY_FILE_NAME

    @property
    def config_path(self) -> Path:
        return self.data_dir / CONFIG_FILE_NAME


def parse_host_port(text: str, name: str = "address") -> tuple[str, int]:
    """("0.0.0.0", 9100) from "0.0.0.0:9100" ("[::]:9100" for IPv6); ConfigError naming `name` if not."""
    host, sep, port = text.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{name}: must be HOST:PORT with a port 1..65535 (e.g. 0.0.0.0:9100), got {text!r}")
    return host, int(port)


_FIELDS = {f.name: f for f in dataclasses.fields(NodeConfig)}
#: Settings that existed once, and why they are gone: named in the error instead of "unknown".
_REMOVED = {
    "gossip_port": "gossip runs over the p2p daemon's connections since 0.1 and has no port of its own; "
    "delete this setting (forward only the p2p port)",
}


def _known(name: str, where: str) -> None:
    if name in _REMOVED:
        raise ConfigError(f"{where}: {name} is no longer a setting: {_REMOVED[name]}")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _coerce(name: str, value: Any, source: str) -> Any:
    """Turn a file or environment value into the field's type, or raise ConfigError naming it."""
    kind = _FIELDS[name].type
    try:
        if kind == "Path":
            return Path(value).expanduser()
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
                return value.lower() in _TRUE
            raise ValueError("expected a boolean")
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if kind == "int":
            # int(1.5) would silently truncate a TOML float; int("1.5") and int(True) are errors too.
            if isinstance(value, bool | float):
                raise ValueError("expected an integer")
            return int(value)
        if kind == "tuple[str, ...]":
            if isinstance(value, str):
                return tuple(v for v in (p.strip() for p in value.replace(",", " ").split()) if v)
            if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
                return tuple(value)
            raise ValueError("expected a list of strings")
        if not isinstance(value, str):
            raise ValueError("expected a string")
        return value
    except ValueError as e:
        raise ConfigError(f"{name} (from {source}): {e}: {value!r}") from None


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        _known(name, f"environment {key}")
        if name not in _FIELDS:
            known = ", ".join(ENV_PREFIX + n.upper() for n in _FIELDS)
            raise ConfigError(f"unknown environment variable {key}; known: {known}")
        out[name] = _coerce(name, value, f"environment {key}")
    return out


def _from_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ConfigError(f"{path}: nested too deeply to be a configuration") from None
    # Whether tomllib recursed out depends on how deep the caller's stack already was: check the result too.
    if toml_depth(raw) > MAX_TOML_DEPTH:
        raise ConfigError(f"{path}: nested too deeply to be a configuration (over {MAX_TOML_DEPTH} levels)")
    out: dict[str, Any] = {}
    for name, value in raw.items():
        _known(name, str(path))
        if name not in _FIELDS:
            known = ", ".join(n for n in _FIELDS if n != "data_dir")
            raise ConfigError(f"{path}: unknown key {name!r}; known keys: {known}")
        if name == "data_dir":
            # The file lives in the data directory, so it cannot also choose it: use the flag or env.
            raise ConfigError(
                f"{path}: data_dir cannot be set in the config file; use --data-dir or {ENV_PREFIX}DATA_DIR"
            )
        out[name] = _coerce(name, value, str(path))
    return out


def load_config(
    data_dir: Path | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> NodeConfig:
    """Build the config: defaults < `config.toml` < `INTELLECT_NODE_*` < flags (None flags are unset)."""
    env = _from_env(os.environ if environ is None else environ)
    flag_values = {k: v for k, v in (flags or {}).items() if v is not None and v != ()}
    for name in flag_values:
        if name not in _FIELDS:
            raise ConfigError(f"unknown option {name!r}")
    if data_dir is None:
        data_dir = env.get("data_dir") or default_data_dir()
    data_dir = Path(data_dir).expanduser()
    values: dict[str, Any] = {"data_dir": data_dir}
    values.update(_from_file(data_dir / CONFIG_FILE_NAME))
    values.update(env)
    values.update({k: _coerce(k, v, "command line") for k, v in flag_values.items()})
    values["data_dir"] = data_dir
    return NodeConfig(**values)


DEFAULT_CONFIG_TEXT = """\
# intellect-node configuration. Every key can be overridden by INTELLECT_NODE_<KEY> in the
# environment (e.g. INTELLECT_NODE_BOOTSTRAP), and command-line flags override both.

# DHT entry nodes, full multiaddrs ending in /p2p/<peer id>.
bootstrap = []

# Where the p2p daemon listens. Behind NAT, forward a fixed port and set `announce` to the public
# address, or set client_mode = true and use_auto_relay = true (see docs/user-guide.md).
listen = ["/ip4/0.0.0.0/tcp/0"]
announce = []
client_mode = false
use_relay = true
use_auto_relay = false
# "auto", "public" (a bootstrap or forwarded node; it relays for others) or "private" (behind a NAT: reached
# through a relay reservation on the bootstrap nodes).
reachability = "auto"

# Run to join: its ID or a unique prefix ("" = the best run this node can verify and is admitted to).
run = ""

# "trainer" (train and average: every pretraining node) or "rollout" (an RL run's rollout worker:
# generates verified rollouts for the trainers and is never a member of an averaging group).
role = "trainer"

# Training device: "auto", "cpu" or "cuda".
device = "auto"
# Ranks training inside this node (torch.distributed, each on its share of the run's batch):
# 0 = one per visible GPU when training on CUDA, else 1.
local_ranks = 0

# Local control API on 127.0.0.1 (0 = any free port, written to <data dir>/http.port).
# Gossip, state sync and averaging need no port of their own: they run over the p2p daemon's connections.
http_port = 0
# Also serve /metrics alone on HOST:PORT for a Prometheus on another host, container or pod, e.g.
# "0.0.0.0:9100" ("" = metrics only on the control API, 127.0.0.1). Status and dashboard never leave it.
metrics_addr = ""

# "text" or "json" log lines; level DEBUG, INFO, WARNING or ERROR.
log_format = "text"
log_level = "INFO"

# Volunteer limits (docs/user-guide.md, "Limits and pausing"); 0 or "" means no limit.
# CPU: threads torch uses, niceness added at start (0..19), cgroup v2 cpu.weight (1..10000, 0: leave it).
cpu_threads = 0
nice = 0
cpu_weight = 0
# Largest share of the GPU's memory this node may use (0 < f <= 1; 0: no cap).
gpu_memory_fraction = 0.0
# Train only after this many minutes without user input and with other processes' CPU load under
# idle_cpu_percent (of all cores); pause while on battery.
only_when_idle_minutes = 0
idle_cpu_percent = 25.0
pause_on_battery = false
# When to train, local time, e.g. "mon-fri 19:00-07:00, sat-sun 00:00-24:00" ("" = always).
schedule = ""
# Data-plane and state-sync rate limits (megabits per second), and a cap per UTC day (gigabytes, both ways).
max_upload_mbps = 0.0
max_download_mbps = 0.0
daily_transfer_gb = 0.0
# Disk cap for checkpoints and shards, in gigabytes.
max_disk_gb = 0.0
"""
