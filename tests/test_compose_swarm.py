"""The compose swarm's commands, run as real processes on this machine (#16, finding 9).

There is no docker here, so this test plays compose's part from deploy/compose.yaml itself: it takes each
service's `entrypoint` and `command` as written (compose's `${VAR:-default}` interpolation and `$$` escape
applied, with TRAINERS=2), its `environment`, the image's `ENV` from deploy/Dockerfile, and its volumes:
the image's /data volume, each named volume and each bind mount become directories here, and the
container paths in the scripts are rewritten to them. The only other rewriting is the network: the fixed
p2p port and the ports a container listens on (each has its own network namespace) become free ones, and
`/dns4/<service>` (compose's DNS) becomes 127.0.0.1. Then it starts them
in compose's order (`depends_on`): the bootstrap until its healthcheck passes, the seeder to completion
(it must read the mounted manifest and publish it), and the trainers until the image's HEALTHCHECK
(`intellect-node status`) shows each of them training the seeded run with the other; SIGTERM (what
`docker compose stop` sends) must stop each within its `stop_grace_period`, exit 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.swarm

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
#: What the test sets of the variables compose.yaml reads (the rest take their defaults).
VARIABLES = {"TRAINERS": "2", "TRAINER_THREADS": "1"}
BIN = Path(sys.executable).parent
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's interpolation: `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `$VAR`, and `$$` for `$`."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        if name in variables and (variables[name] or m.group(2) != ":-"):
            return variables[name]
        return m.group(3) or ""

    return _VAR.sub(sub, value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def image_env() -> dict[str, str]:
    """The Dockerfile's runtime ENV (the last stage's)."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("FROM "):
            env = {}
        elif line.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return env


def image_healthcheck() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    (line,) = [x for x in text.splitlines() if x.startswith("HEALTHCHECK ")]
    argv: list[str] = json.loads(line.split(" CMD ", 1)[1])
    return argv


@dataclass
class Service:
    """One container of a compose service, played by a local process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    data_dir: Path
    log: Path
    spec: dict[str, Any] = field(default_factory=dict)
    #: Ports the container listens on (in its own network namespace) -> the free ports used here.
    ports: dict[int, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def run(self, timeout_s: float) -> int:
        self.start()
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def kill_group(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class LocalCompose:
    """deploy/compose.yaml, with each container a local process group under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
        self.services: dict[str, dict[str, Any]] = self.compose["services"]
        self.port = free_port()
        self.p2p_port = self._fixed_port()
        self.started: list[Service] = []

    def _fixed_port(self) -> str:
        script = " ".join(self.services["bootstrap"]["command"])
        found = re.search(r"--listen /ip4/0\.0\.0\.0/tcp/(\d+)", script)
        assert found, script
        return found.group(1)

    def network(self, text: str) -> str:
        """Compose's network on loopback: service DNS names and the fixed p2p port."""
        text = re.sub(r"/dns4/(" + "|".join(map(re.escape, self.services)) + r")/", "/ip4/127.0.0.1/", text)
        text = text.replace(f"/tcp/{self.p2p_port}", f"/tcp/{self.port}")
        return text.replace(f"'127.0.0.1', {self.p2p_port})", f"'127.0.0.1', {self.port})")

    def mounts(self, name: str, replica: int) -> dict[str, Path]:
        """Container path -> local directory: the image's /data volume (one per replica unless a volume
        is mounted there), named volumes (shared), bind mounts. A container sees only the mounted
        directory, so a (read-only) bind mount is a copy of it with its links kept as links: one that
        leaves the directory dangles here as it would in the container."""
        out = {"/data": self.root / f"{name}-{replica}" / "data"}
        for vol in self.services[name].get("volumes", []):
            source, target, *mode = str(vol).split(":")
            if source.startswith((".", "/")):
                assert mode == ["ro"], f"{name}: a writable bind mount {vol} (not played here)"
                copy = self.root / "binds" / f"{name}-{replica}" / target.strip("/")
                if not copy.exists():
                    shutil.copytree(DEPLOY / source, copy, symlinks=True)
                out[target] = copy
            else:
                assert source in self.compose["volumes"], source
                out[target] = self.root / "volumes" / source
        for path in out.values():
            if path.is_relative_to(self.root):
                path.mkdir(parents=True, exist_ok=True)
        return out

    def container(self, name: str, replica: int = 1) -> Service:
        spec = self.services[name]
        mounts = self.mounts(name, replica)

        def local(text: str) -> str:
            text = self.network(interpolate(text, VARIABLES))
            for target in sorted(mounts, key=len, reverse=True):
                text = re.sub(rf"(?<![\w/.-]){re.escape(target)}(?=/|\b|$)", str(mounts[target]), text)
            return text

        entry = spec.get("entrypoint") or ["intellect-node"]
        command = spec.get("command") or []
        command = [command] if isinstance(command, str) else command
        argv = [local(a) for a in [*entry, *command]]
        env = {k: v for k, v in os.environ.items() if not k.startswith("INTELLECT_NODE_")}
        env.update({k: local(v) for k, v in image_env().items()})
        env.update({k: local(str(v)) for k, v in (spec.get("environment") or {}).items()})
        env["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"  # the image's venv is on its PATH
        ports: dict[int, int] = {}
        for key, value in env.items():  # a port the container listens on in its own network namespace
            found = re.fullmatch(r"(0\.0\.0\.0|\[::\]):(\d+)", value)
            if found and key.startswith("INTELLECT_NODE_"):
                ports[int(found.group(2))] = free_port()
                env[key] = f"{found.group(1)}:{ports[int(found.group(2))]}"
        log = self.root / f"{name}-{replica}.log"
        svc = Service(f"{name}-{replica}", argv, env, mounts["/data"], log, spec, ports)
        self.started.append(svc)
        return svc

    def healthcheck(self, svc: Service) -> list[str]:
        test = svc.spec.get("healthcheck", {}).get("test") or ["CMD", *image_healthcheck()]
        assert test[0] == "CMD", test
        argv = [self.network(a) for a in test[1:]]
        return [sys.executable if a == "python" else a for a in argv]

    def healthy(self, svc: Service) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.healthcheck(svc), env=svc.env, capture_output=True, text=True, timeout=30, check=False
        )

    def stop_all(self) -> None:
        for svc in reversed(self.started):
            svc.kill_group()


@pytest.fixture
def compose(tmp_path: Path) -> Iterator[LocalCompose]:
    swarm = LocalCompose(tmp_path)
    try:
        yield swarm
    finally:
        swarm.stop_all()


def wait_for(what: str, cond: Any, timeout_s: float, svcs: list[Service]) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        for s in svcs:
            if s.proc is not None and s.proc.poll() is not None:
                pytest.fail(f"{s.name} exited with {s.proc.returncode} while waiting for {what}:\n{s.tail()}")
        time.sleep(1.0)
    tails = "\n".join(f"--- {s.name}\n{s.tail()}" for s in svcs)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tails}")


def _grace_s(spec: dict[str, Any]) -> float:
    return float(str(spec.get("stop_grace_period", "10s")).rstrip("s"))


def test_interpolation_is_composes() -> None:
    v = {"A": "1", "EMPTY": ""}
    assert (
        interpolate("${A:-3} ${B:-3} ${EMPTY:-3} ${EMPTY-3} $A $$(cat x) $${A}", v)
        == "1 3 3  1 $(cat x) ${A}"
    )


@pytest.mark.timeout(420)
def test_the_compose_swarm_starts_seeds_and_trains(compose: LocalCompose) -> None:
    services = compose.services
    assert services["seeder"]["depends_on"]["bootstrap"]["condition"] == "service_healthy"
    assert services["trainer"]["depends_on"]["seeder"]["condition"] == "service_completed_successfully"

    # bootstrap: `init` into the shared volume, then serve on the fixed port until healthy.
    boot = compose.container("bootstrap")
    boot.start()
    wait_for("the bootstrap's healthcheck", lambda: compose.healthy(boot).returncode == 0, 90, [boot])
    peer_id = (compose.mounts("bootstrap", 1)["/swarm"] / "bootstrap.id").read_text().strip()
    assert re.fullmatch(r"12D3KooW\w+", peer_id), peer_id

    # seeder: reads the manifest through its bind mount, publishes it, leaves the run ID for the trainers.
    seeder = compose.container("seeder")
    code = seeder.run(180)
    assert code == 0, seeder.tail()
    run_id = (compose.mounts("seeder", 1)["/swarm"] / "run.id").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", run_id), seeder.tail()
    assert f"seeded run {run_id}" in seeder.tail()

    # trainers: TRAINERS replicas, each with its own /data; healthy once training the run together.
    replicas = int(interpolate(str(services["trainer"]["deploy"]["replicas"]), VARIABLES))
    assert replicas == 2
    trainers = [compose.container("trainer", i + 1) for i in range(replicas)]
    for t in trainers:
        t.start()

    def training(t: Service) -> dict[str, Any] | None:
        check = compose.healthy(t)  # the image's HEALTHCHECK: `intellect-node status` in the container
        if check.returncode != 0:
            return None
        status = subprocess.run(
            [*compose.healthcheck(t), "--json"], env=t.env, capture_output=True, text=True, check=False
        )
        s: dict[str, Any] = json.loads(status.stdout) if status.returncode == 0 else {}
        ok = s.get("phase") in ("training", "averaging", "checkpointing") and s.get("peers", 0) >= replicas
        return s if ok else None

    everyone = [boot, *trainers]
    for t in trainers:
        s = wait_for(f"{t.name} to train the seeded run", lambda t=t: training(t), 240, everyone)
        assert s["run_id"] == run_id, s
    for t in trainers:  # Prometheus on the compose network scrapes each trainer's exposed port
        (exposed,) = [int(p) for p in services["trainer"]["expose"]]
        with urllib.request.urlopen(f"http://127.0.0.1:{t.ports[exposed]}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        assert 'intellect_phase{phase="training"}' in metrics and "intellect_build_info" in metrics
    for t in trainers:  # JSON logs, as the compose file asks for
        first = next(line for line in t.log.read_text().splitlines() if line.startswith("{"))
        assert "level" in json.loads(first) or "levelname" in json.loads(first), first

    # `docker compose stop`: SIGTERM, then SIGKILL after the grace period. Each stops in order, exit 0.
    for t in trainers:
        assert t.proc is not None
        t.proc.send_signal(signal.SIGTERM)
    for t in trainers:
        assert t.proc is not None
        code = t.proc.wait(_grace_s(services["trainer"]))
        assert code == 0, t.tail()
    assert boot.proc is not None
    boot.proc.send_signal(signal.SIGTERM)
    assert boot.proc.wait(_grace_s(services["bootstrap"])) == 0, boot.tail()
