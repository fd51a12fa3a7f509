"""Caches of VAE latents and text embeddings: a sharded tensor store, content keys, caching jobs.

- `store`: `TensorStore` (sharded, mmap reads, atomic multi-writer) and its `ShardWriter`.
- `format`: the bytes of entries and manifest segments; `maintenance`: `verify`, `repair`, `prune`,
  `collect_garbage`; `location`: local folder or s3:// with atomic writes.
- `keys`: `SourceIdentity`, `Transform`, `EncoderIdentity`, `latent_key`, `text_key`.
- `jobs`: the generic batched/resumable/OOM-halving job and `LazyCache`.
- `latents` / `text`: image transform, `sample_latent`, `cache_latents`, `cache_texts`.

Import the submodules directly (this package imports nothing heavy itself).
"""
