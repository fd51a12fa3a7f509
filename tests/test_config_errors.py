"""Each kind of configuration mistake is a ConfigError that names the key, the value, the file and the fix."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import simpletuner

from simpletuner.config.compat import UNSUPPORTED
from simpletuner.config.load import load_config, load_settings
from simpletuner.config.schema import TrainingConfig
from simpletuner.errors import ConfigError, UserError

GOOD = {"model_family": "sdxl", "pretrained_model_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0"}


def _json(tmp_path, options, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(options))
    return path


def _error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(path, overrides) if path and str(path).endswith("with-datasets.json") else load_config(
            path, overrides)
    assert isinstance(caught.value, UserError) and caught.value.exit_code == 2
    return str(caught.value)


def test_unknown_key_names_key_file_and_closest_names(tmp_path):
    path = _json(tmp_path, {**GOOD, "learning_rat": 1e-4})
    message = _error(path)
    assert "'learning_rat'" in message and str(path) in message
    assert "did you mean learning_rate?" in message


def test_unknown_key_from_the_command_line_says_so():
    message = _error(None, ["--model_family", "sdxl", "--pretrained_model_name_or_path", "a/b", "--lora_rnak", "4"])
    assert "'lora_rnak'" in message and "command line" in message and "lora_rank" in message


def test_wrong_choice_lists_the_accepted_values(tmp_path):
    message = _error(_json(tmp_path, {**GOOD, "lr_scheduler": "cosin"}))
    assert "lr_scheduler: 'cosin' is not accepted" in message
    for choice in ("constant", "cosine", "cosine_with_restarts", "polynomial", "sine"):
        assert choice in message
    assert "did you mean cosine" in message


def test_wrong_choice_with_a_simpletuner_hint(tmp_path):
    message = _error(_json(tmp_path, {**GOOD, "report_to": "comet_ml"}))
    assert "report_to: 'comet_ml' is not accepted" in message and "use tensorboard or wandb" in message


def test_adamw_bf16_is_accepted_with_bf16_mixed_precision_only(tmp_path):
    assert load_config(_json(tmp_path, {**GOOD, "optimizer": "adamw_bf16"})).optimizer == "adamw_bf16"
    message = _error(_json(tmp_path, {**GOOD, "optimizer": "adamw_bf16", "mixed_precision": "no"}, "no.json"))
    assert "optimizer 'adamw_bf16' trains bf16 weights and needs mixed_precision 'bf16' (not 'no')" in message


@pytest.mark.parametrize("key, value, phrase", [
    ("gradient_checkpointing", "maybe", "gradient_checkpointing: 'maybe' is not a boolean"),
    ("train_batch_size", "four", "train_batch_size: 'four' is not a whole number"),
    ("learning_rate", "fast", "learning_rate: 'fast' is not a number"),
    ("lora_rank", 0, "lora_rank: 0 is out of range"),
    ("caption_dropout_probability", 1.5, "caption_dropout_probability: 1.5 is out of range"),
])
def test_wrong_type_or_value_names_key_value_and_what_is_accepted(tmp_path, key, value, phrase):
    path = _json(tmp_path, {**GOOD, key: value})
    message = _error(path)
    assert phrase in message and str(path) in message


def test_range_error_says_the_bound(tmp_path):
    assert "greater than or equal to 1" in _error(_json(tmp_path, {**GOOD, "lora_rank": 0}))


def test_garbage_in_a_boolean_from_the_environment_file(tmp_path):
    path = tmp_path / "config.env"
    path.write_text('export MODEL_FAMILY=sdxl\nexport MODEL_NAME=a/b\nexport USE_EMA="perhaps"\n')
    message = _error(path)
    assert "use_ema: 'perhaps' is not a boolean" in message and "config.env:3 (USE_EMA)" in message


def test_missing_required_option_says_what_to_set(tmp_path):
    message = _error(_json(tmp_path, {"pretrained_model_name_or_path": "a/b"}))
    assert "missing required option model_family" in message and "sdxl" in message


def test_every_problem_is_reported_at_once(tmp_path):
    message = _error(_json(tmp_path, {"learning_rat": 1, "lora_rank": "x"}))
    assert message.startswith("3 problems in configuration")
    assert "learning_rat" in message and "lora_rank" in message and "missing required option model_family" in message


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "model_family": "sdxl",\n  "lora_rank": 4\n  "seed": 1\n}\n')
    message = _error(path)
    assert str(path) in message and "line 4" in message


def test_malformed_toml_names_file_and_line(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('model_family = "sdxl"\nlora_rank = = 4\n')
    message = _error(path)
    assert str(path) in message and "line 2" in message


def test_malformed_env_file_names_file_and_line(tmp_path):
    path = tmp_path / "config.env"
    path.write_text('export MODEL_FAMILY=sdxl\nif [[ "$MODEL_TYPE" == "full" ]]; then\n')
    message = _error(path)
    assert f"{path}:2" in message and "not an assignment" in message
    path.write_text("export MODEL_FAMILY=sdxl\nexport LR_WARMUP_STEPS=$((MAX_NUM_STEPS / 10))\n")
    assert f"{path}:2" in _error(path)


def test_unknown_env_variable_is_named_with_suggestions(tmp_path):
    path = tmp_path / "config.env"
    path.write_text("export MODEL_FAMILY=sdxl\nexport MODEL_NAME=a/b\nexport LEARNIGN_RATE=1e-4\n")
    message = _error(path)
    assert f"{path}:3" in message and "LEARNIGN_RATE" in message and "LEARNING_RATE" in message


def test_missing_configuration_file(tmp_path):
    message = _error(tmp_path / "nope.toml")
    assert "not found" in message and "nope.toml" in message


@pytest.mark.parametrize("option", ["use_8bit_adam", "delete_unwanted_images", "validation_prompt_library",
                                    "ramtorch", "tread_config"])
def test_unsupported_simpletuner_option_is_reported_with_its_reason(tmp_path, option):
    message = _error(_json(tmp_path, {**GOOD, f"--{option}": "true"}))
    assert f"unsupported: {option} ({UNSUPPORTED[option].reason})" in message


def test_unsupported_options_are_not_schema_fields():
    assert not set(UNSUPPORTED) & set(TrainingConfig.model_fields)


def test_command_line_argument_without_dashes(tmp_path):
    message = _error(_json(tmp_path, GOOD), ["learning_rate=1"])
    assert "unexpected argument 'learning_rate=1'" in message


def test_conflicting_family_switch(tmp_path):
    message = _error(_json(tmp_path, {**GOOD, "--flux": "true"}))
    assert "flux=true" in message and "model_family" in message


# dataset files -----------------------------------------------------------------------------

def _with_datasets(tmp_path, entries, raw=None):
    dataset_file = tmp_path / "multidatabackend.json"
    dataset_file.write_text(raw if raw is not None else json.dumps(entries))
    return _json(tmp_path, {**GOOD, "data_backend_config": "multidatabackend.json"}, "with-datasets.json")


IMAGES = {"id": "pics", "instance_data_dir": "."}


def test_dataset_unknown_key_names_dataset_file_and_suggestion(tmp_path):
    message = _error(_with_datasets(tmp_path, [{**IMAGES, "crop_styel": "center"}]))
    assert "multidatabackend.json (dataset 'pics')" in message
    assert "'crop_styel'" in message and "did you mean crop_style" in message


def test_dataset_wrong_value_names_dataset_and_choices(tmp_path):
    message = _error(_with_datasets(tmp_path, [{**IMAGES, "caption_strategy": "captions"}]))
    assert "caption_strategy: 'captions' is not accepted" in message and "textfile" in message
    assert "dataset 'pics'" in message


def test_dataset_unsupported_key(tmp_path):
    message = _error(_with_datasets(tmp_path, [{**IMAGES, "minimum_aspect_ratio": 0.5}]))
    assert "unsupported: minimum_aspect_ratio" in message


def test_dataset_missing_location(tmp_path):
    message = _error(_with_datasets(tmp_path, [{"id": "pics", "type": "local"}]))
    assert "pics" in message and "instance_data_dir" in message


def test_dataset_file_not_a_list_or_broken(tmp_path):
    assert "JSON list of dataset entries" in _error(_with_datasets(tmp_path, None, raw='{"id": "x"}'))
    message = _error(_with_datasets(tmp_path, None, raw='[\n {"id": "x",}\n]'))
    assert "multidatabackend.json" in message and "line 2" in message


def test_dataset_file_missing(tmp_path):
    path = _json(tmp_path, {**GOOD, "data_backend_config": "missing.json"}, "with-datasets.json")
    message = _error(path)
    assert "dataset file not found" in message and "missing.json" in message


def test_no_dataset_source_says_what_to_set(tmp_path):
    message = _error(_json(tmp_path, GOOD, "with-datasets.json"))
    assert "data_backend_config" in message and "[[datasets]]" in message


def test_duplicate_dataset_ids(tmp_path):
    message = _error(_with_datasets(tmp_path, [IMAGES, {**IMAGES}]))
    assert "dataset id 'pics' is used 2 times" in message


@pytest.mark.parametrize("entries, phrase", [
    ([{**IMAGES, "text_embeds": "nope"}], "text_embeds 'nope' names no dataset"),
    ([{**IMAGES, "text_embeds": "pics2"}, {"id": "pics2", "instance_data_dir": "."}], "must name a text_embeds"),
    ([{**IMAGES, "text_embeds": "t"}, {"id": "t", "dataset_type": "text_embeds", "disabled": True}],
     "names a disabled dataset"),
    ([{**IMAGES, "conditioning_data": "masks"}], "conditioning_data 'masks' names no dataset"),
    ([{"id": "t", "dataset_type": "text_embeds"}], "no enabled image dataset"),
    ([IMAGES, {"id": "t1", "dataset_type": "text_embeds", "default": True},
      {"id": "t2", "dataset_type": "text_embeds", "default": True}], "several text_embeds datasets are marked default"),
])
def test_dataset_references_must_resolve(tmp_path, entries, phrase):
    assert phrase in _error(_with_datasets(tmp_path, entries))


def test_bare_flag_for_an_option_that_takes_a_value():
    message = _error(None, ["--model_family", "sdxl", "--pretrained_model_name_or_path", "a/b", "--lora_rank",
                            "--use_ema"])
    assert "lora_rank: true is not accepted (from command line)" in message and "--lora_rank VALUE" in message


def test_union_value_error_is_said_once(tmp_path):
    message = _error(_with_datasets(tmp_path, [{**IMAGES, "caption_filter_list": {"x": 1}}]))
    assert message.count("caption_filter_list") == 1
    assert "it takes text or list of text" in message


def test_dataset_nested_parquet_problems(tmp_path):
    message = _error(_with_datasets(tmp_path, [{**IMAGES, "caption_strategy": "parquet",
                                                "parquet": {"caption_colum": "text"}}]))
    assert "missing required option parquet.path" in message
    assert "unknown option 'parquet.caption_colum'" in message and "did you mean caption_column" in message
    assert "--parquet" not in message  # dataset entries are not set from the command line


# ---- the corpus: every mistake of tests/data/bad_configs.py, through the real CLI in its own process ----
_CORPUS = runpy.run_path(str(Path(__file__).parent / "data" / "bad_configs.py"))
_PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c49444154789c63f8cf"
                     "c0000003010100c9fe92ef0000000049454e44ae426082")  # a 1x1 red PNG


def _write_case(root: Path, row: dict) -> Path:
    (root / "images").mkdir()
    (root / "images" / "a.png").write_bytes(_PNG)
    (root / "empty").mkdir()
    for name, text in row.get("files", {}).items():
        (root / name).write_text(text)
    (root / "multidatabackend.json").write_text(json.dumps(row.get("datasets", _CORPUS["GOOD_DATASETS"])))
    if "raw" in row:
        name, text = row["raw"]
        (root / name).write_text(text)
        return root / name
    options = {**GOOD, "data_backend_config": "multidatabackend.json", "max_train_steps": 10, **row.get("options", {})}
    (root / "config.json").write_text(json.dumps(options))
    return root / "config.json"


@pytest.mark.parametrize("row", _CORPUS["ROWS"], ids=[row["name"] for row in _CORPUS["ROWS"]])
def test_bad_configuration_corpus(tmp_path, row):
    config = _write_case(tmp_path, row)
    code = ("import sys\n"
            f"for name in {row.get('block', [])!r}:\n"
            "    sys.modules[name] = None  # as if the package were not installed\n"
            "from simpletuner.cli import main\n"
            f"raise SystemExit(main(['config', 'check', {str(config)!r}, *{row.get('overrides', [])!r}]))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(simpletuner.__file__).parents[1])}  # these sources, from any folder
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env=env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == row.get("lines", 1), result.stderr[:3000]
    assert result.stderr.startswith("error: ") and row["expect"] in result.stderr, result.stderr[:3000]
