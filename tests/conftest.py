"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from intellect.crypto.identity import Identity
from intellect.node.app.config import NodeConfig
from intellect.node.app.daemon import NodeDaemon, RunService, load_run_manifest
from intellect.protocol.manifest import Manifest, SignedManifest

OfflineRun = Callable[..., RunService]


@pytest.fixture
def offline_run() -> OfflineRun:
    """Builds the daemon's run service with no network (no DHT, no gossip): for tests of its round-0
    setup, checkpoints and message handlers. `offline_run(config, manifest=None)`; the manifest defaults
    to the built-in tiny run, signed by a fresh researcher key."""

    def make(config: NodeConfig, manifest: Manifest | None = None) -> RunService:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        signed = SignedManifest.sign(manifest or load_run_manifest(), Identity.generate())
        return RunService(NodeDaemon(config), Identity.generate(), None, None, signed, {}, b"")  # type: ignore[arg-type]

    return make
