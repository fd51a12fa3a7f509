"""`simpletuner train` with train_text_encoder=true (LoRA and DoRA, alpha != rank): the output and a checkpoint
each hold a diffusers file whose every tensor diffusers' `load_lora_weights` takes (UNet and text encoders) with
no loader warning, and a UI file whose `lora_te*` keys ComfyUI's and A1111's matching take whole; both apply the
trained text-encoder delta computed from the trained tensors ((alpha / rank) * B @ A, DoRA's magnitude on top).
A1111 is checked for LoRA only: it cannot apply peft's DoRA (docs/UI_LORA.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ui_loaders as ui
from test_lora_export import loader_warnings
from test_publish_ui_lora import (a1111_check, adapter_base_weights, checkpoint_name, clip_placements, close,
                                  comfy_check, peft_deltas, unet_placements)
from train_helpers import write_run

from simpletuner.cli import main

pytestmark = pytest.mark.slow

RANK, ALPHA = 4, 6.0
ENCODERS = {"sd1x": {"text_encoder": "clip_l"}, "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}}


def trained_deltas(weights: dict[str, torch.Tensor], component: str,
                   bases: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`component.<module>` -> the delta of the trained tensors in the diffusers file: (alpha / rank) * B @ A;
    with DoRA, m * (W + that) / ||W + that|| (row norms) - W, W the base weight."""
    out = {}
    for key, down in weights.items():
        if key.startswith(f"{component}.") and key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            delta = (ALPHA / RANK) * weights[f"{module}.lora_B.weight"].float() @ down.float()
            magnitude = weights.get(f"{module}.lora_magnitude_vector.weight")  # as transformers loads it
            if magnitude is not None:
                base = bases[module].float()
                adapted = base + delta
                delta = magnitude.float().view(-1, 1) * adapted / adapted.norm(dim=1, keepdim=True) - base
            out[module] = delta
    return out


@pytest.mark.parametrize("family,dora", [("sd1x", False), ("sdxl", False), ("sd1x", True)],
                         ids=["sd1x", "sdxl", "sd1x-dora"])
def test_text_encoder_lora_loads_whole_in_diffusers_comfyui_and_a1111(tmp_path: Path, tiny_model, family: str,
                                                                        dora: bool) -> None:
    from diffusers import DiffusionPipeline
    from peft import get_peft_model_state_dict

    model = tiny_model(family)
    config = write_run(tmp_path, model, family, train_text_encoder=True, tracker_run_name="te run",
                       lora_rank=RANK, lora_alpha=ALPHA, learning_rate=1e-2, max_train_steps=2,
                       checkpointing_steps=1, disable_validation=True, use_dora=dora)
    assert main(["train", str(config)]) == 0
    output = tmp_path / "output"
    components = ["unet", *ENCODERS[family]]
    for folder in (output, output / "checkpoints" / "step-000001"):
        in_file = load_file(folder / "pytorch_lora_weights.safetensors")
        assert {key.split(".", 1)[0] for key in in_file} == set(components), folder
        for component in ENCODERS[family]:
            assert any(key.startswith(f"{component}.") and ".lora_B." in key and torch.count_nonzero(value)
                       for key, value in in_file.items()), f"{folder}: {component} did not train"

        # (a) diffusers takes every tensor of the file, with no warning, at the trained delta
        pipeline = DiffusionPipeline.from_pretrained(model)
        with loader_warnings() as messages:
            pipeline.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors", adapter_name="default")
        assert messages == [], messages
        loaded = 0
        for component in components:
            state = get_peft_model_state_dict(getattr(pipeline, component), adapter_name="default")
            loaded += len(state)
            for key, value in state.items():
                name = f"{component}.{key}"  # a text encoder's DoRA magnitude: `.weight` added (lora_files.py)
                in_name = name if name in in_file or component == "unet" else f"{name}.weight"
                assert torch.equal(value, in_file[in_name]), name
        assert loaded == len(in_file), (loaded, len(in_file))
        deltas: dict[str, torch.Tensor] = {}
        for component in ENCODERS[family]:
            applied = peft_deltas(getattr(pipeline, component), component)
            encoder = getattr(pipeline, component)
            expected = trained_deltas(in_file, component, adapter_base_weights(encoder, component))
            assert applied.keys() == expected.keys()
            for module, delta in expected.items():
                if torch.count_nonzero(delta):
                    close(applied[module], delta, f"diffusers {module}")
                else:  # SDXL reads the penultimate layer of clip_l: its last layer's LoRA gets no gradient
                    assert torch.count_nonzero(applied[module]) == 0, module
            deltas.update(applied)

        # (b) the UI file: lora_te* keys, every key matched by ComfyUI and A1111 at the trained delta
        lora = load_file(folder / "te_run.safetensors")
        prefixes = {"sd1x": ("lora_te_",), "sdxl": ("lora_te1_", "lora_te2_")}[family]
        for prefix in prefixes:
            assert any(key.startswith(prefix) for key in lora), (prefix, sorted(lora)[:5])
        assert {lora[k].item() for k in lora if k.endswith(".alpha")} == {ALPHA}
        unet = pipeline.unet
        encoders = {c: (name, getattr(pipeline, c)) for c, name in ENCODERS[family].items()}
        placements, sdk = clip_placements(encoders)
        key_map = {**ui.comfy_unet_key_map(ui.comfy_unet_config(unet.config)), **ui.comfy_clip_key_map(sdk)}
        bases = {**adapter_base_weights(unet, "unet")}
        for component, (_, encoder) in encoders.items():
            bases.update(adapter_base_weights(encoder, component))
        all_deltas = {**peft_deltas(unet, "unet"), **deltas}
        layers = ui.a1111_layer_names(family, unet.config, {c: m.config.num_hidden_layers
                                                            for c, (_, m) in encoders.items()})
        # every key matched, untrained (zero) modules included
        patches, not_loaded = ui.comfy_load_lora(lora, key_map)
        assert not_loaded == [] and len(patches) == len(all_deltas) == len(in_file) // (3 if dora else 2)
        matched, failed = ui.a1111_load_network(lora, layers)
        assert failed == {} and len(matched) == len(all_deltas)
        assert sum(k.endswith(".dora_scale") for k in lora) == (len(all_deltas) if dora else 0)
        # the applied delta of each trained module (a zero one has no scale to compare against)
        zero = {key.rsplit(".lora_up.weight", 1)[0] for key, value in lora.items()
                if key.endswith(".lora_up.weight") and not torch.count_nonzero(value)}
        assert len(zero) == sum(not torch.count_nonzero(d) for d in all_deltas.values())
        trained = {k: v for k, v in lora.items() if k.split(".", 1)[0] not in zero}
        nonzero = {k: v for k, v in all_deltas.items() if torch.count_nonzero(v)}
        comfy_check(trained, key_map, {**unet_placements(unet.config), **placements}, bases, nonzero)
        if not dora:  # A1111 applies DoRA magnitudes along the input axis: it cannot apply peft's (docs/UI_LORA.md)
            a1111_check(trained, layers, {checkpoint_name(k): v for k, v in nonzero.items()})

    # `simpletuner export --format comfyui` of the checkpoint reads its diffusers file back to the same UI file
    checkpoint = output / "checkpoints" / "step-000001"
    assert main(["export", str(checkpoint), "--output", str(tmp_path / "ui"), "--format", "comfyui"]) == 0
    ours, exported = load_file(checkpoint / "te_run.safetensors"), load_file(tmp_path / "ui" / "te_run.safetensors")
    assert ours.keys() == exported.keys() and all(torch.equal(ours[k], exported[k]) for k in ours)
