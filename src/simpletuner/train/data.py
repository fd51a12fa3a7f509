"""The training side of the data road: scanned datasets -> cached entries -> batches.

`TrainingData.prepare` scans every image dataset (`data/scan.py`: the index and buckets
`simpletuner scan` prints), resolves captions, and keys each image's latent entry and
each caption's text entry with the family's encoder identities. `ensure_cached`
encodes what the stores lack; `batch` turns a sampler batch into the tensors a
training step needs.

A dataset with vae_cache_clear_each_epoch and random crops trains epoch 0 from the
cache; in every later epoch each image's crop position is drawn again for that epoch
(`BucketAssignment.epoch_plan`) and its latent is encoded when its batch needs it,
never stored (a cache cleared every epoch holds nothing a later epoch reads).
Without random crops every epoch's latents are the cached ones, so the cache serves.
An image that fails to load for a later epoch is left out like any other failure.

In a ControlNet run each image's control entry (train.conditioning) is cached with it and read through
the same kind of checked reader; an image whose control image fails is left out and reported the same way.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from simpletuner.cache.keys import EMPTY_CAPTION, EncoderIdentity
from simpletuner.errors import DataError, UserError
from simpletuner.log import get_logger

if TYPE_CHECKING:
    from simpletuner.cache.jobs import CacheSummary, Failure, LazyCache
    from simpletuner.cache.latents import LatentItem, SourceReader
    from simpletuner.cache.masks import MaskItem
    from simpletuner.cache.text import LazyTexts
    from simpletuner.cache.store import TensorStore
    from simpletuner.config.load import Settings
    from simpletuner.data.buckets import BucketAssignment
    from simpletuner.data.records import ImagePlan, SampleRef
    from simpletuner.models.base import Components, ModelFamily
    from simpletuner.train.conditioning import ControlData

logger = get_logger(__name__)


@dataclass(frozen=True)
class SkippedEntry:
    """An image left out of this run, and why (one line of output_dir/skipped.jsonl)."""

    dataset: str
    path: str
    stage: str  # "scan" (the index could not use the file), "caption" (its caption file could not be read),
    #             "cache" (loading or encoding failed), "train" (the same, on demand)
    reason: str


@dataclass
class DatasetData:
    """One image dataset, ready to train: its buckets, captions, latent entries and stores.

    An image that cannot be used (caption unreadable, decode or read failure when caching)
    leaves `assignment`, `captions` and `latent_items` before the sampler is built; with
    on-demand caching, or when a later epoch's crop is encoded again, one that fails during
    training joins `failed` and leaves every later batch. Nothing ever stands in for it.
    """

    dataset_id: str
    storage_options: dict[str, Any]
    assignment: BucketAssignment
    captions: dict[int, list[str]]  # record index -> its captions (read once, here)
    latent_items: dict[int, LatentItem]  # record index -> its latent entry (key, source file, plan)
    latent_store: TensorStore
    text_store: TensorStore
    latents: LazyCache | None = None  # reads latents; encodes missing (on demand) or corrupt ones
    texts: LazyTexts | None = None  # reads text entries; encodes corrupt ones again
    failed: set[int] = field(default_factory=set)  # records that failed during training
    reencode_each_epoch: bool = False  # vae_cache_clear_each_epoch with random crops
    encoder: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None  # for epochs after the first
    read_source: SourceReader | None = None  # reads sources that are no files (Hugging Face rows)
    sequential: bool = False  # its source is a stream: read in order, or from the start again
    control: ControlData | None = None  # ControlNet runs: each image's control image (train.conditioning)
    masks: dict[int, MaskItem] = field(default_factory=dict)  # record index -> its loss mask (masked loss)
    regularisation: bool = False  # is_regularisation_data: the base model's predictions are the targets
    class_images: bool = False  # is_class_data: DreamBooth class images, their loss weighted by prior_loss_weight
    epoch_failures: dict[str, Failure] = field(default_factory=dict)  # key -> why a later epoch's load failed

    def latent_entries(self, refs: Sequence[SampleRef]) -> list[dict[str, torch.Tensor] | None]:
        """Each sample's own latent entry (None where its image failed to load): read from the cache,
        or, for a later epoch's redrawn crop, encoded now (not stored)."""
        assert self.latents is not None, "ensure_cached() opens the latent reader"
        entries: list[dict[str, torch.Tensor] | None] = [None] * len(refs)
        later = [i for i, ref in enumerate(refs) if self.reencode_each_epoch and ref.epoch != 0]
        cached = [i for i, ref in enumerate(refs) if not (self.reencode_each_epoch and ref.epoch != 0)]
        for i, entry in zip(cached, self.latents.get_many([self.latent_items[refs[i].record].work() for i in cached])):
            entries[i] = entry
        for i, entry in zip(later, self._encode_epoch([refs[i] for i in later])):
            entries[i] = entry
        return entries

    def _encode_epoch(self, refs: Sequence[SampleRef]) -> list[dict[str, torch.Tensor] | None]:
        """Latents of the refs' epoch crops, encoded together; None (and a recorded failure) where loading fails."""
        from simpletuner.cache.jobs import Failure, split_batch
        from simpletuner.cache.latents import load_pixels
        from simpletuner.data.storage import is_transient

        if not refs:
            return []
        assert self.encoder is not None, "ensure_cached sets the encoder of a dataset re-encoded every epoch"
        loaded, pixels = [], []
        for position, ref in enumerate(refs):
            item = self.latent_items[ref.record]
            try:
                pixels.append(load_pixels(self.source(item.source), self.plan(ref),
                                          storage_options=self.storage_options))
                loaded.append(position)
            except Exception as error:  # noqa: BLE001 - a sample that fails to load is left out, not fatal
                self.epoch_failures[item.key] = Failure(item.key, item.source, f"{type(error).__name__}: {error}",
                                                        is_transient(error))
                logger.warning("skipping %s: %s", item.source, error)
        entries: list[dict[str, torch.Tensor] | None] = [None] * len(refs)
        if loaded:
            for position, entry in zip(loaded, split_batch(self.encoder(torch.stack(pixels)), len(loaded))):
                entries[position] = entry
        return entries

    def failure(self, ref: SampleRef) -> Failure:
        """Why the ref's latent entry could not be had (after `latent_entries` gave None for it)."""
        key = self.latent_items[ref.record].key
        assert self.latents is not None, "ensure_cached() opens the latent reader"
        if key in self.latents.failed or key in self.epoch_failures:
            return self.latents.failed.get(key) or self.epoch_failures[key]
        assert self.control is not None and self.control.reader is not None, "only a control entry fails otherwise"
        failure = self.control.reader.failed[self.control.items[ref.record].key]
        return replace(failure, reason=f"control image: {failure.reason}")

    def source(self, name: str) -> Any:
        """What `load_pixels` reads for a source name: the file itself, or a row's bytes (Hugging Face)."""
        return self.read_source(name) if self.read_source is not None else name

    def plan(self, ref: SampleRef) -> ImagePlan:
        """How the sample's pixels are prepared: its own plan, or its epoch's when re-encoded every epoch."""
        if self.reencode_each_epoch:
            return self.assignment.epoch_plan(ref.record, ref.epoch)
        return self.assignment.plan(ref.record)


@dataclass
class TrainingData:
    """Every dataset of a run plus the text-encoder identity that keys caption entries."""

    datasets: dict[str, DatasetData]
    latent_identity: EncoderIdentity
    text_identity: EncoderIdentity
    scan_report: str
    skipped: list[SkippedEntry] = field(default_factory=list)
    report_path: str | None = None  # where skipped entries are appended (see `open_report`)
    mask_probability: float = 1.0  # masked_loss_probability: the chance that a sample's mask is applied
    _writes_shared: bool = True

    @classmethod
    def prepare(cls, settings: Settings, family: ModelFamily, components: Components) -> TrainingData:
        """Scan the datasets and key their cache entries; reads sources only, writes only indexes."""
        from simpletuner.cache.latents import latent_items
        from simpletuner.cache.location import storage_options_for
        from simpletuner.config.references import latent_cache_for, text_cache_for
        from simpletuner.data.captions import CaptionResolver
        from simpletuner.data.index import skipped_rows
        from simpletuner.data.scan import scan_settings
        from simpletuner.train.encoders import latent_identity, text_identity

        report = io.StringIO()
        scans = {scan.dataset_id: scan for scan in scan_settings(settings, report, family)}
        vae_id = latent_identity(family, components, settings.training)
        text_id = text_identity(family, components, settings.training)
        prepared: dict[str, DatasetData] = {}
        partners = {}
        if settings.training.controlnet:
            from simpletuner.train.conditioning import partners_of

            partners = partners_of(settings)
        skipped: list[SkippedEntry] = []
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
            skipped += [SkippedEntry(dataset.id, path, "scan", reason)
                        for path, reason in skipped_rows(scan.result.index)]
            skipped += [SkippedEntry(dataset.id, scan.assignment.records[record].path, "caption", reason)
                        for record, reason in scan.unreadable_captions.items()]
            captions, unreadable = _read_captions(resolver, indices, records)
            latent_location = latent_cache_for(dataset, settings.training)
            text_location = text_cache_for(dataset, settings.datasets, settings.training).location
            data = DatasetData(
                reencode_each_epoch=dataset.vae_cache_clear_each_epoch and _crops_vary(assignment, dataset.id),
                dataset_id=dataset.id,
                storage_options=storage_options_for(dataset.location(), dataset if dataset.type == "aws" else None),
                assignment=assignment,
                captions=captions,
                latent_items=dict(zip(indices, items)),
                latent_store=_open_store(latent_location, dataset),
                text_store=_open_store(text_location, None),
                read_source=storage.source_reader() if hf else None,
                sequential=hf and storage.sequential,
                regularisation=dataset.is_regularisation_data,
                class_images=dataset.is_class_data,
            )
            if dataset.id in partners:
                from simpletuner.train.conditioning import control_data, control_identity

                partner = partners[dataset.id]
                data.control = control_data(partner, scans[partner.id], records, [assignment.plan(i) for i in indices],
                                            indices, settings, control_identity(family, vae_id))
            skipped += _drop(data, {index: ("caption", reason) for index, reason in unreadable.items()})
            _check_left(data, None)
            prepared[dataset.id] = data
        _attach_masks(settings, scans, prepared, family.vae_scale_factor(components))
        if not prepared:
            raise DataError("no image dataset is enabled: add an entry with dataset_type 'image' to the dataset file")
        return cls(prepared, vae_id, text_id, report.getvalue(), skipped,
                   mask_probability=settings.training.masked_loss_probability)

    # ---------------------------------------------------------------- the run's report
    def open_report(self, path: str, start: bool = True) -> None:
        """Report skipped images at `path` (JSON lines); `start` (one process) writes it anew with those so far.

        Skips before training are the same on every rank: only the process that started the report
        writes them. Skips during training (on demand) are appended by the rank that met them.
        """
        self.report_path, self._writes_shared = path, start
        if start:
            self._write_report("w", self.skipped)

    def _skip(self, entries: list[SkippedEntry], shared: bool) -> None:
        self.skipped += entries
        if self.report_path is not None and entries and (self._writes_shared or not shared):
            self._write_report("a", entries)

    def _write_report(self, mode: str, entries: Sequence[SkippedEntry]) -> None:
        """Write or append lines; a failure (e.g. a full disk) is a warning, and the run goes on without them."""
        try:
            with open(self.report_path, mode, encoding="utf-8") as handle:
                handle.writelines(_jsonl(entries))
        except OSError as error:
            logger.warning("could not write the report of skipped images %s: %s", self.report_path, error)

    # ---------------------------------------------------------------- caching
    def ensure_cached(self, family: ModelFamily, components: Components, *, vae_batch_size: int,
                      progress: bool = True, on_demand: bool = False) -> list[CacheSummary]:
        """Encode every latent and caption entry the stores lack (each rank a disjoint part).

        With `on_demand`, latents are left to be encoded (and stored) when a batch first needs them.
        """
        from simpletuner.cache.latents import cache_latents, lazy_latents
        from simpletuner.cache.text import cache_texts, lazy_texts

        summaries = []
        for data in self.datasets.values():
            if on_demand and data.sequential:
                raise UserError(f"dataset {data.dataset_id!r} is streamed: its images are read in order, so "
                                "vae_cache_ondemand (random order) would re-read the stream for every batch; "
                                "set streaming=false or vae_cache_ondemand=false")
            if data.reencode_each_epoch:
                data.encoder = _latent_encoder(family, components)
            data.latents = lazy_latents(data.latent_store, _latent_encoder(family, components), data.storage_options,
                                        read_source=data.read_source)
            data.texts = lazy_texts(data.text_store, _text_encoder(family, components), self.text_identity)
            if not on_demand:
                # in source order inside each bucket, and a stream read by one thread: one pass per bucket
                items = sorted(data.latent_items.values(), key=lambda item: item.source)
                loaders = {"num_workers": 0} if data.sequential else {}
                summaries.append(cache_latents(items, data.latent_store, _latent_encoder(family, components),
                                               batch_size=vae_batch_size, storage_options=data.storage_options,
                                               read_source=data.read_source, progress=progress, **loaders))
                failures = summaries[-1].failed
                self._skip(_drop(data, _not_cached(data, failures)), shared=True)
                if not data.latent_items and failures and all(failure.transient for failure in failures):
                    raise DataError(f"dataset {data.dataset_id!r}: cannot read any image, e.g. {failures[0].source} "
                                    f"({failures[0].reason}), after retries: the storage looks unreachable. "
                                    "Check it (endpoint, network), then run again")
                _check_left(data, self.report_path)
            summaries += self._cache_control(data, family, components, vae_batch_size, progress)
            summaries.append(cache_texts(_all_captions(data), data.text_store, _text_encoder(family, components),
                                         self.text_identity, progress=progress))
            summaries += self._cache_masks(data, progress)
        return summaries

    def _cache_control(self, data: DatasetData, family: ModelFamily, components: Components, batch_size: int,
                       progress: bool) -> list[CacheSummary]:
        """Cache the dataset's control images (ControlNet runs) and open their checked reader; an image whose
        control image cannot be prepared leaves training and is reported, like an image that failed."""
        if data.control is None:
            return []
        from simpletuner.train.conditioning import cache_control, control_encoder, control_reader

        summary = cache_control(data.control, family, components, batch_size=batch_size, progress=progress)
        reasons = {failure.key: failure.reason for failure in summary.failed}
        present = dict(zip(data.control.items, data.control.store.contains_many(
            [item.key for item in data.control.items.values()])))
        lost = {index: ("cache", f"control image: {reasons.get(item.key, 'not in the cache after encoding')}")
                for index, item in data.control.items.items() if index in data.latent_items and not present[index]}
        if lost:
            self._skip(_drop(data, lost), shared=True)
            _check_left(data, self.report_path)
        data.control.reader = control_reader(data.control, control_encoder(family, components))
        return [summary]

    def _cache_masks(self, data: DatasetData, progress: bool) -> list[CacheSummary]:
        """Cache the dataset's loss masks; an image whose mask cannot be read leaves training (reported)."""
        from simpletuner.cache.masks import cache_masks

        if not data.masks:
            return []
        summary = cache_masks(list(data.masks.values()), data.latent_store, data.storage_options, progress=progress)
        reasons = {failure.key: failure.reason for failure in summary.failed}
        lost = {index: ("cache", f"loss mask: {reasons[item.key]}") for index, item in data.masks.items()
                if item.key in reasons}
        if lost:
            for index in lost:
                data.masks.pop(index)
            self._skip(_drop(data, lost), shared=True)
            _check_left(data, self.report_path)
        return [summary]

    def live_keys(self) -> dict[str, set[str]]:
        """Store location -> every key this configuration reads from it (for `cache prune`)."""
        from simpletuner.cache.text import text_items

        keys: dict[str, set[str]] = {}
        for data in self.datasets.values():
            keys.setdefault(data.latent_store.url, set()).update(item.key for item in data.latent_items.values())
            keys[data.latent_store.url].update(item.key for item in data.masks.values())
            if data.control is not None:
                keys.setdefault(data.control.store.url, set()).update(item.key for item in data.control.items.values())
            keys.setdefault(data.text_store.url, set()).update(
                item.key for item in text_items(_all_captions(data), self.text_identity))
        return keys

    def stores(self) -> list[TensorStore]:
        return [store for data in self.datasets.values()
                for store in (data.latent_store, data.text_store) + ((data.control.store,) if data.control else ())]

    def close(self) -> None:
        """Commit entries encoded during training (on demand, or again for corrupt ones) and release the stores."""
        for data in self.datasets.values():
            for reader in (data.latents, data.texts, data.control.reader if data.control else None):
                if reader is not None:
                    reader.close()
        for store in self.stores():
            store.close()

    # ---------------------------------------------------------------- batches
    def batch(self, refs: Sequence[SampleRef], family: ModelFamily, components: Components,
              caption_rng: random.Random, refill: Iterator[Sequence[SampleRef]] | None = None) -> dict[str, Any]:
        """Cached entries of one sampler batch, stacked: latent distribution, text outputs, conditioning,
        the chosen captions, and where the datasets ask for them regularisation and class-image flags and loss
        masks.

        A sample whose image fails to load (on-demand caching) is left out of the batch and
        reported; when every sample of a batch fails, the next one is drawn from `refill`.
        """
        usable, entries = self.entries(refs)
        while not usable:
            if refill is None or all(len(d.failed) >= len(d.latent_items) for d in self.datasets.values()):
                raise DataError(f"every image of a batch failed to load ({', '.join(r.path for r in refs)}); "
                                f"see {self.report_path or 'the warnings above'}")
            refs = next(refill)
            usable, entries = self.entries(refs)
        texts, conditioning, chosen = [], [], []
        for ref, entry in zip(usable, entries):
            data = self.datasets[ref.dataset_id]
            assert data.texts is not None, "ensure_cached() opens the text reader"
            chosen.append(_pick(data.captions[ref.record], caption_rng))
            texts += data.texts.embeddings([chosen[-1]])
            # ControlNet runs: the control entry, read with the latent (entries)
            conditioning.append({**family.sample_conditioning(data.plan(ref)), **_control_part(entry)})
        batch: dict[str, Any] = {"latent_mean": torch.stack([e["mean"] for e in entries]),
                                 "latent_std": torch.stack([e["std"] for e in entries]),
                                 "text": _stack_entries(texts), "captions": chosen}
        if conditioning and conditioning[0]:
            batch.update(_stack_entries(conditioning))
        if any(self.datasets[ref.dataset_id].regularisation for ref in usable):
            batch["regularisation"] = [self.datasets[ref.dataset_id].regularisation for ref in usable]
        if any(self.datasets[ref.dataset_id].class_images for ref in usable):
            batch["class_data"] = [self.datasets[ref.dataset_id].class_images for ref in usable]
        if any(self.datasets[ref.dataset_id].masks for ref in usable):
            batch["loss_mask"] = self._masks(usable, batch["latent_mean"], caption_rng)
        return batch

    def _masks(self, refs: Sequence[SampleRef], means: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """[B, 1, h, w] loss weights of a batch (masked loss); 1 where an image has no mask, or where its mask
        is left out this time (masked_loss_probability, one draw from `rng` per sample)."""
        from simpletuner.train.masks import batch_masks

        entries = []
        for ref in refs:
            data = self.datasets[ref.dataset_id]
            item = data.masks.get(ref.record)
            entries.append(None if item is None else data.latent_store.get(item.key))
        if self.mask_probability < 1:
            entries = [entry if rng.random() < self.mask_probability else None for entry in entries]
        return batch_masks(entries, means)

    def entries(self, refs: Sequence[SampleRef]) -> tuple[list[SampleRef], list[dict[str, torch.Tensor]]]:
        """The refs whose own latent entry (and, in a ControlNet run, own control entry) is available, and those
        entries (a ControlNet run's joined with the control entry's tensors); failures are reported.

        Raises DataError when every image of the batch failed with a connection or service error
        (after the retry policy): the storage is unreachable, and skipping on would skip everything.
        """
        usable, entries = [], []
        failures: dict[tuple[str, int], Failure] = {}
        for dataset_id in dict.fromkeys(ref.dataset_id for ref in refs):
            data = self.datasets[dataset_id]
            mine = [ref for ref in refs if ref.dataset_id == dataset_id and ref.record not in data.failed]
            for ref, entry in zip(mine, _with_control(data, mine, data.latent_entries(mine))):
                if entry is not None:
                    usable.append(ref)
                    entries.append(entry)
                else:
                    failures[(dataset_id, ref.record)] = data.failure(ref)
        for (dataset_id, record), failure in failures.items():
            self.datasets[dataset_id].failed.add(record)
        paths = {(ref.dataset_id, ref.record): ref.path for ref in refs}
        self._skip([SkippedEntry(dataset_id, paths[(dataset_id, record)], "train", failure.reason)
                    for (dataset_id, record), failure in failures.items()], shared=False)
        if not usable and failures and all(failure.transient for failure in failures.values()):
            example = next(iter(failures.values()))
            raise DataError(f"cannot read any image of a batch, e.g. {example.source} ({example.reason}), after "
                            "retries: the storage looks unreachable. Check it (endpoint, network), then resume "
                            "with --resume_from_checkpoint latest")
        return usable, entries

    def empty_text(self) -> dict[str, torch.Tensor]:
        """Text outputs of the empty caption (batch of one), for caption dropout."""
        texts = next(iter(self.datasets.values())).texts
        assert texts is not None, "ensure_cached() opens the text reader"
        (entry,) = texts.embeddings([EMPTY_CAPTION])
        return {name: tensor.unsqueeze(0) for name, tensor in entry.items()}


def _attach_masks(settings: Settings, scans: dict[str, Any], prepared: dict[str, DatasetData], scale: int) -> None:
    from simpletuner.train.masks import mask_items_for, mask_partners

    for image_id, partner in mask_partners(settings.datasets).items():
        if image_id in prepared and partner.id in scans:
            data = prepared[image_id]
            data.masks = mask_items_for(scans[image_id], scans[partner.id], data.latent_items, scale)


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


def _pick(candidates: list[str], rng: random.Random) -> str:
    return candidates[0] if len(candidates) == 1 else rng.choice(candidates)


def _read_captions(resolver: Any, indices: list[int], records: list[Any]) -> tuple[dict[int, list[str]],
                                                                                  dict[int, str]]:
    """Each record's captions, and {record: reason} for those whose caption file cannot be read."""
    captions, unreadable = {}, {}
    for index, record in zip(indices, records):
        try:
            captions[index] = resolver.candidates(record.path)
        except OSError as error:
            unreadable[index] = f"caption file unreadable: {type(error).__name__}: {error.strerror or error}"
            logger.warning("skipping %s: its %s", record.path, unreadable[index])
    return captions, unreadable


def _not_cached(data: DatasetData, failures: Sequence[Failure]) -> dict[int, tuple[str, str]]:
    """{record: ("cache", reason)} for images whose latent is not in the store after caching.

    Read from the store (which every rank sees whole after the job), so all ranks drop the
    same images; reasons come from this rank's failures, then from those other ranks recorded.
    """
    keys = [item.key for item in data.latent_items.values()]
    present = data.latent_store.contains_many(keys)
    if present.all():
        return {}
    reasons = {failure.key: failure.reason for failure in failures}
    if len(reasons) < int((~present).sum()):
        recorded = {entry.get("key"): entry.get("reason", "") for entry in data.latent_store.failures()}
        reasons = {**recorded, **reasons}
    return {index: ("cache", reasons.get(item.key, "not in the cache after encoding"))
            for (index, item), hit in zip(data.latent_items.items(), present) if not hit}


def _with_control(data: DatasetData, refs: Sequence[SampleRef],
                  latents: Sequence[dict[str, torch.Tensor] | None]) -> list[dict[str, torch.Tensor] | None]:
    """ControlNet runs: each latent entry joined with its control entry, read through the control reader's checks
    (CRC, a corrupt entry encoded again); None where either failed, so that the sample leaves training."""
    if data.control is None:
        return list(latents)
    assert data.control.reader is not None, "ensure_cached() opens the control reader"
    wanted = [i for i, entry in enumerate(latents) if entry is not None]
    controls = data.control.reader.get_many([data.control.items[refs[i].record].work() for i in wanted])
    joined: list[dict[str, torch.Tensor] | None] = [None] * len(latents)
    for i, control in zip(wanted, controls):
        if control is not None:
            joined[i] = {**latents[i], **control}
    return joined


def _control_part(entry: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The control entry's tensors in an entry from `_with_control` (none for a sample without one)."""
    return {name: tensor for name, tensor in entry.items() if name not in ("mean", "std")}


def _drop(data: DatasetData, records: dict[int, tuple[str, str]]) -> list[SkippedEntry]:
    """Take these records ({record: (stage, reason)}) out of the dataset; say which buckets this empties."""
    if not records:
        return []
    data.assignment, emptied = data.assignment.without(records)
    for index in records:
        data.latent_items.pop(index, None)
        data.captions.pop(index, None)
        if data.control is not None:
            data.control.items.pop(index, None)
    for width, height in emptied:
        logger.warning("dataset %r: bucket %dx%d has no image left (every one failed): dropped",
                       data.dataset_id, width, height)
    logger.warning("dataset %r: %d image(s) left out of training (see the report of skipped images)",
                   data.dataset_id, len(records))
    return [SkippedEntry(data.dataset_id, data.assignment.records[index].path, stage, reason)
            for index, (stage, reason) in records.items()]


def _crops_vary(assignment: BucketAssignment, dataset_id: str) -> bool:
    settings = assignment.settings
    if settings is not None and settings.crops_vary:
        return True
    logger.info("dataset %r: vae_cache_clear_each_epoch: its crops are fixed (crop_style is not random), so every "
                "epoch's latents equal the cached ones; the cache is used", dataset_id)
    return False


def _check_left(data: DatasetData, report_path: str | None) -> None:
    if not data.latent_items:
        listed = f"; listed in {report_path}" if report_path else ""
        raise DataError(f"dataset {data.dataset_id!r}: no image is left to train on: every one failed "
                        f"(reasons above{listed})")


def _jsonl(entries: Sequence[SkippedEntry]) -> list[str]:
    return [json.dumps(asdict(entry)) + "\n" for entry in entries]


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
