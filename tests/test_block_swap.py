"""Block swap (musubi_blocks_to_swap): the swapped blocks' frozen weights stay on their CPU copies, the
copies made for a block's run are gone once it returns (none live between forward and backward, one
block's at a time in backward), gradients and trained runs equal the unswapped ones, and what cannot
be swapped is refused with the reason."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import flux_inputs, metrics, resumed_losses, write_run

from simpletuner.cli import main
from simpletuner.config.quantisation import LIBRARY
from simpletuner.config.schema import BLOCK_SWAP_FAMILIES
from simpletuner.models.registry import family_names, get_family
from simpletuner.train.block_swap import swap_blocks
from simpletuner.train.checkpointing import enable_checkpointing
from simpletuner.train.quantize import quantize_module


def _flux(tiny_model, precision: str = "no_change"):
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    model = FluxTransformer2DModel.from_pretrained(tiny_model("flux"), subfolder="transformer").float()
    if precision != "no_change":
        quantize_module(model, precision)
    model.requires_grad_(False)
    torch.manual_seed(3)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"]))
    return model.train()


class Copies:
    """Every copy the swapped blocks make, by block, held weakly (alive only while something uses it)."""

    def __init__(self, swap) -> None:
        self.made: list[tuple[int, weakref.ref]] = []
        self.worst_overlap = 0  # most copies of *other* blocks alive when a block makes one
        for index, block in enumerate(swap.blocks):
            block.on_copy = lambda home, copy, index=index: self._seen(index, home, copy)

    def _seen(self, index: int, home: torch.Tensor, copy: torch.Tensor) -> None:
        others = sum(1 for owner, ref in self.made if owner != index and ref() is not None)
        self.worst_overlap = max(self.worst_overlap, others)
        # bitsandbytes' 4-bit weight moved to the device it is on is itself (on CUDA it is a copy): nothing to track
        self.made.append((index, weakref.ref(copy) if copy is not home else lambda: None))

    def alive(self) -> int:
        return sum(1 for _, ref in self.made if ref() is not None)


@pytest.mark.parametrize("diffusers_checkpointing, precision", [
    (False, "no_change"), (True, "no_change"), (True, "int8-quanto"), (False, "nf4-bnb")])
def test_swapped_blocks_give_the_same_gradients_and_keep_no_copies(tiny_model, diffusers_checkpointing,
                                                                   precision) -> None:
    if precision != "no_change":
        pytest.importorskip(LIBRARY[precision].module)
    plain, swapped = _flux(tiny_model, precision), _flux(tiny_model, precision)
    family = get_family("flux")
    swap = swap_blocks(swapped, family.block_lists, 3, torch.device("cpu"))
    if diffusers_checkpointing:
        enable_checkpointing(plain)
        enable_checkpointing(swapped, self_checkpointed=swap)
    copies = Copies(swap)
    frozen = sum(len(block.frozen) for block in swap.blocks)
    homes = {(id(m), n): m._parameters[n] for block in swap.blocks for m, n in block.frozen}
    assert frozen > 0 and not any(p.requires_grad for p in homes.values())
    assert all(p.requires_grad for block in swap.blocks for n, p in block.block.named_parameters() if "lora" in n)

    losses = []
    for model in (plain, swapped):
        loss = model(**flux_inputs(model)).sample.pow(2).mean()
        if model is swapped:
            assert len(copies.made) == frozen and copies.alive() == 0  # forward: nothing kept for backward
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (plain, swapped)]
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    # backward recomputed each swapped block once (not again inside diffusers' checkpoint), one block at a time
    assert len(copies.made) == 2 * frozen and copies.alive() == 0 and copies.worst_overlap == 0
    assert all(m._parameters[n] is homes[(id(m), n)] for block in swap.blocks for m, n in block.frozen)

    with torch.no_grad():  # validation: the copies live for the block's run only
        assert torch.equal(plain(**flux_inputs(plain)).sample, swapped(**flux_inputs(swapped)).sample)
    assert len(copies.made) == 3 * frozen and copies.alive() == 0


def test_every_block_swapped_trains_the_first_one_too(tiny_model) -> None:
    # the first block's inputs require no gradient (nothing before it trains): its LoRA still gets one
    plain, swapped = _flux(tiny_model), _flux(tiny_model)
    blocks = len(swapped.transformer_blocks) + len(swapped.single_transformer_blocks)
    swap_blocks(swapped, get_family("flux").block_lists, blocks, torch.device("cpu"))
    for model in (plain, swapped):
        model(**flux_inputs(model)).sample.pow(2).mean().backward()
    first = [name for name, p in swapped.named_parameters() if p.requires_grad and ".transformer_blocks.0." in
             f".{name}"]
    assert first
    grads = [dict(m.named_parameters()) for m in (plain, swapped)]
    assert all(grads[1][n].grad is not None and torch.equal(grads[0][n].grad, grads[1][n].grad) for n in first)


def test_more_blocks_than_the_model_has_is_refused(tiny_model) -> None:
    from simpletuner.errors import ConfigError

    model, family = _flux(tiny_model), get_family("flux")
    blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    with pytest.raises(ConfigError, match=f"musubi_blocks_to_swap={blocks + 1} is more than the {blocks} blocks"):
        swap_blocks(model, family.block_lists, blocks + 1, torch.device("cpu"))


def test_the_families_that_name_their_blocks_are_the_ones_config_check_accepts() -> None:
    assert {name for name in family_names() if get_family(name).block_lists} == set(BLOCK_SWAP_FAMILIES)


# tiny model -> options of the run; each trains with and without block swap
RUNS = {
    "flux": dict(gradient_checkpointing=True),
    "hunyuan_dit": dict(),  # no diffusers checkpointing: the swapped blocks checkpoint themselves
    "pixart_sigma": dict(lora_type="lycoris", gradient_checkpointing=True, gradient_checkpointing_interval=2),
    "sd3": dict(base_model_precision="int8-quanto", gradient_checkpointing=True),
}


def _options(tmp_path: Path, tiny: str) -> dict:
    options = dict(max_train_steps=4, checkpointing_steps=2, validation_steps=4, images=6, **RUNS[tiny])
    if tiny != "hunyuan_dit":
        options["tokenizer_max_length"] = 32
    if options.get("lora_type") == "lycoris":
        config = tmp_path / "locon.json"
        config.write_text(json.dumps({"algo": "locon", "linear_dim": 4, "linear_alpha": 2}))
        options["lycoris_config"] = str(config)
    return options


@pytest.mark.slow
@pytest.mark.parametrize("tiny", list(RUNS))
def test_a_run_with_block_swap_trains_as_the_plain_run_and_resumes_exactly(tmp_path, tiny_model, tiny) -> None:
    model, options = tiny_model(tiny), _options(tmp_path, tiny)
    swapped = write_run(tmp_path / "swapped", model, tiny, musubi_blocks_to_swap=2, **options)
    assert main(["train", str(swapped)]) == 0
    dataset = tmp_path / "swapped" / "dataset"
    plain = write_run(tmp_path / "plain", model, tiny, dataset=dataset, **options)
    assert main(["train", str(plain)]) == 0
    out = {run: tmp_path / run / "output" for run in ("swapped", "plain")}
    losses = metrics(out["swapped"])
    assert losses == pytest.approx(metrics(out["plain"]), rel=1e-6)
    files = sorted(path.name for path in out["plain"].glob("*.safetensors"))  # the adapter, the UI file
    assert files and files == sorted(path.name for path in out["swapped"].glob("*.safetensors"))
    for name in files:
        weights = [load_file(out[run] / name) for run in ("swapped", "plain")]
        assert weights[0].keys() == weights[1].keys()
        for key in weights[0]:
            torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-5, atol=1e-7)
    assert list((out["swapped"] / "validation").rglob("*.png"))  # validation ran through the swapped blocks

    resumed = write_run(tmp_path / "resumed", model, tiny, dataset=dataset, resume_from_checkpoint="latest",
                        musubi_blocks_to_swap=2, **options)
    assert resumed_losses(out["swapped"] / "checkpoints" / "step-000002", resumed) == {
        step: losses[step] for step in (3, 4)}


@pytest.mark.slow
@pytest.mark.parametrize("tiny, model_type", [("flux", "lora"), ("sd3", "lora"), ("hunyuan_dit", "lora"),
                                              ("flux", "full")])
def test_a_controlnet_trains_on_a_swapped_frozen_base_as_on_the_plain_one(tmp_path, tiny_model, tiny,
                                                                          model_type) -> None:
    # the ControlNet's residuals join the swapped base between its blocks (Hunyuan-DiT: in a block's `skip`)
    from test_controlnet import controlnet_run

    options = dict(model_type=model_type, max_train_steps=2, checkpointing_steps=2, validation_steps=2,
                   learning_rate=1e-2, **({} if tiny == "hunyuan_dit" else {"tokenizer_max_length": 32}))
    runs = {}
    for name, swap in (("swapped", 2), ("plain", 0)):
        config = controlnet_run(tmp_path / name, tiny_model(tiny), tiny, musubi_blocks_to_swap=swap, **options)
        assert main(["train", str(config)]) == 0
        runs[name] = tmp_path / name / "output"
    assert metrics(runs["swapped"]) == pytest.approx(metrics(runs["plain"]), rel=1e-6)
    exported = ("pytorch_lora_weights.safetensors" if model_type == "lora"
                else "controlnet/diffusion_pytorch_model.safetensors")
    weights = [load_file(runs[name] / exported) for name in ("swapped", "plain")]
    assert weights[0].keys() == weights[1].keys()
    assert model_type == "full" or any(key.startswith("controlnet.") for key in weights[0])
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-5, atol=1e-7)
    assert list((runs["swapped"] / "validation" / "step-2").glob("*-control.png"))


@pytest.mark.parametrize("options, refused", [
    (dict(model_type="full"), "model_type 'full'"),
    (dict(model_family="sdxl"), "model_family 'sdxl'"),
    (dict(model_type="full", fsdp_enable=True), "model_type 'full'"),
])
def test_what_block_swap_cannot_do_is_refused(tmp_path, tiny_model, capsys, options, refused) -> None:
    config = write_run(tmp_path, tiny_model("flux"), "flux", musubi_blocks_to_swap=2, **options)
    assert main(["config", "check", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"musubi_blocks_to_swap=2 cannot be combined with {refused}" in err and "Traceback" not in err


def test_a_swap_device_other_than_the_cpu_is_refused(tmp_path, tiny_model, capsys) -> None:
    config = write_run(tmp_path, tiny_model("flux"), "flux", musubi_blocks_to_swap=2,
                       musubi_block_swap_device="cuda:1")
    assert main(["config", "check", str(config)]) == 2
    err = capsys.readouterr().err
    assert "musubi_block_swap_device: 'cuda:1' is not accepted" in err and "accepted: cpu" in err


def test_more_blocks_than_the_model_has_stops_the_run_with_exit_2(tmp_path, tiny_model, capsys) -> None:
    config = write_run(tmp_path, tiny_model("flux"), "flux", musubi_blocks_to_swap=99, images=4)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "musubi_blocks_to_swap=99 is more than the" in err and "Traceback" not in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_block_swap_lowers_the_peak_accelerator_memory_of_a_step(tiny_model) -> None:
    """A wider Flux than the tiny one, so the weights dominate: the step's peak falls by most of the swapped bytes."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    def step(count: int) -> tuple[int, int, int]:
        gc.collect()  # the previous model (block swap holds a reference cycle) is gone before the peak is read
        torch.cuda.empty_cache()
        torch.manual_seed(0)
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8,
                                       attention_head_dim=128, num_attention_heads=8, joint_attention_dim=256,
                                       pooled_projection_dim=256, axes_dims_rope=[16, 56, 56]).to("cuda")
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"]))
        swap = swap_blocks(model, get_family("flux").block_lists, count, torch.device("cuda"))
        inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in flux_inputs(model).items()}
        torch.cuda.reset_peak_memory_stats()
        model(**inputs).sample.pow(2).mean().backward()
        largest = max((block.frozen_bytes for block in swap.blocks), default=0)
        return torch.cuda.max_memory_allocated(), swap.frozen_bytes, largest

    plain, _, _ = step(0)
    swapped, saved, largest = step(6)
    # the swapped weights leave the device but for the one block on it while it runs
    assert plain - swapped >= 0.8 * (saved - largest)
