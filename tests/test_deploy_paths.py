"""Every path the image and the compose swarm use resolves inside what they can see (#16, finding 9).

Docker copies a symbolic link as a link, and a bind mount shows the container only the mounted directory:
a link that leaves the copied or mounted tree dangles inside the container, although it resolves in the
checkout (`examples/tiny-run.toml` was a link to `../node/runs/tiny-run.toml`; the seeder could not read
it, so the trainers never started). These tests follow each path the files name, from the files
themselves: the compose build contexts and Dockerfiles, every COPY/ADD source, every bind mount and
named volume, the Kubernetes kustomizations' files. Nothing is built or run here (tests/test_compose_swarm.py
runs the compose services' commands).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_deploy import dockerfile_instructions

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE_FILES = ("compose.yaml", "compose.gpu.yaml")


def link_problems(root: Path, tree: Path) -> list[str]:
    """Why `tree` (a file or directory in the build context `root`) would not arrive whole when copied or
    bind-mounted: it is outside `root` or missing, a link at its top leaves `root`, or a link under it is
    absolute, dangling, or leaves `tree` (Docker copies links as links; a mount shows only `tree`)."""
    root, top = root.resolve(), Path(os.path.abspath(tree))
    if not top.is_relative_to(root):
        return [f"{tree}: outside {root}"]
    if not top.exists():
        return [f"{tree}: {'a dangling link' if top.is_symlink() else 'does not exist'}"]
    problems = []
    if top.is_symlink() and not top.resolve().is_relative_to(root):
        problems.append(f"{tree} -> {os.readlink(top)}: leaves the build context")
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                continue
            target = Path(os.readlink(path))
            resolved = (path.parent / target).resolve()
            if target.is_absolute():
                problems.append(f"{path} -> {target}: an absolute link")
            elif not resolved.exists():
                problems.append(f"{path} -> {target}: dangling")
            elif not resolved.is_relative_to(top.resolve()):
                problems.append(
                    f"{path} -> {target}: leaves {top.name}/, so it dangles in the image or mount"
                )
    return problems


# ---- the files' own paths ------------------------------------------------------------------------------


def _compose(name: str) -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / name).read_text())  # safe_load resolves the `<<: *image` merges
    assert isinstance(data, dict)
    return data


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    return dockerfile_instructions(dockerfile)


def copy_sources(dockerfile: Path) -> list[str]:
    """What COPY and ADD take from the build context (not from another stage, not URLs)."""
    out = []
    for word, rest in _instructions(dockerfile):
        if word not in ("COPY", "ADD"):
            continue
        args = yaml.safe_load(rest) if rest.startswith("[") else rest.split()
        if any(a.startswith("--from") for a in args):
            continue
        args = [a for a in args if not a.startswith("--")]
        out += [a for a in args[:-1] if not re.match(r"^[a-z]+://", a)]
    return out


def builds() -> list[tuple[str, Path, Path]]:
    """(where, build context, Dockerfile) of every compose service that builds, plus the documented
    `docker build -f deploy/Dockerfile .` from the repository root."""
    out = [("deploy/README.md", REPO, DEPLOY / "Dockerfile")]
    for name in COMPOSE_FILES:
        for svc_name, svc in _compose(name).get("services", {}).items():
            build = svc.get("build")
            if build is None:
                continue
            build = {"context": build} if isinstance(build, str) else build
            context = (DEPLOY / build.get("context", ".")).resolve()
            out.append((f"{name} {svc_name}", context, context / build.get("dockerfile", "Dockerfile")))
    return out


def bind_mounts() -> list[tuple[str, Path]]:
    """(where, host path) of every bind mount of every compose service; named volumes are checked to be
    declared."""
    out = []
    for name in COMPOSE_FILES:
        compose = _compose(name)
        declared = set(compose.get("volumes") or {})
        for svc_name, svc in compose.get("services", {}).items():
            for vol in svc.get("volumes", []):
                if isinstance(vol, dict):
                    kind, source = vol.get("type", "volume"), vol.get("source", "")
                else:
                    source = str(vol).split(":")[0]
                    kind = "bind" if source.startswith((".", "/", "~")) else "volume"
                where = f"{name} {svc_name}: {vol}"
                if kind == "bind":
                    out.append(
                        (where, (DEPLOY / source).resolve() if not source.startswith("/") else Path(source))
                    )
                elif ":" in str(vol) or source:
                    assert source in declared, f"{where}: named volume {source!r} is not declared"
            for env_file in svc.get("env_file", []) if isinstance(svc.get("env_file"), list) else []:
                out.append((f"{name} {svc_name}: env_file", (DEPLOY / env_file).resolve()))
    return out


# ---- tests ---------------------------------------------------------------------------------------------


def test_the_checker_finds_links_that_leave_the_tree(tmp_path: Path) -> None:
    """The old layout: examples/tiny-run.toml -> ../node/runs/tiny-run.toml. Fine in the checkout, dangling
    in the image (COPY examples) and under the bind mount (../examples:/manifests)."""
    (tmp_path / "node" / "runs").mkdir(parents=True)
    (tmp_path / "node" / "runs" / "tiny-run.toml").write_text("name = 'x'\n")
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "tiny-run.toml").symlink_to("../node/runs/tiny-run.toml")
    (tmp_path / "examples" / "real.toml").write_text("name = 'y'\n")
    (tmp_path / "examples" / "inside.toml").symlink_to("real.toml")  # stays in the tree: fine
    (tmp_path / "examples" / "gone.toml").symlink_to("missing.toml")
    (tmp_path / "examples" / "abs.toml").symlink_to(tmp_path / "node" / "runs" / "tiny-run.toml")
    problems = link_problems(tmp_path, tmp_path / "examples")
    assert len(problems) == 3, problems
    assert any("tiny-run.toml -> ../node/runs/tiny-run.toml: leaves" in p for p in problems)
    assert any("dangling" in p for p in problems) and any("absolute" in p for p in problems)
    assert not link_problems(tmp_path, tmp_path / "node")
    assert link_problems(tmp_path / "node", tmp_path / "examples")[0].endswith(f"outside {tmp_path / 'node'}")
    assert link_problems(tmp_path, tmp_path / "nothing")[0].endswith("does not exist")
    # A link named as the COPY source itself may point anywhere inside the context.
    assert not link_problems(tmp_path, tmp_path / "examples" / "tiny-run.toml")


@pytest.mark.parametrize("where,context,dockerfile", builds(), ids=[b[0] for b in builds()])
def test_every_copy_source_resolves_inside_the_build_context(
    where: str, context: Path, dockerfile: Path
) -> None:
    assert context.is_relative_to(REPO) and context.is_dir(), f"{where}: build context {context}"
    assert dockerfile.is_file() and dockerfile.resolve().is_relative_to(context), f"{where}: {dockerfile}"
    sources = copy_sources(dockerfile)
    assert {"node", "examples"} <= set(sources), sources
    problems = [p for src in sources for p in link_problems(context, context / src)]
    assert not problems, f"{where}: {problems}"


def test_every_bind_mount_resolves_inside_what_it_mounts() -> None:
    mounts = bind_mounts()
    assert any(path == REPO / "examples" for _, path in mounts), mounts  # the seeder's manifests
    for where, path in mounts:
        assert path.is_relative_to(REPO), f"{where}: mounts {path}, outside the checkout"
        problems = link_problems(REPO, path)
        assert not problems, f"{where}: {problems}"


def test_the_manifests_the_compose_seeder_reads_are_there() -> None:
    """The seeder's `seed /manifests/X` reads X from the directory mounted at /manifests."""
    seeder = _compose("compose.yaml")["services"]["seeder"]
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in seeder["volumes"]}
    script = " ".join(seeder["command"])
    for container_path in re.findall(r"(/manifests/\S+)", script):
        host = (DEPLOY / mounts["/manifests"] / container_path.removeprefix("/manifests/")).resolve()
        assert host.is_file() and not (DEPLOY / mounts["/manifests"] / Path(container_path).name).is_symlink()


def test_the_example_manifest_is_a_file_identical_to_the_packaged_one() -> None:
    """One source of truth, two places: the package ships node/runs/tiny-run.toml (the demo's default),
    the image and the compose swarm take examples/ (a real file, not a link out of the build context)."""
    example, packaged = REPO / "examples" / "tiny-run.toml", REPO / "node" / "runs" / "tiny-run.toml"
    assert not example.is_symlink(), "a link leaves the build context: keep a copy"
    assert example.read_bytes() == packaged.read_bytes(), "examples/tiny-run.toml differs from node/runs/"


@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_kustomizations_name_files_inside_their_directory_tree(overlay: str) -> None:
    kdir = DEPLOY / "k8s" / overlay
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    paths = [*k.get("resources", []), *(p["path"] for p in k.get("patches", []) if "path" in p)]
    for gen in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
        paths += [f.split("=", 1)[-1] for f in gen.get("files", [])]
    assert paths
    for rel in paths:
        path = (kdir / rel).resolve()
        assert path.exists() and path.is_relative_to(DEPLOY / "k8s"), f"{overlay}: {rel}"
        assert not link_problems(DEPLOY / "k8s", path), f"{overlay}: {rel}"
