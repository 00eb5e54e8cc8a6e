"""A node's own copy of its contribution receipts: one file per completed all-reduce under
`<data dir>/runs/<run id[:16]>/receipts/`, named `<round>-<group id>.receipt`, holding the codec bytes of
the `Receipt` (`intellect.protocol.receipts`). Written whole, then renamed into place; best effort (a full
disk is logged, the round goes on). `intellect-node contributions` reads them back and verifies each."""

from __future__ import annotations

import logging
from pathlib import Path

from intellect.protocol.codec import decode, encode
from intellect.protocol.errors import ProtocolError
from intellect.protocol.receipts import MAX_RECEIPT_BYTES, Receipt

logger = logging.getLogger(__name__)

SUFFIX = ".receipt"


def store_receipt(directory: Path, receipt: Receipt) -> Path | None:
    """Write `receipt` into `directory`; its path, or None when the disk refused."""
    path = directory / f"{receipt.round:08d}-{receipt.group_id.hex()[:32]}{SUFFIX}"
    tmp = path.with_suffix(".tmp")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(encode(receipt))
        tmp.replace(path)
    except OSError as e:
        logger.warning("could not keep the receipt of round %s in %s: %s", receipt.round, directory, e)
        tmp.unlink(missing_ok=True)
        return None
    return path


def load_receipts(directory: Path, newest: int | None = None) -> tuple[list[Receipt], list[str]]:
    """Every receipt file in `directory` that decodes (unverified), oldest round first, and the names of
    those that do not; with `newest`, only the last `newest` files (names sort by their zero-padded round),
    so that a page reloaded every few seconds reads a bounded number however long the run."""
    receipts, bad = [], []
    paths = sorted(directory.glob(f"*{SUFFIX}")) if directory.is_dir() else []
    for path in paths[max(0, len(paths) - newest) :] if newest is not None else paths:
        try:
            if path.stat().st_size > MAX_RECEIPT_BYTES:
                raise ProtocolError("too large")
            receipts.append(decode(path.read_bytes(), Receipt))
        except (OSError, ProtocolError) as e:
            logger.debug("unreadable receipt %s: %s", path, e)
            bad.append(path.name)
    return receipts, bad
