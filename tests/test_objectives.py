"""Pure objective maths: schedules, targets, timestep sampling, weights, losses."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from hypothesis import given, settings
from hypothesis import strategies as st

from simpletuner.config.schema import TrainingConfig
from simpletuner.errors import ConfigError
from simpletuner.models.objectives import (
    NoiseDraw,
    Objective,
    add_noise,
    alphas_cumprod_from_betas,
    caption_keep_mask,
    elementwise_loss,
    min_snr_weights,
    offset_noise,
    prediction_target,
    refiner_timestep_range,
    rescale_zero_terminal_snr,
    restrict_timesteps,
    sample_timesteps,
    select_per_sample,
    snr_from_alphas_cumprod,
    spaced_timesteps,
    timestep_bias_weights,
    velocity,
    weighted_mean,
)

SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def scheduler(**options) -> DDPMScheduler:
    return DDPMScheduler(**SD_SCHEDULE, **options)


def cfg(**options) -> TrainingConfig:
    return TrainingConfig(model_family="sd1x", pretrained_model_name_or_path="x", **options)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- schedules
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_zero_snr_rescaling_matches_diffusers(beta_schedule):
    plain = DDPMScheduler(beta_schedule=beta_schedule)
    rescaled = DDPMScheduler(beta_schedule=beta_schedule, rescale_betas_zero_snr=True)
    torch.testing.assert_close(rescale_zero_terminal_snr(plain.betas), rescaled.betas)


@settings(max_examples=40, deadline=None)
@given(start=st.floats(1e-5, 1e-3), end=st.floats(2e-3, 0.05), steps=st.integers(10, 2000))
def test_zero_snr_final_alpha_bar_is_zero_and_first_is_kept(start, end, steps):
    betas = torch.linspace(start, end, steps, dtype=torch.float64)
    rescaled = rescale_zero_terminal_snr(betas)
    alpha_bar = alphas_cumprod_from_betas(rescaled)
    assert alpha_bar[-1] == 0
    torch.testing.assert_close(alpha_bar[0], alphas_cumprod_from_betas(betas)[0])
    assert torch.all(alpha_bar[1:] <= alpha_bar[:-1])  # still monotone
    assert torch.all((rescaled >= 0) & (rescaled <= 1))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 3, 25, 30, 50, 999, 1000])
def test_spaced_timesteps_match_diffusers_set_timesteps(spacing, steps):
    reference = scheduler(timestep_spacing=spacing, steps_offset=1)
    reference.set_timesteps(steps)
    assert torch.equal(spaced_timesteps(1000, steps, spacing, steps_offset=1), reference.timesteps)


def test_trailing_spacing_reaches_the_last_timestep_and_leading_does_not():
    assert spaced_timesteps(1000, 10, "trailing")[0] == 999
    assert spaced_timesteps(1000, 10, "leading")[0] == 900
    with pytest.raises(ConfigError, match="1..1000"):
        spaced_timesteps(1000, 0, "trailing")
    with pytest.raises(ConfigError, match="'middle'"):
        spaced_timesteps(1000, 10, "middle")  # type: ignore[arg-type]


# ---------------------------------------------------------------- noising and targets
def test_add_noise_and_velocity_equal_diffusers():
    reference = scheduler(rescale_betas_zero_snr=True)
    latents = torch.randn(4, 4, 8, 8, generator=generator(1))
    noise = torch.randn(4, 4, 8, 8, generator=generator(2))
    timesteps = torch.tensor([0, 10, 500, 999])
    alpha_bar = reference.alphas_cumprod
    assert torch.equal(add_noise(alpha_bar, latents, noise, timesteps), reference.add_noise(latents, noise, timesteps))
    assert torch.equal(velocity(alpha_bar, latents, noise, timesteps),
                       reference.get_velocity(latents, noise, timesteps))


@settings(max_examples=50, deadline=None)
@given(t=st.integers(0, 999), seed=st.integers(0, 10_000), zero_snr=st.booleans())
def test_v_target_recovers_the_clean_sample_and_the_noise(t, seed, zero_snr):
    alpha_bar = scheduler(rescale_betas_zero_snr=zero_snr).alphas_cumprod.double()
    latents = torch.randn(2, 4, 4, 4, generator=generator(seed), dtype=torch.float64)
    noise = torch.randn(2, 4, 4, 4, generator=generator(seed + 1), dtype=torch.float64)
    timesteps = torch.tensor([t, t])
    x_t = add_noise(alpha_bar, latents, noise, timesteps)
    v = prediction_target("v_prediction", alpha_bar, latents, noise, timesteps)
    signal, sigma = alpha_bar[t].sqrt(), (1 - alpha_bar[t]).sqrt()
    torch.testing.assert_close(signal * x_t - sigma * v, latents)  # x0 = alpha x_t - sigma v
    torch.testing.assert_close(sigma * x_t + signal * v, noise)  # eps = sigma x_t + alpha v


def test_prediction_targets_by_type():
    alpha_bar = scheduler().alphas_cumprod
    latents, noise = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 2.0)
    t = torch.tensor([3])
    assert prediction_target("epsilon", alpha_bar, latents, noise, t) is noise
    assert prediction_target("sample", alpha_bar, latents, noise, t) is latents
    with pytest.raises(ConfigError, match="'flow'"):
        prediction_target("flow", alpha_bar, latents, noise, t)  # type: ignore[arg-type]


# ---------------------------------------------------------------- noise offset, perturbation
def test_noise_offset_is_a_per_channel_constant_on_chosen_samples():
    noise = torch.zeros(64, 4, 8, 8)
    shifted = offset_noise(noise, 0.1, 0.5, generator(3))
    per_sample = shifted.flatten(2)
    assert torch.all(per_sample.amax(-1) == per_sample.amin(-1))  # constant over space
    offset_rows = shifted.flatten(1).abs().sum(1) > 0
    assert 10 < offset_rows.sum() < 54  # about half the samples
    assert torch.all(shifted[offset_rows].abs().amax() < 1.0)
    assert torch.equal(offset_noise(noise, 0.1, 0.0, generator(3)), noise)
    assert torch.equal(offset_noise(noise, 0.0, 1.0, generator(3)), noise)
    assert (offset_noise(noise, 0.1, 1.0, generator(3)).flatten(1).abs().sum(1) > 0).all()


def test_input_perturbation_moves_x_t_but_not_the_target():
    objective = Objective.from_config(cfg(input_perturbation=0.1), scheduler().betas, "epsilon")
    latents = torch.randn(2, 4, 4, 4, generator=generator(0))
    draw = objective.draw(latents, generator(5))
    assert draw.perturbation is not None
    clean = NoiseDraw(noise=draw.noise, timesteps=draw.timesteps)
    torch.testing.assert_close(objective.noisy_latents(latents, draw),
                               add_noise(objective.alphas_cumprod, latents, draw.noise + draw.perturbation,
                                         draw.timesteps))
    assert not torch.equal(objective.noisy_latents(latents, draw), objective.noisy_latents(latents, clean))
    assert torch.equal(objective.target(latents, draw), draw.noise)
    assert Objective.from_config(cfg(), scheduler().betas, "epsilon").draw(latents).perturbation is None


def test_draw_is_reproducible_with_a_generator():
    objective = Objective.from_config(cfg(noise_offset=0.1, noise_offset_probability=1.0), scheduler().betas,
                                      "epsilon")
    latents = torch.zeros(3, 4, 4, 4)
    first, second = objective.draw(latents, generator(9)), objective.draw(latents, generator(9))
    assert torch.equal(first.noise, second.noise) and torch.equal(first.timesteps, second.timesteps)
    assert first.timesteps.dtype == torch.int64 and first.timesteps.shape == (3,)


# ---------------------------------------------------------------- timestep bias and sampling
def test_timestep_bias_follows_simpletuner_semantics():
    none = timestep_bias_weights(1000)
    torch.testing.assert_close(none, torch.full((1000,), 1e-3))
    later = timestep_bias_weights(1000, "later", multiplier=3.0, portion=0.25)
    ratio = later / later[0]
    assert torch.allclose(ratio[750:], torch.tensor(3.0)) and torch.allclose(ratio[:750], torch.tensor(1.0))
    earlier = timestep_bias_weights(1000, "earlier", multiplier=2.0, portion=0.1)
    ratio = earlier / earlier[-1]
    assert torch.allclose(ratio[:100], torch.tensor(2.0)) and torch.allclose(ratio[100:], torch.tensor(1.0))
    ranged = timestep_bias_weights(1000, "range", multiplier=5.0, begin=200, end=500)
    ratio = ranged / ranged[0]
    assert torch.allclose(ratio[200:500], torch.tensor(5.0))
    assert torch.allclose(ratio[:200], torch.tensor(1.0)) and torch.allclose(ratio[500:], torch.tensor(1.0))
    for weights in (later, earlier, ranged):
        torch.testing.assert_close(weights.sum(), torch.tensor(1.0))


@pytest.mark.parametrize(("options", "message"), [
    ({"strategy": "later", "multiplier": 0.0}, "multiplier must be > 0"),
    ({"strategy": "range", "begin": 600, "end": 500}, "begin=600, end=500"),
    ({"strategy": "range", "begin": 0, "end": 1001}, "end=1001"),
    ({"strategy": "sooner"}, "'sooner'"),
])
def test_timestep_bias_rejects_bad_settings(options, message):
    with pytest.raises(ConfigError, match=message):
        timestep_bias_weights(1000, **options)


def test_biased_sampling_favours_the_biased_range():
    weights = timestep_bias_weights(1000, "later", multiplier=10.0, portion=0.2)
    drawn = sample_timesteps(weights, 20_000, generator(1))
    share = (drawn >= 800).float().mean().item()
    assert 0.65 < share < 0.77  # expected 10*0.2 / (10*0.2 + 0.8) = 0.714


def test_refiner_range_restricts_sampling():
    assert refiner_timestep_range(1000, 0.2) == (0, 200)
    assert refiner_timestep_range(1000, 0.2, invert=True) == (200, 1000)
    with pytest.raises(ConfigError, match="refiner_training_strength"):
        refiner_timestep_range(1000, 1.0)
    weights = restrict_timesteps(timestep_bias_weights(1000), 0, 200)
    drawn = sample_timesteps(weights, 5000, generator(2))
    assert drawn.max() < 200 and drawn.min() >= 0
    objective = Objective.from_config(cfg(), scheduler().betas, "epsilon", timestep_range=(200, 1000))
    assert objective.draw(torch.zeros(500, 1, 1, 1), generator(3)).timesteps.min() >= 200


# ---------------------------------------------------------------- caption dropout helpers
def test_caption_keep_mask_and_selection():
    keep = caption_keep_mask(10_000, 0.1, generator(4))
    assert keep.dtype == torch.bool and 0.08 < 1 - keep.float().mean().item() < 0.12
    assert caption_keep_mask(5, 0.0).all() and not caption_keep_mask(5, 1.0).any()
    kept, empty = torch.ones(3, 2, 5), torch.zeros(1, 2, 5)
    chosen = select_per_sample(torch.tensor([True, False, True]), kept, empty)
    assert chosen[:, 0, 0].tolist() == [1.0, 0.0, 1.0]


# ---------------------------------------------------------------- weights and losses
def test_min_snr_weights_match_diffusers_examples():
    reference = scheduler()
    timesteps = torch.tensor([0, 50, 300, 999])
    snr = snr_from_alphas_cumprod(reference.alphas_cumprod, timesteps)
    torch.testing.assert_close(snr, compute_snr(reference, timesteps))
    base = torch.stack([snr, 5.0 * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "epsilon"), base / snr)
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "v_prediction"), base / (snr + 1))


@settings(max_examples=60, deadline=None)
@given(snr=st.lists(st.floats(0, 1e6), min_size=1, max_size=16), gamma=st.floats(0.1, 20))
def test_min_snr_weights_are_bounded(snr, gamma):
    snr = torch.tensor(snr)
    epsilon = min_snr_weights(snr, gamma, "epsilon")
    v = min_snr_weights(snr, gamma, "v_prediction")
    assert torch.all(torch.isfinite(epsilon)) and torch.all(epsilon <= 1) and torch.all(epsilon > 0)
    assert torch.all(v < 1) and torch.all(v >= 0)


def test_zero_snr_timestep_is_finite_for_both_types():
    alpha_bar = scheduler(rescale_betas_zero_snr=True).alphas_cumprod
    snr = snr_from_alphas_cumprod(alpha_bar, torch.tensor([999]))
    assert snr.item() == 0
    assert min_snr_weights(snr, 5.0, "epsilon").item() == 1.0
    assert min_snr_weights(snr, 5.0, "v_prediction").item() == 0.0


def test_loss_types():
    prediction, target = torch.tensor([[0.0, 0.01, 1.0, -3.0]]), torch.zeros(1, 4)
    torch.testing.assert_close(elementwise_loss(prediction, target, "l2"), prediction**2)
    huber = elementwise_loss(prediction, target, "huber", huber_c=0.1)
    smooth = elementwise_loss(prediction, target, "smooth_l1", huber_c=0.1)
    torch.testing.assert_close(huber, 0.1 * smooth)
    assert huber[0, 0] == 0
    torch.testing.assert_close(huber[0, 1], prediction[0, 1] ** 2, rtol=0.02, atol=0)  # quadratic near 0
    assert abs(smooth[0, 3].item() - 2 * (3.0 - 0.1)) < 1e-2  # linear far away
    with pytest.raises(ConfigError, match="'l1'"):
        elementwise_loss(prediction, target, "l1")  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(difference=st.floats(-100, 100), c=st.floats(0.01, 1))
def test_pseudo_huber_is_below_l2_and_nonnegative(difference, c):
    huber = elementwise_loss(torch.tensor([difference]), torch.zeros(1), "huber", c).item()
    tolerance = 1e-6 * (1 + difference**2)  # float32 arithmetic
    assert -tolerance <= huber <= difference**2 + tolerance


def test_weighted_mean_and_objective_loss():
    loss = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
    assert weighted_mean(loss).item() == 4.0
    assert weighted_mean(loss, torch.tensor([1.0, 0.0])).item() == 1.0
    objective = Objective.from_config(cfg(snr_gamma=5.0), scheduler().betas, "epsilon")
    timesteps = torch.tensor([10, 900])
    prediction, target = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    weights = objective.loss_weights(timesteps)
    assert weights is not None and weights[0] < 1 and weights[1] == 1  # low noise weighted down
    torch.testing.assert_close(objective.loss(prediction, target, timesteps), weights.mean())


def test_objective_from_config_applies_zero_snr_and_loss_options():
    objective = Objective.from_config(cfg(rescale_betas_zero_snr=True, loss_type="huber", huber_c=0.2,
                                          timestep_bias_strategy="earlier", timestep_bias_multiplier=2.0),
                                      scheduler().betas, "v_prediction")
    torch.testing.assert_close(objective.alphas_cumprod, scheduler(rescale_betas_zero_snr=True).alphas_cumprod)
    assert objective.num_train_timesteps == 1000 and objective.alphas_cumprod[-1] == 0
    assert (objective.loss_type, objective.huber_c) == ("huber", 0.2)
    torch.testing.assert_close(objective.timestep_weights[0], 2 * objective.timestep_weights[-1])
