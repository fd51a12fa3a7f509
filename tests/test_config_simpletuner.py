"""SimpleTuner's current-release conventions: model flavours, path variables, config/examples paths, its
harmless options, and one round of `config check` for every problem of a file."""

import json
from pathlib import Path

import pytest
from PIL import Image

from simpletuner.config.check import check_file
from simpletuner.config.load import load_settings
from simpletuner.errors import ConfigError
from simpletuner.models import flavours
from simpletuner.models.registry import FAMILIES, flavour_problem, get_family, resolve_checkpoint

BASE = {"model_family": "flux", "model_type": "lora", "max_train_steps": 10}


def _files(folder: Path, options: dict, datasets: list | None = None) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64)).save(folder / "images" / "one.png")  # `config check` refuses an empty folder
    datasets = datasets if datasets is not None else [
        {"id": "pics", "type": "local", "instance_data_dir": "images"},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]
    (folder / "multidatabackend.json").write_text(json.dumps(datasets))
    path = folder / "config.json"
    path.write_text(json.dumps({"data_backend_config": "multidatabackend.json", **options}))
    return path


# ---- model flavours --------------------------------------------------------------------------------------
def test_each_family_carries_its_flavour_table():
    for name in FAMILIES:
        assert type(get_family(name)).flavours is flavours.BY_FAMILY[name], name


@pytest.mark.parametrize("family, flavour, checkpoint", [
    ("sdxl", None, "stabilityai/stable-diffusion-xl-base-1.0"),
    ("sdxl", "refiner-1.0", "stabilityai/stable-diffusion-xl-refiner-1.0"),
    ("flux", None, "black-forest-labs/flux.1-dev"),
    ("flux", "schnell", "black-forest-labs/flux.1-schnell"),
    ("sd3", None, "stabilityai/stable-diffusion-3.5-medium"),
    ("kolors", "1.0", "terminusresearch/kwai-kolors-1.0"),
    ("pixart_sigma", None, "terminusresearch/pixart-900m-1024-ft-v0.6"),
    ("sd1x", None, "Lykon/dreamshaper-8"),
    ("sd2x", "2.1", "stabilityai/stable-diffusion-2-1"),
    ("deepfloyd", "i-medium-400m", "DeepFloyd/IF-I-M-v1.0"),
])
def test_flavour_names_the_checkpoint_as_simpletuner_does(tmp_path, family, flavour, checkpoint):
    options = {**BASE, "model_family": family} | ({"model_flavour": flavour} if flavour else {})
    settings = load_settings(_files(tmp_path, options))
    assert settings.training.pretrained_model_name_or_path is None
    assert resolve_checkpoint(settings.training).pretrained_model_name_or_path == checkpoint


def test_a_given_path_wins_over_the_flavour(tmp_path):
    settings = load_settings(_files(tmp_path, {**BASE, "model_flavour": "schnell",
                                               "pretrained_model_name_or_path": "me/my-flux"}))
    assert resolve_checkpoint(settings.training).pretrained_model_name_or_path == "me/my-flux"


@pytest.mark.parametrize("options, phrase", [
    ({"model_flavour": "kontext"}, "Flux Kontext"),
    ({"model_flavour": "kontext", "pretrained_model_name_or_path": "black-forest-labs/flux.1-kontext-dev"},
     "Flux Kontext"),
    ({"model_flavour": "pro"}, "accepted: dev, schnell"),
    ({"model_family": "deepfloyd"}, "has no default checkpoint: set model_flavour (one of i-medium-400m"),
])
def test_flavours_we_cannot_train_are_refused_by_name(tmp_path, options, phrase):
    training = load_settings(_files(tmp_path, {**BASE, **options})).training
    assert phrase in flavour_problem(training)
    with pytest.raises(ConfigError, match="model_flavour|model_family"):
        resolve_checkpoint(training)


# ---- paths -----------------------------------------------------------------------------------------------
def test_path_variables_in_dataset_cache_paths_are_expanded(tmp_path):
    datasets = [{"id": "pics", "type": "local", "instance_data_dir": "images",
                 "cache_dir_vae": "cache/vae/{model_family}/{id}"},
                {"id": "text", "dataset_type": "text_embeds", "default": True,
                 "cache_dir": "{output_dir}/text/{model_family}"}]
    settings = load_settings(_files(tmp_path, {**BASE, "output_dir": "out/run"}, datasets))
    pics, text = settings.datasets
    assert pics.cache_dir_vae == "cache/vae/flux/pics"
    assert text.cache_dir == "out/run/text/flux"


def test_an_unknown_path_variable_is_an_error_naming_the_variables(tmp_path):
    datasets = [{"id": "pics", "type": "local", "instance_data_dir": "images", "cache_dir_vae": "cache/{family}"}]
    with pytest.raises(ConfigError) as caught:
        load_settings(_files(tmp_path, BASE, datasets))
    assert "cache_dir_vae 'cache/{family}' names {family}" in str(caught.value)
    assert "{model_family}, {output_dir}, {id}" in str(caught.value)


def test_config_examples_paths_are_read_in_the_examples_folder(tmp_path, monkeypatch):
    # SimpleTuner's examples live in examples/<name>/config.json and name "config/examples/<file>".
    examples = tmp_path / "examples"
    (examples / "pics").mkdir(parents=True)
    (examples / "datasets.json").write_text(json.dumps([
        {"id": "pics", "type": "local", "instance_data_dir": str(examples / "pics")}]))
    (examples / "mine").mkdir()
    (examples / "mine" / "lycoris.json").write_text("{}")
    config = examples / "mine" / "config.json"
    config.write_text(json.dumps({**BASE, "data_backend_config": "config/examples/datasets.json",
                                  "lora_type": "lycoris", "lycoris_config": "config/examples/mine/lycoris.json"}))
    monkeypatch.chdir(tmp_path)
    settings = load_settings(config)
    assert settings.datasets_path == (examples / "datasets.json").resolve()
    assert settings.training.lycoris_config == str((examples / "mine" / "lycoris.json").resolve())


def test_a_trailing_comma_is_accepted_with_a_warning(tmp_path, caplog):
    path = _files(tmp_path, BASE)
    path.write_text(path.read_text()[:-1] + ",\n}\n")
    with caplog.at_level("WARNING", logger="simpletuner"):
        assert load_settings(path).training.max_train_steps == 10
    assert "trailing comma" in caplog.text


# ---- harmless and refused options --------------------------------------------------------------------------
HARMLESS = {"hub_model_id": "me/lora", "push_to_hub": False, "validation_disable_unconditional": True,
            "num_eval_images": 25, "quantize_via": "cpu", "fuse_qkv_projections": False,
            "conditioning_multidataset_sampling": "random", "gradient_checkpointing_interval": 2,
            "lr_end": 1e-6, "lr_scheduler": "constant", "checkpoint_step_interval": 20,
            "validation_step_interval": 40, "tread_config": None}


def test_harmless_current_release_options_are_accepted(tmp_path):
    report, loaded = check_file(_files(tmp_path, {**BASE, **HARMLESS}))
    assert report.problems == []
    assert loaded.training.checkpointing_steps == 20 and loaded.training.validation_steps == 40
    ignored = " ".join(loaded.warnings)
    for name in ("validation_disable_unconditional", "conditioning_multidataset_sampling"):
        assert name in ignored
    assert loaded.training.num_eval_images == 25  # an option of its own now (ControlNet validation)
    assert loaded.training.gradient_checkpointing_interval == 2  # an option of its own now


def test_publishing_options_are_accepted(tmp_path):
    options = {"push_to_hub": True, "hub_model_id": "me/lora", "push_checkpoints_to_hub": True,
               "model_card_private": True, "model_card_note": "note", "model_card_safe_for_work": True,
               "webhook_config": '{"webhook_type": "raw", "callback_url": "http://127.0.0.1:1/hook"}',
               "webhook_reporting_interval": 10}
    report, loaded = check_file(_files(tmp_path, {**BASE, **options}))
    assert report.problems == []
    assert loaded.training.push_to_hub and loaded.training.model_card_private
    assert not any("model_card_private" in warning for warning in loaded.warnings)


@pytest.mark.parametrize("options, phrase", [
    ({"lr_end": 1e-6, "lr_scheduler": "polynomial"}, "lr_end = 1e-06: a final learning rate"),
    ({"tread_config": {"routes": []}}, "tread_config (TREAD (token routing) is not built"),
    ({"fuse_qkv_projections": True, "base_model_precision": "int8-quanto"},
     "fuse_qkv_projections=true with model_type 'lora' cannot be combined with base_model_precision"),
    ({"conditioning_multidataset_sampling": "combined"}, "combined sampling is not built"),
    ({"flux_lora_target": "all+ffs+embedder+controlnet"}, "adapters on the embedders are not built"),
    ({"flux_lora_target": "controlnet"}, "flux_lora_target='controlnet' adapts a ControlNet's control layers and "
                                         "needs controlnet=true"),
])
def test_options_that_ask_for_a_feature_not_built_are_refused_by_name(tmp_path, options, phrase):
    report, _ = check_file(_files(tmp_path, {**BASE, **options}))
    assert any(phrase in problem for problem in report.problems), report.problems


def test_one_round_reports_training_dataset_and_unbuilt_problems_together(tmp_path):
    datasets = [{"id": "pics", "type": "local", "instance_data_dir": "missing", "crop_stlye": "center"},
                {"id": "text", "dataset_type": "text_embeds", "default": True}]
    report, _ = check_file(_files(tmp_path, {**BASE, "learning_rat": 1e-4, "validation_randomize": True}, datasets))
    text = "\n".join(report.problems)
    assert "unknown option 'learning_rat'" in text          # training options
    assert "unknown option 'crop_stlye'" in text            # the dataset file
    assert "validation_randomize = True" in text              # a feature not built yet
    assert len(report.problems) == 3


def test_train_refuses_a_flavour_it_cannot_train_before_any_work(tmp_path, capsys):
    from simpletuner.cli import main

    config = _files(tmp_path, {**BASE, "model_flavour": "kontext", "output_dir": str(tmp_path / "out"),
                               "mixed_precision": "no"})
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "model_flavour 'kontext': Flux Kontext" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, phrase", [
    ({"model_flavour": "kontext"}, "missing required option model_family"),
    ({"model_family": ["flux"], "model_flavour": ["dev"]}, "model_family: ['flux'] is not accepted"),
])
def test_one_round_still_works_when_model_family_itself_is_missing_or_wrong(tmp_path, capsys, options, phrase):
    from simpletuner.cli import main

    assert main(["config", "check", str(_files(tmp_path, options))]) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err


def test_options_written_as_text_are_read_as_their_field_reads_them_in_a_failing_file(tmp_path):
    # config.env-style text values beside a bad option: "false" asks for nothing, "true" is still refused
    report, _ = check_file(_files(tmp_path, {**BASE, "learning_rat": 1, "push_to_hub": "false",
                                             "validation_randomize": "true"}))
    text = "\n".join(report.problems)
    assert "learning_rat" in text and "validation_randomize = True" in text
    assert "push_to_hub" not in text
