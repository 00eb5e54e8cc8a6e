"""Checks made before a node starts anything, so that a common mistake costs one clear line rather than a
minute and a traceback; and plain words for a DHT that could not start.

* `check_addresses`: every multiaddr of the config parses, and the part that is missing or wrong is named
  (run when the config is loaded, `app.config.load_config`).
* `require_bootstrap`, `check_ports`, `check_device`: what `intellect-node start` checks before it joins
  the DHT: a bootstrap address, free ports (naming the service that wanted each), a device the installed
  torch can use.
* `explain_dht_failure`: the p2p daemon's "failed to connect to bootstrap peers" names no address (and
  carries a Go timestamp); this asks each bootstrap address over TCP whether anything answers there, and
  whether it speaks libp2p, so the message says which address failed and whether its port or its peer ID
  is the likely mistake.

Every error here is a `PreflightError` (or `ConfigError` for addresses) whose message is meant to be
shown as it is, without a traceback.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from typing import Any

#: Protocols whose next path segment is their value.
_VALUED = frozenset({"ip4", "ip6", "dns", "dns4", "dns6", "dnsaddr", "tcp", "udp", "p2p", "ipfs"})
_HOSTS = frozenset({"ip4", "ip6", "dns", "dns4", "dns6", "dnsaddr"})
_EXAMPLE = "/ip4/203.0.113.10/tcp/4001/p2p/12D3KooW…"
#: go-log's timestamp at the start of a p2p daemon message ("2026/12/02 07:49:08 failed to …").
_GO_TIMESTAMP = re.compile(r"\b\d{4}/\d\d/\d\d \d\d:\d\d:\d\d(\.\d+)? ")
#: What a libp2p TCP listener sends first: multistream-select's header.
_MULTISTREAM = b"/multistream/1.0.0\n"


class PreflightError(RuntimeError):
    """An expected start-up failure; its message (one or two lines) is shown as it is."""


class AddressError(ValueError):
    """A multiaddr that cannot work; the message names the address and what is wrong with it."""


# ---- multiaddrs ------------------------------------------------------------------------------------


def check_multiaddr(addr: str, role: str) -> None:
    """Raise AddressError unless `addr` is a usable multiaddr for `role` ("bootstrap", "listen" or
    "announce"). A bootstrap address must name a host, a port and the node's /p2p/ peer ID."""
    where = f"{role} address {addr!r}"
    if not addr.startswith("/"):
        m = re.fullmatch(r"(\d{1,3}(?:\.\d{1,3}){3}):(\d+)", addr)
        hint = (
            f" (for {addr}: /ip4/{m[1]}/tcp/{m[2]}{'/p2p/<peer id>' if role == 'bootstrap' else ''})"
            if m
            else ""
        )
        raise AddressError(f"{where} is not a multiaddr: write it as {_example(role)}{hint}")
    parts = addr.split("/")[1:]
    protocols: dict[str, str] = {}
    i = 0
    while i < len(parts):
        name = parts[i]
        if name == "":
            raise AddressError(f"{where} has an empty part (a doubled or trailing '/')")
        if name in _VALUED:
            value = parts[i + 1] if i + 1 < len(parts) else ""
            if not value:
                raise AddressError(f"{where}: /{name}/ has no value (e.g. {_example(role)})")
            _check_value(where, name, value, role)
            protocols.setdefault(name, value)
            i += 2
        else:
            protocols.setdefault(name, "")
            i += 1
    _check_parse(where, addr)
    _check_role(where, role, protocols)


def _example(role: str) -> str:
    return _EXAMPLE if role == "bootstrap" else "/ip4/0.0.0.0/tcp/4001"


def _check_value(where: str, name: str, value: str, role: str) -> None:
    if name in ("tcp", "udp"):
        if not value.isdigit() or int(value) > 65535:
            raise AddressError(f"{where}: {value!r} is not a port number (/{name}/<1..65535>)")
        if int(value) == 0 and role != "listen":
            raise AddressError(f"{where}: port 0 means 'any port' and only works in a listen address")
    elif name == "ip4" or name == "ip6":
        try:
            (ipaddress.IPv4Address if name == "ip4" else ipaddress.IPv6Address)(value)
        except ValueError:
            raise AddressError(f"{where}: {value!r} is not an IPv{name[-1]} address") from None
    elif name in ("p2p", "ipfs"):
        from intellect.crypto.errors import InvalidPeerId
        from intellect.crypto.identity import public_key_from_peer_id

        try:
            public_key_from_peer_id(value)
        except InvalidPeerId:
            raise AddressError(
                f"{where}: {value!r} is not a valid peer ID (12D3KooW… as `intellect-node id` prints it)"
            ) from None


def _check_parse(where: str, addr: str) -> None:
    from multiaddr import Multiaddr

    try:
        Multiaddr(addr)
    except Exception as e:  # multiaddr raises StringParseError, ValueError, BinaryParseError…
        why = re.sub(r"^Invalid MultiAddr '[^']*': | \(string: .*\)$", "", str(e))
        raise AddressError(f"{where} is not a valid multiaddr: {why}") from None


def _check_role(where: str, role: str, protocols: dict[str, str]) -> None:
    if not _HOSTS & protocols.keys():
        raise AddressError(
            f"{where} names no host: it starts with /ip4/, /ip6/ or /dns4/ (e.g. {_example(role)})"
        )
    if not {"tcp", "udp"} & protocols.keys():
        raise AddressError(f"{where} names no port: add /tcp/<port> after the host (e.g. {_example(role)})")
    if role == "bootstrap" and not {"p2p", "ipfs"} & protocols.keys():
        raise AddressError(
            f"{where} has no /p2p/<peer id> part: a bootstrap address ends in the node's peer ID "
            f"(e.g. {_EXAMPLE}; the first line `intellect-node bootstrap` prints is the whole address)"
        )
    if role == "listen" and ({"p2p", "ipfs"} & protocols.keys() or "p2p-circuit" in protocols):
        raise AddressError(f"{where}: a listen address is a local host and port, with no /p2p/ part")


def check_addresses(bootstrap: Iterable[str], listen: Iterable[str], announce: Iterable[str]) -> None:
    """Raise AddressError for the first unusable multiaddr of a config."""
    for role, addrs in (("bootstrap", bootstrap), ("listen", listen), ("announce", announce)):
        for addr in addrs:
            check_multiaddr(addr, role)


# ---- what `start` needs ----------------------------------------------------------------------------


def require_bootstrap(bootstrap: Sequence[str], config_path: Any) -> None:
    """`start` with no bootstrap address would wait for a run no DHT can tell it about: say so at once."""
    if not bootstrap:
        raise PreflightError(
            "no bootstrap peers: pass --bootstrap MADDR or set `bootstrap` in the config\n"
            f"hint: --bootstrap {_EXAMPLE} (the address your run's organisers gave you), "
            f'or bootstrap = ["…"] in {config_path}, or INTELLECT_NODE_BOOTSTRAP'
        )


def probe_port(service: str, host: str, port: int, *, udp: bool = False, how: str = "") -> None:
    """Raise PreflightError naming `service` and the port when `host:port` cannot be bound now."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM) as s:
        # The services themselves bind with SO_REUSEADDR: a port in TIME_WAIT is free for them too.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            if not udp:
                s.listen(1)
        except OSError as e:
            what = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
            raise PreflightError(
                f"{service} port {port} on {host} {what}" + (f"; {how}" if how else "")
            ) from None


def check_ports(http_port: int, listen: Sequence[str], extra: Sequence[tuple[str, str, int]] = ()) -> None:
    """Probe the ports `start` will bind: the control API's and each fixed p2p listen port (and `extra`:
    (service, host, port) of any other listener)."""
    probe_port(
        "control API",
        "127.0.0.1",
        http_port,
        how="another intellect-node? pass --http-port 0 for any free port",
    )
    for service, host, port in extra:
        probe_port(service, host, port, how="pick another port")
    for addr in listen:
        parts = addr.split("/")
        for proto in ("tcp", "udp"):
            if proto in parts and ("ip4" in parts or "ip6" in parts):
                host = parts[parts.index("ip4") + 1] if "ip4" in parts else parts[parts.index("ip6") + 1]
                port = int(parts[parts.index(proto) + 1])
                how = f"--listen {addr}: pick another port, or 0 for any"
                probe_port(f"p2p ({proto.upper()})", host, port, udp=proto == "udp", how=how)


def check_device(device: str, local_ranks: int) -> None:
    """Refuse `device = "cuda"` when the installed torch cannot use a GPU, before anything starts."""
    if device != "cuda":
        return
    import torch

    if torch.version.cuda is None:
        raise PreflightError(
            f"device cuda: the installed torch {torch.__version__} is built without CUDA\n"
            "hint: install a CUDA build of torch, or pass --device cpu (or auto)"
        )
    if not torch.cuda.is_available():
        raise PreflightError(
            "device cuda: torch sees no usable GPU (check the driver and CUDA_VISIBLE_DEVICES)\n"
            "hint: pass --device cpu (or auto) to train on the CPU"
        )
    count = torch.cuda.device_count()
    if local_ranks > count:
        raise PreflightError(f"local_ranks {local_ranks}: only {count} GPU(s) visible, one rank per GPU")


# ---- a DHT that did not start ----------------------------------------------------------------------


async def explain_dht_failure(message: str, bootstrap: Sequence[str], timeout_s: float = 3.0) -> str:
    """`message` without go-log timestamps; when it says the bootstrap nodes could not be reached, the
    addresses tried, each with what answers there (nothing: a wrong host or port; libp2p: a wrong peer ID)."""
    text = _GO_TIMESTAMP.sub("", message)
    if not bootstrap or "bootstrap" not in text:
        return text
    found = await asyncio.gather(*(_diagnose(addr, timeout_s) for addr in bootstrap))
    return "could not join the DHT through any bootstrap node: " + "; ".join(
        f"{addr}: {why}" for addr, why in zip(bootstrap, found, strict=True)
    )


async def _diagnose(addr: str, timeout_s: float) -> str:
    parts = addr.split("/")
    host = next((parts[i + 1] for i, p in enumerate(parts[:-1]) if p in _HOSTS), None)
    port = parts[parts.index("tcp") + 1] if "tcp" in parts[:-1] else None
    peer = parts[-1] if "p2p" in parts[-3:-1] else "the peer in it"
    if host is None or port is None:
        return "not checked (no TCP host and port)"
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout_s)
    except ConnectionRefusedError:
        return f"nothing listens on {host} port {port} (connection refused: a wrong port, or it is down)"
    except TimeoutError:
        return f"no answer from {host} port {port} in {timeout_s:.0f} s (a wrong host, a firewall, or down)"
    except OSError as e:
        return f"cannot connect to {host} port {port} ({e.strerror or e})"
    try:
        first = await asyncio.wait_for(reader.read(64), timeout_s)
    except (TimeoutError, OSError):
        first = b""
    finally:
        writer.close()
    if _MULTISTREAM in first:
        return (
            f"a libp2p node answers on {host} port {port}, but it is not {peer} "
            "(a wrong or outdated /p2p/ peer ID: `intellect-node id` on that machine prints the right one)"
        )
    said = "said nothing" if not first else "is not a libp2p node"
    return f"{host} port {port} accepts connections but {said} (a wrong port, or a proxy in the way?)"
