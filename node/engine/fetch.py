"""Downloading an `http(s)://` shard into the node's data directory: resumable, bounded, verified.

A shard's bytes stream into `<dest>.part`. When the connection drops, the next attempt asks for the rest
with `Range: bytes=<have>-` and appends (a server that answers 200 instead sends it all again); a `.part`
left by an earlier process resumes the same way. Only once the whole file's sha256 equals the manifest's
is it renamed to `<dest>`, so nothing reads a partial or a forged file; a mismatch deletes the download
(resuming from bad bytes would never end well) and raises `FetchError`. Limits: the file size
(`max_bytes`, checked against the announced length before the first byte and while streaming), a socket
timeout for the connection and every read, a wall-clock budget for the whole download, and a bounded number
of attempts. A lock file serializes processes of one node that want the same shard (local ranks).

Standard library only (urllib): it honours the usual proxy environment variables and needs no new
dependency, and downloads happen where the engine is built, which blocks anyway.
"""

from __future__ import annotations

import fcntl
import http.client
import logging
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from intellect.node.engine.sources import DataError, files_sha256

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
#: What a 416 carries: the file's size.
_CONTENT_RANGE_TOTAL = re.compile(r"^bytes \*/(\d+)$")
_USER_AGENT = "intellect-node"


class FetchError(DataError):
    """A shard could not be downloaded, was too big, or its bytes do not have the manifest's sha256."""


class _Retry(Exception):
    """An attempt failed in a way another attempt may fix (a dropped connection, a 5xx)."""


@dataclass(frozen=True)
class FetchConfig:
    """Limits of one download."""

    #: Largest file accepted, in bytes.
    max_bytes: int = 64 << 30
    #: Seconds to connect, and the longest wait for any single read.
    timeout_s: float = 30.0
    #: Seconds the whole download may take, all attempts together.
    total_timeout_s: float = 6 * 3600.0
    #: Attempts in all (each resumes where the last stopped).
    attempts: int = 5
    #: Pause before the second attempt; doubles after each failure.
    backoff_s: float = 1.0
    #: Bytes read per call.
    chunk_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.attempts <= 0 or self.chunk_bytes <= 0:
            raise ValueError("max_bytes, attempts and chunk_bytes must be positive")
        if self.timeout_s <= 0 or self.total_timeout_s <= 0 or self.backoff_s < 0:
            raise ValueError("timeouts must be positive and backoff_s non-negative")


def download(url: str, dest: Path, sha256: str, config: FetchConfig | None = None) -> Path:
    """`dest`, holding the bytes at `url` whose sha256 is `sha256` (downloaded unless already there)."""
    cfg = config or FetchConfig()
    if not url.lower().startswith(("http://", "https://")):
        raise FetchError(f"{url}: only http:// and https:// URLs are downloaded")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.with_name(dest.name + ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another local rank may be fetching it right now
        if dest.is_file():
            if files_sha256([dest]) == sha256:
                return dest
            log.warning("%s: sha256 mismatch on disk; downloading again", dest)
            dest.unlink()
        part = dest.with_name(dest.name + ".part")
        _fetch_part(url, part, cfg)
        actual = files_sha256([part])
        if actual != sha256:
            part.unlink()
            raise FetchError(f"{url}: sha256 mismatch: manifest {sha256}, download {actual} (deleted)")
        part.replace(dest)
        log.info("downloaded %s to %s (%d bytes)", url, dest, dest.stat().st_size)
        return dest


def _fetch_part(url: str, part: Path, cfg: FetchConfig) -> None:
    deadline = time.monotonic() + cfg.total_timeout_s
    for attempt in range(1, cfg.attempts + 1):
        try:
            _attempt(url, part, cfg, deadline)
            return
        except _Retry as e:
            if attempt == cfg.attempts:
                raise FetchError(f"{url}: gave up after {attempt} attempts: {e}") from None
            wait = min(cfg.backoff_s * 2 ** (attempt - 1), max(0.0, deadline - time.monotonic()))
            log.info("%s: attempt %d failed (%s); resuming in %.1f s", url, attempt, e, wait)
            time.sleep(wait)


def _attempt(url: str, part: Path, cfg: FetchConfig, deadline: float) -> None:
    """One request: resume `part` (or start it) and read to the end. `_Retry` for transient failures."""
    if time.monotonic() > deadline:
        raise FetchError(f"{url}: not done after {cfg.total_timeout_s:.0f} s")
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=cfg.timeout_s) as resp:
            start, total = _response_span(url, resp, have)
            if total is not None and total > cfg.max_bytes:
                raise FetchError(f"{url}: {total} bytes is over the limit of {cfg.max_bytes}")
            _stream(url, resp, part, start, cfg, deadline)
        size = part.stat().st_size
        if total is not None and size != total:
            raise _Retry(f"connection closed at {size} of {total} bytes")
    except urllib.error.HTTPError as e:
        _http_error(url, e, part, have)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        # URLError covers refused connections and DNS; the others a connection dropped or timed out.
        raise _Retry(repr(e)) from None


def _response_span(url: str, resp: http.client.HTTPResponse, have: int) -> tuple[int, int | None]:
    """Where this response's body starts in the file, and the file's full size if the server says."""
    length = resp.headers.get("Content-Length")
    if resp.status == 206:
        match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        if match is None or int(match.group(1)) != have:
            raise _Retry(f"unexpected Content-Range {resp.headers.get('Content-Range')!r} for offset {have}")
        return have, None if match.group(3) == "*" else int(match.group(3))
    if resp.status == 200:
        return 0, int(length) if length and length.isdigit() else None
    raise FetchError(f"{url}: unexpected HTTP status {resp.status}")


def _stream(
    url: str, resp: http.client.HTTPResponse, part: Path, start: int, cfg: FetchConfig, deadline: float
) -> None:
    with part.open("r+b" if start else "wb") as f:
        f.truncate(start)  # a 200 restarts the file; a 206 continues it exactly where it asked
        f.seek(start)
        size = start
        while chunk := resp.read(cfg.chunk_bytes):
            size += len(chunk)
            if size > cfg.max_bytes:
                f.close()
                part.unlink()
                raise FetchError(f"{url}: more than the limit of {cfg.max_bytes} bytes")
            if time.monotonic() > deadline:
                raise FetchError(f"{url}: not done after {cfg.total_timeout_s:.0f} s")
            f.write(chunk)


def _http_error(url: str, e: urllib.error.HTTPError, part: Path, have: int) -> None:
    e.close()
    if e.code == 416 and have:
        # The range starts at or past the end: the part is whole (a crash before the rename) or longer
        # than the file now is. Check the hash as if whole; a wrong one is deleted and fetched again.
        total = _CONTENT_RANGE_TOTAL.match(e.headers.get("Content-Range", "") or "")
        if total is not None and int(total.group(1)) == have:
            return
        part.unlink()
        raise _Retry("range not satisfiable; starting over")
    if e.code in (408, 429) or e.code >= 500:
        raise _Retry(f"HTTP {e.code} {e.reason}")
    raise FetchError(f"{url}: HTTP {e.code} {e.reason}")
