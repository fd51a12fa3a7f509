"""SimpleTuner's own configuration files (tests/data/upstream_examples, copied from its current release) through
the real CLI: each passes `config check`, or is refused only for features docs/STATUS.md lists as not built,
and every problem of a file is reported in one round; `scan` works on them with local data."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

EXAMPLES = Path(__file__).parent / "data" / "upstream_examples"
SOURCES = Path(__import__("simpletuner").__file__).parents[1]
STATUS = (Path(__file__).parents[1] / "docs" / "STATUS.md").read_text()
NOT_BUILT = STATUS.split("## Not built yet", 1)[1]

# A refusal: how its line starts or what it holds, and the feature's name in docs/STATUS.md's "Not built yet".
FEATURES = {
    "tread": ("unsupported: tread_config (TREAD", "TREAD"),
    "kontext": ("model_flavour 'kontext': Flux Kontext", "Flux Kontext"),
    # its canny generator makes Kontext's reference images, which only Flux Kontext (not built) reads
    "kontext-references": ("conditioning generators make ControlNet inputs", "Flux Kontext"),
    "pixart-controlnet": ("controlnet=true: model_family 'pixart_sigma' has no ControlNet", "ControlNet for PixArt"),
}
REFUSED = {
    "flux.peft-lora": set(),
    "flux.peft-lora+TREAD": {"tread"},
    "kolors.peft-lora": set(),
    "sd3.peft-lora": set(),
    "sdxl.peft-controlnet-lora": set(),  # canny from a Hugging Face dataset, int8-quanto base (sd3, flux), and
    "sd3.peft-controlnet-lora": set(),   # flux_lora_target 'controlnet': tests/test_controlnet.py trains each
    "flux.peft-controlnet-lora": set(),
    "pixart.peft-controlnet-lora": {"pixart-controlnet"},
    "sdxl.lycoris-lokr": set(),
    "kontext.peft-lora": {"kontext", "kontext-references"},
    "deepfloyd-if-i-medium.peft-lora": set(),
    "quickstart-sdxl": set(),
    "quickstart-sd3": set(),
    "quickstart-pixart": set(),
    "quickstart-deepfloyd": set(),
}


def _images(folder: Path, count: int = 3, size: tuple[int, int] = (640, 576)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i, np.uint8)).save(folder / f"photo of thing {i}.jpg")
    return folder


def _prepare(name: str, tmp_path: Path) -> tuple[Path, list[str]]:
    """The example's config.json, with local data where it names data (and the overrides that supply it)."""
    _images(tmp_path / "datasets" / "ideogram-subject")  # deepfloyd's relative instance_data_dir, from cwd
    (tmp_path / "config").mkdir(exist_ok=True)  # sd3's user_prompt_library, from cwd as SimpleTuner reads it
    (tmp_path / "config" / "user_prompt_library.json").write_text(json.dumps({"cat": "a cat on a mat"}))
    if name in ("quickstart-sdxl", "quickstart-pixart", "quickstart-sd3"):
        copy = tmp_path / name
        shutil.copytree(EXAMPLES / name, copy)
        data = _images(tmp_path / "pseudo-camera-10k")
        text = (copy / "multidatabackend.json").read_text()
        (copy / "multidatabackend.json").write_text(
            text.replace("/home/user/simpletuner/datasets/pseudo-camera-10k", str(data)))
        return copy / "config.json", ["--output_dir", str(tmp_path / "output")]
    if name == "quickstart-deepfloyd":  # a fragment: no dataset file of its own
        datasets = [{"id": "local", "type": "local", "instance_data_dir": str(_images(tmp_path / "if-data")),
                     "caption_strategy": "filename"},
                    {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text/if"}]
        (tmp_path / "datasets.json").write_text(json.dumps(datasets))
        return EXAMPLES / name / "config.json", ["--data_backend_config", str(tmp_path / "datasets.json")]
    return EXAMPLES / name / "config.json", []


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # run from `cwd` (relative paths of the examples), with this checkout's sources first, as the suite runs
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SOURCES), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "simpletuner", *args], capture_output=True, text=True, cwd=cwd,
                          env=env)


def _problems(stderr: str) -> list[str]:
    """The problems `config check` listed: one per "  - " line, or the one problem of "error: FILE: problem"."""
    listed = [line[4:] for line in stderr.splitlines() if line.startswith("  - ")]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    if listed or not errors:
        return listed
    return [errors[-1].split(": ", 2)[-1]]


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_upstream_config_passes_or_is_refused_only_for_features_not_built(name, tmp_path):
    config, overrides = _prepare(name, tmp_path)
    result = _cli("config", "check", str(config), *overrides, cwd=tmp_path)
    assert "Traceback" not in result.stderr
    expected = REFUSED[name]
    if not expected:
        assert result.returncode == 0, result.stderr
        assert "configuration OK" in result.stderr
        return
    assert result.returncode == 2, result.stdout + result.stderr
    found = {}
    for problem in _problems(result.stderr):
        matches = [key for key, (start, _) in FEATURES.items() if start in problem]
        assert len(matches) == 1, f"not a refusal of a feature not built: {problem}"
        found[matches[0]] = problem
    assert set(found) == expected, result.stderr
    for key in expected:
        assert FEATURES[key][1] in NOT_BUILT, f"docs/STATUS.md does not list {FEATURES[key][1]} as not built"


def test_current_names_flavours_and_path_variables_of_an_example_are_understood(tmp_path):
    # quickstart-sdxl: model_flavour instead of a path, use_gradient_checkpointing; sdxl.lycoris-lokr: its
    # config/examples/... lycoris_config and dataset file are found (no "does not exist" problem above).
    config, overrides = _prepare("quickstart-sdxl", tmp_path)
    result = _cli("config", "check", str(config), *overrides, cwd=tmp_path)
    assert "base model: stabilityai/stable-diffusion-xl-base-1.0 (model_flavour base-1.0)" in result.stdout
    result = _cli("config", "check", str(EXAMPLES / "sdxl.lycoris-lokr" / "config.json"), cwd=tmp_path)
    assert "does not exist" not in result.stderr and "no datasets" not in result.stderr


@pytest.mark.parametrize("name", ["quickstart-sdxl", "quickstart-pixart", "quickstart-sd3",
                                  "deepfloyd-if-i-medium.peft-lora"])
def test_scan_works_on_upstream_configs_with_local_data(name, tmp_path):
    config, overrides = _prepare(name, tmp_path)
    result = _cli("scan", str(config), *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert re.search(r"usable images: 3\b", result.stdout), result.stdout
    assert "buckets:" in result.stdout
