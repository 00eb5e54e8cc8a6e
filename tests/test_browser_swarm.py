"""The run view and the node dashboard in a real browser against a live 3-peer swarm (issue #19, item 1).

Headless Chromium (its command line only: `--dump-dom` for the page as drawn, `--screenshot` for a
picture) loads `/` and `/run` of a node first alone, before its first round ("no data yet"), then once three
real daemons on loopback have trained rounds together: the run view must count 3 members, show rounds, a
loss to 4 significant digits and a loss curve with labelled axes, and `intellect-node watch RUN --once`
the same 3 members. Screenshots are kept under
`$TEST_ARTIFACTS` (default `test-artifacts/` at the repository root). Without Chromium the test skips,
unless REQUIRE_BROWSER=1 (CI installs it), when it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from intellect.node.app.status import fetch_status, read_port

from tests.nodeproc import CLI, clean_env, kill_session, seeded_bootstrap, start_node, wait_for

pytestmark = pytest.mark.swarm

ROOT = Path(__file__).resolve().parent.parent
INNER, BATCH, SEQ = 8, 4, 64
LOSS = re.compile(r"<td class=\"?n\"?>(\d+\.\d+)</td>")


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail("REQUIRE_BROWSER=1 but no chromium on PATH")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    return found


def artifacts() -> Path:
    out = Path(os.environ.get("TEST_ARTIFACTS") or ROOT / "test-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


def browse(url: str, *, screenshot: Path | None = None, timeout_s: float = 90.0) -> str:
    """The DOM of `url` after headless Chromium drew it (and a screenshot, if asked); kills the browser
    and everything it started when done or on timeout."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        args = [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=2000",
        ]
        args += [f"--screenshot={screenshot}", "--window-size=1280,900"] if screenshot else ["--dump-dom"]
        proc = subprocess.Popen(
            [*args, url],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    assert proc.returncode == 0, f"chromium exited {proc.returncode} on {url}"
    if screenshot is not None:
        assert screenshot.stat().st_size > 0
    return out.decode()


def look(base: str, path: str, name: str) -> str:
    """The DOM of `base + path`, and its screenshot kept as `name`.png."""
    browse(base + path, screenshot=artifacts() / f"{name}.png")
    return browse(base + path)


def write_manifest(path: Path) -> None:
    text = (ROOT / "node" / "runs" / "tiny-run.toml").read_text()
    for key, value in (
        ("inner_steps", INNER),
        ("warmup_steps", 2),
        ("batch_size", BATCH),
        ("seq_len", SEQ),
        ("name", '"run-view"'),
    ):
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text, count=1)
        assert n == 1, key
    path.write_text(text)


def run_json(data_dir: Path) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{read_port(data_dir)}/run.json", timeout=5) as r:
        data: dict[str, Any] = json.loads(r.read())
    return data


def _quiet(check: Any) -> Any:
    def safe() -> bool:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return bool(check())
        return False

    return safe


@pytest.mark.timeout(600)
def test_run_view_and_dashboard_in_chromium_against_three_live_peers(tmp_path: Path) -> None:
    chromium()
    manifest = tmp_path / "run.toml"
    write_manifest(manifest)
    names = ("alice", "bob", "carol")
    procs: list[subprocess.Popen[bytes]] = []
    with seeded_bootstrap(tmp_path / "boot", tmp_path / "researcher", manifest) as boot:
        try:
            alice = tmp_path / "alice"
            procs.append(start_node(alice, boot, "--min-peers", "3", log=tmp_path / "alice"))
            wait_for(_quiet(lambda: fetch_status(alice)["run_id"]), 120, "alice never joined the run")
            base = f"http://127.0.0.1:{read_port(alice)}"
            # Alone, before its first round: both pages say so instead of drawing an empty chart.
            fresh_dash = look(base, "/", "dashboard-fresh")
            fresh_run = look(base, "/run", "run-fresh")
            assert fresh_dash.count("no data yet") == 1 and "<svg" not in fresh_dash
            assert "no data yet" in fresh_run and "<svg" not in fresh_run
            for name in names[1:]:
                procs.append(start_node(tmp_path / name, boot, "--min-peers", "3", log=tmp_path / name))

            def trained() -> bool:
                d = run_json(alice)
                others = [m for m in d["members"] if not m["me"] and m["loss"] is not None]
                ok = all(fetch_status(tmp_path / n)["rounds_ok"] >= 2 for n in names)
                credited = len(d.get("contributions", [])) == 3  # every member in a verified receipt
                return (
                    ok
                    and credited
                    and d["member_count"] == 3
                    and len(others) == 2
                    and len(d["loss_curve"]) >= 2
                )

            try:
                wait_for(_quiet(trained), 420, "three members with two rounds each")
            except TimeoutError:
                tails = "\n\n".join((tmp_path / f"{n}.err").read_text()[-2000:] for n in names)
                raise AssertionError(f"no 3-member run view\n{tails}") from None
            data = run_json(alice)
            run_page = look(base, "/run", "run-swarm")
            dash = look(base, "/", "dashboard-swarm")
            watch = subprocess.run(
                [*CLI, "watch", data["run_id"][:12], "--once", "--data-dir", str(alice)],
                env=clean_env(COLUMNS="200"),
                capture_output=True,
                timeout=60,
            )
        finally:
            for p in procs:
                kill_session(p)
    # The run view: three members, their rounds, losses to 4 significant digits, a curve with axes.
    assert re.search(r"<td>members</td><td>3</td>", run_page), run_page[:3000]
    assert ">round</text>" in run_page and ">loss</text>" in run_page and "<polyline" in run_page
    members = run_page.split('id="members"', 1)[1].split("</table>", 1)[0]
    assert members.count("<tr>") == 1 + 3 and "(this node)" in members
    losses = LOSS.findall(members)
    assert len(losses) >= 3 and all(len(v.replace(".", "").lstrip("0")) <= 4 for v in losses), losses
    assert "tokens/s" in members and "12D3…" in members
    timeline = run_page.split('id="timeline"', 1)[1].split("</table>", 1)[0]
    rounds = [t["round"] for t in data["timeline"]]
    assert rounds and all(f'<td class="n">{r}</td>' in timeline for r in rounds), timeline
    assert "no data yet" not in run_page
    # Contributions: the three members, credited by receipts every member of a group signed.
    credits = run_page.split('id="contributions"', 1)[1].split("</table>", 1)[0]
    assert credits.count("<tr>") == 1 + 3 and all(c["rounds"] >= 1 for c in data["contributions"]), credits
    # The node's own dashboard: formatted numbers, a loss chart with axes.
    assert ">round</text>" in dash and ">loss</text>" in dash and "no data yet" not in dash
    assert re.search(r"<th>loss</th><td>\d+\.\d{1,3}</td>", dash) or re.search(
        r"<th>loss</th><td>\d{2,}\.\d{1,2}</td>", dash
    ), dash[:3000]
    assert re.search(r"\d+(\.\d+)? (B|KB|MB|GB) / \d+(\.\d+)? (B|KB|MB|GB)", dash)
    for name in ("dashboard-fresh", "run-fresh", "run-swarm", "dashboard-swarm"):
        assert (artifacts() / f"{name}.png").stat().st_size > 1000
    # The terminal's view of the same node.
    assert watch.returncode == 0, watch.stderr.decode()[-2000:]
    out = watch.stdout.decode()
    assert "3 members" in out and "(this node)" in out and "tokens/s" in out, out
    assert all(p.poll() is not None for p in procs)  # kill_session reaped every daemon we started
