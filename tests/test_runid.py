"""Run IDs by unique prefix (#16, finding 7): `runs` prints 16 of the 64 characters, and every run-ID
argument takes any unique prefix of at least four, like git and docker object IDs. An ambiguous prefix is
an error listing the matches; an unknown one says so."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import click
import pytest
from click.testing import CliRunner
from intellect.crypto.identity import Identity
from intellect.node.app.body import load_run_manifest, pick_run
from intellect.node.app.config import ConfigError, NodeConfig
from intellect.node.app.runid import RunIdError, check_prefix, resolve
from intellect.node.cli.main import cli
from intellect.node.cli.runarg import resolve_in_dht
from intellect.protocol.manifest import Manifest, SignedManifest


def _two_runs_sharing_a_prefix(researcher: str) -> tuple[Manifest, Manifest]:
    """Two manifests whose run IDs share their first 4 hex characters (a birthday search: ~300 tries)."""
    base = dataclasses.replace(load_run_manifest(), researcher=researcher)
    seen: dict[str, Manifest] = {}
    for i in itertools.count():
        m = dataclasses.replace(base, name=f"run-{i}")
        other = seen.setdefault(m.run_id[:4], m)
        if other is not m:
            return other, m
    raise AssertionError("unreachable")


class FakeDht:
    """What `pick_run` and `resolve_in_dht` read: the verifiable runs and their members."""

    def __init__(self, runs: list[SignedManifest]) -> None:
        self.runs = runs

    async def get_manifests(self, latest: bool = True) -> tuple[list[SignedManifest], int]:
        return list(self.runs), 0

    async def get_members(self, run_id: str, latest: bool = True) -> list[Any]:
        return []


@pytest.fixture(scope="module")
def runs() -> tuple[SignedManifest, SignedManifest, SignedManifest]:
    researcher = Identity.generate()
    a, b = _two_runs_sharing_a_prefix(researcher.peer_id)
    c = dataclasses.replace(load_run_manifest(), name="lonely")
    signed = tuple(SignedManifest.sign(m, researcher) for m in (a, b, c))
    assert signed[0].run_id[:4] == signed[1].run_id[:4] != signed[2].run_id[:4]
    return signed  # type: ignore[return-value]


def test_check_prefix_spelling() -> None:
    assert check_prefix("ABCD") == "abcd"
    assert check_prefix("a" * 64) == "a" * 64
    for bad in ("abc", "", "xyz1", "a" * 65, "12 34"):
        with pytest.raises(RunIdError):
            check_prefix(bad)


def test_resolve_unique_ambiguous_unknown(runs: tuple[SignedManifest, ...]) -> None:
    a, b, c = (r.run_id for r in runs)
    ids = [a, b, c]
    assert resolve(a[:16], ids) == a and resolve(c[:4].upper(), ids) == c and resolve(b, ids) == b
    with pytest.raises(RunIdError, match="ambiguous") as amb:
        resolve(a[:4], ids)
    assert a in str(amb.value) and b in str(amb.value) and c not in str(amb.value)
    missing = "f" * 8 if not any(i.startswith("f" * 8) for i in ids) else "0" * 8
    with pytest.raises(RunIdError, match="no run with ID"):
        resolve(missing, ids)


async def test_start_picks_a_run_by_prefix(runs: tuple[SignedManifest, ...]) -> None:
    """`start --run PREFIX`: the daemon joins the one run the prefix names, and stops at once (naming
    both) when it names several, instead of waiting a minute for a run that can never be unique."""
    a, b, c = runs
    dht: Any = FakeDht(list(runs))

    def no_ticket(run_id: str) -> bytes:
        return b""

    me = Identity.generate().peer_id
    assert (await pick_run(dht, c.run_id[:6], me, no_ticket, timeout_s=1)).run_id == c.run_id
    assert (await pick_run(dht, a.run_id[:16], me, no_ticket, timeout_s=1)).run_id == a.run_id
    with pytest.raises(RunIdError, match="ambiguous") as amb:
        await pick_run(dht, a.run_id[:4], me, no_ticket, timeout_s=30)
    assert a.run_id in str(amb.value) and b.run_id in str(amb.value)
    with pytest.raises(RuntimeError, match="found no verifiable manifest"):
        await pick_run(FakeDht([a]), c.run_id[:8], me, no_ticket, timeout_s=0.1)  # type: ignore[arg-type]


async def test_client_commands_resolve_prefixes(runs: tuple[SignedManifest, ...]) -> None:
    """What `peers --run` and `ticket RUN_ID` do with a prefix (against the runs of the DHT)."""
    a, b, c = runs
    dht = FakeDht(list(runs))
    assert await resolve_in_dht(dht, c.run_id[:4]) == c.run_id
    with pytest.raises(click.ClickException, match="ambiguous"):
        await resolve_in_dht(dht, a.run_id[:4])
    with pytest.raises(click.ClickException, match="no run with ID"):
        await resolve_in_dht(FakeDht([a]), b.run_id[:10])
    # A full ID needs no lookup: `peers` still lists the members of a run whose manifest expired.
    assert await resolve_in_dht(FakeDht([]), b.run_id) == b.run_id


@pytest.mark.parametrize("command", [["peers", "--run"], ["start", "--run"], ["ticket"]])
def test_misspelt_run_ids_fail_when_the_command_line_is_parsed(command: list[str]) -> None:
    for bad in ("abc", "nothex!", "a" * 65):
        args = [*command, bad] + (["12D3KooWx", "--out", "/nonexistent/t"] if command == ["ticket"] else [])
        result = CliRunner().invoke(cli, [*args, "--bootstrap", "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWx"])
        assert result.exit_code == 2, result.output
        assert "run_id" in result.output and "unique prefix" in result.output


def test_the_run_config_key_takes_a_prefix() -> None:
    assert NodeConfig(run="ABCDEF").run == "abcdef"
    with pytest.raises(ConfigError, match="run: "):
        NodeConfig(run="abc")
