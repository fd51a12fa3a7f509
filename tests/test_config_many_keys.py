"""A configuration with millions of unknown keys: `config check` names the first 20 and counts the rest, in one
round with every other kind of problem; the JSON reader keeps the standard library's values where orjson differs.
(Its speed is measured by benchmarks/config_check.py, not asserted here.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import simpletuner
from simpletuner.config import files, many_keys
from simpletuner.config.compat import LEGACY_SWITCHES
from simpletuner.config.files import read_config_file
from simpletuner.config.load import TRAINING_COMPAT, read_settings
from simpletuner.config.schema import TrainingConfig
from simpletuner.config.validate import recognised_names
from simpletuner.errors import ConfigError

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


# A large JSON file is first read by many_keys.select, which keeps the recognised options and the first unknown
# ones and counts the rest; each file below must give the same problems, warnings and options as reading it whole.
# `fast` says whether select reads it (True) or hands it back to the whole-file reading (False).
_JUNK = ", ".join(f'"junk_{i}": {v}' for i, v in enumerate(['1', '"x"', '[1, {"a": [2]}]', '{"b": null}', 'true',
                                                              '-2.5e3', '"a, b: {c}"', '[]', '{}', '""'] * 4))
_KNOWN = '"model_family": "sdxl", "learning_rate": "fast", "write_batch_size": 8, "ltx_train_mode": "full"'
EQUIVALENT = [
    ("interleaved", "{" + _JUNK.replace("junk_", "early_")[:200].rsplit(",", 1)[0] + ", " + _KNOWN + ", " + _JUNK
     + "}", True),
    ("pretty", json.dumps(json.loads("{" + _KNOWN + ", " + _JUNK + "}"), indent=4), True),
    ("spaces_before_colons", "{ " + (_KNOWN + ", " + _JUNK).replace('": ', '"  \n\t: ') + " }", True),
    ("dashes", "{" + _JUNK + ', "--lora_rank": 4, "--unknown_dashed": 1, "use_bitfit": true}', True),
    ("legacy_and_alias", "{" + _JUNK + ', "sdxl": true, "offset_noise": false, "noise_offset": 0.2}', True),
    ("huge_numbers", "{" + _JUNK + ', "max_train_steps": ' + "9" * 400 + ', "seed": 1e400}', True),
    ("non_ascii", "{" + _JUNK + ', "naïve": "é", "": 0}', True),
    ("few_unknown", '{"model_family": "sdxl", "a": 1, "b": 2}', True),
    ("infinity", "{" + _JUNK + ', "learning_rate": Infinity}', False),
    ("trailing_comma", "{" + _JUNK + ", " + _KNOWN + ",}", False),
    ("escaped_name", "{" + _JUNK + ', "learning\\u005frate": 1}', False),
    ("duplicate_unknown", "{" + _JUNK + ', "junk_3": 2}', False),
    ("duplicate_known", "{" + _KNOWN + ", " + _JUNK + ', "learning_rate": 0.1}', False),
    ("dashed_twice", "{" + _JUNK + ', "--lora_rank": 4, "lora_rank": 8}', False),
    ("deep", "{" + _JUNK + ', "junk_deep": ' + "[" * 40 + "]" * 40 + "}", False),
    ("long_number", "{" + _JUNK + ', "junk_long": ' + "7" * 5000 + "}", False),
    ("list", "[" + _JUNK.replace(":", ",") + "]", False),
]


@pytest.mark.parametrize("name,text,fast", EQUIVALENT, ids=[case[0] for case in EQUIVALENT])
def test_a_large_file_read_in_part_reports_what_reading_it_whole_reports(tmp_path, monkeypatch, name, text, fast):
    config = tmp_path / "config.json"
    config.write_bytes(text.encode())
    recognised = recognised_names(TrainingConfig, TRAINING_COMPAT) | LEGACY_SWITCHES | {"junk_1"}
    assert (many_keys.select(text.encode(), recognised, 21, 32) is not None) == fast
    whole = _outcome(config, ["--junk_1", "2", "--seed", "3"])
    monkeypatch.setattr(files, "MANY_KEYS_BYTES", 0)  # every JSON file counts as large
    assert _outcome(config, ["--junk_1", "2", "--seed", "3"]) == whole


def _outcome(config: Path, overrides: list[str]) -> tuple:
    try:
        loaded = read_settings(config, overrides)
    except ConfigError as error:
        return ("error", str(error))
    training = loaded.training.model_dump() if loaded.training else loaded.partial_training().model_dump()
    return loaded.problems, loaded.warnings, training


def test_the_count_of_left_out_names_is_exact(tmp_path):
    text = "{" + ", ".join(f'"k{i}": {i}' for i in range(1000)) + ', "model_family": "flux"}'
    selection = many_keys.select(text.encode(), {"model_family"}, 21, 32)
    assert selection is not None and selection.left_out == 1000 - 21
    assert json.loads(selection.text) == {**{f"k{i}": i for i in range(21)}, "model_family": "flux"}


_TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters='"\\'), max_size=8)
_NAMES = st.one_of(st.sampled_from(["learning_rate", "--learning_rate", "seed", "--seed", "model_family", "x", "--x",
                                    "", "-", "--", "é", "lora_rank"]), _TEXT)
_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats(allow_nan=False,
                       allow_infinity=False) | _TEXT, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(_TEXT, inner, max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_NAMES, _VALUES, max_size=40), st.sampled_from([None, 0, 2]), st.integers(0, 25))
def test_a_selection_is_exactly_the_recognised_entries_and_the_first_unknown_ones(options, indent, unknown):
    text = json.dumps(options, indent=indent, ensure_ascii=False)
    recognised = {"learning_rate", "seed", "model_family", "lora_rank", "é"}
    selection = many_keys.select(text.encode(), recognised, unknown, 32)
    names = [name[2:] if name.startswith("--") else name for name in options]
    assert (selection is None) == (len(set(names)) < len(names))  # only a name given twice sends it back here
    if selection is not None:
        others = [key for key, name in zip(options, names) if name not in recognised][:unknown]
        kept = [key for key, name in zip(options, names) if name in recognised or key in others]
        assert list(json.loads(selection.text).items()) == [(key, options[key]) for key in kept]
        assert selection.left_out == len(options) - len(kept)
