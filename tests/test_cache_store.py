"""The sharded tensor store: round trips, atomicity, several writers, verify, prune, repair."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from simpletuner.cache.format import MANIFEST, SHARDS, Manifest, Segment, decode_entry, encode_entry
from simpletuner.cache.maintenance import collect_garbage, prune, repair, verify
from simpletuner.cache.store import CacheDiskFull, CorruptEntry, TensorStore


def key(i: int) -> str:
    return f"{i:032x}"


def entry(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    return {
        "mean": torch.randn(4, 8, 8, generator=g).to(torch.bfloat16),
        "half": torch.randn(3, 5, generator=g).to(torch.float16),
        "full": torch.randn(7, generator=g),
        "ids": torch.arange(i, i + 5, dtype=torch.int64),
        "mask": torch.arange(6) % 2 == 0,
        "scalar": torch.tensor(float(i)),
    }


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def fill(store: TensorStore, indices, shard_entries=4, name="w"):
    with store.writer(name, shard_entries=shard_entries) as writer:
        for i in indices:
            writer.put(key(i), entry(i))
    store.refresh()


def test_round_trip_of_mixed_dtypes_and_shapes(tmp_path):
    store = TensorStore(str(tmp_path / "c"))
    fill(store, range(10))
    assert len(store) == 10
    for i in range(10):
        assert key(i) in store
        assert_same(store.get(key(i)), entry(i))
    assert key(99) not in store
    with pytest.raises(KeyError):
        store.get(key(99))
    assert list(store.contains_many([key(3), key(99)])) == [True, False]
    # a fresh reader sees the same
    assert_same(TensorStore(str(tmp_path / "c")).get(key(7)), entry(7))


def test_many_entries_make_few_files(tmp_path):
    store = TensorStore(str(tmp_path))
    with store.writer("w", shard_entries=2048) as writer:
        tiny = {"x": torch.zeros(2, dtype=torch.float16)}
        for i in range(20_000):
            writer.put(key(i), tiny)
    store.refresh()
    assert len(store) == 20_000
    files = sum(len(files) for _root, _dirs, files in os.walk(tmp_path))
    assert files <= 2 * (20_000 // 2048 + 1)


def test_returned_tensors_are_writable_copies(tmp_path):
    store = TensorStore(str(tmp_path))
    fill(store, [1])
    got = store.get(key(1))
    got["full"].add_(1)  # must not touch the mapped shard
    assert_same(store.get(key(1)), entry(1))


def test_uncommitted_shard_is_invisible_and_collected(tmp_path):
    store = TensorStore(str(tmp_path))
    fill(store, range(3))
    writer = store.writer("crashy", shard_entries=100)
    writer.put(key(50), entry(50))
    writer._file.flush()  # written to its temporary file, never committed (process "dies" here)
    reader = TensorStore(str(tmp_path))
    assert len(reader) == 3 and key(50) not in reader
    # a shard renamed into place whose segment was never written: ignored too
    (tmp_path / SHARDS / "ghost-000000.shard").write_bytes(b"garbage")
    reader.refresh()
    assert len(reader) == 3
    report = verify(reader)
    assert report.ok and f"{SHARDS}/ghost-000000.shard" in report.orphan_files
    removed = collect_garbage(reader, min_age_s=0)
    assert f"{SHARDS}/ghost-000000.shard" in removed
    assert not any(name.startswith(".tmp-") for name in os.listdir(tmp_path / SHARDS))
    assert verify(reader).orphan_files == []
    fill(reader, [4])
    assert len(reader) == 4


def test_writer_commits_on_exception(tmp_path):
    store = TensorStore(str(tmp_path))
    with pytest.raises(RuntimeError):
        with store.writer("w", shard_entries=100) as writer:
            writer.put(key(1), entry(1))
            writer.put(key(2), entry(2))
            raise RuntimeError("interrupted")
    store.refresh()
    assert len(store) == 2


def test_pending_entries_are_readable_from_the_writer(tmp_path):
    store = TensorStore(str(tmp_path))
    with store.writer("w", shard_entries=100) as writer:
        writer.put(key(1), entry(1))
        assert key(1) in writer
        assert_same(writer.get(key(1)), entry(1))


def test_duplicate_keys_from_two_writers_collapse(tmp_path):
    store = TensorStore(str(tmp_path))
    fill(store, range(5), name="a")
    fill(store, range(3, 8), name="b")
    assert len(store) == 8
    assert sorted(store.keys()) == [key(i) for i in range(8)]


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from simpletuner.cache.store import TensorStore
    root, rank = sys.argv[1], int(sys.argv[2])
    store = TensorStore(root)
    with store.writer(f"rank{rank}", shard_entries=7) as writer:
        for i in range(rank, 200, 2):
            writer.put(f"{i:032x}", {"x": torch.full((4, 16, 16), float(i)).bfloat16(), "i": torch.tensor([i])})
            if i % 20 == 0:
                store.refresh()  # reading while the other process writes
    """
)


def test_two_processes_write_one_consistent_store(tmp_path):
    root = str(tmp_path / "shared")
    script = tmp_path / "writer.py"
    script.write_text(WRITER_SCRIPT)
    procs = [subprocess.Popen([sys.executable, str(script), root, str(r)]) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    store = TensorStore(root)
    assert len(store) == 200
    for i in range(200):
        got = store.get(key(i))
        assert got["i"].item() == i and torch.all(got["x"] == float(i))
    report = verify(store)
    assert report.ok and report.entries == 200 and not report.orphan_files
    segments = os.listdir(tmp_path / "shared" / MANIFEST)
    assert {name.split("-")[0] for name in segments} == {"rank0", "rank1"}


@pytest.fixture
def three_shards(tmp_path):
    store = TensorStore(str(tmp_path))
    fill(store, range(12), shard_entries=4)
    return store, sorted((tmp_path / SHARDS).iterdir())


def test_verify_detects_truncated_shard(three_shards):
    store, shards = three_shards
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    report = verify(store)
    assert not report.ok
    assert len(report.bad_entries) == 2  # the two entries of the lost half
    assert all(shards[1].name == shard for _k, shard, _r in report.bad_entries)
    assert all("past the end" in reason for _k, _s, reason in report.bad_entries)
    assert "PROBLEMS" in report.summary()


def test_verify_detects_flipped_bytes(three_shards):
    store, shards = three_shards
    data = bytearray(shards[0].read_bytes())
    data[len(data) - 10] ^= 0xFF  # inside the last entry's tensor data
    data[5] ^= 0x01  # inside the first entry's header length
    shards[0].write_bytes(bytes(data))
    report = verify(store)
    assert not report.ok
    assert len(report.bad_entries) == 2
    assert {reason for _k, _s, reason in report.bad_entries} == {"checksum mismatch"}


def test_verify_detects_deleted_shard_and_repair_recovers(three_shards):
    store, shards = three_shards
    shards[2].unlink()
    report = verify(store)
    assert report.missing_shards == [shards[2].name]
    assert len(report.bad_entries) == 4
    dropped = repair(store, report, orphan_min_age_s=0)
    assert dropped == 4 and len(store) == 8
    assert verify(store).ok
    missing = [i for i in range(12) if key(i) not in store]
    fill(store, missing)  # the next caching run re-encodes what was dropped
    assert len(store) == 12 and verify(store).ok


def test_verify_detects_corrupt_manifest_segment(three_shards, tmp_path):
    store, _ = three_shards
    segment = sorted((tmp_path / MANIFEST).iterdir())[0]
    data = bytearray(segment.read_bytes())
    data[30] ^= 0xFF
    segment.write_bytes(bytes(data))
    report = verify(store)
    assert segment.name in report.bad_segments and not report.ok
    assert len(store) == 8  # its entries are no longer reachable
    repair(store, report, orphan_min_age_s=0)
    report = verify(store)
    assert report.ok and report.orphan_files == []


def test_prune_keeps_only_live_entries(tmp_path):
    store = TensorStore(str(tmp_path))
    fill(store, range(12), shard_entries=4)  # shards: 0-3, 4-7, 8-11
    live = [key(i) for i in (0, 1, 2, 3, 5, 9)]
    report = prune(store, live)
    assert (report.removed_entries, report.kept_entries) == (6, 6)
    assert report.rewritten_shards == 2 and report.deleted_shards == 0
    assert sorted(store.keys()) == sorted(live)
    for k in live:
        assert_same(store.get(k), entry(int(k, 16)))
    assert verify(store).ok and verify(store).orphan_files == []
    assert len(os.listdir(tmp_path / SHARDS)) == 2  # the untouched shard and one rewritten
    fresh = TensorStore(str(tmp_path))
    assert sorted(fresh.keys()) == sorted(live)
    prune(fresh, [])
    assert len(fresh) == 0 and os.listdir(tmp_path / SHARDS) == []


def test_manifest_lookup_handles_shared_64_bit_prefixes():
    keys = np.zeros((3, 16), np.uint8)
    keys[:, 15] = [3, 1, 2]  # same high half, different low halves
    seg = Segment("s", ["a.shard"], "w", [], keys, np.zeros(3, np.uint32),
                  np.arange(3, dtype=np.uint64), np.ones(3, np.uint64), np.zeros(3, np.uint32))
    manifest = Manifest([Segment.from_bytes("s", seg.to_bytes())])
    for low in (1, 2, 3):
        row = manifest.find(f"{low:032x}")
        assert row >= 0 and manifest.key_at(row) == f"{low:032x}"
    assert manifest.find(f"{4:032x}") == -1
    assert list(manifest.contains_many([f"{i:032x}" for i in range(5)])) == [False, True, True, True, False]


DTYPE_NAMES = ["bfloat16", "float16", "float32", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"]


def test_entries_round_trip_any_shapes_and_dtypes():
    from hypothesis import given, settings
    from hypothesis import strategies as st


    tensor = st.tuples(st.sampled_from(DTYPE_NAMES), st.lists(st.integers(0, 5), max_size=4), st.integers(0, 2**16))

    @settings(max_examples=60, deadline=None)
    @given(st.dictionaries(st.text(min_size=1, max_size=12), tensor, max_size=5))
    def round_trip(spec):
        tensors = {}
        for name, (dtype, shape, seed) in spec.items():
            values = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 50
            tensors[name] = values > 0 if dtype == "bool" else values.to(getattr(torch, dtype))
        data = b"".join(bytes(piece) for piece in encode_entry(key(7), tensors))
        assert len(data) % 64 == 0
        assert_same(decode_entry(data, 0), tensors)

    round_trip()


# ---- reads check every entry: flipped bytes, a truncated shard, a corrupt header --------------------
def _corrupt_reads(store: TensorStore) -> dict[int, str]:
    """{entry: reason} for every entry a fresh reader refuses."""
    fresh = TensorStore(store.url)
    refused = {}
    for i in range(12):
        try:
            fresh.get(key(i))
        except CorruptEntry as error:
            assert error.key == key(i) and store.url in str(error)
            refused[i] = error.reason
    fresh.close()
    return refused


def test_reads_refuse_flipped_tensor_bytes(three_shards):
    store, shards = three_shards
    data = bytearray(shards[0].read_bytes())
    data[len(data) - 10] ^= 0xFF  # inside the last entry's tensor data
    shards[0].write_bytes(bytes(data))
    refused = _corrupt_reads(store)
    assert list(refused.values()) == ["checksum mismatch"]


def test_reads_refuse_a_truncated_shard(three_shards):
    store, shards = three_shards
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    refused = _corrupt_reads(store)
    assert len(refused) == 2 and all("ends" in reason for reason in refused.values())
    shards[1].write_bytes(b"")  # emptied: no mmap at all
    assert len(_corrupt_reads(store)) == 4


def test_reads_refuse_a_corrupt_entry_header(three_shards):
    store, shards = three_shards
    data = bytearray(shards[2].read_bytes())
    data[12:20] = b"}}}}}}}}"  # inside the first entry's JSON header
    shards[2].write_bytes(bytes(data))
    assert list(_corrupt_reads(store).values()) == ["checksum mismatch"]


def test_reads_refuse_a_deleted_shard(three_shards):
    store, shards = three_shards
    shards[2].unlink()
    assert set(_corrupt_reads(store).values()) == {"shard missing"}


# ---- disk full while writing a shard -----------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root, where mounting is permitted); None otherwise."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    yield folder if mounted else None
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)


def _big(i: int) -> dict:
    return {"x": torch.full((64, 1024), float(i))}  # 256 KiB


def _small(i: int) -> dict:
    return {"x": torch.full((64, 256), float(i))}  # 64 KiB


def test_disk_full_while_writing_a_shard(small_disk):
    if small_disk is None:
        pytest.skip("mounting a tmpfs is not permitted here (see the RLIMIT_FSIZE test below)")
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 700_000)  # the disk is mostly full already
    store = TensorStore(str(small_disk / "cache"))
    with pytest.raises(CacheDiskFull) as caught:
        with store.writer("w", shard_entries=2) as writer:
            for i in range(8):  # 512 KiB into about 300 KiB
                writer.put(key(i), _small(i))
    message = str(caught.value)
    assert "No space left on device" in message and "run again" in message and "\n" not in message
    store.refresh()
    kept = len(store)
    assert 0 < kept < 8 and verify(store).ok  # committed shards are whole; the partial one is gone
    assert not [name for name in os.listdir(small_disk / "cache" / SHARDS) if name.startswith(".")]
    filler.unlink()  # space is freed: a rerun adds only what is missing
    missing = [i for i in range(8) if key(i) not in store]
    assert len(missing) == 8 - kept
    with store.writer("w", shard_entries=2) as writer:
        for i in missing:
            writer.put(key(i), _small(i))
    store.refresh()
    assert len(store) == 8 and verify(store).ok
    for i in range(8):
        assert torch.equal(store.get(key(i))["x"], _small(i)["x"])
    store.close()


def test_file_size_limit_while_writing_a_shard(tmp_path):
    """RLIMIT_FSIZE in a child process: EFBIG is reported like a full disk; the store stays valid and
    a rerun without the limit resumes (adds only what is missing)."""
    script = textwrap.dedent(f"""
        import resource, sys, torch
        from simpletuner.cache.store import TensorStore, CacheDiskFull
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))
        store = TensorStore({str(tmp_path / "c")!r})
        try:
            with store.writer("w", shard_entries=2) as writer:
                for i in range(8):
                    writer.put(f"{{i:032x}}", {{"x": torch.full((64, 256 if i < 4 else 1024), float(i))}})
        except CacheDiskFull as error:
            print(error)
            sys.exit(2)
    """)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.returncode == 2, child.stderr
    assert "File too large" in child.stdout and "Traceback" not in child.stderr, child.stdout + child.stderr
    store = TensorStore(str(tmp_path / "c"))
    assert len(store) == 4 and verify(store).ok  # the two shards of small entries; the big one is gone
    missing = [i for i in range(8) if key(i) not in store]
    assert missing == [4, 5, 6, 7]
    with store.writer("w") as writer:
        for i in missing:
            writer.put(key(i), _big(i))
    store.refresh()
    assert len(store) == 8 and verify(store).ok
    assert torch.equal(store.get(key(0))["x"], torch.zeros(64, 256))
