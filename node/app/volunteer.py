"""Volunteer limits applied once at start: CPU threads, priority, cgroup CPU weight and a GPU memory cap.

Each is reported in the node's status as applied, or as "unavailable: why" (never pretended): a cgroup
v2 `cpu.weight` can be written only where the node's own cgroup is delegated to its user (a systemd
service with `Delegate=`, a container that owns its cgroup), and a GPU cap needs CUDA.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from intellect.node.app.config import NodeConfig

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


def own_cgroup(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> Path | None:
    """This process's cgroup v2 directory, or None where there is no unified hierarchy."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, _, path = line.partition("::")
        if hierarchy == "0":
            return root / path.lstrip("/")
    return None


def set_cpu_weight(weight: int, cgroup: Path | None) -> str:
    """Write `weight` to the cgroup's cpu.weight; what happened, in words for the status."""
    if cgroup is None:
        return "unavailable: no cgroup v2 hierarchy"
    target = cgroup / "cpu.weight"
    if not target.exists():
        return f"unavailable: {target} does not exist (cpu controller not enabled there)"
    try:
        target.write_text(f"{weight}\n")
    except OSError as e:
        return f"unavailable: cannot write {target}: {e.strerror}"
    return str(weight)


def apply_cpu(config: NodeConfig) -> dict[str, Any]:
    """Threads (through OMP_NUM_THREADS, which the engine and local-rank workers read), niceness, and the
    cgroup weight; returns what the status shows."""
    out: dict[str, Any] = {}
    if config.cpu_threads:
        os.environ["OMP_NUM_THREADS"] = str(config.cpu_threads)
        out["cpu_threads"] = config.cpu_threads
    if config.nice:
        try:
            out["nice"] = os.nice(config.nice)  # the niceness now; inherited by our children
        except OSError as e:
            out["nice"] = f"unavailable: {e.strerror}"
    if config.cpu_weight:
        out["cpu_weight"] = set_cpu_weight(config.cpu_weight, own_cgroup())
    for name, value in out.items():
        logger.info("volunteer limit %s: %s", name, value)
    return out


def apply_gpu(config: NodeConfig) -> dict[str, Any]:
    """Cap this process's share of the GPU's memory (torch's caching allocator) where CUDA is used."""
    if not config.gpu_memory_fraction:
        return {}
    import torch

    if config.device == "cpu" or not torch.cuda.is_available():
        return {"gpu_memory_fraction": f"not applicable: training on CPU ({config.gpu_memory_fraction})"}
    for index in range(torch.cuda.device_count()):
        torch.cuda.set_per_process_memory_fraction(config.gpu_memory_fraction, index)
    return {"gpu_memory_fraction": config.gpu_memory_fraction}


def configured(config: NodeConfig) -> dict[str, Any]:
    """The limits that are set (non-zero) and are evaluated while the node runs, for the status."""
    names = (
        "only_when_idle_minutes",
        "pause_on_battery",
        "schedule",
        "max_upload_mbps",
        "max_download_mbps",
        "daily_transfer_gb",
        "max_disk_gb",
    )
    out = {n: getattr(config, n) for n in names if getattr(config, n)}
    if config.only_when_idle_minutes:
        out["idle_cpu_percent"] = config.idle_cpu_percent
    if config.max_disk_gb:  # the usage follows once the first checkpoint is written
        out["max_disk_gb"] = f"{config.max_disk_gb:g} GB"
    return out
