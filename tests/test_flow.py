"""Flow-matching maths: sigma sampling, shifts, targets, loss weights, and the objective."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from hypothesis import given, settings
from hypothesis import strategies as st

from simpletuner.config.schema import TrainingConfig
from simpletuner.errors import ConfigError
from simpletuner.models.flow import (
    SCHNELL_SIGMAS,
    AutoShift,
    FlowMatchingObjective,
    flow_loss_weights,
    flow_noisy_latents,
    flow_velocity,
    flux_mu,
    image_seq_len,
    logit_normal_density,
    sample_sigmas,
    sampling_from_config,
    shift_sigmas,
    time_shift_exponential,
)
from simpletuner.models.objectives import NoiseDraw, TrainingObjective


def cfg(**options) -> TrainingConfig:
    return TrainingConfig(model_family="flux", pretrained_model_name_or_path="x", **options)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- noising and targets
def test_noisy_latents_interpolate_between_data_and_noise():
    latents, noise = torch.randn(3, 4, 2, 2, generator=generator(1)), torch.randn(3, 4, 2, 2, generator=generator(2))
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    noisy = flow_noisy_latents(latents, noise, sigmas)
    torch.testing.assert_close(noisy[0], latents[0])
    torch.testing.assert_close(noisy[1], 0.75 * latents[1] + 0.25 * noise[1])
    torch.testing.assert_close(noisy[2], noise[2])
    # the velocity is the derivative of x_t along sigma
    step = 1e-3
    ahead = flow_noisy_latents(latents, noise, sigmas.clamp(max=1 - step) + step)
    behind = flow_noisy_latents(latents, noise, sigmas.clamp(max=1 - step))
    torch.testing.assert_close((ahead - behind) / step, flow_velocity(latents, noise), atol=2e-3, rtol=0)


def test_scheduler_scale_noise_is_the_same_interpolation():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    latents, noise = torch.randn(1, 4, 2, 2, generator=generator(1)), torch.randn(1, 4, 2, 2, generator=generator(2))
    timestep = scheduler.timesteps[3:4]
    sigma = scheduler.sigmas[3:4]
    torch.testing.assert_close(flow_noisy_latents(latents, noise, sigma),
                               scheduler.scale_noise(latents, timestep, noise))


# ---------------------------------------------------------------- sampling
@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_sampling_draws_as_diffusers_density_does(scheme):
    ours = sample_sigmas(64, scheme, logit_mean=0.3, logit_std=1.2, mode_scale=1.29, generator=generator(7))
    theirs = compute_density_for_timestep_sampling(scheme if scheme != "uniform" else "none", 64, logit_mean=0.3,
                                                   logit_std=1.2, mode_scale=1.29, generator=generator(7))
    torch.testing.assert_close(ours, theirs.clamp(1e-5, 1 - 1e-5))


def test_beta_sampling_follows_the_distribution_and_the_generator():
    drawn = sample_sigmas(200_000, "beta", beta_alpha=2.0, beta_beta=5.0, generator=generator(3))
    mean, variance = 2 / 7, 2 * 5 / (7**2 * 8)
    assert abs(drawn.mean().item() - mean) < 3e-3 and abs(drawn.var().item() - variance) < 1e-3
    again = sample_sigmas(8, "beta", generator=generator(4))
    assert torch.equal(sample_sigmas(8, "beta", generator=generator(4)), again)
    with pytest.raises(ConfigError, match="must be > 0"):
        sample_sigmas(2, "beta", beta_alpha=0.0)


def test_logit_normal_sampling_has_the_requested_location_and_scale():
    drawn = sample_sigmas(100_000, "logit_normal", logit_mean=-0.5, logit_std=0.7, generator=generator(5))
    logits = torch.log(drawn) - torch.log1p(-drawn)
    assert abs(logits.mean().item() + 0.5) < 0.01 and abs(logits.std().item() - 0.7) < 0.01


def test_schnell_schedule_draws_from_its_table():
    drawn = sample_sigmas(1000, "schnell", generator=generator(0))
    assert set(drawn.tolist()) == set(SCHNELL_SIGMAS)
    assert abs((drawn == 1.0).float().mean().item() - 0.7) < 0.05


def test_unknown_sampling_is_refused():
    with pytest.raises(ConfigError, match="'cosine'.*logit_normal"):
        sample_sigmas(2, "cosine")  # type: ignore[arg-type]


def test_sampling_switches_choose_one_scheme():
    assert sampling_from_config(cfg()) == "logit_normal"
    assert sampling_from_config(cfg(flow_use_uniform_schedule=True)) == "uniform"
    assert sampling_from_config(cfg(flow_use_beta_schedule=True)) == "beta"
    assert sampling_from_config(cfg(flow_use_mode_schedule=True)) == "mode"
    assert sampling_from_config(cfg(flux_fast_schedule=True)) == "schnell"
    with pytest.raises(ConfigError, match="flow_use_uniform_schedule and flow_use_beta_schedule.*at most one"):
        sampling_from_config(cfg(flow_use_uniform_schedule=True, flow_use_beta_schedule=True))


# ---------------------------------------------------------------- shifts
def test_constant_shift_matches_the_scheduler():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    unshifted = FlowMatchEulerDiscreteScheduler(shift=1.0)
    torch.testing.assert_close(shift_sigmas(unshifted.sigmas, 3.0), scheduler.sigmas)
    sigmas = torch.tensor([0.2, 0.7])
    assert torch.equal(shift_sigmas(sigmas, 1.0), sigmas) and torch.equal(shift_sigmas(sigmas, 0.0), sigmas)


@pytest.mark.parametrize("seq_len", [16, 256, 1024, 4096, 6000])
def test_flux_mu_and_exponential_shift_match_diffusers(seq_len):
    assert flux_mu(seq_len) == pytest.approx(calculate_shift(seq_len, 256, 4096, 0.5, 1.15))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sigmas = torch.linspace(0.05, 0.95, 7)
    mu = flux_mu(seq_len)
    torch.testing.assert_close(time_shift_exponential(sigmas, mu), scheduler.time_shift(mu, 1.0, sigmas))


def test_auto_shift_reads_the_scheduler_config_and_grows_with_resolution():
    shift = AutoShift.from_scheduler_config({"base_shift": 0.6, "max_shift": 1.2, "base_image_seq_len": 128,
                                             "max_image_seq_len": 2048})
    assert shift == AutoShift(128, 2048, 0.6, 1.2)
    assert AutoShift.from_scheduler_config({}) == AutoShift()
    assert image_seq_len(torch.zeros(1, 16, 128, 96)) == 64 * 48
    objective = FlowMatchingObjective(sampling="uniform", auto_shift=AutoShift())
    small = objective.sigmas_for(torch.zeros(64, 16, 32, 32), generator(1))
    large = objective.sigmas_for(torch.zeros(64, 16, 128, 128), generator(1))
    assert torch.all(large > small)  # more tokens, more noise


@settings(max_examples=60, deadline=None)
@given(shift=st.floats(0.05, 20.0), a=st.floats(1e-5, 1 - 1e-5), b=st.floats(1e-5, 1 - 1e-5))
def test_shift_is_monotone_and_keeps_the_unit_interval(shift, a, b):
    low, high = sorted((a, b))
    shifted = shift_sigmas(torch.tensor([low, high], dtype=torch.float64), shift)
    assert 0 < shifted[0] <= shifted[1] <= 1
    if shift > 1:
        assert shifted[0] >= low - 1e-12  # shift > 1 moves towards noise


@settings(max_examples=60, deadline=None)
@given(seq_len=st.integers(1, 20000), a=st.floats(1e-5, 1 - 1e-5), b=st.floats(1e-5, 1 - 1e-5))
def test_auto_shift_is_monotone_in_sigma(seq_len, a, b):
    low, high = sorted((a, b))
    shifted = time_shift_exponential(torch.tensor([low, high], dtype=torch.float64), flux_mu(seq_len))
    assert 0 < shifted[0] <= shifted[1] < 1


@settings(max_examples=40, deadline=None)
@given(scheme=st.sampled_from(["logit_normal", "uniform", "mode", "beta"]), seed=st.integers(0, 2**31),
       std=st.floats(0.2, 4.0), mean=st.floats(-2, 2), shift=st.floats(0.0, 10.0), auto=st.booleans(),
       weighting=st.sampled_from(["none", "sigma_sqrt", "logit_normal", "cosmap"]))
def test_drawn_sigmas_lie_in_the_unit_interval_and_weights_are_finite(scheme, seed, std, mean, shift, auto,
                                                                       weighting):
    objective = FlowMatchingObjective(sampling=scheme, logit_mean=mean, logit_std=std, shift=shift,
                                      auto_shift=AutoShift() if auto else None, weighting=weighting)
    draw = objective.draw(torch.zeros(32, 4, 16, 16), generator(seed))
    sigmas = objective.sigmas(draw.timesteps)
    assert torch.all((sigmas > 0) & (sigmas <= 1))
    weights = objective.loss_weights(draw.timesteps)
    if weights is not None:
        assert torch.all(torch.isfinite(weights)) and torch.all(weights >= 0)
        # a density weight may underflow to 0 far in its tail; the others never vanish
        typical = (torch.log(sigmas) - torch.log1p(-sigmas) - mean).abs() < 5 * std
        assert torch.all(weights[typical] > 0) if weighting == "logit_normal" else torch.all(weights > 0)


# ---------------------------------------------------------------- loss weights
def test_weights_match_diffusers_sd3_weighting():
    sigmas = torch.tensor([0.01, 0.3, 0.5, 0.99])
    for scheme in ("sigma_sqrt", "cosmap"):
        torch.testing.assert_close(flow_loss_weights(sigmas, scheme), compute_loss_weighting_for_sd3(scheme, sigmas))
    assert flow_loss_weights(sigmas, "none") is None
    with pytest.raises(ConfigError, match="'snr'"):
        flow_loss_weights(sigmas, "snr")  # type: ignore[arg-type]


def test_logit_normal_weight_is_the_density_of_logit_normal_sampling():
    grid = torch.linspace(0, 1, 200_001, dtype=torch.float64)[1:-1]
    density = logit_normal_density(grid, mean=0.4, std=0.8)
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-4)
    mean = torch.trapezoid(density * grid, grid).item()
    drawn = sample_sigmas(200_000, "logit_normal", logit_mean=0.4, logit_std=0.8, generator=generator(9))
    assert drawn.double().mean().item() == pytest.approx(mean, abs=3e-3)
    peak = grid[density.argmax()].item()
    assert flow_loss_weights(torch.tensor([peak]), "logit_normal", logit_mean=0.4, logit_std=0.8).item() == \
        pytest.approx(density.max().item(), rel=1e-4)


# ---------------------------------------------------------------- the objective
def test_objective_from_config_reads_every_option():
    objective = FlowMatchingObjective.from_config(
        cfg(flow_sigmoid_scale=1.5, flow_sigmoid_mean=0.2, flow_schedule_shift=2.0, flow_loss_weighting="cosmap",
            loss_type="huber", huber_c=0.2, noise_offset=0.1, input_perturbation=0.05, flow_mode_scale=0.8),
        {"num_train_timesteps": 1000})
    assert (objective.sampling, objective.logit_std, objective.logit_mean) == ("logit_normal", 1.5, 0.2)
    assert (objective.shift, objective.auto_shift, objective.weighting) == (2.0, None, "cosmap")
    assert (objective.loss_type, objective.huber_c, objective.mode_scale) == ("huber", 0.2, 0.8)
    assert objective.noise_offset == 0.1 and objective.input_perturbation == 0.05
    auto = FlowMatchingObjective.from_config(cfg(flow_schedule_auto_shift=True), {"max_shift": 1.3})
    assert auto.auto_shift == AutoShift(max_shift=1.3)
    assert all(callable(getattr(objective, name)) for name in ("draw", "noisy_latents", "target", "loss"))
    assert set(vars(TrainingObjective)) >= {"draw", "noisy_latents", "target", "loss"}


def test_draw_gives_timesteps_of_sigma_times_1000_and_noisy_latents_use_them():
    objective = FlowMatchingObjective(sampling="uniform", shift=3.0)
    latents = torch.randn(4, 16, 8, 8, generator=generator(0))
    draw = objective.draw(latents, generator(1))
    reference = generator(1)
    noise = torch.randn(latents.shape, generator=reference)
    sigmas = shift_sigmas(torch.rand((4,), generator=reference).clamp(1e-5, 1 - 1e-5), 3.0)
    torch.testing.assert_close(draw.noise, noise)
    torch.testing.assert_close(draw.timesteps, sigmas * 1000)
    torch.testing.assert_close(objective.noisy_latents(latents, draw), flow_noisy_latents(latents, noise, sigmas))
    assert torch.equal(objective.target(latents, draw), noise - latents)


def test_input_perturbation_moves_the_input_not_the_target():
    objective = FlowMatchingObjective(input_perturbation=0.1)
    latents = torch.randn(2, 4, 4, 4, generator=generator(0))
    draw = objective.draw(latents, generator(2))
    assert draw.perturbation is not None
    plain = NoiseDraw(noise=draw.noise, timesteps=draw.timesteps)
    assert not torch.equal(objective.noisy_latents(latents, draw), objective.noisy_latents(latents, plain))
    assert torch.equal(objective.target(latents, draw), objective.target(latents, plain))


def test_loss_weights_each_sample_as_diffusers_scripts_do():
    objective = FlowMatchingObjective(weighting="sigma_sqrt")
    prediction = torch.randn(3, 4, 2, 2, generator=generator(1))
    target = torch.randn(3, 4, 2, 2, generator=generator(2))
    sigmas = torch.tensor([0.2, 0.5, 0.9])
    weighting = compute_loss_weighting_for_sd3("sigma_sqrt", sigmas.view(-1, 1, 1, 1))
    reference = torch.mean((weighting * (prediction - target) ** 2).reshape(3, -1), 1).mean()
    torch.testing.assert_close(objective.loss(prediction, target, sigmas * 1000), reference)
    plain = FlowMatchingObjective().loss(prediction, target, sigmas * 1000)
    torch.testing.assert_close(plain, torch.nn.functional.mse_loss(prediction, target))


def test_snr_gamma_is_ignored_with_a_warning(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="simpletuner"):
        objective = FlowMatchingObjective.from_config(cfg(snr_gamma=5.0))
    assert objective.weighting == "none"
    assert any("snr_gamma" in record.getMessage() for record in caplog.records)


def test_negative_shift_is_refused():
    with pytest.raises(ConfigError, match="flow_schedule_shift"):
        shift_sigmas(torch.tensor([0.5]), -1.0)
    assert math.isclose(flux_mu(256), 0.5) and math.isclose(flux_mu(4096), 1.15)
