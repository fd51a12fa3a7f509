"""Launched by tests/test_train_distributed.py through `accelerate launch` with 2 CPU processes.

Trains the given configuration and writes, per rank, the trainable weights it ends
with and the sample paths it was given, into OUT_DIR.
"""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from simpletuner.config.load import load_settings
from simpletuner.log import setup_logging
from simpletuner.train.checkpoint import trainable_tensors
from simpletuner.train.setup import build_run, make_accelerator
from simpletuner.train.trainer import run_training


class RecordingSampler:
    """The run's sampler, noting every sample it hands out."""

    def __init__(self, sampler):
        self.sampler, self.seen = sampler, []

    def __next__(self):
        batch = next(self.sampler)
        self.seen.append([ref.path for ref in batch])
        return batch

    def __getattr__(self, name):
        return getattr(self.sampler, name)


def main() -> None:
    config, out = sys.argv[1], Path(sys.argv[2])
    setup_logging()  # SIMPLETUNER_LOG_LEVEL=INFO shows what the run decided
    settings = load_settings(config)
    accelerator = make_accelerator(settings)
    run = build_run(settings, accelerator)
    recorder = RecordingSampler(run.sampler)
    run.sampler = recorder
    run_training(run)
    rank = accelerator.process_index
    weights = {name: tensor.detach().contiguous() for name, tensor in trainable_tensors(run.trained.module).items()}
    save_file(weights, out / f"rank{rank}.safetensors")
    (out / f"rank{rank}.json").write_text(json.dumps({"world": accelerator.num_processes, "seen": recorder.seen}))


if __name__ == "__main__":
    main()
