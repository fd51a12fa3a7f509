"""Diffusion training objectives as pure functions, and the one step that uses them.

Everything here is maths on tensors: noise schedules, targets, timestep sampling,
loss weights and loss types. `Objective` bundles the settings of one run, and
`training_loss` is the step the trainer calls; it knows families only through the
`ModelFamily` interface.

Conventions: `alphas_cumprod` is the DDPM cumulative product of (1 - beta) over
`num_train_timesteps` steps; timesteps are integer indices into it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Literal, Mapping, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from simpletuner.errors import ConfigError

if TYPE_CHECKING:
    from simpletuner.config.schema import TrainingConfig
    from simpletuner.models.base import Components, ModelFamily

PredictionType = Literal["epsilon", "v_prediction", "sample"]
LossType = Literal["l2", "huber", "smooth_l1"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]
BiasStrategy = Literal["none", "earlier", "later", "range"]


# ---------------------------------------------------------------- schedules
def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, Algorithm 1).

    The same arithmetic as diffusers' `rescale_zero_terminal_snr`: shift sqrt(alpha_bar)
    so its last value is 0, and scale it so its first value is unchanged.
    """
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def alphas_cumprod_from_betas(betas: Tensor) -> Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s)."""
    return torch.cumprod(1.0 - betas, dim=0)


def snr_from_alphas_cumprod(alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep, in float32."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1.0 - alpha_bar)


def spaced_timesteps(num_train_timesteps: int, num_steps: int, spacing: TimestepSpacing,
                     steps_offset: int = 0) -> Tensor:
    """The descending timesteps a sampler of `num_steps` visits (diffusers' `set_timesteps`).

    `trailing` always includes the last timestep (num_train_timesteps - 1), which
    zero-terminal-SNR models need; `leading` starts at 0 and stops short of it.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ConfigError(f"number of sampling steps must be in 1..{num_train_timesteps}, got {num_steps}")
    if spacing == "linspace":
        steps = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1]
    elif spacing == "leading":
        ratio = num_train_timesteps // num_steps
        steps = (np.arange(0, num_steps) * ratio).round()[::-1] + steps_offset
    elif spacing == "trailing":
        steps = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)) - 1
    else:
        raise ConfigError(f"timestep spacing {spacing!r} is not one of 'leading', 'trailing', 'linspace'")
    return torch.from_numpy(steps.copy().astype(np.int64))


# ---------------------------------------------------------------- noising and targets
def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Reshape a [B] tensor to broadcast over a [B, ...] tensor."""
    return values.flatten().reshape(-1, *([1] * (like.ndim - 1)))


def _signal_and_noise_scales(alphas_cumprod: Tensor, timesteps: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    # Same order of operations as diffusers' DDPMScheduler.add_noise, so results match bit for bit.
    alpha_bar = alphas_cumprod.to(device=like.device, dtype=like.dtype)
    timesteps = timesteps.to(like.device)
    signal = _per_sample(alpha_bar[timesteps] ** 0.5, like)
    noise = _per_sample((1 - alpha_bar[timesteps]) ** 0.5, like)
    return signal, noise


def add_noise(alphas_cumprod: Tensor, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * noise."""
    signal, sigma = _signal_and_noise_scales(alphas_cumprod, timesteps, latents)
    return signal * latents + sigma * noise


def velocity(alphas_cumprod: Tensor, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """v = sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * x_0 (Salimans & Ho)."""
    signal, sigma = _signal_and_noise_scales(alphas_cumprod, timesteps, latents)
    return signal * noise - sigma * latents


def prediction_target(prediction_type: PredictionType, alphas_cumprod: Tensor, latents: Tensor,
                      noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the model should output: the noise, the velocity or the clean sample."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(alphas_cumprod, latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ConfigError(f"prediction_type {prediction_type!r} is not one of 'epsilon', 'v_prediction', 'sample'")


# ---------------------------------------------------------------- noise and timestep sampling
def offset_noise(noise: Tensor, strength: float, probability: float,
                 generator: torch.Generator | None = None) -> Tensor:
    """Add a per-sample, per-channel constant (noise offset) to a random share of the samples.

    Each sample gets the offset with `probability`, drawn independently, without a host sync.
    """
    if strength == 0 or probability == 0:
        return noise
    batch, channels = noise.shape[:2]
    offsets = torch.randn((batch, channels), generator=generator, device=noise.device, dtype=noise.dtype)
    chosen = torch.rand((batch,), generator=generator, device=noise.device) < probability
    offsets = offsets * chosen.to(noise.dtype)[:, None]
    return noise + strength * offsets.reshape(batch, channels, *([1] * (noise.ndim - 2)))


def timestep_bias_weights(num_timesteps: int, strategy: BiasStrategy = "none", multiplier: float = 1.0,
                          begin: int = 0, end: int | None = None, portion: float = 0.25) -> Tensor:
    """Sampling weights over timesteps, with SimpleTuner's timestep_bias_* semantics.

    earlier / later multiply the first / last `portion` of the timesteps by `multiplier`;
    range multiplies [begin, end). Weights are normalised to sum to 1.
    """
    weights = torch.ones(num_timesteps, dtype=torch.float64)
    if strategy != "none":
        if multiplier <= 0:
            raise ConfigError(f"timestep_bias_multiplier must be > 0, got {multiplier}; "
                              "use timestep_bias_strategy 'none' to disable the bias")
        count = int(portion * num_timesteps)
        if strategy == "earlier":
            weights[:count] *= multiplier
        elif strategy == "later":
            weights[num_timesteps - count:] *= multiplier
        elif strategy == "range":
            end = num_timesteps if end is None else end
            if not 0 <= begin < end <= num_timesteps:
                raise ConfigError(f"timestep_bias_begin/end must satisfy 0 <= begin < end <= {num_timesteps}, "
                                  f"got begin={begin}, end={end}")
            weights[begin:end] *= multiplier
        else:
            raise ConfigError(f"timestep_bias_strategy {strategy!r} is not one of "
                              "'none', 'earlier', 'later', 'range'")
    return (weights / weights.sum()).float()


def restrict_timesteps(weights: Tensor, begin: int, end: int) -> Tensor:
    """Zero the weights outside [begin, end) and renormalise (e.g. the refiner's low-noise range)."""
    if not 0 <= begin < end <= weights.numel():
        raise ConfigError(f"timestep range [{begin}, {end}) is empty or outside 0..{weights.numel()}")
    kept = torch.zeros_like(weights)
    kept[begin:end] = weights[begin:end]
    return kept / kept.sum()


def refiner_timestep_range(num_timesteps: int, strength: float, invert: bool = False) -> tuple[int, int]:
    """SimpleTuner's refiner_training_strength: train on the lowest-noise share of the schedule.

    strength 0.2 of 1000 gives [0, 200); inverted, [200, 1000).
    """
    boundary = int(num_timesteps * strength)
    if not 0 < boundary < num_timesteps or strength <= 0:
        raise ConfigError(f"refiner_training_strength must be in (0, 1) and leave at least one timestep, "
                          f"got {strength}")
    return (boundary, num_timesteps) if invert else (0, boundary)


def sample_timesteps(weights: Tensor, batch_size: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """Draw `batch_size` timesteps (int64) from the given sampling weights."""
    drawn = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
    return drawn.to(device) if device is not None else drawn


def caption_keep_mask(batch_size: int, dropout_probability: float,
                      generator: torch.Generator | None = None) -> Tensor:
    """Bool [B]: True where the sample keeps its caption, False where it trains unconditionally."""
    return torch.rand((batch_size,), generator=generator) >= dropout_probability


def select_per_sample(keep: Tensor, kept: Tensor, dropped: Tensor) -> Tensor:
    """Per-sample choice between two tensors; `dropped` may have batch size 1 (broadcast)."""
    keep = _per_sample(keep.to(kept.device), kept)
    return torch.where(keep, kept, dropped.to(dtype=kept.dtype, device=kept.device).expand_as(kept))


# ---------------------------------------------------------------- losses
def min_snr_weights(snr: Tensor, gamma: float, prediction_type: PredictionType) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) as diffusers' examples compute them.

    epsilon: min(snr, gamma) / snr; v_prediction: min(snr, gamma) / (snr + 1);
    sample: min(snr, gamma). A timestep of zero SNR (zero-terminal schedules) gets weight
    1 for epsilon instead of 0/0.
    """
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if prediction_type == "epsilon":
        return torch.where(snr == 0, torch.ones_like(snr), clipped / snr)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def elementwise_loss(prediction: Tensor, target: Tensor, loss_type: LossType = "l2",
                     huber_c: float = 0.1) -> Tensor:
    """Unreduced loss in float32: squared error, pseudo-Huber, or smooth L1 (pseudo-Huber / c)."""
    prediction, target = prediction.float(), target.float()
    if loss_type == "l2":
        return F.mse_loss(prediction, target, reduction="none")
    if loss_type == "huber":
        return 2 * huber_c * (torch.sqrt((prediction - target) ** 2 + huber_c**2) - huber_c)
    if loss_type == "smooth_l1":
        return 2 * (torch.sqrt((prediction - target) ** 2 + huber_c**2) - huber_c)
    raise ConfigError(f"loss_type {loss_type!r} is not one of 'l2', 'huber', 'smooth_l1'")


def masked(loss: Tensor, mask: Tensor | None) -> Tensor:
    """Elementwise loss [B, C, h, w] times per-pixel weights [B, 1, h, w] (masked loss); unchanged without.

    Upstream SimpleTuner's masked loss: the weighted loss is then averaged over every pixel, so a fully
    masked region adds nothing to the loss or to its gradient.
    """
    return loss if mask is None else loss * mask.to(device=loss.device, dtype=loss.dtype)


def weighted_mean(loss: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean over each sample, times its weight, then mean over the batch."""
    per_sample = loss.mean(dim=list(range(1, loss.ndim)))
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)
    return per_sample.mean()


# ---------------------------------------------------------------- the objective of a run
@dataclass(frozen=True)
class NoiseDraw:
    """The random parts of one step: noise (offset included), timesteps, input perturbation."""

    noise: Tensor
    timesteps: Tensor
    perturbation: Tensor | None = None  # already scaled; added to the noise that builds x_t only


class TrainingObjective(Protocol):
    """What `training_loss` needs from an objective; a flow-matching objective provides the same."""

    def draw(self, latents: Tensor, generator: torch.Generator | None = None) -> NoiseDraw: ...

    def noisy_latents(self, latents: Tensor, draw: NoiseDraw) -> Tensor: ...

    def target(self, latents: Tensor, draw: NoiseDraw) -> Tensor: ...

    def loss(self, prediction: Tensor, target: Tensor, timesteps: Tensor, mask: Tensor | None = None) -> Tensor: ...

    def to(self, device: torch.device | str) -> TrainingObjective: ...


@dataclass(frozen=True, eq=False)
class Objective:
    """A DDPM objective (epsilon / v / sample) with its schedule, sampling and loss settings."""

    alphas_cumprod: Tensor
    prediction_type: PredictionType
    timestep_weights: Tensor
    snr_gamma: float | None = None
    loss_type: LossType = "l2"
    huber_c: float = 0.1
    noise_offset: float = 0.0
    noise_offset_probability: float = 0.0
    input_perturbation: float = 0.0

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.numel())

    @classmethod
    def from_config(cls, cfg: TrainingConfig, betas: Tensor, prediction_type: PredictionType,
                    timestep_range: tuple[int, int] | None = None) -> Objective:
        """Build from the model's (un-rescaled) betas and the run's options."""
        if cfg.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas.double()).to(betas.dtype)
        weights = timestep_bias_weights(
            betas.numel(), cfg.timestep_bias_strategy, cfg.timestep_bias_multiplier,
            cfg.timestep_bias_begin, cfg.timestep_bias_end, cfg.timestep_bias_portion,
        )
        if timestep_range is not None:
            weights = restrict_timesteps(weights, *timestep_range)
        return cls(
            alphas_cumprod=alphas_cumprod_from_betas(betas),
            prediction_type=prediction_type,
            timestep_weights=weights,
            snr_gamma=cfg.snr_gamma,
            loss_type=cfg.loss_type,
            huber_c=cfg.huber_c,
            noise_offset=cfg.noise_offset,
            noise_offset_probability=cfg.noise_offset_probability,
            input_perturbation=cfg.input_perturbation,
        )

    def to(self, device: torch.device | str) -> Objective:
        """This objective with its schedule tables on `device`: a step then copies nothing from the host
        (on CUDA, a copy from pageable host memory waits for the device)."""
        return replace(self, alphas_cumprod=self.alphas_cumprod.to(device),
                       timestep_weights=self.timestep_weights.to(device))

    def draw(self, latents: Tensor, generator: torch.Generator | None = None) -> NoiseDraw:
        """Draw noise, timesteps and input perturbation for a batch of latents.

        With a generator, pass one that lives on latents.device.
        """
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        noise = offset_noise(noise, self.noise_offset, self.noise_offset_probability, generator)
        timesteps = sample_timesteps(self.timestep_weights.to(latents.device), latents.shape[0], generator)
        perturbation = None
        if self.input_perturbation:
            perturbation = self.input_perturbation * torch.randn(
                latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        return NoiseDraw(noise=noise, timesteps=timesteps, perturbation=perturbation)

    def noisy_latents(self, latents: Tensor, draw: NoiseDraw) -> Tensor:
        noise = draw.noise if draw.perturbation is None else draw.noise + draw.perturbation
        return add_noise(self.alphas_cumprod, latents, noise, draw.timesteps)

    def target(self, latents: Tensor, draw: NoiseDraw) -> Tensor:
        return prediction_target(self.prediction_type, self.alphas_cumprod, latents, draw.noise, draw.timesteps)

    def loss_weights(self, timesteps: Tensor) -> Tensor | None:
        if self.snr_gamma is None:
            return None
        snr = snr_from_alphas_cumprod(self.alphas_cumprod, timesteps)
        return min_snr_weights(snr, self.snr_gamma, self.prediction_type)

    def loss(self, prediction: Tensor, target: Tensor, timesteps: Tensor, mask: Tensor | None = None) -> Tensor:
        """Scalar loss: elementwise loss (times the loss mask, if any), per-sample mean, min-SNR weights, batch mean."""
        elementwise = masked(elementwise_loss(prediction, target, self.loss_type, self.huber_c), mask)
        return weighted_mean(elementwise, self.loss_weights(timesteps))


def training_loss(family: ModelFamily, components: Components, objective: TrainingObjective,
                  batch: Mapping[str, Any], draw: NoiseDraw,
                  base_model: Callable[[], ContextManager[Any]] | None = None, *,
                  prior_loss_weight: float = 1.0) -> Tensor:
    """The loss of one training step.

    `batch["latents"]` are model-space latents (already drawn and scaled, see
    `ModelFamily.latents_from_distribution`), `batch["text"]` the cached text outputs
    (caption dropout already applied, see `ModelFamily.drop_captions`); other keys are
    the family's per-sample conditioning (e.g. SDXL's original_size, crop_top_left, target_size);
    `batch["loss_mask"]`, when present, weighs the loss per latent pixel (masked loss).
    `batch["regularisation"]` (a list of bools), when present, marks regularisation samples: their target
    is the base model's own prediction, made inside `base_model()` (the adapter switched off).
    With a ControlNet in the components, the prediction is the frozen denoiser's steered by it
    through `batch["control"]` (models.controlnet); a regularisation sample's target is then the prediction
    steered by the ControlNet without its adapter.
    `batch["class_data"]` (a list of bools), when present, marks DreamBooth class images: the loss is then
    the instance samples' loss plus `prior_loss_weight` times the class samples' loss (`prior_preservation_loss`).
    """
    latents = batch["latents"]
    noisy = objective.noisy_latents(latents, draw)
    predict = family.predict_with_controlnet if components.get("controlnet") is not None else family.predict
    prediction = predict(components, noisy, draw.timesteps, batch["text"], batch)
    target = objective.target(latents, draw)
    regularisation = batch.get("regularisation")
    if regularisation is not None and any(regularisation):
        if base_model is None:
            raise ConfigError("regularisation data (is_regularisation_data) needs the base model's predictions: "
                              "train an adapter (model_type 'lora')")
        with torch.no_grad(), base_model():
            base = predict(components, noisy, draw.timesteps, batch["text"], batch)
        chosen = torch.tensor(regularisation, device=target.device)
        target = select_per_sample(~chosen, target, base.to(target.dtype))
    mask = batch.get("loss_mask")

    def loss_of(chosen: Tensor | None) -> Tensor:
        if chosen is None:
            return objective.loss(prediction, target, draw.timesteps, mask)
        return objective.loss(prediction[chosen], target[chosen], draw.timesteps[chosen],
                              None if mask is None else mask[chosen])

    return prior_preservation_loss(loss_of, batch.get("class_data"), prior_loss_weight, prediction.device)


def prior_preservation_loss(loss_of: Callable[[Tensor | None], Tensor], class_data: Sequence[bool] | None,
                            weight: float, device: torch.device) -> Tensor:
    """DreamBooth's prior-preservation loss, as diffusers' train_dreambooth(_lora).py computes it: the loss of the
    instance samples plus `weight` times the loss of the class samples, each averaged over its own samples.

    `loss_of(chosen)` is the loss over the samples a boolean index picks (None: the whole batch). Without
    class samples it is the plain loss; a batch of class samples only gives `weight` times their loss.
    """
    if class_data is None or not any(class_data):
        return loss_of(None)
    chosen = torch.tensor(list(class_data), dtype=torch.bool, device=device)
    loss = weight * loss_of(chosen)
    if not all(class_data):
        loss = loss_of(~chosen) + loss
    return loss
