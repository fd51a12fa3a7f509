"""A configuration with millions of unknown keys: `config check` names the first 20 and counts the rest, in one
round with every other kind of problem; the JSON reader keeps the standard library's values where orjson differs.
(Its speed is measured by benchmarks/config_check.py, not asserted here.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import simpletuner
from simpletuner.config.files import read_config_file
from simpletuner.config.load import read_settings

KEYS = 2_500_000


def _check(config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(simpletuner.__file__).parents[1])}  # these sources
    return subprocess.run([sys.executable, "-m", "simpletuner", "config", "check", str(config)],
                          capture_output=True, text=True, timeout=300, cwd=config.parent, env=env)


def test_millions_of_unknown_keys_name_the_first_20_and_count_the_rest(tmp_path):
    config = tmp_path / "config.json"
    with config.open("w") as file:  # the probe's file: {"key_000001": 1, ...}
        file.write("{" + ", ".join(f'"key_{i:06d}": 1' for i in range(1, KEYS + 1)) + "}")
    result = _check(config)
    assert result.returncode == 2, result.stderr[:2000]
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == f"error: 23 problems in {config}:", lines[0]
    named = [line for line in lines if line.startswith("  - unknown option 'key_")]
    assert [line.split("'")[1] for line in named] == [f"key_{i:06d}" for i in range(1, 21)]
    assert f"  - ... and {KEYS - 20} more unknown options in {config} ({KEYS} in all; the first 20 are named above)" \
        in lines
    assert lines[22].startswith("  - missing required option model_family") and "no datasets" in lines[23]
    assert len(lines) == 24  # the heading, 20 named, the count, model_family and the datasets missing


def test_other_problems_after_the_20th_unknown_key_are_still_reported(tmp_path):
    options = {f"key_{i}": 1 for i in range(100)}
    options |= {"ltx_train_mode": "full", "write_batch_size": 64, "learning_rate": "fast",
                "--model_family": "sdxl"}
    config = tmp_path / "config.toml"
    config.write_text("\n".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in options.items()))
    loaded = read_settings(config)
    assert "unsupported: ltx_train_mode (video models are not supported) in " + str(config) in loaded.problems
    assert any(p.startswith("learning_rate: 'fast' is not a number") for p in loaded.problems), loaded.problems
    assert f"... and 80 more unknown options in {config} (100 in all; the first 20 are named above)" \
        in loaded.problems
    assert any(w.startswith("ignored: write_batch_size") for w in loaded.warnings), loaded.warnings
    assert "model_family" in loaded.raw.values  # the -- prefix is read as the option


def test_json_values_are_read_as_the_standard_library_reads_them(tmp_path):
    text = ('{"max_train_steps": 18446744073709551616, "seed": -9223372036854775809, "lr": Infinity, '
            '"x": 1e400, "y": 0.1, "z": 12345678901234567890, "--n": [1, {"a": 2}],}')
    config = tmp_path / "config.json"
    config.write_text(text)
    raw = read_config_file(config)
    assert raw.values == {key.removeprefix("--"): value
                          for key, value in json.loads(text.replace(",}", "}")).items()}
    assert type(raw.values["max_train_steps"]) is int and type(raw.values["seed"]) is int
    assert raw.warnings == [f"{config}: a trailing comma was accepted (strict JSON has none)"]
    strict = tmp_path / "strict.json"
    strict.write_text('{"seed": 12345678901234567890123, "n": 7}')
    assert read_config_file(strict).values == {"seed": 12345678901234567890123, "n": 7}
