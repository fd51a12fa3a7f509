"""Every file form loads to the same configuration; overrides win; datasets from both places."""

import json
from pathlib import Path

import pytest
import tomli_w

from simpletuner.config.compat import ENV_NAMES
from simpletuner.config.load import load_config, load_datasets, load_settings
from simpletuner.config.schema import DatasetConfig, TrainingConfig

OPTIONS = {
    "model_family": "sdxl",
    "model_type": "lora",
    "pretrained_model_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0",
    "learning_rate": 2e-4,
    "lora_rank": 8,
    "train_batch_size": 2,
    "gradient_checkpointing": True,
    "use_ema": False,
    "max_train_steps": 50,
    "validation_prompt": "a photo of a cat",
    "validation_resolution": "1024x768",
    "output_dir": "out/models",
    "resolution": 768,
    "base_model_precision": "int8-quanto",
    "snr_gamma": 5.0,
}

DATASETS = [
    {"id": "pics", "type": "local", "instance_data_dir": "images", "caption_strategy": "textfile",
     "resolution": 512, "crop": True, "crop_style": "center", "repeats": 2},
    {"id": "embeds", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    {"id": "old", "type": "local", "instance_data_dir": "elsewhere", "disabled": True},
]

ENV_FOR = {option: name for name, option in ENV_NAMES.items()}


def _env_text(options: dict) -> str:
    lines = ["# SimpleTuner config.env", ""]
    for key, value in options.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        lines.append(f'export {ENV_FOR.get(key, key.upper())}="{text}"')
    return "\n".join(lines) + "\n"


def _write(folder: Path, form: str, options: dict) -> Path:
    if form == "toml":
        path = folder / "config.toml"
        path.write_text(tomli_w.dumps(options))
    elif form == "json":
        path = folder / "config.json"
        path.write_text(json.dumps(options))
    elif form == "dashed-json":
        path = folder / "config.json"
        path.write_text(json.dumps({f"--{k}": v for k, v in options.items()}))
    elif form == "stringly-json":  # SimpleTuner's examples quote numbers and booleans
        path = folder / "config.json"
        path.write_text(json.dumps({f"--{k}": str(v).lower() if isinstance(v, bool) else str(v)
                                    for k, v in options.items()}))
    else:
        path = folder / "config.env"
        path.write_text(_env_text(options))
    return path


@pytest.mark.parametrize("form", ["toml", "json", "dashed-json", "stringly-json", "env"])
def test_every_file_form_loads_the_same_options(tmp_path, form):
    config = load_config(_write(tmp_path, form, OPTIONS))
    expected = TrainingConfig(**OPTIONS)
    assert config == expected
    assert config.learning_rate == 2e-4 and config.gradient_checkpointing is True and config.use_ema is False
    assert config.resolution == 768.0 and config.max_train_steps == 50


@pytest.mark.parametrize("form", ["toml", "json", "env"])
def test_command_line_overrides_beat_the_file(tmp_path, form):
    path = _write(tmp_path, form, OPTIONS)
    config = load_config(path, ["--learning_rate", "3e-5", "--lora_rank=4", "--use_ema",
                                "--gradient_checkpointing", "false", "--seed", "-1"])
    assert config.learning_rate == 3e-5
    assert config.lora_rank == 4
    assert config.use_ema is True
    assert config.gradient_checkpointing is False
    assert config.seed == -1
    assert config.train_batch_size == 2  # untouched options keep the file's value


def test_configuration_from_the_command_line_alone():
    config = load_config(None, ["--model_family", "flux", "--pretrained_model_name_or_path", "org/model",
                                "--learning-rate", "1e-3"])
    assert (config.model_family, config.learning_rate) == ("flux", 1e-3)


@pytest.mark.parametrize("text, expected", [
    ("false", False), ("False", False), ("FALSE", False), ("0", False), ("no", False), ("off", False),
    ("true", True), ("True", True), ("1", True), ("yes", True), ("on", True),
])
def test_string_booleans_are_booleans(tmp_path, text, expected):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**OPTIONS, "gradient_checkpointing": text, "push_to_hub": text}))
    config = load_config(path)
    assert config.gradient_checkpointing is expected
    assert config.push_to_hub is expected


def test_numbers_given_as_strings_and_text_given_as_numbers(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**OPTIONS, "lora_rank": "32", "learning_rate": "1e-4", "validation_resolution": 1024,
                                "aspect_bucket_alignment": "32", "validation_seed": None, "lora_type": "LyCORIS"}))
    config = load_config(path)
    assert config.lora_rank == 32 and config.learning_rate == 1e-4
    assert config.validation_resolution == "1024"
    assert config.aspect_bucket_alignment == 32
    assert config.validation_seed == 42  # null means "SimpleTuner's default": ours
    assert config.lora_type == "lycoris"


def test_simpletuner_zero_epochs_means_unset(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**OPTIONS, "--num_train_epochs": 0, "--max_train_steps": 100}))
    config = load_config(path)
    assert config.num_train_epochs is None and config.max_train_steps == 100


def test_config_env_in_simpletuner_style(tmp_path):
    (tmp_path / "config.env").write_text(
        "# comment\n"
        "export MODEL_TYPE='lora'\n"
        "export FLUX=true\n"
        "export STABLE_DIFFUSION_3=false\n"
        'export MODEL_NAME="black-forest-labs/FLUX.1-dev"\n'
        "export LEARNING_RATE=8e-7 #@param {type:\"number\"}\n"
        'export TRACKER_PROJECT_NAME="${MODEL_TYPE}-training"\n'
        "export HUB_MODEL_NAME=$TRACKER_PROJECT_NAME\n"
        "export RESOLUTION=1024\n"
        "export MINIMUM_RESOLUTION=$RESOLUTION\n"
        "export USE_GRADIENT_CHECKPOINTING=true\n"
        "MAX_NUM_STEPS=30\n"
        "export NUM_EPOCHS=0\n"
        'export TRAINER_EXTRA_ARGS=""\n'
        'export TRAINER_EXTRA_ARGS="${TRAINER_EXTRA_ARGS} --lora_rank=4 --use_ema"\n'
        "export TRAINER_EXTRA_ARGS=\"${TRAINER_EXTRA_ARGS} --validation_prompt='a cat in a hat'\"\n"
        "export TRAINING_NUM_PROCESSES=1\n"
    )
    config = load_config(tmp_path / "config.env")
    assert config.model_family == "flux" and config.model_type == "lora"
    assert config.pretrained_model_name_or_path == "black-forest-labs/FLUX.1-dev"
    assert config.learning_rate == 8e-7
    assert config.tracker_project_name == "lora-training" and config.hub_model_id == "lora-training"
    assert config.minimum_image_size == 1024
    assert config.max_train_steps == 30 and config.num_train_epochs is None
    assert config.lora_rank == 4 and config.use_ema is True
    assert config.validation_prompt == "a cat in a hat"


def test_legacy_switches_are_translated(tmp_path):
    path = tmp_path / "config.json"
    options = {k: v for k, v in OPTIONS.items() if k != "model_family"}
    path.write_text(json.dumps({**options, "--sd3": "true", "--offset_noise": True, "--flux": False}))
    config = load_config(path)
    assert config.model_family == "sd3"
    assert config.noise_offset == 0.1  # SimpleTuner's default under --offset_noise
    assert load_config(path, ["--noise_offset", "0.05"]).noise_offset == 0.05


def test_harmless_simpletuner_options_load_with_a_warning(tmp_path, caplog):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**OPTIONS, "--disable_benchmark": "false", "--validation_torch_compile": "false",
                                "--attention_mechanism": "diffusers", "--use_8bit_adam": False}))
    with caplog.at_level("WARNING", logger="simpletuner"):
        config = load_config(path)
    assert config.validation_torch_compile is False
    text = caplog.text
    assert "disable_benchmark" in text and "attention_mechanism" in text and "use_8bit_adam" in text


def _dataset_files(folder: Path) -> None:
    (folder / "images").mkdir()
    (folder / "multidatabackend.json").write_text(json.dumps(DATASETS))


def test_multidatabackend_json_resolved_beside_the_config(tmp_path, monkeypatch):
    _dataset_files(tmp_path)
    path = _write(tmp_path, "dashed-json", {**OPTIONS, "data_backend_config": "multidatabackend.json"})
    monkeypatch.chdir("/")
    settings = load_settings(path)
    assert [d.id for d in settings.datasets] == ["pics", "embeds"]
    assert [d.id for d in settings.disabled_datasets] == ["old"]
    assert settings.datasets_path == (tmp_path / "multidatabackend.json").resolve()
    pics = settings.datasets[0]
    assert pics.instance_data_dir == str((tmp_path / "images").resolve())
    assert (pics.caption_strategy, pics.resolution, pics.crop, pics.crop_style, pics.repeats) == (
        "textfile", 512, True, "center", 2)
    assert [d.id for d in load_datasets(settings.training, path)] == ["pics", "embeds"]
    assert [d.id for d in load_datasets(settings.training, path, include_disabled=True)] == ["pics", "embeds", "old"]


def test_dataset_path_relative_to_working_directory_as_simpletuner_does(tmp_path, monkeypatch):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "multidatabackend.json").write_text(json.dumps(DATASETS))
    (tmp_path / "images").mkdir()
    path = _write(tmp_path / "config", "dashed-json", {**OPTIONS, "data_backend_config": "config/multidatabackend.json"})
    monkeypatch.chdir(tmp_path)
    settings = load_settings(path)
    assert settings.datasets_path == (tmp_path / "config" / "multidatabackend.json").resolve()
    assert settings.datasets[0].instance_data_dir == str((tmp_path / "images").resolve())


def test_datasets_as_toml_tables(tmp_path):
    (tmp_path / "images").mkdir()
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps({**OPTIONS, "datasets": DATASETS}))
    settings = load_settings(path)
    assert [d.id for d in settings.all_datasets] == ["pics", "embeds", "old"]
    assert settings.datasets_path == path.resolve()
    assert settings.datasets[0] == DatasetConfig(**{**DATASETS[0], "instance_data_dir": str((tmp_path / "images").resolve())})
    assert [d.id for d in load_datasets(settings.training, path)] == ["pics", "embeds"]


def test_simpletuner_default_dataset_file_is_found_beside_the_config(tmp_path):
    _dataset_files(tmp_path)
    settings = load_settings(_write(tmp_path, "toml", OPTIONS))
    assert settings.datasets_path == (tmp_path / "multidatabackend.json").resolve()


def test_dataset_entry_spellings_and_string_values(tmp_path):
    entries = [{"id": "a", "instance_data_dir": str(tmp_path), "crop": "false", "repeats": "3",
                "caption_strategy": "instance_prompt", "instance_prompt": "sks dog", "disable": "false",
                "preserve_data_backend_cache": True}]
    (tmp_path / "multidatabackend.json").write_text(json.dumps(entries))
    settings = load_settings(_write(tmp_path, "toml", OPTIONS))
    (dataset,) = settings.datasets
    assert (dataset.crop, dataset.repeats, dataset.caption_strategy, dataset.disabled) == (
        False, 3, "instanceprompt", False)


def test_local_dataset_paths_resolved_beside_the_dataset_file_and_s3_left_alone(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "captions.parquet").write_bytes(b"")
    (tmp_path / "data" / "filters.txt").write_text("watermark\n")
    entries = [
        {"id": "local", "instance_data_dir": "images", "caption_strategy": "parquet",
         "parquet": {"path": "data/captions.parquet"}, "caption_filter_list": "data/filters.txt"},
        {"id": "bucket", "type": "aws", "aws_bucket_name": "photos", "aws_data_prefix": "set1/",
         "caption_strategy": "parquet", "parquet": {"path": "meta/captions.parquet"}},
    ]
    (tmp_path / "images").mkdir()
    (tmp_path / "multidatabackend.json").write_text(json.dumps(entries))
    monkeypatch.chdir("/")
    local, bucket = load_settings(_write(tmp_path, "toml", OPTIONS)).datasets
    assert local.parquet.path == str((tmp_path / "data" / "captions.parquet").resolve())
    assert local.caption_filter_list == str((tmp_path / "data" / "filters.txt").resolve())
    assert bucket.parquet.path == "meta/captions.parquet"
    assert bucket.location() == "s3://photos/set1"


def test_training_files_beside_the_config_become_absolute(tmp_path):
    _dataset_files(tmp_path)
    (tmp_path / "lycoris.json").write_text('{"algo": "lokr"}')
    config = load_settings(_write(tmp_path, "toml", {**OPTIONS, "lora_type": "lycoris",
                                                     "lycoris_config": "lycoris.json"})).training
    assert config.lycoris_config == str((tmp_path / "lycoris.json").resolve())
    assert config.pretrained_model_name_or_path == OPTIONS["pretrained_model_name_or_path"]  # a Hub id stays


def test_env_argument_lists_win_over_variables_as_in_simpletuner(tmp_path):
    path = tmp_path / "config.env"
    path.write_text('export TRAINER_EXTRA_ARGS="--learning_rate=5e-5"\nexport MODEL_FAMILY=sdxl\n'
                    'export MODEL_NAME=a/b\nexport LEARNING_RATE=1e-3\n')
    assert load_config(path).learning_rate == 5e-5
    assert load_config(path, ["--learning_rate", "2e-6"]).learning_rate == 2e-6
