"""The live terminal panel of `intellect-node start` (rich), drawn from the node's status record."""

from __future__ import annotations

import asyncio

from intellect.node.app.status import NodeStatus
from rich.live import Live
from rich.table import Table


async def live_panel(status: NodeStatus) -> None:
    """Redraw the panel twice a second until cancelled."""

    def render() -> Table:
        t = Table(title=f"intellect-node {status.peer_id[:16]}…", show_header=False)
        ar = status.last_allreduce
        rows = [
            ("run", f"{status.run_name} {status.run_id[:12]}"),
            ("phase", status.phase),
            ("paused", "; ".join(status.pause_reasons.values()) if status.paused else "no"),
            ("limits", ", ".join(f"{k}={v}" for k, v in status.limits.items()) or "none"),
            ("round", str(status.round)),
            ("loss", "-" if status.loss is None else f"{status.loss:.4f}"),
            ("tokens/s", f"{status.tokens_per_s:.0f}"),
            ("peers", str(status.peers)),
            (
                "last all-reduce",
                f"{'ok' if ar.ok else 'failed'} {ar.seconds:.2f}s {ar.reason}" if ar.at else "-",
            ),
            ("last sync", f"round {status.last_sync.round} from {status.last_sync.source}"),
            ("state hash", status.state_hash[:16]),
        ]
        for k, v in rows:
            t.add_row(k, v)
        return t

    with Live(render(), refresh_per_second=2, transient=False) as live:
        while True:
            await asyncio.sleep(0.5)
            live.update(render())
