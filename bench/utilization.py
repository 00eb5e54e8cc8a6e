"""Utilization of a 4-peer swarm on shaped links: how much of the wall time the peers spend in inner steps.

Four real `intellect-node start` daemons, each in its own network namespace, on one bridge (a fifth
namespace, the "hub", holds the bridge and the bootstrap node at 10.93.0.254). Every peer's link is shaped
by tbf in both directions: on the peer's end of its veth (its upload) and on the bridge's end (its
download), to each rate of `--links` in turn (`tc qdisc replace`, so one topology serves every row). For
each row (link × mode × compression) a fresh run is seeded (the manifest differs in
`averaging.compression` and `diloco.outer_update`, so each row has its own run_id) and four fresh peers
train it from round 0 to round 1 + `--rounds`.

What is measured, per peer, all from the daemon's own records (nothing is estimated by this script):

- compute: the inner steps' time of each round, tokens / tokens-per-second of the daemon's "round N done"
  log line (`train_round` measures it around its `trainer.steps` calls only: data, forward, backward,
  AdamW; the log prints tok/s rounded to an integer, an error under 0.5 %);
- wall: `ts` of the peer's `rounds.jsonl` line of its last round minus that of its first round (the first
  round is a warm-up: it holds the wait for all four peers, lazy initialisation and the first connections);
  the rounds counted are the ones after the first (sequential: their inner steps are the ones between
  the two commits; overlapped: see below);
- utilization = sum of compute over the counted rounds / wall; `allreduce_share` = sum of the rounds'
  `allreduce_s` (the Averaged event's seconds: flatten, matchmaking, waiting for the group, the
  all-reduce with its checks, unflatten) / wall, of which `dataplane_s_per_round` is the completed
  attempt's butterfly alone (the "round N averaged with … in S s" log line); `commit_share`: from that
  line to the "round N done" line (the outer step, the state hash and the two checkpoint files, about
  20 bytes a parameter here); what is left (`other_share`) is the pseudo-gradient, the round's set-up
  and the scheduling between them;
- `utilization_aligned` (and `tokens_per_wall_s_aligned`): the same compute over a window from the end of
  the inner steps of the round before the first counted one to the end of those of the last counted one
  (the daemon's "inner steps: N in W s, C s of them computing" lines, whose C is the compute summed), so
  that the window holds exactly the inner steps counted. In sequential rows it equals `utilization` within
  noise; in overlapped rows the commit window's ends fall wherever the average landed in the next round,
  which moves from round to round (from 47% to 80% of it in the run of docs/decisions.md), so each end
  adds or drops part of a round that the compute does not count;
- `tokens_per_wall_s`: the tokens of those inner steps / wall, per peer. Where the all-reduce and the
  inner steps compete for the CPUs (overlapped, on a small machine) the inner steps take longer, and
  utilization rises with no more work done: this is the figure that says how much faster a run goes;
- `bytes_per_peer_per_round`: the increase of the cumulative `bytes_sent` of `rounds.jsonl` (what the
  daemon's all-reduce and state server sent: payload bytes it counts) over the counted rounds, divided by
  their number; `bytes_received_per_peer_per_round` likewise. `wire_tx_bytes_per_peer_per_round` is the
  peer's veth tx counter over the same rounds (sampled when this script saw each round's line, within
  0.25 s): every byte on the wire, DHT, gossip, libp2p framing, Noise, TCP/IP headers included.

Every row figure is the mean over the four peers (`peers` lists each peer's). A row is `complete` when
every peer committed every round with all four in the group (no round synced from the others instead).

The peers share this machine's CPUs (one torch thread each), so compute time is what inner steps take
while four daemons and their p2p daemons run side by side; the model is sized (`--dim`, `--layers`,
`--ffn`, small batch, few inner steps) so that at 100 Mbit a sequential int8 all-reduce is at least 20 % of
a round on a 2-core machine: 23M parameters, 8 inner steps of 2 × 64 tokens. Other jobs on the machine
take CPU from them too: each row records the 5-minute load average at its end (`load_avg`). Run the
daemons from a fixed tree when the checkout is being edited: `PYTHONPATH=DIR` where DIR/intellect/ holds
`git archive HEAD node protocol crypto` (the peers inherit the environment).

Not done: added latency. netem is not available here, tbf adds only queueing delay, and an
application-level delay would have to live in the daemon's transport (node/net/), which this benchmark
does not change; every link has the namespaces' sub-millisecond RTT.

Overlapped rows (`--modes sequential,overlapped`) seed `diloco.outer_update = "overlapped"`: round r's
all-reduce runs while round r + 1 trains and is committed after it (node/run/overlap.py). Their window is
still from commit(first) to commit(last), which then holds the inner steps of rounds first + 2 … last + 1;
the peers train one round more, whose final commit (no inner steps before it) is not counted. There the
all-reduce share overlaps the compute share, and the commit is not separable in the log (`commit_share`
and `other_share` are null).

    sudo python bench/utilization.py --modes sequential --compressions int8,4bit,2bit \
        --links 100mbit,1gbit --json [--rounds 5] [--quick]

The last line printed is one JSON object: {"rows": [{"link", "mode", "compression", "utilization",
"utilization_aligned", "tokens_per_wall_s", "tokens_per_wall_s_aligned",
"bytes_per_peer_per_round", "allreduce_share", "commit_share", "other_share", "round_s", "rounds",
"complete", "seconds", "load_avg", "peers", ...}], "settings": {...}}. Needs root, iproute2 (ip, tc).
Every process is killed by process group and every namespace deleted at the end, also on an error, Ctrl-C
or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from intellect.crypto.identity import Identity
from intellect.node.cli.swarm import Peer, Swarm, group_pids
from intellect.protocol.manifest import load_manifest_toml

log = logging.getLogger("bench.utilization")

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny-run.toml"
CLI = [sys.executable, "-c", "from intellect.node.cli.main import main; main()"]
PEERS = 4
SUBNET = "10.93.0"
HUB_IP = f"{SUBNET}.254"
#: Names on the command line → the manifest's `averaging.compression`.
COMPRESSION = {"int8": "int8", "4bit": "int4", "2bit": "int2", "fp16": "fp16", "none": "none"}
MODES = ("sequential", "overlapped")
#: "round N done: loss L, T tokens, R tok/s, …" (node/run/machine.py, `RoundMachine.commit`).
ROUND_DONE = re.compile(r"round (\d+) done: .*?, (\d+) tokens, (\d+) tok/s")
#: "round N averaged with K peers (attempt A) in S s, …" (node/net/averaging.py, `Averager._completed`).
ROUND_AVERAGED = re.compile(r"round (\d+) averaged with \d+ peers \(attempt \d+\) in ([0-9.]+)s")


def _sh(*cmd: str, stdin: str | None = None) -> str:
    return subprocess.run(cmd, input=stdin, text=True, check=True, capture_output=True, timeout=30).stdout


def _rate(link: str) -> str:
    """'100mbit', '1gbit' → tc's rate (validated)."""
    if not re.fullmatch(r"\d+(kbit|mbit|gbit)", link):
        raise argparse.ArgumentTypeError(f"a link rate like 100mbit or 1gbit, got {link!r}")
    return link


def _bits(link: str) -> float:
    n, unit = re.fullmatch(r"(\d+)(kbit|mbit|gbit)", link).groups()  # type: ignore[union-attr]
    return int(n) * {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[unit]


class Lan:
    """PEERS namespaces on one bridge in a hub namespace; each peer's veth shaped by tbf in both directions.

    `with Lan() as lan:`; `lan.ns(i)` names peer i's namespace, `lan.ip(i)` its address; `lan.shape(rate)`
    (re)shapes every link; `close()` kills every process left in the namespaces and deletes them."""

    def __init__(self) -> None:
        self.prefix = "iu" + uuid.uuid4().hex[:5]
        self.hub = f"{self.prefix}-hub"
        self.names: list[str] = []

    def ns(self, i: int) -> str:
        return f"{self.prefix}-p{i}"

    @staticmethod
    def ip(i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def dev(self, i: int) -> tuple[str, str]:
        """(peer-side, bridge-side) interface names of peer i's veth."""
        return f"{self.prefix}p{i}", f"{self.prefix}b{i}"

    def __enter__(self) -> Lan:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add(self, ns: str) -> None:
        _sh("ip", "netns", "add", ns)
        self.names.append(ns)
        _sh("ip", "-n", ns, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._add(self.hub)
        _sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", self.hub, "addr", "add", f"{HUB_IP}/24", "dev", "br0")
        _sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        for i in range(PEERS):
            ns = self.ns(i)
            self._add(ns)
            inside, outside = self.dev(i)
            _sh("ip", "link", "add", inside, "type", "veth", "peer", "name", outside)
            _sh("ip", "link", "set", inside, "netns", ns)
            _sh("ip", "link", "set", outside, "netns", self.hub)
            _sh("ip", "-n", self.hub, "link", "set", outside, "master", "br0", "up")
            _sh("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", inside)
            _sh("ip", "-n", ns, "link", "set", inside, "up")

    def shape(self, link: str) -> None:
        """tbf at `link` on both ends of every peer's veth: the peer's upload and its download."""
        # The bucket must hold at least one (GSO) packet and a few timer ticks at the rate.
        burst = max(256 * 1024, int(_bits(link) / 8 / 250))
        for i in range(PEERS):
            inside, outside = self.dev(i)
            for ns, dev in ((self.ns(i), inside), (self.hub, outside)):
                _sh(
                    "ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root",
                    "tbf", "rate", link, "burst", str(burst), "latency", "100ms",
                )  # fmt: skip

    def counters(self, i: int) -> tuple[int, int]:
        """(tx, rx) bytes of peer i's interface, as the peer sees it."""
        out = json.loads(_sh("ip", "-n", self.ns(i), "-j", "-s", "link", "show", "dev", self.dev(i)[0]))
        stats = out[0]["stats64"]
        return int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])

    def drops(self) -> int:
        """Packets the tbf qdiscs of every link dropped so far (both directions)."""
        total = 0
        for i in range(PEERS):
            inside, outside = self.dev(i)
            for ns, dev in ((self.ns(i), inside), (self.hub, outside)):
                out = json.loads(
                    _sh("ip", "netns", "exec", ns, "tc", "-s", "-j", "qdisc", "show", "dev", dev)
                )
                total += sum(int(q.get("drops", 0)) for q in out)
        return total

    def close(self) -> None:
        for ns in reversed(self.names):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                pids = subprocess.run(
                    ["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10
                ).stdout.split()
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self.names.clear()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTELLECT_NODE_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    for pid in group_pids(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def start_bootstrap(lan: Lan, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`intellect-node bootstrap` in the hub namespace, on the bridge's address; (process, multiaddr)."""
    out = workdir / "bootstrap.log"
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [
                *("ip", "netns", "exec", lan.hub, *CLI, "bootstrap"),
                *("--data-dir", str(workdir / "boot"), "--listen", f"/ip4/{HUB_IP}/tcp/4001"),
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_env(INTELLECT_NODE_REACHABILITY="public"),
            start_new_session=True,
        )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for line in out.read_text(errors="replace").splitlines():
            if line.startswith(f"/ip4/{HUB_IP}/tcp/4001/p2p/"):
                return proc, line.strip()
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    _kill_group(proc)
    raise RuntimeError(f"the bootstrap node printed no address: {out.read_text(errors='replace')[-2000:]}")


@dataclass(frozen=True)
class Shape:
    """The run's size: model dims and DiLoCo settings the manifest gets."""

    dim: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    inner_steps: int
    batch: int
    seq_len: int
    reducer: str

    def params(self) -> int:
        return load_manifest_toml_text(manifest_text(self, "int8", "sequential", "probe")).model.param_count()


def manifest_text(shape: Shape, compression: str, mode: str, name: str) -> str:
    """The example manifest with this benchmark's model, DiLoCo and averaging settings."""
    values: dict[str, Any] = {
        "name": f'"{name}"',
        "preset": '"bench-utilization"',
        "dim": shape.dim,
        "n_layers": shape.layers,
        "n_heads": shape.heads,
        "n_kv_heads": shape.kv_heads,
        "ffn_dim": shape.ffn,
        "max_seq_len": shape.seq_len,
        "inner_steps": shape.inner_steps,
        "warmup_steps": 1,
        "batch_size": shape.batch,
        "seq_len": shape.seq_len,
        "group_size": PEERS,
        # A group of all four or none: no round split into two pairs (a fork a loaded 2-core machine provoked
        # with min_group 2), so every counted round averages the same four peers.
        "min_group": PEERS,
        "compression": f'"{COMPRESSION[compression]}"',
        "round_deadline_s": 300.0,
        "reducer": f'"{shape.reducer}"',
    }
    text = EXAMPLE.read_text()
    for key, value in values.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        if n != 1:
            raise RuntimeError(f"{EXAMPLE}: expected one `{key} = …` line, found {n}")
    if mode == "overlapped":
        text = text.replace("[diloco]\n", '[diloco]\nouter_update = "overlapped"\n', 1)
    return text


def load_manifest_toml_text(text: str) -> Any:
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    try:
        return load_manifest_toml(f.name)
    finally:
        os.unlink(f.name)


def seed(lan: Lan, workdir: Path, bootstrap: str, manifest: Path) -> str:
    """Sign and publish `manifest` from the hub namespace with a fresh researcher key; its run_id."""
    researcher = workdir / "researcher"
    researcher.mkdir(exist_ok=True)
    if not (researcher / "identity.key").exists():
        Identity.generate().save(researcher / "identity.key")
    done = subprocess.run(
        [
            *("ip", "netns", "exec", lan.hub, *CLI, "seed", str(manifest)),
            *("--bootstrap", bootstrap, "--data-dir", str(researcher)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        start_new_session=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"seeding failed: {(done.stdout + done.stderr)[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


@dataclass
class Watch:
    """One peer's interface counters at each round line this script saw, as it saw them."""

    peer: Peer
    index: int
    seen: dict[int, tuple[int, int]] = field(default_factory=dict)


@dataclass
class LogFigures:
    """What a peer's JSON log says of each round: inner-step seconds, the all-reduce's data plane seconds
    (the completed attempt's butterfly, after matchmaking), and when the average and the commit ended."""

    train_s: dict[int, float] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    dataplane_s: dict[int, float] = field(default_factory=dict)
    averaged_ts: dict[int, float] = field(default_factory=dict)
    done_ts: dict[int, float] = field(default_factory=dict)
    #: The "inner steps: …" lines (run/training.py), in order: (ts at the end of the round's inner steps,
    #: seconds computing). The k-th is round k's when the peer trained every round from 1 (checked).
    trained: list[tuple[float, float]] = field(default_factory=list)


def read_log(log_path: Path) -> LogFigures:
    """The "round N averaged with … in S s" (net/averaging.py) and "round N done: …, T tokens, R tok/s"
    (run/machine.py) lines of a peer's JSON log; inner-step seconds = T / R."""
    out = LogFigures()
    for line in log_path.read_text(errors="replace").splitlines():
        if not line.startswith("{") or (
            "averaged with" not in line and '"event":"round"' not in line and "inner_steps" not in line
        ):
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        msg, ts = rec.get("msg", ""), float(rec.get("ts", 0.0))
        if rec.get("event") == "inner_steps" and "compute_s" in rec:
            out.trained.append((ts, float(rec["compute_s"])))
        elif (m := ROUND_DONE.search(msg)) and rec.get("event") == "round":
            r = int(m.group(1))
            out.done_ts[r] = ts
            out.tokens[r] = int(m.group(2))
            if int(m.group(3)) > 0:
                out.train_s[r] = int(m.group(2)) / int(m.group(3))
        elif m := ROUND_AVERAGED.search(msg):
            r = int(m.group(1))
            out.dataplane_s[r], out.averaged_ts[r] = float(m.group(2)), ts
    return out


def peer_figures(w: Watch, overlapped: bool = False) -> dict[str, Any]:
    """The peer's figures between the commits of its first and last counted round (module docstring).

    Sequential: the window from commit(first) to commit(last) holds the inner steps of rounds first + 1 …
    last. Overlapped: round r is committed once round r + 1 has trained, so the window holds those of rounds
    first + 2 … last + 1, and the run's final commit (after which nothing trains) is left out."""
    rounds = [r for r in w.peer.rounds() if not r.get("synced")]
    synced = [r["round"] for r in w.peer.rounds() if r.get("synced")]
    by = {r["round"]: r for r in rounds}
    if overlapped and by:
        del by[max(by)]
    if len(by) < 2:
        return {"name": w.peer.name, "error": f"only {len(by)} committed rounds to count", "synced": synced}
    first, last = min(by), max(by)
    counted = list(range(first + 1, last + 1))
    trained = [r + 1 for r in counted] if overlapped else counted
    missing = [r for r in counted if r not in by]
    logged = read_log(w.peer.log_path)
    compute = sum(logged.train_s.get(r, 0.0) for r in trained)
    tokens = sum(logged.tokens.get(r, 0) for r in trained)
    wall = by[last]["ts"] - by[first]["ts"]
    allreduce = sum(by[r]["allreduce_s"] for r in counted if r in by)
    dataplane = sum(logged.dataplane_s.get(r, 0.0) for r in counted)
    n = len(counted)
    out: dict[str, Any] = {
        "name": w.peer.name,
        "first": first,
        "last": last,
        "wall_s": round(wall, 3),
        "compute_s": round(compute, 3),
        "allreduce_s": round(allreduce, 3),
        "utilization": compute / wall,
        "tokens_per_wall_s": tokens / wall,
        "allreduce_share": allreduce / wall,
        "dataplane_s": round(dataplane, 3),
        "round_s": wall / n,
        "bytes_sent": (by[last]["bytes_sent"] - by[first]["bytes_sent"]) / n,
        "bytes_received": (by[last]["bytes_received"] - by[first]["bytes_received"]) / n,
        "group_sizes": sorted({by[r]["group_size"] for r in counted if r in by}),
        "missing": sorted(
            {*missing, *(r for r in trained if r not in logged.train_s)}
            | {r for r in counted if r not in logged.averaged_ts}
        ),
        "synced": synced,
    }
    out.update(aligned(logged, trained, tokens))
    if not overlapped:
        # From the end of the average to the end of the commit; overlapped, the next round's inner steps
        # run in between, and the commit cannot be told apart in the log.
        commit = sum(
            logged.done_ts[r] - logged.averaged_ts[r]
            for r in counted
            if r in logged.done_ts and r in logged.averaged_ts
        )
        out.update(commit_s=round(commit, 3), commit_share=commit / wall)
    if first in w.seen and last in w.seen:
        out["wire_tx"] = (w.seen[last][0] - w.seen[first][0]) / n
        out["wire_rx"] = (w.seen[last][1] - w.seen[first][1]) / n
    return out


def aligned(logged: LogFigures, trained: list[int], tokens: int) -> dict[str, Any]:
    """Utilization over the window from the end of round `trained[0] - 1`'s inner steps to the end of round
    `trained[-1]`'s, which holds exactly the inner steps it counts, in both modes (the commit window of
    `peer_figures` does too in steady state, but an overlapped commit lands anywhere in the next round, so
    there its ends cut rounds at different points); {} when the log's lines cannot be matched to rounds."""
    ends = logged.trained
    if not trained or trained[0] < 2 or len(ends) < trained[-1]:
        return {}
    # Line k is round k's only if the peer logged one per round from round 1: its compute then matches the
    # "round N done" line's (tokens / tok/s, the latter rounded to an integer).
    for r in trained:
        expected = logged.train_s.get(r)
        if expected is None or abs(ends[r - 1][1] - expected) > 0.02 * expected + 0.05:
            return {}
    wall = ends[trained[-1] - 1][0] - ends[trained[0] - 2][0]
    compute = sum(ends[r - 1][1] for r in trained)
    return {
        "aligned_wall_s": round(wall, 3),
        "utilization_aligned": compute / wall,
        "tokens_per_wall_s_aligned": tokens / wall,
    }


async def run_row(
    lan: Lan, workdir: Path, bootstrap: str, run_id: str, rounds: int, timeout_s: float, overlapped: bool
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Four fresh peers train `run_id` to round 1 + `rounds` (overlapped: one more, whose commit is not
    counted); each peer's figures and exit codes."""
    until = 1 + rounds + int(overlapped)
    async with Swarm(workdir, bootstrap_maddrs=[bootstrap]) as swarm:
        swarm.run_id = run_id
        watches = []
        for i in range(PEERS):
            args = ["--listen", f"/ip4/{lan.ip(i)}/tcp/0", "--reachability", "public"]
            peer = swarm.launch(
                f"peer{i}", until_round=until, min_peers=PEERS, extra_args=args, netns=lan.ns(i)
            )
            watches.append(Watch(peer, i))
        deadline = time.monotonic() + timeout_s
        last_line = ""
        while time.monotonic() < deadline and any(w.peer.proc.poll() is None for w in watches):
            for w in watches:
                for r in w.peer.rounds():
                    if r["round"] not in w.seen:
                        w.seen[r["round"]] = lan.counters(w.index)
            line = " ".join(f"{w.peer.name}:{max(w.seen, default=0)}" for w in watches)
            if line != last_line:
                log.info("rounds %s", line)
                last_line = line
            await asyncio.sleep(0.25)
        codes = [w.peer.proc.poll() for w in watches]
        counters = {w.peer.name: {r: list(c) for r, c in sorted(w.seen.items())} for w in watches}
        (workdir / "counters.json").write_text(json.dumps(counters) + "\n")
        if any(c is None for c in codes):
            log.warning("the row did not finish within %.0f s; stopping its peers", timeout_s)
    return [peer_figures(w, overlapped) for w in watches], codes


def row_summary(link: str, mode: str, compression: str, peers: list[dict[str, Any]]) -> dict[str, Any]:
    good = [p for p in peers if "error" not in p]
    row: dict[str, Any] = {"link": link, "mode": mode, "compression": compression}
    if not good:
        return {
            **row,
            "utilization": None,
            "bytes_per_peer_per_round": None,
            "complete": False,
            "peers": peers,
        }

    def mean(key: str) -> float:
        return statistics.fmean(p[key] for p in good)

    def per_round(key: str) -> float:
        return round(statistics.fmean(p[key] / (p["last"] - p["first"]) for p in good), 3)

    util, share = mean("utilization"), mean("allreduce_share")
    if all("utilization_aligned" in p for p in good):
        row.update(
            utilization_aligned=round(mean("utilization_aligned"), 4),
            tokens_per_wall_s_aligned=round(mean("tokens_per_wall_s_aligned"), 2),
        )
    complete = len(good) == PEERS and all(
        not p["missing"] and not p["synced"] and p["group_sizes"] == [PEERS] for p in good
    )
    row.update(
        utilization=round(util, 4),
        bytes_per_peer_per_round=round(mean("bytes_sent")),
        bytes_received_per_peer_per_round=round(mean("bytes_received")),
        allreduce_share=round(share, 4),
        round_s=round(mean("round_s"), 3),
        tokens_per_wall_s=round(mean("tokens_per_wall_s"), 2),
        compute_s_per_round=per_round("compute_s"),
        allreduce_s_per_round=per_round("allreduce_s"),
        dataplane_s_per_round=per_round("dataplane_s"),
        rounds=min(p["last"] - p["first"] for p in good),
        complete=complete,
    )
    if all("commit_s" in p for p in good):  # sequential only: the shares then add up to 1
        commit = mean("commit_share")
        row.update(
            commit_share=round(commit, 4),
            other_share=round(1.0 - util - share - commit, 4),
            commit_s_per_round=per_round("commit_s"),
        )
    else:  # overlapped: the all-reduce runs during the inner steps, so its share overlaps theirs
        row.update(commit_share=None, other_share=None, commit_s_per_round=None)
    if all("wire_tx" in p for p in good):
        row["wire_tx_bytes_per_peer_per_round"] = round(mean("wire_tx"))
        row["wire_rx_bytes_per_peer_per_round"] = round(mean("wire_rx"))
    row["peers"] = [
        {
            k: (round(v, 4) if isinstance(v, float) else v)
            for k, v in p.items()
            if k not in ("wire_tx", "wire_rx", "bytes_received")
        }
        for p in peers
    ]
    return row


def _print_row(row: dict[str, Any]) -> None:
    if row["utilization"] is None:
        print(f"{row['link']:>8} {row['mode']:>10} {row['compression']:>5}  FAILED", flush=True)
        return
    wire = row.get("wire_tx_bytes_per_peer_per_round")

    def share(key: str) -> str:
        return "-" if row[key] is None else f"{row[key]:.3f}"

    commit_s = "-" if row["commit_s_per_round"] is None else f"{row['commit_s_per_round']:.2f} s"
    print(
        f"{row['link']:>8} {row['mode']:>10} {row['compression']:>5}  utilization {row['utilization']:.3f}  "
        + (
            f"(aligned {row['utilization_aligned']:.3f}, {row['tokens_per_wall_s_aligned']:.1f} tok/s)  "
            if "utilization_aligned" in row
            else ""
        )
        + f"tokens/s {row['tokens_per_wall_s']:.1f}  "
        f"all-reduce {row['allreduce_share']:.3f}  commit {share('commit_share')}  "
        f"other {share('other_share')}  round {row['round_s']:.2f} s "
        f"(compute {row['compute_s_per_round']:.2f} s, all-reduce {row['allreduce_s_per_round']:.2f} s "
        f"data plane {row['dataplane_s_per_round']:.2f} s, commit {commit_s})  "
        f"sent/peer/round {row['bytes_per_peer_per_round'] / 1e6:.2f} MB"
        + (f" (wire {wire / 1e6:.2f} MB)" if wire is not None else "")
        + f"  tbf drops {row['tbf_drops']}  rounds {row['rounds']}{'' if row['complete'] else '  INCOMPLETE'}"
        + f"  {row['seconds']:.0f} s",
        flush=True,
    )


def main_rows(args: argparse.Namespace, shape: Shape, workdir: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with Lan() as lan:
        boot, bootstrap = start_bootstrap(lan, workdir)
        try:
            for link in args.links:
                lan.shape(link)
                for mode in args.modes:
                    for compression in args.compressions:
                        name = f"util-{link}-{mode}-{compression}"
                        manifest = workdir / f"{name}.toml"
                        manifest.write_text(manifest_text(shape, compression, mode, name))
                        t0, drops = time.monotonic(), lan.drops()
                        run_id = seed(lan, workdir, bootstrap, manifest)
                        log.info("%s: run %s", name, run_id)
                        peers, codes = asyncio.run(
                            run_row(
                                lan,
                                workdir / name,
                                bootstrap,
                                run_id,
                                args.rounds,
                                args.row_timeout,
                                mode == "overlapped",
                            )
                        )
                        row = row_summary(link, mode, compression, peers)
                        row["tbf_drops"] = lan.drops() - drops
                        # The machine's 5-minute load average at the row's end (other jobs share the CPUs).
                        row["load_avg"] = round(os.getloadavg()[1], 2)
                        row["exit_codes"] = codes
                        row["seconds"] = round(time.monotonic() - t0, 1)
                        rows.append(row)
                        _print_row(row)
        finally:
            boot.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                boot.wait(15)
            _kill_group(boot)
    return rows


def _list(kind: str, choices: tuple[str, ...] | None = None) -> Any:
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        for item in items:
            if choices is not None and item not in choices:
                raise argparse.ArgumentTypeError(f"{kind}: one of {', '.join(choices)}, got {item!r}")
            if kind == "link":
                _rate(item)
        if not items:
            raise argparse.ArgumentTypeError(f"at least one {kind}")
        return items

    return parse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--links", type=_list("link"), default=["100mbit", "1gbit"], help="tbf rates, e.g. 100mbit,1gbit"
    )
    p.add_argument("--modes", type=_list("mode", MODES), default=["sequential"], help="sequential,overlapped")
    p.add_argument(
        "--compressions", type=_list("compression", tuple(COMPRESSION)), default=["int8", "4bit", "2bit"]
    )
    p.add_argument("--rounds", type=int, default=5, help="rounds counted after the warm-up round")
    p.add_argument("--inner-steps", type=int, default=8)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--reducer", choices=("mean", "centered_clip"), default="centered_clip")
    p.add_argument("--row-timeout", type=float, default=600.0, help="seconds one row may take")
    p.add_argument("--quick", action="store_true", help="smoke run: a small model, 2 counted rounds")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep peers' data and logs here (checkpoints included: about 5 GB a row at the default size)",
    )
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if os.geteuid() != 0 or shutil.which("tc") is None or shutil.which("ip") is None:
        p.error("needs root and iproute2 (ip, tc): every peer runs in a network namespace")
    if args.quick:
        args.rounds, args.dim, args.ffn, args.inner_steps = min(args.rounds, 2), 256, 768, 4
    shape = Shape(
        args.dim, args.layers, args.ffn, max(1, args.dim // 64), max(1, args.dim // 256),
        args.inner_steps, args.batch, args.seq_len, args.reducer,
    )  # fmt: skip
    params = shape.params()
    print(
        f"{PEERS} peers, {params / 1e6:.1f}M parameters, {shape.inner_steps} inner steps of "
        f"{shape.batch}×{shape.seq_len} tokens, reducer {shape.reducer}, {args.rounds} counted rounds; "
        f"links {', '.join(args.links)} (tbf both ways), no added delay",
        flush=True,
    )

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    # Ctrl-C stops the row (its peers are stopped) and cleans up, even where the shell started us ignoring it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    tmp = None
    workdir = args.workdir
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="intellect-util-")
        workdir = Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        rows = main_rows(args, shape, workdir)
    finally:
        if tmp is not None:
            tmp.cleanup()
    settings = {
        "peers": PEERS,
        "params": params,
        "dim": shape.dim,
        "layers": shape.layers,
        "ffn_dim": shape.ffn,
        "inner_steps": shape.inner_steps,
        "batch_size": shape.batch,
        "seq_len": shape.seq_len,
        "reducer": shape.reducer,
        "counted_rounds": args.rounds,
        "delay": None,
        "cpus": os.cpu_count(),
        "seconds": round(time.monotonic() - t0, 1),
    }
    print(json.dumps({"rows": rows, "settings": settings}), flush=True)
    return 0 if rows and all(r["utilization"] is not None for r in rows) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:  # everything was stopped and removed on the way out
        print(f"interrupted ({e or 'SIGINT'}); peers stopped, namespaces removed", file=sys.stderr)
        sys.exit(130)
