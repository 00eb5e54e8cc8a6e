"""CLI commands of the daemon: `start` (run a node), `status` (ask a running node), `swarm` (local demo).

Heavy imports (torch, hivemind) happen inside the commands, so `intellect-node --help` stays fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from intellect.node.cli.main import CliError, CliUsageError, config_from_cli, data_dir_option
from intellect.node.cli.runarg import RUN_ID


def register(group: click.Group) -> None:
    """Add `start`, `status` and `swarm` to the `intellect-node` group."""
    group.add_command(start)
    group.add_command(status)
    group.add_command(swarm)
    group.add_command(pause)
    group.add_command(resume)
    group.add_command(limits)


def limit_options(f: Any) -> Any:
    """The volunteer limits as flags of `start` (each also a config key; docs/user-guide.md)."""
    options = [
        ("--cpu-threads", click.IntRange(0, 1024), "CPU threads torch trains with (0: torch's default)."),
        ("--nice", click.IntRange(0, 19), "Niceness added at start: a lower CPU priority (0..19)."),
        (
            "--cpu-weight",
            click.IntRange(0, 10000),
            "cgroup v2 cpu.weight of the node's cgroup (0: leave it).",
        ),
        ("--gpu-memory-fraction", float, "Largest share of the GPU's memory to use (0 < f <= 1; 0: no cap)."),
        ("--only-when-idle-minutes", click.IntRange(0, 1440), "Train only after N idle minutes (0: always)."),
        (
            "--idle-cpu-percent",
            float,
            "Other processes' CPU load (% of all cores) that still counts as idle.",
        ),
        ("--pause-on-battery/--no-pause-on-battery", None, "Pause while the machine runs on battery."),
        ("--schedule", str, 'When to train, local time: e.g. "mon-fri 19:00-07:00, sat-sun 00:00-24:00".'),
        ("--max-upload-mbps", float, "Upload rate limit of averaging and state sync (Mbit/s; 0: none)."),
        ("--max-download-mbps", float, "Download rate limit of averaging and state sync (Mbit/s; 0: none)."),
        ("--daily-transfer-gb", float, "Pause for the rest of the UTC day after this many GB (0: no cap)."),
        ("--max-disk-gb", float, "Disk cap for checkpoints and shards, in GB (0: no cap)."),
    ]
    for flag, kind, text in reversed(options):
        f = click.option(flag, type=kind, default=None, help=text)(f)
    return f


@click.command()
@click.option("--bootstrap", multiple=True, help="DHT entry multiaddr (…/p2p/12D3KooW…); repeatable.")
@click.option(
    "--run",
    "run_id",
    type=RUN_ID,
    default=None,
    help="Run to join: its ID or a unique prefix (default: the best run we are admitted to).",
)
@data_dir_option
@click.option(
    "--role",
    type=click.Choice(["trainer", "rollout"]),
    default=None,
    help="trainer: train and average (default); rollout: generate rollouts for an RL run's trainers.",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Training device.")
@click.option(
    "--local-ranks",
    type=click.IntRange(min=0, max=64),
    default=None,
    help="Ranks training inside this node, each on its share of the batch (0: one per GPU).",
)
@click.option(
    "--listen", multiple=True, help="p2p listen multiaddr; repeatable (default /ip4/0.0.0.0/tcp/0)."
)
@click.option("--announce", multiple=True, help="Public multiaddr to announce (port-forwarded NAT).")
@click.option("--client-mode/--no-client-mode", default=None, help="DHT client mode (behind NAT).")
@click.option(
    "--reachability",
    type=click.Choice(["auto", "public", "private"]),
    default=None,
    help="Can others dial us? private: behind a NAT, reached through the bootstrap nodes' relays.",
)
@click.option("--http-port", type=int, default=None, help="Control API port on 127.0.0.1 (0: any).")
@click.option(
    "--metrics-addr",
    default=None,
    metavar="HOST:PORT",
    help="Also serve /metrics alone here, e.g. 0.0.0.0:9100 for Prometheus (default: 127.0.0.1 API only).",
)
@click.option(
    "--max-rounds",
    type=click.IntRange(min=1),
    default=None,
    help="Exit 0 after this many rounds completed by this process (a resumed node counts from 0).",
)
@click.option(
    "--until-round",
    type=click.IntRange(min=1),
    default=None,
    help="Exit 0 once the run's global state this node holds reaches this round.",
)
@click.option("--min-peers", type=click.IntRange(min=1), default=1, help="Wait for this many members first.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None, help="Log line format.")
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR.")
@limit_options
def start(
    bootstrap: tuple[str, ...],
    run_id: str | None,
    data_dir: Path | None,
    role: str | None,
    device: str | None,
    local_ranks: int | None,
    listen: tuple[str, ...],
    announce: tuple[str, ...],
    client_mode: bool | None,
    reachability: str | None,
    http_port: int | None,
    metrics_addr: str | None,
    max_rounds: int | None,
    until_round: int | None,
    min_peers: int,
    log_format: str | None,
    log_level: str | None,
    **volunteer_limits: Any,
) -> None:
    """Run a node: join the DHT, pick and verify a run, sync, then train and average round after round.

    SIGINT/SIGTERM stop it cleanly (leaving notice, checkpoint, p2p daemon stopped); a second one exits
    at once. Watch it with `intellect-node status` or http://127.0.0.1:<port>/ (port in <data dir>/http.port).
    """
    config = config_from_cli(
        data_dir,
        bootstrap=bootstrap,
        run=run_id,
        role=role,
        device=device,
        local_ranks=local_ranks,
        listen=listen,
        announce=announce,
        client_mode=client_mode,
        reachability=reachability,
        http_port=http_port,
        metrics_addr=metrics_addr,
        log_format=log_format,
        log_level=log_level,
        **volunteer_limits,
    )
    lock = _preflight(config)  # before the heavy imports: a mistake is reported at once
    from intellect.node.app.children import hold_sigint

    hold_sigint()  # Ctrl-C is the daemon's alone, taken before any other thread or child process exists
    from intellect.node.app.daemon import DaemonOptions, run_daemon
    from intellect.node.app.logs import capture_stdio, setup_logging, stop_capture
    from intellect.node.app.preflight import PreflightError, check_device

    setup_logging(config.log_format, config.log_level)
    try:
        check_device(config.device, config.local_ranks)
    except PreflightError as e:
        raise CliError(str(e)) from None
    if config.log_format == "json":
        capture_stdio()  # what children and C++ libraries write to fds 1 and 2 becomes JSON too
    options = DaemonOptions(max_rounds=max_rounds, until_round=until_round, min_peers=min_peers)
    code = run_daemon(config, options, lock)
    # The daemon has already stopped and reaped everything it started. Leave now rather than through the
    # interpreter's finalization: that resets signal handlers to their defaults first, so a second Ctrl-C
    # arriving during it (torch's and hivemind's teardown take a while) would kill us with -SIGINT instead
    # of the documented exit code.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    stop_capture()
    os._exit(code)


def _preflight(config: Any) -> Any:
    """What `start` checks before anything starts: a bootstrap address, the data directory's lock (taken
    here and held until the process exits), free ports. Each failure is a one- or two-line CliError."""
    from intellect.node.app.config import parse_host_port
    from intellect.node.app.lock import DataDirLock, DataDirLocked
    from intellect.node.app.preflight import PreflightError, check_ports, require_bootstrap

    try:
        require_bootstrap(config.bootstrap, config.config_path)
    except PreflightError as e:
        raise CliUsageError(str(e)) from None
    try:
        lock = DataDirLock.acquire(config.data_dir)
    except DataDirLocked as e:
        raise CliError(str(e)) from None
    try:
        extra = [("metrics", *parse_host_port(config.metrics_addr))] if config.metrics_addr else []
        check_ports(config.http_port, config.listen, extra)
    except PreflightError as e:
        lock.release()
        raise CliError(str(e)) from None
    return lock


def _fmt_allreduce(ar: dict[str, Any]) -> str:
    if not ar.get("at"):
        return "none yet"
    reason = f" ({ar.get('reason')})" if ar.get("reason") else ""
    outcome = "ok" if ar.get("ok") else "failed"
    return f"round {ar.get('round')}: {outcome} in {ar.get('seconds', 0):.2f} s{reason}"


def _fmt_paused(s: dict[str, Any]) -> str:
    reasons = s.get("pause_reasons") or {}
    return "; ".join(f"{v} ({k})" for k, v in reasons.items()) if s.get("paused") else "no"


def _fmt_limits(limits: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in limits.items()) or "none"


def _fmt_status(s: dict[str, Any]) -> str:
    sync = s.get("last_sync", {})
    loss = s.get("loss")
    synced = f"round {sync.get('round')} from {sync.get('source') or '-'}" if sync.get("at") else "none yet"
    lines = [
        f"peer        {s.get('peer_id')}",
        f"run         {s.get('run_name')} {s.get('run_id')}",
        f"phase       {s.get('phase')}",
        f"paused      {_fmt_paused(s)}",
        f"limits      {_fmt_limits(s.get('limits', {}))}",
        f"round       {s.get('round')}   (ok {s.get('rounds_ok')}, failed {s.get('rounds_failed')})",
        f"loss        {'-' if loss is None else f'{loss:.4f}'}",
        f"tokens      {s.get('tokens')} averaged, {s.get('tokens_failed', 0)} in failed rounds,"
        f" {s.get('tokens_pending', 0)} this round   ({s.get('tokens_per_s', 0):.0f} tok/s)",
        f"peers       {s.get('peers')}",
        f"state hash  {s.get('state_hash')}",
        f"all-reduce  {_fmt_allreduce(s.get('last_allreduce', {}))}",
        f"last sync   {synced}",
        f"bytes       sent {s.get('bytes_sent')}  received {s.get('bytes_received')}",
        f"rejected    {json.dumps(s.get('rejected', {}))}",
        f"loop lag    {s.get('loop_lag_s', 0):.3f} s (max {s.get('max_loop_lag_s', 0):.3f} s)",
    ]
    return "\n".join(lines)


@click.command()
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON status.")
def status(data_dir: Path | None, as_json: bool) -> None:
    """Show what the local daemon using this data directory is doing."""
    from intellect.node.app.status import fetch_status

    config = config_from_cli(data_dir)
    try:
        s = fetch_status(config.data_dir)
    except FileNotFoundError:
        raise click.ClickException(f"no daemon is running with data directory {config.data_dir}") from None
    except OSError as e:
        raise click.ClickException(f"the daemon's control API did not answer: {e}") from None
    click.echo(json.dumps(s, indent=2) if as_json else _fmt_status(s))


@click.command()
@click.option("--peers", type=click.IntRange(min=1, max=16), default=3, help="Number of daemons.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, help="Rounds every peer must finish.")
@click.option("--summary-json", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option(
    "--manifest",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Run manifest (default: examples/tiny-run.toml).",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep data dirs and logs here (default: a temporary directory, removed afterwards).",
)
@click.option("--timeout", "timeout_s", type=float, default=900.0, help="Give up after this many seconds.")
@click.option(
    "--rl",
    is_flag=True,
    help="The RL demo: a warm-started tiny policy, --peers trainers and --rollout-workers rollout workers.",
)
@click.option(
    "--rollout-workers", type=click.IntRange(min=1, max=16), default=2, help="With --rl: rollout workers."
)
@click.option(
    "--warmup-steps", type=click.IntRange(min=0), default=150, help="With --rl: supervised warm-up steps."
)
def swarm(
    peers: int,
    rounds: int,
    summary_json: Path | None,
    manifest: Path | None,
    workdir: Path | None,
    timeout_s: float,
    rl: bool,
    rollout_workers: int,
    warmup_steps: int,
) -> None:
    """Start a bootstrap node, seed the tiny run and train it with N local daemons for R rounds.

    Exits 0 only if every peer finished every round with identical global-state hashes. With --rl, the
    RL demo instead (`intellect-node swarm --rl --peers 2`): trainers and rollout workers on loopback,
    from a supervised warm start, printing the reward per policy version and the held-out accuracy.
    """
    from intellect.node.app.children import run_async
    from intellect.node.app.logs import setup_logging
    from intellect.node.cli.swarm import run_swarm

    setup_logging("text", "INFO")
    if rl:
        _rl_swarm(peers, rollout_workers, rounds, summary_json, workdir, warmup_steps, timeout_s)
    t0 = time.monotonic()
    # Its bootstrap node's p2p daemon in a process group of its own, like every node's (Ctrl-C is ours).
    code, summary = run_async(run_swarm(peers, rounds, summary_json, workdir, manifest, timeout_s))
    losses = []
    for entry in summary["rounds"]:
        vals = [p["loss"] for p in entry["peers"].values() if p.get("loss") is not None]
        if vals:
            losses.append(f"r{entry['round']}={sum(vals) / len(vals):.3f}")
    click.echo(
        f"run {summary['run_id']}: {'OK' if code == 0 else 'FAILED'} in {time.monotonic() - t0:.0f} s; "
        f"mean loss {' '.join(losses)}"
    )
    sys.exit(code)


def _rl_swarm(
    trainers: int,
    workers: int,
    rounds: int,
    summary_json: Path | None,
    workdir: Path | None,
    warmup_steps: int,
    timeout_s: float,
) -> None:
    from intellect.node.app.children import run_async
    from intellect.node.cli.rlswarm import run_rl_swarm

    code, summary = run_async(
        run_rl_swarm(trainers, workers, rounds, summary_json, workdir, warmup_steps, timeout_s=timeout_s)
    )
    rl = summary["rl"]
    curve = " ".join(f"v{c['version']}={c['mean_reward']:.3f}" for c in rl["reward_curve"])
    warm, final = rl["warm_start"], rl["final"]
    if "error" in final:
        after = f"not measured ({final['error']})"
    else:
        after = f"{final['accuracy_sampled']:.1%} sampled / {final['accuracy_greedy']:.1%} greedy"
        after += f" at round {final['round']}"
    click.echo(f"run {summary['run_id']}: {'OK' if code == 0 else 'FAILED'} in {summary['seconds']:.0f} s")
    click.echo(f"mean reward per policy version: {curve}")
    click.echo(
        f"held-out accuracy: warm start {warm['accuracy_sampled']:.1%} sampled / "
        f"{warm['accuracy_greedy']:.1%} greedy; final {after}"
    )
    for name, w in rl["workers"].items():
        click.echo(
            f"{name}: {w['batches']} batches {w['outcomes']}, {w['completions_per_s']:.0f} completions/s"
        )
    sys.exit(code)


def _control(data_dir: Path | None, path: str, post: bool) -> dict[str, Any]:
    from intellect.node.app.control import call

    config = config_from_cli(data_dir)
    try:
        return call(config.data_dir, path, post=post)
    except FileNotFoundError:
        raise CliError(f"no daemon is running with data directory {config.data_dir}") from None
    except OSError as e:
        raise CliError(f"the daemon's control API did not answer: {e}") from None


def _show_control(answer: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    click.echo(f"paused      {_fmt_paused({'paused': answer['paused'], 'pause_reasons': answer['reasons']})}")
    click.echo(f"limits      {_fmt_limits(answer.get('limits', {}))}")


@click.command()
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")
def pause(data_dir: Path | None, as_json: bool) -> None:
    """Pause the running node: it tells its peers it is leaving, keeps its state, and stops training."""
    _show_control(_control(data_dir, "/pause", post=True), as_json)


@click.command()
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")
def resume(data_dir: Path | None, as_json: bool) -> None:
    """Resume a node paused with `pause`: it syncs the run's state and trains on. A volunteer limit that
    still holds (schedule, idle, battery, transfer cap) keeps it paused, and says so."""
    _show_control(_control(data_dir, "/resume", post=True), as_json)


@click.command()
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")
def limits(data_dir: Path | None, as_json: bool) -> None:
    """Show the running node's volunteer limits and why it is paused, if it is."""
    _show_control(_control(data_dir, "/limits", post=False), as_json)
