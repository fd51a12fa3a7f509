"""Caches of VAE latents and text embeddings: a sharded tensor store, content keys, caching jobs.

- `store`: `TensorStore` (sharded, mmap reads, atomic multi-writer), `verify`, `prune`, `repair`.
- `keys`: `SourceIdentity`, `Transform`, `EncoderIdentity`, `latent_key`, `text_key`.
- `jobs`: the generic batched/resumable/OOM-halving job and `LazyCache`.
- `latents` / `text`: image transform, `sample_latent`, `cache_latents`, `cache_texts`.

Import the submodules directly (this package imports nothing heavy itself).
"""
