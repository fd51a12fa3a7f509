"""SimpleTuner compatibility: its other spellings, its options we do not support, its env-file names.

Every SimpleTuner option is either in the schema, renamed here (`ALIASES`), turned
into schema options (`translate_legacy`), ignored with a warning because it cannot
change what is trained (`IGNORED`), or reported as unsupported (`UNSUPPORTED`),
never dropped in silence. An unsupported option set to its "off" value (false,
empty, SimpleTuner's default) asks for nothing we lack, so it is ignored with a
warning too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from simpletuner.errors import ConfigError

OFF_VALUES = (None, False, "", "false", "False", "FALSE", "0", 0, "no", "none", "None", "off")


@dataclass(frozen=True)
class Unsupported:
    reason: str
    harmless: tuple[Any, ...] = OFF_VALUES  # values that ask for nothing we lack

    def is_harmless(self, value: Any) -> bool:
        return any(value == h and type(value) is type(h) for h in self.harmless)


def _off_or(*values: Any) -> tuple[Any, ...]:
    return OFF_VALUES + values


def _group(reason: str, defaults: dict[str, Any]) -> dict[str, Unsupported]:
    """Options of one feature we lack; each is harmless at its "off" value or SimpleTuner's default."""
    return {name: Unsupported(reason, _off_or(*([] if default is None else [default, str(default)])))
            for name, default in defaults.items()}


# SimpleTuner's current option registry (tests/data/simpletuner_options_current.txt) beyond the seed-era names.
CURRENT_RELEASE_UNSUPPORTED: dict[str, Unsupported] = {
    **_group("group offloading is not built", {
        "enable_group_offload": None, "group_offload_type": "block_level", "group_offload_blocks_per_group": 1,
        "group_offload_use_stream": None, "group_offload_to_disk_path": None, "group_offload_text_encoder": None,
        "group_offload_vae": None}),
    **_group("RamTorch offloading is not built", {
        "ramtorch": None, "ramtorch_target_modules": None, "ramtorch_text_encoder": None, "ramtorch_vae": None,
        "ramtorch_controlnet": None, "ramtorch_transformer_percent": 100, "ramtorch_text_encoder_percent": 100,
        "ramtorch_disable_sync_hooks": None, "ramtorch_disable_extensions": None}),
    **_group("activations are recomputed by PyTorch's checkpointing", {"gradient_checkpointing_backend": "torch"}),
    **_group("video models are not supported", {
        "enable_chunked_feed_forward": None, "feed_forward_chunk_size": None, "wan_force_2_1_time_embedding": None,
        "vae_enable_patch_conv": None, "vae_enable_temporal_roll": None}),
    **_group("audio models are not supported", {
        "lyrics_embedder_train": None, "lyrics_embedder_optimizer": None, "lyrics_embedder_lr": None,
        "lyrics_embedder_lr_scheduler": None, "audio_max_duration_seconds": None, "audio_min_duration_seconds": None,
        "audio_channels": 1, "audio_duration_interval": 3.0, "audio_truncation_mode": "beginning",
        "validation_lyrics": None, "validation_audio_duration": 30.0}),
    **_group("CREPA (video representation alignment) is not supported", {
        "crepa_enabled": None, "crepa_block_index": 8, "crepa_lambda": 0.5, "crepa_adjacent_distance": 1,
        "crepa_adjacent_tau": 1.0, "crepa_encoder": "dinov2_vitg14", "crepa_encoder_image_size": 518,
        "crepa_drop_vae_encoder": None, "crepa_normalize_by_frames": True, "crepa_spatial_align": True}),
    **_group("scheduled sampling is not built", {
        "scheduled_sampling_max_step_offset": 0, "scheduled_sampling_strategy": "uniform",
        "scheduled_sampling_probability": 0.0, "scheduled_sampling_prob_start": 0.0,
        "scheduled_sampling_prob_end": 0.5, "scheduled_sampling_ramp_steps": 0, "scheduled_sampling_start_step": 0,
        "scheduled_sampling_ramp_shape": "linear", "scheduled_sampling_sampler": "unipc",
        "scheduled_sampling_order": 2, "scheduled_sampling_reflexflow": None,
        "scheduled_sampling_reflexflow_alpha": 1.0, "scheduled_sampling_reflexflow_beta1": 10.0,
        "scheduled_sampling_reflexflow_beta2": 1.0}),
    **_group("Diff2Flow is not built", {"diff2flow_enabled": None, "diff2flow_loss": None}),
    **_group("validation with extra adapters is not built", {
        "validation_adapter_path": None, "validation_adapter_name": None, "validation_adapter_strength": 1.0,
        "validation_adapter_mode": "adapter_only", "validation_adapter_config": None}),
    **_group("external validation scripts are not built", {
        "validation_method": "simpletuner-local", "validation_external_script": None,
        "validation_external_background": None}),
    **_group("live validation previews are not built", {"validation_preview": None, "validation_preview_steps": 1}),
    **_group("validation runs by steps (validation_steps)", {"validation_epoch_interval": None}),
    **_group("checkpoints are saved by steps (checkpointing_steps)", {"checkpoint_epoch_interval": None}),
    **_group("rolling checkpoints are not built", {
        "checkpointing_rolling_steps": 0, "checkpoints_rolling_total_limit": 1}),
    **_group("evaluation sets are not supported", {"eval_epoch_interval": None, "eval_loss_disable": None}),
    **_group("custom ControlNet architectures are not built: the ControlNet copies the base's denoiser or loads "
             "controlnet_model_name_or_path", {"controlnet_custom_config": None}),
    **_group("channel-wise control training is not built", {"control": None}),
    **_group("TREAD (token routing) is not built in this version yet", {"tread_config": None}),
    **_group("quantisation is not built in this version yet", {"quantization_config": None}),
    **_group("SingLoRA is not built", {"peft_lora_mode": "standard", "singlora_ramp_up_steps": 0}),
    **_group("one conditioning dataset is paired with each image dataset; combined sampling is not built",
             {"conditioning_multidataset_sampling": "random"}),
    **_group("huber_c is constant over timesteps", {"huber_schedule": "constant"}),
    **_group("set prevent_upscaling on a dataset", {"max_upscale_threshold": None}),
    **_group("set repeats on the dataset", {"allow_dataset_oversubscription": None}),
    **_group("flow-matching timesteps are sampled from the flow_* schedules", {"flow_custom_timesteps": None}),
    **_group("attention uses PyTorch SDPA", {"sla_config": None}),
    **_group("latents are always cached (vae_cache_ondemand encodes missing ones on first use)",
             {"vae_cache_disable": None}),
    **_group("Gemma text encoders (Sana, Lumina 2, LTX-2) are not supported",
             {"pretrained_gemma_model_name_or_path": None}),
    **_group("FLUX.2 is not supported", {"custom_text_encoder_intermediary_layers": None}),
    **_group("report_to is tensorboard, wandb or none", {"custom_tracker": None}),
    **_group("launcher settings: pass them to `accelerate launch` (or torchrun) yourself", {
        "accelerate_config": None, "accelerate_extra_args": None, "num_processes": 1, "num_machines": 1,
        "main_process_ip": "127.0.0.1", "main_process_port": 29500, "machine_rank": 0, "same_network": True,
        "dynamo_backend": "no", "dynamo_mode": None, "dynamo_fullgraph": None, "dynamo_dynamic": None,
        "dynamo_use_regional_compilation": None, "context_parallel_size": 1,
        "context_parallel_comm_strategy": "allgather"}),
    **_group("not built with fsdp_enable: FSDP2 here gathers as it needs, keeps weights on the accelerator and "
             "recomputes activations with gradient_checkpointing", {
        "fsdp_limit_all_gathers": True, "fsdp_cpu_offload": None, "fsdp_activation_checkpointing": None}),
}


# SimpleTuner spelling -> our field name (same meaning).
ALIASES: dict[str, str] = {
    "validation_disable": "disable_validation",
    "min_snr_gamma": "snr_gamma",
    "checkpoint_step_interval": "checkpointing_steps",  # the current release's names
    "validation_step_interval": "validation_steps",
    "use_gradient_checkpointing": "gradient_checkpointing",  # config.env's name, used in quickstart JSON too
}
DATASET_ALIASES: dict[str, str] = {
    "disable": "disabled",
    "is_regularization_data": "is_regularisation_data",
}
# (field, SimpleTuner value) -> our value.
VALUE_ALIASES: dict[tuple[str, str], str] = {
    ("caption_strategy", "instance_prompt"): "instanceprompt",
}
# Hints for values SimpleTuner accepts and we do not.
VALUE_HINTS: dict[tuple[str, str], str] = {
    ("optimizer", "prodigy"): "prodigy needs the prodigyopt package",
    ("report_to", "comet_ml"): "comet_ml is not supported: use tensorboard or wandb",
    ("report_to", "all"): "use tensorboard or wandb",
    ("model_family", "auraflow"): "AuraFlow is not supported",
    ("model_family", "smoldit"): "SmolDiT is not supported",
    ("flux_lora_target", "all+ffs+embedder+controlnet"): "adapters on the embedders are not built; with "
                                                         "controlnet=true, 'controlnet' adapts the ControlNet's "
                                                         "control layers and 'all+ffs' its blocks and those",
    ("flux_lora_target", "all+ffs+embedder"): "adapters on the embedders are not built; all+ffs is the closest",
}

# Options that cannot change what is trained: SimpleTuner's own worker pools, logging and
# debugging switches. Accepted with a warning.
IGNORED: dict[str, str] = {
    "disable_benchmark": "we run no start-up benchmark",
    "write_batch_size": "cache writers size their own batches",
    "read_batch_size": "cache readers size their own batches",
    "image_processing_batch_size": "image workers size their own batches",
    "max_workers": "worker pools size themselves",
    "aspect_bucket_worker_count": "worker pools size themselves",
    "enable_multiprocessing": "worker pools choose threads or processes themselves",
    "torch_num_threads": "set OMP_NUM_THREADS instead",
    "aws_max_pool_connections": "the S3 client sizes its own pool",
    "metadata_update_interval": "the index is saved incrementally",
    "print_filenames": "failing files are always reported by name",
    "print_sampler_statistics": "use `simpletuner scan` for dataset statistics",
    "debug_aspect_buckets": "use SIMPLETUNER_LOG_LEVEL=DEBUG",
    "debug_dataset_loader": "use SIMPLETUNER_LOG_LEVEL=DEBUG",
    "local_rank": "ranks come from the launcher (accelerate or torchrun)",
    "set_grads_to_none": "gradients are always set to None",
    "keep_vae_loaded": "the VAE is loaded only while caching",
    "ema_foreach_disable": "EMA updates always use foreach kernels",
    "preserve_data_backend_cache": "the index is incremental and always kept",
    "override_dataset_config": "caches are keyed by their settings, so changed settings never reuse stale entries",
    "skip_file_discovery": "discovery is incremental",
    "cache_clear_validation_prompts": "text-embed caches are keyed by the prompt",
    "vae_cache_scan_behaviour": "latent caches are keyed by crop and size; mismatches are misses",
    "disable_bucket_pruning": "small buckets follow the dataset's small_bucket_policy",
    "allow_tf32": "TF32 matmuls are enabled on CUDA",
    "pure_bf16": "the dtype follows mixed_precision and base_model_precision",
    "accelerator_cache_clear_interval": "device memory is managed by PyTorch",
    "seed_for_each_device": "every process derives its own seed from seed",
    "non_ema_revision": "revision is used",
    "validation_disable_unconditional": "validation never renders the unconditional (empty prompt) image",
    "offload_during_save": "moving weights to the CPU while saving changes memory use only, never the result",
    "delete_model_after_load": "the Hub download cache is left as it is (deleting it changes disk use only)",
    "checkpointing_use_tempdir": "checkpoints are always written under a temporary name, then renamed",
    "validation_multigpu": "validation images are rendered on the main process",
    "validation_stitch_input_location": "validation images are saved alone, never stitched beside their input",
}
DATASET_IGNORED: dict[str, str] = {
    "preserve_data_backend_cache": "the index is incremental and always kept",
    "write_batch_size": "cache writers size their own batches",
    "read_batch_size": "cache readers size their own batches",
    "text_encoder_batch_size": "text encoding sizes its own batches",
    "hash_filenames": "cache entries are always named by a hash of their settings",
    "scan_for_errors": "unreadable images are always reported and skipped",
    "metadata_backend": "sizes come from the index or the parquet options",
}

UNSUPPORTED: dict[str, Unsupported] = {
    "hidream_use_load_balancing_loss": Unsupported("HiDream is not supported"),
    "hidream_load_balancing_loss_weight": Unsupported("HiDream is not supported"),
    "ltx_train_mode": Unsupported("video models are not supported", _off_or("i2v")),
    "ltx_i2v_prob": Unsupported("video models are not supported", _off_or(0.1, "0.1")),
    "ltx_protect_first_frame": Unsupported("video models are not supported"),
    "ltx_partial_noise_fraction": Unsupported("video models are not supported", _off_or(0.05, "0.05")),
    "framerate": Unsupported("video models are not supported"),
    "validation_num_video_frames": Unsupported("video models are not supported"),
    "sana_complex_human_instruction": Unsupported("Sana is not supported"),
    "use_soft_min_snr": Unsupported("use snr_gamma (min-SNR weighting)"),
    "soft_min_snr_sigma_data": Unsupported("use snr_gamma (min-SNR weighting)"),
    "snr_weight": Unsupported("prediction_type=sample loss mixing is not supported", _off_or(1, 1.0, "1", "1.0")),
    "disable_segmented_timestep_sampling": Unsupported("timesteps are sampled independently per sample"),
    "compress_disk_cache": Unsupported("the cache store chooses its own encoding", _off_or(True, "true", "True")),
    "aspect_bucket_disable_rebuild": Unsupported("buckets are rebuilt only when their inputs change"),
    "ignore_missing_files": Unsupported("missing files are always reported"),
    "delete_unwanted_images": Unsupported("source data is never deleted; small images are skipped and reported"),
    "delete_problematic_images": Unsupported("source data is never deleted; broken images are skipped and reported"),
    "cache_dir_text": Unsupported("set cache_dir (the cache root) or a text_embeds dataset's cache_dir",
                                  _off_or("cache")),
    "cache_dir_vae": Unsupported("set cache_dir (the cache root) or a dataset's cache_dir_vae"),
    "caption_strategy": Unsupported("set caption_strategy on each dataset entry", _off_or("filename")),
    "instance_prompt": Unsupported("set instance_prompt on each dataset entry"),
    "prepend_instance_prompt": Unsupported("set prepend_instance_prompt on each dataset entry"),
    "only_instance_prompt": Unsupported("set only_instance_prompt on each dataset entry"),
    "parquet_caption_column": Unsupported("set parquet.caption_column on each dataset entry"),
    "parquet_filename_column": Unsupported("set parquet.filename_column on each dataset entry"),
    "ignore_final_epochs": Unsupported("set max_train_steps alone to train by steps"),
    "distillation_method": Unsupported("distillation is not supported"),
    "distillation_config": Unsupported("distillation is not supported"),
    "offload_during_startup": Unsupported("components are loaded when needed"),
    "offload_param_path": Unsupported("DeepSpeed NVMe offload is configured in the DeepSpeed config"),
    "optimizer_config": Unsupported("use the optimiser options (adam_beta1, adam_weight_decay, ...)"),
    "optimizer_cpu_offload_method": Unsupported("optimiser CPU offload is not supported", _off_or("none", "offload")),
    "optimizer_offload_gradients": Unsupported("optimiser CPU offload is not supported"),
    "fuse_optimizer": Unsupported("it fuses a CPU-offloaded optimiser, and optimiser CPU offload is "
                                   "not built; PyTorch's fused AdamW step is on by default (adamw_fused)"),
    "optimizer_beta1": Unsupported("use adam_beta1"),
    "optimizer_beta2": Unsupported("use adam_beta2"),
    "optimizer_release_gradients": Unsupported("not supported"),
    "prodigy_steps": Unsupported("not supported"),
    "gradient_precision": Unsupported("gradients follow the trained weights' dtype", _off_or("unmodified")),
    "quantize_activations": Unsupported("activation quantisation is not supported"),
    "attention_mechanism": Unsupported("attention uses PyTorch SDPA", _off_or("diffusers")),
    "sageattention_usage": Unsupported("attention uses PyTorch SDPA", _off_or("inference")),
    "enable_xformers_memory_efficient_attention": Unsupported("attention uses PyTorch SDPA"),
    "unet_attention_slice": Unsupported("attention uses PyTorch SDPA"),
    "evaluation_type": Unsupported("CLIP evaluation is not supported", _off_or("none")),
    "eval_dataset_pooling": Unsupported("evaluation sets are not supported"),
    "pretrained_evaluation_model_name_or_path": Unsupported("CLIP evaluation is not supported",
                                                           _off_or("openai/clip-vit-large-patch14-336")),
    "eval_steps_interval": Unsupported("evaluation sets are not supported"),
    "eval_timesteps": Unsupported("evaluation sets are not supported", _off_or(28, "28")),
    "eval_dataset_id": Unsupported("evaluation sets are not supported"),
    "validation_seed_source": Unsupported("validation seeds use a CPU generator", _off_or("cpu")),
    "validation_torch_compile_mode": Unsupported("validation_torch_compile uses the default mode",
                                                 _off_or("default", "max-autotune")),
    "validation_using_datasets": Unsupported("img2img validation from datasets is not supported"),
    "validation_prompt_library": Unsupported("SimpleTuner's built-in prompt library is not included; "
                                             "use user_prompt_library"),
    "tracker_image_layout": Unsupported("validation images are logged one by one", _off_or("gallery")),
    "enable_watermark": Unsupported("validation images are never watermarked"),
    "disable_tf32": Unsupported("TF32 is always enabled on CUDA"),
    "fully_unload_text_encoder": Unsupported("text encoders are unloaded after caching"),
    "save_text_encoder": Unsupported("trained text encoders are always saved"),
    "text_encoder_limit": Unsupported("text-encoder training runs for the whole run", _off_or(25, "25", 100, "100")),
    "sdxl_refiner_uses_full_range": Unsupported("leave refiner_training off to train the whole schedule"),
    "i_know_what_i_am_doing": Unsupported("safety checks cannot be turned off"),
    "smoldit": Unsupported("SmolDiT is not supported"),
    "aura_flow": Unsupported("AuraFlow is not supported"),
    "use_8bit_adam": Unsupported("use optimizer=adamw8bit"),
    "use_adafactor_optimizer": Unsupported("use optimizer=adafactor"),
    "use_prodigy_optimizer": Unsupported("use optimizer=prodigy"),
    "use_dadapt_optimizer": Unsupported("D-Adaptation is not supported"),
    "adam_bfloat16": Unsupported("use optimizer=adamw_bf16"),
    "disable_compel": Unsupported("prompt weighting (compel) is not supported", (None, True, "true", "True")),
    **CURRENT_RELEASE_UNSUPPORTED,
}
DATASET_UNSUPPORTED: dict[str, Unsupported] = {
    "image_embeds": Unsupported("latents go to the dataset's cache_dir_vae"),
    "conditioning_image_embeds": Unsupported("conditioning image embeddings are not supported"),
    "cache_dir_conditioning_image_embeds": Unsupported("conditioning image embeddings are not supported"),
    "source_dataset_id": Unsupported("link conditioning data with conditioning_data on the image dataset"),
    "ignore_epochs": Unsupported("every dataset counts towards epochs"),
    "minimum_aspect_ratio": Unsupported("aspect-ratio filters are not supported"),
    "maximum_aspect_ratio": Unsupported("aspect-ratio filters are not supported"),
    "max_num_samples": Unsupported("sample limits are not supported"),
    "text_cache_ondemand": Unsupported("text embeddings are always cached before training"),
    "text_cache_disable": Unsupported("text embeddings are always cached"),
    "config": Unsupported("a dataset entry's own `config` block is not supported"),
    "audio": Unsupported("audio datasets are not supported"),
    "video": Unsupported("video datasets are not supported"),
    "cache_file_suffix": Unsupported("cache entries are named by a hash of their settings"),
    "conditioning_image_embed_batch_size": Unsupported("conditioning image embeddings are not supported"),
}

# config.env variable -> option, as SimpleTuner's env-file loader maps them.
ENV_NAMES: dict[str, str] = {
    "RESUME_CHECKPOINT": "resume_from_checkpoint", "DATALOADER_CONFIG": "data_backend_config",
    "ASPECT_BUCKET_ROUNDING": "aspect_bucket_rounding", "TRAINING_SEED": "seed", "USE_EMA": "use_ema",
    "EMA_DECAY": "ema_decay", "USE_XFORMERS": "enable_xformers_memory_efficient_attention",
    "MINIMUM_RESOLUTION": "minimum_image_size", "OUTPUT_DIR": "output_dir", "USE_DORA": "use_dora",
    "LORA_TYPE": "lora_type", "LORA_RANK": "lora_rank", "LORA_ALPHA": "lora_alpha",
    "LYCORIS_CONFIG": "lycoris_config", "PUSH_TO_HUB": "push_to_hub",
    "PUSH_CHECKPOINTS": "push_checkpoints_to_hub", "MAX_NUM_STEPS": "max_train_steps",
    "NUM_EPOCHS": "num_train_epochs", "CHECKPOINTING_STEPS": "checkpointing_steps",
    "CHECKPOINTING_LIMIT": "checkpoints_total_limit", "HUB_MODEL_NAME": "hub_model_id",
    "MODEL_CARD_SAFE_FOR_WORK": "model_card_safe_for_work", "TRACKER_PROJECT_NAME": "tracker_project_name",
    "TRACKER_RUN_NAME": "tracker_run_name", "MODEL_TYPE": "model_type",
    "MODEL_NAME": "pretrained_model_name_or_path", "MODEL_FAMILY": "model_family",
    "TRAIN_BATCH_SIZE": "train_batch_size", "USE_GRADIENT_CHECKPOINTING": "gradient_checkpointing",
    "CAPTION_DROPOUT_PROBABILITY": "caption_dropout_probability", "RESOLUTION_TYPE": "resolution_type",
    "RESOLUTION": "resolution", "VALIDATION_SEED": "validation_seed", "VALIDATION_STEPS": "validation_steps",
    "VALIDATION_RESOLUTION": "validation_resolution", "VALIDATION_GUIDANCE": "validation_guidance",
    "VALIDATION_GUIDANCE_RESCALE": "validation_guidance_rescale",
    "VALIDATION_NUM_INFERENCE_STEPS": "validation_num_inference_steps", "VALIDATION_PROMPT": "validation_prompt",
    "ALLOW_TF32": "allow_tf32", "MIXED_PRECISION": "mixed_precision", "OPTIMIZER": "optimizer",
    "LEARNING_RATE": "learning_rate", "LR_SCHEDULE": "lr_scheduler", "LR_WARMUP_STEPS": "lr_warmup_steps",
    "BASE_MODEL_PRECISION": "base_model_precision", "VALIDATION_TORCH_COMPILE": "validation_torch_compile",
    "VALIDATION_GUIDANCE_REAL": "validation_guidance_real",
    "VALIDATION_NO_CFG_UNTIL_TIMESTEP": "validation_no_cfg_until_timestep",
    "TRAINING_SCHEDULER_TIMESTEP_SPACING": "training_scheduler_timestep_spacing",
    "INFERENCE_SCHEDULER_TIMESTEP_SPACING": "inference_scheduler_timestep_spacing",
    "GRADIENT_ACCUMULATION_STEPS": "gradient_accumulation_steps", "LR_END": "lr_end",
    "FLUX_GUIDANCE_VALUE": "flux_guidance_value", "FLUX_LORA_TARGET": "flux_lora_target",
    "VALIDATION_NEGATIVE_PROMPT": "validation_negative_prompt",
    "METADATA_UPDATE_INTERVAL": "metadata_update_interval", "READ_BATCH_SIZE": "read_batch_size",
    "WRITE_BATCH_SIZE": "write_batch_size", "AWS_MAX_POOL_CONNECTIONS": "aws_max_pool_connections",
    "TORCH_NUM_THREADS": "torch_num_threads", "IMAGE_PROCESSING_BATCH_SIZE": "image_processing_batch_size",
    "MAX_WORKERS": "max_workers", "VAE_BATCH_SIZE": "vae_batch_size", "MIN_SNR_GAMMA": "snr_gamma",
    "DELETE_ERRORED_IMAGES": "delete_problematic_images", "DELETE_SMALL_IMAGES": "delete_unwanted_images",
    "INSTANCE_PROMPT": "instance_prompt", "PURE_BF16": "pure_bf16", "CONTROLNET": "controlnet",
    "USE_BITFIT": "use_bitfit",
    "STABLE_DIFFUSION_3": "sd3", "STABLE_DIFFUSION_LEGACY": "legacy", "PIXART_SIGMA": "pixart_sigma",
    "KOLORS": "kolors", "FLUX": "flux", "HUNYUAN_DIT": "hunyuan_dit",
}
# Variables holding more `--key=value` arguments.
ENV_ARGUMENT_LISTS = ("TRAINER_EXTRA_ARGS", "DEBUG_EXTRA_ARGS")
# Variables for the launcher or the process environment, not for training. SimpleTuner's
# loader skips them too; we say so.
ENV_LAUNCHER: dict[str, str] = {
    "TRAINING_NUM_PROCESSES": "start several processes with `accelerate launch --num_processes N` or torchrun",
    "TRAINING_NUM_MACHINES": "set machines with `accelerate launch --num_machines N`",
    "TRAINING_DYNAMO_BACKEND": "set with `accelerate launch --dynamo_backend`",
    "TRAINER_DYNAMO_BACKEND": "set with `accelerate launch --dynamo_backend`",
    "ACCELERATE_EXTRA_ARGS": "pass these to `accelerate launch` yourself",
    "TOKENIZERS_PARALLELISM": "set it in the environment",
    "MIXED_PRECISION_ACCELERATE": "set with `accelerate launch --mixed_precision`",
    "SIMPLETUNER_LOG_LEVEL": "set it in the environment",
    "SIMPLETUNER_TRAINING_LOOP_LOG_LEVEL": "set it in the environment",
    "CUDA_VISIBLE_DEVICES": "set it in the environment",
    "PYTORCH_CUDA_ALLOC_CONF": "set it in the environment",
    "HF_HOME": "set it in the environment",
    "HF_HUB_ENABLE_HF_TRANSFER": "set it in the environment",
    "DISABLE_UPDATES": "SimpleTuner's train.sh setting; there is nothing to update",
    "TRAINING_NUM_WORKERS_DATALOADER": "data loader workers size themselves",
}

# Old SimpleTuner switches that named the model family.
FAMILY_SWITCHES: dict[str, str] = {
    "sd3": "sd3", "flux": "flux", "pixart_sigma": "pixart_sigma", "kolors": "kolors", "legacy": "legacy",
    "sdxl": "sdxl", "hunyuan_dit": "hunyuan_dit",
}


def _is_on(value: Any) -> bool:
    return not any(value == off and type(value) is type(off) for off in OFF_VALUES)


LEGACY_SWITCHES = frozenset(FAMILY_SWITCHES) | {"offset_noise", "ema_cpu_only", "use_bitfit"}  # translate_legacy's


def translate_legacy(values: dict[str, Any], sources: dict[str, str]) -> list[str]:
    """Rewrite old SimpleTuner switches in place into schema options; returns warnings."""
    warnings: list[str] = []
    for switch, family in FAMILY_SWITCHES.items():
        if switch not in values:
            continue
        where = sources.pop(switch, "")
        if _is_on(values.pop(switch)):
            given = values.get("model_family")
            if given not in (None, family):
                raise ConfigError(f"{where}: {switch}=true asks for model_family {family!r}, but model_family is "
                                  f"{given!r}: keep only model_family")
            values["model_family"] = family
            sources.setdefault("model_family", where)
    if "offset_noise" in values:
        # SimpleTuner applies noise_offset (default 0.1) only under --offset_noise.
        where = sources.pop("offset_noise", "")
        if _is_on(values.pop("offset_noise")):
            values.setdefault("noise_offset", 0.1)
            sources.setdefault("noise_offset", where)
        elif values.get("noise_offset") not in (None, 0, "0", 0.0):
            warnings.append(f"{where}: offset_noise is off, so noise_offset={values['noise_offset']} is not used "
                            "(as in SimpleTuner); set noise_offset alone to use it")
            values["noise_offset"] = 0.0
    if "ema_cpu_only" in values:  # SimpleTuner's older switch for ema_device=cpu
        where = sources.pop("ema_cpu_only", "")
        if _is_on(values.pop("ema_cpu_only")):
            if values.get("ema_device") not in (None, "cpu"):
                raise ConfigError(f"{where}: ema_cpu_only=true keeps the EMA on the CPU, but ema_device is "
                                  f"{values['ema_device']!r}: keep only ema_device")
            values["ema_device"] = "cpu"
            sources.setdefault("ema_device", where)
    if "use_bitfit" in values:
        where = sources.pop("use_bitfit", "")
        if _is_on(values.pop("use_bitfit")):
            values["layer_freeze_strategy"] = "bitfit"
            sources.setdefault("layer_freeze_strategy", where)
    return warnings
