"""Who may train in a run: the manifest's admission policy, as one pure rule.

A run's manifest names one of three policies (`Manifest.admission.policy`):

- ``open``: anyone may join;
- ``allowlist``: the peer IDs in `admission.peers` may join;
- ``tickets``: a peer may join while it holds an unexpired `SignedTicket` the researcher issued for exactly
  this run and this peer (`intellect.protocol.records.issue_ticket`); peers present theirs in their
  membership record.

Whatever the policy, the researcher who signed the manifest is always admitted. Every check of admission
(membership records, gossip envelopes, group records, state-sync requests) goes through `is_admitted`.
"""

from __future__ import annotations

from intellect.protocol.manifest import Manifest
from intellect.protocol.records import ticket_valid


def is_admitted(
    manifest: Manifest, researcher: str, peer_id: str, ticket: bytes = b"", now: float | None = None
) -> bool:
    """Whether `manifest`'s admission policy lets `peer_id` train in the run `researcher` signed.

    `ticket` is the peer's `SignedTicket` bytes (only looked at under the ``tickets`` policy); `now` is the
    Unix time its expiry is checked against (the current time when None).
    """
    policy = manifest.admission.policy
    if policy == "open" or peer_id == researcher:
        return True
    if policy == "allowlist":
        return peer_id in manifest.admission.peers
    return bool(ticket) and ticket_valid(ticket, researcher, manifest.run_id, peer_id, now=now)
