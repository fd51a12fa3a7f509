"""Caching jobs on real image files: hits and misses, resume, failures, OOM halving, ranks, lazy."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from simpletuner.cache.jobs import LazyCache, WorkItem, belongs_to, run_cache_job
from simpletuner.cache.keys import EncoderIdentity, text_key
from simpletuner.cache.latents import (
    cache_latents,
    latent_items,
    lazy_latents,
    load_pixels,
    prepare_image,
    sample_latent,
)
from simpletuner.cache.store import TensorStore
from simpletuner.cache.text import cache_texts, lazy_texts
from simpletuner.data.records import ImagePlan, ImageRecord

VAE = EncoderIdentity("tiny/vae", "vae", "float32", settings={"sample": "dist"})
TEXT = EncoderIdentity("tiny/clip", "text_encoder", "float32", settings={"max_length": 8})


class PoolingVAE:
    """A deterministic stand-in encoder (8x average pooling) that counts what it encodes."""

    def __init__(self, fail_above: int | None = None, error: type = torch.OutOfMemoryError,
                 stop_after: int | None = None):
        self.calls, self.samples, self.fail_above, self.error, self.stop_after = [], 0, fail_above, error, stop_after

    def __call__(self, pixels: torch.Tensor) -> dict:
        if self.fail_above is not None and pixels.shape[0] > self.fail_above:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.stop_after is not None and self.samples >= self.stop_after:
            raise KeyboardInterrupt
        self.calls.append(pixels.shape[0])
        self.samples += pixels.shape[0]
        mean = torch.nn.functional.avg_pool2d(pixels, 8)
        return {"mean": mean, "std": torch.full_like(mean, 0.1)}


def make_dataset(root, sizes):
    root.mkdir(parents=True, exist_ok=True)
    records, plans = [], []
    for i, (w, h) in enumerate(sizes):
        path = root / f"img{i:03d}.png"
        vertical = Image.linear_gradient("L")
        horizontal = vertical.transpose(Image.Transpose.ROTATE_90)
        Image.merge("RGB", (vertical, horizontal, vertical)).resize((w, h)).save(path)
        stat = os.stat(path)
        records.append(ImageRecord(path.name, stat.st_size, stat.st_mtime, w, h))
        side = min(w, h) // 16 * 16
        plans.append(ImagePlan((w, h), (w, h), (0, 0, side, side), (side, side)))
    return records, plans


@pytest.fixture
def dataset(tmp_path):
    sizes = [(64, 64), (80, 64), (64, 96), (48, 48)] * 3
    records, plans = make_dataset(tmp_path / "images", sizes)
    return str(tmp_path / "images"), records, plans


def test_cache_then_rerun_is_all_hits(dataset, tmp_path):
    location, records, plans = dataset
    store = TensorStore(str(tmp_path / "cache"))
    items = latent_items(location, records, plans, VAE)
    encoder = PoolingVAE()
    summary = cache_latents(items, store, encoder, batch_size=4, progress=False)
    assert (summary.encoded, summary.already_cached, summary.failed) == (12, 0, [])
    assert all(size <= 4 for size in encoder.calls)
    entry = store.get(items[0].key)
    assert entry["mean"].shape == (3, 8, 8) and entry["std"].shape == (3, 8, 8)
    expected = torch.nn.functional.avg_pool2d(load_pixels(items[0].source, plans[0])[None], 8)[0]
    assert torch.allclose(entry["mean"], expected)

    again = PoolingVAE()
    summary = cache_latents(latent_items(location, records, plans, VAE), TensorStore(store.url), again,
                            progress=False)
    assert (summary.encoded, summary.already_cached, again.calls) == (0, 12, [])


def test_each_changed_component_is_a_miss(dataset, tmp_path):
    location, records, plans = dataset
    store = TensorStore(str(tmp_path / "cache"))
    cache_latents(latent_items(location, records, plans, VAE), store, PoolingVAE(), progress=False)

    def rerun(records=records, plans=plans, encoder_id=VAE, location=location, flip=False):
        counting = PoolingVAE()
        cache_latents(latent_items(location, records, plans, encoder_id, flip=flip), store, counting,
                      progress=False)
        return counting.samples

    touched = [dataclasses.replace(records[0], mtime=records[0].mtime + 1)] + records[1:]
    assert rerun(records=touched) == 1
    resized = [dataclasses.replace(plans[1], resized_size=(81, 64))] + plans[1:]
    assert rerun(plans=[plans[0]] + resized[:1] + plans[2:]) == 1
    recropped = [dataclasses.replace(plans[2], crop_box=(0, 16, 64, 80))]
    assert rerun(plans=plans[:2] + recropped + plans[3:]) == 1
    assert rerun(flip=True) == 12  # the mirrored images are new entries
    assert rerun(encoder_id=dataclasses.replace(VAE, dtype="bfloat16")) == 12
    assert rerun(encoder_id=dataclasses.replace(VAE, revision="v2")) == 12
    assert rerun(encoder_id=dataclasses.replace(VAE, settings={"sample": "dist", "tiling": True})) == 12
    assert rerun() == 0


def test_flipped_image_is_its_own_entry(dataset, tmp_path):
    location, records, plans = dataset
    store = TensorStore(str(tmp_path / "cache"))
    items = latent_items(location, records[:1], plans[:1], VAE, flip=True)
    assert len(items) == 2 and items[0].key != items[1].key and items[1].flip
    cache_latents(items, store, PoolingVAE(), progress=False)
    plain, mirrored = store.get(items[0].key)["mean"], store.get(items[1].key)["mean"]
    assert torch.allclose(mirrored, torch.flip(plain, dims=[-1]))
    assert not torch.allclose(mirrored, plain)


def test_prepare_image_resizes_crops_flips_and_honours_exif(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # blue band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: displayed turned 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    plan = ImagePlan((20, 40), (10, 20), (0, 4, 10, 14), (10, 10))
    pixels = load_pixels(str(path), plan)
    assert pixels.shape == (3, 10, 10) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    full = load_pixels(str(path), ImagePlan((20, 40), (20, 40), (0, 0, 20, 40), (20, 40)))
    assert full.shape == (3, 40, 20)  # portrait once EXIF is applied
    assert full[2, :5].mean() > 0.5 and full[0, :5].mean() < 0  # the blue band is now on top
    flipped = prepare_image(Image.open(path), plan, flip=True)
    assert torch.equal(flipped, torch.flip(pixels, dims=[-1]))


def test_corrupt_images_are_recorded_and_skipped(dataset, tmp_path):
    location, records, plans = dataset
    good = open(os.path.join(location, records[0].path), "rb").read()
    open(os.path.join(location, records[1].path), "wb").write(b"not an image at all")
    open(os.path.join(location, records[2].path), "wb").write(good[: len(good) // 2])
    store = TensorStore(str(tmp_path / "cache"))
    summary = cache_latents(latent_items(location, records, plans, VAE), store, PoolingVAE(), progress=False)
    assert summary.encoded == 10 and len(summary.failed) == 2
    assert {os.path.basename(f.source) for f in summary.failed} == {records[1].path, records[2].path}
    assert "FAILED and skipped" in str(summary) and records[1].path in str(summary)
    assert all(f.reason for f in summary.failed)
    assert {os.path.basename(f["source"]) for f in store.failures()} == {records[1].path, records[2].path}


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError])
def test_out_of_memory_halves_the_batch(dataset, tmp_path, error):
    location, records, plans = dataset
    store = TensorStore(str(tmp_path / "cache"))
    encoder = PoolingVAE(fail_above=1, error=error)
    sizes = [(64, 64)] * 9
    records, plans = make_dataset(tmp_path / "same", sizes)
    summary = cache_latents(latent_items(str(tmp_path / "same"), records, plans, VAE), store, encoder,
                            batch_size=8, progress=False)
    assert summary.encoded == 9 and summary.failed == [] and summary.final_batch_size == 1
    assert set(encoder.calls) == {1}


def test_out_of_memory_at_batch_size_one_fails_the_sample(dataset, tmp_path):
    location, records, plans = dataset
    store = TensorStore(str(tmp_path / "cache"))
    summary = cache_latents(latent_items(location, records[:3], plans[:3], VAE), store,
                            PoolingVAE(fail_above=0), batch_size=2, progress=False)
    assert summary.encoded == 0 and len(summary.failed) == 3
    assert all("out of memory" in f.reason for f in summary.failed)


def test_other_errors_are_not_swallowed(dataset, tmp_path):
    location, records, plans = dataset
    store = TensorStore(str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="the batch size"):
        cache_latents(latent_items(location, records, plans, VAE), store,
                      lambda px: {"mean": px[:1], "std": px[:1]}, batch_size=2, progress=False)


def test_interrupted_job_resumes_with_only_the_rest(dataset, tmp_path):
    location, records, plans = dataset
    store = TensorStore(str(tmp_path / "cache"))
    items = latent_items(location, records, plans, VAE)
    first = PoolingVAE(stop_after=5)
    with pytest.raises(KeyboardInterrupt):
        cache_latents(items, store, first, batch_size=1, progress=False)
    assert first.samples == 5
    reader = TensorStore(store.url)
    assert len(reader) == 5  # what was finished before the interruption is committed
    second = PoolingVAE()
    summary = cache_latents(items, reader, second, batch_size=1, progress=False)
    assert second.samples == 7 and summary.already_cached == 5 and len(reader) == 12


def test_ranks_encode_disjoint_parts(dataset, tmp_path):
    location, records, plans = dataset
    store = TensorStore(str(tmp_path / "cache"))
    items = latent_items(location, records, plans, VAE)
    encoders = [PoolingVAE(), PoolingVAE()]
    summaries = [cache_latents(items, store, encoders[r], rank=r, world_size=2, progress=False) for r in range(2)]
    assert encoders[0].samples + encoders[1].samples == 12
    assert [e.samples for e in encoders] == [sum(belongs_to(i.key, r, 2) for i in items) for r in range(2)]
    assert summaries[0].other_ranks == encoders[1].samples
    assert len(store) == 12


def fake_text_encoder(counter):
    def encode(captions):
        counter.extend(captions)
        n = len(captions)
        lengths = torch.tensor([min(len(c), 8) for c in captions])
        mask = torch.arange(8)[None] < lengths[:, None]
        return {
            "prompt_embeds": torch.randn(n, 8, 16).to(torch.bfloat16),
            "pooled_prompt_embeds": torch.tensor([[float(len(c))] for c in captions]),
            "attention_mask": mask,
            "input_ids": torch.arange(8).repeat(n, 1),
        }
    return encode


def test_text_entries_are_deduplicated_and_include_the_empty_caption(tmp_path):
    store = TensorStore(str(tmp_path / "text"))
    seen = []
    captions = ["a cat", "a dog", "a cat", "a bird"]
    summary = cache_texts(captions, store, fake_text_encoder(seen), TEXT, batch_size=2, progress=False)
    assert sorted(seen) == ["", "a bird", "a cat", "a dog"] and summary.encoded == 4
    entry = store.get(text_key("a dog", TEXT))
    assert entry["attention_mask"].dtype == torch.bool and entry["attention_mask"].sum() == 5
    assert entry["pooled_prompt_embeds"].item() == 5.0
    assert entry["prompt_embeds"].dtype == torch.bfloat16 and entry["input_ids"].dtype == torch.int64
    assert text_key("", TEXT) in store
    seen.clear()
    assert cache_texts(captions + ["a fish"], store, fake_text_encoder(seen), TEXT, progress=False).encoded == 1
    assert seen == ["a fish"]
    longer = dataclasses.replace(TEXT, settings={"max_length": 77})
    seen.clear()
    cache_texts(captions, store, fake_text_encoder(seen), longer, progress=False)
    assert len(seen) == 4


def test_lazy_cache_encodes_misses_once_and_stores_them(dataset, tmp_path):
    location, records, plans = dataset
    store = TensorStore(str(tmp_path / "cache"))
    items = [item.work() for item in latent_items(location, records[:3], plans[:3], VAE)]
    encoder = PoolingVAE()
    with lazy_latents(store, encoder) as lazy:
        first = lazy.get_many(items[:2])
        assert encoder.samples == 2 and lazy.misses == 2
        again = lazy.get(items[0])  # pending in the writer, not yet committed
        assert torch.equal(again["mean"], first[0]["mean"]) and encoder.samples == 2
        lazy.get(items[2])
    assert len(TensorStore(store.url)) == 3
    with lazy_latents(TensorStore(store.url), encoder) as lazy:
        lazy.get_many(items)
        assert lazy.hits == 3 and encoder.samples == 3

    seen = []
    with lazy_texts(TensorStore(str(tmp_path / "t")), fake_text_encoder(seen), TEXT) as texts:
        out = texts.embeddings(["x", "yy", "x"])
        assert seen == ["x", "yy"] and out[0]["pooled_prompt_embeds"].item() == 1.0


def test_sample_latent_draws_fresh_latents_from_the_distribution():
    entry = {"mean": torch.zeros(4, 16, 16, dtype=torch.bfloat16), "std": torch.full((4, 16, 16), 2.0)}
    a = sample_latent(entry, torch.Generator().manual_seed(1))
    b = sample_latent(entry, torch.Generator().manual_seed(2))
    again = sample_latent(entry, torch.Generator().manual_seed(1))
    assert a.dtype == torch.bfloat16 and a.shape == (4, 16, 16)
    assert torch.equal(a, again) and not torch.equal(a, b)
    assert 1.7 < float(a.float().std()) < 2.3
    assert sample_latent(entry, dtype=torch.float32).dtype == torch.float32


def test_real_tiny_vae_through_the_job(dataset, tmp_path):
    from diffusers import AutoencoderKL

    from simpletuner.cache.keys import weight_hash
    from simpletuner.cache.latents import latent_entry

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=32).eval()
    identity = EncoderIdentity("tiny/vae", "vae", "float32", weight_hash=weight_hash(vae))

    @torch.no_grad()
    def encode(pixels):
        return latent_entry(vae.encode(pixels).latent_dist)

    location, records, plans = dataset
    store = TensorStore(str(tmp_path / "cache"))
    items = latent_items(location, records[:4], plans[:4], identity)
    assert cache_latents(items, store, encode, batch_size=2, progress=False).encoded == 4
    entry = store.get(items[0].key)
    side = plans[0].target_size[0]
    assert entry["mean"].shape == (4, side // 2, side // 2) and torch.all(entry["std"] > 0)
    latent = sample_latent(entry, torch.Generator().manual_seed(0))
    assert latent.shape == entry["mean"].shape and not torch.equal(latent, entry["mean"])
    pair = latent_entry((entry["mean"], entry["std"]))
    assert pair["mean"] is entry["mean"] and pair["std"] is entry["std"]


TORCHRUN_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from simpletuner.cache.keys import EncoderIdentity, text_key
    from simpletuner.cache.store import TensorStore
    from simpletuner.cache.text import cache_texts
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    enc = EncoderIdentity("tiny", "text_encoder", "float32")
    captions = [f"caption {i}" for i in range(40)]
    seen = []
    def encode(batch):
        seen.extend(batch)
        return {"pooled": torch.tensor([[float(len(c))] for c in batch])}
    store = TensorStore(sys.argv[1])
    summary = cache_texts(captions, store, encode, enc, batch_size=4, progress=False, shard_entries=5)
    assert len(store) == 41, len(store)  # every rank sees every rank's entries after the job
    assert all(text_key(c, enc) in store for c in captions + [""])
    with open(f"{sys.argv[1]}.rank{rank}", "w") as f:  # stdout lines of two ranks can interleave
        f.write(f"{len(seen)} {summary.other_ranks}")
    dist.destroy_process_group()
    """
)


def test_two_ranks_over_gloo_fill_one_store(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(TORCHRUN_SCRIPT)
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(tmp_path / "store")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    counts = {rank: tuple(map(int, (tmp_path / f"store.rank{rank}").read_text().split())) for rank in (0, 1)}
    assert counts[0][0] + counts[1][0] == 41 and counts[0][0] == counts[1][1]
    assert TensorStore(str(tmp_path / "store")).keys().__len__() == 41


def test_generic_job_with_plain_work_items(tmp_path):
    store = TensorStore(str(tmp_path))
    items = [WorkItem(f"{i:032x}", i, group=i % 2) for i in range(10)]
    batches = []

    def encode(batch):
        batches.append(list(batch))
        return [{"v": torch.tensor([v * 2])} for v in batch]

    summary = run_cache_job(items, store, encode, load=lambda v: v, collate=list, batch_size=3, progress=False)
    assert summary.encoded == 10
    assert all(len({v % 2 for v in batch}) == 1 for batch in batches)  # batches stay within a group
    assert store.get(f"{7:032x}")["v"].item() == 14
    assert isinstance(LazyCache(store, encode, load=lambda v: v, collate=list).get(items[3])["v"], torch.Tensor)


# ---- high bit depth ---------------------------------------------------------------------------------
def test_16_bit_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    from bad_inputs import gradient16, gray16_png, rgb48_png

    plan = ImagePlan((64, 64), (64, 64), (0, 0, 64, 64), (64, 64))
    expected = torch.from_numpy((gradient16() / 65535 * 255).round()).float() / 127.5 - 1
    gray16_png(tmp_path / "gray.png")
    pixels = load_pixels(str(tmp_path / "gray.png"), plan)
    assert (pixels >= 1.0).float().mean() < 0.05  # Pillow's convert() alone makes 99.6% of it white
    for channel in range(3):
        assert torch.allclose(pixels[channel], expected, atol=1 / 127.5)
    rgb48_png(tmp_path / "rgb.png")
    pixels = load_pixels(str(tmp_path / "rgb.png"), plan)
    assert torch.allclose(pixels[0], expected, atol=1 / 127.5)
    assert torch.allclose(pixels[1], expected.flip(-1), atol=1 / 127.5)
    half = torch.from_numpy((gradient16() // 2 / 65535 * 255).round()).float() / 127.5 - 1
    assert torch.allclose(pixels[2], half, atol=1 / 127.5)


def test_32_bit_integer_and_float_images_are_scaled(tmp_path):
    from PIL import Image

    from simpletuner.cache.latents import to_8bit

    values = np.linspace(0, 65535, 16).reshape(4, 4)
    assert np.asarray(to_8bit(Image.fromarray(values.astype(np.int32), "I"))).max() == 255
    floats = to_8bit(Image.fromarray((values / 65535).astype(np.float32), "F"))
    assert floats.mode == "L" and np.asarray(floats)[0, 0] == 0 and np.asarray(floats)[-1, -1] == 255


def _corrupt_last_entry(store_dir) -> None:
    (shard,) = store_dir.glob("shards/*.shard")
    data = bytearray(shard.read_bytes())
    data[-8] ^= 0xFF  # the last entry's tensor bytes
    shard.write_bytes(bytes(data))


def _elsewhere(item: WorkItem, source: str) -> WorkItem:
    """The same key, read from another file."""
    return dataclasses.replace(item, payload=dataclasses.replace(item.payload, source=source))


def test_lazy_cache_encodes_corrupt_entries_again(dataset, tmp_path, caplog):
    location, records, plans = dataset
    store = TensorStore(str(tmp_path / "cache"))
    items = [item.work() for item in latent_items(location, records[:3], plans[:3], VAE)]
    encoder = PoolingVAE()
    with lazy_latents(store, encoder) as lazy:
        good = lazy.get_many(items)
    _corrupt_last_entry(tmp_path / "cache")
    with caplog.at_level("WARNING"), lazy_latents(TensorStore(store.url), encoder) as lazy:
        again = lazy.get_many(items)
        assert len(lazy.corrupt) == 1 and encoder.samples == 4  # the one corrupt entry, encoded again
    assert all(torch.equal(a["mean"], b["mean"]) for a, b in zip(again, good))
    assert "checksum mismatch" in caplog.text and "cache verify --repair" in caplog.text


def test_lazy_cache_records_failed_loads_and_stops_on_a_corrupt_entry_without_source(dataset, tmp_path):
    from simpletuner.errors import UserError

    location, records, plans = dataset
    store = TensorStore(str(tmp_path / "cache"))
    items = [item.work() for item in latent_items(location, records[:3], plans[:3], VAE)]
    encoder = PoolingVAE()
    with lazy_latents(store, encoder) as lazy:
        lazy.get_many(items[:2])
        missing = _elsewhere(items[2], str(tmp_path / "gone.png"))
        assert lazy.get_many([missing, items[0]])[0] is None  # not stored: recorded, None, not retried
        assert lazy.failed[missing.key].reason.startswith("FileNotFoundError")
        assert not lazy.failed[missing.key].transient
        assert lazy.get(missing) is None and encoder.samples == 2
    assert [f["key"] for f in TensorStore(store.url).failures()] == [missing.key]
    _corrupt_last_entry(tmp_path / "cache")
    stored = [item for item in items[:2] if not _reads(store.url, item.key)]
    assert len(stored) == 1
    with lazy_latents(TensorStore(store.url), encoder) as lazy:
        with pytest.raises(UserError, match="is corrupt .checksum mismatch.*cache verify --repair"):
            lazy.get(_elsewhere(stored[0], str(tmp_path / "gone.png")))


def _reads(url: str, key: str) -> bool:
    from simpletuner.cache.store import CorruptEntry

    try:
        TensorStore(url).get(key)
    except CorruptEntry:
        return False
    return True
