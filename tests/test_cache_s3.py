"""A cache location on S3 (a real moto server on 127.0.0.1): write, read, resume, verify, prune."""

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
