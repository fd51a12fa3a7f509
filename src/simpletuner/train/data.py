"""The training side of the data road: scanned datasets -> cached entries -> batches.

`TrainingData.prepare` scans every image dataset (the index and buckets of
`simpletuner scan`), resolves captions, and keys each image's latent entry and
each caption's text entry with the family's encoder identities. `ensure_cached`
encodes what the stores lack; `batch` turns a sampler batch into the tensors a
training step needs.

A dataset with vae_cache_clear_each_epoch and random crops trains epoch 0 from the
cache; in every later epoch each image's crop position is drawn again for that epoch
(`BucketAssignment.epoch_plan`) and its latent is encoded when its batch needs it,
never stored (a cache cleared every epoch holds nothing a later epoch reads).
Without random crops every epoch's latents are the cached ones, so the cache serves.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from simpletuner.cache.keys import EMPTY_CAPTION, EncoderIdentity, text_key
from simpletuner.errors import DataError, UserError
from simpletuner.log import get_logger

if TYPE_CHECKING:
    from simpletuner.cache.jobs import CacheSummary, LazyCache
    from simpletuner.cache.latents import LatentItem, SourceReader
    from simpletuner.cache.store import TensorStore
    from simpletuner.config.load import Settings
    from simpletuner.data.buckets import BucketAssignment
    from simpletuner.data.records import ImagePlan, SampleRef
    from simpletuner.models.base import Components, ModelFamily
    from simpletuner.train.conditioning import ControlData

logger = get_logger(__name__)


@dataclass
class DatasetData:
    """One image dataset, ready to train: its buckets, captions, latent entries and stores."""

    dataset_id: str
    storage_options: dict[str, Any]
    assignment: BucketAssignment
    captions: dict[int, list[str]]  # record index -> its captions (read once, here)
    latent_items: dict[int, LatentItem]  # record index -> its latent entry (key, source file, plan)
    latent_store: TensorStore
    text_store: TensorStore
    on_demand: LazyCache | None = None  # encodes missing latents when a batch needs them
    reencode_each_epoch: bool = False  # vae_cache_clear_each_epoch with random crops
    encoder: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None  # for epochs after the first
    read_source: SourceReader | None = None  # reads sources that are no files (Hugging Face rows)
    sequential: bool = False  # its source is a stream: read in order, or from the start again
    control: ControlData | None = None  # ControlNet runs: each image's control image (train.conditioning)

    def latent_entry(self, ref: SampleRef) -> dict[str, torch.Tensor]:
        if self.on_demand is None:
            return self.latent_store.get(_latent_item(self, ref).key)
        return self.on_demand.get(self.latent_items[ref.record].work())

    def latent_entries(self, refs: Sequence[SampleRef]) -> list[dict[str, torch.Tensor]]:
        """The latent entries of one batch: from the caches, or encoded now for a later epoch's crops."""
        if not self.reencode_each_epoch or all(ref.epoch == 0 for ref in refs):
            return [self.latent_entry(ref) for ref in refs]
        from simpletuner.cache.jobs import split_batch
        from simpletuner.cache.latents import load_pixels

        assert self.encoder is not None, "ensure_cached sets the encoder of a dataset re-encoded every epoch"
        pixels = [load_pixels(self.source(_latent_item(self, ref).source), self.plan(ref),
                              storage_options=self.storage_options) for ref in refs]
        return split_batch(self.encoder(torch.stack(pixels)), len(refs))

    def source(self, name: str) -> Any:
        """What `load_pixels` reads for a source name: the file itself, or a row's bytes (Hugging Face)."""
        return self.read_source(name) if self.read_source is not None else name

    def plan(self, ref: SampleRef) -> ImagePlan:
        """How the sample's pixels were prepared: its own plan, or its epoch's when re-encoded every epoch."""
        record = _stand_in(self, ref)
        if self.reencode_each_epoch:
            return self.assignment.epoch_plan(record, ref.epoch)
        return self.assignment.plan(record)


@dataclass
class TrainingData:
    """Every dataset of a run plus the text-encoder identity that keys caption entries."""

    datasets: dict[str, DatasetData]
    latent_identity: EncoderIdentity
    text_identity: EncoderIdentity
    scan_report: str

    @classmethod
    def prepare(cls, settings: Settings, family: ModelFamily, components: Components) -> TrainingData:
        """Scan the datasets and key their cache entries; reads sources only, writes only indexes."""
        from simpletuner.cache.latents import latent_items
        from simpletuner.cache.location import storage_options_for
        from simpletuner.commands.scan import scan_settings
        from simpletuner.config.references import latent_cache_for, text_cache_for
        from simpletuner.data.captions import CaptionResolver
        from simpletuner.train.encoders import latent_identity, text_identity

        report = io.StringIO()
        scans = {scan.dataset_id: scan for scan in scan_settings(settings, report)}
        vae_id = latent_identity(family, components, settings.training)
        text_id = text_identity(family, components, settings.training)
        prepared: dict[str, DatasetData] = {}
        partners = {}
        if settings.training.controlnet:
            from simpletuner.train.conditioning import partners_of

            partners = partners_of(settings)
        for dataset in settings.datasets:
            scan = scans.get(dataset.id)
            if dataset.dataset_type != "image" or scan is None or scan.assignment is None:
                continue
            assignment = scan.assignment
            indices = [int(i) for i in assignment.order.tolist()]
            records = [assignment.records[i] for i in indices]
            storage = scan.storage  # for a Hugging Face dataset, its url names the dataset's fingerprint
            items = latent_items(storage.url, records, [assignment.plan(i) for i in indices], vae_id)
            resolver = CaptionResolver.from_config(dataset, storage)
            hf = dataset.type == "huggingface"
            latent_location = latent_cache_for(dataset, settings.training)
            text_location = text_cache_for(dataset, settings.datasets, settings.training).location
            reencode = dataset.vae_cache_clear_each_epoch and _crops_vary(assignment, dataset.id)
            prepared[dataset.id] = DatasetData(
                reencode_each_epoch=reencode,
                dataset_id=dataset.id,
                storage_options=storage_options_for(dataset.location(), dataset if dataset.type == "aws" else None),
                assignment=assignment,
                captions={index: resolver.candidates(record.path) for index, record in zip(indices, records)},
                latent_items=dict(zip(indices, items)),
                latent_store=_open_store(latent_location, dataset),
                text_store=_open_store(text_location, None),
                read_source=storage.source_reader() if hf else None,
                sequential=hf and storage.sequential,
            )
            if dataset.id in partners:
                from simpletuner.train.conditioning import control_data, control_identity

                partner = partners[dataset.id]
                prepared[dataset.id].control = control_data(partner, scans[partner.id], records,
                                                            [assignment.plan(i) for i in indices], indices, settings,
                                                            control_identity(family, vae_id))
        if not prepared:
            raise DataError("no image dataset is enabled: add an entry with dataset_type 'image' to the dataset file")
        return cls(prepared, vae_id, text_id, report.getvalue())

    # ---------------------------------------------------------------- caching
    def ensure_cached(self, family: ModelFamily, components: Components, *, vae_batch_size: int,
                      progress: bool = True, on_demand: bool = False) -> list[CacheSummary]:
        """Encode every latent and caption entry the stores lack (each rank a disjoint part).

        With `on_demand`, latents are left to be encoded (and stored) when a batch first needs them.
        """
        from simpletuner.cache.latents import cache_latents, lazy_latents
        from simpletuner.cache.text import cache_texts

        summaries = []
        for data in self.datasets.values():
            if data.reencode_each_epoch:
                data.encoder = _latent_encoder(family, components)
            if on_demand:
                if data.sequential:
                    raise UserError(f"dataset {data.dataset_id!r} is streamed: its images are read in order, so "
                                    "vae_cache_ondemand (random order) would re-read the stream for every batch; "
                                    "set streaming=false or vae_cache_ondemand=false")
                failed = self._cache_control(data, family, components, vae_batch_size, progress, summaries)
                if failed:
                    self._drop_failed(data, failed)
                data.on_demand = lazy_latents(data.latent_store, _latent_encoder(family, components),
                                              data.storage_options, read_source=data.read_source)
                summaries.append(cache_texts(_all_captions(data), data.text_store,
                                             _text_encoder(family, components), self.text_identity,
                                             progress=progress))
                continue
            # in source order inside each bucket, and a stream read by one thread: one pass per bucket
            items = sorted(data.latent_items.values(), key=lambda item: item.source)
            loaders = {"num_workers": 0} if data.sequential else {}
            summaries.append(cache_latents(items, data.latent_store, _latent_encoder(family, components),
                                           batch_size=vae_batch_size, storage_options=data.storage_options,
                                           read_source=data.read_source, progress=progress, **loaders))
            failed = {failure.key for failure in summaries[-1].failed}
            failed |= self._cache_control(data, family, components, vae_batch_size, progress, summaries)
            if failed:
                self._drop_failed(data, failed)
            summaries.append(cache_texts(_all_captions(data), data.text_store, _text_encoder(family, components),
                                         self.text_identity, progress=progress))
        return summaries

    @staticmethod
    def _cache_control(data: DatasetData, family: ModelFamily, components: Components, batch_size: int,
                       progress: bool, summaries: list[CacheSummary]) -> set[str]:
        """Cache the dataset's control images (ControlNet runs); the latent keys of images whose control image
        failed (reported by the cache job), so that the pair leaves training."""
        if data.control is None:
            return set()
        from simpletuner.train.conditioning import cache_control

        summaries.append(cache_control(data.control, family, components, batch_size=batch_size, progress=progress))
        bad = {failure.key for failure in summaries[-1].failed}
        return {data.latent_items[i].key for i, item in data.control.items.items()
                if item.key in bad and i in data.latent_items}

    def _drop_failed(self, data: DatasetData, failed: set[str]) -> None:
        """Images that failed to encode are reported by the cache job; here they leave training."""
        data.latent_items = {index: item for index, item in data.latent_items.items() if item.key not in failed}
        if not data.latent_items:
            raise DataError(f"dataset {data.dataset_id!r}: every image failed to encode (see the report above)")

    def live_keys(self) -> dict[str, set[str]]:
        """Store location -> every key this configuration reads from it (for `cache prune`)."""
        from simpletuner.cache.text import text_items

        keys: dict[str, set[str]] = {}
        for data in self.datasets.values():
            keys.setdefault(data.latent_store.url, set()).update(item.key for item in data.latent_items.values())
            if data.control is not None:
                keys.setdefault(data.control.store.url, set()).update(item.key for item in data.control.items.values())
            keys.setdefault(data.text_store.url, set()).update(
                item.key for item in text_items(_all_captions(data), self.text_identity))
        return keys

    def stores(self) -> list[TensorStore]:
        return [store for data in self.datasets.values()
                for store in (data.latent_store, data.text_store) + ((data.control.store,) if data.control else ())]

    def close(self) -> None:
        """Commit latents encoded on demand and release the stores."""
        for data in self.datasets.values():
            if data.on_demand is not None:
                data.on_demand.close()
        for store in self.stores():
            store.close()

    # ---------------------------------------------------------------- batches
    def batch(self, refs: Sequence[SampleRef], family: ModelFamily, components: Components,
              caption_rng: random.Random) -> dict[str, Any]:
        """Cached entries of one sampler batch, stacked: latent distribution, text outputs, conditioning."""
        means, stds, texts, conditioning = [], [], [], []
        for ref, entry in zip(refs, self._latent_entries(refs)):
            data = self.datasets[ref.dataset_id]
            means.append(entry["mean"])
            stds.append(entry["std"])
            candidates = data.captions[ref.record]
            caption = candidates[0] if len(candidates) == 1 else caption_rng.choice(candidates)
            texts.append(data.text_store.get(text_key(caption, self.text_identity)))
            conditioning.append(family.sample_conditioning(data.plan(ref)))
            if data.control is not None:
                conditioning[-1] = {**conditioning[-1], **data.control.entry(_stand_in(data, ref))}
        batch: dict[str, Any] = {"latent_mean": torch.stack(means), "latent_std": torch.stack(stds),
                                 "text": _stack_entries(texts)}
        if conditioning and conditioning[0]:
            batch.update(_stack_entries(conditioning))
        return batch

    def _latent_entries(self, refs: Sequence[SampleRef]) -> list[dict[str, torch.Tensor]]:
        """Each ref's latent entry, in order; a dataset's refs are fetched (or encoded) together."""
        entries: list[dict[str, torch.Tensor] | None] = [None] * len(refs)
        for dataset_id in dict.fromkeys(ref.dataset_id for ref in refs):
            positions = [i for i, ref in enumerate(refs) if ref.dataset_id == dataset_id]
            fetched = self.datasets[dataset_id].latent_entries([refs[i] for i in positions])
            for position, entry in zip(positions, fetched):
                entries[position] = entry
        return entries  # type: ignore[return-value]

    def empty_text(self) -> dict[str, torch.Tensor]:
        """Text outputs of the empty caption (batch of one), for caption dropout."""
        store = next(iter(self.datasets.values())).text_store
        entry = store.get(text_key(EMPTY_CAPTION, self.text_identity))
        return {name: tensor.unsqueeze(0) for name, tensor in entry.items()}


def _all_captions(data: DatasetData) -> list[str]:
    return [caption for candidates in data.captions.values() for caption in candidates]


def training_image(data: DatasetData, index: int) -> Any:
    """A training image as it is trained (resized and cropped), as a PIL image."""
    from PIL import Image

    from simpletuner.cache.latents import load_pixels

    item = data.latent_items[index]
    pixels = load_pixels(data.source(item.source), item.plan, storage_options=data.storage_options)
    array = ((pixels.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(array)


def _latent_item(data: DatasetData, ref: SampleRef) -> LatentItem:
    return data.latent_items[_stand_in(data, ref)]


def _stand_in(data: DatasetData, ref: SampleRef) -> int:
    """The ref's record; for an image that failed to encode (reported when caching), a sibling of its bucket."""
    if ref.record in data.latent_items:
        return ref.record
    target = data.assignment.plan(ref.record).target_size
    return next(index for index, item in data.latent_items.items() if item.plan.target_size == target)


def _crops_vary(assignment: BucketAssignment, dataset_id: str) -> bool:
    settings = assignment.settings
    if settings is not None and settings.crops_vary:
        return True
    logger.info("dataset %r: vae_cache_clear_each_epoch: its crops are fixed (crop_style is not random), so every "
                "epoch's latents equal the cached ones; the cache is used", dataset_id)
    return False


def _stack_entries(entries: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([entry[name] for entry in entries]) for name in entries[0]}


def _open_store(location: str, dataset: Any) -> TensorStore:
    from simpletuner.cache.location import storage_options_for
    from simpletuner.cache.store import TensorStore

    return TensorStore(location, storage_options=storage_options_for(location, dataset))


def _latent_encoder(family: ModelFamily, components: Components):
    def encode(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            mean, std = family.encode_images(components, pixels)
        return {"mean": mean.float().cpu(), "std": std.float().cpu()}

    return encode


def _text_encoder(family: ModelFamily, components: Components):
    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            outputs = family.text_outputs(components, captions)
        return {name: tensor.cpu() for name, tensor in outputs.items()}

    return encode
