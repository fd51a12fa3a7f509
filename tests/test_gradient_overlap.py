"""Bucketed gradient averaging during backward (train/overlap.py) against the flat all-reduce after backward:
two real processes over gloo train the tiny SD 1.x UNet both ways and must end with identical weights."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

WORKER = textwrap.dedent('''
    import json, sys
    import torch
    import torch.distributed as dist
    from diffusers import UNet2DConditionModel
    from simpletuner.train.overlap import OverlappedReducer
    from simpletuner.train.sharding import Sharding

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model_dir, out = sys.argv[1], sys.argv[2]
    flat = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    overlapped = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    params = {name: [p for p in model.parameters()] for name, model in (("flat", flat), ("overlapped", overlapped))}
    optimisers = {name: torch.optim.AdamW(ps, lr=1e-3) for name, ps in params.items()}
    reducer = OverlappedReducer(params["overlapped"], world, bucket_bytes=64 * 1024)  # several buckets
    launched_in_backward = []
    accumulation, channels = 2, flat.config.in_channels
    for step in range(3):
        for micro in range(accumulation):
            g = torch.Generator().manual_seed(1000 * rank + 10 * step + micro)  # each rank its own data
            sample = torch.randn(2, channels, 8, 8, generator=g)
            text = torch.randn(2, 4, flat.config.cross_attention_dim, generator=g)
            t = torch.randint(0, 1000, (2,), generator=g)
            for name, model in (("flat", flat), ("overlapped", overlapped)):
                loss = model(sample, t, text).sample.pow(2).mean() / accumulation
                if name == "overlapped":
                    reducer.syncing = micro == accumulation - 1
                loss.backward()
                if name == "overlapped" and reducer.syncing:
                    launched_in_backward.append(reducer._launched)
        Sharding().reduce_gradients(params["flat"], world)
        reducer.finish()
        for name in params:
            optimisers[name].step()
            optimisers[name].zero_grad(set_to_none=True)
    same = all(torch.equal(a, b) for a, b in zip(flat.parameters(), overlapped.parameters()))
    json.dump({"same": same, "buckets": len(reducer.buckets), "launched_in_backward": launched_in_backward,
               "checksum": float(sum(p.double().sum() for p in overlapped.parameters()))},
              open(f"{out}/rank{rank}.json", "w"))
''')


def test_bucketed_reduction_during_backward_matches_the_flat_all_reduce(tmp_path: Path, tiny_model) -> None:
    model = tiny_model("sd1x")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(model), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(record["same"] for record in records)  # overlapped == flat, bit for bit, on each rank
    assert records[0]["checksum"] == records[1]["checksum"]  # and the ranks agree
    assert records[0]["buckets"] > 2
    # most buckets went out while backward still ran (the rest: those finish() launched)
    assert all(count >= records[0]["buckets"] // 2 for count in records[0]["launched_in_backward"])
