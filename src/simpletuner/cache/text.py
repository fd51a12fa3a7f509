"""Text embeddings: one entry per distinct caption (and the empty caption for dropout).

An entry holds every output the family needs, e.g. {"prompt_embeds",
"pooled_prompt_embeds", "attention_mask"}; the family's `encode_fn(captions)`
returns them batched along the first dimension.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from simpletuner.cache.jobs import CacheSummary, EncodeFn, LazyCache, WorkItem, run_cache_job
from simpletuner.cache.keys import EMPTY_CAPTION, EncoderIdentity, text_key

if TYPE_CHECKING:
    from simpletuner.cache.store import TensorStore


def text_items(captions: Iterable[str], encoder: EncoderIdentity, *, include_empty: bool = True) -> list[WorkItem]:
    """One item per distinct caption, plus the empty caption when `include_empty`."""
    unique = dict.fromkeys(captions)
    if include_empty:
        unique.setdefault(EMPTY_CAPTION)
    return [WorkItem(text_key(caption, encoder), caption, source=repr(caption[:60])) for caption in unique]


def _identity(caption: str) -> str:
    return caption


def cache_texts(
    captions: Iterable[str],
    store: "TensorStore",
    encode_fn: EncodeFn,
    encoder: EncoderIdentity,
    *,
    batch_size: int = 32,
    include_empty: bool = True,
    **job_options: Any,
) -> CacheSummary:
    """Encode the distinct captions the store lacks; `encode_fn(list_of_captions)` returns batched tensors.

    Look entries up with `store.get(text_key(caption, encoder))`. `job_options` go
    to `run_cache_job` (rank, world_size, progress, ...).
    """
    items = text_items(captions, encoder, include_empty=include_empty)
    job_options.setdefault("num_workers", 0)  # nothing to load: captions are the inputs
    return run_cache_job(items, store, encode_fn, load=_identity, collate=list, batch_size=batch_size,
                         kind="text", unit="caption", **job_options)


def lazy_texts(store: "TensorStore", encode_fn: EncodeFn, encoder: EncoderIdentity, **options: Any) -> "LazyTexts":
    return LazyTexts(store, encode_fn, encoder, **options)


class LazyTexts(LazyCache):
    """Text entries by caption, encoded and stored on a miss."""

    def __init__(self, store: "TensorStore", encode_fn: EncodeFn, encoder: EncoderIdentity, **options: Any):
        super().__init__(store, encode_fn, load=_identity, collate=list, writer_name="lazy-text", **options)
        self.encoder = encoder

    def embeddings(self, captions: list[str]) -> list[dict]:
        return self.get_many([WorkItem(text_key(c, self.encoder), c) for c in captions])
