"""Flow matching (rectified flow) as pure functions, and the objective SD3 and Flux train with.

Conventions, as diffusers' FlowMatchEulerDiscreteScheduler and its training examples
(train_dreambooth_lora_sd3.py / _flux.py) use them:
- sigma in (0, 1] is the noise level; x_t = (1 - sigma) * x_0 + sigma * noise;
- the model predicts the velocity noise - x_0;
- the timestep handed to a family is sigma * num_train_timesteps (1000), as a float; each
  family converts it to its model's convention (SD3 takes it as is, Flux takes sigma).

Timestep sampling: logit-normal ("sigmoid", the default), uniform, mode (SD3 paper,
with a scale) or beta, then an optional shift: a constant one
(shift * s / (1 + (shift - 1) * s)), or Flux's resolution-dependent one
(exp(mu) / (exp(mu) + 1/s - 1), mu growing linearly with the image's token count).
Loss weighting: none, sigma_sqrt (sigma^-2), cosmap (as diffusers'
compute_loss_weighting_for_sd3) or logit_normal (the logit-normal density at sigma,
the SD3 paper's weighting form of logit-normal sampling; pair it with uniform sampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping

import torch
from torch import Tensor

from simpletuner.errors import ConfigError
from simpletuner.log import get_logger
from simpletuner.models.objectives import (LossType, NoiseDraw, _per_sample, elementwise_loss, masked, offset_noise,
                                          weighted_mean)

if TYPE_CHECKING:
    from simpletuner.config.schema import TrainingConfig

logger = get_logger(__name__)

Sampling = Literal["logit_normal", "uniform", "mode", "beta", "schnell"]
Weighting = Literal["none", "sigma_sqrt", "logit_normal", "cosmap"]

# FLUX.1-schnell was distilled on these noise levels (SimpleTuner's flux_fast_schedule).
SCHNELL_SIGMAS = (1.0,) * 7 + (0.75, 0.5, 0.25)
SIGMA_EPS = 1e-5  # continuous draws are kept inside [eps, 1 - eps]: sigma_sqrt weights stay finite


# ---------------------------------------------------------------- noising and targets
def flow_noisy_latents(latents: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """x_t = (1 - sigma) * x_0 + sigma * noise, sigma per sample."""
    sigmas = _per_sample(sigmas.to(device=latents.device, dtype=latents.dtype), latents)
    return (1.0 - sigmas) * latents + sigmas * noise


def flow_velocity(latents: Tensor, noise: Tensor) -> Tensor:
    """The velocity target d x_t / d sigma = noise - x_0."""
    return noise - latents


# ---------------------------------------------------------------- sigma sampling
def sample_sigmas(batch_size: int, sampling: Sampling = "logit_normal", *, logit_mean: float = 0.0,
                  logit_std: float = 1.0, mode_scale: float = 1.29, beta_alpha: float = 2.0,
                  beta_beta: float = 2.0, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> Tensor:
    """Draw `batch_size` unshifted sigmas (float32).

    logit_normal and mode draw as diffusers' compute_density_for_timestep_sampling does (the
    same generator gives the same values); beta inverts the beta CDF of a uniform draw, so it
    too follows the generator. Continuous draws are clamped to [1e-5, 1 - 1e-5].
    """
    device = torch.device(device) if device is not None else None
    if sampling == "schnell":
        table = torch.tensor(SCHNELL_SIGMAS, device=device)
        return table[torch.randint(len(SCHNELL_SIGMAS), (batch_size,), generator=generator, device=device)]
    if sampling == "logit_normal":
        u = torch.sigmoid(torch.normal(mean=logit_mean, std=logit_std, size=(batch_size,), generator=generator,
                                       device=device))
    elif sampling == "uniform":
        u = torch.rand((batch_size,), generator=generator, device=device)
    elif sampling == "mode":
        u = torch.rand((batch_size,), generator=generator, device=device)
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    elif sampling == "beta":
        u = _beta_icdf(torch.rand((batch_size,), generator=generator, device=device), beta_alpha, beta_beta)
    else:
        raise ConfigError(f"flow-matching timestep sampling {sampling!r} is not one of "
                          "'logit_normal', 'uniform', 'mode', 'beta', 'schnell'")
    return u.clamp(SIGMA_EPS, 1 - SIGMA_EPS)


def _beta_icdf(u: Tensor, alpha: float, beta: float, cells: int = 8192) -> Tensor:
    """Inverse CDF of Beta(alpha, beta) at u, from the density on a midpoint grid (float64).

    torch's Beta sampler takes no generator; inverting a uniform draw keeps runs reproducible.
    """
    if alpha <= 0 or beta <= 0:
        raise ConfigError(f"flow_beta_schedule_alpha and _beta must be > 0, got {alpha} and {beta}")
    centres = (torch.arange(cells, dtype=torch.float64, device=u.device) + 0.5) / cells
    log_density = (alpha - 1) * torch.log(centres) + (beta - 1) * torch.log1p(-centres)
    mass = torch.exp(log_density - log_density.max())
    edges_cdf = torch.cat([mass.new_zeros(1), torch.cumsum(mass, 0)])
    edges_cdf = edges_cdf / edges_cdf[-1]
    target = u.double().clamp(0, 1)
    upper = torch.searchsorted(edges_cdf, target).clamp(1, cells)
    low_cdf, high_cdf = edges_cdf[upper - 1], edges_cdf[upper]
    fraction = (target - low_cdf) / (high_cdf - low_cdf).clamp_min(1e-300)
    return ((upper - 1 + fraction) / cells).to(u.dtype)


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """Constant shift, as FlowMatchEulerDiscreteScheduler(shift=...): shift*s / (1 + (shift-1)*s).

    shift > 1 moves sampling towards high noise (composition); 1 (or 0, "off") leaves it.
    """
    if shift in (0, 1):
        return sigmas
    if shift < 0:
        raise ConfigError(f"flow_schedule_shift must be >= 0, got {shift}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_mu(image_seq_len: int | float, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's shift exponent for an image of `image_seq_len` tokens (diffusers' calculate_shift)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def time_shift_exponential(sigmas: Tensor, mu: float) -> Tensor:
    """exp(mu) / (exp(mu) + (1/s - 1)): the scheduler's dynamic (resolution-dependent) shift."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def image_seq_len(latents: Tensor, patch_size: int = 2) -> int:
    """Tokens of a [B, C, H, W] latent after patchifying (SD3 and Flux: 2x2 patches)."""
    return (latents.shape[-2] // patch_size) * (latents.shape[-1] // patch_size)


# ---------------------------------------------------------------- loss weights
def logit_normal_density(sigmas: Tensor, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """pi(s) = 1 / (std sqrt(2 pi)) * 1 / (s (1 - s)) * exp(-(logit(s) - mean)^2 / (2 std^2))."""
    s = sigmas.double()
    logit = torch.log(s) - torch.log1p(-s)
    density = torch.exp(-((logit - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi) * s * (1 - s))
    return density.to(sigmas.dtype)


def flow_loss_weights(sigmas: Tensor, weighting: Weighting = "none", *, logit_mean: float = 0.0,
                      logit_std: float = 1.0) -> Tensor | None:
    """Per-sample loss weights (float32), or None for "none".

    sigma_sqrt and cosmap are diffusers' compute_loss_weighting_for_sd3 formulas.
    """
    sigmas = sigmas.float()
    if weighting == "none":
        return None
    if weighting == "sigma_sqrt":
        return sigmas**-2.0
    if weighting == "cosmap":
        bottom = 1 - 2 * sigmas + 2 * sigmas**2
        return 2 / (math.pi * bottom)
    if weighting == "logit_normal":
        return logit_normal_density(sigmas.clamp(SIGMA_EPS, 1 - SIGMA_EPS), logit_mean, logit_std)
    raise ConfigError(f"flow_loss_weighting {weighting!r} is not one of 'none', 'sigma_sqrt', 'logit_normal', "
                      "'cosmap'")


# ---------------------------------------------------------------- the objective of a run
@dataclass(frozen=True)
class AutoShift:
    """Flux's resolution-dependent shift: mu from the image's token count (scheduler config values)."""

    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> AutoShift:
        defaults = cls()
        return cls(base_seq_len=config.get("base_image_seq_len") or defaults.base_seq_len,
                   max_seq_len=config.get("max_image_seq_len") or defaults.max_seq_len,
                   base_shift=config.get("base_shift") or defaults.base_shift,
                   max_shift=config.get("max_shift") or defaults.max_shift)

    def mu(self, seq_len: int) -> float:
        return flux_mu(seq_len, self.base_seq_len, self.max_seq_len, self.base_shift, self.max_shift)


@dataclass(frozen=True, eq=False)
class FlowMatchingObjective:
    """Flow matching with its sigma sampling, shift, loss weighting and loss type.

    Implements `simpletuner.models.objectives.TrainingObjective`: `draw` gives timesteps
    sigma * num_train_timesteps (float); `noisy_latents`, `target` and `loss` read sigma back.
    """

    sampling: Sampling = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    beta_alpha: float = 2.0
    beta_beta: float = 2.0
    shift: float = 1.0  # constant shift; ignored when auto_shift is set
    auto_shift: AutoShift | None = None
    weighting: Weighting = "none"
    loss_type: LossType = "l2"
    huber_c: float = 0.1
    noise_offset: float = 0.0
    noise_offset_probability: float = 0.0
    input_perturbation: float = 0.0
    num_train_timesteps: int = 1000
    prediction_type: str = "flow_matching"
    sigma_range: tuple[float, float] | None = None  # refiner_training: the expert's share of the schedule

    @classmethod
    def from_config(cls, cfg: TrainingConfig,
                    scheduler_config: Mapping[str, Any] | None = None) -> FlowMatchingObjective:
        """The run's objective from its options and the model's FlowMatchEulerDiscreteScheduler config."""
        scheduler_config = dict(scheduler_config or {})
        if cfg.snr_gamma is not None:
            logger.warning("snr_gamma=%s is ignored: min-SNR weighting applies to DDPM objectives; flow matching "
                           "uses flow_loss_weighting", cfg.snr_gamma)
        return cls(
            sampling=sampling_from_config(cfg),
            logit_mean=cfg.flow_sigmoid_mean,
            logit_std=cfg.flow_sigmoid_scale,
            mode_scale=cfg.flow_mode_scale,
            beta_alpha=cfg.flow_beta_schedule_alpha,
            beta_beta=cfg.flow_beta_schedule_beta,
            shift=cfg.flow_schedule_shift,
            auto_shift=AutoShift.from_scheduler_config(scheduler_config) if cfg.flow_schedule_auto_shift else None,
            weighting=cfg.flow_loss_weighting,
            loss_type=cfg.loss_type,
            huber_c=cfg.huber_c,
            noise_offset=cfg.noise_offset,
            noise_offset_probability=cfg.noise_offset_probability,
            input_perturbation=cfg.input_perturbation,
            num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000)),
            sigma_range=refiner_sigma_range(cfg.refiner_training_strength, cfg.refiner_training_invert_schedule)
            if cfg.refiner_training else None,
        )

    def to(self, device: torch.device | str) -> FlowMatchingObjective:
        """As `Objective.to`; flow matching keeps no tables (sigmas are drawn on the latents' device)."""
        return self

    def sigmas_for(self, latents: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw shifted sigmas for a batch of [B, C, H, W] latents (the size sets the auto-shift)."""
        sigmas = sample_sigmas(latents.shape[0], self.sampling, logit_mean=self.logit_mean, logit_std=self.logit_std,
                               mode_scale=self.mode_scale, beta_alpha=self.beta_alpha, beta_beta=self.beta_beta,
                               generator=generator, device=latents.device)
        if self.auto_shift is not None:
            sigmas = time_shift_exponential(sigmas, self.auto_shift.mu(image_seq_len(latents)))
        else:
            sigmas = shift_sigmas(sigmas, self.shift)
        if self.sigma_range is not None:  # the drawn distribution, squeezed into the expert's range
            low, high = self.sigma_range
            sigmas = low + (high - low) * sigmas
        return sigmas.clamp(min=SIGMA_EPS)  # an extreme shift must not reach sigma 0

    def draw(self, latents: Tensor, generator: torch.Generator | None = None) -> NoiseDraw:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        noise = offset_noise(noise, self.noise_offset, self.noise_offset_probability, generator)
        timesteps = self.sigmas_for(latents, generator) * self.num_train_timesteps
        perturbation = None
        if self.input_perturbation:
            perturbation = self.input_perturbation * torch.randn(
                latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        return NoiseDraw(noise=noise, timesteps=timesteps, perturbation=perturbation)

    def sigmas(self, timesteps: Tensor) -> Tensor:
        return timesteps.float() / self.num_train_timesteps

    def noisy_latents(self, latents: Tensor, draw: NoiseDraw) -> Tensor:
        noise = draw.noise if draw.perturbation is None else draw.noise + draw.perturbation
        return flow_noisy_latents(latents, noise, self.sigmas(draw.timesteps))

    def target(self, latents: Tensor, draw: NoiseDraw) -> Tensor:
        return flow_velocity(latents, draw.noise)

    def loss_weights(self, timesteps: Tensor) -> Tensor | None:
        return flow_loss_weights(self.sigmas(timesteps), self.weighting, logit_mean=self.logit_mean,
                                 logit_std=self.logit_std)

    def loss(self, prediction: Tensor, target: Tensor, timesteps: Tensor, mask: Tensor | None = None) -> Tensor:
        """Scalar loss: elementwise loss (times the loss mask, if any), per-sample mean, flow weights, batch mean."""
        elementwise = masked(elementwise_loss(prediction, target, self.loss_type, self.huber_c), mask)
        return weighted_mean(elementwise, self.loss_weights(timesteps))


def refiner_sigma_range(strength: float, invert: bool = False) -> tuple[float, float]:
    """refiner_training_strength for flow matching: the lowest-noise share of sigmas, [0, strength]; inverted,
    [strength, 1] (as `objectives.refiner_timestep_range` for DDPM timesteps)."""
    if not 0 < strength < 1:
        raise ConfigError(f"refiner_training_strength must be in (0, 1), got {strength}")
    return (strength, 1.0) if invert else (0.0, strength)


def sampling_from_config(cfg: TrainingConfig) -> Sampling:
    """Which sigma sampling SimpleTuner's switches select (at most one may be set)."""
    chosen = [name for name, on in (("uniform", cfg.flow_use_uniform_schedule), ("beta", cfg.flow_use_beta_schedule),
                                    ("mode", cfg.flow_use_mode_schedule), ("schnell", cfg.flux_fast_schedule)) if on]
    switches = {"uniform": "flow_use_uniform_schedule", "beta": "flow_use_beta_schedule",
                "mode": "flow_use_mode_schedule", "schnell": "flux_fast_schedule"}
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join(switches[name] for name in chosen)} are all set; they choose how "
                          "flow-matching timesteps are sampled, so set at most one (none: logit-normal)")
    return chosen[0] if chosen else "logit_normal"  # type: ignore[return-value]
