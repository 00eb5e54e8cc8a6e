"""`intellect-node watch RUN`: the run view on the terminal.

Polls the local node's control API (`GET /run.json`, `intellect.node.app.runview`) and draws its members
and latest rounds as rich tables; `--once` prints one frame and exits. The numbers come formatted from the
node (`app.fmt`), so the terminal and the browser say the same thing.
"""

from __future__ import annotations

import time
import urllib.error
from pathlib import Path
from typing import Any

import click
from intellect.node.cli.main import config_from_cli, data_dir_option
from intellect.node.cli.runarg import RUN_ID
from rich.console import Console, Group
from rich.table import Table

#: Rounds of the timeline shown on the terminal.
TIMELINE_ROWS = 8


def render(d: dict[str, Any]) -> Group:
    """One frame of the run view from a `/run.json` snapshot."""
    highest = "–" if d["highest_round"] is None else str(d["highest_round"])
    title = (
        f"run {d['run_name']} {d['run_id'][:16]} · {d['member_count']} members · highest round {highest}"
        f" · latest loss {d['latest_loss_text']}"
    )
    members = Table(title=title, title_justify="left")
    for name, right in (
        ("member", False),
        ("round", True),
        ("loss", True),
        ("throughput", True),
        ("reachability", False),
        ("last averaging", False),
        ("heard", False),
    ):
        members.add_column(name, justify="right" if right else "left")
    for m in d["members"]:
        who = m["peer_text"] + (" (this node)" if m["me"] else "" if m["member"] else " (not listed)")
        rnd = "–" if m["round"] is None else str(m["round"])
        row = (
            who,
            rnd,
            m["loss_text"],
            m["rate_text"],
            m["reachability"],
            m["last_averaging"],
            m["heard_text"],
        )
        members.add_row(*row, style="bold" if m["me"] else None)
    rounds = Table(title="rounds", title_justify="left")
    for name in ("round", "groups (sizes)", "outcome", "failed attempts", "all-reduce"):
        rounds.add_column(name)
    for t in d["timeline"][:TIMELINE_ROWS]:
        fails = f"{t['failures']} ({', '.join(t['failure_reasons'])})" if t["failures"] else "0"
        rounds.add_row(str(t["round"]), t["groups_text"], t["outcome"], fails, t["allreduce_text"])
    if not d["timeline"]:
        rounds.add_row("no data yet", "", "", "", "")
    credits = Table(title="contributions (verified receipts)", title_justify="left")
    for name in ("peer", "tokens", "rounds"):
        credits.add_column(name, justify="left" if name == "peer" else "right")
    for c in d.get("contributions", []):
        credits.add_row(c["peer_text"], c["tokens_text"], str(c["rounds"]))
    if not d.get("contributions"):
        credits.add_row("no data yet", "", "")
    return Group(members, rounds, credits)


def fetch(data_dir: Path, run: str) -> dict[str, Any]:
    """The local node's run view, checked to be of `run`; ClickException when it cannot be had."""
    from intellect.node.app.control import call

    try:
        d = call(data_dir, "/run.json")
    except FileNotFoundError:
        raise click.ClickException(f"no node is running with data dir {data_dir}") from None
    except (OSError, urllib.error.URLError, ValueError) as e:
        raise click.ClickException(f"the node's control API did not answer: {e}") from None
    if not d["run_id"]:
        raise click.ClickException("the local node has not joined a run yet")
    if not d["run_id"].startswith(run):
        raise click.ClickException(f"the local node is in run {d['run_id'][:16]}, not {run}")
    return d


@click.command("watch")
@click.argument("run", type=RUN_ID)
@click.option("--once", is_flag=True, help="Print one frame and exit.")
@click.option(
    "--interval", type=click.FloatRange(0.2), default=2.0, show_default=True, help="Seconds per frame."
)
@data_dir_option
def watch_cmd(run: str, once: bool, interval: float, data_dir: Path | None) -> None:
    """Watch RUN as the local node sees it: members, loss, rounds (Ctrl-C to stop)."""
    config = config_from_cli(data_dir)
    console = Console()
    if once:
        console.print(render(fetch(config.data_dir, run)))
        return
    from rich.live import Live

    with Live(render(fetch(config.data_dir, run)), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(render(fetch(config.data_dir, run)), refresh=True)
        except KeyboardInterrupt:
            pass


def register(group: click.Group) -> None:
    """Add `watch` to the top-level command group."""
    group.add_command(watch_cmd)
