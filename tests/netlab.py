"""A small internet in network namespaces, for tests of nodes behind NATs (Linux, root, iproute2, nftables).

    <p>-wan   a bridge: the "internet" (10.77.0.0/24)
    <p>-pub   a public host, 10.77.0.2
    <p>-rK    a home router: WAN 10.77.0.1K, LAN 10.78.K.1, nftables masquerade out of the WAN, and a
              forward filter that lets in only replies to connections from inside (no port forwarding)
    <p>-hK    a volunteer behind router K, 10.78.K.2, default route via its router

Nothing here routes outside the namespaces it creates; `close()` kills every process still inside them
and deletes them. `Lab.available()` says whether this machine can build one (tests skip otherwise).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import uuid

PUB_IP = "10.77.0.2"


def _run(*cmd: str, stdin: str | None = None) -> None:
    subprocess.run(cmd, input=stdin, text=True, check=True, capture_output=True, timeout=30)


class Lab:
    """`with Lab(nats=2) as lab:` then `lab.ns("pub")`, `lab.ns("h1")` … are namespace names."""

    def __init__(self, nats: int = 2) -> None:
        self.prefix = "il" + uuid.uuid4().hex[:6]
        self.nats = nats
        self.names: list[str] = []

    @staticmethod
    def available() -> str:
        """Empty when a lab can be built here, else why not."""
        if os.geteuid() != 0:
            return "needs root (network namespaces)"
        missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
        if missing:
            return f"needs {' and '.join(missing)} (iproute2, nftables)"
        return ""

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def __enter__(self) -> Lab:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add(self, name: str) -> str:
        ns = self.ns(name)
        _run("ip", "netns", "add", ns)
        self.names.append(ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def _wan_port(self, ns: str, short: str, cidr: str) -> str:
        """A veth from `ns` to the WAN bridge; the interface name inside `ns`."""
        inside, outside = f"{self.prefix}{short}", f"{self.prefix}{short}b"
        _run("ip", "link", "add", inside, "type", "veth", "peer", "name", outside)
        _run("ip", "link", "set", inside, "netns", ns)
        _run("ip", "link", "set", outside, "netns", self.ns("wan"))
        _run("ip", "-n", self.ns("wan"), "link", "set", outside, "master", "br0", "up")
        _run("ip", "-n", ns, "addr", "add", cidr, "dev", inside)
        _run("ip", "-n", ns, "link", "set", inside, "up")
        return inside

    def _build(self) -> None:
        wan = self._add("wan")
        _run("ip", "-n", wan, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", wan, "link", "set", "br0", "up")
        self._wan_port(self._add("pub"), "p", f"{PUB_IP}/24")
        for k in range(1, self.nats + 1):
            router = self._add(f"r{k}")
            wan_if = self._wan_port(router, f"r{k}", f"10.77.0.1{k}/24")
            _run("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            host = self._add(f"h{k}")
            lan_r, lan_h = f"{self.prefix}l{k}", f"{self.prefix}l{k}b"
            _run("ip", "link", "add", lan_r, "type", "veth", "peer", "name", lan_h)
            _run("ip", "link", "set", lan_r, "netns", router)
            _run("ip", "link", "set", lan_h, "netns", host)
            _run("ip", "-n", router, "addr", "add", f"10.78.{k}.1/24", "dev", lan_r)
            _run("ip", "-n", router, "link", "set", lan_r, "up")
            _run("ip", "-n", host, "addr", "add", f"10.78.{k}.2/24", "dev", lan_h)
            _run("ip", "-n", host, "link", "set", lan_h, "up")
            _run("ip", "-n", host, "route", "add", "default", "via", f"10.78.{k}.1")
            rules = (
                "table ip nat {\n"
                f'  chain post {{ type nat hook postrouting priority 100; oifname "{wan_if}" masquerade; }}\n'
                "}\n"
                "table ip filter {\n"
                "  chain forwarding { type filter hook forward priority 0; policy drop;\n"
                f'    iifname "{lan_r}" accept\n'
                "    ct state established,related accept\n"
                "  }\n"
                "}\n"
            )
            _run("ip", "netns", "exec", router, "nft", "-f", "-", stdin=rules)

    def close(self) -> None:
        for ns in reversed(self.names):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                pids = subprocess.run(
                    ["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10
                ).stdout.split()
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self.names.clear()
