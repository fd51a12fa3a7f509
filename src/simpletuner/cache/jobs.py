"""The generic caching job: batched, resumable, split across ranks, halving on out-of-memory.

`run_cache_job` knows nothing about images or captions: a `WorkItem` carries a key
and a payload, `load(payload)` turns the payload into one encoder input (it may
fail: the sample is then recorded with its reason and skipped), `collate` makes a
batch and `encode_fn(batch)` returns a dict of tensors whose first dimension is the
batch (or a list of per-sample dicts). `latents.py` and `text.py` are thin layers
over it; model families supply `encode_fn`.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import groupby
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Iterator, Sequence

from simpletuner.cache.store import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_ENTRIES, CorruptEntry, TensorStore
from simpletuner.data.storage import is_transient
from simpletuner.errors import UserError
from simpletuner.log import get_logger

if TYPE_CHECKING:
    import torch

logger = get_logger(__name__)

Entry = dict[str, "torch.Tensor"]
EncodeFn = Callable[[Any], "dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]]"]


@dataclass(frozen=True)
class WorkItem:
    """One entry to produce: its key, what `load` needs, and which items it may batch with."""

    key: str
    payload: Any
    group: Hashable = None  # items batch only within a group (e.g. one target size)
    source: str = ""  # named in failure reports


@dataclass(frozen=True)
class Failure:
    key: str
    source: str
    reason: str
    transient: bool = False  # a connection or service error (worth a later try), not a bad file


@dataclass
class CacheSummary:
    """What a job did. `already_cached` were hits; `other_ranks` belong to other processes."""

    kind: str
    total: int = 0
    already_cached: int = 0
    encoded: int = 0
    other_ranks: int = 0
    failed: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    final_batch_size: int = 0

    def __str__(self) -> str:
        text = (f"{self.kind}: {self.total} unique, {self.already_cached} already cached, "
                f"{self.encoded} encoded in {self.seconds:.1f}s")
        if self.other_ranks:
            text += f", {self.other_ranks} left to other ranks"
        if self.failed:
            text += f", {len(self.failed)} FAILED and skipped:"
            text += "".join(f"\n  {f.source or f.key}: {f.reason}" for f in self.failed[:20])
            if len(self.failed) > 20:
                text += f"\n  ... and {len(self.failed) - 20} more (see the store's failures/ folder)"
        return text


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(error, oom) or (isinstance(error, RuntimeError) and "out of memory" in str(error))


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else torch.distributed's when it is initialised, else (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def belongs_to(key: str, rank: int, world_size: int) -> bool:
    """Disjoint, stable split of keys across ranks (independent of item order)."""
    return int(key[:8], 16) % world_size == rank


def split_batch(output: Any, size: int) -> list[Entry]:
    """Per-sample entries from an encoder's batched dict (or list of dicts)."""
    if isinstance(output, dict):
        for name, tensor in output.items():
            if tensor.ndim == 0 or tensor.shape[0] != size:
                raise ValueError(f"encoder output {name!r} has shape {tuple(tensor.shape)}; "
                                 f"its first dimension must be the batch size {size}")
        host = {name: tensor.detach().to("cpu") for name, tensor in output.items()}
        return [{name: tensor[i] for name, tensor in host.items()} for i in range(size)]
    entries = list(output)
    if len(entries) != size:
        raise ValueError(f"encoder returned {len(entries)} entries for a batch of {size}")
    return [{name: t.detach().to("cpu") for name, t in entry.items()} for entry in entries]


class _HalvingEncoder:
    """Encodes batches; on out-of-memory halves the batch (and all later ones) and retries."""

    def __init__(self, encode_fn: EncodeFn, collate: Callable[[list], Any], batch_size: int):
        self.encode_fn, self.collate, self.batch_size = encode_fn, collate, batch_size

    def __call__(self, items: list[WorkItem], inputs: list) -> tuple[list[tuple[WorkItem, Entry]], list[Failure]]:
        try:
            return list(zip(items, split_batch(self.encode_fn(self.collate(inputs)), len(items)))), []
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            _release_memory()
            if len(items) == 1:
                return [], [Failure(items[0].key, items[0].source, "out of memory at batch size 1")]
            half = len(items) // 2
            if half < self.batch_size:
                logger.warning("out of memory at batch size %d: halving to %d", len(items), half)
                self.batch_size = half
        done, failed = self(items[:half], inputs[:half])
        done2, failed2 = self(items[half:], inputs[half:])
        return done + done2, failed + failed2


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _loaded(items: Iterable[WorkItem], load: Callable[[Any], Any], workers: int) -> Iterator[tuple]:
    """(item, input, error) in order, loading a bounded window ahead on worker threads."""
    it = iter(items)
    if workers <= 0:
        for item in it:
            try:
                yield item, load(item.payload), None
            except Exception as error:  # noqa: BLE001 - any decode failure skips the sample
                yield item, None, error
        return
    with ThreadPoolExecutor(workers) as pool:
        window: deque = deque()
        for item in it:
            window.append((item, pool.submit(load, item.payload)))
            if len(window) >= workers * 4:
                yield _settle(*window.popleft())
        while window:
            yield _settle(*window.popleft())


def _settle(item: WorkItem, future: Any) -> tuple:
    try:
        return item, future.result(), None
    except Exception as error:  # noqa: BLE001
        return item, None, error


def _batches(stream: Iterator[tuple], encoder: _HalvingEncoder, failed: list[Failure]) -> Iterator[tuple[list, list]]:
    """Batches of loaded items within one group, sized by the encoder's current batch size."""
    for _group, members in groupby(stream, key=lambda loaded: loaded[0].group):
        items, inputs = [], []
        for item, value, error in members:
            if error is not None:
                failed.append(Failure(item.key, item.source, f"{type(error).__name__}: {error}", is_transient(error)))
                logger.warning("skipping %s: %s", item.source or item.key, error)
                continue
            items.append(item)
            inputs.append(value)
            if len(items) >= encoder.batch_size:
                yield items, inputs
                items, inputs = [], []
        if items:
            yield items, inputs


def run_cache_job(
    items: Iterable[WorkItem],
    store: TensorStore,
    encode_fn: EncodeFn,
    *,
    load: Callable[[Any], Any],
    collate: Callable[[list], Any],
    batch_size: int = 8,
    kind: str = "cache",
    unit: str = "it",
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 2,
    progress: bool = True,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    shard_entries: int = DEFAULT_SHARD_ENTRIES,
) -> CacheSummary:
    """Encode every item this rank owns that the store lacks, and store it.

    Resumable: entries already in the store are skipped, and entries finished before
    an interruption (an exception, Ctrl-C) are committed on the way out. When
    torch.distributed is initialised all ranks wait for each other at the end, and
    every rank's store then sees every rank's entries.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    rank, world_size = rank_and_world(rank, world_size)
    unique = list({item.key: item for item in items}.values())
    summary = CacheSummary(kind, total=len(unique))
    store.refresh()
    mine = [item for item in unique if belongs_to(item.key, rank, world_size)]
    summary.other_ranks = len(unique) - len(mine)
    cached = store.contains_many([item.key for item in mine])
    todo = [item for item, hit in zip(mine, cached) if not hit]
    summary.already_cached = len(mine) - len(todo)
    todo.sort(key=lambda item: str(item.group))  # stable: keeps order inside a group
    encoder = _HalvingEncoder(encode_fn, collate, batch_size)
    desc = f"caching {kind}" + (f" [rank {rank}]" if world_size > 1 else "")
    bar = tqdm(total=len(todo), desc=desc, unit=unit, disable=not progress or not todo, dynamic_ncols=True)
    writer = store.writer(f"{kind}-rank{rank}", shard_bytes=shard_bytes, shard_entries=shard_entries)
    try:
        with writer:
            for batch_items, inputs in _batches(_loaded(todo, load, num_workers), encoder, summary.failed):
                done, failed = encoder(batch_items, inputs)
                for item, entry in done:
                    writer.put(item.key, entry)
                summary.encoded += len(done)
                summary.failed += failed
                bar.update(len(batch_items))
            bar.update(len(todo) - bar.n)
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - start
        summary.final_batch_size = encoder.batch_size
        store.record_failures(writer.id, [f.__dict__ for f in summary.failed])
    _barrier()
    store.refresh()
    if summary.failed:
        logger.warning("%s", summary)
    return summary


def _barrier() -> None:
    """Wait for the job's other processes. One that died (a node lost mid-cache) fails the wait with one line;
    this process's part is committed by then."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.barrier()
    except RuntimeError as error:  # torch's DistError is a RuntimeError; gloo says "Connection closed by peer"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"another process of this cache job stopped before it finished ({reason}); this "
                        "process's entries are committed: run `simpletuner cache` again to encode the rest") from None


class LazyCache:
    """Get-or-encode-and-put: for training without a caching pass first.

    A miss is encoded on the spot with `encode_fn`, stored, and returned; later
    reads (and later runs) hit. A stored entry that fails its checks (`CorruptEntry`)
    is encoded again the same way, with a warning; if its source cannot be loaded
    either, a `UserError` names `cache verify --repair`. An item whose `load` fails
    is recorded in `failed` (key, source, reason), gets None, and is not tried again
    by this cache.
    Call `close()` (or use `with`) to commit.
    """

    def __init__(
        self,
        store: TensorStore,
        encode_fn: EncodeFn,
        *,
        load: Callable[[Any], Any],
        collate: Callable[[list], Any],
        writer_name: str = "lazy",
        shard_entries: int = DEFAULT_SHARD_ENTRIES,
    ):
        self.store, self.encode_fn, self.load, self.collate = store, encode_fn, load, collate
        self.writer = store.writer(writer_name, shard_entries=shard_entries)
        self.hits = 0
        self.misses = 0
        self.failed: dict[str, Failure] = {}
        self.corrupt: dict[str, CorruptEntry] = {}  # keys whose stored entry failed its checks, encoded again

    def _cached(self, item: WorkItem) -> Entry | None:
        if item.key in self.writer:
            return self.writer.get(item.key)
        if item.key not in self.store:
            return None
        try:
            return self.store.get(item.key)
        except CorruptEntry as error:
            logger.warning("%s; encoding it again from %s (run `simpletuner cache verify --repair CONFIG` "
                           "to drop the bad entries)", error, item.source or "its source")
            self.corrupt[item.key] = error
            return None

    def get_many(self, items: Sequence[WorkItem]) -> list[Entry | None]:
        """Entries for `items` (None for those that fail to load), encoding the misses together in one batch."""
        found: dict[str, Entry] = {}
        missing: dict[str, WorkItem] = {}
        for item in items:
            if item.key in found or item.key in missing or item.key in self.failed:
                continue
            entry = self._cached(item)
            if entry is None:
                missing[item.key] = item
            else:
                found[item.key] = entry
        self.hits += len(found)
        if missing:
            self.misses += len(missing)
            loaded, inputs = [], []
            for item in missing.values():
                try:
                    inputs.append(self.load(item.payload))
                    loaded.append(item)
                except Exception as error:  # noqa: BLE001 - a sample that fails to load is recorded, not fatal
                    if item.key in self.corrupt:  # nothing to encode it from again: the store must be repaired
                        raise UserError(f"{self.corrupt[item.key]}, and its source {item.source} cannot be read "
                                        f"({type(error).__name__}: {error}): run `simpletuner cache verify --repair "
                                        "CONFIG` to drop the bad entries, then run again") from None
                    self.failed[item.key] = Failure(item.key, item.source, f"{type(error).__name__}: {error}",
                                                    is_transient(error))
                    logger.warning("skipping %s: %s", item.source or item.key, error)
            if loaded:
                for item, entry in zip(loaded, split_batch(self.encode_fn(self.collate(inputs)), len(loaded))):
                    self.writer.put(item.key, entry)
                    found[item.key] = entry
        return [found.get(item.key) for item in items]

    def get(self, item: WorkItem) -> Entry | None:
        return self.get_many([item])[0]

    def close(self) -> None:
        self.writer.close()
        self.store.refresh()
        if self.failed:
            self.store.record_failures(self.writer.id, [f.__dict__ for f in self.failed.values()])

    def __enter__(self) -> "LazyCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
