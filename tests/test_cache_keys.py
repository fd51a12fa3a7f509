"""Cache keys: every component that shapes an entry changes the key; nothing else does."""

import dataclasses

import pytest
import torch

from simpletuner.cache.keys import (
    EncoderIdentity,
    SourceIdentity,
    Transform,
    latent_key,
    stable_hash,
    text_key,
    weight_hash,
)

SOURCE = SourceIdentity("/data/set", "a/b.jpg", 12345, 1_700_000_000.25)
TRANSFORM = Transform((1024, 768), (0, 0, 1024, 768), False)
VAE = EncoderIdentity("stabilityai/sdxl-vae", "vae", "bfloat16", revision="main", settings={"sample": "dist"})
TEXT = EncoderIdentity("sdxl", "text_encoder", "float16", settings={"max_length": 77, "attention_mask": "none"})


@pytest.mark.parametrize(
    "changed",
    [
        dataclasses.replace(SOURCE, location="s3://bucket/set"),
        dataclasses.replace(SOURCE, path="a/c.jpg"),
        dataclasses.replace(SOURCE, size=12346),
        dataclasses.replace(SOURCE, mtime=1_700_000_000.5),
        dataclasses.replace(SOURCE, content_hash="ab" * 16),
    ],
)
def test_source_identity_changes_the_key(changed):
    assert latent_key(changed, TRANSFORM, VAE) != latent_key(SOURCE, TRANSFORM, VAE)


@pytest.mark.parametrize(
    "changed",
    [
        dataclasses.replace(TRANSFORM, resized_size=(1025, 768)),
        dataclasses.replace(TRANSFORM, crop_box=(1, 0, 1025, 768)),
        dataclasses.replace(TRANSFORM, flip=True),
    ],
)
def test_transform_changes_the_key(changed):
    assert latent_key(SOURCE, changed, VAE) != latent_key(SOURCE, TRANSFORM, VAE)


@pytest.mark.parametrize(
    "changed",
    [
        dataclasses.replace(VAE, model="madebyollin/sdxl-vae-fp16-fix"),
        dataclasses.replace(VAE, revision="abc123"),
        dataclasses.replace(VAE, weight_hash="00" * 16),
        dataclasses.replace(VAE, component="vae_2"),
        dataclasses.replace(VAE, dtype="float32"),
        dataclasses.replace(VAE, settings={"sample": "mode"}),
        dataclasses.replace(VAE, settings={"sample": "dist", "tiling": True}),
    ],
)
def test_encoder_identity_changes_the_key(changed):
    assert latent_key(SOURCE, TRANSFORM, changed) != latent_key(SOURCE, TRANSFORM, VAE)
    assert text_key("a cat", changed) != text_key("a cat", VAE)


@pytest.mark.parametrize(
    "settings",
    [{"max_length": 256, "attention_mask": "none"}, {"max_length": 77, "attention_mask": "zeroed"}],
)
def test_text_settings_and_caption_change_the_key(settings):
    assert text_key("a cat", dataclasses.replace(TEXT, settings=settings)) != text_key("a cat", TEXT)
    assert text_key("a cat ", TEXT) != text_key("a cat", TEXT)
    assert text_key("", TEXT) != text_key(" ", TEXT)


def test_keys_are_stable_and_order_independent():
    same = EncoderIdentity("sdxl", "text_encoder", "float16",
                           settings={"attention_mask": "none", "max_length": 77})
    assert text_key("a cat", same) == text_key("a cat", TEXT)
    assert latent_key(SourceIdentity("/data/set", "a/b.jpg", 12345, 1_700_000_000.25), TRANSFORM, VAE) == \
        latent_key(SOURCE, TRANSFORM, VAE)
    # pinned: a change of hashing would silently invalidate every cache, so make it loud
    assert stable_hash({"b": 1, "a": [1, 2]}) == stable_hash({"a": [1, 2], "b": 1})
    assert len(text_key("x", TEXT)) == 32 and int(text_key("x", TEXT), 16) >= 0
    assert EncoderIdentity("m", "vae", torch.bfloat16).digest() == EncoderIdentity("m", "vae", "bfloat16").digest()


def test_weight_hash_follows_the_weights():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    before = weight_hash(conv)
    assert weight_hash(conv) == before
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] += 1e-3
    assert weight_hash(conv) != before
    assert weight_hash(conv.to(torch.float16)) != weight_hash(conv.float())
