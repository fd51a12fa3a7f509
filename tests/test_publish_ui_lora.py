"""The LoRA file for ComfyUI / A1111 / Forge: every key matched by the loaders' own matching code
(tests/ui_loaders.py), and the weight each loader applies equal to the trained peft module's."""

from __future__ import annotations

import copy
import stat
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ui_loaders as ui
from simpletuner.errors import UserError
from simpletuner.publish.export import LORA_FORMATS
from simpletuner.publish.kohya import to_ui_state_dict
from simpletuner.models.registry import get_family
from simpletuner.publish.lora_files import save_file_atomic
from simpletuner.publish.ui_file import ui_file_name, write_ui_lora
from simpletuner.train.adapters import TrainedLora, apply_lora, dora_base_weights

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ATTENTION_FF = ["to_k", "to_q", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
T5_TARGETS = ["q", "k", "v", "o"]
RANK, ALPHA = 4, 7.0  # alpha != rank: the loaders must read the alpha tensor


# ----------------------------------------------------------------------------- helpers
def trained_lora(model: torch.nn.Module, targets: list[str], *, dora: bool = False, seed: int = 0) -> torch.nn.Module:
    """A peft LoRA (rank 4, alpha 7) with random nonzero A, B (and DoRA magnitudes): a trained adapter."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):  # transformers' own add_adapter wants peft >= 0.22
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=RANK, lora_alpha=ALPHA, use_dora=dora, target_modules=targets)
        inject_adapter_in_model(config, model)
        model.peft_config = {"default": config}
    else:
        apply_lora(model, rank=RANK, alpha=ALPHA, use_dora=dora, target_modules=targets)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
            elif "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.3 * torch.rand(parameter.shape, generator=generator))
    return model


def peft_deltas(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """`prefix.<module>` -> merged weight - base weight, from peft's own merge of each LoRA layer."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            base = layer.get_base_layer().weight.detach().clone()
            merged = copy.deepcopy(layer)
            merged.merge()
            deltas[f"{prefix}.{name}"] = merged.get_base_layer().weight.detach() - base
    assert deltas, "no LoRA layer"
    return deltas


def close(ours: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    error = (ours.float() - reference.float()).norm() / reference.float().norm()
    assert reference.abs().max() > 0, what
    assert error < 1e-4, f"{what}: relative error {error:.2e}"


def comfy_check(lora: Mapping[str, torch.Tensor], key_map: Mapping[str, ui.Target],
                placements: Mapping[str, ui.Target], bases: Mapping[str, torch.Tensor],
                deltas: Mapping[str, torch.Tensor]) -> None:
    """Every key loaded by ComfyUI, and the weight it patches equal to peft's, module by module.

    `placements`: our module -> (ComfyUI model weight, offset); the model's fused weights are built from
    the base weights placed at their offsets, patched with ComfyUI's arithmetic, and read back."""
    assert not ui.comfy_convert_lora_changes(lora)
    patches, not_loaded = ui.comfy_load_lora(lora, key_map)
    assert not_loaded == [], f"lora key not loaded: {not_loaded[:5]}"
    assert len(patches) == len(deltas)
    model: dict[str, torch.Tensor] = {}
    for module, (target, offset) in placements.items():
        if module not in bases:
            continue
        rows = bases[module].shape[0] + (offset[1] if offset else 0)
        current = model.get(target, torch.zeros(0, bases[module].shape[1]))
        if current.shape[0] < rows:
            current = torch.cat([current, torch.zeros(rows - current.shape[0], current.shape[1])])
        current[(offset[1] if offset else 0):rows] = bases[module].detach().float()
        model[target] = current
    patched = dict(model)
    for patch_key, patch in patches.items():
        target = patch_key.rsplit("@", 1)[0]
        patched[target] = ui.comfy_patched_weight(patched[target], patch)
    for module, delta in deltas.items():
        target, offset = placements[module]
        part = (lambda w: w.narrow(*offset)) if offset else (lambda w: w)
        close(part(patched[target]) - part(model[target]), delta, f"ComfyUI {module}")


def unet_placements(config: Mapping) -> dict[str, ui.Target]:
    return {f"unet.{k[:-7]}": (f"diffusion_model.{v}", None)
            for k, v in ui.unet_weights_to_diffusers(ui.comfy_unet_config(config)).items()}


def transformer_placements(family: str, settings: Mapping[str, int]) -> dict[str, ui.Target]:
    out = {}
    for k, to in ui.transformer_to_diffusers(family, settings).items():
        out[f"transformer.{k[:-7]}"] = (to, None) if isinstance(to, str) else (to[0], to[1])
    return out


def checkpoint_name(name: str) -> str:
    """A CLIP text model's module as its checkpoints (and ComfyUI, A1111) name it: transformers 5 drops the
    `text_model.` of `text_encoder.text_model.encoder.layers...`."""
    component, _, path = name.partition(".")
    return f"{component}.text_model.{path}" if path.startswith(("encoder.layers.", "embeddings.")) else name


def clip_placements(encoders: Mapping[str, tuple[str, torch.nn.Module]]) -> tuple[dict, set]:
    """component -> (ComfyUI's name: clip_l / clip_g / clip_h / t5xxl, model): placements (by our module
    names) and ComfyUI's state-dict keys (checkpoint names)."""
    placements, sdk = {}, set()
    for component, (comfy_name, model) in encoders.items():
        for key in model.state_dict():
            key = key.replace(".base_layer.", ".")
            if "lora_" in key or not key.endswith(".weight"):
                continue
            comfy_key = f"{comfy_name}.transformer.{checkpoint_name(f'{component}.{key}').partition('.')[2]}"
            sdk.add(comfy_key)
            placements[f"{component}.{key[:-7]}"] = (comfy_key, None)
    return placements, sdk


def a1111_check(lora: Mapping[str, torch.Tensor], layers: Mapping[str, str],
                deltas: Mapping[str, torch.Tensor], is_sd2: bool = False) -> None:
    matched, failed = ui.a1111_load_network(lora, layers, is_sd2)
    assert failed == {}, f"A1111 keys not matched: {list(failed)[:5]}"
    assert {ui.a1111_module_of(key, layers) for key in matched} == set(deltas)
    for key, weights in matched.items():
        assert set(weights) == {"lora_down.weight", "lora_up.weight", "alpha"}, weights.keys()
        module = ui.a1111_module_of(key, layers)
        close(ui.a1111_delta(weights), deltas[module], f"A1111 {module}")


def adapter_base_weights(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": weight for name, weight in dora_base_weights(model).items()}


def export(tmp_path: Path, family: str, models: dict) -> dict[str, torch.Tensor]:
    """The "comfyui" format's file of the adapters of `models`, written as a run writes it."""
    lora = TrainedLora.from_models("Pipeline", models, {"modelspec.title": "my run"})
    path = write_ui_lora(get_family(family), lora, tmp_path)
    assert path == tmp_path / "my_run.safetensors"
    return load_file(str(path))


# ----------------------------------------------------------------------------- UNet families
UNET_FAMILIES = ["sd1x", "sd2x", "sdxl", "sdxl_refiner", "kolors"]


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("family", UNET_FAMILIES)
def test_unet_lora_loads_fully_in_comfyui_and_a1111(family, dora, tiny_model, tmp_path):
    from diffusers import UNet2DConditionModel

    unet = trained_lora(UNet2DConditionModel.from_pretrained(tiny_model(family), subfolder="unet"),
                        ATTENTION_FF, dora=dora)
    lora = export(tmp_path, family, {"unet": unet})
    assert all(k.startswith("lora_unet_") for k in lora)
    assert sum(k.endswith(".alpha") for k in lora) == len(peft_deltas(unet, "unet"))
    assert all(lora[k].item() == ALPHA for k in lora if k.endswith(".alpha"))
    assert any("input_blocks" in k for k in lora) and not any("down_blocks" in k for k in lora)
    deltas = peft_deltas(unet, "unet")
    bases = adapter_base_weights(unet, "unet")
    comfy_check(lora, ui.comfy_unet_key_map(ui.comfy_unet_config(unet.config)), unet_placements(unet.config),
                bases, deltas)
    if dora:
        assert sum(k.endswith(".dora_scale") for k in lora) == len(deltas)
        assert all(lora[k].shape == (lora[k.replace(".dora_scale", ".lora_up.weight")].shape[0], 1)
                   for k in lora if k.endswith(".dora_scale"))
    else:  # A1111 applies DoRA magnitudes along the input axis: it cannot apply peft's (docs/UI_LORA.md)
        a1111_check(lora, ui.a1111_layer_names(family, unet.config, {}), deltas)


# ----------------------------------------------------------------------------- transformer families
def _sd3_transformer():
    """ComfyUI sizes SD3's fused qkv as depth * 64 (true of every released SD3): 2 blocks of width 128."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                 attention_head_dim=64, num_attention_heads=2, joint_attention_dim=32,
                                 caption_projection_dim=128, pooled_projection_dim=32, pos_embed_max_size=16)


def _settings(family: str, transformer) -> dict[str, int]:
    c = transformer.config
    hidden = c.num_attention_heads * c.attention_head_dim
    if family == "flux":
        return {"depth": c.num_layers, "depth_single_blocks": c.num_single_layers, "hidden_size": hidden}
    if family == "sd3":
        return {"depth": c.num_layers}
    return {"depth": c.num_layers, "hidden_size": hidden}


TRANSFORMER_CASES = [
    ("flux", "all", False), ("flux", "all+ffs", False), ("flux", "ai-toolkit", True), ("flux", "context+ffs", False),
    ("sd3", "attention+ffs", False), ("sd3", "attention", True),
    ("pixart_sigma", "attention+ffs", False), ("pixart_sigma", "attention", True),
]


@pytest.mark.parametrize("family,preset,dora", TRANSFORMER_CASES)
def test_transformer_lora_loads_fully_in_comfyui(family, preset, dora, tiny_model, tmp_path):
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel

    from simpletuner.models.registry import get_family

    if family == "sd3":
        transformer = _sd3_transformer()
    else:
        cls = FluxTransformer2DModel if family == "flux" else PixArtTransformer2DModel
        transformer = cls.from_pretrained(tiny_model(family), subfolder="transformer")
    targets = list(get_family(family).adapter_presets[preset])
    trained_lora(transformer, targets, dora=dora)
    lora = export(tmp_path, family, {"transformer": transformer})
    assert all(k.startswith("transformer.") for k in lora)
    comfy_family = "pixart" if family == "pixart_sigma" else family
    settings = _settings(family, transformer)
    comfy_check(lora, ui.comfy_transformer_key_map(comfy_family, settings),
                transformer_placements(comfy_family, settings), adapter_base_weights(transformer, "transformer"),
                peft_deltas(transformer, "transformer"))


# ----------------------------------------------------------------------------- Hunyuan-DiT
def _hunyuan_model_keys(transformer) -> tuple[dict[str, ui.Target], set[str]]:
    c = transformer.config
    placements = {f"transformer.{k[:-7]}": to for k, to in ui.hunyuan_dit_to_diffusers(
        c.num_layers, c.num_attention_heads * c.attention_head_dim).items()}
    return placements, {target for target, _ in placements.values()}


@pytest.mark.parametrize("preset,dora", [("attention", False), ("attention+ffs", False), ("attention+ffs", True)])
def test_hunyuan_dit_lora_loads_fully_in_comfyui_on_its_fused_weights(preset, dora, tiny_model, tmp_path):
    """ComfyUI knows Hunyuan-DiT LoRAs by the model's own names, with q/k/v (and the cross-attention's k/v)
    fused: the separate LoRAs become one exact LoRA per fused weight."""
    from diffusers import HunyuanDiT2DModel

    transformer = HunyuanDiT2DModel.from_pretrained(tiny_model("hunyuan_dit"), subfolder="transformer")
    trained_lora(transformer, list(get_family("hunyuan_dit").adapter_presets[preset]), dora=dora)
    lora = export(tmp_path, "hunyuan_dit", {"transformer": transformer})
    assert all(k.startswith("base_model.model.blocks.") for k in lora)
    fused = [k for k in lora if k.endswith("attn1.Wqkv.lora_down.weight")]
    assert fused and all(lora[k].shape[0] == 3 * RANK for k in fused)
    assert all(lora[k.replace("lora_down.weight", "alpha")].item() == 3 * ALPHA for k in fused)
    assert not any(".to_q." in k or ".to_k." in k for k in lora)
    placements, model_keys = _hunyuan_model_keys(transformer)
    deltas = peft_deltas(transformer, "transformer")
    patches, _ = ui.comfy_load_lora(lora, ui.comfy_hunyuan_dit_key_map(model_keys))
    assert len(patches) == len({placements[m][0] for m in deltas})  # one patch per ComfyUI weight
    comfy_check_fused(lora, ui.comfy_hunyuan_dit_key_map(model_keys), placements,
                      adapter_base_weights(transformer, "transformer"), deltas)


def comfy_check_fused(lora, key_map, placements, bases, deltas) -> None:
    """comfy_check for a model whose weights hold several of our modules: ComfyUI patches a whole weight,
    and each module's rows of it must change by that module's delta."""
    assert not ui.comfy_convert_lora_changes(lora)
    patches, not_loaded = ui.comfy_load_lora(lora, key_map)
    assert not_loaded == [], f"lora key not loaded: {not_loaded[:5]}"
    model: dict[str, torch.Tensor] = {}
    for module, (target, offset) in placements.items():
        if module in bases:
            start = offset[1] if offset else 0
            rows = start + bases[module].shape[0]
            current = model.get(target, torch.zeros(0, bases[module].shape[1]))
            if current.shape[0] < rows:
                current = torch.cat([current, torch.zeros(rows - current.shape[0], current.shape[1])])
            current[start:rows] = bases[module].detach().float()
            model[target] = current
    patched = {key.rsplit("@", 1)[0]: ui.comfy_patched_weight(model[key.rsplit("@", 1)[0]], patch)
               for key, patch in patches.items()}
    for module, delta in deltas.items():
        target, offset = placements[module]
        part = (lambda w: w.narrow(*offset)) if offset else (lambda w: w)
        close(part(patched[target]) - part(model[target]), delta, f"ComfyUI {module}")


def test_hunyuan_dit_fusion_with_per_module_alphas_and_a_missing_part():
    """Parts with different alpha/rank fuse exactly; a fused weight with a part not trained is refused."""
    down, up = {n: torch.randn(r, 8) for n, r in (("to_q", 2), ("to_k", 3), ("to_v", 2))}, {}
    up = {n: torch.randn(8, d.shape[0]) for n, d in down.items()}
    alphas = {"to_q": 2.0, "to_k": 6.0, "to_v": 1.0}
    state = {f"transformer.blocks.0.attn1.{n}.lora_{ab}.weight": t
             for n in down for ab, t in (("A", down[n]), ("B", up[n]))}
    out = to_ui_state_dict("hunyuan_dit", state, {f"transformer.blocks.0.attn1.{n}": a
                                                  for n, a in alphas.items()})
    key = "base_model.model.blocks.0.attn1.Wqkv"
    fused = (out[f"{key}.alpha"] / 7) * out[f"{key}.lora_up.weight"] @ out[f"{key}.lora_down.weight"]
    expected = torch.cat([alphas[n] / down[n].shape[0] * up[n] @ down[n] for n in ("to_q", "to_k", "to_v")])
    close(fused, expected, "fused Wqkv")
    del state["transformer.blocks.0.attn1.to_v.lora_A.weight"]
    del state["transformer.blocks.0.attn1.to_v.lora_B.weight"]
    with pytest.raises(UserError, match="one weight of 3 parts, and only 2 of them were trained"):
        to_ui_state_dict("hunyuan_dit", state, 1.0)


# ----------------------------------------------------------------------------- text encoders
TEXT_CASES = {  # family: component -> (pipeline subfolder class, targets, ComfyUI's name)
    "sd1x": {"text_encoder": ("CLIPTextModel", CLIP_TARGETS, "clip_l")},
    "sd2x": {"text_encoder": ("CLIPTextModel", CLIP_TARGETS, "clip_h")},
    "sdxl": {"text_encoder": ("CLIPTextModel", CLIP_TARGETS, "clip_l"),
             "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_TARGETS, "clip_g")},
    "sdxl_refiner": {"text_encoder_2": ("CLIPTextModelWithProjection", CLIP_TARGETS, "clip_g")},
    "sd3": {"text_encoder": ("CLIPTextModelWithProjection", CLIP_TARGETS, "clip_l"),
            "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_TARGETS, "clip_g"),
            "text_encoder_3": ("T5EncoderModel", T5_TARGETS, "t5xxl")},
    "flux": {"text_encoder": ("CLIPTextModel", CLIP_TARGETS, "clip_l"),
             "text_encoder_2": ("T5EncoderModel", T5_TARGETS, "t5xxl")},
    "pixart_sigma": {"text_encoder": ("T5EncoderModel", T5_TARGETS, "t5xxl")},
}


@pytest.mark.parametrize("family", list(TEXT_CASES))
def test_text_encoder_lora_loads_fully(family, tiny_model, tmp_path):
    import transformers

    root = tiny_model(family)
    encoders, models, deltas, bases = {}, {}, {}, {}
    for index, (component, (cls, targets, comfy_name)) in enumerate(TEXT_CASES[family].items()):
        model = trained_lora(getattr(transformers, cls).from_pretrained(root, subfolder=component), targets,
                             seed=index)
        encoders[component] = (comfy_name, model)
        models[component] = model
        deltas.update(peft_deltas(model, component))
        bases.update(adapter_base_weights(model, component))
    lora = export(tmp_path, family, models)
    placements, sdk = clip_placements(encoders)
    comfy_check(lora, ui.comfy_clip_key_map(sdk), placements, bases, deltas)
    if family in ("sd1x", "sd2x", "sdxl"):
        layers = {c: m.config.num_hidden_layers for c, (_, m) in encoders.items()}
        a1111_check(lora, ui.a1111_layer_names(family, None, layers),
                    {checkpoint_name(k): v for k, v in deltas.items()}, is_sd2=family == "sd2x")


# ----------------------------------------------------------------------------- real sizes
def _meta_lora(model: torch.nn.Module, targets: list[str], prefix: str) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA state dict (meta tensors) on every module peft would adapt for `targets`."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith(f".{t}") for t in targets):
            out[f"{prefix}.{name}.lora_A.weight"] = torch.empty(RANK, module.in_features, device="meta")
            out[f"{prefix}.{name}.lora_B.weight"] = torch.empty(module.out_features, RANK, device="meta")
    return out


def _modules(state: Mapping[str, torch.Tensor]) -> set[str]:
    return {k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")}


@pytest.mark.parametrize("family,config_name", [("sd1x", "SD15_UNET"), ("sdxl", "SDXL_UNET")])
def test_real_size_unets_match_fully(family, config_name):
    from diffusers import UNet2DConditionModel

    from benchmarks import architectures

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(getattr(architectures, config_name))
    from simpletuner.models.registry import get_family

    for preset, targets in get_family(family).adapter_presets.items():
        state = _meta_lora(unet, list(targets), "unet")
        lora = to_ui_state_dict(family, state, ALPHA, denoiser_config=unet.config)
        patches, not_loaded = ui.comfy_load_lora(lora, ui.comfy_unet_key_map(ui.comfy_unet_config(unet.config)))
        assert not_loaded == [] and len(patches) == len(_modules(state)), preset
        placements = unet_placements(unet.config)
        assert {p.split("@")[0] for p in patches} == {placements[m][0] for m in _modules(state)}
        layers = ui.a1111_layer_names(family, unet.config, {})
        matched, failed = ui.a1111_load_network(lora, layers)
        assert failed == {} and {ui.a1111_module_of(k, layers) for k in matched} == _modules(state), preset


def test_real_size_hunyuan_dit_matches_fully():
    from diffusers import HunyuanDiT2DModel

    from benchmarks import architectures

    with torch.device("meta"):
        transformer = HunyuanDiT2DModel.from_config(architectures.HUNYUAN_DIT_V12)
    placements, model_keys = _hunyuan_model_keys(transformer)
    for preset, targets in get_family("hunyuan_dit").adapter_presets.items():
        state = _meta_lora(transformer, list(targets), "transformer")
        lora = to_ui_state_dict("hunyuan_dit", state, ALPHA)
        patches, not_loaded = ui.comfy_load_lora(lora, ui.comfy_hunyuan_dit_key_map(model_keys))
        assert not_loaded == [], preset
        assert {p.split("@")[0] for p in patches} == {placements[m][0] for m in _modules(state)}, preset


@pytest.mark.parametrize("family,config_name", [("sd3", "SD3_MEDIUM"), ("flux", "FLUX_DEV"),
                                                ("pixart_sigma", "PIXART_SIGMA_1024")])
def test_real_size_transformers_match_fully(family, config_name):
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

    from benchmarks import architectures
    from simpletuner.models.registry import get_family

    cls = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel,
           "pixart_sigma": PixArtTransformer2DModel}[family]
    with torch.device("meta"):
        transformer = cls.from_config(getattr(architectures, config_name))
    comfy_family = "pixart" if family == "pixart_sigma" else family
    settings = _settings(family, transformer)
    if family == "sd3":
        assert settings["depth"] * 64 == transformer.config.num_attention_heads * transformer.config.attention_head_dim
    key_map = ui.comfy_transformer_key_map(comfy_family, settings)
    placements = transformer_placements(comfy_family, settings)
    for preset, targets in get_family(family).adapter_presets.items():
        state = _meta_lora(transformer, list(targets), "transformer")
        lora = to_ui_state_dict(family, state, ALPHA)
        patches, not_loaded = ui.comfy_load_lora(lora, key_map)
        assert not_loaded == [] and len(patches) == len(_modules(state)), preset
        for module in _modules(state):  # the fused weight's offset fits the module's rows
            target, offset = placements[module]
            rows = lora[f"{module}.lora_up.weight"].shape[0]
            assert offset is None or offset[2] == rows, (module, offset, rows)


# ----------------------------------------------------------------------------- the file
def test_file_name_atomic_write_permissions_and_metadata(tmp_path):
    assert ui_file_name("my run/../x: ü") == "my_run_.._x.safetensors"
    assert ui_file_name("") == "lora.safetensors" and ui_file_name(None) == "lora.safetensors"
    layers = {"transformer": {"proj_out.lora_A.weight": torch.ones(2, 3), "proj_out.lora_B.weight": torch.ones(4, 2)}}
    lora = TrainedLora("FluxPipeline", layers, {"transformer": {"r": 2, "lora_alpha": 3}},
                       {"modelspec.title": "../../escape", "simpletuner.steps": "3"})
    path = write_ui_lora(get_family("flux"), lora, tmp_path / "out")
    assert path == tmp_path / "out" / "escape.safetensors"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"modelspec.title": "../../escape", "simpletuner.steps": "3",
                                "ss_output_name": "escape"}
    assert load_file(str(path))["transformer.proj_out.alpha"].item() == 3.0
    with pytest.raises(Exception):  # the shared atomic writer: a failed write leaves the old file whole
        save_file_atomic({"bad": "not a tensor"}, path)  # type: ignore[dict-item]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["escape.safetensors"]  # no temporary left
    assert load_file(str(path))["transformer.proj_out.lora_down.weight"].sum() == 6


def test_bad_input_is_a_clear_error():
    down, up = torch.ones(2, 8), torch.ones(8, 2)
    assert not LORA_FORMATS["comfyui"].supports(get_family("deepfloyd"))
    assert all(LORA_FORMATS["comfyui"].supports(get_family(name)) for name in (*UNET_FAMILIES, "legacy", "sd3", "flux",
                                                                               "pixart_sigma", "hunyuan_dit"))
    with pytest.raises(UserError, match="deepfloyd"):
        to_ui_state_dict("deepfloyd", {"unet.a.lora_A.weight": down, "unet.a.lora_B.weight": up}, 1.0)
    with pytest.raises(UserError, match="lacks its up"):
        to_ui_state_dict("flux", {"transformer.proj_out.lora_A.weight": down}, 1.0)
    with pytest.raises(UserError, match="no ComfyUI name"):
        to_ui_state_dict("flux", {"transformer.pos_embed.lora_A.weight": down,
                                  "transformer.pos_embed.lora_B.weight": up}, 1.0)
    with pytest.raises(UserError, match="base weight"):
        to_ui_state_dict("flux", {"transformer.proj_out.lora_A.weight": down, "transformer.proj_out.lora_B.weight": up,
                                  "transformer.proj_out.lora_magnitude_vector": torch.ones(8)}, 1.0)
    with pytest.raises(UserError, match="UNet's config"):
        to_ui_state_dict("sdxl", {"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": down,
                                  "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight": up}, 1.0)
    with pytest.raises(UserError, match="not a LoRA weight"):
        to_ui_state_dict("flux", {"transformer.proj_out.weight": up}, 1.0)


def test_old_style_keys_alpha_tensor_and_per_module_alpha():
    """`.lora.down/.lora.up` keys (today's diffusers files) convert like lora_A/lora_B; an `.alpha` tensor
    and a per-module alpha win over the component's."""
    down, up = torch.randn(2, 8), torch.randn(8, 2)
    state = {"transformer.proj_out.lora.down.weight": down, "transformer.proj_out.lora.up.weight": up,
             "transformer.x_embedder.lora_A.weight": down, "transformer.x_embedder.lora_B.weight": up,
             "transformer.x_embedder.alpha": torch.tensor(5.0),
             "context_embedder.lora_A.weight": down, "context_embedder.lora_B.weight": up}
    out = to_ui_state_dict("flux", state, {"transformer": 2.0, "transformer.context_embedder": 3.0})
    assert out["transformer.proj_out.alpha"].item() == 2.0
    assert out["transformer.x_embedder.alpha"].item() == 5.0
    assert out["transformer.context_embedder.alpha"].item() == 3.0  # unprefixed keys are the denoiser's
    assert torch.equal(out["transformer.proj_out.lora_down.weight"], down)
    assert out["transformer.proj_out.alpha"].dtype == torch.float32


# ----------------------------------------------------------------------------- the option
@pytest.mark.parametrize("given, parsed", [
    (None, ["diffusers", "comfyui"]), ("comfyui", ["comfyui"]), ("diffusers, comfyui", ["diffusers", "comfyui"]),
    (["comfyui", "comfyui"], ["comfyui"]),
])
def test_lora_format_option(tmp_path, given, parsed):
    import json

    from simpletuner.config.load import load_config

    options = {"model_family": "sdxl", "pretrained_model_name_or_path": "a/b"}
    if given is not None:
        options["lora_format"] = given
    (tmp_path / "config.json").write_text(json.dumps(options))
    assert load_config(tmp_path / "config.json").lora_format == parsed
    assert load_config(None, ["--model_family", "flux", "--pretrained_model_name_or_path", "a/b",
                              "--lora_format", "comfyui"]).lora_format == ["comfyui"]


@pytest.mark.parametrize("given, phrase", [("kohya", "'kohya' is not accepted.*accepted: diffusers, comfyui"),
                                           ("", "at least one format"),
                                           ("comfyui", "DeepFloyd")])
def test_lora_format_bad_values(tmp_path, given, phrase):
    import json

    from simpletuner.config.load import load_config
    from simpletuner.errors import ConfigError

    family = "deepfloyd" if given == "comfyui" else "sdxl"
    (tmp_path / "config.json").write_text(json.dumps({"model_family": family, "pretrained_model_name_or_path": "a/b",
                                                      "lora_format": given}))
    with pytest.raises(ConfigError, match=phrase):
        load_config(tmp_path / "config.json")


# ----------------------------------------------------------------------------- a training run
@pytest.mark.slow
def test_lora_format_diffusers_writes_no_ui_file(tmp_path, tiny_model):
    from train_helpers import write_run

    from simpletuner.cli import main

    config = write_run(tmp_path, tiny_model("sd1x"), "sd1x", max_train_steps=1, checkpointing_steps=1,
                       validation_steps=100, lora_format="diffusers")
    assert main(["train", str(config)]) == 0
    assert sorted(p.name for p in (tmp_path / "output").glob("*.safetensors")) == ["pytorch_lora_weights.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize("family, formats", [("sd1x", None), ("pixart_sigma", "comfyui"), ("hunyuan_dit", "comfyui")])
def test_training_run_exports_the_ui_file(tmp_path, tiny_model, family, formats):
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel
    from train_helpers import write_run

    from simpletuner.cli import main

    options = {"tracker_run_name": "Fox v2 (final)", "max_train_steps": 2, "checkpointing_steps": 2,
               "validation_steps": 100, "lora_alpha": 8}
    if formats:
        options["lora_format"] = formats
    config = write_run(tmp_path, tiny_model(family), family, **options)
    assert main(["train", str(config)]) == 0
    output = tmp_path / "output"
    path = output / "Fox_v2_final.safetensors"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    lora = load_file(str(path))
    alphas = [lora[k].item() for k in lora if k.endswith(".alpha")]
    fused = {"Wqkv": 3, "kv_proj": 2}  # Hunyuan-DiT: one LoRA on a fused weight has its parts' rank and alpha
    assert alphas and all(lora[k].item() == 8.0 * fused.get(k.split(".")[-2], 1) for k in lora if k.endswith(".alpha"))
    if family == "sd1x":
        assert (output / "pytorch_lora_weights.safetensors").is_file()
        with safe_open(str(path), "pt") as f:
            assert f.metadata()["ss_output_name"] == "Fox_v2_final"
        unet = UNet2DConditionModel.from_pretrained(tiny_model(family), subfolder="unet")
        patches, not_loaded = ui.comfy_load_lora(lora, ui.comfy_unet_key_map(ui.comfy_unet_config(unet.config)))
        assert not_loaded == [] and len(patches) == len(alphas)
        assert ui.a1111_load_network(lora, ui.a1111_layer_names(family, unet.config, {}))[1] == {}
    elif family == "hunyuan_dit":  # lora_format=comfyui only: no peft folder; q/k/v fused as ComfyUI holds them
        from diffusers import HunyuanDiT2DModel

        assert not (output / "adapter_model.safetensors").exists()
        _, model_keys = _hunyuan_model_keys(HunyuanDiT2DModel.from_pretrained(tiny_model(family),
                                                                              subfolder="transformer"))
        patches, not_loaded = ui.comfy_load_lora(lora, ui.comfy_hunyuan_dit_key_map(model_keys))
        assert not_loaded == [] and len(patches) == len(alphas)
        assert any(k.endswith("attn1.Wqkv.alpha") for k in lora)
    else:  # lora_format=comfyui only: no peft folder, the ComfyUI file alone
        assert not (output / "adapter_model.safetensors").exists()
        transformer = PixArtTransformer2DModel.from_pretrained(tiny_model(family), subfolder="transformer")
        settings = _settings(family, transformer)
        patches, not_loaded = ui.comfy_load_lora(lora, ui.comfy_transformer_key_map("pixart", settings))
        assert not_loaded == [] and len(patches) == len(alphas)


@pytest.mark.slow
def test_a_run_writes_both_files_in_output_and_checkpoints_and_export_reproduces_them(tmp_path, tiny_model):
    """`simpletuner train` (default lora_format): the output and every checkpoint hold the diffusers file,
    which load_lora_weights takes whole, and the UI file, which ComfyUI's and A1111's matching take whole
    at the trained delta; `simpletuner export --format comfyui` of a checkpoint rewrites that checkpoint's file."""
    from diffusers import DiffusionPipeline
    from peft import get_peft_model_state_dict
    from test_lora_export import NO_TEXT_ENCODER_LORA, loader_warnings
    from train_helpers import write_run

    from simpletuner.cli import main

    model = tiny_model("sd1x")
    config = write_run(tmp_path, model, "sd1x", tracker_run_name="Fox v2 (final)", max_train_steps=2,
                       checkpointing_steps=1, validation_steps=100, lora_alpha=8, unet_lora_target="attention+ffs")
    assert main(["train", str(config)]) == 0
    output, name = tmp_path / "output", "Fox_v2_final.safetensors"
    for folder in (output, output / "checkpoints" / "step-000001", output / "checkpoints" / "step-000002"):
        pipeline = DiffusionPipeline.from_pretrained(model)
        with loader_warnings() as messages:
            pipeline.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors", adapter_name="default")
        assert [m for m in messages if NO_TEXT_ENCODER_LORA not in m] == []
        loaded = get_peft_model_state_dict(pipeline.unet)
        in_file = load_file(folder / "pytorch_lora_weights.safetensors")
        assert len(loaded) == len(in_file) and all(torch.equal(v, in_file[f"unet.{k}"]) for k, v in loaded.items())
        unet, deltas = pipeline.unet, peft_deltas(pipeline.unet, "unet")
        lora = load_file(folder / name)
        assert {lora[k].item() for k in lora if k.endswith(".alpha")} == {8.0}
        comfy_check(lora, ui.comfy_unet_key_map(ui.comfy_unet_config(unet.config)), unet_placements(unet.config),
                    adapter_base_weights(unet, "unet"), deltas)
        a1111_check(lora, ui.a1111_layer_names("sd1x", unet.config, {}), deltas)
    checkpoint = output / "checkpoints" / "step-000001"
    assert main(["export", str(checkpoint), "--output", str(tmp_path / "ui"), "--format", "comfyui"]) == 0
    ours, exported = load_file(checkpoint / name), load_file(tmp_path / "ui" / name)
    assert ours.keys() == exported.keys() and all(torch.equal(ours[k], exported[k]) for k in ours)
    with safe_open(str(checkpoint / name), "pt") as a, safe_open(str(tmp_path / "ui" / name), "pt") as b:
        assert a.metadata() == b.metadata() and a.metadata()["simpletuner.steps"] == "1"
        assert a.metadata()["ss_output_name"] == "Fox_v2_final"
