"""`simpletuner cache` under a two-node launch (two torchrun instances on 127.0.0.1, gloo, CPU): each node
encodes a disjoint part of the latents into one store on S3 (a real moto server), and a rerun after a
node's work was lost encodes only what is missing."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

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
