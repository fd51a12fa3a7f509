"""Two "nodes" on 127.0.0.1: two torchrun instances (`--nnodes 2 --nproc_per_node 1`, gloo, CPU), and two
accelerate launches (`--num_machines 2 --machine_rank N --main_process_ip 127.0.0.1`).

They end with the same weights as one node running 2 processes, each rank drawing its own part
of every epoch; a node whose rendezvous never answers stops with a timeout message.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import write_run

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).parent / "scripts" / "two_rank_train.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node(rank: int, port: int, config: Path, out: Path, launcher: str = "torchrun") -> subprocess.Popen:
    """One "node" of two on 127.0.0.1 with one process, started by torchrun or by accelerate's multi-node launch."""
    if launcher == "torchrun":
        command = [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank), "--master_addr",
                   "127.0.0.1", "--master_port", str(port)]
    else:  # --num_processes counts the processes of all machines
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                   "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                   "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no"]
    return subprocess.Popen([*command, str(SCRIPT), str(config), str(out)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_nodes_match_one_node_with_two_processes(tmp_path, tiny_model):
    model = tiny_model("sd1x")
    # 16 images, batch 2, 2 ranks: 4 steps an epoch; 6 steps cross into the second epoch
    single = write_run(tmp_path / "single", model, "sd1x", images=16, max_train_steps=6, checkpointing_steps=6,
                       disable_validation=True)
    (tmp_path / "single-out").mkdir()
    done = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", str(SCRIPT), str(single),
                           str(tmp_path / "single-out")], capture_output=True, text=True, env=ENV, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]

    single_records = [json.loads((tmp_path / "single-out" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for launcher in ("torchrun", "accelerate"):
        root = tmp_path / launcher
        multi = write_run(root, model, "sd1x", dataset=tmp_path / "single" / "dataset", max_train_steps=6,
                          checkpointing_steps=6, disable_validation=True)
        out = root / "out"  # both "nodes" write here: the shared filesystem
        out.mkdir()
        port = free_port()
        nodes = [node(rank, port, multi, out, launcher) for rank in (0, 1)]
        results = [n.communicate(timeout=900) for n in nodes]
        assert [n.returncode for n in nodes] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]

        records = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
        assert [r["world"] for r in records] == [2, 2]
        for epoch_steps in (range(0, 4), range(4, 6)):  # every epoch: the two nodes draw disjoint parts
            parts = [{p for step in epoch_steps for p in r["seen"][step]} for r in records]
            assert parts[0] and parts[1] and not parts[0] & parts[1]
        assert [r["seen"] for r in records] == [r["seen"] for r in single_records]  # the same deal as one node

        for rank in (0, 1):
            two_nodes = load_file(out / f"rank{rank}.safetensors")
            one_node = load_file(tmp_path / "single-out" / f"rank{rank}.safetensors")
            assert two_nodes.keys() == one_node.keys() and two_nodes
            assert all(torch.equal(two_nodes[k], one_node[k]) for k in two_nodes)
        meta = json.loads((root / "output" / "checkpoints" / "step-000006" / "meta.json").read_text())
        assert meta["world_size"] == 2


def test_a_node_that_cannot_reach_the_rendezvous_times_out(tmp_path):
    port = free_port()  # nothing listens there: node 0 never started
    command = [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", "1", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "--rdzv-conf", "timeout=5", str(SCRIPT), "unused.json", str(tmp_path)]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode != 0
    assert f"timed out after 5000ms while trying to connect to (127.0.0.1, {port})" in done.stderr
    assert time.monotonic() - started < 120
