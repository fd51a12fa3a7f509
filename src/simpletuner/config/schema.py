"""The schema: the single source of truth for every option.

Names follow SimpleTuner's, so existing `config.json` and `multidatabackend.json`
files work. Where SimpleTuner's default is poor we pick a better one and the
option's help says so. Every field carries a description: `simpletuner options`
and docs/OPTIONS.md are generated from these classes.

Adding an option: add one field here, with a description, then run
`python -m simpletuner.commands.options --write-docs` to refresh docs/OPTIONS.md.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ModelFamily = Literal["legacy", "sd1x", "sd2x", "sdxl", "sd3", "flux", "pixart_sigma", "kolors", "deepfloyd",
                      "hunyuan_dit"]
ModelType = Literal["full", "lora", "deepfloyd-full", "deepfloyd-lora", "deepfloyd-stage2", "deepfloyd-stage2-lora"]
ResolutionType = Literal["pixel", "area", "pixel_area"]
CropStyle = Literal["center", "centre", "random", "corner"]
CropAspect = Literal["square", "preserve", "closest", "random"]
CaptionStrategy = Literal["filename", "textfile", "instanceprompt", "parquet", "jsonl", "csv", "huggingface"]
MixedPrecision = Literal["bf16", "fp16", "no"]
Precision = Literal["no_change", "int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto", "fp8uz-quanto",
                    "int8-torchao", "fp8-torchao", "nf4-bnb"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]
ADAPTER_MODEL_TYPES = ("lora", "deepfloyd-lora", "deepfloyd-stage2-lora")


# the families whose model has a ControlNet (models.*: controlnet_loader); config check refuses the others
CONTROLNET_FAMILIES = ("flux", "hunyuan_dit", "legacy", "sd1x", "sd2x", "sd3", "sdxl")
# the families whose denoiser names its repeated blocks (models.*: block_lists); block swap takes only these
BLOCK_SWAP_FAMILIES = ("flux", "hunyuan_dit", "pixart_sigma", "sd3")


def trains_adapter(cfg: "TrainingConfig") -> bool:
    """True when model_type trains an adapter (LoRA / LyCORIS) over a frozen base; False for the full model."""
    return cfg.model_type in ADAPTER_MODEL_TYPES


class StrictModel(BaseModel):
    """Base for every configuration model: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True,
                              allow_inf_nan=False)  # inf and nan are never a setting: every float is finite


class ParquetOptions(StrictModel):
    """Where captions and sizes live in a parquet / jsonl / csv metadata file."""

    path: str = Field(description="Metadata file (parquet, jsonl or csv), local or s3://.")
    filename_column: str = Field("id", description="Column holding the image's file name or relative path.")
    caption_column: str = Field("caption", description="Column holding the caption.")
    fallback_caption_column: str | None = Field(None, description="Column used where the caption column is empty.")
    identifier_includes_extension: bool = Field(
        False, description="The filename column includes the file extension."
    )
    width_column: str | None = Field(None, description="Column with the image width, if known.")
    height_column: str | None = Field(None, description="Column with the image height, if known.")


class HuggingFaceOptions(StrictModel):
    """SimpleTuner's `huggingface` block of a type=huggingface entry; the same keys at the entry's top level win."""

    dataset_name: str | None = Field(None, description="As the entry's dataset_name.")
    dataset_config: str | None = Field(None, description="As the entry's dataset_config.")
    split: str | None = Field(None, description="As the entry's split.")
    revision: str | None = Field(None, description="As the entry's revision.")
    image_column: str | None = Field(None, description="As the entry's image_column.")
    caption_column: str | list[str] | None = Field(None, description="As the entry's caption_column.")
    fallback_caption_column: str | None = Field(None, description="As the entry's fallback_caption_column.")
    streaming: bool | None = Field(None, description="As the entry's streaming.")
    cache_dir: str | None = Field(None, description="Where the datasets library keeps downloads and Arrow files "
                                  "(default: the entry's cache_dir when it is a local folder, as in SimpleTuner; "
                                  "else the library's own, HF_DATASETS_CACHE).")
    filter_func: dict | None = Field(None, description="Not built: refused (filter the rows beforehand, e.g. "
                                     "Dataset.filter then save_to_disk).")
    composite_image_config: dict | None = Field(None, description="Not built: refused (grid images are not split).")


class ConditioningGenerator(StrictModel):
    """One entry of a dataset's `conditioning`: control images made from its images (data.generators)."""

    type: Literal["canny"] = Field(description="canny: OpenCV's Canny edge map of each image.")
    conditioning_type: Literal["controlnet"] = Field("controlnet", description="What the images feed: a ControlNet.")
    captions: str | list[str] | None = Field(None, description="Accepted for compatibility; a control image trains "
                                             "with its image's caption.")
    low_threshold: int = Field(100, ge=0, le=255, description="canny: the lower hysteresis threshold.")
    high_threshold: int = Field(200, ge=0, le=255, description="canny: the upper hysteresis threshold.")


class DatasetConfig(StrictModel):
    """One entry of `multidatabackend.json` (or one `[[datasets]]` table in TOML)."""

    id: str = Field(description="Unique name of the dataset; also names its caches.")
    type: Literal["local", "aws", "huggingface"] = Field("local", description="Where the files live: a local "
                                                         "folder, S3, or a Hugging Face dataset (dataset_name).")
    dataset_type: Literal["image", "text_embeds", "conditioning"] = Field(
        "image", description="image: training images; text_embeds: where text embeddings are cached; "
        "conditioning: masks or ControlNet inputs paired with an image dataset."
    )
    default: bool = Field(False, description="The text_embeds dataset used by image datasets that name none.")
    disabled: bool = Field(False, description="Skip this entry entirely.")
    instance_data_dir: str | None = Field(None, description="Local folder of images (type=local).")
    aws_bucket_name: str | None = Field(None, description="S3 bucket (type=aws).")
    aws_region_name: str | None = Field(None, description="S3 region; falls back to AWS_REGION / AWS_DEFAULT_REGION.")
    aws_endpoint_url: str | None = Field(None, description="S3-compatible endpoint URL; falls back to AWS_ENDPOINT_URL.")
    aws_access_key_id: str | None = Field(None, description="S3 access key; falls back to AWS_ACCESS_KEY_ID.")
    aws_secret_access_key: str | None = Field(
        None, description="S3 secret key; falls back to AWS_SECRET_ACCESS_KEY."
    )
    aws_data_prefix: str = Field("", description="Key prefix of the images inside the bucket.")
    dataset_name: str | None = Field(None, description="type=huggingface: a Hub dataset id, or a local folder "
                                     "(written by save_to_disk, or of parquet files or images that load_dataset "
                                     "reads). Every row is one image, named row-000000, row-000001, ...")
    dataset_config: str | None = Field(None, description="type=huggingface: the dataset's configuration (subset) "
                                       "name.")
    split: str | None = Field(None, description="type=huggingface: the split to train on (default train).")
    revision: str | None = Field(None, description="type=huggingface: Hub revision (branch, tag or commit).")
    image_column: str | None = Field(None, description="type=huggingface: the column holding the images (default "
                                     "image): an Image feature or raw bytes.")
    caption_column: str | list[str] | None = Field(None, description="type=huggingface, caption_strategy="
                                                   "huggingface: the caption column (default caption), or several "
                                                   "whose non-empty values are all candidate captions.")
    fallback_caption_column: str | None = Field(None, description="type=huggingface: column used where the caption "
                                                "columns are empty.")
    streaming: bool | None = Field(None, description="type=huggingface: read the rows as a stream (load_dataset's "
                                   "streaming=True) instead of from Arrow files; each pass reads from the start.")
    huggingface: HuggingFaceOptions | None = Field(None, description="SimpleTuner's block of Hugging Face options "
                                                   "(the same names at the entry's top level win).")
    caption_strategy: CaptionStrategy = Field(
        "filename", description="Where captions come from: the file name, a .txt beside each image, "
        "the instance_prompt, a parquet/jsonl/csv metadata file (parquet options), or a Hugging Face dataset's "
        "caption_column (huggingface, the default of type=huggingface)."
    )
    instance_prompt: str | None = Field(None, description="Caption for caption_strategy=instanceprompt, or a prefix.")
    prepend_instance_prompt: bool = Field(False, description="Put instance_prompt before every caption.")
    only_instance_prompt: bool = Field(False, description="Use instance_prompt as every caption.")
    caption_filter_list: str | list[str] | None = Field(
        None, description="Strings, regular expressions or s/x/y/ substitutions removed from captions: "
        "a list, or a path to a text file with one per line."
    )
    missing_caption: Literal["error", "filename"] = Field(
        "error", description="A missing caption (empty .txt, no metadata row) is an error, or falls back "
        "to the file name. SimpleTuner silently trains on an empty caption; we never do."
    )
    parquet: ParquetOptions | None = Field(None, description="Metadata file options for parquet/jsonl/csv captions.")
    resolution: float | None = Field(None, gt=0, description="Target resolution; defaults to the training resolution. "
                                     "Pixels of the shorter side (pixel), megapixels (area), or pixels whose "
                                     "square gives the area (pixel_area).")
    resolution_type: ResolutionType | None = Field(None, description="How resolution is read; defaults to the "
                                                    "training resolution_type.")
    minimum_image_size: float | None = Field(None, description="Skip images smaller than this (same unit as resolution).")
    maximum_image_size: float | None = Field(None, description="Images larger than this are first downsampled "
                                             "to target_downsample_size.")
    target_downsample_size: float | None = Field(None, description="Size that images above maximum_image_size "
                                                 "are downsampled to before cropping.")
    prevent_upscaling: bool = Field(False, description="Never upscale: images smaller than the target are skipped "
                                    "(reported) instead of enlarged.")
    crop: bool = Field(False, description="Crop to the bucket's aspect instead of resizing to it.")
    crop_style: CropStyle = Field("random", description="Where crops are taken.")
    crop_aspect: CropAspect = Field("square", description="Aspect of crops: square, the image's own (preserve), "
                                    "the closest of crop_aspect_buckets, or a random one of them.")
    crop_aspect_buckets: list[float] | None = Field(None, description="Aspect ratios (width/height) for "
                                                    "crop_aspect closest or random.")
    small_bucket_policy: Literal["merge", "drop"] = Field(
        "merge", description="A bucket with fewer images than a batch: merge into the nearest bucket that can "
        "take it, or drop it (reported)."
    )
    cache_dir_vae: str | None = Field(None, description="Where this dataset's latents are cached (local or s3://). "
                                      "Defaults to <cache_dir>/vae/<id>.")
    cache_dir: str | None = Field(None, description="Cache directory of this dataset (text_embeds datasets: the "
                                  "text embedding cache; image datasets: the index).")
    text_embeds: str | None = Field(None, description="id of the text_embeds dataset this image dataset uses.")
    repeats: int = Field(0, ge=0, description="Extra passes over this dataset per epoch (0 = seen once).")
    probability: float = Field(1.0, ge=0, description="Relative weight when sampling among datasets.")
    disable_after_epoch_step: int | None = Field(None, ge=0, description="Stop sampling this dataset after this "
                                                 "many steps.")
    is_regularisation_data: bool = Field(False, description="Prior-preservation images: their target is the base "
                                         "model's own prediction, the adapter switched off (model_type lora).")
    is_class_data: bool = Field(False, description="Class images of classic DreamBooth prior preservation: their "
                                "loss is weighted by prior_loss_weight (diffusers' train_dreambooth class images).")
    conditioning_data: str | None = Field(None, description="id of the conditioning dataset paired with this one.")
    conditioning: list[ConditioningGenerator] | None = Field(None, description="Make this image dataset's control "
                                                             "images (controlnet=true; a local, S3 or Hugging Face "
                                                             "dataset): e.g. "
                                                             "[{type: canny}], written under <cache_dir>/conditioning.")
    conditioning_type: Literal["mask", "controlnet"] | None = Field(None, description="What a conditioning "
                                                                    "dataset holds.")
    vae_cache_clear_each_epoch: bool = Field(False, description="With random crops (crop, crop_style random): draw "
                                             "each image's crop position again every epoch after the first and "
                                             "encode those latents when their batch needs them (not stored; epoch "
                                             "0 uses the cache). The bucket stays. Without random crops every "
                                             "epoch's latents equal the cached ones, so the cache is used.")
    skip_file_discovery: str = Field("", description="Accepted for compatibility; discovery is incremental here.")

    @model_validator(mode="before")
    @classmethod
    def _huggingface_captions(cls, data: object) -> object:
        # as in SimpleTuner, a Hugging Face dataset's captions come from its caption column unless told otherwise
        if isinstance(data, dict) and data.get("type") == "huggingface" and "caption_strategy" not in data:
            return {**data, "caption_strategy": "huggingface"}
        return data

    @field_validator("conditioning", mode="before")
    @classmethod
    def _one_generator(cls, value: object) -> object:
        return [value] if isinstance(value, dict) else value  # SimpleTuner also writes one as a plain object

    @model_validator(mode="after")
    def _check_location(self) -> "DatasetConfig":
        if self.disabled or self.dataset_type == "text_embeds":
            return self
        if self.is_class_data and self.is_regularisation_data:
            raise ValueError(f"dataset {self.id!r}: is_class_data (class images, their loss weighted by "
                             "prior_loss_weight) cannot be combined with is_regularisation_data (the base model's "
                             "prediction as the target); set one of the two")
        if self.type == "local" and not self.instance_data_dir:
            raise ValueError(f"dataset {self.id!r}: type 'local' needs instance_data_dir")
        if self.type == "aws" and not self.aws_bucket_name:
            raise ValueError(f"dataset {self.id!r}: type 'aws' needs aws_bucket_name")
        if self.type == "huggingface":
            if not (self.dataset_name or (self.huggingface and self.huggingface.dataset_name)):
                raise ValueError(f"dataset {self.id!r}: type 'huggingface' needs dataset_name")
            block = self.huggingface or HuggingFaceOptions()
            for name, feature in (("filter_func", "filtering rows (filter them beforehand, e.g. Dataset.filter "
                                   "then save_to_disk)"), ("composite_image_config", "splitting grid images")):
                if getattr(block, name):
                    raise ValueError(f"dataset {self.id!r}: huggingface.{name}: {feature} is not implemented in "
                                     "this version yet; remove the option")
            if self.caption_strategy not in ("huggingface", "instanceprompt"):
                raise ValueError(f"dataset {self.id!r}: type 'huggingface' takes caption_strategy 'huggingface' or "
                                 f"'instanceprompt', not {self.caption_strategy!r}")
        elif self.caption_strategy == "huggingface":
            raise ValueError(f"dataset {self.id!r}: caption_strategy 'huggingface' needs type 'huggingface'")
        else:
            stray = [name for name in HuggingFaceOptions.model_fields if name != "cache_dir"
                     and name in type(self).model_fields and getattr(self, name) is not None]
            stray += ["huggingface"] if self.huggingface is not None else []
            if stray:
                raise ValueError(f"dataset {self.id!r}: {', '.join(stray)} apply to type 'huggingface' only, and "
                                 f"this entry has type {self.type!r}")
        if self.caption_strategy in ("parquet", "jsonl", "csv") and self.parquet is None:
            raise ValueError(f"dataset {self.id!r}: caption_strategy {self.caption_strategy!r} needs parquet options")
        if self.caption_strategy == "instanceprompt" and not self.instance_prompt:
            raise ValueError(f"dataset {self.id!r}: caption_strategy 'instanceprompt' needs instance_prompt")
        return self

    def location(self) -> str:
        """The dataset's root as a URL-like string: a folder or s3://bucket/prefix (huggingface: dataset_name)."""
        if self.type == "aws":
            prefix = self.aws_data_prefix.strip("/")
            return f"s3://{self.aws_bucket_name}/{prefix}" if prefix else f"s3://{self.aws_bucket_name}"
        if self.type == "huggingface":
            return str(self.dataset_name or (self.huggingface and self.huggingface.dataset_name))
        return str(self.instance_data_dir)


class TrainingConfig(StrictModel):
    """Training options (SimpleTuner's config.json keys, without the leading `--`)."""

    # model
    model_family: ModelFamily = Field(description="Architecture: legacy (= SD 1.x/2.x), sd1x, sd2x, sdxl, sd3, "
                                      "flux, pixart_sigma, kolors, deepfloyd, hunyuan_dit.")
    model_type: ModelType = Field("lora", description="What trains: LoRA/LyCORIS adapter or the full model. "
                                  "SimpleTuner defaults to full; an adapter is the safer start.")
    model_flavour: str | None = Field(None, description="SimpleTuner's name for a base checkpoint of the family "
                                      "(sdxl: base-1.0, flux: dev or schnell, sd3: medium or large, ...); used "
                                      "when pretrained_model_name_or_path is not set. Unset: the family's default "
                                      "flavour (DeepFloyd has none). docs/COMPATIBILITY.md lists them.")
    pretrained_model_name_or_path: str | None = Field(None, description="Hub id or local diffusers folder of the "
                                                      "base model; unset: the checkpoint of model_flavour.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    variant: str | None = Field(None, description="Weight variant to load, e.g. fp16.")
    pretrained_vae_model_name_or_path: str | None = Field(None, description="A separate VAE (e.g. an fp16-fix VAE).")
    pretrained_unet_model_name_or_path: str | None = Field(None, description="A separate UNet (Hub id or folder) "
                                                           "replacing the base model's.")
    pretrained_unet_subfolder: str = Field("unet", description="Subfolder of the separate UNet ('none' for a flat folder).")
    pretrained_transformer_model_name_or_path: str | None = Field(None, description="A separate transformer (Hub id "
                                                                  "or folder) replacing the base model's.")
    pretrained_transformer_subfolder: str = Field("transformer", description="Subfolder of the separate transformer "
                                                  "('none' for a flat folder).")
    pretrained_t5_model_name_or_path: str | None = Field(None, description="Where to load the T5 text encoder from "
                                                         "(shared between Flux/SD3/PixArt checkpoints).")
    base_model_precision: Precision = Field("no_change", description="Quantise the frozen base model (LoRA/LyCORIS "
                                            "training) after loading, before the adapter is added: optimum-quanto "
                                            "int8/int4/int2/fp8, torchao int8 (weight-only) or fp8 (CUDA only), "
                                            "bitsandbytes nf4. Needs the `quant` extra.")
    base_model_default_dtype: Literal["bf16", "fp32"] = Field("bf16", description="dtype of the base model's weights "
                                                              "that are not quantised.")
    text_encoder_1_precision: Precision = Field("no_change", description="Quantise text encoder 1.")
    text_encoder_2_precision: Precision = Field("no_change", description="Quantise text encoder 2.")
    text_encoder_3_precision: Precision = Field("no_change", description="Quantise text encoder 3.")
    text_encoder_4_precision: Precision = Field("no_change", description="Quantise text encoder 4.")
    quantize_via: Literal["cpu", "accelerator", "pipeline"] = Field(
        "accelerator", description="Where quantisation runs: the accelerator is fast, the CPU (or 'pipeline', which "
        "quantises right after loading, as 'cpu' does) needs less device memory. Read only when a *_precision "
        "option quantises; alone it changes nothing.")
    vae_dtype: Literal["default", "fp16", "fp32", "bf16"] = Field("bf16", description="dtype of the VAE while "
                                                                  "encoding latents (default: the model's).")
    vae_batch_size: int = Field(4, ge=1, description="Images per VAE batch when caching latents.")
    dataloader_prefetch: bool = Field(True, description="Build batches (cache reads, stacking) in a background "
                                      "thread ahead of the step that trains on them, into pinned memory on CUDA, "
                                      "where the next one is copied to the device on a side stream while the step "
                                      "runs.")
    dataloader_prefetch_qlen: int = Field(10, ge=1, description="Micro-batches dataloader_prefetch keeps ready "
                                          "ahead of the step.")
    vae_cache_ondemand: bool = Field(False, description="Encode latents the cache lacks when a batch first needs "
                                     "them, and store them, instead of caching every image before training.")
    vae_enable_tiling: bool = Field(False, description="Tiled VAE encoding (very large images, little memory).")
    vae_enable_slicing: bool = Field(False, description="Sliced VAE encoding (one image at a time inside a batch).")
    tokenizer_max_length: int | None = Field(None, ge=1, description="Token length of T5 (and Kolors' ChatGLM) "
                                             "prompts (default: the model family's, at most the tokenizer's). "
                                             "Changing it changes the cached embeddings.")
    t5_padding: Literal["zero", "unmodified"] = Field("unmodified", description="Flux/SD3: zero the T5 embeddings of "
                                                      "padding tokens, or keep them as the encoder produced them.")
    # adapters
    lora_type: Literal["standard", "lycoris"] = Field("standard", description="standard: peft LoRA; lycoris: "
                                                      "LyCORIS (LoKr, LoHa, ...) from lycoris_config.")
    lora_rank: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: float | None = Field(None, description="LoRA alpha; defaults to lora_rank (scale 1).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout inside LoRA layers (SimpleTuner: 0.1; "
                                "peft and most trainers use none).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    lora_init_type: Literal["default", "gaussian", "loftq", "olora", "pissa"] = Field(
        "default", description="How LoRA weights start (peft's init_lora_weights).")
    init_lokr_norm: float | None = Field(None, gt=0, description="LyCORIS LoKr: perturbed-normal initialisation "
                                         "scale (1e-4 to 1e-2).")
    flux_lora_target: Literal["mmdit", "context", "context+ffs", "all", "all+ffs", "ai-toolkit", "tiny", "nano",
                              "controlnet"] = (
        Field("all", description="Flux, standard LoRA: which layers get adapters (all: every attention layer, "
              "no feed-forward; all+ffs: also feed-forward; mmdit: no text-input layers; context: text attention "
              "only; tiny/nano: two/one blocks; controlnet: with controlnet=true, the ControlNet's control layers "
              "only)."))
    unet_lora_target: Literal["attention", "attention+ffs"] = Field("attention", description="UNet, SD3 "
                                                                    "and PixArt models, standard LoRA: adapt the "
                                                                    "attention projections, or also the "
                                                                    "feed-forward layers.")
    controlnet: bool = Field(False, description="Train a ControlNet (SD 1.x/2.x, SDXL, SD3, Flux, Hunyuan-DiT) on "
                             "image datasets paired with conditioning datasets (conditioning_data); the base model "
                             "stays frozen.")
    controlnet_model_name_or_path: str | None = Field(None, description="Start the ControlNet from these weights "
                                                      "(default: initialised from the base model).")
    layer_freeze_strategy: Literal["none", "bitfit"] = Field("none", description="bitfit: train only the biases "
                                                             "(model_type=full).")
    train_text_encoder: bool = Field(False, description="Also train the text encoder(s) (SD 1.x/2.x, SDXL; Kolors' "
                                     "ChatGLM, with lora_format=diffusers for a LoRA).")
    text_encoder_lr: float | None = Field(None, gt=0, description="Learning rate of the text encoder(s); default: "
                                          "learning_rate.")
    freeze_encoder: bool = Field(True, description="With train_text_encoder: freeze the text encoders' layers that "
                                 "freeze_encoder_strategy names (SimpleTuner's layer-range freezing).")
    freeze_encoder_before: int = Field(12, ge=0, description="Layer index of freeze_encoder_strategy 'before' "
                                       "(freezes layers below it), 'between' and 'outside'.")
    freeze_encoder_after: int = Field(17, ge=0, description="Layer index of freeze_encoder_strategy 'after' "
                                      "(freezes layers above it), 'between' and 'outside'.")
    freeze_encoder_strategy: Literal["before", "between", "after", "outside"] = Field(
        "after", description="Which encoder layers freeze, as SimpleTuner counts them (layer n, before b, after a): "
        "before: n < b; after: n > a; between: n > b or n < a; outside: b <= n <= a.")
    init_lora: str | None = Field(None, description="Start from an existing LoRA file.")
    lycoris_config: str | None = Field(None, description="JSON file with the LyCORIS algorithm and its settings.")
    lora_format: list[Literal["diffusers", "comfyui"]] = Field(
        ["diffusers", "comfyui"], description="Standard LoRA: the files the final export and every checkpoint "
        "write. diffusers: pytorch_lora_weights.safetensors (PixArt, Hunyuan-DiT: peft's adapter folder); comfyui: "
        "<run name>.safetensors for ComfyUI, A1111 and Forge (docs/UI_LORA.md; not for DeepFloyd, whose runs "
        "write the diffusers file only). A list, one name, or names separated by commas.")
    # data
    data_backend_config: str | None = Field(None, description="Dataset file (multidatabackend.json); or "
                                            "[[datasets]] tables in a TOML configuration.")
    resolution: float | None = Field(None, gt=0, description="Default training resolution of datasets; unset: the "
                                     "model family's native resolution (SD 1.x 512, SD 2.x 768, DeepFloyd 64 / 256, "
                                     "the others 1024). SimpleTuner defaults to 1024 for every family.")
    resolution_type: ResolutionType = Field("pixel_area", description="How resolution is read (SimpleTuner's "
                                            "default too): pixel_area keeps the pixel count of a square of that "
                                            "side for every aspect, which matches how models were trained.")
    minimum_image_size: float | None = Field(None, description="Default minimum_image_size of datasets.")
    maximum_image_size: float | None = Field(None, description="Default maximum_image_size of datasets.")
    target_downsample_size: float | None = Field(None, description="Default target_downsample_size of datasets.")
    aspect_bucket_rounding: int | None = Field(None, ge=1, le=9, description="Round each image's aspect ratio "
                                               "(width/height) to this many decimal places before bucketing, so "
                                               "near-equal aspects share a bucket. Unset: the exact ratio "
                                               "(SimpleTuner rounds to 2 places when unset).")
    aspect_bucket_alignment: Literal[8, 16, 32, 64] | None = Field(None, description="Bucket sides are multiples "
                                                                   "of this (default: the model's; 64, or 8 for "
                                                                   "DeepFloyd).")
    caption_dropout_probability: float = Field(0.1, ge=0, le=1, description="Share of steps trained on the "
                                               "empty caption (keeps classifier-free guidance working).")
    caption_dropout_size_conditioning: bool = Field(True, description="SDXL-style models: a dropped caption "
                                                    "also zeroes the size/crop (refiner: aesthetic) conditioning.")
    data_backend_sampling: Literal["auto-weighting", "uniform"] = Field(
        "auto-weighting", description="How datasets are chosen: weighted by size x probability, or uniformly."
    )
    cache_dir: str = Field("cache", description="Root of the caches (index, latents, text embeddings).")
    # optimisation
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate. SimpleTuner's 4e-7 suits only "
                                 "full fine-tuning; 1e-4 suits LoRA.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial", "sine"] = Field(
        "constant_with_warmup", description="Learning-rate schedule (SimpleTuner's default too).")
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    lr_num_cycles: float = Field(1, gt=0, description="Cycles of cosine_with_restarts and sine.")
    lr_power: float = Field(1.0, gt=0, description="Power of the polynomial schedule.")
    lr_end: float = Field(4e-7, ge=0, description="Final learning rate of polynomial schedules; floor of sine and "
                          "cosine.")
    lr_scale: bool = Field(False, description="Multiply learning_rate by processes x batch size x accumulation.")
    lr_scale_sqrt: bool = Field(False, description="With lr_scale: use the square root of that product.")
    optimizer: Literal["adamw", "adamw8bit", "adafactor", "prodigy", "lion", "adamw_schedulefree", "adamw_bf16",
                       "optimi-adamw", "optimi-lion"] = Field(
        "adamw", description="Optimiser; fused AdamW on CUDA. Others need their package installed. adamw_bf16 "
        "(SimpleTuner's default; needs mixed_precision=bf16) keeps the trained weights in bf16 and updates them "
        "with Kahan summation (torch-optimi); optimi-adamw and optimi-lion are torch-optimi's, with Kahan "
        "summation where weights are bf16.")
    adam_beta1: float = Field(0.9, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, description="AdamW beta2.")
    adam_weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    adamw_fused: bool | Literal["auto"] = Field("auto", description="optimizer adamw: PyTorch's fused AdamW "
                                              "step (one kernel for every parameter). auto: on wherever "
                                              "PyTorch has the fused kernel (CUDA, CPU, MPS, ...); false: "
                                              "PyTorch's default (foreach on CUDA) (docs/SPEED.md).")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables). SimpleTuner uses 2.0.")
    grad_clip_method: Literal["norm", "value"] = Field("norm", description="norm: scale the whole gradient to "
                                                       "max_grad_norm; value: clip each element. SimpleTuner "
                                                       "defaults to value; norm is the standard, better-tested one.")
    max_nonfinite_steps: int = Field(5, ge=1, description="An update whose loss or gradient norm is nan or inf is "
                                     "skipped (and counted in metrics.jsonl); after this many in a row the run stops "
                                     "with exit 2, exporting nothing.")
    train_batch_size: int = Field(1, ge=1, description="Samples per step per process.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Steps whose gradients are summed per update.")
    max_train_steps: int | None = Field(None, ge=1, description="Stop after this many optimiser updates.")
    num_train_epochs: int | None = Field(None, ge=1, description="Stop after this many epochs (if no max_train_steps).")
    seed: int | None = Field(42, description="Random seed (sampling, noise, initialisation).")
    mixed_precision: MixedPrecision = Field("bf16", description="Mixed precision of the training step.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    gradient_checkpointing_interval: int | None = Field(None, ge=1, description="With gradient_checkpointing: "
                                                        "recompute only every n-th block of the denoiser (1 or "
                                                        "unset: every block); larger n keeps more activations and "
                                                        "recomputes less.")
    musubi_blocks_to_swap: int = Field(0, ge=0, description="Block swap, for a LoRA, LyCORIS or ControlNet on "
                                       "flux, sd3, pixart_sigma or hunyuan_dit: the frozen weights of the denoiser's "
                                       "last N blocks wait in CPU memory and are copied to the accelerator each time "
                                       "their block runs (the forward, and again in the backward, which recomputes "
                                       "those blocks). Saves their weights' accelerator memory for two copies per "
                                       "block per step (docs/MEMORY.md). 0: off.")
    musubi_block_swap_device: Literal["cpu"] = Field("cpu", description="Where swapped blocks' weights wait: cpu "
                                                     "(the only place built).")
    torch_compile: bool | Literal["auto"] = Field("auto", description="torch.compile the denoiser's repeated "
                                                  "blocks (regional). auto: on CUDA, off on CPU (docs/SPEED.md).")
    channels_last: bool | Literal["auto"] = Field("auto", description="UNets: weights in channels_last memory "
                                                  "format. auto: on CUDA, off on CPU; transformers never.")
    attention_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = Field(
        "auto", description="The SDPA kernel of the training step; auto lets PyTorch choose (flash where the "
        "inputs allow). cudnn and efficient need CUDA.")
    fuse_qkv_projections: bool = Field(False, description="One fused matmul per attention layer for its query, "
                                       "key and value projections (diffusers' fusion; not DeepFloyd). The saved "
                                       "model keeps diffusers' usual separate projections. With a LoRA, the adapter "
                                       "sits on the fused layer (one down matrix shared by q, k and v) and is saved "
                                       "split into the usual q, k and v LoRAs, applying the same delta (LyCORIS: "
                                       "lora/locon/loha only). A peft init_lora joins onto the fused layers when its q, "
                                       "k and v adapters share their down matrix (a fused run's file). Not with a "
                                       "ControlNet's adapter or a quantised base.")
    # sharded training (config/sharding.py)
    fsdp_enable: bool = Field(False, description="Shard a full fine-tune's weights, gradients and optimiser state "
                              "over the processes with PyTorch FSDP2, through accelerate. Not with deepspeed_config.")
    fsdp_version: Literal[1, 2] = Field(2, description="FSDP version; only 2 (FSDP2, DTensor) is built.")
    fsdp_reshard_after_forward: bool = Field(True, description="FSDP: free the gathered weights after each "
                                             "forward (less memory, one more all-gather in backward).")
    fsdp_state_dict_type: Literal["SHARDED_STATE_DICT", "FULL_STATE_DICT"] = Field(
        "SHARDED_STATE_DICT", description="FSDP checkpoints: each process writes its shard (torch.distributed."
        "checkpoint), or the full weights and optimiser state are gathered to the first process.")
    fsdp_cpu_ram_efficient_loading: bool = Field(False, description="FSDP: when sharding, accelerate keeps the "
                                                 "first process's weights and broadcasts them; a FULL_STATE_DICT "
                                                 "checkpoint is read by the first process and broadcast on resume.")
    fsdp_auto_wrap_policy: Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"] = Field(
        "TRANSFORMER_BASED_WRAP", description="FSDP: which submodules become their own shard unit (transformer "
        "blocks, modules above a size, or the whole model as one).")
    fsdp_transformer_layer_cls_to_wrap: str | None = Field(None, description="FSDP: comma-separated block class "
                                                           "names to wrap (default: the model's _no_split_modules).")
    deepspeed_config: str | dict[str, Any] | None = Field(None, description="DeepSpeed ZeRO 1/2/3 through "
                                                          "accelerate: a DeepSpeed JSON file, or its JSON inline. "
                                                          "Optimiser offload: zero_optimization.offload_optimizer. "
                                                          "Needs the deepspeed extra; runs on CUDA or CPU "
                                                          "processes.")
    # EMA
    use_ema: bool = Field(False, description="Keep an exponential moving average of the trained weights.")
    ema_decay: float = Field(0.995, gt=0, lt=1, description="EMA decay per update.")
    ema_update_interval: int | None = Field(None, ge=1, description="Update the EMA every this many steps "
                                            "(default: every step).")
    ema_device: Literal["cpu", "accelerator"] = Field("cpu", description="Where the EMA weights live.")
    ema_validation: Literal["none", "ema_only", "comparison"] = Field("comparison", description="Validation "
                                                                      "images from the EMA weights: none, only, or "
                                                                      "beside the trained weights.")
    # objective
    prediction_type: Literal["epsilon", "v_prediction", "sample", "flow_matching"] | None = Field(
        None, description="Override the model's own prediction type.")
    snr_gamma: float | None = Field(None, gt=0, description="Min-SNR-gamma loss weighting (5 is usual).")
    masked_loss_probability: float = Field(1.0, ge=0, le=1, description="Masked loss: each sample's mask is "
                                           "applied with this probability; otherwise the sample trains on all its "
                                           "pixels.")
    prior_loss_weight: float = Field(1.0, ge=0, description="Weight of the loss of class images (datasets with "
                                     "is_class_data): instance loss + prior_loss_weight * class loss, as diffusers' "
                                     "train_dreambooth computes it.")
    noise_offset: float = Field(0.0, ge=0, description="Noise offset strength.")
    noise_offset_probability: float = Field(0.25, ge=0, le=1, description="Share of steps with noise offset.")
    input_perturbation: float = Field(0.0, ge=0, description="Input perturbation strength.")
    loss_type: Literal["l2", "huber", "smooth_l1"] = Field("l2", description="Loss function.")
    huber_c: float = Field(0.1, gt=0, description="Huber loss threshold.")
    rescale_betas_zero_snr: bool = Field(False, description="Zero-terminal-SNR beta rescaling (v-prediction).")
    training_scheduler_timestep_spacing: TimestepSpacing = Field(
        "trailing", description="Timestep spacing of the training scheduler.")
    inference_scheduler_timestep_spacing: TimestepSpacing = Field(
        "trailing", description="Timestep spacing of the validation scheduler.")
    input_perturbation_steps: int = Field(0, ge=0, description="Apply input perturbation only over the first N "
                                          "steps, decaying linearly (0: always).")
    timestep_bias_strategy: Literal["earlier", "later", "range", "none"] = Field(
        "none", description="Bias timestep sampling towards earlier or later timesteps, or a range.")
    timestep_bias_multiplier: float = Field(1.0, gt=0, description="Weight of the biased timesteps.")
    timestep_bias_begin: int = Field(0, ge=0, description="First timestep of timestep_bias_strategy=range.")
    timestep_bias_end: int = Field(1000, ge=0, description="Last timestep of timestep_bias_strategy=range.")
    timestep_bias_portion: float = Field(0.25, ge=0, le=1, description="Share of timesteps biased (earlier/later).")
    refiner_training: bool = Field(False, description="Train on the last refiner_training_strength of the schedule "
                                   "(SDXL refiner, or a second-stage expert).")
    refiner_training_strength: float = Field(0.2, gt=0, lt=1, description="Share of the schedule, at its end, that "
                                             "the refiner learns (0.2: timesteps 199-0; flow matching: sigmas up to 0.2); in (0, 1).")
    refiner_training_invert_schedule: bool = Field(False, description="Learn the other part of the schedule (the "
                                                   "base model of an expert pair).")
    validation_base_model: str | None = Field(None, description="First-stage pipeline (folder or Hub id) that "
                                              "validation runs before the trained second stage (refiner_training): "
                                              "it denoises to 1 - refiner_training_strength of the schedule "
                                              "(diffusers' denoising_end), the trained model from there. SDXL, "
                                              "Kolors.")
    validation_refiner_model: str | None = Field(None, description="Second-stage pipeline (folder or Hub id, e.g. "
                                                 "the SDXL refiner) that finishes the trained model's validation "
                                                 "images: the trained model denoises to 1 - "
                                                 "refiner_training_strength of the schedule, this one from there "
                                                 "(diffusers' denoising_start). SDXL, Kolors.")
    data_aesthetic_score: float = Field(7.0, description="Aesthetic score given to the SDXL refiner's conditioning.")
    flow_sigmoid_scale: float = Field(1.0, gt=0, description="Flow matching: scale of logit-normal (sigmoid) "
                                      "timestep sampling.")
    flow_sigmoid_mean: float = Field(0.0, description="Flow matching: mean of logit-normal (sigmoid) timestep "
                                     "sampling (diffusers' logit_mean).")
    flow_use_uniform_schedule: bool = Field(False, description="Flow matching: sample timesteps uniformly.")
    flow_use_mode_schedule: bool = Field(False, description="Flow matching: sample timesteps from the SD3 paper's "
                                         "mode density (scale flow_mode_scale).")
    flow_mode_scale: float = Field(1.29, description="Scale of flow_use_mode_schedule (diffusers' mode_scale).")
    flow_loss_weighting: Literal["none", "sigma_sqrt", "logit_normal", "cosmap"] = Field(
        "none", description="Flow matching loss weight per sample: none; sigma_sqrt (sigma^-2) and cosmap as "
        "diffusers' SD3 scripts; logit_normal (the logit-normal density at sigma, for uniform sampling).")
    flow_use_beta_schedule: bool = Field(False, description="Flow matching: sample timesteps from a beta "
                                         "distribution.")
    flow_beta_schedule_alpha: float = Field(2.0, gt=0, description="Alpha of the flow-matching beta schedule.")
    flow_beta_schedule_beta: float = Field(2.0, gt=0, description="Beta of the flow-matching beta schedule.")
    flow_schedule_shift: float = Field(3.0, ge=0, description="Flow matching: shift of the timestep schedule "
                                       "(0 disables; higher favours composition over fine detail).")
    flow_schedule_auto_shift: bool = Field(False, description="Flow matching: shift by image resolution, as Flux "
                                           "inference does.")
    flux_fast_schedule: bool = Field(False, description="Flux schnell: train on the schedule it was distilled with.")
    flux_guidance_mode: Literal["constant", "random-range"] = Field("constant", description="Flux guidance input "
                                                                    "during training.")
    flux_guidance_value: float = Field(1.0, ge=0, description="Flux guidance for flux_guidance_mode=constant "
                                       "(1.0 keeps dev's guidance distillation).")
    flux_guidance_min: float = Field(0.0, ge=0, description="Lowest guidance of flux_guidance_mode=random-range.")
    flux_guidance_max: float = Field(4.0, ge=0, description="Highest guidance of flux_guidance_mode=random-range.")
    flux_attention_masked_training: bool = Field(False, description="Flux: mask padding tokens in attention.")
    sd3_clip_uncond_behaviour: Literal["empty_string", "zero"] = Field(
        "empty_string", description="SD3 caption dropout: CLIP embeddings of the empty caption, or zeros.")
    sd3_t5_uncond_behaviour: Literal["empty_string", "zero"] | None = Field(
        None, description="SD3 caption dropout for T5 (default: as sd3_clip_uncond_behaviour).")
    deepfloyd_stage2_max_noise_level: int = Field(250, ge=0, le=999, description="DeepFloyd stage II: the "
                                                  "low-resolution conditioning image is noised at a level drawn "
                                                  "uniformly from 0 to this (its pipeline samples at 250).")
    # checkpoints
    output_dir: str = Field("output/models", description="Where checkpoints, validation images and the model go.")
    checkpointing_steps: int = Field(500, ge=1, description="Save a checkpoint every this many steps.")
    checkpoints_total_limit: int | None = Field(None, ge=1, description="Keep at most this many checkpoints.")
    resume_from_checkpoint: str | None = Field(None, description="'latest' or a checkpoint folder.")
    resume_keep_global_batch: bool = Field(False, description="Resuming on another number of processes: set "
                                           "gradient_accumulation_steps so that processes x accumulation stays "
                                           "the checkpoint's (refused when the new count cannot divide it).")
    # validation
    validation_steps: int = Field(100, ge=1, description="Sample validation images every this many steps.")
    validation_prompt: str | None = Field(None, description="Prompt for validation images.")
    user_prompt_library: str | None = Field(None, description="JSON file of name -> prompt for validation.")
    validation_negative_prompt: str = Field("blurry, cropped, ugly", description="Negative prompt for validation.")
    validation_guidance: float = Field(7.5, ge=0, description="Guidance scale for validation.")
    validation_num_inference_steps: int = Field(30, ge=1, description="Sampling steps for validation.")
    validation_seed: int = Field(42, description="Seed of validation images.")
    validation_resolution: str | None = Field(None, description="Resolutions, e.g. '1024' or '1024x768,768x1024'.")
    validation_noise_scheduler: Literal["ddim", "ddpm", "euler", "euler-a", "unipc", "dpm++"] | None = Field(
        None, description="Scheduler for validation (default: the model's).")
    num_validation_images: int = Field(1, ge=1, description="Images per validation prompt.")
    validation_conditioning_images: list[str] | None = Field(
        None, description="ControlNet: control images (local files) that validation samples each prompt from, at "
        "each validation_resolution (each image centre-cropped and resized to it).")
    num_eval_images: int | None = Field(None, ge=1, description="ControlNet: validation samples each prompt from "
                                        "this many control images of the conditioning datasets (the first pairs by "
                                        "path), each at its trained size and crop. Without either option, one "
                                        "control image of each validation_resolution. No effect on other runs.")
    validation_guidance_rescale: float = Field(0.0, ge=0, le=1, description="Guidance rescale for validation "
                                               "(0.7 for zero-terminal-SNR models).")
    validation_guidance_real: float = Field(1.0, ge=1, description="Flux: real classifier-free guidance for "
                                            "validation (1.0: none).")
    validation_no_cfg_until_timestep: int = Field(2, ge=0, description="Flux with real guidance: skip guidance on "
                                                  "the first N steps.")
    validation_guidance_skip_layers: list[int] | None = Field(
        None, description="SD3: skip-layer guidance in validation: indices of the transformer blocks skipped in an "
        "extra prediction that guides away from it (e.g. [7, 8, 9] for SD 3.5 Medium); unset: off. Other families' "
        "pipelines have no such input: they ignore it with a warning, as SimpleTuner does.")
    validation_guidance_skip_layers_start: float = Field(0.01, ge=0, le=1, description="Skip-layer guidance "
                                                         "starts after this share of the validation steps.")
    validation_guidance_skip_layers_stop: float = Field(0.2, ge=0, le=1, description="Skip-layer guidance stops "
                                                        "at this share of the validation steps.")
    validation_guidance_skip_scale: float = Field(2.8, ge=0, description="Scale of skip-layer guidance (2.8 suits "
                                                  "three skipped layers).")
    validation_randomize: bool = Field(False, description="Random seeds for validation images.")
    validation_on_startup: bool = Field(False, description="Sample validation images before the first step.")
    validation_torch_compile: bool = Field(False, description="torch.compile the validation pipeline.")
    validation_lycoris_strength: float = Field(1.0, ge=0, description="LyCORIS multiplier for validation images.")
    disable_validation: bool = Field(False, description="Never sample validation images.")
    # publishing
    push_to_hub: bool = Field(False, description="Upload the final model, its model card and card images to the "
                              "Hugging Face Hub repository hub_model_id (created if needed), in the background. "
                              "The token comes from HF_TOKEN or `hf auth login`.")
    push_checkpoints_to_hub: bool = Field(False, description="With push_to_hub: also upload every checkpoint's "
                                          "weight files, to checkpoints/step-N/ in the repository.")
    hub_model_id: str | None = Field(None, description="Hub repository to upload to, as owner/name; read only "
                                     "with push_to_hub, which needs it.")
    model_card_private: bool = Field(False, description="With push_to_hub: create the Hub repository as private.")
    model_card_note: str | None = Field(None, description="Text put at the top of the model card "
                                        "(output_dir/README.md, written for every run).")
    model_card_safe_for_work: bool = Field(False, description="Leave out the model card's not-for-all-audiences "
                                           "tag.")
    webhook_config: str | None = Field(None, description="Webhooks that hear about start, validation images, "
                                       "checkpoints, errors and the finish: a JSON file or inline JSON, one object or "
                                       "a list, each with webhook_type (discord|raw), webhook_url (raw: or "
                                       "callback_url), and optionally message_prefix and log_level.")
    webhook_reporting_interval: int | None = Field(None, ge=1, description="Steps between progress reports to raw "
                                                   "webhooks (sent at the first logging step after each multiple).")
    # tracking
    report_to: Literal["tensorboard", "wandb", "none"] = Field("tensorboard", description="Tracker.")
    tracker_project_name: str = Field("simpletuner", description="Tracker project name.")
    tracker_run_name: str | None = Field(None, description="Tracker run name.")
    logging_dir: str = Field("logs", description="Log directory, relative to output_dir.")
    logging_steps: int = Field(10, ge=1, description="Read the loss and grad norm from the device, log them and "
                               "update the progress bar every this many steps (the step never waits for the host "
                               "in between).")

    @field_validator("num_train_epochs", "max_train_steps", mode="before")
    @classmethod
    def _zero_means_unset(cls, value: object) -> object:
        # SimpleTuner writes 0 for "not this one" (max_train_steps or num_train_epochs).
        return None if value in (0, "0") else value

    @field_validator("lora_format", mode="before")
    @classmethod
    def _format_list(cls, value: object) -> object:
        # SimpleTuner takes one name (--lora_format=comfyui); a comma-separated string or a list works too
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, (list, tuple)) and not value:
            raise ValueError("name at least one format: diffusers, comfyui")
        if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
            return list(dict.fromkeys(value))
        return value

    @field_validator("validation_guidance_skip_layers", mode="before")
    @classmethod
    def _layers_from_text(cls, value: object) -> object:
        # config.env and the command line give "[7, 8, 9]" or "7,8,9"
        if not isinstance(value, str):
            return value
        text = value.strip().strip("[]").strip()
        if text.lower() in ("", "none", "null"):
            return None
        return [part.strip() for part in text.split(",")]

    @model_validator(mode="after")
    def _skip_layer_guidance_window(self) -> "TrainingConfig":
        start, stop = self.validation_guidance_skip_layers_start, self.validation_guidance_skip_layers_stop
        if any(layer < 0 for layer in self.validation_guidance_skip_layers or ()):
            raise ValueError(f"validation_guidance_skip_layers={self.validation_guidance_skip_layers}: layer "
                             "indices count from 0")
        if self.validation_guidance_skip_layers and start >= stop:
            raise ValueError(f"validation_guidance_skip_layers_start ({start}) must be below "
                             f"validation_guidance_skip_layers_stop ({stop}): they bound the share of validation "
                             "steps that use skip-layer guidance")
        return self

    @model_validator(mode="after")
    def _fusion_trains_the_full_model_or_a_lora(self) -> "TrainingConfig":
        if not self.fuse_qkv_projections or not trains_adapter(self):
            return self
        refused = [(bool(self.init_lora) and self.lora_type == "lycoris", "init_lora with LyCORIS (its file's "
                    "q, k and v adapters are not joined onto the fused layers)"),
                   (self.controlnet, "controlnet (its adapter trains the ControlNet, which is not fused)"),
                   (self.base_model_precision != "no_change", f"base_model_precision {self.base_model_precision!r} "
                    "(diffusers fuses plain weights only)")]
        for hit, what in refused:
            if hit:
                raise ValueError(f"fuse_qkv_projections=true with model_type {self.model_type!r} cannot be combined "
                                 f"with {what}; set fuse_qkv_projections=false")
        return self

    @model_validator(mode="after")
    def _bitfit_trains_the_full_model(self) -> "TrainingConfig":
        if self.layer_freeze_strategy == "bitfit" and trains_adapter(self):
            raise ValueError(f"layer_freeze_strategy='bitfit' (use_bitfit) trains the base model's biases and needs "
                             f"model_type 'full', but model_type is {self.model_type!r}; remove one of the two")
        return self

    @model_validator(mode="after")
    def _text_encoder_training_without_t5(self) -> "TrainingConfig":
        if self.train_text_encoder and self.model_family in ("flux", "sd3", "pixart_sigma", "deepfloyd"):
            raise ValueError(f"train_text_encoder=true cannot be combined with model_family {self.model_family!r}: "
                             "its T5-XXL text encoder is too large to train (SimpleTuner trains text encoders for "
                             "SD 1.x/2.x and SDXL only); remove train_text_encoder")
        return self

    @model_validator(mode="after")
    def _validation_chain(self) -> "TrainingConfig":
        from simpletuner.config.experts import chain_problem

        problem = chain_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _kolors_text_encoder_lora_format(self) -> "TrainingConfig":
        if (self.model_family == "kolors" and self.train_text_encoder and trains_adapter(self)
                and "comfyui" in self.lora_format):
            raise ValueError("train_text_encoder=true with model_family 'kolors' trains a LoRA on ChatGLM, which "
                             "the UI LoRA file (lora_format comfyui) has no key names for (ComfyUI and A1111 load "
                             "Kolors LoRAs for the UNet only); set lora_format=diffusers (diffusers' KolorsPipeline "
                             "loads the ChatGLM LoRA) or remove train_text_encoder")
        return self

    @model_validator(mode="after")
    def _sharding(self) -> "TrainingConfig":
        from simpletuner.config.sharding import read_deepspeed_config, sharding_problems

        if self.deepspeed_config:
            read_deepspeed_config(self.deepspeed_config)
        problems = sharding_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _block_swap(self) -> "TrainingConfig":
        if not self.musubi_blocks_to_swap:
            return self
        refused = [(not trains_adapter(self) and not self.controlnet, f"model_type {self.model_type!r} (it trains "
                    "the weights block swap keeps on the CPU; use model_type 'lora', or a ControlNet, whose base "
                    "stays frozen)"),
                   (self.model_family not in BLOCK_SWAP_FAMILIES, f"model_family {self.model_family!r} (block swap "
                    f"takes the transformer families {', '.join(BLOCK_SWAP_FAMILIES)})"),
                   (self.fsdp_enable or bool(self.deepspeed_config), "fsdp_enable or deepspeed_config (they place "
                    "the weights themselves)")]
        for hit, what in refused:
            if hit:
                raise ValueError(f"musubi_blocks_to_swap={self.musubi_blocks_to_swap} cannot be combined with {what}; "
                                 "set musubi_blocks_to_swap=0")
        return self

    @model_validator(mode="after")
    def _controlnet_family(self) -> "TrainingConfig":
        if self.controlnet and self.model_family not in CONTROLNET_FAMILIES:
            raise ValueError(f"controlnet=true: model_family {self.model_family!r} has no ControlNet training in "
                             f"this version; ControlNet training takes {', '.join(CONTROLNET_FAMILIES)}")
        return self

    @model_validator(mode="after")
    def _frozen_quantised_base(self) -> "TrainingConfig":
        if self.flux_lora_target == "controlnet" and not self.controlnet:
            raise ValueError("flux_lora_target='controlnet' adapts a ControlNet's control layers and needs "
                             "controlnet=true; for a Flux LoRA choose another flux_lora_target")
        if self.base_model_precision != "no_change" and not trains_adapter(self) and not self.controlnet:
            raise ValueError(f"base_model_precision={self.base_model_precision!r} quantises the base model, which "
                             f"model_type {self.model_type!r} trains itself; quantised weights cannot be trained: "
                             "use model_type 'lora', controlnet=true (the base stays frozen) or base_model_precision "
                             "'no_change'")
        return self

    @model_validator(mode="after")
    def _bf16_optimizer(self) -> "TrainingConfig":
        if self.optimizer == "adamw_bf16" and self.mixed_precision != "bf16":
            raise ValueError(f"optimizer 'adamw_bf16' trains bf16 weights and needs mixed_precision 'bf16' (not "
                             f"{self.mixed_precision!r}); for fp32 weights use optimizer 'adamw'")
        return self

    @model_validator(mode="after")
    def _deepfloyd_model_types(self) -> "TrainingConfig":
        if self.model_type.startswith("deepfloyd-") and self.model_family != "deepfloyd":
            raise ValueError(f"model_type {self.model_type!r} trains DeepFloyd IF and needs model_family "
                             f"'deepfloyd'; for model_family {self.model_family!r} use 'full' or 'lora'")
        if self.model_family == "deepfloyd" and self.lora_format == ["comfyui"]:
            raise ValueError("lora_format=comfyui: ComfyUI and A1111 do not load DeepFloyd IF LoRAs; "
                             "use lora_format=diffusers")
        return self
