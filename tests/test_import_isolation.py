"""`intellect.crypto` and `intellect.protocol` import neither hivemind nor torch.

They are the pure layers: wire formats, signatures and rules, usable by tools that verify a run's records
without a p2p daemon or a GPU stack. Checked in a fresh interpreter, because this pytest process has long
since imported hivemind and torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

_CHECK = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    imported = []
    for package in ("intellect.crypto", "intellect.protocol"):
        pkg = importlib.import_module(package)
        for mod in pkgutil.walk_packages(pkg.__path__, package + "."):
            importlib.import_module(mod.name)
            imported.append(mod.name)
    heavy = sorted(
        name for name in sys.modules
        if name.split(".")[0] in ("hivemind", "torch", "libp2p")
    )
    print(json.dumps({"imported": imported, "heavy": heavy}))
    """
)


def test_crypto_and_protocol_import_no_hivemind_torch_or_libp2p() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "intellect.protocol.codec" in out["imported"]
    assert "intellect.protocol.envelope" in out["imported"]
    assert "intellect.crypto.identity" in out["imported"]
    assert out["heavy"] == [], f"crypto/protocol pulled in: {out['heavy']}"
