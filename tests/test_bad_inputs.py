"""Every bad input of the corpus (tests/bad_inputs.py), through the real CLI: `scan` says what it sees,
`train` completes or stops with one line (exit 2, no traceback), the run's skipped.jsonl lists what was
left out and why, the batches the run builds hold each sample's own latent and none of what was left
out, and the dataset's files are byte-identical afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bad_inputs import KINDS, Kind
from train_helpers import assert_epoch_uses_own_latents, write_run

from simpletuner.cli import main
from simpletuner.demo.dataset import write_dataset

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder`: (mode, link target or content hash), without following links."""
    out = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            out[str(path)] = (info.st_mode, os.readlink(path))
        else:
            with open(path, "rb") as handle:  # root reads mode-000 files too
                out[str(path)] = (info.st_mode, hashlib.sha256(handle.read()).hexdigest())
    return out


def run_cli(args: list[str], capsys, unprivileged: bool) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `simpletuner ARGS`: in this process, or, where the case needs a
    process that file permissions apply to and we run as root, a child without CAP_DAC_OVERRIDE."""
    if not (unprivileged and os.geteuid() == 0):
        code = main(args)
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop CAP_DAC_OVERRIDE to test file permissions")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m",
                            "simpletuner", *args], capture_output=True, text=True, env=env, timeout=600)
    return child.returncode, child.stdout, child.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS, ids=[kind.name for kind in KINDS])
def test_bad_input(tmp_path: Path, tiny_model, capsys, kind: Kind) -> None:
    dataset = write_dataset(tmp_path / "dataset", count=12)
    left_out = kind.write(dataset)
    before = snapshot(dataset)
    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", dataset=dataset, max_train_steps=4,
                       disable_validation=True)

    code, out, err = run_cli(["scan", str(config)], capsys, kind.unprivileged)
    assert "Traceback" not in err, err
    if kind.scan_says is not None:
        assert kind.scan_says in out + err, out + err

    code, out, err = run_cli(["train", str(config)], capsys, kind.unprivileged)
    assert "Traceback" not in err, err
    assert code == kind.exit_code, out + err
    for text in kind.run_says:
        assert text in out + err, out + err
    if code == 2:
        error_lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(error_lines) == 1 and kind.run_says[0] in error_lines[0], err
    else:
        assert (tmp_path / "output" / "pytorch_lora_weights.safetensors").exists()
        if not (kind.unprivileged and os.geteuid() == 0):  # this process reads what the run could not
            assert assert_epoch_uses_own_latents(config, set(left_out)) > 0
    report = [json.loads(line) for line in (tmp_path / "output" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(row["path"] for row in report) == sorted(left_out)
    assert all(row["stage"] == kind.stage and row["reason"] for row in report), report
    assert snapshot(dataset) == before
