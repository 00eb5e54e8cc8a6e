"""deploy/ and the user guide against the real CLI and config: fast, no network, no docker, no cluster.

Every `intellect-node` invocation in the deployment files (compose and Kubernetes commands, probes,
systemd ExecStart=, the Dockerfile, shell lines in comments and in the docs' code) must name a real
subcommand and only real flags with values of the right type; every `INTELLECT_NODE_*` name must be a
config field and the environments the files set must load; the units must pass `systemd-analyze verify`;
the kustomizations must build; the files must agree with each other (ports, names, the manifest copy).
The image itself is not built here: its base image cannot be pulled on the machines the tests run on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner
from intellect.node.app.config import ENV_PREFIX, NodeConfig, load_config
from intellect.node.app.daemon import SHUTDOWN_TIMEOUT_S
from intellect.node.app.status import NodeStatus, StatusServer
from intellect.node.cli.main import cli

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
GUIDE = REPO / "docs" / "user-guide.md"
FIELDS = {f.name for f in dataclasses.fields(NodeConfig)}
#: The image's user (Dockerfile) that the Kubernetes securityContext must match.
IMAGE_UID = 1000
#: Objects deploy/README.md tells the operator to create by hand (from the bootstrap's key).
MADE_BY_HAND = {("Secret", "intellect-bootstrap-key"), ("ConfigMap", "intellect-bootstrap-id")}

# ---- the CLI checker --------------------------------------------------------------------------------


def _concrete(value: str) -> bool:
    """False for values that are filled in later (shell, compose or k8s variables, placeholders)."""
    return not any(c in value for c in "$…<>{}")


def check_cli(argv: list[str], where: str, complete: bool = True) -> str:
    """Fail unless `intellect-node ARGV` parses against the real click group; return the command path.

    `complete=False` is for mentions in prose (`intellect-node seed`), which may leave out arguments."""
    ctx = click.Context(cli, info_name="intellect-node")
    cmd: click.Command = cli
    path: list[str] = []
    tokens = list(argv)
    while isinstance(cmd, click.Group) and tokens and not tokens[0].startswith("-"):
        sub = cmd.get_command(ctx, tokens[0])
        assert sub is not None, f"{where}: `intellect-node {' '.join(argv)}`: no command {tokens[0]!r}"
        path.append(tokens.pop(0))
        ctx = click.Context(sub, info_name=path[-1], parent=ctx)
        cmd = sub
    shown = f"{where}: `intellect-node {' '.join(argv)}`"
    options: dict[str, click.Option] = {}
    for param in cmd.get_params(ctx):
        if isinstance(param, click.Option):
            for name in (*param.opts, *param.secondary_opts):
                options[name] = param
    positional: list[str] = []
    it = iter(tokens)
    for tok in it:
        if tok == "--":
            positional.extend(it)
            break
        if tok.startswith("-") and len(tok) > 1 and not tok[1].isdigit():
            name, eq, value = tok.partition("=")
            param = options.get(name)
            assert param is not None, f"{shown}: no option {name!r} on `{' '.join(path) or '(group)'}`"
            if param.is_flag or param.count:
                assert not eq, f"{shown}: {name} takes no value"
                continue
            if not eq:
                nxt = next(it, None)
                assert nxt is not None, f"{shown}: {name} needs a value"
                value = nxt
            if _concrete(value) and not isinstance(param.type, click.Path):
                try:
                    param.type.convert(value, param, ctx)
                except click.BadParameter as e:
                    pytest.fail(f"{shown}: {name} {value!r}: {e.format_message()}")
        else:
            positional.append(tok)
    arguments = [p for p in cmd.params if isinstance(p, click.Argument)]
    if not any(a.nargs == -1 for a in arguments):
        assert len(positional) <= sum(a.nargs for a in arguments), f"{shown}: unexpected {positional}"
    if complete and "--help" not in tokens and not isinstance(cmd, click.Group):
        required = sum(max(a.nargs, 1) for a in arguments if a.required)
        assert len(positional) >= required, f"{shown}: missing a required argument"
    return " ".join(path)


# ---- finding invocations in shell text --------------------------------------------------------------

_OPERATOR = re.compile(r"^[;&|<>]+$")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_WRAPPERS = {"exec", "until", "while", "do", "then", "time", "if", "!"}
#: Options of docker/kubectl that take a value which may be spelled like our program (`-n intellect-node`).
_VALUE_FLAGS = {"-n", "--namespace", "--name", "-t", "--tag", "-c", "--container", "-f", "--file"}
_DOCKER_RUN_VALUE_OPTS = {
    *("-v", "--volume", "--name", "--network", "-e", "--env", "--env-file", "-p", "--publish", "--gpus"),
    *("-w", "--workdir", "-u", "--user", "--restart", "--mount", "-l", "--label", "--cpus", "-m"),
    *("--memory", "--hostname", "--stop-timeout", "--entrypoint"),
}


def _is_cli(token: str) -> bool:
    return token == "intellect-node" or token.endswith("/bin/intellect-node")


def _segments(script: str) -> Iterator[list[str]]:
    """Simple commands of a shell script: backslash continuations joined, split at ; & | < > and newlines."""
    for line in script.replace("\\\n", " ").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        lex = shlex.shlex(line.strip().removeprefix("$ "), posix=True, punctuation_chars=";&|<>")
        lex.whitespace_split = True
        tokens = list(lex)
        seg: list[str] = []
        for i, tok in enumerate(tokens):
            if _OPERATOR.match(tok):
                if seg and seg[-1].isdigit() and tok.startswith(">"):
                    seg.pop()  # `2>` redirects a file descriptor; the digit is no argument
                yield seg
                seg = []
            elif not (i > 0 and tokens[i - 1] in (">", ">>", "<")):
                seg.append(tok)
        yield seg


def _invocation(seg: list[str]) -> list[str] | None:
    """The arguments of `intellect-node` if this simple command runs it, else None."""
    i = 0
    while i < len(seg):
        if seg[i] in _WRAPPERS or _ASSIGNMENT.match(seg[i]):
            i += 1
        elif seg[i] == "sudo":
            i += 1
            while i < len(seg) and seg[i].startswith("-"):
                i += 2 if seg[i] in ("-u", "-g") else 1
        else:
            break
    if i < len(seg) and _is_cli(seg[i]):
        return seg[i + 1 :]
    if "exec" in seg[i:]:  # docker exec NAME …, compose exec SERVICE …, kubectl exec POD -- …
        start = seg.index("exec", i) + 1
        for k in range(start, len(seg)):
            if _is_cli(seg[k]) and seg[k - 1] not in _VALUE_FLAGS:
                return seg[k + 1 :]
    if seg[i : i + 2] == ["docker", "run"]:
        k = i + 2
        while k < len(seg) and seg[k].startswith("-"):
            k += 2 if seg[k] in _DOCKER_RUN_VALUE_OPTS else 1
        if k < len(seg) and (seg[k] == "intellect-node" or seg[k].startswith("intellect-node:")):
            return seg[k + 1 :]
    return None


def shell_invocations(script: str) -> list[list[str]]:
    return [argv for seg in _segments(script) if (argv := _invocation(seg)) is not None]


def comment_commands(text: str) -> str:
    """Command lines quoted in `#` comments, written as `#   command` (three spaces), as one script."""
    return "\n".join(line.split("#", 1)[1] for line in text.splitlines() if re.match(r"^\s*#   \S", line))


def check_all(invocations: list[list[str]], where: str, complete: bool = True) -> set[str]:
    return {check_cli(argv, where, complete) for argv in invocations}


# ---- loading the files ------------------------------------------------------------------------------


def _compose(name: str = "compose.yaml") -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / name).read_text())
    assert isinstance(data, dict)
    return data


def _k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    """The base manifests (the gpu/ overlay's patch is a fragment, checked through `kubectl kustomize`)."""
    out = []
    for path in sorted((K8S / "base").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path, doc))
    return out


def _k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in _k8s_docs() if d.get("kind") != "Kustomization" and "metadata" in d]


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj.get("kind") in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        return obj["spec"]["template"]["spec"]
    return None


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _container_invocations(c: dict[str, Any]) -> list[list[str]]:
    """What a container runs (image ENTRYPOINT is intellect-node) and what its exec probes run."""
    out: list[list[str]] = []
    command, args = c.get("command"), c.get("args", [])
    if command is None:
        out.append(list(args))
    elif command[:2] == ["/bin/sh", "-c"]:
        for script in [*command[2:], *args]:
            out += shell_invocations(script)
    elif _is_cli(command[0]):
        out.append([*command[1:], *args])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        exec_cmd = c.get(probe, {}).get("exec", {}).get("command")
        if exec_cmd and _is_cli(exec_cmd[0]):
            out.append(exec_cmd[1:])
    return out


def _compose_script(service: dict[str, Any]) -> list[list[str]]:
    """Invocations of a compose service: `sh -c` scripts (`$$` unescaped) or plain CLI arguments."""
    entry, command = service.get("entrypoint"), service.get("command", [])
    command = [command] if isinstance(command, str) else command
    if entry == ["/bin/sh", "-c"]:
        out = []
        for script in command:
            out += shell_invocations(script.replace("$$", "$"))
        return out
    assert entry is None, f"unexpected entrypoint {entry}"
    return [list(command)]


def _interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with no VAR set: the default (or empty)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def _unit_settings(path: Path) -> list[tuple[str, str]]:
    out = []
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.append((key.strip(), value.strip()))
    return out


def _env_file(path: Path, include_commented: bool = True) -> dict[str, str]:
    """KEY=VALUE lines of an EnvironmentFile; with `include_commented`, `#KEY=VALUE` examples too."""
    out = {}
    for line in path.read_text().splitlines():
        if include_commented and re.match(r"^#[A-Z_]+=", line):
            line = line[1:]
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out


def _dockerfile_instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DEPLOY / "Dockerfile")


def dockerfile_instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) per Dockerfile line, continuations joined, comments skipped."""
    text = dockerfile.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _load_env(environ: dict[str, str], tmp_path: Path, where: str) -> NodeConfig:
    ours = {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)}
    try:
        return load_config(data_dir=tmp_path, environ=ours)
    except ValueError as e:
        pytest.fail(f"{where}: {e}")


def _markdown_commands(path: Path) -> tuple[list[list[str]], list[list[str]]]:
    """Invocations in a markdown file's shell code blocks, and mentions in its inline code spans."""
    text = path.read_text()
    # Fences pair in order (a closing fence is never an opening one); shell blocks and bare ones count.
    fenced = re.findall(r"^ *```(\w*)\n(.*?)^ *```", text, flags=re.S | re.M)
    scripts = [body for lang, body in fenced if lang in ("", "bash", "sh", "shell", "console")]
    blocks = []
    for script in scripts:
        blocks += shell_invocations(script)
    prose = re.sub(r"^ *```.*?^ *```", "", text, flags=re.S | re.M)
    spans = []
    for span in re.findall(r"`([^`\n]+)`", prose):
        if span.startswith(("intellect-node ", "sudo ")):
            spans += shell_invocations(span)
    return blocks, spans


# ---- every command and flag exists ------------------------------------------------------------------


def test_compose_uses_real_commands_and_flags() -> None:
    used: set[str] = set()
    for name in ("compose.yaml", "compose.gpu.yaml"):
        for svc_name, svc in _compose(name)["services"].items():
            if "command" in svc or "entrypoint" in svc:
                used |= check_all(_compose_script(svc), f"{name} service {svc_name}")
        used |= check_all(shell_invocations(comment_commands((DEPLOY / name).read_text())), name)
    assert {"init", "bootstrap", "seed", "start", "status"} <= used


def test_k8s_uses_real_commands_and_flags() -> None:
    used: set[str] = set()
    for path, obj in _k8s_objects():
        spec = _pod_spec(obj)
        for c in _containers(spec) if spec else []:
            used |= check_all(_container_invocations(c), f"{path.name} {obj['metadata']['name']}/{c['name']}")
    for path in K8S.rglob("*.yaml"):
        used |= check_all(shell_invocations(comment_commands(path.read_text())), path.name)
    assert {"bootstrap", "init", "seed", "runs", "start", "status"} <= used


def test_systemd_uses_real_commands_and_flags() -> None:
    used: set[str] = set()
    for unit in sorted(SYSTEMD.glob("*.service")):
        starts = [v for k, v in _unit_settings(unit) if k == "ExecStart"]
        assert len(starts) == 1, f"{unit.name}: one ExecStart= expected"
        argv = shlex.split(starts[0].lstrip("-@:+!"))
        assert _is_cli(argv[0]), f"{unit.name}: ExecStart does not run intellect-node: {argv[0]}"
        used.add(check_cli(argv[1:], unit.name))
        used |= check_all(shell_invocations(comment_commands(unit.read_text())), unit.name)
    assert {"start", "bootstrap", "status", "id"} <= used


def test_dockerfile_uses_real_commands_and_flags() -> None:
    instructions = _dockerfile_instructions()
    entrypoint = json.loads(next(rest for word, rest in instructions if word == "ENTRYPOINT"))
    assert entrypoint == ["intellect-node"]
    cmd = json.loads(next(rest for word, rest in instructions if word == "CMD"))
    check_cli(cmd, "Dockerfile CMD")
    health = next(rest for word, rest in instructions if word == "HEALTHCHECK")
    assert check_cli(json.loads(health.split(" CMD ", 1)[1])[1:], "Dockerfile HEALTHCHECK") == "status"
    for word, rest in instructions:
        if word == "RUN":
            check_all(shell_invocations(rest), "Dockerfile RUN")
    check_all(shell_invocations(comment_commands((DEPLOY / "Dockerfile").read_text())), "Dockerfile")


@pytest.mark.parametrize("doc", ["deploy/README.md", "docs/user-guide.md"])
def test_docs_use_real_commands_and_flags(doc: str) -> None:
    blocks, spans = _markdown_commands(REPO / doc)
    used = check_all(blocks, doc) | check_all(spans, doc, complete=False)
    if doc == "docs/user-guide.md":
        expected = {
            "init",
            "start",
            "status",
            "seed",
            "runs",
            "peers",
            "data prepare",
            "swarm",
            "bootstrap",
            "id",
        }
        assert expected <= used, f"not shown in the guide: {sorted(expected - used)}"


def test_checker_rejects_what_the_cli_rejects() -> None:
    """The checker itself: unknown commands and flags, bad values, extra arguments fail; good ones pass."""
    assert check_cli(["start", "--no-client-mode", "--min-peers", "3", "--bootstrap", "$B"], "t") == "start"
    assert check_cli(["data", "prepare", "a.txt", "--out", "shards"], "t") == "data prepare"
    for bad in (["strat"], ["start", "--bogus"], ["start", "--device", "tpu"], ["id", "extra"], ["seed"]):
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            check_cli(bad, "t")
    assert shell_invocations('set -e\nexec intellect-node start \\\n  --run "$(cat /x)" > /log 2>&1') == [
        ["start", "--run", "$(cat /x)"]
    ]
    assert shell_invocations("kubectl -n intellect-node exec pod-0 -- intellect-node status") == [["status"]]
    assert shell_invocations("kubectl create namespace intellect-node") == []
    assert shell_invocations("docker run --rm -v x:/data intellect-node:cuda init") == [["init"]]


# ---- every INTELLECT_NODE_* variable exists, and the environments load ------------------------------


def test_every_env_name_is_a_config_field() -> None:
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + [GUIDE]
    seen = {}
    for path in files:
        for name in re.findall(r"\bINTELLECT_NODE_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()):
            seen.setdefault(name, path.relative_to(REPO))
    unknown = {n: str(p) for n, p in seen.items() if n[len(ENV_PREFIX) :].lower() not in FIELDS}
    assert not unknown, f"not config fields (the node refuses to start with them): {unknown}"
    assert len(seen) >= 5


def test_environments_load(tmp_path: Path) -> None:
    # compose, with the GPU override merged in.
    for name in ("compose.yaml", "compose.gpu.yaml"):
        for svc_name, svc in _compose(name)["services"].items():
            env = svc.get("environment", {})
            if isinstance(env, list):
                env = dict(e.split("=", 1) for e in env)
            _load_env({k: _interpolate(str(v)) for k, v in env.items()}, tmp_path, f"{name} {svc_name}")
    # Kubernetes: the shared ConfigMap plus each container's own env.
    configmaps = {
        d["metadata"]["name"]: d.get("data", {}) for _, d in _k8s_objects() if d["kind"] == "ConfigMap"
    }
    for path, obj in _k8s_objects():
        spec = _pod_spec(obj)
        for c in _containers(spec) if spec else []:
            env: dict[str, str] = {}
            for ref in c.get("envFrom", []):
                env.update(configmaps[ref["configMapRef"]["name"]])
            env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
            config = _load_env(env, tmp_path, f"{path.name} {c['name']}")
            if c["name"] == "node":
                assert config.http_port == 8080 and config.bootstrap
    # systemd: Environment= lines, then the EnvironmentFile example with every commented line enabled.
    for unit in sorted(SYSTEMD.glob("*.service")):
        env = dict(v.split("=", 1) for k, v in _unit_settings(unit) if k == "Environment")
        _load_env(env, tmp_path, unit.name)
        env_file = unit.with_suffix(".env")
        assert env_file.exists(), f"{unit.name}: no example EnvironmentFile {env_file.name}"
        _load_env({**env, **_env_file(env_file)}, tmp_path, env_file.name)
    # The image.
    env = {}
    for word, rest in _dockerfile_instructions():
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    assert env["INTELLECT_NODE_DATA_DIR"] == "/data"
    _load_env(env, tmp_path, "Dockerfile")


def test_env_file_lists_every_config_field() -> None:
    """The volunteer's EnvironmentFile example names every field but data_dir (the unit sets that)."""
    names = {k[len(ENV_PREFIX) :].lower() for k in _env_file(SYSTEMD / "intellect-node.env")}
    assert names == FIELDS - {"data_dir"}


# ---- the files agree with each other and with the daemon ----------------------------------------------


def _bootstrap_addr_parts(maddr: str) -> tuple[str, int]:
    m = re.match(r"^/dns4/([a-z0-9-]+)/tcp/(\d+)/p2p/.+$", maddr)
    assert m, f"bootstrap address {maddr!r} is not /dns4/HOST/tcp/PORT/p2p/PEER"
    return m.group(1), int(m.group(2))


def _listen_port(argv: list[str]) -> int:
    listen = argv[argv.index("--listen") + 1]
    m = re.match(r"^/ip4/0\.0\.0\.0/tcp/(\d+)$", listen)
    assert m, f"bootstrap must listen on a fixed port on all interfaces, got {listen}"
    return int(m.group(1))


def test_compose_swarm_is_wired_up() -> None:
    compose = _compose()

    def strings(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for v in node.values():
                yield from strings(v)
        elif isinstance(node, list):
            for v in node:
                yield from strings(v)
        elif isinstance(node, str):
            yield node

    # Compose interpolates `$NAME` and `${…}` in values; a literal `$` for the shell must be written `$$`.
    for value in strings(compose):
        for m in re.finditer(r"\$(.|$)", value.replace("$$", "")):
            assert re.match(r"[{A-Za-z_]", m.group(1)), f"unescaped $ in {value!r}"
    services = compose["services"]
    assert {"bootstrap", "seeder", "trainer"} <= set(services)
    (boot,) = _compose_script(services["bootstrap"])[-1:]
    port = _listen_port(boot)
    for name in ("seeder", "trainer"):
        invs = [a for a in _compose_script(services[name]) if a[0] in ("seed", "start")]
        assert invs, name
        for argv in invs:
            host, p = _bootstrap_addr_parts(argv[argv.index("--bootstrap") + 1])
            assert (host, p) == ("bootstrap", port), f"{name} dials {host}:{p}"
    assert services["seeder"]["depends_on"]["bootstrap"]["condition"] == "service_healthy"
    assert services["trainer"]["depends_on"]["seeder"]["condition"] == "service_completed_successfully"
    assert services["seeder"]["healthcheck"] == {"disable": True}
    assert "intellect-node" not in json.dumps(services["bootstrap"]["healthcheck"]), "no control API there"
    assert services["bootstrap"]["volumes"][0].startswith("bootstrap-data:/data"), "stable identity"
    # Each trainer replica needs its own /data (identity!): never a shared named volume there.
    assert not any(str(v).split(":")[1:2] == ["/data"] for v in services["trainer"].get("volumes", []))
    grace = int(services["trainer"]["stop_grace_period"].rstrip("s"))
    assert grace > SHUTDOWN_TIMEOUT_S


def test_k8s_objects_agree() -> None:
    objects = _k8s_objects()
    names = {(d["kind"], d["metadata"]["name"]) for _, d in objects}
    services = {d["metadata"]["name"]: d for _, d in objects if d["kind"] == "Service"}
    for name in services:
        # Service links would inject <NAME>_SERVICE_HOST…: with this prefix the node refuses to start.
        assert not name.upper().replace("-", "_").startswith("INTELLECT_NODE"), name
    pods = [(p, d, _pod_spec(d)) for p, d in objects if _pod_spec(d) is not None]
    assert {d["kind"] for _, d, _ in pods} == {"Deployment", "StatefulSet", "Job"}
    boot_port = None
    for _, obj, spec in pods:
        assert spec is not None
        where = f"{obj['kind']} {obj['metadata']['name']}"
        assert spec.get("enableServiceLinks") is False, where
        assert spec["securityContext"]["runAsUser"] == IMAGE_UID, where
        for vol in spec.get("volumes", []):
            if "secret" in vol:
                assert ("Secret", vol["secret"]["secretName"]) in names | MADE_BY_HAND, where
            if "configMap" in vol:
                assert ("ConfigMap", vol["configMap"]["name"]) in names | MADE_BY_HAND, where
        for c in _containers(spec):
            assert c["image"].split(":")[0] == "intellect-node", where
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                # The control API binds 127.0.0.1 in the pod: the kubelet's httpGet cannot reach it.
                assert "httpGet" not in c.get(probe, {}), f"{where}/{c['name']} {probe}"
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    assert ("ConfigMap", ref["name"]) in names | MADE_BY_HAND, where
                if e["name"] == "INTELLECT_NODE_BOOTSTRAP":
                    host, port = _bootstrap_addr_parts(e["value"])
                    assert host in services, f"{where}: no Service {host}"
                    assert services[host]["spec"]["ports"][0]["port"] == port
            for ref in c.get("envFrom", []):
                assert ("ConfigMap", ref["configMapRef"]["name"]) in names, where
            for argv in _container_invocations(c):
                if argv and argv[0] == "bootstrap":
                    boot_port = _listen_port(argv)
    assert boot_port is not None
    boot_svc = services["intellect-bootstrap"]["spec"]
    assert boot_svc["ports"][0]["port"] == boot_port
    boot = next(d for _, d, _ in pods if d["metadata"]["name"] == "intellect-bootstrap")
    assert boot["spec"]["replicas"] == 1 and boot["spec"]["strategy"]["type"] == "Recreate"
    assert boot_svc["selector"] == boot["spec"]["template"]["metadata"]["labels"]


def test_k8s_trainers_keep_state_and_stop_in_order() -> None:
    (sts,) = [d for _, d in _k8s_objects() if d["kind"] == "StatefulSet"]
    spec = sts["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > SHUTDOWN_TIMEOUT_S
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    node = next(c for c in spec["containers"] if c["name"] == "node")
    mounts = {m["mountPath"]: m["name"] for m in node["volumeMounts"]}
    assert mounts["/data"] in claims, "each peer's identity and checkpoints on its own PVC"
    assert "/tmp" in mounts, "the p2p daemon's sockets need a writable /tmp (read-only root)"
    assert sts["spec"]["serviceName"] in {
        d["metadata"]["name"] for _, d in _k8s_objects() if d["kind"] == "Service"
    }


def test_k8s_manifest_configmap_is_the_example() -> None:
    (cm,) = [d for _, d in _k8s_objects() if d["metadata"]["name"] == "intellect-run-manifest"]
    assert cm["data"]["tiny-run.toml"] == (REPO / "examples" / "tiny-run.toml").read_text()


def test_by_hand_objects_are_documented() -> None:
    readme = (DEPLOY / "README.md").read_text()
    assert "create secret generic intellect-bootstrap-key" in readme
    assert "create configmap intellect-bootstrap-id" in readme
    assert "--from-literal=peer-id=" in readme


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl is not installed (the YAML is still checked)"
)
@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_kustomizations_build(overlay: str) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert all(d["metadata"].get("namespace") == "intellect-node" for d in docs if d["kind"] != "Namespace")
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    node = next(c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "node")
    env = {e["name"]: e.get("value") for e in node["env"]}
    if overlay == "gpu":
        assert node["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert env["INTELLECT_NODE_DEVICE"] == "cuda"
        assert {c["image"] for d in docs if _pod_spec(d) for c in _containers(_pod_spec(d) or {})} == {
            "intellect-node:cuda"
        }
    else:
        assert "INTELLECT_NODE_DEVICE" not in env


# ---- systemd ------------------------------------------------------------------------------------------


def test_systemd_units_stop_in_order_and_are_sandboxed() -> None:
    for unit in sorted(SYSTEMD.glob("*.service")):
        s = dict(_unit_settings(unit))
        assert s["Type"] == "simple" and s["Restart"] == "on-failure"
        assert s["KillSignal"] in ("SIGINT", "SIGTERM") and s["KillMode"] == "mixed"
        assert int(s["TimeoutStopSec"]) > SHUTDOWN_TIMEOUT_S
        assert s["NoNewPrivileges"] == "yes" and s["ProtectSystem"] == "strict" and s["PrivateTmp"] == "yes"
        data_dir = dict(v.split("=", 1) for k, v in _unit_settings(unit) if k == "Environment")[
            "INTELLECT_NODE_DATA_DIR"
        ]
        assert s["ReadWritePaths"] == data_dir == f"/var/lib/{s['StateDirectory']}"
        assert s["EnvironmentFile"].startswith("-/etc/intellect-node/")


def _systemd_analyze_runs() -> bool:
    if shutil.which("systemd-analyze") is None:
        return False
    try:
        return (
            subprocess.run(["systemd-analyze", "--version"], capture_output=True, timeout=30).returncode == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _systemd_analyze_runs(), reason="systemd-analyze is not available on this machine")
def test_systemd_units_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at the CLI installed with these tests.
    exe = Path(sys.executable).parent / "intellect-node"
    assert exe.exists(), exe
    units = []
    for unit in sorted(SYSTEMD.glob("*.service")):
        text = unit.read_text().replace("/opt/intellect-node/bin/intellect-node", str(exe))
        (tmp_path / unit.name).write_text(text)
        units.append(str(tmp_path / unit.name))
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    ours = [line for line in (out.stdout + out.stderr).splitlines() if "intellect" in line]
    assert out.returncode == 0 and not ours, out.stdout + out.stderr


# ---- the image ----------------------------------------------------------------------------------------


def _dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        if any(
            fnmatch.fnmatchcase(c, pat) or fnmatch.fnmatchcase(c, pat.replace("**/", "")) for c in candidates
        ):
            ignored = not neg
    return ignored


def test_dockerfile() -> None:
    instructions = _dockerfile_instructions()
    args = dict(
        re.findall(r"^(\w+)=(\S+)$", rest)[0] for word, rest in instructions if word == "ARG" and "=" in rest
    )
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert args["TORCH_VERSION"] == "2.13.0" and args["TORCH_FLAVOR"] == "cpu"
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "download.pytorch.org/whl/${TORCH_FLAVOR}" in runs and '"torch==${TORCH_VERSION}"' in runs
    assert f"--uid {IMAGE_UID}" in runs
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert json.loads(next(rest for word, rest in instructions if word == "VOLUME")) == ["/data"]
    # Whatever COPY takes from the build context (the repository root) exists and is not filtered out.
    patterns = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = set()
    for word, rest in instructions:
        if word == "COPY" and not rest.startswith("--from"):
            for src in rest.split()[:-1]:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
                assert not _dockerignored(src, patterns), f"COPY {src}: excluded by the .dockerignore"
                copied.add(src)
    assert {"pyproject.toml", "README.md", "crypto", "protocol", "node", "examples"} <= copied
    assert _dockerignored(".venv", patterns) and _dockerignored("node/__pycache__", patterns)


async def test_healthcheck_command_reports_the_daemon(tmp_path: Path) -> None:
    """What the image's HEALTHCHECK and the k8s probes run: `intellect-node status` with the data dir from
    INTELLECT_NODE_DATA_DIR exits 0 while a control API answers there, and non-zero when none does."""
    runner = CliRunner()
    env = {"INTELLECT_NODE_DATA_DIR": str(tmp_path)}
    server = StatusServer(NodeStatus(peer_id="12D3KooWhealth", phase="training"), 0, tmp_path / "http.port")
    task = asyncio.create_task(server.run())
    try:
        async with asyncio.timeout(10):
            await server.ready.wait()
        ok = await asyncio.to_thread(runner.invoke, cli, ["status"], env=env)
        assert ok.exit_code == 0, ok.output
        assert "12D3KooWhealth" in ok.output and "training" in ok.output
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    down = await asyncio.to_thread(runner.invoke, cli, ["status"], env=env)
    assert down.exit_code != 0 and "no daemon is running" in down.output


def test_prometheus_can_scrape_the_trainers() -> None:
    """#16 finding 10: the trainers serve /metrics on their pod's or container's address (the control API
    binds 127.0.0.1 there), and the port the node is told, the port the pod and Service declare and the
    port the scrape annotations name agree."""
    (sts,) = [d for _, d in _k8s_objects() if d["kind"] == "StatefulSet"]
    template = sts["spec"]["template"]
    node = next(c for c in template["spec"]["containers"] if c["name"] == "node")
    env = {e["name"]: e.get("value") for e in node["env"]}
    host, port = env["INTELLECT_NODE_METRICS_ADDR"].rsplit(":", 1)
    assert host == "0.0.0.0"
    assert {"name": "metrics", "containerPort": int(port)} in node["ports"]
    notes = template["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/port"] == port
    assert notes["prometheus.io/path"] == "/metrics"
    service = next(d for _, d in _k8s_objects() if d["metadata"]["name"] == sts["spec"]["serviceName"])
    assert {"name": "metrics", "port": int(port), "targetPort": "metrics"} in service["spec"]["ports"]
    config = _load_env({"INTELLECT_NODE_METRICS_ADDR": env["INTELLECT_NODE_METRICS_ADDR"]}, REPO, "k8s")
    assert config.metrics_addr == f"0.0.0.0:{port}"
    trainer = _compose()["services"]["trainer"]
    host, port = trainer["environment"]["INTELLECT_NODE_METRICS_ADDR"].rsplit(":", 1)
    assert host == "0.0.0.0" and port in [str(p) for p in trainer["expose"]]
