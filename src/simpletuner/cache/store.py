"""A sharded tensor store: many entries per shard file, a compact binary manifest, mmap reads.

Layout of a store at LOCATION (a local folder or s3://bucket/prefix):

    shards/<writer>-<seq>.shard      entries, back to back, each self-describing
    manifest/<writer>-<seq>.seg      index of one shard (written after the shard)
    manifest/compact-<id>.seg        index of many shards (prune, repair), naming the
                                     segments it replaces
    failures/<writer>.json           samples a caching job could not encode, with reasons

An entry is a dict of named tensors (any shape, dtypes in DTYPES), addressed by a
32-hex-digit key (see `keys.py`). In a shard an entry is

    b"STE1" | u32 header length | JSON header {key, tensors: [[name, dtype, shape, offset, nbytes]]}
    | padding | tensor bytes, each 64-byte aligned

A segment is `b"STSEG001" | u32 json length | json {shards, writer, replaces} | padding |
keys (16 n bytes) | shard index (u32 n) | offset (u64 n) | length (u64 n) | crc32 (u32 n) |
u32 crc32 of all that precedes`.

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
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import time
import uuid
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from simpletuner.cache.location import TEMP_PREFIX, Location
from simpletuner.log import get_logger

if TYPE_CHECKING:
    import torch

logger = get_logger(__name__)

SHARDS = "shards"
MANIFEST = "manifest"
FAILURES = "failures"
SHARD_SUFFIX = ".shard"
SEGMENT_SUFFIX = ".seg"
ENTRY_MAGIC = b"STE1"
SEGMENT_MAGIC = b"STSEG001"
ALIGN = 64
DEFAULT_SHARD_BYTES = 256 * 1024 * 1024
DEFAULT_SHARD_ENTRIES = 2048

DTYPES = ("bfloat16", "float16", "float32", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


def _torch_dtype(name: str) -> "torch.dtype":
    import torch

    if name not in DTYPES:
        raise ValueError(f"unsupported tensor dtype {name!r} in cache entry; supported: {', '.join(DTYPES)}")
    return getattr(torch, name)


def key_bytes(key: str) -> bytes:
    """The 16 bytes of a 32-hex-digit key."""
    raw = bytes.fromhex(key)
    if len(raw) != 16:
        raise ValueError(f"cache key {key!r} is not 32 hex digits")
    return raw


def _split_key(key: str) -> tuple[int, int]:
    raw = key_bytes(key)
    return int.from_bytes(raw[:8], "big"), int.from_bytes(raw[8:], "big")


def _pad(n: int) -> int:
    return (-n) % ALIGN


# ----------------------------------------------------------------------------- entries


def encode_entry(key: str, tensors: Mapping[str, "torch.Tensor"]) -> list[bytes | memoryview]:
    """The byte pieces of one entry: magic, header, then 64-byte aligned tensor data.

    Tensor offsets in the header count from the start of the data area, which is
    the header's end rounded up to 64 bytes.
    """
    import torch

    arrays, specs, offset = [], [], 0
    for name, tensor in tensors.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise ValueError(f"cache entry {key}: tensor {name!r} has unsupported dtype {dtype}")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, np.uint8)
        specs.append([name, dtype, list(tensor.shape), offset, int(data.nbytes)])
        arrays.append(data)
        offset += data.nbytes + _pad(data.nbytes)
    header = json.dumps({"key": key, "tensors": specs}, separators=(",", ":")).encode()
    head = ENTRY_MAGIC + struct.pack("<I", len(header)) + header
    pieces: list[bytes | memoryview] = [head, b"\0" * _pad(len(head))]
    for data in arrays:
        pieces += [memoryview(data), b"\0" * _pad(data.nbytes)]
    return pieces


def parse_entry_header(buffer: Any, offset: int) -> tuple[dict, int]:
    """The entry's header and the absolute offset of its data area."""
    if bytes(buffer[offset : offset + 4]) != ENTRY_MAGIC:
        raise ValueError("entry magic missing")
    (length,) = struct.unpack_from("<I", buffer, offset + 4)
    header = json.loads(bytes(buffer[offset + 8 : offset + 8 + length]))
    return header, offset + 8 + length + _pad(8 + length)


def decode_entry(buffer: Any, offset: int) -> dict[str, "torch.Tensor"]:
    """Tensors of the entry at `offset` in `buffer` (copied out of it)."""
    import torch

    header, data_start = parse_entry_header(buffer, offset)
    out = {}
    for name, dtype, shape, rel, nbytes in header["tensors"]:
        if nbytes == 0:
            out[name] = torch.empty(shape, dtype=_torch_dtype(dtype))
            continue
        raw = np.frombuffer(buffer, dtype=np.uint8, count=nbytes, offset=data_start + rel).copy()
        out[name] = torch.from_numpy(raw).view(_torch_dtype(dtype)).reshape(shape)
    return out


# ----------------------------------------------------------------------------- manifest


@dataclass
class Segment:
    """One manifest file: which entries live where in which shards."""

    name: str
    shards: list[str]
    writer: str
    replaces: list[str]
    keys: np.ndarray  # (n, 16) uint8
    shard: np.ndarray  # (n,) uint32 index into `shards`
    offset: np.ndarray  # (n,) uint64
    length: np.ndarray  # (n,) uint64
    crc: np.ndarray  # (n,) uint32

    def to_bytes(self) -> bytes:
        meta = json.dumps({"shards": self.shards, "writer": self.writer, "replaces": self.replaces}).encode()
        head = SEGMENT_MAGIC + struct.pack("<IQ", len(meta), len(self.keys)) + meta
        head += b"\0" * ((-len(head)) % 8)
        body = b"".join(
            [
                head,
                np.ascontiguousarray(self.keys, np.uint8).tobytes(),
                self.shard.astype("<u4").tobytes(),
                self.offset.astype("<u8").tobytes(),
                self.length.astype("<u8").tobytes(),
                self.crc.astype("<u4").tobytes(),
            ]
        )
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, name: str, data: bytes) -> "Segment":
        if len(data) < 24 or data[:8] != SEGMENT_MAGIC:
            raise ValueError("not a manifest segment (bad magic or too short)")
        (stored,) = struct.unpack_from("<I", data, len(data) - 4)
        if zlib.crc32(data[:-4]) != stored:
            raise ValueError("manifest segment checksum mismatch")
        meta_len, n = struct.unpack_from("<IQ", data, 8)
        meta = json.loads(data[20 : 20 + meta_len])
        pos = 20 + meta_len
        pos += (-pos) % 8
        buf = memoryview(data)

        def take(dtype: str, count: int, width: int) -> np.ndarray:
            nonlocal pos
            arr = np.frombuffer(buf, dtype=dtype, count=count, offset=pos)
            pos += count * width
            return arr

        keys = take("u1", n * 16, 1).reshape(n, 16)
        shard, offset, length, crc = take("<u4", n, 4), take("<u8", n, 8), take("<u8", n, 8), take("<u4", n, 4)
        if pos != len(data) - 4:
            raise ValueError("manifest segment has the wrong size")
        return cls(name, meta["shards"], meta.get("writer", ""), meta.get("replaces", []), keys, shard, offset, length, crc)


class Manifest:
    """The union of segments: sorted (hi, lo) uint64 key halves and where each entry lives."""

    def __init__(self, segments: Sequence[Segment]):
        names: dict[str, int] = {}
        parts = []
        for seg in segments:
            local_to_global = np.array([names.setdefault(s, len(names)) for s in seg.shards] or [0], dtype=np.uint32)
            parts.append((seg.keys, local_to_global[seg.shard], seg.offset, seg.length, seg.crc))
        self.shard_names = list(names)
        if parts:
            keys = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
            cols = [np.concatenate([p[i] for p in parts]) if len(parts) > 1 else parts[0][i] for i in range(1, 5)]
        else:
            keys = np.zeros((0, 16), np.uint8)
            cols = [np.zeros(0, t) for t in (np.uint32, np.uint64, np.uint64, np.uint32)]
        halves = np.ascontiguousarray(keys).view(">u8").reshape(-1, 2)
        hi, lo = halves[:, 0].astype(np.uint64), halves[:, 1].astype(np.uint64)
        if len(hi) > 1 and not (np.all(hi[1:] > hi[:-1])):
            order = np.argsort(hi)
            if not np.all(hi[order][1:] > hi[order][:-1]):  # shared high halves: order by both
                order = np.lexsort((lo, hi))
            hi, lo = hi[order], lo[order]
            cols = [c[order] for c in cols]
            keep = np.ones(len(hi), bool)
            keep[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
            if not keep.all():  # the same key from two writers: entries are equivalent, keep one
                hi, lo = hi[keep], lo[keep]
                cols = [c[keep] for c in cols]
        self.hi, self.lo = hi, lo
        self.shard, self.offset, self.length, self.crc = cols

    def __len__(self) -> int:
        return len(self.hi)

    def find(self, key: str) -> int:
        """Row of `key`, or -1."""
        hi, lo = map(np.uint64, _split_key(key))  # numpy scalars: a Python int above 2**63 is slow
        i = int(np.searchsorted(self.hi, hi))
        while i < len(self.hi) and self.hi[i] == hi:
            if self.lo[i] == lo:
                return i
            i += 1
        return -1

    def contains_many(self, keys: Sequence[str]) -> np.ndarray:
        if not keys:
            return np.zeros(0, bool)
        raw = np.frombuffer(b"".join(key_bytes(k) for k in keys), dtype=">u8").reshape(-1, 2).astype(np.uint64)
        hi, lo = raw[:, 0], raw[:, 1]
        left = np.searchsorted(self.hi, hi, side="left")
        right = np.searchsorted(self.hi, hi, side="right")
        found = np.zeros(len(keys), bool)
        single = right - left == 1
        found[single] = self.lo[left[single]] == lo[single]
        for i in np.nonzero(right - left > 1)[0]:  # 64-bit prefix collisions: vanishingly rare
            found[i] = bool(np.any(self.lo[left[i] : right[i]] == lo[i]))
        return found

    def key_at(self, row: int) -> str:
        return int(self.hi[row]).to_bytes(8, "big").hex() + int(self.lo[row]).to_bytes(8, "big").hex()

    def keys(self) -> list[str]:
        both = np.stack([self.hi, self.lo], axis=1).astype(">u8")
        return [both[i].tobytes().hex() for i in range(len(both))]

    def key_array(self) -> np.ndarray:
        """(n, 16) uint8 key bytes."""
        return np.stack([self.hi, self.lo], axis=1).astype(">u8").view(np.uint8).reshape(-1, 16)

    def segment(self, name: str, writer: str, replaces: list[str], rows: np.ndarray | None = None) -> Segment:
        """These rows (all by default) as one segment."""
        rows = np.arange(len(self)) if rows is None else rows
        used, shard = np.unique(self.shard[rows], return_inverse=True)
        return Segment(
            name, [self.shard_names[i] for i in used], writer, replaces,
            self.key_array()[rows], shard.astype(np.uint32), self.offset[rows], self.length[rows], self.crc[rows],
        )


# ----------------------------------------------------------------------------- store


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
        m = self.manifest
        shard, offset, length = m.shard_names[m.shard[row]], int(m.offset[row]), int(m.length[row])
        buffer = self._map(shard)
        if buffer is None:
            return decode_entry(self.location.read_range(f"{SHARDS}/{shard}", offset, offset + length), 0)
        return decode_entry(buffer, offset)

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
            self.location.write_bytes_atomic(f"{FAILURES}/{writer}.json", data)

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
        """Add one entry (a dict of named tensors) under `key`."""
        raw_key = key_bytes(key)
        if self._file is None:
            self._open()
        pieces = encode_entry(key, tensors)
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
        self._file.flush()
        self._file.seek(self._offsets[i])
        data = self._file.read(self._lengths[i])
        return decode_entry(data, 0)

    def flush(self) -> None:
        """Commit the current shard: rename it into place, then write its segment."""
        if self._file is None:
            return
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


# ----------------------------------------------------------------------------- maintenance


@dataclass
class VerifyReport:
    """What `verify` found. `ok` when nothing is corrupt or missing."""

    location: str
    entries: int = 0
    shards: int = 0
    bad_entries: list[tuple[str, str, str]] = field(default_factory=list)  # (key, shard, reason)
    missing_shards: list[str] = field(default_factory=list)
    bad_segments: dict[str, str] = field(default_factory=dict)
    orphan_files: list[str] = field(default_factory=list)  # shards no segment names, temporaries

    @property
    def ok(self) -> bool:
        return not (self.bad_entries or self.missing_shards or self.bad_segments)

    def summary(self) -> str:
        lines = [f"cache {self.location}: {self.entries} entries in {self.shards} shards"]
        if self.missing_shards:
            lines.append(f"  {len(self.missing_shards)} missing shard(s): {', '.join(self.missing_shards[:5])}")
        if self.bad_entries:
            lines.append(f"  {len(self.bad_entries)} corrupt or missing entr(y/ies):")
            lines += [f"    {key} in {shard}: {reason}" for key, shard, reason in self.bad_entries[:10]]
            if len(self.bad_entries) > 10:
                lines.append(f"    ... and {len(self.bad_entries) - 10} more")
        for name, error in self.bad_segments.items():
            lines.append(f"  unreadable manifest segment {name}: {error}")
        if self.orphan_files:
            lines.append(f"  {len(self.orphan_files)} unreferenced file(s) (left by interrupted writes)")
        lines.append("  OK" if self.ok else "  PROBLEMS FOUND (run with --repair to drop bad entries; "
                     "the next cache run re-encodes them)")
        return "\n".join(lines)


def _check_entry(store: TensorStore, row: int, shard_size: int) -> str | None:
    m = store.manifest
    offset, length = int(m.offset[row]), int(m.length[row])
    if offset + length > shard_size:
        return f"entry runs past the end of the shard (needs {offset + length} bytes, shard has {shard_size})"
    data = store.read_raw(row)
    if zlib.crc32(data) != int(m.crc[row]):
        return "checksum mismatch"
    try:
        header, data_start = parse_entry_header(data, 0)
    except (ValueError, UnicodeDecodeError, struct.error) as error:
        return f"unreadable entry header ({error})"
    if header.get("key") != m.key_at(row):
        return f"entry holds key {header.get('key')} instead"
    if any(data_start + spec[3] + spec[4] > len(data) for spec in header.get("tensors", [])):
        return "entry header points past the entry's end"
    return None


def verify(store: TensorStore, *, progress: bool = False) -> VerifyReport:
    """Check every segment, shard and entry (sizes, checksums, headers); list orphans."""
    from tqdm.auto import tqdm

    store.refresh()
    m = store.manifest
    report = VerifyReport(store.url, entries=len(m), shards=len(m.shard_names), bad_segments=dict(store.bad_segments))
    files = store.location.list(SHARDS)
    referenced = set(m.shard_names)
    report.orphan_files = sorted(f"{SHARDS}/{n}" for n in files if n not in referenced)
    order = np.argsort(m.shard, kind="stable")
    for row in tqdm(order, desc="verify", unit="entry", disable=not progress):
        shard = m.shard_names[m.shard[row]]
        if shard not in files:
            if shard not in report.missing_shards:
                report.missing_shards.append(shard)
            report.bad_entries.append((m.key_at(int(row)), shard, "shard missing"))
            continue
        reason = _check_entry(store, int(row), files[shard])
        if reason:
            report.bad_entries.append((m.key_at(int(row)), shard, reason))
    store.close()
    return report


def _rewrite_manifest(store: TensorStore, keep: np.ndarray, writer: str = "compact") -> None:
    """Replace every current segment by one segment of the kept rows (atomic for readers)."""
    old = [s.name for s in store.segments] + list(store.bad_segments)
    name = f"compact-{uuid.uuid4().hex[:10]}{SEGMENT_SUFFIX}"
    segment = store.manifest.segment(name, writer, old, np.nonzero(keep)[0])
    store.location.write_bytes_atomic(f"{MANIFEST}/{name}", segment.to_bytes())
    for seg in old:
        store.location.delete(f"{MANIFEST}/{seg}")


@dataclass
class PruneReport:
    removed_entries: int
    kept_entries: int
    deleted_shards: int
    rewritten_shards: int

    def summary(self) -> str:
        return (f"removed {self.removed_entries} entries, kept {self.kept_entries}; "
                f"deleted {self.deleted_shards} shard(s), rewrote {self.rewritten_shards}")


def prune(store: TensorStore, live_keys: Iterable[str], *, rewrite_dead_fraction: float = 0.0) -> PruneReport:
    """Remove every entry whose key is not in `live_keys`.

    Shards holding only dead entries are deleted; shards whose dead bytes exceed
    `rewrite_dead_fraction` of them are rewritten with their live entries. Run it
    while no job writes to or trains from the store.
    """
    store.refresh()
    m = store.manifest
    live_set = {key_bytes(k) for k in live_keys}
    rows_keys = m.key_array()
    live = np.fromiter((rows_keys[i].tobytes() in live_set for i in range(len(m))), bool, count=len(m))
    shard_ids = np.arange(len(m.shard_names))
    total = np.bincount(m.shard, weights=m.length, minlength=len(shard_ids))
    dead = np.bincount(m.shard[~live], weights=m.length[~live], minlength=len(shard_ids))
    rewrite = (dead > 0) & (dead < total) & (dead > rewrite_dead_fraction * total)
    keep = live & ~rewrite[m.shard]
    rows_to_copy = np.nonzero(live & rewrite[m.shard])[0]
    if rows_to_copy.size:
        with store.writer("prune") as writer:
            for row in rows_to_copy:
                writer.put(m.key_at(int(row)), store._read_row(int(row)))
        # the copies' segments are new and so survive the rewrite below
    store.close()
    _rewrite_manifest(store, keep, writer="prune")
    still_used = set(np.unique(m.shard[keep]).tolist())
    deleted = 0
    for i, name in enumerate(m.shard_names):
        if i not in still_used and store.location.delete(f"{SHARDS}/{name}"):
            deleted += 1
    store.refresh()
    return PruneReport(int((~live).sum()), int(live.sum()), deleted - int(rewrite.sum()), int(rewrite.sum()))


def repair(store: TensorStore, report: VerifyReport, *, orphan_min_age_s: float = 3600.0) -> int:
    """Drop the bad entries `verify` found from the manifest and collect garbage.

    Returns the number of entries dropped; the next caching run re-encodes them.
    """
    bad = {key for key, _shard, _reason in report.bad_entries}
    store.refresh()
    m = store.manifest
    keep = np.ones(len(m), bool)
    if bad:
        keep = np.array([m.key_at(i) not in bad for i in range(len(m))], bool)
    if bad or store.bad_segments:
        _rewrite_manifest(store, keep, writer="repair")
        for shard in set(m.shard_names) - {m.shard_names[i] for i in np.unique(m.shard[keep])}:
            store.location.delete(f"{SHARDS}/{shard}")
    collect_garbage(store, min_age_s=orphan_min_age_s)
    store.refresh()
    return int((~keep).sum())


def collect_garbage(store: TensorStore, *, min_age_s: float = 3600.0) -> list[str]:
    """Delete shards no segment names and leftover temporaries older than `min_age_s`.

    The age guard spares a writer that has just renamed a shard and is about to
    write its segment, and temporaries being written right now.
    """
    segments, _bad = read_segments(store.location)
    referenced = {s for seg in segments for s in seg.shards}
    now = time.time()
    removed = []
    for folder in (SHARDS, MANIFEST, FAILURES):
        for name in store.location.list(folder):
            path = f"{folder}/{name}"
            orphan = folder == SHARDS and name.endswith(SHARD_SUFFIX) and name not in referenced
            if (orphan or name.startswith(TEMP_PREFIX)) and now - store.location.mtime(path) >= min_age_s:
                if store.location.delete(path):
                    removed.append(path)
    return removed
