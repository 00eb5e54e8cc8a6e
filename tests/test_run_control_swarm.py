"""The researcher's run control with real daemons (issue #19): a record that someone else signed is
refused, and the researcher's `run control RUN pause|resume|end` pauses, resumes and ends the run.

Two daemons on loopback train a run whose token budget is far away. An impostor's `run control` is
refused by the CLI, and the impostor's signed record stored straight into the DHT is refused by the
validators; the nodes go on training. Then the researcher pauses the run (both nodes stop advancing, paused
by the researcher), resumes it (rounds advance again), pauses it again and, while paused, ends it two
rounds ahead: both daemons wake up, and exit 0 by themselves after one "run finished at round N" line each,
at the round the end named, with the same hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from intellect.crypto.identity import Identity
from intellect.node.app.status import fetch_status
from intellect.node.run.lifecycle import CONTROL_POLL_S
from intellect.protocol.control import sign_control

from tests.nodeproc import kill_session, seeded_bootstrap, spawn, start_node, wait_for

pytestmark = pytest.mark.swarm

ROOT = Path(__file__).resolve().parent.parent
FINISHED = re.compile(r"run finished at round (\d+), final state hash ([0-9a-f]{64})")
NAMES = ("alice", "bob")
#: A node averaging when the pause arrives finishes that attempt first (the gate is checked between rounds
#: and between inner steps); when its partner already paused, it waits out the round's deadline alone.
DEADLINE_S = 30.0


def write_manifest(path: Path) -> None:
    """The tiny run on the built-in corpus, with short rounds and a budget it never reaches here."""
    text = (ROOT / "node" / "runs" / "tiny-run.toml").read_text()
    for key, value in (
        ("inner_steps", 8),
        ("warmup_steps", 2),
        ("batch_size", 4),
        ("seq_len", 64),
        ("name", '"control-swarm"'),
        ("round_deadline_s", f"{DEADLINE_S:.1f}"),
    ):
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text, count=1)
        assert n == 1, key
    path.write_text(text)


def cli(*args: str) -> tuple[int, str, str]:
    proc = spawn(list(args))
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        kill_session(proc)
    return proc.returncode, out.decode(), err.decode()


def status(data_dir: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        return fetch_status(data_dir)
    return {}


def rounds(dirs: list[Path]) -> list[int]:
    return [int(status(d).get("round", -1)) for d in dirs]


async def store_forged(boot: str, data_dir: Path, data: bytes) -> bool:
    """Store `data` under its run's control key through a DHT client; True if any node accepted it."""
    from intellect.node.cli.dht import _client, _client_config
    from intellect.node.net.control import publish_control

    svc = await _client(_client_config(data_dir, (boot,)))
    try:
        return await publish_control(svc, data)
    finally:
        await svc.stop()


@pytest.mark.timeout(600)
def test_the_researcher_pauses_resumes_and_ends_a_run_and_an_impostor_is_refused(tmp_path: Path) -> None:
    manifest = tmp_path / "run.toml"
    write_manifest(manifest)
    researcher = tmp_path / "researcher"
    dirs = [tmp_path / name for name in NAMES]
    procs: list[subprocess.Popen[bytes]] = []
    with seeded_bootstrap(tmp_path / "boot", researcher, manifest) as boot:
        try:
            for d in dirs:
                procs.append(start_node(d, boot, "--min-peers", "2", log=d))

            def tails() -> str:
                return "\n\n".join(f"{d.name}:\n{Path(f'{d}.err').read_text()[-3000:]}" for d in dirs)

            def wait(predicate: Any, timeout_s: float, what: str) -> None:
                try:
                    wait_for(predicate, timeout_s, what)
                except TimeoutError as e:
                    keys = ("phase", "round", "paused", "pause_reasons", "rejected")
                    now = [{k: status(d).get(k) for k in keys} for d in dirs]
                    raise AssertionError(f"{e}: {now}\n{tails()}") from None

            def alive() -> None:
                assert all(p.poll() is None for p in procs), tails()

            def advanced_past(than: list[int]) -> bool:
                alive()
                return all(r > t for r, t in zip(rounds(dirs), than, strict=True))

            wait(lambda: advanced_past([0, 0]), 300, "both nodes never committed a round")
            run_id = status(dirs[0])["run_id"]
            assert status(dirs[1])["run_id"] == run_id

            # (1) Someone else's key: the CLI refuses to publish, the validators refuse to store.
            impostor = tmp_path / "impostor"
            rc, _, _ = cli("init", "--data-dir", str(impostor))
            assert rc == 0
            rc, out, err = cli(
                "run", "control", run_id, "pause", "--bootstrap", boot, "--data-dir", str(impostor)
            )
            assert rc == 1 and "did not sign run" in err and "nodes would refuse it" in err, (rc, out, err)
            forged = sign_control(Identity.generate(), run_id, "pause")
            stored = asyncio.run(store_forged(boot, tmp_path / "forger", forged))
            assert not stored, "a control record signed by someone else was stored"
            before = rounds(dirs)
            wait(lambda: advanced_past(before), 120, "the nodes stopped after a refused control record")
            for s in map(status, dirs):  # nothing forged reached a node, nothing paused it
                assert not s["paused"] and s["rejected"].get("refused_control", 0) == 0, s["rejected"]

            # (2) The researcher pauses the run: both nodes stop, paused by the researcher.
            rc, out, err = cli(
                "run", "control", run_id, "pause", "--bootstrap", boot, "--data-dir", str(researcher)
            )
            assert rc == 0 and f"pause published for run {run_id}" in out, (rc, out, err)
            t0 = time.monotonic()

            def by_researcher(phase: str | None) -> bool:
                alive()
                for x in map(status, dirs):
                    why = x.get("pause_reasons", {}).get("researcher", "")
                    if "run's researcher" not in why or phase not in (None, x["phase"]):
                        return False
                return True

            wait(lambda: by_researcher(None), 3 * CONTROL_POLL_S, "the nodes did not read the pause")
            print(f"pause read {time.monotonic() - t0:.1f} s after it was stored")
            at_read = rounds(dirs)
            wait(lambda: by_researcher("paused"), DEADLINE_S + 30, "the nodes did not pause")
            print(f"paused {time.monotonic() - t0:.1f} s after it was stored")
            held = rounds(dirs)
            # At most the round that was averaging when the pause was read completes.
            assert all(h <= r + 1 for h, r in zip(held, at_read, strict=True)), (at_read, held)
            time.sleep(3 * CONTROL_POLL_S)
            assert rounds(dirs) == held, "a paused node went on training"
            assert by_researcher("paused")

            # (3) Resume: rounds advance again.
            rc, out, err = cli(
                "run", "control", run_id, "resume", "--bootstrap", boot, "--data-dir", str(researcher)
            )
            assert rc == 0 and f"resume published for run {run_id}" in out, (rc, out, err)
            wait(lambda: advanced_past(held), 180, "the nodes did not resume training")
            assert all(not status(d)["paused"] for d in dirs)

            # (4) End two rounds ahead, ordered while paused (a running run could pass that round before the
            # nodes read the record): both wake up, train up to it and stop there by themselves, on one state.
            rc, out, err = cli(
                "run", "control", run_id, "pause", "--bootstrap", boot, "--data-dir", str(researcher)
            )  # fmt: skip
            assert rc == 0, (rc, out, err)
            wait(lambda: by_researcher("paused"), DEADLINE_S + 30, "the nodes did not pause again")
            end = max(rounds(dirs)) + 2
            rc, out, err = cli(
                "run", "control", run_id, "end", "--round", str(end), "--bootstrap", boot,
                "--data-dir", str(researcher),
            )  # fmt: skip
            assert rc == 0 and f"end at round {end} published for run {run_id}" in out, (rc, out, err)
            wait(lambda: all(p.poll() is not None for p in procs), 240, "the nodes did not stop")
            codes = [p.poll() for p in procs]
            assert codes == [0, 0], f"exit codes {codes}\n{tails()}"
            logs = [Path(f"{d}.err").read_text() for d in dirs]
        finally:
            for p in procs:
                kill_session(p)
    finished = [FINISHED.findall(log) for log in logs]
    assert all(len(f) == 1 for f in finished), finished
    (a_round, a_hash), (b_round, b_hash) = finished[0][0], finished[1][0]
    assert int(a_round) == int(b_round) == end
    assert a_hash == b_hash
    assert all("ended by the researcher" in log for log in logs)
