"""`simpletuner config check` through the real CLI in a subprocess: exit codes, messages, summary, no torch."""

import json
import subprocess
import sys

import pytest

from simpletuner.config.check import check_settings, looks_local
from simpletuner.config.load import load_settings

GOOD = {
    "--model_family": "sdxl",
    "--model_type": "lora",
    "--pretrained_model_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0",
    "--output_dir": "output/models",
    "--data_backend_config": "multidatabackend.json",
    "--resolution": 1024,
    "--max_train_steps": 100,
}


PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c49444154789c63f8cf"
                    "c0000003010100c9fe92ef0000000049454e44ae426082")  # a 1x1 red PNG


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "simpletuner", *args], capture_output=True, text=True, cwd=cwd)


def _setup(tmp_path, options=None, datasets=None):
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "images" / "a.png").write_bytes(PNG)
    datasets = datasets if datasets is not None else [
        {"id": "photos", "type": "local", "instance_data_dir": "images", "resolution": 512,
         "caption_strategy": "textfile"},
        {"id": "embeds", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]
    (tmp_path / "multidatabackend.json").write_text(json.dumps(datasets))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(options if options is not None else GOOD))
    return path


def test_good_configuration_exits_0_with_a_summary(tmp_path):
    path = _setup(tmp_path)
    result = _cli("config", "check", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "model: sdxl, lora (standard, rank 16)" in out
    assert "base model: stabilityai/stable-diffusion-xl-base-1.0" in out
    assert f"photos [image]: {(tmp_path / 'images').resolve()} at 512 (pixel_area)" in out
    assert "text embeds: cache/text (the default text_embeds dataset)" in out
    assert "output: output/models" in out


def test_overrides_after_the_file_are_applied(tmp_path):
    path = _setup(tmp_path)
    result = _cli("config", "check", str(path), "--lora_rank", "4", "--output_dir=elsewhere")
    assert result.returncode == 0, result.stderr
    assert "rank 4" in result.stdout and "output: elsewhere" in result.stdout


@pytest.mark.parametrize("options, datasets, phrase", [
    ({**GOOD, "--learning_rat": 1}, None, "did you mean learning_rate?"),
    ({**GOOD, "--pretrained_model_name_or_path": "./no/such/model"}, None, "'./no/such/model' does not exist"),
    (GOOD, [{"id": "photos", "instance_data_dir": "missing-folder"}], "instance_data_dir"),
    (GOOD, [{"id": "a", "instance_data_dir": "images"}, {"id": "a", "instance_data_dir": "images"}],
     "dataset id 'a' is used 2 times"),
    (GOOD, [{"id": "a", "instance_data_dir": "images", "text_embeds": "nope"}], "text_embeds 'nope' names no dataset"),
])
def test_bad_configuration_exits_2_without_traceback(tmp_path, options, datasets, phrase):
    path = _setup(tmp_path, options, datasets)
    result = _cli("config", "check", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert phrase in result.stderr
    assert result.stderr.startswith("error: ") or "\nerror: " in result.stderr


def test_broken_file_exits_2_without_traceback(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("model_family = \n")
    result = _cli("config", "check", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(path) in result.stderr and "line 1" in result.stderr


def test_missing_file_exits_2(tmp_path):
    result = _cli("config", "check", str(tmp_path / "absent.json"))
    assert result.returncode == 2 and "not found" in result.stderr and "Traceback" not in result.stderr


def test_image_dataset_without_text_embeds_uses_the_default_location(tmp_path):
    path = _setup(tmp_path, datasets=[{"id": "photos", "instance_data_dir": "images"}])
    result = _cli("config", "check", str(path))
    assert result.returncode == 0, result.stderr
    assert "text embeddings will be cached under cache/text" in result.stdout


def test_hub_ids_need_no_network_and_paths_are_checked(tmp_path):
    assert not looks_local("stabilityai/stable-diffusion-xl-base-1.0")
    assert looks_local("./model") and looks_local("/models/x") and looks_local("~/x")
    path = _setup(tmp_path)
    model = tmp_path / "model"
    model.mkdir()
    settings = load_settings(path, ["--pretrained_model_name_or_path", str(model),
                                    "--pretrained_vae_model_name_or_path", "madebyollin/sdxl-vae-fp16-fix"])
    assert check_settings(settings).problems == []
    settings = load_settings(path, ["--pretrained_vae_model_name_or_path", "not a model id"])
    assert any("neither an existing local path nor a Hub id" in p for p in check_settings(settings).problems)


def test_check_and_options_import_no_heavy_library(tmp_path):
    path = _setup(tmp_path)
    code = (
        "import sys\n"
        "from simpletuner.cli import main\n"
        f"assert main(['config', 'check', {str(path)!r}]) == 0\n"
        "main(['options'])\n"
        "import simpletuner.config.load, simpletuner.config.check, simpletuner.config.describe\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


def test_missing_parquet_and_filter_files_are_reported(tmp_path):
    path = _setup(tmp_path, datasets=[{"id": "photos", "instance_data_dir": "images", "caption_strategy": "parquet",
                                       "parquet": {"path": "nope.parquet"}, "caption_filter_list": "nope.txt"}])
    problems = check_settings(load_settings(path)).problems
    assert any("parquet.path" in p and "nope.parquet" in p and "does not exist" in p for p in problems)
    assert any("caption_filter_list" in p and "nope.txt" in p for p in problems)


def test_conditioning_pairs_and_unpaired_conditioning_is_noted(tmp_path):
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a.png").write_bytes(PNG)
    entries = [{"id": "photos", "instance_data_dir": "images", "conditioning_data": "masks"},
               {"id": "masks", "instance_data_dir": "masks", "dataset_type": "conditioning", "conditioning_type": "mask"},
               {"id": "edges", "instance_data_dir": "masks", "dataset_type": "conditioning"}]
    report = check_settings(load_settings(_setup(tmp_path, datasets=entries)))
    # pairing resolves; a mask partner trains with masked loss, so nothing is refused
    assert not any("conditioning_data" in problem for problem in report.problems), report.problems
    assert any("'edges' is paired with no image dataset" in note for note in report.notes)
    assert not any("'masks' is paired" in note for note in report.notes)


def test_prior_loss_weight_without_class_data_is_noted(tmp_path):
    unused = check_settings(load_settings(_setup(tmp_path, options={**GOOD, "prior_loss_weight": 0.5})))
    assert "prior_loss_weight is set but no dataset has is_class_data: it weights nothing" in unused.notes
    used = check_settings(load_settings(_setup(tmp_path, options={**GOOD, "prior_loss_weight": 0.5}, datasets=[
        {"id": "photos", "instance_data_dir": "images"},
        {"id": "dogs", "instance_data_dir": "images", "is_class_data": True}])))
    assert not any("prior_loss_weight" in note for note in used.notes)
