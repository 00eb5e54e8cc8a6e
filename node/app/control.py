"""Run-time control of a volunteer node through its control API: pause, resume, and its limits.

`POST /pause` and `POST /resume` (with the header `X-Intellect-Node: control`, which a web page cannot
send to 127.0.0.1 without the browser asking first) and `GET /limits`; `intellect-node pause|resume|limits`
are their clients (`call`).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from aiohttp import web
from intellect.node.app.status import NodeStatus, read_port
from intellect.node.run.pause import USER, PauseGate

#: The header a control request must carry (a cross-site form cannot set it).
CONTROL_HEADER = ("X-Intellect-Node", "control")


class Controls:
    """The control API's pause, resume and limits endpoints over the node's pause gate."""

    def __init__(self, gate: PauseGate, status: NodeStatus) -> None:
        self.gate = gate
        self.status = status
        gate.on_change = self._mirror
        self._mirror(gate)

    def _mirror(self, gate: PauseGate) -> None:
        self.status.paused = gate.paused
        self.status.pause_reasons = gate.reasons

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/pause", self._pause)
        app.router.add_post("/resume", self._resume)
        app.router.add_get("/limits", self._limits)

    def answer(self) -> dict[str, Any]:
        return {"paused": self.gate.paused, "reasons": self.gate.reasons, "limits": self.status.limits}

    async def _pause(self, request: web.Request) -> web.Response:
        _check(request)
        self.gate.set(USER, "paused by the volunteer")
        return web.json_response(self.answer())

    async def _resume(self, request: web.Request) -> web.Response:
        _check(request)
        self.gate.set(USER, None)
        return web.json_response(self.answer())

    async def _limits(self, request: web.Request) -> web.Response:
        return web.json_response(self.answer())


def _check(request: web.Request) -> None:
    name, value = CONTROL_HEADER
    if request.headers.get(name) != value:
        raise web.HTTPForbidden(text=f"control requests need the header {name}: {value}\n")


def call(data_dir: Path, path: str, post: bool = False, timeout_s: float = 5.0) -> dict[str, Any]:
    """GET or POST `path` on the control API of the daemon that owns `data_dir` (blocking; for the CLI)."""
    port = read_port(data_dir)
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST" if post else "GET")
    req.add_header(*CONTROL_HEADER)
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data
