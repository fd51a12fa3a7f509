"""The scan of a run's datasets: index them and show how they bucket (`simpletuner scan` prints it, and
training starts from it).

Per dataset: files found, usable images, images skipped by reason (with example
paths), captions that are missing, and the bucket table (size, images, batches);
then how paired datasets (conditioning, regularisation) match up. A dataset with
no usable image stops with the reason for every excluded group (exit 2).
The datasets are only read; each index is saved in the cache directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TextIO

if TYPE_CHECKING:
    from simpletuner.config.load import Settings
    from simpletuner.config.schema import DatasetConfig, TrainingConfig
    from simpletuner.data.buckets import BucketAssignment, SkipReport
    from simpletuner.data.index import ScanResult
    from simpletuner.data.hf import HuggingFaceStorage
    from simpletuner.data.storage import DatasetStorage, FileEntry


class ModelFamily(Protocol):
    """What a scan reads of the run's model family (models/base.py's ModelFamily, a floor above data)."""

    alignment: int

    def default_resolution(self, cfg: "TrainingConfig") -> int: ...


EXAMPLES = 3
# index reasons as people read them (buckets' kinds, e.g. "too small", are already words)
REASON_LABELS = {"zero_byte": "empty (0 bytes)", "unreadable": "unreadable", "undecodable": "undecodable",
                 "truncated": "truncated"}


@dataclass
class DatasetScan:
    """What `scan` learned about one dataset."""

    dataset_id: str
    files: list["FileEntry"]  # every file under the location (images and others)
    result: "ScanResult"
    upstream: "SkipReport"  # the index's own skips (unreadable, truncated...)
    storage: "DatasetStorage | HuggingFaceStorage"  # where its images are read from
    assignment: "BucketAssignment | None" = None
    problems: list[str] = field(default_factory=list)
    unreadable_captions: dict[int, str] = field(default_factory=dict)  # record -> why; left out of `assignment`

    def usable_paths(self) -> list[str]:
        """Paths of the images that train: those in a bucket, or every readable one (conditioning datasets)."""
        if self.assignment is None:
            return [record.path for record in self.result.index.records()]
        return [self.assignment.records[i].path for i in self.assignment.order.tolist()]


def scan_settings(settings: "Settings", out: TextIO, family: "ModelFamily") -> list[DatasetScan]:
    """Scan every enabled image/conditioning dataset, print the report to `out`, raise DataError on problems.

    `family` (the run's model family) gives the bucket alignment and default resolution."""
    from simpletuner.errors import DataError

    from simpletuner.data.pairing import find_links

    scans: dict[str, DatasetScan] = {}
    # a ControlNet run trains only the images that have their partner file: conditioning datasets are scanned first
    partners = {link.image: link.partner for link in find_links(settings.datasets)} if settings.training.controlnet \
        else {}
    for dataset in sorted(settings.datasets, key=lambda d: d.dataset_type != "conditioning"):
        if dataset.dataset_type == "text_embeds":
            continue
        partner = scans.get(partners.get(dataset.id, ""))
        scans[dataset.id] = scan_one(dataset, settings.training, out, family, partner)
    scans = {d.id: scans[d.id] for d in settings.datasets if d.id in scans}
    _print_pairings(settings.datasets, scans, out)
    problems = [problem for scan in scans.values() for problem in scan.problems]
    if problems:
        raise DataError("\n".join(problems))
    return list(scans.values())


def scan_one(dataset: "DatasetConfig", training: "TrainingConfig", out: TextIO, family: "ModelFamily",
             partner: DatasetScan | None = None) -> DatasetScan:
    """Scan one dataset; with the `partner` conditioning dataset's scan, images without a partner file are
    skipped (counted, with examples) and pairs whose aspect ratios differ are problems."""
    from simpletuner.data.index import index_location, scan_dataset
    from simpletuner.data.storage import image_extensions, open_source

    storage = open_source(dataset)
    cache = index_location(dataset, training.cache_dir)
    files = storage.list_files()
    extensions = image_extensions()
    # every row of a Hugging Face dataset holds an image (rows have no extension)
    images = files if dataset.type == "huggingface" else [e for e in files if _extension(e.path) in extensions]
    result = scan_dataset(storage, cache, listing=images)
    scan = DatasetScan(dataset.id, files, result, _index_skips(result), storage)
    print(f"dataset {dataset.id!r} ({storage.url if dataset.type == 'huggingface' else dataset.location()})",
          file=out)
    if dataset.type == "huggingface":
        print(f"  rows found:    {len(images)} ({result.read} read, {result.reused} unchanged since the last scan)",
              file=out)
    else:
        print(f"  files found:   {len(images)} images ({result.read} read, {result.reused} unchanged since the last "
              f"scan){_other_files(files, extensions)}", file=out)
    print(f"  index:         {cache.url}", file=out)
    if dataset.dataset_type == "conditioning":
        _print_skips(scan.upstream, out)
        print(f"  usable images: {int(result.index.usable.sum())}", file=out)
        return scan
    records = result.index.records()
    if partner is not None:
        from simpletuner.data.pairing import paired_records

        records, problem = paired_records(records, partner.result.index.records(), dataset.id, partner.dataset_id,
                                          scan.upstream)
        if problem:
            scan.problems.append(problem)
    try:
        scan.assignment = _assign(dataset, training, records, scan.upstream, family)
    except Exception as error:
        from simpletuner.data.buckets import NoUsableImages
        from simpletuner.errors import DataError

        if not isinstance(error, DataError):
            raise
        scan.problems.append(_with_location(str(error), dataset, files, extensions))
        # the planning stage's exclusions (too small, ...) beside the index's own
        _print_skips(_combined(scan.upstream, error.skipped) if isinstance(error, NoUsableImages) else scan.upstream,
                     out)
        print("  usable images: 0", file=out)
        return scan
    every = _combined(scan.upstream, scan.assignment.skipped)
    _leave_out_unreadable_captions(scan, dataset, storage, files, every)
    _print_skips(every, out)
    print(f"  usable images: {len(scan.assignment)}", file=out)
    _warn_upscaled(scan.assignment, out)
    captions, problems = _captions(dataset, storage, scan.usable_paths(), files)
    scan.problems += problems
    for line in captions:
        print(line, file=out)
    _print_buckets(scan.assignment, out)
    return scan


UNREADABLE_CAPTION = "caption unreadable"
UPSCALE_WARNING = 2.0  # images enlarged more than this per side are named in the report


def _leave_out_unreadable_captions(scan: DatasetScan, dataset: "DatasetConfig", storage,
                                   files: list["FileEntry"], every: "SkipReport") -> None:
    """Images whose caption file exists but cannot be opened (permissions, a symlink loop) leave the
    assignment and are counted as skipped with the reason. Local textfile datasets only: one open per file."""
    if dataset.caption_strategy != "textfile" or dataset.only_instance_prompt or not storage.is_local:
        return
    captions = {entry.path[:-4] for entry in files if entry.path.endswith(".txt") and entry.size != 0}
    assignment = scan.assignment
    for record in assignment.order.tolist():
        stem = assignment.records[record].path.rsplit(".", 1)[0]
        if stem not in captions:
            continue
        problem = _unopenable(storage.local_path(stem + ".txt"))
        if problem:
            scan.unreadable_captions[record] = f"caption file {stem}.txt unreadable: {problem}"
            every.add(UNREADABLE_CAPTION, 1, f"{assignment.records[record].path}: {problem}")
    if scan.unreadable_captions:
        scan.assignment, _emptied = assignment.without(scan.unreadable_captions)


def _unopenable(path: str) -> str | None:
    import os

    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # non-blocking: a FIFO must not hang the scan
    except OSError as error:
        return f"{type(error).__name__}: {error.strerror or error}"
    return None


def _warn_upscaled(assignment: "BucketAssignment", out: TextIO) -> None:
    count, examples = assignment.upscaled(UPSCALE_WARNING)
    if count:
        print(f"  warning:       {count} image(s) enlarged more than {UPSCALE_WARNING:g}x per side to fit their "
              f"bucket (e.g. {'; '.join(examples)}); set minimum_image_size to skip small images", file=out)


def _extension(path: str) -> str:
    dot = path.rfind(".")
    return path[dot:].lower() if dot > path.rfind("/") else ""


def _other_files(files: list["FileEntry"], extensions: frozenset[str]) -> str:
    counts: dict[str, int] = {}
    for entry in files:
        extension = _extension(entry.path)
        if extension not in extensions:
            counts[extension or "(none)"] = counts.get(extension or "(none)", 0) + 1
    if not counts:
        return ""
    listed = ", ".join(f"{count} {ext}" for ext, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:6])
    return f"; other files: {listed}"


def _index_skips(result: "ScanResult") -> "SkipReport":
    from simpletuner.data.buckets import SkipReport
    from simpletuner.data.index import skipped_groups

    report = SkipReport(max_examples=EXAMPLES)
    for group in skipped_groups(result.index, examples=EXAMPLES):
        label = REASON_LABELS.get(group.reason, group.reason)
        report.add(label, group.count)
        for example in group.examples:
            report.add(label, 0, example)
    return report


def _combined(first: "SkipReport", second: "SkipReport") -> "SkipReport":
    from simpletuner.data.buckets import SkipReport

    every = SkipReport(max_examples=EXAMPLES)
    every.update(first)
    every.update(second)
    return every


def _print_skips(report: "SkipReport", out: TextIO) -> None:
    if not report.total:
        print("  skipped:       none", file=out)
        return
    print(f"  skipped:       {report.total}", file=out)
    for line in report.lines():
        print(f"    {line}", file=out)


def _alignment(training: "TrainingConfig", family: "ModelFamily") -> int:
    """Bucket sides' multiple: the model family's requirement, or a coarser aspect_bucket_alignment."""
    return max(family.alignment, training.aspect_bucket_alignment or family.alignment)


def _assign(dataset: "DatasetConfig", training: "TrainingConfig", records: list,
            upstream: "SkipReport", family: "ModelFamily") -> "BucketAssignment":
    """The bucket table's source: the usable records planned and grouped by simpletuner.data.buckets."""
    from simpletuner.data.buckets import BucketSettings, assign_buckets

    settings = BucketSettings.from_config(dataset, training, _alignment(training, family),
                                          family.default_resolution(training))
    return assign_buckets(records, settings, training.train_batch_size, seed=training.seed,
                          dataset_id=dataset.id, upstream=upstream)


def _print_buckets(assignment: "BucketAssignment", out: TextIO) -> None:
    rows = assignment.table()
    print(f"  buckets:       {len(rows)} (batch size {assignment.batch_size})", file=out)
    print(f"    {'size':>11}  {'images':>8}  {'batches':>8}", file=out)
    for row in rows:
        size = f"{row.size[0]}x{row.size[1]}"
        print(f"    {size:>11}  {row.images:>8}  {row.batches:>8}", file=out)
    for merge in assignment.merges:
        print(f"    merged {merge.images} image(s) of {merge.source[0]}x{merge.source[1]} into "
              f"{merge.into[0]}x{merge.into[1]} (fewer than a batch)", file=out)


def _with_location(message: str, dataset: "DatasetConfig", files: list["FileEntry"], extensions: frozenset[str]) -> str:
    if dataset.type == "huggingface" or any(_extension(entry.path) in extensions for entry in files):
        return message  # (a Hugging Face dataset's rows are all images)
    return (f"{message}\n  looked in {dataset.location()} for {', '.join(sorted(extensions))} files"
            f"{_other_files(files, extensions) or '; the location holds no files at all'}")


def _captions(dataset: "DatasetConfig", storage, paths: list[str],
              files: list["FileEntry"]) -> tuple[list[str], list[str]]:
    """(report lines, problems) about images without a caption, found without reading every caption file."""
    from simpletuner.data.captions import CaptionResolver, check_captions
    from simpletuner.errors import UserError

    try:
        if dataset.caption_strategy == "textfile" and not dataset.only_instance_prompt:
            texts = {entry.path[:-4] for entry in files if entry.path.endswith(".txt") and entry.size > 0}
            missing = [path for path in paths if path.rsplit(".", 1)[0] not in texts]
            count, shown = len(missing), [f"{path}: no .txt beside it, or an empty one" for path in missing[:EXAMPLES]]
        else:
            report = check_captions(CaptionResolver.from_config(dataset, storage), paths, EXAMPLES)
            count, shown = report.count, report.examples
    except UserError as error:
        return [f"  captions:      {dataset.caption_strategy}; {error}"], [str(error)]
    if not count:
        return [f"  captions:      {dataset.caption_strategy}; every usable image has one"], []
    fallback = dataset.missing_caption == "filename"
    lines = [f"  captions:      {dataset.caption_strategy}; {count} image(s) without a caption"
             f"{' (their file name is used)' if fallback else ''}"] + [f"    {line}" for line in shown]
    if fallback:
        return lines, []
    return lines, [f"dataset {dataset.id!r}: {count} image(s) have no caption, e.g. {shown[0]}; add captions or "
                   f"set missing_caption = 'filename'"]


def _print_pairings(datasets: list["DatasetConfig"], scans: dict[str, DatasetScan], out: TextIO) -> None:
    from simpletuner.data.pairing import find_links, pair_by_path

    for link in find_links(datasets):
        image, partner = scans.get(link.image), scans.get(link.partner)
        if image is None or partner is None:
            continue
        print(pair_by_path(image.usable_paths(), partner.usable_paths()).report(link, EXAMPLES), file=out)
