"""Keeping a store sound: verify (checksums, sizes, headers), repair, prune, garbage collection."""

from __future__ import annotations

import struct
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from simpletuner.cache.format import FAILURES, MANIFEST, SEGMENT_SUFFIX, SHARD_SUFFIX, SHARDS, key_bytes, \
    parse_entry_header
from simpletuner.cache.location import TEMP_PREFIX
from simpletuner.cache.store import CorruptEntry, TensorStore, read_segments
from simpletuner.errors import UserError


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
                try:
                    entry = store._read_row(int(row))
                except CorruptEntry as error:
                    raise UserError(f"{error}: run `simpletuner cache verify --repair` first, then prune") from None
                writer.put(m.key_at(int(row)), entry)
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
