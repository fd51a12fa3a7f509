"""The on-disk format of a tensor store: entries inside shards, and manifest segments.

An entry is a dict of named tensors (any shape, dtypes in DTYPES) under a 32-hex-digit
key. In a shard an entry is

    b"STE1" | u32 header length | JSON header {key, tensors: [[name, dtype, shape, offset, nbytes]]}
    | padding | tensor bytes, each 64-byte aligned

A segment is `b"STSEG001" | u32 json length | u64 count | json {shards, writer, replaces} |
padding | keys (16 n bytes) | shard index (u32 n) | offset (u64 n) | length (u64 n) |
crc32 (u32 n) | u32 crc32 of all that precedes`. A `Manifest` is the union of segments
as sorted numpy arrays.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

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
        return cls(name, meta["shards"], meta.get("writer", ""), meta.get("replaces", []),
                   keys, shard, offset, length, crc)


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
