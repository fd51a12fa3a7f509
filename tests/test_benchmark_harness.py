"""The training-step benchmark harness, checked on the CPU at tiny size (not a measurement).

Full-size checks use the meta device: the published configurations build with their published
parameter counts, and the analytic FLOPs reproduce the issue's anchors.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import train_step  # noqa: E402
from benchmarks.architectures import ARCHITECTURES, build_model, make_batch, pack_flux_latents, unpack_flux_latents  # noqa: E402
from benchmarks.flops import (  # noqa: E402
    flux_forward_flops_closed_form, forward_flops, mfu, training_factor, training_flops,
)
from benchmarks.trainer_step import (  # noqa: E402
    FAMILY_INPUTS, FAMILY_OF, family_components, registered_family, training_config,
)
from benchmarks.steps import Workload  # noqa: E402
from simpletuner.errors import UserError  # noqa: E402
from simpletuner.models.flow import FlowMatchingObjective  # noqa: E402
from simpletuner.models.objectives import Objective, training_loss  # noqa: E402

PUBLISHED_PARAMETERS = {  # denoiser parameter counts of the released checkpoints
    "sd15": 859_520_964,
    "sdxl": 2_567_463_684,
    "sd3": 2_028_328_000,
    "flux": 11_901_408_320,
    "pixart": 610_856_096,
    "hunyuan_dit": 1_499_952_032,  # Hunyuan-DiT v1.2: published as 1.5B
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_full_size_configurations_have_the_published_parameter_counts(name):
    model = build_model(ARCHITECTURES[name], tiny=False, device="meta", dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]


def test_forward_flops_match_the_anchors_at_full_size():
    sdxl = forward_flops("sdxl", batch=1, resolution=1024)
    flux = forward_flops("flux", batch=1, resolution=1024)
    assert sdxl / 1e12 == pytest.approx(6.76, rel=0.02)
    assert flux / 1e12 == pytest.approx(74.4, rel=0.02)
    # the hand-derived Flux formula and the counted one agree to a hundredth of a percent
    assert flux_forward_flops_closed_form(1024, 512) == pytest.approx(flux, rel=1e-4)
    assert forward_flops("sdxl", batch=3, resolution=1024) == 3 * sdxl


def test_hunyuan_dit_forward_flops_match_a_hand_count_at_full_size():
    """Hunyuan-DiT v1.2 at 1024 px: 4096 image tokens, 77 BERT + 256 mT5 text tokens, 40 blocks of width 1408."""
    tokens, text, width, depth = (1024 // 8 // 2) ** 2, 77 + 256, 1408, 40
    ffn = int(width * 4.3637)
    block = (6 * tokens * width * width  # self-attention q, k, v, out; cross-attention q, out
             + 2 * text * 1024 * width  # cross-attention k, v over the 1024-wide text
             + 2 * tokens * width * ffn  # feed-forward
             + 2 * tokens * tokens * width + 2 * tokens * text * width  # QK^T and AV, self and cross
             + width * width)  # the block's shift from the conditioning
    skips = sum(1 for layer in range(depth) if layer > depth // 2) * tokens * 2 * width * width  # long skips
    text_projection = 256 * (2048 * 8192 + 8192 * 1024)  # mT5 2048 -> 8192 -> 1024
    patches = tokens * 16 * width + tokens * width * 32  # 2x2x4 patch embedding, 2x2x8 output (learned sigma)
    by_hand = 2 * (depth * block + skips + text_projection + patches)
    counted = forward_flops("hunyuan_dit", batch=1, resolution=1024)
    assert counted / 1e12 == pytest.approx(14.37, rel=0.01)
    assert by_hand == pytest.approx(counted, rel=1e-3)  # the rest: pooler, time and size embedders


def test_training_flops_factors():
    assert training_factor("full") == 3
    assert training_factor("lora") == 2
    assert training_factor("lora", gradient_checkpointing=True) == 3
    assert training_factor("full", gradient_checkpointing=True) == 4
    fwd = forward_flops("sd15", batch=2, resolution=512)
    assert training_flops("sd15", mode="lora", batch=2, resolution=512) == 2 * fwd
    assert mfu(989.4e12 * 0.5, 1.0, 989.4) == pytest.approx(0.5)
    assert mfu(1e12, 1.0, None) is None
    with pytest.raises(ValueError):
        training_factor("lokr")


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_tiny_inputs_run_through_the_denoiser(name):
    arch = ARCHITECTURES[name]
    model = build_model(arch, tiny=True, device="cpu", dtype=torch.float32)
    batch = make_batch(arch, batch=2, resolution=64, tiny=True, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        out = arch.call(model, batch["latents"], timesteps, batch)
    assert out.shape == batch["latents"].shape
    assert torch.isfinite(out).all()


def test_flux_packing_round_trips():
    latents = torch.randn(2, 16, 8, 6)
    packed = pack_flux_latents(latents)
    assert packed.shape == (2, 4 * 3, 64)
    assert torch.equal(unpack_flux_latents(packed, 8, 6), latents)


def test_options_parse_as_simpletuner_train_options():
    assert train_step.parse_options(["torch_compile=false", "attention_backend=math", "lora_rank=8"]) == {
        "torch_compile": False, "attention_backend": "math", "lora_rank": 8}
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        train_step.parse_options(["torch_compile"])
    cfg = training_config(_tiny_work("sdxl"), {"channels_last": True})
    assert cfg.channels_last is True and cfg.torch_compile == "auto"  # the trainer's defaults unless set


def test_our_step_is_the_trainers_update(monkeypatch):
    """Each of our timed steps is one call of the training loop's own update function."""
    from simpletuner.train import trainer

    calls = []
    update = trainer._update
    monkeypatch.setattr(trainer, "_update", lambda *a, **k: calls.append(a[1]) or update(*a, **k))
    report = train_step.main(["--model", "sd15", *COMMON, "--no-reference", "--set", "dataloader_prefetch=false"])
    assert calls == [0, 1, 2]  # warm-up 1 + timed 2, steps numbered as the loop numbers them
    assert report.options == {"dataloader_prefetch": False} and "-dataloader_prefetch" in report.levers
    assert "-torch_compile" in report.levers and "adamw_fused" in report.levers  # CPU defaults of the options
    from accelerate.state import AcceleratorState

    assert AcceleratorState._shared_state == {}  # released: later runs in this process set their own precision


def test_our_step_runs_on_two_processes_and_rank_zero_reports(tmp_path):
    import os
    import subprocess

    results = tmp_path / "RESULTS.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "benchmarks" / "train_step.py"), "--model", "sd15", *COMMON, "--record",
                           "--results", str(results)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    text = results.read_text()
    assert text.count("## Training step: sd15 lora") == 1  # one report, from rank 0
    assert "processes: 2 (samples/s counts every process)" in text and "| simpletuner |" in text
    assert "| diffusers example |" not in text  # the reference is a one-process loop
    assert "`torchrun --standalone --nproc_per_node 2 benchmarks/train_step.py --model sd15" in text


def _check(report, mode="lora"):
    assert report.mode == mode
    for result in (report.ours, report.reference):
        assert result.error is None
        assert result.seconds_per_step > 0 and math.isfinite(result.seconds_per_step)
        assert result.samples_per_second == pytest.approx(report.batch / result.seconds_per_step)
        assert result.achieved_tflops > 0 and math.isfinite(result.achieved_tflops)
        assert result.mfu is not None and 0 < result.mfu < 1  # against the 1 TFLOP/s peak passed below
        assert math.isfinite(result.last_loss)
        assert result.trainable_parameters > 0
    assert report.ratio == pytest.approx(report.ours.samples_per_second / report.reference.samples_per_second)
    assert report.ours.trainable_parameters == report.reference.trainable_parameters


COMMON = ["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--peak-tflops", "1"]


def test_sd15_lora_tiny_on_cpu_records_both_steps(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    argv = ["--model", "sd15", "--mode", "lora", "--batch", "2", *COMMON, "--record", "--results", str(results)]
    report = train_step.main(argv)
    _check(report)
    assert report.ours.trainable_parameters == report.reference.trainable_parameters
    assert report.forward_tflop_per_sample * 1e12 == forward_flops("sd15", batch=1, resolution=64, tiny=True)
    printed = capsys.readouterr().out
    assert "| simpletuner |" in printed and "| diffusers example |" in printed and "ours / reference" in printed
    text = results.read_text()
    assert text.startswith("# Benchmark results\n")
    assert "python benchmarks/train_step.py --model sd15 --mode lora --batch 2 --tiny" in text
    assert f"torch {torch.__version__}" in text and "diffusers " in text
    train_step.record(report, results)  # appends, never rewrites
    assert results.read_text().count("## Training step: sd15 lora, 64px, batch 2") == 2


def test_flux_tiny_on_cpu_lora_and_full():
    lora = train_step.main(["--model", "flux", "--mode", "lora", *COMMON, "--set", "adamw_fused=false"])
    _check(lora)
    full = train_step.main(["--model", "flux", "--mode", "full", *COMMON])
    _check(full, mode="full")
    assert full.ours.trainable_parameters == sum(
        p.numel() for p in build_model(ARCHITECTURES["flux"], tiny=True, device="meta", dtype=torch.float32).parameters()
    )
    assert full.step_tflop == pytest.approx(1.5 * lora.step_tflop)  # factor 3 against 2


@pytest.mark.parametrize("name", ["sd3", "pixart", "hunyuan_dit"])
def test_sd3_and_pixart_tiny_on_cpu_run_our_family_step(name):
    report = train_step.main(["--model", name, "--mode", "lora", "--batch", "2", *COMMON])
    _check(report)
    assert not report.notes  # the family's own step, no benchmark stand-in


def _tiny_work(name):
    return Workload(ARCHITECTURES[name], "lora", batch=2, resolution=64, tiny=True, device=torch.device("cpu"))


def test_every_architecture_is_wired_to_its_registered_family():
    for name, arch in ARCHITECTURES.items():
        family = registered_family(arch)
        assert family is not None and family.name == FAMILY_OF[name]
    assert set(FAMILY_INPUTS) == set(FAMILY_OF.values())


@pytest.mark.parametrize("name", ["sd3", "flux", "pixart", "hunyuan_dit"])
def test_our_loss_is_the_denoiser_called_as_the_reference_calls_it(name):
    """The family's predict over the mapped batch computes what the reference's direct call computes."""
    arch = ARCHITECTURES[name]
    family, cfg, components = _tiny_components(name)
    model = components[family.denoiser_name()].eval()
    objective = family.objective(cfg, components)
    batch = make_batch(arch, batch=2, resolution=64, tiny=True, generator=torch.Generator().manual_seed(1))
    if name == "flux":
        batch["guidance"] = torch.full((2,), cfg.flux_guidance_value)  # the family's constant guidance
    if name in ("pixart", "hunyuan_dit"):
        batch["encoder_attention_mask"][0, -3:] = 0  # padding: the mask must reach the transformer
    family_batch = FAMILY_INPUTS[family.name].batch(batch)
    draw = objective.draw(batch["latents"], torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = training_loss(family, components, objective, family_batch, draw)
        noisy = objective.noisy_latents(batch["latents"], draw)
        pred = arch.call(model, noisy, draw.timesteps, batch)
        expected = ((pred - objective.target(batch["latents"], draw)) ** 2).mean()
    assert torch.isfinite(ours) and ours.item() == pytest.approx(expected.item(), rel=1e-5)


def _tiny_components(name, device="cpu"):
    work = _tiny_work(name)
    cfg = training_config(work)
    family = registered_family(work.arch)
    model = build_model(work.arch, tiny=True, device=device, dtype=torch.float32)
    return family, cfg, family_components(family, model, cfg)


def test_family_components_carry_the_release_schedules():
    _, _, sd3 = _tiny_components("sd3", device="meta")
    assert sd3.settings["prediction_type"] == "flow_matching" and sd3.settings["clip_tokens"] == 77
    _, _, flux = _tiny_components("flux", device="meta")
    assert flux.settings["guidance_embeds"] is True and flux.noise_scheduler.config.use_dynamic_shifting
    family, cfg, pixart = _tiny_components("pixart", device="meta")
    objective = family.objective(cfg, pixart)
    assert isinstance(objective, Objective) and objective.prediction_type == "epsilon"
    assert objective.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4)  # PixArt's linear betas from 1e-4


def test_objectives_move_their_tables_to_a_device_once():
    betas = torch.linspace(1e-4, 0.02, 1000)
    cpu = Objective(alphas_cumprod=torch.cumprod(1 - betas, 0), prediction_type="v_prediction",
                    timestep_weights=torch.full((1000,), 1e-3), snr_gamma=5.0)
    moved = cpu.to("meta")
    assert moved.alphas_cumprod.device.type == "meta" and moved.timestep_weights.device.type == "meta"
    assert (moved.prediction_type, moved.snr_gamma) == ("v_prediction", 5.0)
    assert cpu.alphas_cumprod.device.type == "cpu"  # the original is left as it was
    latents = torch.randn(2, 4, 8, 8)
    same = cpu.to("cpu")
    draw = same.draw(latents, torch.Generator().manual_seed(0))
    assert torch.equal(draw.timesteps, cpu.draw(latents, torch.Generator().manual_seed(0)).timesteps)
    assert torch.equal(same.target(latents, draw), cpu.target(latents, draw))
    flow = FlowMatchingObjective(shift=3.0)
    assert flow.to("meta") is flow  # nothing to move: sigmas are drawn on the latents' device


def test_bad_input_is_a_user_error():
    with pytest.raises(UserError, match="--resolution 100"):
        train_step.main(["--model", "sdxl", "--resolution", "100", "--tiny", "--device", "cpu"])
    assert train_step.cli(["--model", "sd15", "--tiny", "--device", "cpu", "--batch", "0"]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["sdxl", "flux", "pixart"])
def test_tiny_on_cuda_with_the_trainers_default_levers(name):
    report = train_step.main(["--model", name, "--tiny", "--device", "cuda", "--steps", "3", "--warmup", "3",
                              "--peak-tflops", "1000"])
    for result in (report.ours, report.reference):
        assert result.error is None
        assert result.seconds_per_step > 0 and result.peak_memory_gib > 0
        assert math.isfinite(result.last_loss)
    assert report.ours.host_syncs_per_step is not None and "torch_compile" in report.ours.levers  # auto: on
    assert report.reference.host_syncs_per_step > 0  # loss.item() every step


# ---- benchmarks/memory.py --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["flux", "pixart"])
def test_memory_extrapolation_by_block_count_matches_the_whole_model(name):
    # at tiny size the whole model can be measured too: the extrapolation from fewer blocks must equal it
    from benchmarks import memory

    arch = ARCHITECTURES[name]
    full, built = dict(arch.model_config(True)), memory.reduced_config(arch, True)
    assert any(built[key] < full[key] for _, key in memory.BLOCK_LISTS[name])
    reduced = memory._build(arch, built, "cpu")
    whole = memory._build(arch, full, "cpu")
    layout = memory.block_layout(arch, full, reduced)
    assert memory.extrapolated_bytes(reduced, arch, layout) == pytest.approx(memory.tensor_bytes(whole))
    whole_blocks = [memory.tensor_bytes(block) for attribute, _ in memory.BLOCK_LISTS[name]
                    for block in getattr(whole, attribute)]
    assert memory.running_block_bytes(reduced, arch, layout) == whole_blocks
    plain, checkpointed = memory.extrapolated_activations(arch, True, 64, full, built)
    assert 0 < checkpointed < plain
    assert plain == pytest.approx(memory.activation_bytes(arch, full, 64, True)[0])


def test_memory_script_prints_every_mode_and_records(tmp_path, capsys):
    from benchmarks import memory

    results = tmp_path / "RESULTS.md"
    rows = memory.main(["--model", "flux", "--tiny", "--resolution", "64", "--record", "--results", str(results)])
    modes = {row.mode: row for row in rows}
    assert set(modes) == {"lora-bf16", "lora-int8", "lora-nf4", "full", "full-zero2 x2", "full-zero3/fsdp x2",
                          "full-zero2 x8", "full-zero3/fsdp x8"}
    assert modes["lora-int8"].parameters < modes["lora-bf16"].parameters  # quantised weights measured
    assert modes["lora-nf4"].parameters < modes["lora-int8"].parameters
    full, zero3 = modes["full"], modes["full-zero3/fsdp x8"]
    assert zero3.parameters == pytest.approx(full.parameters / 8) and zero3.activations == full.activations
    assert modes["full-zero2 x2"].parameters == full.parameters
    assert modes["full-zero2 x2"].optimizer == pytest.approx(full.optimizer / 2)
    out = capsys.readouterr().out
    assert "| flux | lora-int8 |" in out and "~18 GB" in out and "<= 14 GB" in out
    text = results.read_text()
    assert "Training memory per family and mode" in text and "python benchmarks/memory.py" in text


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_memory_of_a_unet_is_measured_on_the_whole_model(name):
    from benchmarks import memory

    arch = ARCHITECTURES[name]
    rows = {row.mode: row for row in memory.measure_whole(name, tiny=True, resolution=64, world_sizes=(2,))}
    assert set(rows) == {"lora-bf16", "lora-int8", "lora-nf4", "full", "full-zero2 x2", "full-zero3/fsdp x2"}
    whole = memory._build(arch, arch.model_config(True), "meta")
    weights = sum(p.numel() for p in whole.parameters())
    assert rows["full"].parameters == 4 * weights  # fp32: every weight of the model, none extrapolated
    assert rows["lora-int8"].parameters < rows["lora-bf16"].parameters
    plain, checkpointed = memory.unit_activations(arch, arch.model_config(True), 64, True)
    assert rows["lora-bf16"].activations == plain and rows["lora-bf16"].checkpointed == checkpointed
    assert 0 < checkpointed < plain  # checkpointing diffusers' units keeps their inputs, not their insides


def test_memory_swap_rows_take_the_fewest_last_blocks_that_meet_the_goal():
    from benchmarks import memory

    row = memory.Row("flux", "lora-bf16", parameters=100, gradients=0, optimizer=0, activations=0, checkpointed=10)
    blocks = [30, 30, 10, 10, 10]  # in running order: the last ones are swapped first
    swapped = memory.swapped_row(row, blocks, goal_bytes=100)
    # two swapped: 20 bytes leave, the larger of them (10) is back while it runs: 100 - 20 + 10 + 10 = 100
    assert swapped.mode == "lora-bf16 swap 2" and swapped.parameters == 90 and swapped.total == 100
    assert memory.swapped_row(row, blocks, goal_bytes=200) is None  # already under the goal
    assert memory.swapped_row(row, [30, 30], goal_bytes=5) is None  # no count gets there


@pytest.mark.parametrize("precision", ["no_change", "int8-quanto", "nf4-bnb"])
def test_memory_gpu_step_runs_on_cpu_at_tiny_size(precision):
    # the step --gpu measures, run on the CPU: LoRA on the (quantised) base, backward, AdamW
    from benchmarks import memory

    torch.manual_seed(0)
    loss = memory.lora_step("flux", 64, precision, device="cpu", tiny=True)
    assert math.isfinite(loss)
    torch.manual_seed(0)
    assert memory.lora_step("flux", 64, precision, device="cpu", tiny=True, swap=2) == loss  # block swap: same maths
