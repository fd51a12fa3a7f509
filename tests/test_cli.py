import json
import subprocess
import sys

import pytest

from simpletuner.cli import main


def test_help_answers_without_importing_torch():
    code = (
        "import sys\n"
        "from simpletuner.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "train" in out and "scan" in out
    assert "HEAVY []" in out


def test_version():
    import simpletuner

    result = subprocess.run([sys.executable, "-m", "simpletuner", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"simpletuner {simpletuner.__version__}"


@pytest.mark.parametrize("argv", [["--bogus"], ["-v"], ["--bogus", "train", "config.toml"]])
def test_unknown_top_level_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert f"unrecognized arguments: {argv[0]}" in capsys.readouterr().err


def _cache_config(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "multidatabackend.json").write_text(json.dumps([
        {"id": "pics", "instance_data_dir": str(tmp_path / "images")},
        {"id": "captions", "dataset_type": "text_embeds", "default": True}]))
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_family": "sdxl", "pretrained_model_name_or_path": "org/model",
                                "data_backend_config": str(tmp_path / "multidatabackend.json"),
                                "cache_dir": str(tmp_path / "cache")}))
    return str(path)


@pytest.mark.parametrize("argv", [["cache", "verify", "--repair", "CONFIG"], ["cache", "prune", "--dry-run", "CONFIG"],
                                  ["cache", "verify", "--repair", "CONFIG", "--cache_dir", "CACHE"]])
def test_cache_actions_keep_the_config_after_a_flag(tmp_path, capsys, argv):
    import torch

    from simpletuner.cache.store import TensorStore

    config = _cache_config(tmp_path)
    with TensorStore(str(tmp_path / "cache" / "vae" / "gone")).writer("w") as writer:  # a store no dataset uses
        writer.put("0" * 32, {"mean": torch.zeros(1)})
    argv = [config if a == "CONFIG" else str(tmp_path / "cache") if a == "CACHE" else a for a in argv]
    assert main(argv) == 0, capsys.readouterr().err
    assert str(tmp_path / "cache") in capsys.readouterr().out  # the configuration's caches were looked at
