"""A sharded tensor store: many entries per shard file, a compact binary manifest, mmap reads.

Layout of a store at LOCATION (a local folder or s3://bucket/prefix):

    shards/<writer>-<seq>.shard      entries, back to back, each self-describing
    manifest/<writer>-<seq>.seg      index of one shard (written after the shard)
    manifest/compact-<id>.seg        index of many shards (prune, repair), naming the
                                     segments it replaces
    failures/<writer>.json           samples a caching job could not encode, with reasons

An entry is a dict of named tensors addressed by a 32-hex-digit key (see `keys.py`);
the byte layout of entries and segments is in `format.py`; verify, prune, repair and
garbage collection in `maintenance.py`.

Why this design:
- Writers never touch each other's files: a writer names its shards and segments by
  its own random id, so any number of processes (ranks) write into one store.
- A shard is written under a temporary name and renamed (or PUT whole on S3); its
  segment is written the same way only afterwards. A reader sees a shard only
  through a segment, so an interrupted write leaves a valid store; the orphan shard
  is reported by `verify` and removed by `collect_garbage`.
- Reading an entry is a binary search in sorted uint64 arrays and one copy out of a
  memory-mapped shard (tens of microseconds), and a manifest of a million entries is
  about 40 MB of numpy arrays.
- Readers see the manifest as of `open`/`refresh()`; entries are immutable once
  written, so concurrent readers need no locks.
- A reader checks each entry's length and CRC-32 (kept in the manifest) on its first
  read of it and raises `CorruptEntry` on a mismatch; a full disk while writing is one
  `CacheDiskFull` (a UserError), and the partial shard is deleted.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import uuid
import zlib
from collections import OrderedDict
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

from simpletuner.cache.format import (
    DEFAULT_SHARD_BYTES, DEFAULT_SHARD_ENTRIES, FAILURES, MANIFEST, SEGMENT_SUFFIX, SHARD_SUFFIX, SHARDS, Manifest,
    Segment, decode_entry, encode_entry, key_bytes,
)
from simpletuner.cache.location import TEMP_PREFIX, Location
from simpletuner.errors import UserError
from simpletuner.log import get_logger

if TYPE_CHECKING:
    import torch

logger = get_logger(__name__)
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class CorruptEntry(Exception):
    """An entry whose bytes do not match its manifest row (checksum, length, header, or a missing shard)."""

    def __init__(self, store: str, key: str, shard: str, reason: str):
        super().__init__(f"cache {store}: entry {key} in {shard} is corrupt ({reason})")
        self.store, self.key, self.shard, self.reason = store, key, shard, reason


class CacheDiskFull(UserError):
    """No space left (or a file size limit) while writing a cache shard or segment."""


def read_segments(location: Location) -> tuple[list[Segment], dict[str, str]]:
    """Live segments (those not replaced by a compact one) and {name: error} of unreadable ones."""
    for _attempt in range(5):
        names = sorted(n for n in location.list(MANIFEST) if n.endswith(SEGMENT_SUFFIX))
        segments, bad = [], {}
        try:
            for name in names:
                try:
                    segments.append(Segment.from_bytes(name, location.read_bytes(f"{MANIFEST}/{name}")))
                except ValueError as error:
                    bad[name] = str(error)
        except FileNotFoundError:  # a compaction removed a segment while we listed: read again
            continue
        replaced = {r for seg in segments for r in seg.replaces}
        return [s for s in segments if s.name not in replaced], {k: v for k, v in bad.items() if k not in replaced}
    raise RuntimeError(f"manifest of {location.root} keeps changing while being read")


class TensorStore:
    """Read (and, through `writer()`, write) a sharded tensor store at a local or s3:// location.

    `mirror_dir`: for a remote store, shards are downloaded there on first read and
    memory-mapped; without it, each read is one ranged GET.
    """

    def __init__(
        self,
        location: str,
        *,
        storage_options: dict[str, Any] | None = None,
        mirror_dir: str | None = None,
        max_open_shards: int = 256,
    ):
        self.location = Location(location, storage_options)
        self.url = self.location.root
        self.mirror_dir = mirror_dir
        self.max_open_shards = max_open_shards
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()
        self.bad_segments: dict[str, str] = {}
        self.refresh()

    def __repr__(self) -> str:
        return f"TensorStore({self.url!r}, entries={len(self)})"

    def refresh(self) -> None:
        """Re-read the manifest: see what other writers have committed since."""
        segments, self.bad_segments = read_segments(self.location)
        for name, error in self.bad_segments.items():
            logger.warning("cache %s: ignoring unreadable manifest segment %s (%s)", self.url, name, error)
        self.segments = segments
        self.manifest = Manifest(segments)
        self._checked_rows = np.zeros(len(self.manifest), dtype=bool)  # rows whose bytes passed their checks

    def __len__(self) -> int:
        return len(self.manifest)

    def __contains__(self, key: str) -> bool:
        return self.manifest.find(key) >= 0

    def contains_many(self, keys: Sequence[str]) -> np.ndarray:
        """A boolean per key (vectorised; for filtering a job's work list)."""
        return self.manifest.contains_many(list(keys))

    def keys(self) -> list[str]:
        return self.manifest.keys()

    def get(self, key: str) -> dict[str, "torch.Tensor"]:
        """The entry's tensors (fresh CPU tensors). KeyError if the store has no such entry."""
        row = self.manifest.find(key)
        if row < 0:
            raise KeyError(key)
        return self._read_row(row)

    def _read_row(self, row: int) -> dict[str, "torch.Tensor"]:
        """The entry's tensors, its bytes checked against the manifest's length and CRC-32.

        Raises `CorruptEntry` for a shard that is missing or too short, a checksum
        mismatch or an unreadable header (the same checks as `cache verify`). The
        checksum is computed on the entry's first read by this reader only: entries
        are immutable once written, and later reads (the next epochs) skip it.
        """
        m = self.manifest
        shard, offset, length = m.shard_names[m.shard[row]], int(m.offset[row]), int(m.length[row])

        def corrupt(reason: str) -> CorruptEntry:
            return CorruptEntry(self.url, m.key_at(row), shard, reason)

        try:
            buffer = self._map(shard)
            if buffer is None:
                return self._checked(self.location.read_range(f"{SHARDS}/{shard}", offset, offset + length),
                                     row, corrupt)
        except FileNotFoundError:
            raise corrupt("shard missing") from None
        except ValueError as error:  # mmap of an emptied shard
            raise corrupt(f"shard unreadable: {error}") from None
        with memoryview(buffer) as whole, whole[offset : offset + length] as view:
            return self._checked(view, row, corrupt)

    def _checked(self, data: Any, row: int, corrupt: Any) -> dict[str, "torch.Tensor"]:
        length = int(self.manifest.length[row])
        if len(data) != length:
            raise corrupt(f"the shard ends {length - len(data)} bytes before the entry does")
        if not self._checked_rows[row]:
            if zlib.crc32(data) != int(self.manifest.crc[row]):
                raise corrupt("checksum mismatch")
            self._checked_rows[row] = True
        try:
            return decode_entry(data, 0)
        except (ValueError, TypeError, KeyError, RuntimeError, struct.error, UnicodeDecodeError) as error:
            raise corrupt(f"unreadable entry header: {error}") from None

    def read_raw(self, row: int) -> bytes:
        m = self.manifest
        shard, offset, length = m.shard_names[m.shard[row]], int(m.offset[row]), int(m.length[row])
        buffer = self._map(shard)
        if buffer is None:
            return self.location.read_range(f"{SHARDS}/{shard}", offset, offset + length)
        return bytes(buffer[offset : offset + length])

    def _map(self, shard: str) -> mmap.mmap | None:
        buffer = self._maps.get(shard)
        if buffer is not None:
            self._maps.move_to_end(shard)
            return buffer
        path = self.location.local_path(f"{SHARDS}/{shard}")
        if path is None:
            if self.mirror_dir is None:
                return None
            path = os.path.join(self.mirror_dir, shard)
            if not os.path.exists(path):
                os.makedirs(self.mirror_dir, exist_ok=True)
                temp = f"{path}.{uuid.uuid4().hex[:8]}.part"
                self.location.download(f"{SHARDS}/{shard}", temp)
                os.replace(temp, path)
        with open(path, "rb") as f:
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._maps[shard] = buffer
        while len(self._maps) > self.max_open_shards:
            self._maps.popitem(last=False)[1].close()
        return buffer

    def close(self) -> None:
        while self._maps:
            self._maps.popitem()[1].close()

    def __enter__(self) -> "TensorStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def writer(
        self,
        name: str = "w",
        *,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        shard_entries: int = DEFAULT_SHARD_ENTRIES,
    ) -> "ShardWriter":
        """A writer adding shards to this store; `name` (e.g. 'rank3') prefixes its files."""
        return ShardWriter(self.location, name, shard_bytes=shard_bytes, shard_entries=shard_entries)

    def record_failures(self, writer: str, failures: Sequence[Mapping[str, Any]]) -> None:
        """Keep what a job could not encode (key, source, reason) beside the store."""
        if failures:
            data = json.dumps(list(failures), indent=1).encode()
            try:
                self.location.write_bytes_atomic(f"{FAILURES}/{writer}.json", data)
            except OSError as error:  # e.g. the disk that stopped the job is full: the run's report still has them
                logger.warning("cache %s: could not record %d failure(s): %s", self.url, len(failures), error)

    def failures(self) -> list[dict]:
        out: list[dict] = []
        for name in sorted(self.location.list(FAILURES)):
            if name.endswith(".json") and not name.startswith(TEMP_PREFIX):
                out.extend(json.loads(self.location.read_bytes(f"{FAILURES}/{name}")))
        return out


class ShardWriter:
    """Appends entries to a shard of its own; `flush()` commits it (shard, then segment).

    Closing (or leaving the `with` block, even by an exception) commits what was put,
    so an interrupted job keeps every entry it finished.
    """

    def __init__(self, location: Location, name: str, *, shard_bytes: int, shard_entries: int):
        safe = "".join(c if c.isalnum() or c in "_." else "_" for c in name) or "w"
        self.id = f"{safe}-{uuid.uuid4().hex[:10]}"
        self.location = location
        self.shard_bytes = shard_bytes
        self.shard_entries = shard_entries
        self.committed = 0
        self._seq = 0
        self._file = None
        self._reset()

    def _reset(self) -> None:
        self._keys: list[bytes] = []
        self._offsets: list[int] = []
        self._lengths: list[int] = []
        self._crcs: list[int] = []
        self._pending: dict[str, int] = {}
        self._size = 0

    @property
    def shard_name(self) -> str:
        return f"{self.id}-{self._seq:06d}{SHARD_SUFFIX}"

    def _open(self) -> None:
        self._temp = self.location.temp_file_for(f"{SHARDS}/{self.shard_name}")
        self._file = open(self._temp, "w+b")

    def put(self, key: str, tensors: Mapping[str, "torch.Tensor"]) -> None:
        """Add one entry (a dict of named tensors) under `key`.

        On a full disk (or a file size limit) the uncommitted shard is deleted and
        `CacheDiskFull` is raised; the shards committed before stay valid.
        """
        raw_key = key_bytes(key)
        pieces = encode_entry(key, tensors)
        with self._disk_full_guard():
            if self._file is None:
                self._open()
            crc, length = 0, 0
            self._file.seek(self._size)
            for piece in pieces:
                crc = zlib.crc32(piece, crc)
                length += len(piece) if isinstance(piece, bytes) else piece.nbytes
                self._file.write(piece)
        self._pending[key] = len(self._keys)
        self._keys.append(raw_key)
        self._offsets.append(self._size)
        self._lengths.append(length)
        self._crcs.append(crc)
        self._size += length
        if self._size >= self.shard_bytes or len(self._keys) >= self.shard_entries:
            self.flush()

    def __contains__(self, key: str) -> bool:
        return key in self._pending

    def get(self, key: str) -> dict[str, "torch.Tensor"]:
        """An entry put but not yet committed."""
        i = self._pending[key]
        with self._disk_full_guard():
            self._file.flush()
        self._file.seek(self._offsets[i])
        data = self._file.read(self._lengths[i])
        return decode_entry(data, 0)

    @contextmanager
    def _disk_full_guard(self) -> Iterator[None]:
        """Turn 'no space left' (ENOSPC, EDQUOT, EFBIG) into one clear `CacheDiskFull`, dropping the partial shard."""
        try:
            yield
        except OSError as error:
            if error.errno not in _DISK_FULL:
                raise
            self._abandon()
            raise CacheDiskFull(
                f"cache {self.location.root}: {os.strerror(error.errno)} while writing a shard "
                f"({self.committed} entries committed by this writer are kept). Free space (or move cache_dir), "
                "then run again: it resumes from the entries already cached") from None

    def _abandon(self) -> None:
        """Delete the uncommitted shard (its entries are encoded again next time)."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # its buffered bytes could not be written either: the file goes anyway
                pass
            self._file = None
        if os.path.exists(self._temp):
            os.remove(self._temp)
        self._reset()

    def flush(self) -> None:
        """Commit the current shard: rename it into place, then write its segment."""
        if self._file is None:
            return
        with self._disk_full_guard():
            self._commit()

    def _commit(self) -> None:
        if not self._keys:
            self._file.close()
            os.remove(self._temp)
            self._file = None
            return
        self._file.truncate(self._size)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        shard = self.shard_name
        self.location.put_file_atomic(self._temp, f"{SHARDS}/{shard}")
        n = len(self._keys)
        segment = Segment(
            name=f"{self.id}-{self._seq:06d}{SEGMENT_SUFFIX}",
            shards=[shard],
            writer=self.id,
            replaces=[],
            keys=np.frombuffer(b"".join(self._keys), np.uint8).reshape(n, 16),
            shard=np.zeros(n, np.uint32),
            offset=np.array(self._offsets, np.uint64),
            length=np.array(self._lengths, np.uint64),
            crc=np.array(self._crcs, np.uint32),
        )
        self.location.write_bytes_atomic(f"{MANIFEST}/{segment.name}", segment.to_bytes())
        self.committed += n
        self._seq += 1
        self._reset()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
