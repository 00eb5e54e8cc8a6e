"""Config layering (defaults < config.toml < INTELLECT_NODE_* < flags) and the `init`/`id` commands, both
through click's CliRunner and through the installed `intellect-node` console script."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import intellect.node
import pytest
from click.testing import CliRunner
from intellect.crypto.identity import Identity
from intellect.node.app.config import (
    DEFAULT_CONFIG_TEXT,
    ConfigError,
    NodeConfig,
    default_data_dir,
    load_config,
)
from intellect.node.cli.main import cli


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without any INTELLECT_NODE_* variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTELLECT_NODE_")}
    env.update(extra)
    return env


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    for key in [k for k in os.environ if k.startswith("INTELLECT_NODE_")]:
        monkeypatch.delenv(key)
    return CliRunner()


def test_init_then_id(runner: CliRunner, tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    result = runner.invoke(cli, ["init", "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    peer_id = result.stdout.strip()
    # Where it is, on stderr (stdout is the peer ID alone, for scripts).
    assert result.stderr.strip() == f"created the data directory, identity.key, config.toml in {data_dir}"
    assert peer_id.startswith("12D3KooW") and len(peer_id) == 52
    assert (data_dir / "identity.key").stat().st_mode & 0o777 == 0o600
    assert Identity.load(data_dir / "identity.key").peer_id == peer_id
    assert (data_dir / "config.toml").read_text() == DEFAULT_CONFIG_TEXT
    result = runner.invoke(cli, ["id", "--data-dir", str(data_dir)])
    assert result.exit_code == 0 and result.output.strip() == peer_id
    # init again keeps the identity and the (possibly edited) config.
    (data_dir / "config.toml").write_text('log_level = "DEBUG"\n')
    result = runner.invoke(cli, ["init", "--data-dir", str(data_dir)])
    assert result.exit_code == 0 and result.stdout.strip() == peer_id
    assert (data_dir / "config.toml").read_text() == 'log_level = "DEBUG"\n'
    assert str(data_dir) in result.stderr and "already initialised" in result.stderr
    (data_dir / "config.toml").unlink()
    result = runner.invoke(cli, ["init", "--data-dir", str(data_dir)])
    assert result.stderr.strip() == f"created config.toml in {data_dir}"


def test_default_config_text_is_valid_and_complete() -> None:
    values = tomllib.loads(DEFAULT_CONFIG_TEXT)
    defaults = NodeConfig(data_dir=Path("/x"))
    for key, value in values.items():
        current = getattr(defaults, key)
        assert (tuple(value) if isinstance(value, list) else value) == current, key
    assert DEFAULT_CONFIG_TEXT.count("#") >= 5  # commented


def test_id_without_identity_is_a_clear_error(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["id", "--data-dir", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert "intellect-node init" in result.output


def test_id_refuses_world_readable_key(runner: CliRunner, tmp_path: Path) -> None:
    assert runner.invoke(cli, ["init", "--data-dir", str(tmp_path)]).exit_code == 0
    (tmp_path / "identity.key").chmod(0o644)
    result = runner.invoke(cli, ["id", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "chmod 600" in result.output


def test_data_dir_from_environment(runner: CliRunner, tmp_path: Path) -> None:
    env = {"INTELLECT_NODE_DATA_DIR": str(tmp_path / "from-env")}
    result = runner.invoke(cli, ["init"], env=env)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "from-env" / "identity.key").exists()
    assert runner.invoke(cli, ["id"], env=env).stdout == result.stdout
    assert str(tmp_path / "from-env") in result.stderr
    # The flag wins over the environment.
    result = runner.invoke(cli, ["init", "--data-dir", str(tmp_path / "flag")], env=env)
    assert result.exit_code == 0 and (tmp_path / "flag" / "identity.key").exists()


def test_unknown_environment_variable_is_an_error(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["init", "--data-dir", str(tmp_path)], env={"INTELLECT_NODE_BOOTSTRAPP": "x"})
    assert result.exit_code == 2
    assert "INTELLECT_NODE_BOOTSTRAPP" in result.output and "INTELLECT_NODE_BOOTSTRAP" in result.output
    assert not (tmp_path / "identity.key").exists()
    with pytest.raises(ConfigError, match="unknown environment variable INTELLECT_NODE_NOPE"):
        load_config(tmp_path, environ={"INTELLECT_NODE_NOPE": "1"})


def test_malformed_config_file_is_an_error(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("bootstrap = [unterminated\n")
    result = runner.invoke(cli, ["init", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "config.toml" in result.output and "not valid TOML" in result.output
    for text, match in [
        ("bootstrapp = []\n", "unknown key 'bootstrapp'"),
        ("http_port = 1.5\n", "http_port"),
        ("http_port = 70000\n", "http_port"),
        ('device = "tpu"\n', "device"),
        ("client_mode = 3\n", "client_mode"),
        ("listen = [1, 2]\n", "listen"),
        ('data_dir = "/elsewhere"\n', "data_dir cannot be set"),
        (b"\xff\xfe".decode("latin-1"), "not valid TOML"),
    ]:
        (tmp_path / "config.toml").write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_config(tmp_path, environ={})
    # A typo lists the keys the file may hold, as the guide says (and as an unknown variable does).
    (tmp_path / "config.toml").write_text('bootstrapp = []\nlog_level = "DEBUG"\n')
    result = runner.invoke(cli, ["id", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "unknown key 'bootstrapp'" in result.output
    listed = result.output.split("known keys:", 1)[1]
    for key in ("bootstrap", "listen", "http_port", "log_level", "run", "device"):
        assert re.search(rf"\b{key}\b", listed), (key, result.output)
    assert "data_dir" not in listed  # it cannot be set in the file


def test_layering_file_env_flags(tmp_path: Path) -> None:
    p2p = "/p2p/12D3KooWRMBocDC43PTTpmAQfJed9HFqkmkkGsoKZYqRy5RdxMXE"  # bootstrap addresses need a peer ID
    (tmp_path / "config.toml").write_text(
        f'log_level = "DEBUG"\ndevice = "cpu"\nhttp_port = 1000\nbootstrap = ["/ip4/1.1.1.1/tcp/1{p2p}"]\n'
    )
    only_file = load_config(tmp_path, environ={})
    assert (only_file.log_level, only_file.device, only_file.http_port) == ("DEBUG", "cpu", 1000)
    assert only_file.bootstrap == (f"/ip4/1.1.1.1/tcp/1{p2p}",)
    env = {
        "INTELLECT_NODE_LOG_LEVEL": "WARNING",
        "INTELLECT_NODE_HTTP_PORT": "2000",
        "INTELLECT_NODE_BOOTSTRAP": f"/ip4/2.2.2.2/tcp/2{p2p}, /ip4/3.3.3.3/tcp/3{p2p}",
        "INTELLECT_NODE_CLIENT_MODE": "yes",
        "OTHER_VARIABLE": "ignored",
    }
    with_env = load_config(tmp_path, environ=env)
    assert (with_env.log_level, with_env.device, with_env.http_port) == ("WARNING", "cpu", 2000)
    assert with_env.bootstrap == (f"/ip4/2.2.2.2/tcp/2{p2p}", f"/ip4/3.3.3.3/tcp/3{p2p}")
    assert with_env.client_mode is True
    flags = {"http_port": 3000, "device": None, "bootstrap": ()}  # None / () mean "flag not given"
    with_flags = load_config(tmp_path, flags=flags, environ=env)
    assert (with_flags.log_level, with_flags.device, with_flags.http_port) == ("WARNING", "cpu", 3000)
    assert with_flags.bootstrap == with_env.bootstrap
    assert with_flags.data_dir == tmp_path
    with pytest.raises(ConfigError, match="unknown option"):
        load_config(tmp_path, flags={"nope": 1}, environ={})
    with pytest.raises(ConfigError, match="INTELLECT_NODE_HTTP_PORT"):
        load_config(tmp_path, environ={"INTELLECT_NODE_HTTP_PORT": "eighty"})
    with pytest.raises(ConfigError, match="client_mode"):
        load_config(tmp_path, environ={"INTELLECT_NODE_CLIENT_MODE": "maybe"})


def test_default_data_dir_follows_platform_convention(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert default_data_dir() == tmp_path / "xdg" / "intellect-node"
    assert default_data_dir().name == "intellect-node"
    assert load_config(environ={}).data_dir == default_data_dir()


def _console_script() -> str:
    script = Path(sys.executable).with_name("intellect-node")
    found = str(script) if script.exists() else shutil.which("intellect-node")
    assert found, "the intellect-node console script is not installed"
    return found


def test_installed_console_script(tmp_path: Path) -> None:
    script = _console_script()
    data_dir = tmp_path / "node"
    env = clean_env()

    def run(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [script, *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, **(extra_env or {})},
            check=False,
        )

    init = run("init", "--data-dir", str(data_dir))
    assert init.returncode == 0, init.stderr
    ident = run("id", "--data-dir", str(data_dir))
    assert ident.returncode == 0 and ident.stdout == init.stdout
    assert Identity.load(data_dir / "identity.key").peer_id == ident.stdout.strip()
    bad = run("id", "--data-dir", str(data_dir), extra_env={"INTELLECT_NODE_TYPO": "1"})
    assert bad.returncode == 2 and "INTELLECT_NODE_TYPO" in bad.stderr
    version = run("--version")
    assert version.returncode == 0 and "intellect-node" in version.stdout
    # The CLI reads the installed metadata; it must agree with the package's own __version__.
    assert version.stdout.strip() == f"intellect-node, version {intellect.node.__version__}"


def test_a_removed_setting_is_named_with_what_to_do(tmp_path: Path) -> None:
    """`gossip_port` is gone (gossip runs over the p2p daemon): an old config file or environment that
    still sets it gets an error that says so, not "unknown key"."""
    (tmp_path / "config.toml").write_text("gossip_port = 4003\n")
    with pytest.raises(ConfigError, match=r"gossip_port is no longer a setting.*p2p daemon"):
        load_config(tmp_path, environ={})
    (tmp_path / "config.toml").write_text("")
    with pytest.raises(ConfigError, match="INTELLECT_NODE_GOSSIP_PORT: gossip_port is no longer"):
        load_config(tmp_path, environ={"INTELLECT_NODE_GOSSIP_PORT": "4003"})


@pytest.mark.parametrize("levels", [20, 500])
def test_a_deeply_nested_config_file_is_a_config_error(tmp_path: Path, levels: int) -> None:
    # Whether tomllib itself recurses out on 500 levels depends on the stack it starts from (it did not in
    # CI once): the error must not.
    (tmp_path / "config.toml").write_text("a = " + "[" * levels + "]" * levels + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(tmp_path, environ={})
