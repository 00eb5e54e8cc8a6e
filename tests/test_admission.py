"""The admission rule (`intellect.protocol.admission.is_admitted`): open, allowlist and tickets (pure)."""

from __future__ import annotations

import time
from pathlib import Path

from intellect.crypto.identity import Identity
from intellect.protocol.admission import is_admitted
from intellect.protocol.manifest import Manifest, SignedManifest, load_manifest_toml, parse_manifest
from intellect.protocol.records import issue_ticket

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-run.toml"
RESEARCHER, ALICE, BOB = (Identity.from_seed(bytes([i]) * 32) for i in (1, 2, 3))
NOW = 1_700_000_000.0


def run(policy: str, peers: tuple[str, ...] = ()) -> Manifest:
    """The example run under `policy`, signed by RESEARCHER (the researcher is part of the run_id)."""
    plain = load_manifest_toml(EXAMPLE).to_plain()
    unsigned = parse_manifest({**plain, "admission": {"policy": policy, "peers": list(peers)}})
    return SignedManifest.sign(unsigned, RESEARCHER).manifest


def test_open_admits_everyone() -> None:
    m = run("open")
    for peer in (ALICE, BOB, RESEARCHER):
        assert is_admitted(m, RESEARCHER.peer_id, peer.peer_id)


def test_allowlist_admits_listed_peers_and_the_researcher() -> None:
    m = run("allowlist", (ALICE.peer_id,))
    assert is_admitted(m, RESEARCHER.peer_id, ALICE.peer_id)
    assert not is_admitted(m, RESEARCHER.peer_id, BOB.peer_id)
    assert is_admitted(m, RESEARCHER.peer_id, RESEARCHER.peer_id)  # not listed, but always in
    # A ticket does not open an allowlist run.
    ticket = issue_ticket(RESEARCHER, m.run_id, BOB.peer_id, NOW + 60)
    assert not is_admitted(m, RESEARCHER.peer_id, BOB.peer_id, ticket, now=NOW)


def test_tickets() -> None:
    m = run("tickets")
    ticket = issue_ticket(RESEARCHER, m.run_id, BOB.peer_id, NOW + 60)
    assert is_admitted(m, RESEARCHER.peer_id, BOB.peer_id, ticket, now=NOW)
    assert not is_admitted(m, RESEARCHER.peer_id, BOB.peer_id, now=NOW)  # no ticket
    assert not is_admitted(m, RESEARCHER.peer_id, ALICE.peer_id, ticket, now=NOW)  # someone else's
    assert not is_admitted(m, RESEARCHER.peer_id, BOB.peer_id, ticket, now=NOW + 60)  # expired
    assert not is_admitted(m, ALICE.peer_id, BOB.peer_id, ticket, now=NOW)  # not that researcher's
    other_run = issue_ticket(RESEARCHER, "cd" * 32, BOB.peer_id, NOW + 60)
    assert not is_admitted(m, RESEARCHER.peer_id, BOB.peer_id, other_run, now=NOW)  # wrong run
    forged = issue_ticket(ALICE, m.run_id, BOB.peer_id, NOW + 60)
    assert not is_admitted(m, RESEARCHER.peer_id, BOB.peer_id, forged, now=NOW)  # signed by another
    assert not is_admitted(m, RESEARCHER.peer_id, BOB.peer_id, b"\x93\x67junk", now=NOW)
    assert is_admitted(m, RESEARCHER.peer_id, RESEARCHER.peer_id)  # the researcher needs no ticket


def test_ticket_expiry_defaults_to_the_current_time() -> None:
    m = run("tickets")
    now = time.time()
    valid = issue_ticket(RESEARCHER, m.run_id, BOB.peer_id, now + 60)
    assert is_admitted(m, RESEARCHER.peer_id, BOB.peer_id, valid)
    expired = issue_ticket(RESEARCHER, m.run_id, BOB.peer_id, now - 1)
    assert not is_admitted(m, RESEARCHER.peer_id, BOB.peer_id, expired)
