"""The node's DHT: hivemind's go-libp2p daemon (`P2P`) and Kademlia node (`DHTNode`) in the caller's loop.

`DhtService` composes hivemind's asyncio-level parts instead of its process wrapper (`hivemind.DHT`), so
the DHT lives in the daemon's own event loop (DESIGN §3): one p2pd child process started with our node key
file, so the DHT peer ID *is* the node's peer ID, and one `DHTNode` on top of it that validates every
record it stores or reads with `IntellectRecordValidator` (signed manifests and membership records, see
`intellect.protocol.records`). `.p2p` and `.node` are exposed for the averager and state sync.

Record layout (key → subkey → value; hivemind hashes the key to a DHTID, msgpack-wraps subkey and value):

    intellect/runs                      run_id (hex)  → SignedManifest (researcher-signed manifest bytes)
    intellect/run/<run_id>/members      peer id       → SignedMembership (node-signed, expiring)
    intellect/run/<run_id>/control      researcher    → RunControl (researcher-signed, expiring)
    intellect/run/<run_id>/receipts/<round>  group id (hex) → Receipt (signed by every member)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from hivemind.dht.node import DHTNode
from hivemind.dht.validation import CompositeValidator, DHTRecord, RecordValidatorBase
from hivemind.p2p import P2P, PeerID
from intellect.crypto.identity import Identity
from intellect.node.net.probe import ProbeServer
from intellect.node.net.recordchecks import RunFacts, control_ok, key_id, receipt_ok
from intellect.protocol import keys, records
from intellect.protocol.errors import ProtocolError
from intellect.protocol.manifest import SignedManifest
from multiaddr import Multiaddr

logger = logging.getLogger(__name__)

#: Upper bound on how long a shutdown may take before we kill the p2p daemon outright.
SHUTDOWN_TIMEOUT_S = 10.0


class DhtSettings(Protocol):
    """What `DhtService` reads of the node's settings; `intellect.node.app.config.NodeConfig` has all of it.

    Declared here, read-only, so that this layer does not import the app layer's config."""

    @property
    def listen(self) -> Sequence[str]: ...
    @property
    def announce(self) -> Sequence[str]: ...
    @property
    def bootstrap(self) -> Sequence[str]: ...
    @property
    def client_mode(self) -> bool: ...
    @property
    def use_relay(self) -> bool: ...
    @property
    def use_auto_relay(self) -> bool: ...
    @property
    def reachability(self) -> str: ...
    @property
    def identity_path(self) -> Path: ...


def _loopback(maddr: str) -> bool:
    return maddr.startswith(("/ip4/127.", "/ip6/::1/"))


class NodeP2P(P2P):
    """hivemind's `P2P`, starting its daemon with relay discovery off whenever static relays are given.

    With discovery on (hivemind's only choice), go-libp2p's autorelay waits for four relay candidates or a
    three-minute boot delay before it reserves a slot, so a node behind a NAT whose relays are the run's
    one or two bootstrap nodes stays unreachable for three minutes; with static relays only, it reserves
    at once (measured in network namespaces: docs/decisions.md, "Behind a NAT: static relays")."""

    @staticmethod
    def _make_process_args(*args: Any, **kwargs: Any) -> list[str]:
        if kwargs.get("autoRelay") and kwargs.get("trustedRelays"):
            kwargs["relayDiscovery"] = False
        return P2P._make_process_args(*args, **kwargs)


class DhtError(RuntimeError):
    """The DHT could not start (daemon failure, bootstrap unreachable, identity mismatch)."""


RUNS_KEY_ID = key_id(keys.RUNS_KEY)


def members_key_id(run_id: str) -> bytes:
    return key_id(keys.members_key(run_id))


@dataclass
class ValidatorStats:
    """Counters of what the validator accepted and rejected (per record kind), for logs and metrics."""

    accepted: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str, ok: bool) -> None:
        table = self.accepted if ok else self.rejected
        table[kind] = table.get(kind, 0) + 1


class IntellectRecordValidator(RecordValidatorBase):
    """Rejects unsigned, tampered, wrongly keyed and expired intellect records on every honest node.

    hivemind calls `validate` when a peer asks us to store a record and on every record a peer returns
    to our lookups, so a forged record is refused at both ends. A record is *ours* when its key is
    `intellect/runs`, or the member or control key of a run we know (every run whose manifest we validated
    or asked about), or when its value decodes as one of our records (manifest, membership, control record,
    receipt: `records.sniff`); ours must then verify completely (control records and receipts:
    `intellect.node.net.recordchecks`). Records under other keys (the averager's matchmaking keys, say)
    are left to other validators.
    """

    def __init__(self, now: Any = time.time) -> None:
        self._now = now
        #: Protected keys of known runs: key id -> (the record kind it holds, run id).
        self._run_keys: dict[bytes, tuple[str, str]] = {}
        #: What the verified manifests we saw say about their runs.
        self._runs: dict[str, RunFacts] = {}
        self.stats = ValidatorStats()

    def watch_run(self, run_id: str) -> None:
        """Protect the member and control keys of `run_id`: unsigned or foreign values under them are
        rejected."""
        self._run_keys.setdefault(members_key_id(run_id), ("membership", run_id))
        self._run_keys.setdefault(key_id(keys.control_key(run_id)), ("control", run_id))

    def learn_manifest(self, signed: SignedManifest) -> None:
        """Watch a verified manifest's run and remember its researcher and tokens per round."""
        self.watch_run(signed.run_id)
        self._runs[signed.run_id] = RunFacts(signed.researcher, float(signed.manifest.max_tokens_per_round()))

    def validate(self, record: DHTRecord) -> bool:
        kind, ok = self._check(record)
        if kind:
            self.stats.count(kind, ok)
            if not ok:
                logger.debug("rejected %s record under key %s", kind, record.key.hex()[:16])
        return ok

    def _check(self, record: DHTRecord) -> tuple[str, bool]:
        watched = self._run_keys.get(record.key)
        expected = "manifest" if record.key == RUNS_KEY_ID else watched[0] if watched else None
        try:
            value = records.unwrap_dht_bytes(record.value)
        except ProtocolError:
            value = None
        if value is None:
            return (expected, False) if expected else ("", True)
        kind = records.sniff(value) or expected
        if kind is None:
            return "", True
        if expected is not None and kind != expected:
            return expected, False  # another kind of record filed under a protected key
        return kind, self._check_kind(kind, record, value)

    def _check_kind(self, kind: str, record: DHTRecord, value: bytes) -> bool:
        if kind == "manifest":
            # our manifest under someone else's key is a misfiled copy
            return record.key == RUNS_KEY_ID and self._check_manifest(record, value)
        if kind == "membership":
            return self._check_membership(record, value)
        check = control_ok if kind == "control" else receipt_ok
        return check(record, value, self._runs, self._now())

    def _check_manifest(self, record: DHTRecord, value: bytes) -> bool:
        try:
            subkey = records.unwrap_dht_str(record.subkey)
            signed = SignedManifest.from_bytes(value)
        except (ProtocolError, ValueError) as e:
            logger.debug("manifest record does not decode: %s", e)
            return False
        if subkey != signed.run_id or not signed.verify():
            return False
        now = self._now()
        if record.expiration_time > now + records.MAX_MANIFEST_TTL_S + records.CLOCK_SKEW_S:
            return False
        self.learn_manifest(signed)
        return True

    def _check_membership(self, record: DHTRecord, value: bytes) -> bool:
        try:
            subkey = records.unwrap_dht_str(record.subkey)
            rec = records.open_membership(value, now=self._now())
        except (ProtocolError, ValueError) as e:
            logger.debug("membership record rejected: %s", e)
            return False
        if subkey != rec.peer_id or record.key != members_key_id(rec.run_id):
            return False
        # The DHT expiry must be the signed one, so nobody can keep a record alive past its signer's will.
        return abs(record.expiration_time - rec.expires_at) < 1e-3

    @property
    def priority(self) -> int:
        # Runs before any validator that would deserialize values (hivemind's schema validators use 0).
        return 20

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, IntellectRecordValidator)


def _daemon_alive(p2p: P2P) -> bool:
    child = getattr(p2p, "_child", None)
    return child is not None and child.returncode is None


async def start_p2p(
    cfg: DhtSettings, bootstrap: list[str] | None, key_path: Path, startup_timeout: float
) -> P2P:
    """The node's p2p daemon, shielded (see `DhtService.start`), tried again twice when the bootstrap
    nodes could not be reached: a freshly started node's first dial can be lost (a router still learning
    the route, a bootstrap node restarting), and a volunteer should not have to restart the daemon for it."""
    for attempt in range(3):
        creating = asyncio.ensure_future(_create_p2p(cfg, bootstrap, key_path, startup_timeout))
        try:
            return await asyncio.shield(creating)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                late = await asyncio.wait_for(creating, startup_timeout + 5.0)
                await asyncio.wait_for(late.shutdown(), SHUTDOWN_TIMEOUT_S)
            raise
        except Exception as e:  # hivemind raises P2PDaemonError, AssertionError, ValueError…
            if attempt == 2 or not bootstrap or "bootstrap" not in str(e):
                raise
            logger.warning("could not reach the bootstrap nodes (%s); trying again", str(e)[-120:])
            await asyncio.sleep(2.0 * (attempt + 1))
    raise AssertionError("unreachable")


async def _create_p2p(
    cfg: DhtSettings, bootstrap: list[str] | None, key_path: Path, startup_timeout: float
) -> P2P:
    private = cfg.reachability == "private"
    return await NodeP2P.create(
        initial_peers=bootstrap,
        host_maddrs=list(cfg.listen),
        announce_maddrs=list(cfg.announce) or None,
        identity_path=str(key_path),
        use_relay=cfg.use_relay or private,
        # Behind a NAT: hold a relay reservation on the bootstrap nodes, which serve as relays.
        use_auto_relay=cfg.use_auto_relay or private,
        trusted_relays=list(cfg.bootstrap) if private and cfg.bootstrap else None,
        force_reachability=None if cfg.reachability == "auto" else cfg.reachability,
        dht_mode="client" if cfg.client_mode or private else "server",
        # hivemind's "is this identity already online" probe parses only RSA key files (it raises on
        # our Ed25519 key), so it is off; two nodes sharing a key is an operator error.
        check_if_identity_free=False,
        startup_timeout=startup_timeout,
    )


class DhtService:
    """One node's DHT membership: start with `async with DhtService(config) as dht:` or `await run()`.

    `identity` is the node's `Identity`, or the path of its key file (default: `config.identity_path`);
    the p2p daemon reads the same file, so `peer_id` equals `Identity.peer_id` (checked at start).
    """

    def __init__(
        self,
        config: DhtSettings,
        identity: Identity | Path | None = None,
        *,
        wait_timeout: float = 3.0,
        bootstrap_timeout: float | None = None,
        extra_validators: Sequence[RecordValidatorBase] = (),
        startup_timeout: float = 30.0,
    ) -> None:
        self.config = config
        self._identity_arg = identity
        self._wait_timeout = wait_timeout
        self._bootstrap_timeout = bootstrap_timeout
        self._startup_timeout = startup_timeout
        self.validator = IntellectRecordValidator()
        self._composite = CompositeValidator([self.validator, *extra_validators])
        self.ready = asyncio.Event()
        self.identity: Identity | None = None
        self._p2p: P2P | None = None
        self._node: DHTNode | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self.visible_maddrs: list[str] = []
        #: Manifests this node published: run_id -> (signed manifest, ttl, time of last store). Storing a
        #: membership record for such a run re-publishes its manifest once a third of the TTL has passed,
        #: so a run stays listed as long as anyone trains on it, even after its researcher went offline.
        self._published: dict[str, tuple[SignedManifest, float, float]] = {}

    # ---- lifecycle -------------------------------------------------------------------------------

    @property
    def p2p(self) -> P2P:
        if self._p2p is None:
            raise DhtError("DhtService is not started")
        return self._p2p

    @property
    def node(self) -> DHTNode:
        if self._node is None:
            raise DhtError("DhtService is not started")
        return self._node

    @property
    def peer_id(self) -> str:
        if self.identity is None:
            raise DhtError("DhtService is not started")
        return self.identity.peer_id

    def _identity_file(self) -> tuple[Identity, Path]:
        arg = self._identity_arg
        if isinstance(arg, Identity):
            # p2pd wants a file: write the key into a private temporary directory (mode 0600).
            self._tmpdir = tempfile.TemporaryDirectory(prefix="intellect-dht-")
            path = Path(self._tmpdir.name) / "identity.key"
            arg.save(path)
            return arg, path
        path = Path(arg) if arg is not None else self.config.identity_path
        return Identity.load(path), path

    @property
    def private(self) -> bool:
        """Behind a NAT with no forwarding (`reachability = "private"`): reached through relays only."""
        return self.config.reachability == "private"

    async def start(self) -> None:
        """Start p2pd with our key, join the DHT through `config.bootstrap`, learn our visible addresses."""
        identity, key_path = self._identity_file()
        self.identity = identity
        cfg = self.config
        bootstrap = list(cfg.bootstrap) or None
        t0 = time.monotonic()
        # P2P.create spawns p2pd and then waits for it; cancelled in between (Ctrl-C while starting), it
        # would leave p2pd running with nobody holding its handle. So it runs shielded: a cancellation
        # waits (bounded by the startup timeout) for the daemon to be up, shuts it down, then propagates.
        try:
            p2p = await start_p2p(cfg, bootstrap, key_path, self._startup_timeout)
        except asyncio.CancelledError:
            self._cleanup_tmp()
            raise
        except Exception as e:  # hivemind raises P2PDaemonError, AssertionError, ValueError…
            self._cleanup_tmp()
            raise DhtError(f"p2p daemon failed to start: {e}") from e
        self._p2p = p2p
        try:
            got = p2p.peer_id.to_base58()
            if got != identity.peer_id:
                raise DhtError(f"p2p daemon reports peer ID {got}, our key file says {identity.peer_id}")
            self._node = await DHTNode.create(
                p2p=self._p2p,
                initial_peers=bootstrap,
                client_mode=cfg.client_mode or self.private,
                record_validator=self._composite,
                wait_timeout=self._wait_timeout,
                bootstrap_timeout=self._bootstrap_timeout,
            )
            self.visible_maddrs = [str(m) for m in await p2p.get_visible_maddrs(latest=True)]
            await ProbeServer(p2p).start()  # every node answers `doctor`'s dial-back and throughput probes
        except BaseException as e:
            await self._shutdown_p2p()
            self._cleanup_tmp()
            if isinstance(e, DhtError | asyncio.CancelledError | KeyboardInterrupt):
                raise
            raise DhtError(f"DHT failed to start: {e}") from e
        logger.info(
            "DHT up in %.1fs as %s (%s mode), listening on %s",
            time.monotonic() - t0,
            identity.peer_id,
            "client" if cfg.client_mode or self.private else "server",
            " ".join(self.visible_maddrs),
        )
        self.ready.set()

    def dialable_maddrs(self) -> list[str]:
        """The addresses others are told to dial us at (membership records), each ending in our peer ID.

        The announced ones when configured; behind a NAT (`private`) only circuit addresses through our
        relays, the bootstrap nodes (our private and NAT-mapped addresses are of no use to anyone else);
        otherwise what the p2p daemon reports."""
        me = self.peer_id
        cfg = self.config
        if cfg.announce:
            found = list(cfg.announce)
        elif self.private:
            return [f"{relay}/p2p-circuit/p2p/{me}" for relay in cfg.bootstrap if "/p2p/" in relay]
        else:
            # Loopback addresses reach only this machine: announced only in a swarm that lives there.
            found = [m for m in self.visible_maddrs if not _loopback(m)] or list(self.visible_maddrs)
        return [m if "/p2p/" in m else f"{m}/p2p/{me}" for m in found]

    async def connect(self, peer_id: str, maddrs: Sequence[str]) -> bool:
        """Make sure the p2p daemon has a connection to `peer_id`, dialling `maddrs` (e.g. its circuit
        addresses) if it has none; False when that failed. A stream opened by peer ID alone can only use
        addresses the daemon already knows, which for a peer behind a NAT are none that work."""
        try:
            addrs = [Multiaddr(m.split(f"/p2p/{peer_id}")[0]) for m in maddrs]
            # hivemind's P2P exposes no connect; its daemon client does (hivemind uses it the same way).
            await self.p2p._client.connect(PeerID.from_base58(peer_id), addrs)
            return True
        except Exception as e:  # ControlFailure for a failed dial; ValueError for a malformed address
            logger.debug("could not connect to %s via %s: %s", peer_id, maddrs, e)
            return False

    async def stop(self) -> None:
        """Leave the DHT and stop the p2p daemon; waits for the daemon to exit (kills it after a timeout)."""
        self.ready.clear()
        node, self._node = self._node, None
        if node is not None:
            try:
                await asyncio.wait_for(node.shutdown(), SHUTDOWN_TIMEOUT_S)
            except TimeoutError:
                logger.warning("DHT node did not shut down in %.0fs", SHUTDOWN_TIMEOUT_S)
        await self._shutdown_p2p()
        self._cleanup_tmp()

    async def _shutdown_p2p(self) -> None:
        p2p, self._p2p = self._p2p, None
        if p2p is None:
            return
        try:
            await asyncio.wait_for(p2p.shutdown(), SHUTDOWN_TIMEOUT_S)
        except TimeoutError:
            logger.warning("p2p daemon ignored SIGTERM for %.0fs; killing it", SHUTDOWN_TIMEOUT_S)
        if _daemon_alive(p2p):
            # hivemind keeps the child handle private; there is no public way to force-kill it.
            child = p2p._child
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()

    def _cleanup_tmp(self) -> None:
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    async def __aenter__(self) -> DhtService:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def run(self) -> None:
        """Service form: start, set `ready`, serve until cancelled, then stop."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    @property
    def daemon_pid(self) -> int | None:
        """PID of our p2pd child (tests check it is gone after stop)."""
        child = getattr(self._p2p, "_child", None) if self._p2p is not None else None
        return child.pid if child is not None else None

    # ---- runs ------------------------------------------------------------------------------------

    async def publish_manifest(
        self, signed: SignedManifest, ttl: float = records.DEFAULT_MANIFEST_TTL_S
    ) -> bool:
        """Store a researcher-signed manifest under `intellect/runs` / run_id; True if any replica took it."""
        if not signed.verify():
            raise ValueError("refusing to publish a manifest whose signature does not verify")
        ttl = min(ttl, records.MAX_MANIFEST_TTL_S)
        self.validator.learn_manifest(signed)
        self._published[signed.run_id] = (signed, ttl, time.monotonic())
        return bool(
            await self.node.store(keys.RUNS_KEY, signed.to_bytes(), time.time() + ttl, subkey=signed.run_id)
        )

    async def get_manifests(self, latest: bool = True) -> tuple[list[SignedManifest], int]:
        """All verifiable runs in the DHT and the number of entries that failed verification here."""
        found = await self.node.get(keys.RUNS_KEY, latest=latest)
        out: list[SignedManifest] = []
        invalid = 0
        if found is None or not isinstance(found.value, dict):
            return out, invalid
        for subkey, item in found.value.items():
            try:
                signed = SignedManifest.from_bytes(records.as_bytes(item.value))
            except (ProtocolError, ValueError) as e:
                logger.info("ignoring an undecodable run record %r: %s", subkey, e)
                invalid += 1
                continue
            if subkey != signed.run_id or not signed.verify():
                logger.info("ignoring run record %r: run_id or signature does not verify", subkey)
                invalid += 1
                continue
            self.validator.learn_manifest(signed)
            out.append(signed)
        out.sort(key=lambda s: s.manifest.name)
        return out, invalid

    async def get_manifest(self, run_id: str, latest: bool = True) -> SignedManifest | None:
        runs, _ = await self.get_manifests(latest=latest)
        return next((r for r in runs if r.run_id == run_id), None)

    # ---- membership ------------------------------------------------------------------------------

    async def store_membership(self, signed_record: bytes) -> bool:
        """Store our signed membership record (from `records.seal_membership`) until its signed expiry."""
        rec = records.open_membership(signed_record)
        self.validator.watch_run(rec.run_id)
        ok = bool(
            await self.node.store(
                keys.members_key(rec.run_id), signed_record, rec.expires_at, subkey=rec.peer_id
            )
        )
        published = self._published.get(rec.run_id)
        stale = published is not None and time.monotonic() - published[2] > published[1] / 3
        if published is not None and stale and not await self.publish_manifest(published[0], published[1]):
            logger.warning("re-publishing the manifest of run %s was not accepted", rec.run_id[:12])
        return ok

    async def get_members(self, run_id: str, latest: bool = True) -> list[records.MembershipRecord]:
        """Live, verified members of a run (expired and unverifiable entries dropped and logged)."""
        self.validator.watch_run(run_id)
        found = await self.node.get(keys.members_key(run_id), latest=latest)
        if found is None or not isinstance(found.value, dict):
            return []
        now = time.time()
        out: list[records.MembershipRecord] = []
        for subkey, item in found.value.items():
            try:
                rec = records.open_membership(records.as_bytes(item.value), now=now)
            except (ProtocolError, ValueError) as e:
                logger.info("ignoring membership entry %r of run %s: %s", subkey, run_id[:12], e)
                continue
            if rec.peer_id != subkey or rec.run_id != run_id:
                logger.info("ignoring membership entry %r: keyed under the wrong peer or run", subkey)
                continue
            out.append(rec)
        out.sort(key=lambda r: r.peer_id)
        return out


def process_alive(pid: int) -> bool:
    """True while a process with this PID exists and is not a zombie (used by tests and the CLI)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (FileNotFoundError, IndexError):
        return False
    except PermissionError:
        return os.path.exists(f"/proc/{pid}")
