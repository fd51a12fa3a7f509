"""The model card: output_dir/README.md in the Hugging Face Hub's format, written for every run.

Its YAML front matter (rendered by huggingface_hub's `ModelCardData`) names the base model, tags,
the base model's license where a local copy states one, the trigger words and a widget of the
validation images, which are copied into output_dir/images/. The text says what was trained and
how to load the result. It never holds a path of the training machine: the base model is named as
publish.metadata names it, and the loading code names the Hub repository or the output folder's name.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from simpletuner.atomic import written_atomically
from simpletuner.publish.metadata import TrainingSummary

CARD_FILE = "README.md"
IMAGES_FOLDER = "images"
_IMAGE_NAME = re.compile(r"^(?P<name>.+)-(?P<w>\d+)x(?P<h>\d+)-(?P<i>\d+)\.png$")


@dataclass(frozen=True)
class DatasetLine:
    """One dataset as the card lists it."""

    name: str
    images: int
    resolutions: tuple[str, ...]  # bucket sizes, "WxH"


@dataclass(frozen=True)
class CardImage:
    """A validation image as the card shows it (file relative to output_dir)."""

    file: str
    prompt: str
    step: int


@dataclass(frozen=True)
class CardInfo:
    """Everything the card says; built from a run by publish.card_run."""

    summary: TrainingSummary
    pipeline_class: str
    output_kind: str  # lora | peft | lycoris | full | controlnet
    output_files: tuple[str, ...]  # relative to output_dir
    folder_name: str  # the output folder's own name, for loading code of a local copy
    hub_model_id: str | None = None
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 0.0
    lr_scheduler: str = ""
    optimizer: str = ""
    mixed_precision: str = ""
    datasets: tuple[DatasetLine, ...] = ()
    images: tuple[CardImage, ...] = ()
    license: str | None = None
    note: str | None = None
    safe_for_work: bool = False
    extra_tags: tuple[str, ...] = field(default_factory=tuple)
    controlnet_class: str = ""  # output_kind controlnet: the diffusers class of output_dir/controlnet/


def base_license(base_model: str) -> str | None:
    """The license a local base model's own model card states; None when unknown (a Hub id is not fetched)."""
    readme = Path(base_model).expanduser() / CARD_FILE
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        value = ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # an unreadable card means an unknown license, never a failed run
        return None
    return value if isinstance(value, str) and value else None


def existing_validation(output_dir: Path, until: int) -> dict[int, list[Path]]:
    """Validation images already in output_dir/validation from steps up to `until` (where a run resumed: its earlier
    steps), by step."""
    found: dict[int, list[Path]] = {}
    for folder in (output_dir / "validation").glob("step-*"):
        step = folder.name.removeprefix("step-")
        if step.isdigit() and int(step) <= until:
            found[int(step)] = sorted(folder.glob("*.png"))
    return {step: found[step] for step in sorted(found) if found[step]}


def copy_card_images(output_dir: Path, images: dict[int, list[Path]], prompts: dict[str, str]) -> list[CardImage]:
    """Copy the last validation step's images (and step 0's, the base model, for comparison) into
    output_dir/images/; returns them as the card lists them."""
    if not images:
        return []
    steps = sorted(images)
    chosen = [steps[-1]] + ([steps[0]] if steps[0] != steps[-1] else [])
    folder = output_dir / IMAGES_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    shown = []
    for step in chosen:
        for source in images[step]:
            match = _IMAGE_NAME.match(source.name)
            if not source.is_file():
                continue
            target = folder / f"step-{step}-{source.name}"
            shutil.copyfile(source, target)
            prompt = prompts.get(match.group("name"), "") if match else ""
            shown.append(CardImage(f"{IMAGES_FOLDER}/{target.name}", prompt, step))
    return shown


def render_card(info: CardInfo) -> str:
    """The README.md text: YAML front matter, then the body."""
    from huggingface_hub import ModelCard, ModelCardData

    summary = info.summary
    tags = ["text-to-image", "diffusers", "simpletuner", summary.family,
            "lora" if info.output_kind in ("lora", "peft") else info.output_kind, *info.extra_tags]
    if not info.safe_for_work:
        tags.append("not-for-all-audiences")
    last = max((image.step for image in info.images), default=None)
    final = [image for image in info.images if image.step == last]  # the widget shows the last validation
    widget = [{"text": image.prompt, "output": {"url": image.file}} for image in final]
    data = ModelCardData(base_model=summary.base_model, library_name="diffusers", license=info.license,
                         pipeline_tag="text-to-image", tags=list(dict.fromkeys(tags)), widget=widget or None,
                         instance_prompt=", ".join(summary.trigger_words) or None)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{_body(info)}"))


def write_card(output_dir: Path, info: CardInfo) -> Path:
    """Write output_dir/README.md (atomically); returns its path."""
    path = output_dir / CARD_FILE
    with written_atomically(path) as temp:
        temp.write_text(render_card(info), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- the body
def _body(info: CardInfo) -> str:
    summary = info.summary
    parts = [f"# {summary.title}\n"]
    if info.note:
        parts.append(f"{info.note.strip()}\n")
    kind = {"lora": "a LoRA", "peft": "a LoRA", "lycoris": "a LyCORIS adapter", "full": "a full fine-tune",
            "controlnet": "a ControlNet"}
    parts.append(f"This is {kind[info.output_kind]} of {_base_link(summary.base_model)} ({summary.family}), "
                 "trained with SimpleTuner.\n")
    if summary.trigger_words:
        parts.append("Trigger words: " + ", ".join(f"`{word}`" for word in summary.trigger_words) + "\n")
    parts += [_training_section(info), _datasets_section(info), _images_section(info), _diffusers_section(info)]
    if info.output_kind in ("lora", "peft"):
        parts.append(_ui_section(info))
    return "\n".join(part for part in parts if part)


def _base_link(base_model: str) -> str:
    """A Hub id as a link to its page; a local model's folder name as it is."""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", base_model):
        return f"[{base_model}](https://huggingface.co/{base_model})"
    return f"`{base_model}`"


def _training_section(info: CardInfo) -> str:
    summary = info.summary
    rows = [("Model family", summary.family), ("Training", _mode(info)), ("Steps", str(summary.steps)),
            ("Batch size", f"{info.batch_size} x {info.gradient_accumulation_steps} gradient accumulation"),
            ("Learning rate", f"{info.learning_rate:g}" + (f" ({info.lr_scheduler})" if info.lr_scheduler else "")),
            ("Optimizer", info.optimizer), ("Mixed precision", info.mixed_precision),
            ("Resolution", f"{summary.resolution} px")]
    if summary.rank is not None:
        rows.insert(2, ("Rank / alpha", f"{summary.rank} / {summary.alpha:g}"))
    if summary.target:
        rows.insert(3, ("LoRA target", summary.target))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows if value)
    return f"## Training\n\n| Setting | Value |\n|---|---|\n{table}\n"


def _mode(info: CardInfo) -> str:
    summary = info.summary
    if summary.adapter == "lora":
        return "LoRA (DoRA)" if summary.use_dora else "LoRA"
    return "LyCORIS" if info.output_kind == "lycoris" else "full"


def _datasets_section(info: CardInfo) -> str:
    if not info.datasets:
        return ""
    rows = "\n".join(f"| {d.name} | {d.images} | {', '.join(d.resolutions)} |" for d in info.datasets)
    return f"## Datasets\n\n| Dataset | Images | Resolutions |\n|---|---|---|\n{rows}\n"


def _images_section(info: CardInfo) -> str:
    if not info.images:
        return ""
    lines = [f"![{_alt(image.prompt)}]({image.file})\n\n*Step {image.step}*" + (" (the base model)" if image.step == 0
             else "") + (f": {image.prompt}" if image.prompt else "") for image in info.images]
    return "## Validation images\n\n" + "\n\n".join(lines) + "\n"


def _alt(text: str) -> str:
    return re.sub(r"[\[\]\n]", " ", text)[:100]


def _source(info: CardInfo) -> str:
    return info.hub_model_id or f"path/to/{info.folder_name}"


def _diffusers_section(info: CardInfo) -> str:
    source, base, cls = _source(info), info.summary.base_model, info.pipeline_class
    prompt = info.images[0].prompt if info.images else (", ".join(info.summary.trigger_words) or "a photo")
    head = f"import torch\nfrom diffusers import {cls}\n\n"
    if info.output_kind == "controlnet":
        return _controlnet_section(info, source, base, cls, prompt)
    if info.output_kind == "full":
        folder = source if info.hub_model_id else f"{source}/pipeline"
        code = (f"import torch\nfrom diffusers import DiffusionPipeline\n\n"
                f"pipeline = DiffusionPipeline.from_pretrained({folder!r}, dtype=torch.bfloat16)\n")
    elif info.output_kind == "lora":
        weights = ("pytorch_lora_weights.safetensors" if "pytorch_lora_weights.safetensors" in info.output_files
                   else info.output_files[0])
        code = (head + f"pipeline = {cls}.from_pretrained({base!r}, dtype=torch.bfloat16)\n"
                f"pipeline.load_lora_weights({source!r}, weight_name={weights!r})\n")
    elif info.output_kind == "peft":
        code = (head + "from peft import PeftModel\n\n"
                f"pipeline = {cls}.from_pretrained({base!r}, dtype=torch.bfloat16)\n"
                f"pipeline.transformer = PeftModel.from_pretrained(pipeline.transformer, {source!r})\n")
    else:
        weights = info.output_files[0] if info.output_files else "pytorch_lora_weights.safetensors"
        code = (head + "from huggingface_hub import hf_hub_download\n"
                "from lycoris import create_lycoris_from_weights\n\n"
                f"pipeline = {cls}.from_pretrained({base!r}, dtype=torch.bfloat16)\n"
                + (f"weights = hf_hub_download({source!r}, {weights!r})\n" if info.hub_model_id
                   else f"weights = {source + '/' + weights!r}\n")
                + "denoiser = getattr(pipeline, 'transformer', None) or pipeline.unet\n"
                "wrapper, _ = create_lycoris_from_weights(1.0, weights, denoiser)\nwrapper.merge_to()\n")
    code += f"pipeline.to('cuda')\nimage = pipeline({prompt!r}).images[0]\nimage.save('output.png')\n"
    return f"## Use it with diffusers\n\n```python\n{code}```\n"


def _controlnet_section(info: CardInfo, source: str, base: str, cls: str, prompt: str) -> str:
    """Loading code of a ControlNet output (publish.export: output_dir/controlnet/, any LoRA fused in)."""
    net = info.controlnet_class
    code = (f"import torch\nfrom diffusers import {net}, {cls}\nfrom diffusers.utils import load_image\n\n"
            f"controlnet = {net}.from_pretrained({source!r}, subfolder='controlnet', dtype=torch.bfloat16)\n"
            f"pipeline = {cls}.from_pretrained({base!r}, controlnet=controlnet, dtype=torch.bfloat16)\n"
            "pipeline.to('cuda')\ncontrol = load_image('control.png')  # a control image like the training ones\n"
            f"image = pipeline({prompt!r}, image=control).images[0]\nimage.save('output.png')\n")
    text = f"## Use it with diffusers\n\n```python\n{code}```\n"
    if "pytorch_lora_weights.safetensors" in info.output_files:
        text += ("\nThe LoRA alone is `pytorch_lora_weights.safetensors`, for the ControlNet in `controlnet_base/`: "
                 f"`{net}.from_pretrained(..., subfolder='controlnet_base')`, then `load_lora_adapter(file, "
                 "prefix='controlnet')` on it.\n")
    return text


def _ui_section(info: CardInfo) -> str:
    ui_files = [name for name in info.output_files
                if name.endswith(".safetensors") and name not in ("pytorch_lora_weights.safetensors",
                                                                   "adapter_model.safetensors")]
    if ui_files:
        intro = ("The file " + ", ".join(f"`{name}`" for name in ui_files)
                 + " holds the LoRA in the key names ComfyUI and A1111/Forge read.")
        name = ui_files[0]
    else:
        intro = ("ComfyUI and A1111/Forge read a LoRA in their own (kohya) key names, as one "
                 "`<run name>.safetensors` file; this output holds the diffusers file only. "
                 "`simpletuner export OUTPUT --output FOLDER --format comfyui` writes the other one.")
        name = "<run name>.safetensors"
    stem = name.rsplit("/", 1)[-1].removesuffix(".safetensors")
    return ("## Use it in ComfyUI or A1111/Forge\n\n" + intro + "\n\n"
            f"- ComfyUI: put `{name.rsplit('/', 1)[-1]}` in `ComfyUI/models/loras/` and load it with a *LoraLoader* "
            "node between the checkpoint loader and the sampler.\n"
            f"- A1111/Forge: put it in `models/Lora/` and add `<lora:{stem}:1>` to the prompt.\n")
