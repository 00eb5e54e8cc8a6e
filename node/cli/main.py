"""The `intellect-node` command line: one click group; each area registers its own subcommands.

Subcommand modules are listed in `_COMMAND_MODULES`; each exposes `register(group)`. They are imported
lazily by name so that `intellect-node id` does not pay for importing torch or hivemind.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import click
from intellect.node.app.config import DEFAULT_CONFIG_TEXT, ConfigError, NodeConfig, load_config

#: Modules of `intellect.node` that add subcommands (each has `register(group: click.Group)`).
_COMMAND_MODULES: tuple[str, ...] = ("daemon", "data", "dht", "doctor")

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Data directory (default: per-user data dir, or INTELLECT_NODE_DATA_DIR).",
)


def config_from_cli(data_dir: Path | None, **flags: Any) -> NodeConfig:
    """Load the layered config, turning a ConfigError into a clean CLI error (exit 2)."""
    try:
        return load_config(data_dir=data_dir, flags=flags)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None


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


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="intellect-node")
