"""Model flavours: SimpleTuner's `model_flavour` names and the Hub checkpoint each stands for.

Plain data, no torch: `simpletuner config check` reads it without loading a model. Each
family class carries its table as the class attribute `flavours` (see models/<family>.py);
the tables copy SimpleTuner's `DEFAULT_MODEL_FLAVOUR` / `HUGGINGFACE_PATHS` of
simpletuner/helpers/models/<family>/model.py (current release).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Flavours:
    """A family's flavours: name -> Hub checkpoint, the default one, and names refused with a reason."""

    checkpoints: dict[str, str]
    default: str | None = None  # None: the family has no default checkpoint (SimpleTuner requires a flavour)
    refused: dict[str, str] = field(default_factory=dict)  # flavour -> why this version cannot train it

    def checkpoint(self, flavour: str | None) -> str | None:
        """The Hub checkpoint of `flavour` (or of the default flavour); None when there is none."""
        return self.checkpoints.get(flavour or self.default or "")

    def problem(self, family: str, flavour: str | None) -> str | None:
        """Why `flavour` cannot be used for `family`, or None."""
        if flavour is None:
            return None
        if flavour in self.refused:
            return f"model_flavour {flavour!r}: {self.refused[flavour]}"
        if flavour not in self.checkpoints:
            accepted = ", ".join(self.checkpoints) or "none"
            return f"model_flavour {flavour!r} is not a flavour of model_family {family!r}; accepted: {accepted}"
        return None


SD1X = Flavours({
    "1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "1.4": "CompVis/stable-diffusion-v1-4",
    "dreamshaper": "Lykon/dreamshaper-8",
    "realvis": "SG161222/RealVisXL_V5.0",  # as upstream writes it (an SDXL checkpoint under sd1x)
}, default="dreamshaper")
SD2X = Flavours({
    "digitaldiffusion": "Junglerally/Digital-Diffusion",
    "pseudoflex-v2": "bghira/pseudo-flex-v2",
    "pseudojourney": "bghira/pseudo-journey-v2",
    "2.1": "stabilityai/stable-diffusion-2-1",
    "2.0": "stabilityai/stable-diffusion-2-0",
}, default="pseudoflex-v2")
# SimpleTuner's current release has no "legacy" family: its flavours are those of sd1x and sd2x, no default.
LEGACY = Flavours({**SD1X.checkpoints, **SD2X.checkpoints})
SDXL = Flavours({
    "base-1.0": "stabilityai/stable-diffusion-xl-base-1.0",
    "refiner-1.0": "stabilityai/stable-diffusion-xl-refiner-1.0",
    "base-0.9": "stabilityai/stable-diffusion-xl-base-0.9",
    "refiner-0.9": "stabilityai/stable-diffusion-xl-refiner-0.9",
}, default="base-1.0")
SD3 = Flavours({
    "medium": "stabilityai/stable-diffusion-3.5-medium",
    "large": "stabilityai/stable-diffusion-3.5-large",
}, default="medium")
FLUX = Flavours({
    "dev": "black-forest-labs/flux.1-dev",
    "schnell": "black-forest-labs/flux.1-schnell",
}, default="dev", refused={
    "kontext": "Flux Kontext (black-forest-labs/flux.1-kontext-dev, image editing from a reference image) is not "
               "supported in this version; use flavour dev or schnell",
})
PIXART_SIGMA = Flavours({
    "900M-1024-v0.6": "terminusresearch/pixart-900m-1024-ft-v0.6",
    "900M-1024-v0.7-stage1": "terminusresearch/pixart-900m-1024-ft-v0.7-stage1",
    "900M-1024-v0.7-stage2": "terminusresearch/pixart-900m-1024-ft-v0.7-stage2",
    "600M-512": "PixArt-alpha/PixArt-Sigma-XL-2-512-MS",
    "600M-1024": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
    "600M-2048": "PixArt-alpha/PixArt-Sigma-XL-2-2K-MS",
}, default="900M-1024-v0.6")
KOLORS = Flavours({"1.0": "terminusresearch/kwai-kolors-1.0"}, default="1.0")
DEEPFLOYD = Flavours({
    "i-medium-400m": "DeepFloyd/IF-I-M-v1.0",
    "i-large-900m": "DeepFloyd/IF-I-L-v1.0",
    "i-xlarge-4.3b": "DeepFloyd/IF-I-XL-v1.0",
    "ii-medium-450m": "DeepFloyd/IF-II-M-v1.0",
    "ii-large-1.2b": "DeepFloyd/IF-II-L-v1.0",
})  # upstream: REQUIRES_FLAVOUR, no default
# SimpleTuner has no Hunyuan-DiT: these are Tencent's diffusers-format repositories.
HUNYUAN_DIT = Flavours({
    "v1.1": "Tencent-Hunyuan/HunyuanDiT-v1.1-Diffusers",
    "v1.2": "Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers",
    "v1.2-distilled": "Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers-Distilled",
}, default="v1.2")

# model_family value -> its table (the family classes point at the same objects).
BY_FAMILY: dict[str, Flavours] = {
    "legacy": LEGACY, "sd1x": SD1X, "sd2x": SD2X, "sdxl": SDXL, "sdxl_refiner": SDXL, "sd3": SD3, "flux": FLUX,
    "pixart_sigma": PIXART_SIGMA, "kolors": KOLORS, "deepfloyd": DEEPFLOYD,
    "hunyuan_dit": HUNYUAN_DIT,
}
