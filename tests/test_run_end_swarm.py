"""A run reaches its token budget and every node stops by itself on the same final state (issue #19,
item 3), training on shards the nodes download from an HTTP server the test starts (item 4).

Two real daemons on loopback, a run of 2 rounds (token_budget = 2 × inner_steps × batch × seq_len), its
shards two JSONL files served by a `ThreadingHTTPServer`. Each node must exit 0 on its own, after logging
"run finished at round 2, final state hash H", with the same H.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from intellect.node.engine.data import describe_shard
from intellect.node.engine.tokenizer import load_tokenizer

from tests.nodeproc import kill_session, seeded_bootstrap, start_node

pytestmark = pytest.mark.swarm

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "node" / "corpus" / "pydoc_topics.jsonl"
INNER, BATCH, SEQ, ROUNDS = 8, 4, 64, 2
FINISHED = re.compile(r"run finished at round (\d+), final state hash ([0-9a-f]{64})")


class _Handler(http.server.SimpleHTTPRequestHandler):
    served: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.served.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def http_server(root: Path) -> Iterator[tuple[str, list[str]]]:
    served: ClassVar[list[str]] = []
    handler = type("Handler", (_Handler,), {"served": served})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def write_manifest(path: Path, www: Path, base: str) -> None:
    """The tiny run, 2 short rounds, its shards two halves of the built-in corpus served over HTTP."""
    lines = CORPUS.read_text().splitlines(keepends=True)
    half = len(lines) // 2
    tok = load_tokenizer("byte")
    entries = []
    for i, part in enumerate((lines[:half], lines[half:])):
        local = www / f"part{i}.jsonl"
        local.write_text("".join(part))
        spec = describe_shard(str(local), tok)
        entries.append(
            f'[[data.shards]]\nuri = "{base}/{local.name}"\n'
            f'sha256 = "{spec.sha256}"\ntokens = {spec.tokens}\n'
        )
    text = (ROOT / "node" / "runs" / "tiny-run.toml").read_text()
    text = re.sub(r"(?ms)^\[\[data\.shards\]\].*?(?=^\[(?!\[data\.shards))", "", text)
    text = text.replace("[diloco]", "\n".join(entries) + "\n[diloco]", 1)
    for key, value in (
        ("token_budget", ROUNDS * INNER * BATCH * SEQ),
        ("inner_steps", INNER),
        ("warmup_steps", 2),
        ("batch_size", BATCH),
        ("seq_len", SEQ),
        ("name", '"budget-end"'),
    ):
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text, count=1)
        assert n == 1, key
    path.write_text(text)


@pytest.mark.timeout(600)
def test_a_run_ends_at_its_budget_with_one_final_hash_on_http_shards(tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    procs = []
    with http_server(www) as (base, served):
        manifest = tmp_path / "run.toml"
        write_manifest(manifest, www, base)
        with seeded_bootstrap(tmp_path / "boot", tmp_path / "researcher", manifest) as boot:
            try:
                for name in ("alice", "bob"):
                    log = tmp_path / name
                    procs.append(start_node(tmp_path / name, boot, "--min-peers", "2", log=log))
                deadline = time.monotonic() + 480
                while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                    time.sleep(1.0)
                codes = [p.poll() for p in procs]
                logs = [(tmp_path / f"{n}.err").read_text() for n in ("alice", "bob")]
                tails = "\n\n".join(log[-3000:] for log in logs)
                assert codes == [0, 0], f"exit codes {codes}\n{tails}"
            finally:
                for p in procs:
                    kill_session(p)
    finished = [FINISHED.findall(log) for log in logs]
    assert all(len(f) == 1 for f in finished), tails
    (a_round, a_hash), (b_round, b_hash) = finished[0][0], finished[1][0]
    assert int(a_round) == int(b_round) == ROUNDS
    assert a_hash == b_hash
    assert {"/part0.jsonl", "/part1.jsonl"} & set(served), served  # the nodes fetched shards over HTTP
