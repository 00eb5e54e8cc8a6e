"""The `intellect-node` command line: one click group; each area registers its own subcommands.

Subcommand modules are listed in `_COMMAND_MODULES`; each exposes `register(group)`. They are imported
lazily by name so that `intellect-node id` does not pay for importing torch or hivemind.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click
from intellect.node.app.config import DEFAULT_CONFIG_TEXT, ConfigError, NodeConfig, load_config

#: Modules of `intellect.node` that add subcommands (each has `register(group: click.Group)`).
_COMMAND_MODULES: tuple[str, ...] = (
    "contributions",
    "control",
    "daemon",
    "data",
    "dht",
    "doctor",
    "export",
    "watch",
)

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Data directory (default: per-user data dir, or INTELLECT_NODE_DATA_DIR).",
)


def _remember_log_flag(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is not None:
        ctx.meta[f"intellect.{param.name}"] = value
    return value


def log_options(f: Any) -> Any:
    """`--log-format` and `--log-level` for a command that logs; `config_from_cli` picks them up."""
    f = click.option(
        "--log-level",
        default=None,
        expose_value=False,
        callback=_remember_log_flag,
        help="DEBUG, INFO, WARNING or ERROR (stderr).",
    )(f)
    return click.option(
        "--log-format",
        type=click.Choice(["text", "json"]),
        default=None,
        expose_value=False,
        callback=_remember_log_flag,
        help="Log lines on stderr: text, or one JSON object per line.",
    )(f)


#: The log format of the command that runs ("text" or "json"), once its config is loaded: errors are
#: shown in it (`main`). Before that, `--log-format json` or INTELLECT_NODE_LOG_FORMAT=json decide.
_log_format: str | None = None


class CliError(click.ClickException):
    """An expected failure, shown as its message only (one or two lines, no usage text): exit 1."""


class CliUsageError(CliError):
    """A mistake in the command line or the config, shown like `CliError`: exit 2."""

    exit_code = 2


def config_from_cli(data_dir: Path | None, **flags: Any) -> NodeConfig:
    """Load the layered config and parse its multiaddrs, turning a mistake into a clean CLI error (exit 2)."""
    global _log_format
    from intellect.node.app.preflight import AddressError, check_addresses

    ctx = click.get_current_context(silent=True)
    for name in ("log_format", "log_level"):  # from `log_options`
        if flags.get(name) is None and ctx is not None and f"intellect.{name}" in ctx.meta:
            flags[name] = ctx.meta[f"intellect.{name}"]
    try:
        config = load_config(data_dir=data_dir, flags=flags)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    _log_format = config.log_format
    try:
        check_addresses(config.bootstrap, config.listen, config.announce)
    except AddressError as e:
        raise CliUsageError(str(e)) from None
    return config


class _Group(click.Group):
    """Loads subcommand modules on first use of the group."""

    _loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for name in _COMMAND_MODULES:
                importlib.import_module(f"intellect.node.cli.{name}").register(self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load()
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Group)
# The installed distribution's version (pyproject.toml, equal to `intellect.node.__version__`), read from
# its metadata: `intellect.node` itself is the layer above cli, which cli does not import.
@click.version_option(package_name="intellect-node", prog_name="intellect-node")
def cli() -> None:
    """intellect-node: train language models together over the internet (DiLoCo, peer to peer)."""


@cli.command()
@data_dir_option
def init(data_dir: Path | None) -> None:
    """Create the data directory, a new identity and a commented config; print the peer ID.

    The peer ID alone goes to stdout (scripts capture it); where the data directory is, and what was
    created in it, goes to stderr."""
    from intellect.crypto.errors import IdentityError
    from intellect.crypto.identity import Identity

    config = config_from_cli(data_dir)
    created = [] if config.data_dir.is_dir() else ["the data directory"]
    config.data_dir.mkdir(parents=True, exist_ok=True)
    had_identity = config.identity_path.exists()
    try:
        ident = Identity.load_or_create(config.identity_path)
    except IdentityError as e:
        raise click.ClickException(str(e)) from None
    if not had_identity:
        created.append(config.identity_path.name)
    if not config.config_path.exists():
        config.config_path.write_text(DEFAULT_CONFIG_TEXT)
        created.append(config.config_path.name)
    where = config.data_dir.resolve()
    if created:
        click.echo(f"created {', '.join(created)} in {where}", err=True)
    else:
        click.echo(f"data directory {where} already initialised (identity and config kept)", err=True)
    click.echo(ident.peer_id)


@cli.command(name="id")
@data_dir_option
def id_(data_dir: Path | None) -> None:
    """Print this node's peer ID."""
    from intellect.crypto.errors import IdentityError
    from intellect.crypto.identity import Identity

    config = config_from_cli(data_dir)
    try:
        click.echo(Identity.load(config.identity_path).peer_id)
    except IdentityError as e:
        raise click.ClickException(str(e)) from None


def _json_errors(args: list[str]) -> bool:
    if _log_format is not None:
        return _log_format == "json"
    for i, arg in enumerate(args):
        if arg == "--log-format=json" or (arg == "--log-format" and args[i + 1 : i + 2] == ["json"]):
            return True
    return os.environ.get("INTELLECT_NODE_LOG_FORMAT", "").strip().lower() == "json"


def _show_error(e: click.ClickException, args: list[str]) -> None:
    """An expected error: a JSON log record on stderr in JSON mode, else click's own lines."""
    if not _json_errors(args):
        e.show()
        return
    from intellect.node.app.logs import JsonFormatter

    record = logging.LogRecord("intellect.node.cli", logging.ERROR, "", 0, e.format_message(), None, None)
    record.exit_code = e.exit_code
    click.echo(JsonFormatter().format(record), err=True)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point. Expected errors are one or two lines (in the log format); Ctrl-C in a
    short command exits 130 quietly."""
    args = argv if argv is not None else sys.argv[1:]
    try:
        code = cli.main(args=args, prog_name="intellect-node", standalone_mode=False)
    except click.ClickException as e:
        _show_error(e, args)
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        sys.exit(130)
    if isinstance(code, int) and code:
        sys.exit(code)
