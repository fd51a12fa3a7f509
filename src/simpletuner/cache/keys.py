"""Cache keys: a stable hash of everything that shaped an entry, so nothing is ever stale.

A latent key hashes the source's identity (location, relative path, size,
modification time, optionally a content hash), the transform (resized size, crop
box, flip) and the encoder's identity. A text key hashes the caption text and the
encoder's identity, so equal captions share one entry. Keys are 32 hex digits
(BLAKE2b, 128 bits) of a canonical JSON document: stable across processes,
machines and Python versions (no `hash()`, no pickles).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from simpletuner.data.records import ImagePlan, ImageRecord

if TYPE_CHECKING:
    import torch

KEY_VERSION = 1  # bump when the meaning of an entry changes (layout, what is stored)
EMPTY_CAPTION = ""  # the caption trained on when a caption is dropped out


def stable_hash(document: Any) -> str:
    """32 hex digits of BLAKE2b over the canonical JSON of `document`."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_jsonable)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)


@dataclass(frozen=True)
class SourceIdentity:
    """Which file: where it lives, and the size and time that change when it is replaced."""

    location: str  # the dataset's root: a folder or s3://bucket/prefix
    path: str  # relative to the root, '/'-separated
    size: int
    mtime: float
    content_hash: str | None = None  # optional: survives touch/copy, costs a full read

    @classmethod
    def of(cls, location: str, record: ImageRecord, content_hash: str | None = None) -> "SourceIdentity":
        return cls(location.rstrip("/"), record.path, record.file_size, record.mtime, content_hash)

    def document(self) -> dict:
        # storages report mtimes with different precision; microseconds is plenty
        return {"location": self.location, "path": self.path, "size": self.size,
                "mtime": round(float(self.mtime), 6), "content": self.content_hash}


@dataclass(frozen=True)
class Transform:
    """How the pixels were prepared: resized to `resized_size`, cropped to `crop_box`, flipped."""

    resized_size: tuple[int, int]  # (width, height)
    crop_box: tuple[int, int, int, int]  # (left, top, right, bottom) in the resized image
    flip: bool = False

    @classmethod
    def of(cls, plan: ImagePlan, flip: bool = False) -> "Transform":
        return cls(tuple(plan.resized_size), tuple(plan.crop_box), flip)

    def document(self) -> dict:
        return {"resized": list(self.resized_size), "crop": list(self.crop_box), "flip": bool(self.flip)}


@dataclass(frozen=True)
class EncoderIdentity:
    """Which encoder, exactly: model and revision (or a weight hash), component, dtype, settings.

    `settings` holds every option that changes the output, e.g. {"max_length": 77,
    "attention_mask": "zeroed"} for a text encoder or {"sample": "distribution"} for
    a VAE. Families build these; the cache only hashes them.
    """

    model: str
    component: str  # "vae", "text_encoder", "text_encoder_2", ...
    dtype: str  # "bfloat16", "float32", ...
    revision: str | None = None
    weight_hash: str | None = None  # for local or fine-tuned weights without a revision
    settings: Mapping[str, Any] = field(default_factory=dict)

    def document(self) -> dict:
        return {"model": self.model, "revision": self.revision, "weights": self.weight_hash,
                "component": self.component, "dtype": str(self.dtype).removeprefix("torch."),
                "settings": dict(self.settings)}

    def digest(self) -> str:
        return stable_hash(self.document())


def latent_key(source: SourceIdentity, transform: Transform, encoder: EncoderIdentity) -> str:
    """Key of a VAE entry."""
    return stable_hash({"v": KEY_VERSION, "kind": "latent", "source": source.document(),
                        "transform": transform.document(), "encoder": encoder.document()})


def text_key(caption: str, encoder: EncoderIdentity) -> str:
    """Key of a text entry: equal captions under one encoder share it."""
    return stable_hash({"v": KEY_VERSION, "kind": "text", "caption": caption, "encoder": encoder.document()})


def weight_hash(module: "torch.nn.Module") -> str:
    """32 hex digits over a module's parameter and buffer names, dtypes, shapes and bytes."""
    import torch

    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def content_hash(data: bytes) -> str:
    """Optional content identity of a source file."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()
