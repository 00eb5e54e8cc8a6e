"""A member SIGKILLed in the middle of an all-reduce: survivors never keep a partial average.

Three real peers, each a separate Python process with its own hivemind DHT node and p2p daemon, on
loopback. The victim (carol) sends her partition to exactly one survivor, then stops, and the test kills
her with SIGKILL. The survivors must notice, abort that attempt, form a new group without her and return
the exact weighted mean of their own two inputs (bit-identical between them), never a mix that includes
half of carol's contribution.

This file is also the peer program: `python test_averaging_swarm.py <index> <dir>`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

RUN_ID = "swarm-kill-test"
N_PEERS = 3
VICTIM = 2


def _inputs(index: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + index)
    return {"a": torch.randn(300, 200, generator=gen), "b": torch.randn(777, generator=gen) * (index + 1)}


def _weight(index: int) -> float:
    return 100.0 * (index + 1)


async def _peer(index: int, work: Path) -> None:
    from hivemind.dht.node import DHTNode
    from intellect.crypto.identity import Identity
    from intellect.node.net.averaging import Averager, AveragerConfig

    torch.set_num_threads(1)
    if index == 0:
        node = await DHTNode.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        maddrs = [str(m) for m in await node.protocol.p2p.get_visible_maddrs()]
        (work / "boot.tmp").write_text(json.dumps(maddrs))
        (work / "boot.tmp").rename(work / "boot.json")
    else:
        while not (work / "boot.json").exists():
            await asyncio.sleep(0.1)
        maddrs = json.loads((work / "boot.json").read_text())
        node = await DHTNode.create(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    (work / f"ready{index}").touch()
    while not all((work / f"ready{i}").exists() for i in range(N_PEERS)):
        await asyncio.sleep(0.1)

    config = AveragerConfig(target_group_size=N_PEERS, matchmaking_time=4.0, compression="none")
    ident = Identity.from_seed(bytes([index + 77]) * 32)
    async with Averager(node, ident, RUN_ID, config) as averager:
        if index == VICTIM:
            calls = 0

            async def stop_after_one_send(step: str) -> None:
                nonlocal calls
                calls += 1
                if calls > 1:  # the first partition goes out; the second never does
                    await asyncio.sleep(1.0)
                    (work / "victim-sent").touch()
                    await asyncio.sleep(3600)

            averager._fault = stop_after_one_send
        result = await averager.average(1, _inputs(index), _weight(index), time.time() + 90)
        meta = {"ok": result.ok, "reason": result.reason, "group": result.group, "attempts": result.attempts}
        if result.tensors is not None:
            for name, t in result.tensors.items():
                np.save(work / f"out{index}-{name}.npy", t.numpy())
        (work / f"result{index}.json").write_text(json.dumps(meta))
    await node.shutdown()


@pytest.mark.swarm
def test_sigkilled_member_never_leaves_a_partial_average(tmp_path: Path) -> None:
    procs: list[subprocess.Popen[bytes]] = []
    logs = [open(tmp_path / f"peer{i}.log", "wb") for i in range(N_PEERS)]  # noqa: SIM115
    try:
        for i in range(N_PEERS):
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, str(i), str(tmp_path)], stdout=logs[i], stderr=logs[i]
                )
            )
        stop = time.monotonic() + 120
        while not (tmp_path / "victim-sent").exists():
            assert time.monotonic() < stop, "the victim never reached the all-reduce"
            assert procs[VICTIM].poll() is None, "the victim exited before being killed"
            time.sleep(0.05)
        os.kill(procs[VICTIM].pid, signal.SIGKILL)
        for i, p in enumerate(procs):
            if i != VICTIM:
                p.wait(timeout=max(1.0, stop - time.monotonic()))
                assert p.returncode == 0, (tmp_path / f"peer{i}.log").read_text()[-3000:]
        assert procs[VICTIM].wait(timeout=10) == -signal.SIGKILL
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        for f in logs:
            f.close()

    survivors = [i for i in range(N_PEERS) if i != VICTIM]
    metas = {i: json.loads((tmp_path / f"result{i}.json").read_text()) for i in survivors}
    assert all(m["ok"] for m in metas.values()), metas
    assert all(m["attempts"] >= 2 for m in metas.values()), (
        metas
    )  # the first group failed, a second one made it
    assert all(len(m["group"]) == 2 for m in metas.values()), metas
    total = sum(_weight(i) for i in survivors)
    for name in _inputs(0):
        exact = sum(_inputs(i)[name].double() * (_weight(i) / total) for i in survivors)
        outs = [np.load(tmp_path / f"out{i}-{name}.npy", allow_pickle=False) for i in survivors]
        assert np.array_equal(outs[0], outs[1])  # bit-identical on every survivor
        assert np.allclose(
            outs[0], exact.numpy(), atol=1e-6, rtol=0
        )  # the survivors' mean, nothing of carol's


if __name__ == "__main__":
    asyncio.run(_peer(int(sys.argv[1]), Path(sys.argv[2])))
