import importlib.util
import sys

import pytest
import torch
from torch import nn

from simpletuner.config.schema import TrainingConfig
from simpletuner.errors import UserError
from simpletuner.train.optim import build_optimizer, parameter_groups, set_train_mode, trained_weight_dtype

PACKAGES = {
    "adamw8bit": "bitsandbytes",
    "adafactor": "transformers",
    "prodigy": "prodigyopt",
    "lion": "lion_pytorch",
    "adamw_schedulefree": "schedulefree",
    "optimi-adamw": "optimi",
    "optimi-lion": "optimi",
}


def _cfg(**options) -> TrainingConfig:
    return TrainingConfig(model_family="sd1x", pretrained_model_name_or_path="unused", **options)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 5) -> list[float]:
    data = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        loss = model(data).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_no_weight_decay_on_vectors():
    model = _model()
    decayed, undecayed = parameter_groups(model, 0.01)
    assert decayed["weight_decay"] == 0.01 and undecayed["weight_decay"] == 0.0
    assert {p.ndim for p in decayed["params"]} == {2}
    assert len(undecayed["params"]) == 4  # two biases, the norm's weight and bias


def test_frozen_parameters_are_left_out():
    model = _model()
    model[0].requires_grad_(False)
    groups = parameter_groups(model, 0.01)
    assert sum(len(g["params"]) for g in groups) == 4


def test_nothing_to_train_is_a_user_error():
    model = _model().requires_grad_(False)
    with pytest.raises(UserError, match="nothing to train"):
        build_optimizer(model, _cfg(), "cpu")


def test_adamw_uses_the_configuration():
    cfg = _cfg(learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, adam_weight_decay=0.1)
    optimizer = build_optimizer(_model(), cfg, "cpu")
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (3e-4, (0.8, 0.95), 1e-6, 0.1)
    assert group["fused"]  # adamw_fused auto: PyTorch's fused CPU kernel


@pytest.mark.parametrize("name", ["adamw", *PACKAGES])
def test_each_optimizer_trains_or_names_its_package(name):
    model = _model()
    cfg = _cfg(optimizer=name, learning_rate=1.0 if name == "prodigy" else 1e-2)
    if importlib.util.find_spec(PACKAGES.get(name, "torch")) is None:
        package = {"optimi": "torch-optimi"}.get(PACKAGES[name], PACKAGES[name].replace("_", "-"))
        with pytest.raises(UserError, match=f"pip install {package}"):
            build_optimizer(model, cfg, "cpu")
        return
    optimizer = build_optimizer(model, cfg, "cpu")
    losses = _train(model, optimizer, steps=8)
    assert losses[-1] < losses[0]


def test_missing_package_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # makes `import lion_pytorch` fail
    with pytest.raises(UserError, match=r"optimizer='lion' needs the 'lion-pytorch' package.*pip install lion-pytorch"):
        build_optimizer(_model(), _cfg(optimizer="lion"), "cpu")


def _regression(dtype: torch.dtype, make, steps: int = 300) -> tuple[torch.Tensor, float]:
    """Fit 16 weights, stored in `dtype` and started at 1.0, to a random linear map: (weights, final loss)."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(256, 16, generator=generator)
    targets = inputs @ torch.randn(16, 1, generator=generator)
    weights = nn.Parameter(torch.ones(16, 1, dtype=dtype))
    optimizer = make(weights)
    for _ in range(steps):
        loss = ((inputs.to(dtype) @ weights).float() - targets).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    final = weights.detach().float()
    return final, ((inputs @ final) - targets).pow(2).mean().item()


def test_adamw_bf16_tracks_fp32_adamw_where_plain_bf16_adamw_drifts():
    # lr 1e-3 moves weights near 1.0 by less than half a bf16 step (2**-8): rounded away unless compensated
    options = {"learning_rate": 1e-3, "adam_weight_decay": 0.0}
    reference, reference_loss = _regression(torch.float32, lambda p: build_optimizer([p], _cfg(**options), "cpu"))
    kahan, kahan_loss = _regression(
        torch.bfloat16, lambda p: build_optimizer([p], _cfg(optimizer="adamw_bf16", **options), "cpu"))
    plain, plain_loss = _regression(torch.bfloat16, lambda p: build_optimizer([p], _cfg(**options), "cpu"))
    kahan_gap, plain_gap = (kahan - reference).abs().max().item(), (plain - reference).abs().max().item()
    assert kahan_gap < 2 ** -7, kahan_gap  # within one bf16 step (at 1.0) of every fp32 weight
    assert plain_gap > 20 * kahan_gap, (plain_gap, kahan_gap)
    assert abs(kahan_loss - reference_loss) < 0.01 * reference_loss < abs(plain_loss - reference_loss)


def test_adamw_bf16_is_torch_optimis_adamw_with_kahan_summation():
    import optimi

    weights = nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    cfg = _cfg(optimizer="adamw_bf16", learning_rate=3e-4, adam_beta2=0.99, adam_epsilon=1e-6)
    optimizer = build_optimizer([weights], cfg, "cpu")
    assert isinstance(optimizer, optimi.AdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["beta1"], group["beta2"], group["eps"], group["kahan_sum"]) == (3e-4, 0.9, 0.99, 1e-6, True)
    assert trained_weight_dtype(cfg) == torch.bfloat16 and trained_weight_dtype(_cfg()) is None


def test_adamw_bf16_refuses_fp32_weights():
    with pytest.raises(UserError, match="optimizer='adamw_bf16' trains torch.bfloat16 weights, but trainable "
                                        "weights are torch.float32"):
        build_optimizer(_model(), _cfg(optimizer="adamw_bf16"), "cpu")


def test_missing_optimi_names_torch_optimi(monkeypatch):
    monkeypatch.setitem(sys.modules, "optimi", None)
    with pytest.raises(UserError, match=r"needs the 'torch-optimi' package.*pip install torch-optimi"):
        build_optimizer(_model().to(torch.bfloat16), _cfg(optimizer="adamw_bf16"), "cpu")


def test_schedulefree_switches_weights_for_evaluation():
    model = _model()
    optimizer = build_optimizer(model, _cfg(optimizer="adamw_schedulefree", learning_rate=1e-2), "cpu")
    _train(model, optimizer, steps=3)
    training_weights = model[0].weight.detach().clone()
    set_train_mode(optimizer, False)
    assert not torch.equal(model[0].weight, training_weights)
    set_train_mode(optimizer, True)
    torch.testing.assert_close(model[0].weight, training_weights)


def test_set_train_mode_ignores_ordinary_optimizers():
    optimizer = build_optimizer(_model(), _cfg(), "cpu")
    set_train_mode(optimizer, False)
    set_train_mode(optimizer, True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adamw_is_fused_on_cuda():
    model = _model().cuda()
    optimizer = build_optimizer(model, _cfg(), "cuda")
    assert optimizer.param_groups[0]["fused"]
    loss = model(torch.randn(4, 4, device="cuda")).pow(2).mean()
    loss.backward()
    optimizer.step()


def test_adamw_is_fused_by_default_wherever_pytorch_has_the_kernel():
    model = _model()
    fused = build_optimizer(model, _cfg(optimizer="adamw"), "cpu")
    assert all(group["fused"] for group in fused.param_groups)  # PyTorch's fused CPU kernel
    other = _model()
    plain = build_optimizer(other, _cfg(optimizer="adamw", adamw_fused=False), "cpu")
    assert not any(group["fused"] for group in plain.param_groups)
    # the same training within rounding: fusing changes how fast, not what
    assert _train(model, fused) == pytest.approx(_train(other, plain), rel=1e-5)


def test_adamw_fused_on_a_device_without_the_kernel_is_refused():
    with pytest.raises(UserError, match="adamw_fused=true: PyTorch has no fused AdamW for 'meta' devices"):
        build_optimizer(_model(), _cfg(optimizer="adamw", adamw_fused=True), "meta")
    assert not any(g["fused"] for g in build_optimizer(_model(), _cfg(optimizer="adamw"), "meta").param_groups)


@pytest.mark.slow
def test_fused_adamw_run_resumes_exactly(tmp_path, tiny_model):
    """adamw_fused's default (on, the CPU included) keeps exact resume: the fused step's state checkpoints whole."""
    import shutil

    from safetensors.torch import load_file
    from train_helpers import metrics, write_run

    from simpletuner.cli import main

    model = tiny_model("sd1x")
    options = dict(optimizer="adamw", max_train_steps=4, checkpointing_steps=2, disable_validation=True, images=6)
    assert main(["train", str(write_run(tmp_path / "straight", model, "sd1x", **options))]) == 0
    checkpoint = tmp_path / "straight" / "output" / "checkpoints" / "step-000002"
    resumed = write_run(tmp_path / "resumed", model, "sd1x", dataset=tmp_path / "straight" / "dataset",
                        resume_from_checkpoint="latest", **options)
    shutil.copytree(checkpoint, tmp_path / "resumed" / "output" / "checkpoints" / checkpoint.name)
    assert main(["train", str(resumed)]) == 0
    full = metrics(tmp_path / "straight" / "output")
    assert metrics(tmp_path / "resumed" / "output") == {step: full[step] for step in (3, 4)}
    weights = [load_file(tmp_path / run / "output" / "pytorch_lora_weights.safetensors") for run in ("straight", "resumed")]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    state = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    assert all(group["fused"] for group in state["param_groups"])  # the checkpointed optimiser was the fused one
