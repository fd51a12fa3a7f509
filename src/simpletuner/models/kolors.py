"""Kwai Kolors (model_family kolors): SDXL's UNet conditioned by the ChatGLM3 text encoder.

Text, as KolorsPipeline.encode_prompt computes it: ChatGLM's penultimate hidden states
(sequence-first, so permuted to [B, L, 4096]) and, as the pooled embedding, the last
position of its final hidden states. The UNet projects the text to its width itself
(encoder_hid_proj). Everything else (time ids, caption dropout, VAE) is SDXL's.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import torch
from torch import Tensor

from simpletuner.models import flavours as flavour_tables
from simpletuner.models.flavours import Flavours
from simpletuner.models.base import Components, ComponentSpec
from simpletuner.models.sdxl import SDXLFamily
from simpletuner.models.t5_text import text_length

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from simpletuner.config.schema import TrainingConfig


class KolorsFamily(SDXLFamily):
    """Kolors: 1024 px, epsilon, 1100 training timesteps (the scheduler config says so), ChatGLM text."""

    name: ClassVar[str] = "kolors"
    flavours: ClassVar[Flavours] = flavour_tables.KOLORS  # model_flavour -> Hub checkpoint
    modelspec_architecture: ClassVar[str] = "kolors"
    controlnet_loader: ClassVar[str | None] = None  # diffusers has no Kolors ControlNet pipeline
    text_max_length: ClassVar[int] = 256
    text_encoder_lora_targets: ClassVar[tuple[str, ...]] = ("query_key_value", "dense")  # ChatGLM's attention
    pipeline_classes: ClassVar[tuple[str, ...]] = ("KolorsPipeline",)
    component_specs: ClassVar[tuple[ComponentSpec, ...]] = (
        ComponentSpec("unet", "diffusers:UNet2DConditionModel"),
        ComponentSpec("vae", "diffusers:AutoencoderKL"),
        ComponentSpec("text_encoder", "diffusers.pipelines.kolors:ChatGLMModel"),
        ComponentSpec("tokenizer", "diffusers.pipelines.kolors:ChatGLMTokenizer", kind="tokenizer"),
        ComponentSpec("scheduler", "diffusers:EulerDiscreteScheduler", kind="scheduler"),
    )

    def settings_from(self, cfg: TrainingConfig, index: Mapping[str, Any], modules: Mapping[str, Any]) -> dict:
        settings = super().settings_from(cfg, index, modules)
        settings.update(
            is_refiner=False,
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),  # Kolors' default
            text_max_length=text_length(cfg, self.text_max_length, modules["tokenizer"]),
        )
        return settings

    def trainable_text_encoders(self, components: Components) -> list[str]:
        return ["text_encoder"]  # ChatGLM3-6B: LoRA on its attention, or full where memory allows

    def text_outputs(self, components: Components, captions: Sequence[str]) -> dict[str, Tensor]:
        """{"prompt_embeds": [B, L, 4096], "pooled_prompt_embeds": [B, 4096]} (tiny model: 64 wide); differentiable
        (the caller chooses no_grad, or trains the text encoder)."""
        encoder = components["text_encoder"]
        tokens = components["tokenizer"](list(captions), padding="max_length", truncation=True, return_tensors="pt",
                                         max_length=components.settings["text_max_length"]).to(encoder.device)
        output = encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                         position_ids=tokens["position_ids"], output_hidden_states=True)
        return {"prompt_embeds": output.hidden_states[-2].permute(1, 0, 2).clone(),
                "pooled_prompt_embeds": output.hidden_states[-1][-1, :, :].clone()}

    def pipeline(self, components: Components) -> DiffusionPipeline:
        from diffusers import KolorsPipeline

        return KolorsPipeline(vae=components["vae"], text_encoder=components["text_encoder"],
                              tokenizer=components["tokenizer"], unet=components["unet"],
                              scheduler=self.inference_scheduler(components),
                              force_zeros_for_empty_prompt=components.settings["force_zeros_for_empty_prompt"])

    def sample_images(self, pipeline: DiffusionPipeline, cfg: TrainingConfig, prompt: str, width: int, height: int,
                      generator: torch.Generator, init_image: Any = None) -> list[Any]:
        """Samples with the trained text length."""
        length = text_length(cfg, self.text_max_length, pipeline.tokenizer)
        return super().sample_images(partial(pipeline, max_sequence_length=length), cfg, prompt, width, height,
                                     generator, init_image)
