"""Which two-expert validation chains a configuration may ask for (validation_base_model / _refiner_model)."""

from __future__ import annotations

from typing import Any

# diffusers' denoising_end / denoising_start exist in these families' pipelines only
CHAINING_FAMILIES = ("sdxl", "kolors")


def chain_problem(cfg: Any) -> str | None:
    """Why the configuration's validation chain cannot run, naming the options; None when it can (or is off)."""
    given = [name for name in ("validation_base_model", "validation_refiner_model") if getattr(cfg, name)]
    if not given:
        return None
    if len(given) == 2:
        return ("validation_base_model and validation_refiner_model cannot both be given: the trained model is "
                "one of the two stages; give the other stage only")
    name = given[0]
    if cfg.model_family not in CHAINING_FAMILIES:
        return (f"{name} cannot be combined with model_family {cfg.model_family!r}: chaining two stages needs "
                "diffusers' denoising_end / denoising_start, which only the SDXL and Kolors pipelines have "
                "(PixArt Sigma's pipeline has neither, nor an image-to-image form); remove " + name)
    second = cfg.refiner_training and not cfg.refiner_training_invert_schedule
    if name == "validation_base_model" and not second:
        return ("validation_base_model runs a first stage before the trained model, which needs "
                "refiner_training=true without refiner_training_invert_schedule (the trained model as the second "
                "stage); set refiner_training or use validation_refiner_model")
    if name == "validation_refiner_model" and second:
        return ("validation_refiner_model runs a second stage after the trained model, but refiner_training=true "
                "(without refiner_training_invert_schedule) trains the second stage itself; use "
                "validation_base_model for its first stage")
    return None
