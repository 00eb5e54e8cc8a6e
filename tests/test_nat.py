"""Volunteers behind home NATs train with everyone: real daemons in network namespaces the test builds.

One public host runs the bootstrap node (which relays) and a public volunteer; two volunteers sit behind
their own masquerading router with no port forwarding, so nobody can dial them. In these namespaces every
address is private (10.x), so libp2p's hole punching, which needs public addresses, cannot succeed: all
traffic between the two NAT'd volunteers goes through the bootstrap node's circuit relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from intellect.crypto.identity import Identity
from intellect.node.cli.swarm import Swarm, group_pids
from netlab import PUB_IP, Lab

# Skipped where no lab can be built (not root, no nftables), except in CI (`.ci/run` sets
# REQUIRE_NETNS_LAB): there a missing lab must fail, not pass silently.
pytestmark = [
    pytest.mark.swarm,
    pytest.mark.skipif(
        bool(Lab.available()) and not os.environ.get("REQUIRE_NETNS_LAB"), reason=Lab.available()
    ),
]

TINY = Path(__file__).resolve().parent.parent / "examples" / "tiny-run.toml"
CLI = [sys.executable, "-c", "from intellect.node.cli.main import main; main()"]
ROUNDS = 3


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTELLECT_NODE_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(nats=2) as built:
        yield built


@pytest.fixture
def bootstrapped(lab: Lab, tmp_path: Path) -> Iterator[str]:
    """The public bootstrap node running (its address); stopped and its process group killed afterwards."""
    boot, bootstrap = _bootstrap(lab, tmp_path)
    try:
        yield bootstrap
    finally:
        boot.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            boot.wait(20)
        _kill_group(boot)


@pytest.fixture
def seeded(lab: Lab, tmp_path: Path, bootstrapped: str) -> tuple[str, str]:
    """The tiny run seeded through the bootstrap node: (bootstrap address, run id)."""
    return bootstrapped, _seed(lab, tmp_path, bootstrapped)


def _bootstrap(lab: Lab, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`intellect-node bootstrap` on the public host, as a relay (reachability public); its address."""
    out = workdir / "bootstrap.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                lab.ns("pub"),
                *CLI,
                "bootstrap",
                "--data-dir",
                str(workdir / "boot"),
                "--listen",
                f"/ip4/{PUB_IP}/tcp/4001",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_env(INTELLECT_NODE_REACHABILITY="public"),
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in out.read_text(errors="replace").splitlines():
            if line.startswith(f"/ip4/{PUB_IP}/tcp/4001/p2p/"):
                return proc, line.strip()
        assert proc.poll() is None, out.read_text()
        time.sleep(0.3)
    raise AssertionError(f"the bootstrap node printed no address: {out.read_text()[-2000:]}")


def _seed(lab: Lab, workdir: Path, bootstrap: str) -> str:
    researcher = workdir / "researcher"
    researcher.mkdir()
    Identity.generate().save(researcher / "identity.key")
    done = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            lab.ns("pub"),
            *CLI,
            "seed",
            str(TINY),
            "--bootstrap",
            bootstrap,
            "--data-dir",
            str(researcher),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().splitlines()[-1]


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for pid in group_pids(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def _train(lab: Lab, workdir: Path, bootstrap: str, run_id: str) -> dict[str, object]:
    async with Swarm(workdir / "swarm", bootstrap_maddrs=[bootstrap]) as swarm:
        swarm.run_id = run_id
        public = ["--listen", f"/ip4/{PUB_IP}/tcp/0", "--reachability", "public"]
        private = ["--listen", "/ip4/0.0.0.0/tcp/0", "--reachability", "private"]
        peers = [
            swarm.launch("public", until_round=ROUNDS, min_peers=3, extra_args=public, netns=lab.ns("pub")),
            swarm.launch("nat1", until_round=ROUNDS, min_peers=3, extra_args=private, netns=lab.ns("h1")),
            swarm.launch("nat2", until_round=ROUNDS, min_peers=3, extra_args=private, netns=lab.ns("h2")),
        ]
        codes = await asyncio.gather(*(swarm.wait(p, 420) for p in peers))
        summary = swarm.summary(ROUNDS)
        summary["codes"] = codes
        summary["logs"] = {p.name: p.log_path.read_text(errors="replace")[-3000:] for p in peers}
        return summary


@pytest.mark.timeout(600)
def test_two_volunteers_behind_nats_and_a_public_one_average_every_round(
    lab: Lab, tmp_path: Path, seeded: tuple[str, str]
) -> None:
    summary = asyncio.run(_train(lab, tmp_path, *seeded))
    assert summary["codes"] == [0, 0, 0], summary
    assert summary["ok"], summary["problems"]
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))  # type: ignore[index]
    for r in rounds:  # type: ignore[attr-defined]
        peers = r["peers"]
        assert len(peers) == 3, r
        assert len({p["state_hash"] for p in peers.values()}) == 1, r
        # Averaged by all three (not synced from someone else afterwards).
        assert all(p["group_size"] == 3 and not p["synced"] for p in peers.values()), r
    # Gossip crosses the NATs too: by the last round every node has verified messages of both others
    # (the two NAT'd ones hear each other through the public node, the only one they can dial).
    last = rounds[-1]["peers"]  # type: ignore[index]
    assert all(p["gossip_authors"] == 2 for p in last.values()), last


async def _late_joiner(lab: Lab, workdir: Path, bootstrap: str, run_id: str) -> dict[str, object]:
    async with Swarm(workdir / "swarm", bootstrap_maddrs=[bootstrap]) as swarm:
        swarm.run_id = run_id
        public = ["--listen", f"/ip4/{PUB_IP}/tcp/0", "--reachability", "public"]
        private = ["--listen", "/ip4/0.0.0.0/tcp/0", "--reachability", "private"]
        first = [
            swarm.launch(
                "public", until_round=LATE_ROUNDS, min_peers=2, extra_args=public, netns=lab.ns("pub")
            ),
            swarm.launch(
                "nat1", until_round=LATE_ROUNDS, min_peers=2, extra_args=private, netns=lab.ns("h1")
            ),
        ]
        deadline = time.monotonic() + 240
        while first[0].last_round() < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        late = swarm.launch("nat2", until_round=LATE_ROUNDS, extra_args=private, netns=lab.ns("h2"))
        peers = [*first, late]
        codes = await asyncio.gather(*(swarm.wait(p, 360) for p in peers))
        return {"codes": codes, "rounds": {p.name: p.rounds() for p in peers}}


LATE_ROUNDS = 5


@pytest.mark.timeout(600)
def test_a_late_joiner_behind_a_nat_syncs_the_state_and_joins(
    lab: Lab, tmp_path: Path, seeded: tuple[str, str]
) -> None:
    got = asyncio.run(_late_joiner(lab, tmp_path, *seeded))
    assert got["codes"] == [0, 0, 0], got
    rounds: dict[str, list[dict[str, object]]] = got["rounds"]  # type: ignore[assignment]
    late = rounds["nat2"]
    synced = [r for r in late if r["synced"]]
    assert synced and int(synced[0]["round"]) >= 2, late  # type: ignore[call-overload]
    averaged = [r for r in late if not r["synced"]]
    assert averaged and averaged[-1]["round"] == LATE_ROUNDS, late
    by_round = {int(r["round"]): r["state_hash"] for r in rounds["public"]}  # type: ignore[call-overload]
    for r in late:  # every state the newcomer held is the one the others committed for that round
        assert r["state_hash"] == by_round[int(r["round"])], (r, by_round)  # type: ignore[call-overload]
    for r in averaged:
        assert r["group_size"] == 3, r


def _doctor(lab: Lab, tmp_path: Path, ns: str, bootstrap: str, *args: str) -> str:
    data = tmp_path / f"doctor-{ns}-{len(args)}"
    data.mkdir()
    done = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            lab.ns(ns),
            *CLI,
            "doctor",
            "--bootstrap",
            bootstrap,
            "--data-dir",
            str(data),
            "--upload-mb",
            "2",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.timeout(300)
def test_doctor_tells_public_from_natted_and_measures_the_upload(
    lab: Lab, tmp_path: Path, bootstrapped: str
) -> None:
    public = _doctor(lab, tmp_path, "pub", bootstrapped, "--listen", f"/ip4/{PUB_IP}/tcp/0")
    assert "reachable: public" in public and f"connected to {PUB_IP}" in public, public
    assert "MB/s" in public and "to do:" not in public, public
    natted = _doctor(lab, tmp_path, "h1", bootstrapped, "--listen", "/ip4/0.0.0.0/tcp/0")
    # The bootstrap node saw the router's address, and nothing there accepted a connection.
    assert "reachable: NO" in natted and "10.77.0.11" in natted and "to do:" in natted, natted
    assert "--reachability private" in natted, natted
    private = _doctor(
        lab, tmp_path, "h1", bootstrapped, "--listen", "/ip4/0.0.0.0/tcp/0", "--reachability", "private"
    )
    assert "through relays only" in private and "/p2p-circuit/p2p/" in private, private
    assert "MB/s" in private, private
    # A second daemon dialled in through the bootstrap node's relay: the reservation holds.
    assert "reservation holds" in private and "NO reservation" not in private, private
