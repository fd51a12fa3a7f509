"""A cache location on S3 (a real moto server on 127.0.0.1): write, read, resume, verify, prune."""

import pytest
import torch

from s3server import ACCESS_KEY, REGION, SECRET_KEY
from simpletuner.cache.keys import EncoderIdentity
from simpletuner.cache.format import SHARDS
from simpletuner.cache.maintenance import collect_garbage, prune, verify
from simpletuner.cache.store import TensorStore
from simpletuner.cache.text import cache_texts


def options(server) -> dict:
    return {"key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": server.endpoint,
            "client_kwargs": {"region_name": REGION}, "skip_instance_cache": True}


def key(i: int) -> str:
    return f"{i:032x}"


def test_s3_store_round_trip_verify_and_prune(s3_server, tmp_path):
    s3_server.make_bucket("cache-store")
    url = "s3://cache-store/runs/vae"
    store = TensorStore(url, storage_options=options(s3_server))
    assert len(store) == 0
    for rank in range(2):  # two writers, one store
        with store.writer(f"rank{rank}", shard_entries=3) as writer:
            for i in range(rank, 10, 2):
                writer.put(key(i), {"mean": torch.full((4, 8, 8), float(i)).bfloat16(), "n": torch.tensor([i])})
    store.refresh()
    assert len(store) == 10
    assert store.get(key(7))["n"].item() == 7  # ranged GET
    mirrored = TensorStore(url, storage_options=options(s3_server), mirror_dir=str(tmp_path / "mirror"))
    assert torch.all(mirrored.get(key(4))["mean"] == 4.0)  # downloaded once, then memory-mapped
    assert any(p.suffix == ".shard" for p in (tmp_path / "mirror").iterdir())
    report = verify(store)
    assert report.ok and report.entries == 10

    fs = s3_server.filesystem()
    shard = sorted(fs.ls(f"cache-store/runs/vae/{SHARDS}"))[0]
    data = bytearray(fs.cat_file(shard))
    data[-5] ^= 0xFF
    fs.pipe_file(shard, bytes(data))
    report = verify(store)
    assert not report.ok and report.bad_entries and all(r == "checksum mismatch" for _k, _s, r in report.bad_entries)

    result = prune(store, [key(i) for i in range(0, 10, 3)])
    assert result.kept_entries == 4 and sorted(store.keys()) == [key(i) for i in (0, 3, 6, 9)]
    assert collect_garbage(store, min_age_s=0) == []


def test_s3_text_cache_job_resumes(s3_server):
    s3_server.make_bucket("cache-text")
    store = TensorStore("s3://cache-text/text", storage_options=options(s3_server))
    encoder = EncoderIdentity("tiny", "text_encoder", "float32", settings={"max_length": 4})
    seen = []

    def encode(captions):
        seen.extend(captions)
        if len(seen) > 6:
            raise KeyboardInterrupt
        return {"pooled": torch.tensor([[float(len(c))] for c in captions])}

    captions = [f"caption number {i}" for i in range(12)]
    try:
        cache_texts(captions, store, encode, encoder, batch_size=2, progress=False, shard_entries=2)
    except KeyboardInterrupt:
        pass
    first = len(TensorStore(store.url, storage_options=options(s3_server)))
    assert first == 6
    seen.clear()

    def encode_rest(captions):
        seen.extend(captions)
        return {"pooled": torch.tensor([[float(len(c))] for c in captions])}

    summary = cache_texts(captions, store, encode_rest, encoder, batch_size=4, progress=False)
    assert summary.already_cached == 6 and len(seen) == 13 - 6 and len(store) == 13


# ---- an S3 outage while latents are encoded on demand ------------------------------------------------
def test_open_image_reads_s3_through_the_retry_policy(s3_server, tmp_path):
    """`open_image` retries connection errors with the policy's backoff, then raises (bounded)."""
    import socket

    from PIL import Image

    from simpletuner.cache.latents import open_image
    from simpletuner.data.storage import RetryPolicy

    s3_server.make_bucket("open-image")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    s3_server.put("open-image", {"a.png": (tmp_path / "a.png").read_bytes()})
    assert open_image("s3://open-image/a.png", options(s3_server)).getpixel((0, 0)) == (1, 2, 3)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    sleeps: list[float] = []
    down = {**options(s3_server), "endpoint_url": f"http://127.0.0.1:{closed}"}
    with pytest.raises(Exception) as caught:
        open_image("s3://open-image/a.png", down, RetryPolicy(attempts=4, base_delay=0.01, sleep=sleeps.append))
    assert len(sleeps) == 3  # four attempts, backoff between them
    from simpletuner.data.storage import is_transient

    assert is_transient(caught.value)


@pytest.mark.slow
def test_s3_outage_during_on_demand_caching_stops_with_one_line(tmp_path, tiny_model):
    """A dataset on a real S3 server that goes away mid-run: the batch's reads retry, fail, and the run
    stops with one DataError line (exit 2 through the CLI) instead of skipping every image; the same
    when the outage begins before caching up front."""
    import json
    import random
    import time

    from moto.server import ThreadedMotoServer

    from s3server import S3Server
    from simpletuner.config.load import load_settings
    from simpletuner.data.sampler import MultiDatasetSampler, SamplerDataset
    from simpletuner.demo.dataset import write_dataset
    from simpletuner.errors import DataError
    from simpletuner.models.registry import get_family
    from simpletuner.train.data import TrainingData
    from train_helpers import write_run

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    server = S3Server(f"http://{host}:{port}")
    server.make_bucket("outage")
    local = write_dataset(tmp_path / "local", count=8)
    server.put("outage", {f"set/{p.name}": p.read_bytes() for p in local.iterdir()})
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", dataset=local, vae_cache_ondemand=True)
    backends = json.loads((tmp_path / "multidatabackend.json").read_text())
    del backends[0]["instance_data_dir"]
    backends[0].update(server.dataset_fields("outage", "set"))
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))

    settings = load_settings(str(config), [])
    family = get_family("sd1x")
    components = family.load(settings.training)
    data = TrainingData.prepare(settings, family, components)
    data.ensure_cached(family, components, vae_batch_size=2, progress=False, on_demand=True)
    up_front = TrainingData.prepare(settings, family, components)  # scanned now; cached after the outage begins
    sampler = MultiDatasetSampler.from_config(
        settings.training, [SamplerDataset.from_config(settings.datasets[0], data.datasets["shapes"].assignment)])
    batch = data.batch(next(sampler), family, components, random.Random(0))  # the server is up: read and encoded
    assert batch["latent_mean"].shape[0] == 2
    moto.stop()  # the outage: connections are refused from now on
    started = time.perf_counter()
    with pytest.raises(DataError) as caught:
        data.batch(next(sampler), family, components, random.Random(0), refill=sampler)
    assert time.perf_counter() - started < 60  # bounded retries
    message = str(caught.value)
    assert "looks unreachable" in message and "s3://" in message and "\n" not in message
    assert {entry.stage for entry in data.skipped} == {"train"} and len(data.skipped) == 2
    with pytest.raises(DataError) as caught:  # caching up front: every read fails after retries
        up_front.ensure_cached(family, components, vae_batch_size=2, progress=False)
    assert "looks unreachable" in str(caught.value) and "\n" not in str(caught.value)

