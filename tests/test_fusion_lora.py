"""fuse_qkv_projections with a LoRA: the adapter trains on the fused layers and is saved split into the q, k
and v LoRAs an unfused run writes, applying exactly the delta the fused model trained."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_fusion import _denoiser, _inputs
from test_lora_export import _merged, _train_like
from train_helpers import metrics, resumed_losses, write_run

from simpletuner.cli import main
from simpletuner.config.schema import TrainingConfig
from simpletuner.errors import UserError
from simpletuner.models.registry import get_family
from simpletuner.publish.export import trained_lora, write_lora_files
from simpletuner.train.adapters import LORA_WEIGHTS, Trained, TrainedLora, apply_lora, merge_lora
from simpletuner.train.fusion import fuse_qkv, fused_adapter_targets

# (tiny model, options, use_dora); the presets cover image attention (to_qkv), the text stream's
# to_added_qkv (Flux "all") and cross-attention's to_kv beside an unfused to_q (PixArt, SDXL)
CASES = [("sd3", {"unet_lora_target": "attention"}, False), ("sd3", {"unet_lora_target": "attention+ffs"}, True),
         ("flux", {"flux_lora_target": "all"}, False), ("flux", {"flux_lora_target": "mmdit"}, True),
         ("pixart_sigma", {"unet_lora_target": "attention"}, False), ("sdxl", {"unet_lora_target": "attention"}, True)]


def _lora(family, denoiser, fused: bool, use_dora: bool, cfg, pipeline_class: str) -> TrainedLora:
    targets, excluded = list(family.adapter_targets(cfg)), []
    if fused:
        fuse_qkv(denoiser)
        targets, excluded = fused_adapter_targets(denoiser, targets)
    apply_lora(denoiser, rank=4, alpha=2, use_dora=use_dora, target_modules=targets, exclude_modules=excluded)
    _train_like(denoiser)
    components = SimpleNamespace(pipeline_class=pipeline_class)
    return trained_lora(family, components, Trained("lora", denoiser, denoiser), {"modelspec.title": "t"})


def _pipeline_class(path) -> str:
    return json.loads((path / "model_index.json").read_text())["_class_name"]


@pytest.mark.parametrize("case", CASES, ids=["-".join([c[0], *c[1].values()] + (["dora"] if c[2] else []))
                                             for c in CASES])
def test_split_lora_has_the_unfused_keys_and_applies_the_fused_delta(tmp_path, tiny_model, case):
    tiny, options, use_dora = case
    family = get_family(tiny.removesuffix("_sigma") if tiny != "pixart_sigma" else "pixart_sigma")
    cfg = TrainingConfig(model_family=family.name, pretrained_model_name_or_path="x", **options)
    inputs = _inputs(_denoiser(tiny_model(tiny)), tiny)

    fused_model = _denoiser(tiny_model(tiny))
    split = _lora(family, fused_model, True, use_dora, cfg, _pipeline_class(tiny_model(tiny)))
    name = family.denoiser_name()
    assert any(".to_qkv." in key for key, _ in fused_model.named_parameters())  # the adapter is on the fused layer
    plain = _lora(family, _denoiser(tiny_model(tiny)), False, use_dora, cfg, _pipeline_class(tiny_model(tiny)))
    # the keys, shapes and configuration of an unfused run's LoRA
    assert {k: v.shape for k, v in split.layers[name].items()} == {k: v.shape for k, v in plain.layers[name].items()}
    assert split.configs == plain.configs
    assert split.base_weights.keys() == plain.base_weights.keys()
    for module in split.base_weights.get(name, {}):
        torch.testing.assert_close(split.base_weights[name][module], plain.base_weights[name][module])

    with torch.no_grad():
        trained = fused_model(**inputs, return_dict=False)[0]
        applied = merge_lora(_denoiser(tiny_model(tiny)), split.layers[name], split.configs[name])
        torch.testing.assert_close(applied(**inputs, return_dict=False)[0], trained, rtol=1e-4, atol=1e-5)

    # the files an unfused run writes: the same keys in the diffusers file and the UI file
    formats = ["diffusers", "comfyui"]
    files = {which: write_lora_files(family, lora, tmp_path / which, formats) for which, lora in
             (("fused", split), ("plain", plain))}
    for fused_file, plain_file in zip(files["fused"], files["plain"]):
        if fused_file.is_file():
            mine, theirs = load_file(fused_file), load_file(plain_file)
            assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}, fused_file.name


@pytest.mark.parametrize("tiny", ["sd3", "flux"])
def test_the_pipeline_loads_the_split_file_and_predicts_as_the_fused_trained_model(tmp_path, tiny_model, tiny):
    from diffusers import DiffusionPipeline

    family = get_family(tiny)
    cfg = TrainingConfig(model_family=tiny, pretrained_model_name_or_path="x")
    fused_model = _denoiser(tiny_model(tiny))
    inputs = _inputs(fused_model, tiny)
    lora = _lora(family, fused_model, True, False, cfg, _pipeline_class(tiny_model(tiny)))
    write_lora_files(family, lora, tmp_path, ["diffusers"])
    pipeline = DiffusionPipeline.from_pretrained(tiny_model(tiny))
    pipeline.load_lora_weights(tmp_path, weight_name=LORA_WEIGHTS, adapter_name="t")
    loaded = pipeline.transformer
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs, return_dict=False)[0], fused_model(**inputs, return_dict=False)[0],
                                   rtol=1e-4, atol=1e-5)
    # each applied delta is the fused delta's rows
    fused_weights = _merged(fused_model, "default")
    applied = _merged(loaded, "t")
    for module, weight in fused_weights.items():
        if module.endswith(".to_qkv"):
            parts = [applied[module.replace("to_qkv", part)] for part in ("to_q", "to_k", "to_v")]
            torch.testing.assert_close(torch.cat(parts), weight, rtol=0, atol=1e-6)


def test_a_preset_naming_only_part_of_a_fused_layer_is_refused(tiny_model):
    model = _denoiser(tiny_model("sd3"))
    fuse_qkv(model)
    with pytest.raises(UserError, match="name to_q, to_k but not all of to_q, to_k, to_v"):
        fused_adapter_targets(model, ["to_q", "to_k"])


@pytest.mark.parametrize("options, refused", [
    ({"lora_type": "lycoris", "lycoris_config": "x.json", "init_lora": "x.safetensors"}, "init_lora with LyCORIS"),
    ({"base_model_precision": "int8-quanto"}, "base_model_precision 'int8-quanto'"),
])
def test_combinations_that_cannot_split_are_refused(tmp_path, tiny_model, capsys, options, refused):
    config = write_run(tmp_path, tiny_model("sd3"), "sd3", fuse_qkv_projections=True, **options)
    assert main(["config", "check", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"fuse_qkv_projections=true with model_type 'lora' cannot be combined with {refused}" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_fused_lora_training_exports_the_unfused_files_and_resumes_exactly(tmp_path, tiny_model):
    model = tiny_model("sd3")
    options = dict(max_train_steps=4, checkpointing_steps=2, disable_validation=True, images=6,
                   tokenizer_max_length=32, lora_format=["diffusers", "comfyui"])
    straight = write_run(tmp_path / "straight", model, "sd3", fuse_qkv_projections=True, **options)
    assert main(["train", str(straight)]) == 0
    dataset = tmp_path / "straight" / "dataset"
    plain = write_run(tmp_path / "plain", model, "sd3", dataset=dataset, **options)
    assert main(["train", str(plain)]) == 0
    out = {run: tmp_path / run / "output" for run in ("straight", "plain")}
    trained = load_file(out["straight"] / "checkpoints" / "step-000002" / "trained.safetensors")
    assert any(".to_qkv.lora_A." in key for key in trained) and not any(".to_q." in key for key in trained)
    for name in (LORA_WEIGHTS, *[p.name for p in out["plain"].glob("*.safetensors") if p.name != LORA_WEIGHTS]):
        mine, theirs = load_file(out["straight"] / name), load_file(out["plain"] / name)
        assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}, name
    fused_losses, plain_losses = metrics(out["straight"]), metrics(out["plain"])
    assert fused_losses[1] == pytest.approx(plain_losses[1], rel=1e-5)  # B starts at zero: the same first step

    checkpoint = out["straight"] / "checkpoints" / "step-000002"
    resumed = write_run(tmp_path / "resumed", model, "sd3", dataset=dataset, resume_from_checkpoint="latest",
                        fuse_qkv_projections=True, **options)
    assert resumed_losses(checkpoint, resumed) == {step: fused_losses[step] for step in (3, 4)}
    final = [load_file(tmp_path / run / "output" / LORA_WEIGHTS) for run in ("straight", "resumed")]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][key], final[1][key]) for key in final[0])


def _lycoris(model, algo: str, fused: bool, targets):
    from simpletuner.train.adapters import apply_lycoris
    from simpletuner.train.fusion import lycoris_excluded

    config = {"algo": algo, "linear_dim": 4, "linear_alpha": 2}
    excluded = []
    if fused:
        fuse_qkv(model)
        excluded = lycoris_excluded(fused_adapter_targets(model, ["to_q", "to_k", "to_v"])[1], config)
    network = apply_lycoris(model, config, targets=targets, exclude=excluded)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return network


@pytest.mark.parametrize("tiny, algo", [("sd3", "lora"), ("flux", "loha"), ("pixart_sigma", "locon")])
def test_lycoris_on_fused_layers_saves_the_unfused_keys_and_applies_the_fused_delta(tmp_path, tiny_model, tiny, algo):
    from lycoris import create_lycoris_from_weights

    from simpletuner.train.adapters import save_lycoris_weights
    from simpletuner.train.fusion import fused_part_rows, split_fused_lycoris_file

    targets = get_family(tiny).lycoris_targets if tiny == "flux" else ("Attention",)
    fused_model = _denoiser(tiny_model(tiny))
    inputs = _inputs(fused_model, tiny)
    network = _lycoris(fused_model, algo, True, targets)
    rows = fused_part_rows(fused_model)
    names = {module.lora_name for module in network.loras}
    assert {"lycoris_" + fused.replace(".", "_") for fused in rows} <= names  # adapters on the fused layers
    assert not names & {"lycoris_" + part.replace(".", "_") for parts in rows.values() for part, _ in parts}
    path = save_lycoris_weights(tmp_path / "fused", network, {"algo": algo})
    split_fused_lycoris_file(path, rows)
    plain = save_lycoris_weights(tmp_path / "plain", _lycoris(_denoiser(tiny_model(tiny)), algo, False, targets))
    mine, theirs = load_file(path), load_file(plain)
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    with torch.no_grad():
        trained = fused_model(**inputs, return_dict=False)[0]
        fresh = _denoiser(tiny_model(tiny))
        loaded, _ = create_lycoris_from_weights(1.0, str(path), fresh)
        loaded.apply_to()
        torch.testing.assert_close(fresh(**inputs, return_dict=False)[0], trained, rtol=1e-4, atol=1e-5)


def test_lokr_on_fused_layers_is_refused_by_name(tiny_model):
    from simpletuner.train.fusion import check_lycoris_split

    with pytest.raises(UserError, match="lycoris_config algo 'lokr': its adapter on a fused layer does not split"):
        check_lycoris_split({"algo": "lokr"})
    check_lycoris_split({"algo": "loha"})


@pytest.mark.slow
def test_fused_lycoris_training_exports_the_unfused_file_and_refuses_lokr(tmp_path, tiny_model, capsys):
    model = tiny_model("sd3")
    options = dict(max_train_steps=2, checkpointing_steps=2, disable_validation=True, images=6, tokenizer_max_length=32,
                   lora_type="lycoris")
    for algo in ("loha", "lokr"):
        (tmp_path / f"{algo}.json").write_text(json.dumps({"algo": algo, "linear_dim": 4, "linear_alpha": 2}))
    fused = write_run(tmp_path / "fused", model, "sd3", fuse_qkv_projections=True,
                      lycoris_config=str(tmp_path / "loha.json"), **options)
    assert main(["train", str(fused)]) == 0
    dataset = tmp_path / "fused" / "dataset"
    plain = write_run(tmp_path / "plain", model, "sd3", dataset=dataset, lycoris_config=str(tmp_path / "loha.json"),
                      **options)
    assert main(["train", str(plain)]) == 0
    mine, theirs = (load_file(tmp_path / run / "output" / LORA_WEIGHTS) for run in ("fused", "plain"))
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    assert any("_to_q." in key for key in mine) and not any("qkv" in key for key in mine)

    lokr = write_run(tmp_path / "lokr", model, "sd3", dataset=dataset, fuse_qkv_projections=True,
                     lycoris_config=str(tmp_path / "lokr.json"), **options)
    capsys.readouterr()
    assert main(["train", str(lokr)]) == 2
    assert "lycoris_config algo 'lokr': its adapter on a fused layer does not split" in capsys.readouterr().err


def test_a_fused_runs_file_starts_a_fused_lora_and_an_unfused_runs_file_is_refused(tmp_path, tiny_model):
    from peft import get_peft_model_state_dict

    from simpletuner.train.adapters import load_lora_into

    family = get_family("sd3")
    cfg = TrainingConfig(model_family="sd3", pretrained_model_name_or_path="x")
    pipeline_class = _pipeline_class(tiny_model("sd3"))
    trained = _denoiser(tiny_model("sd3"))
    write_lora_files(family, _lora(family, trained, True, False, cfg, pipeline_class), tmp_path / "fused",
                     ["diffusers"])
    write_lora_files(family, _lora(family, _denoiser(tiny_model("sd3")), False, False, cfg, pipeline_class),
                     tmp_path / "plain", ["diffusers"])

    def fresh():
        model = _denoiser(tiny_model("sd3"))
        fuse_qkv(model)
        targets, excluded = fused_adapter_targets(model, family.adapter_targets(cfg))
        return apply_lora(model, rank=4, alpha=2, target_modules=targets, exclude_modules=excluded)

    started = fresh()
    load_lora_into(started, tmp_path / "fused" / LORA_WEIGHTS, prefix="transformer")
    want, got = get_peft_model_state_dict(trained), get_peft_model_state_dict(started)
    assert got.keys() == want.keys() and any(".to_qkv." in key for key in got)
    assert all(torch.equal(got[key], want[key]) for key in want)
    with pytest.raises(UserError, match="have different down matrices .* fuse_qkv_projections=false"):
        load_lora_into(fresh(), tmp_path / "plain" / LORA_WEIGHTS, prefix="transformer")
