"""`simpletuner cache` under a two-node launch (two torchrun instances on 127.0.0.1, gloo, CPU): each node
encodes a disjoint part of the latents into one store on S3 (a real moto server), and a rerun after a
node's work was lost encodes only what is missing: its segments deleted, or the node killed (SIGKILL)
mid-cache."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import write_run

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "SIMPLETUNER_LOG_LEVEL": "INFO"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def writers(server, url: str) -> dict[str, set[bytes]]:
    """writer name -> keys of its committed segments, read back from the S3 store's manifest."""
    from simpletuner.cache.location import Location
    from simpletuner.cache.store import read_segments

    from test_cache_s3 import options

    segments, bad = read_segments(Location(url, options(server)))
    assert not bad
    found: dict[str, set[bytes]] = {}
    for segment in segments:
        found.setdefault(segment.writer, set()).update(bytes(k) for k in segment.keys)
    return found


def test_two_nodes_cache_disjoint_parts_into_one_s3_store(tmp_path, tiny_model):
    from moto.server import ThreadedMotoServer

    from s3server import S3Server
    from simpletuner.demo.dataset import write_dataset

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        server = S3Server(f"http://{host}:{port}")
        server.make_bucket("nodes")
        local = write_dataset(tmp_path / "local", count=16)
        server.put("nodes", {f"set/{p.name}": p.read_bytes() for p in local.iterdir()})
        config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", dataset=local, disable_validation=True)
        backends = json.loads((tmp_path / "multidatabackend.json").read_text())
        del backends[0]["instance_data_dir"]
        backends[0].update(server.dataset_fields("nodes", "set"), cache_dir_vae="s3://nodes/cache/vae")
        (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))

        rendezvous = free_port()
        command = [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                   "--master_port", str(rendezvous), "-m", "simpletuner", "cache", str(config)]
        nodes = [subprocess.Popen([*command[:5], "--node_rank", str(rank), *command[5:]], env=ENV,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
        results = [n.communicate(timeout=900) for n in nodes]
        assert [n.returncode for n in nodes] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]

        by_writer = writers(server, "s3://nodes/cache/vae")
        ranks: dict[str, set[bytes]] = {}
        for name, keys in by_writer.items():  # writer names: <kind>-rank<N>-<unique suffix>
            ranks.setdefault(re.search(r"rank\d+", name).group(), set()).update(keys)
        assert sorted(ranks) == ["rank0", "rank1"]
        parts = [ranks["rank0"], ranks["rank1"]]
        assert parts[0] and parts[1] and not parts[0] & parts[1]  # disjoint parts
        assert len(parts[0] | parts[1]) == 16  # one store holds them all

        # node 1's work is lost (its manifest segments gone, as if it died before committing): a rerun on
        # one process encodes exactly that part, and the store is whole again
        fs = server.filesystem()
        lost = [path for path in fs.ls("nodes/cache/vae/manifest") if "rank1" in path]
        assert lost
        for path in lost:
            fs.rm(path)
        done = subprocess.run([sys.executable, "-m", "simpletuner", "cache", str(config)], env=ENV,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        again = writers(server, "s3://nodes/cache/vae")
        rank0_now = {k for name, keys in again.items() if "rank0" in name for k in keys}
        assert rank0_now == parts[0] | parts[1]  # the rerun's rank 0 wrote the 8-ish missing entries too
        assert len(set().union(*again.values())) == 16
    finally:
        moto.stop()


def kill_node(node: subprocess.Popen) -> None:
    """SIGKILL a torchrun node: its workers (torchrun starts each in a session of its own) and the launcher."""
    children = Path(f"/proc/{node.pid}/task/{node.pid}/children").read_text().split()
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    node.kill()
    node.wait()


def test_a_node_killed_mid_cache_loses_only_its_uncommitted_shard_and_a_rerun_finishes(tmp_path, tiny_model):
    from moto.server import ThreadedMotoServer

    from s3server import ACCESS_KEY, REGION, SECRET_KEY, S3Server

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        server = S3Server(f"http://{host}:{port}")
        server.make_bucket("dying")
        # 192 images on the nodes' shared disk, latents cached into S3; parts big enough for the kill to land first
        config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", images=192, disable_validation=True)
        backends = json.loads((tmp_path / "multidatabackend.json").read_text())
        backends[0]["cache_dir_vae"] = "s3://dying/cache/vae"
        (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
        env = {**ENV, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
               "AWS_ENDPOINT_URL": server.endpoint, "AWS_REGION": REGION}
        node1_tmp = tmp_path / "node1-tmp"  # where node 1 writes a shard before it is uploaded and committed
        node1_tmp.mkdir()

        rendezvous = free_port()
        command = [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                   "--master_port", str(rendezvous), "-m", "simpletuner", "cache", str(config)]
        node0 = subprocess.Popen([*command[:5], "--node_rank", "0", *command[5:]], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        node1 = subprocess.Popen([*command[:5], "--node_rank", "1", *command[5:]],
                                 env={**env, "TMPDIR": str(node1_tmp)}, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while not _written(node1_tmp):  # node 1 has written its first latents into its shard
            assert node1.poll() is None and time.monotonic() < deadline, "node 1 ended before caching"
            time.sleep(0.005)
        kill_node(node1)  # mid-cache: its shard is not committed
        _, err = node0.communicate(timeout=600)
        # node 0 stops at the job's closing barrier, it does not hang, and says so in one line (the reason is gloo's
        # own: "Connection closed by peer" or, when the kill lands with data in flight, a reset)
        assert node0.returncode != 0, err[-3000:]
        assert "error: another process of this cache job stopped before it finished" in err, err[-3000:]
        assert "run `simpletuner cache` again to encode the rest" in err

        by_writer = writers(server, "s3://dying/cache/vae")  # the store is valid: read_segments found no bad one
        assert by_writer and all("rank0" in name for name in by_writer)  # node 1 committed nothing
        node0_part = set().union(*by_writer.values())
        assert 0 < len(node0_part) < 192  # node 0 committed its whole part before it stopped
        assert _written(node1_tmp)  # what node 1 lost

        done = subprocess.run([sys.executable, "-m", "simpletuner", "cache", str(config)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        after = writers(server, "s3://dying/cache/vae")
        rerun = [keys for name, keys in after.items() if name not in by_writer]
        assert len(rerun) == 1 and not rerun[0] & node0_part  # the rerun encoded only what was missing
        assert len(rerun[0] | node0_part) == 192  # and the store is whole
        assert {name: after[name] for name in by_writer} == by_writer  # node 0's part untouched
    finally:
        moto.stop()


def _written(folder: Path) -> list[Path]:
    """The shards in `folder` that hold data (a shard is created empty, then written; committed ones go away)."""
    written = []
    for shard in folder.glob("simpletuner-shard-*"):
        try:
            if shard.stat().st_size:
                written.append(shard)
        except FileNotFoundError:  # committed between the listing and the look
            pass
    return written
