"""Captions: where each image's text comes from, how it is cleaned, and caption dropout.

Strategies (DatasetConfig.caption_strategy):
- filename: the file name, cleaned as SimpleTuner does (underscores to spaces, no
  extension) and without trailing numbering such as " (3)" or "_01";
- textfile: a .txt beside the image; each non-empty line is one caption, one is
  picked per step;
- parquet / jsonl / csv: a metadata table (DatasetConfig.parquet) mapping file
  names to captions, with a fallback column;
- instanceprompt: instance_prompt for every image.
- huggingface: a Hugging Face dataset's caption_column(s), else its fallback_caption_column.
Then only_instance_prompt / prepend_instance_prompt, then caption_filter_list.

A missing caption raises DataError naming the file, or falls back to the file
name when missing_caption = "filename": never a silent empty string.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from simpletuner.data.storage import DatasetStorage, read_url
from simpletuner.errors import ConfigError, DataError

if TYPE_CHECKING:
    from simpletuner.config.schema import DatasetConfig
    from simpletuner.data.hf import HuggingFaceStorage

_TRAILING_NUMBERING = re.compile(r"(?:\s*\(\d+\)|\s+\d+)+$")
_REGEX_CHARACTERS = set(".^$*+?{}[]\\|()")


# --------------------------------------------------------------------------- filename captions


def caption_from_filename(path: str) -> str:
    """SimpleTuner's file-name caption: underscores to spaces, no extension, no trailing numbering."""
    text = PurePosixPath(path.replace("\\", "/")).stem.replace("_", " ")
    # Midjourney file names carry these tails; SimpleTuner drops them too
    text = text.split("upscaled by")[0].split("upscaled beta")[0]
    text = " ".join(text.split())
    without_number = _TRAILING_NUMBERING.sub("", text).strip()
    return without_number or text


# --------------------------------------------------------------------------- filters


@dataclass(frozen=True)
class CaptionFilter:
    """One caption_filter_list entry: a plain string or a regular expression removed, or `s/x/y/`."""

    source: str
    pattern: re.Pattern[str] | None  # None: plain string
    replacement: str = ""

    def apply(self, caption: str) -> str:
        if self.pattern is None:
            return caption.replace(self.source, self.replacement)
        return self.pattern.sub(self.replacement, caption)


def parse_filter(entry: str, where: str = "caption_filter_list") -> CaptionFilter:
    """`s/x/y/` substitutes regex x by y; text with regex characters is a regex; anything else a plain string."""
    try:
        if entry.startswith("s/") and entry.endswith("/") and entry.count("/") >= 3:
            search, _, replacement = entry[2:-1].partition("/")
            return CaptionFilter(entry, re.compile(search), replacement)
        if _REGEX_CHARACTERS & set(entry):
            return CaptionFilter(entry, re.compile(entry))
    except re.error as error:
        raise ConfigError(f"{where}: {entry!r} is not a valid regular expression ({error}); escape special "
                          f"characters, or write a substitution as s/pattern/replacement/") from error
    return CaptionFilter(entry, None)


def load_filters(spec: str | Sequence[str] | None, dataset_id: str = "?") -> list[CaptionFilter]:
    """Filters from a list of entries, or from a text file (one per line) or a JSON list file."""
    if not spec:
        return []
    where = f"dataset {dataset_id!r} caption_filter_list"
    entries: Iterable[Any]
    if isinstance(spec, str):
        try:
            text = read_url(spec).decode("utf-8-sig")
        except FileNotFoundError as error:
            raise ConfigError(f"{where}: file {spec!r} does not exist (give a list of filters, or a text file "
                              f"with one filter per line)") from error
        entries = json.loads(text) if spec.endswith(".json") else text.splitlines()
        where = f"{where} ({spec})"
    else:
        entries = spec
    return [parse_filter(str(entry), where) for entry in entries if str(entry).strip()]


def apply_filters(caption: str, filters: Sequence[CaptionFilter]) -> str:
    for caption_filter in filters:
        caption = caption_filter.apply(caption)
    return " ".join(caption.split())


def caption_dropout(caption: str, probability: float, rng: random.Random) -> str:
    """The empty caption with `probability`, else `caption` (pure: all randomness comes from `rng`)."""
    return "" if probability > 0 and rng.random() < probability else caption


# --------------------------------------------------------------------------- metadata tables


def _table_rows(data: bytes, kind: str, path: str, columns: list[str]) -> list[dict[str, Any]]:
    if kind == "parquet" or (kind != "csv" and path.endswith(".parquet")):
        try:
            import pyarrow.parquet as pq
        except ImportError as error:
            raise ConfigError(f"{path}: reading parquet needs pyarrow; `pip install pyarrow`") from error
        table = pq.read_table(io.BytesIO(data))
        _check_columns(path, columns, table.column_names)
        return table.select(columns).to_pylist()
    if kind == "csv" or path.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))
    else:
        rows = [json.loads(line) for line in data.decode("utf-8-sig").splitlines() if line.strip()]
    _check_columns(path, columns, rows[0].keys() if rows else columns)
    return rows


def _check_columns(path: str, wanted: list[str], available: Iterable[str]) -> None:
    available = list(available)
    missing = [column for column in wanted if column not in available]
    if missing:
        raise ConfigError(f"{path}: no column {', '.join(map(repr, missing))}; columns are {available}. Set "
                          f"parquet.filename_column / caption_column / fallback_caption_column accordingly.")


def _as_captions(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, (list, tuple)):
        return [text for item in value for text in _as_captions(item)]
    text = str(value).strip()
    return [text] if text else []


def _identifier_keys(identifier: str) -> tuple[str, str]:
    """(relative path without extension, file name without extension) of a path or identifier."""
    relative = identifier.replace("\\", "/").removeprefix("./")
    stem = os.path.splitext(relative)[0]
    return stem, stem.rsplit("/", 1)[-1]


class MetadataCaptions:
    """Captions by image from a parquet / jsonl / csv table (DatasetConfig.parquet)."""

    def __init__(self, by_path: dict[str, list[str]], by_name: dict[str, list[str]], source: str):
        self._by_path, self._by_name, self.source = by_path, by_name, source

    @classmethod
    def load(cls, dataset: "DatasetConfig", storage: DatasetStorage) -> "MetadataCaptions":
        options = dataset.parquet
        assert options is not None
        columns = [options.filename_column, options.caption_column]
        if options.fallback_caption_column:
            columns.append(options.fallback_caption_column)
        data = _read_metadata(options.path, dataset, storage)
        rows = _table_rows(data, dataset.caption_strategy, options.path, columns)
        by_path: dict[str, list[str]] = {}
        by_name: dict[str, list[str]] = {}
        for row in rows:
            identifier = str(row[options.filename_column])
            if not options.identifier_includes_extension:
                identifier += ".x"  # so that a dot inside the name is not taken for an extension
            captions = _as_captions(row.get(options.caption_column))
            if not captions and options.fallback_caption_column:
                captions = _as_captions(row.get(options.fallback_caption_column))
            path_key, name_key = _identifier_keys(identifier)
            by_path[path_key] = captions
            by_name.setdefault(name_key, captions)
        return cls(by_path, by_name, options.path)

    def get(self, image_path: str) -> list[str] | None:
        """Captions of an image (matched by relative path, then by file name), None when it has no row."""
        path_key, name_key = _identifier_keys(image_path)
        found = self._by_path.get(path_key)
        return found if found is not None else self._by_name.get(name_key)


def _read_metadata(path: str, dataset: "DatasetConfig", storage: DatasetStorage) -> bytes:
    """A metadata file: an s3:// URL or absolute path; else relative to the working directory or the dataset."""
    try:
        if path.startswith("s3://") or os.path.isabs(path) or (storage.is_local and os.path.exists(path)):
            return read_url(path, dataset)
        return storage.read_bytes(path)
    except FileNotFoundError as error:
        raise ConfigError(f"dataset {dataset.id!r}: metadata file parquet.path={path!r} not found (looked at it "
                          f"as given and inside {storage.url})") from error


# --------------------------------------------------------------------------- the resolver


class CaptionResolver:
    """Captions of a dataset's images, as configured. `candidates(path)` lists them, `pick` chooses one."""

    def __init__(self, dataset: "DatasetConfig", storage: "DatasetStorage | HuggingFaceStorage",
                 filters: Sequence[CaptionFilter] = (), metadata: MetadataCaptions | None = None):
        self.dataset, self.storage, self.filters, self.metadata = dataset, storage, list(filters), metadata
        if (dataset.only_instance_prompt or dataset.prepend_instance_prompt) and not dataset.instance_prompt:
            option = "only_instance_prompt" if dataset.only_instance_prompt else "prepend_instance_prompt"
            raise ConfigError(f"dataset {dataset.id!r}: {option} needs instance_prompt")

    @classmethod
    def from_config(cls, dataset: "DatasetConfig", storage: "DatasetStorage | HuggingFaceStorage") -> "CaptionResolver":
        metadata = None
        if dataset.caption_strategy in ("parquet", "jsonl", "csv") and not dataset.only_instance_prompt:
            metadata = MetadataCaptions.load(dataset, storage)
        return cls(dataset, storage, load_filters(dataset.caption_filter_list, dataset.id), metadata)

    def _raw(self, path: str) -> tuple[list[str], str]:
        """Captions from the strategy, and why there are none when the list is empty."""
        strategy = self.dataset.caption_strategy
        if strategy == "filename":
            caption = caption_from_filename(path)
            return ([caption] if caption else []), "its file name gives no text"
        if strategy == "instanceprompt":
            return [str(self.dataset.instance_prompt)], ""
        if strategy == "huggingface":  # storage is a HuggingFaceStorage (the schema allows no other)
            spec = self.storage.spec
            columns = " or ".join(repr(c) for c in (*spec.caption_columns, spec.fallback_caption_column) if c)
            return self.storage.captions(path), f"its row has no text in column {columns}"
        if strategy == "textfile":
            text_path = os.path.splitext(path)[0] + ".txt"
            try:
                text = self.storage.read_text(text_path)
            except FileNotFoundError:
                return [], f"no caption file {text_path}"
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            return lines, f"caption file {text_path} is empty"
        assert self.metadata is not None
        found = self.metadata.get(path)
        if found is None:
            return [], f"no row for it in {self.metadata.source}"
        return found, f"its row in {self.metadata.source} has an empty caption"

    def candidates(self, path: str) -> list[str]:
        """Every caption this image may train with (after prefixes and filters); never empty."""
        dataset = self.dataset
        if dataset.only_instance_prompt:
            captions = [str(dataset.instance_prompt)]
        else:
            captions, why = self._raw(path)
            if not captions:
                if dataset.missing_caption != "filename" or not caption_from_filename(path):
                    raise DataError(f"dataset {dataset.id!r}: image {self.storage.url}/{path} has no caption ({why}). "
                                    f"Add one, or set missing_caption = 'filename' to use its file name.")
                captions = [caption_from_filename(path)]
            if dataset.prepend_instance_prompt:
                captions = [f"{dataset.instance_prompt} {caption}" for caption in captions]
        filtered = [apply_filters(caption, self.filters) for caption in captions]
        kept = [caption for caption in filtered if caption]
        if not kept:
            raise DataError(f"dataset {dataset.id!r}: caption_filter_list removes every word of the caption of "
                            f"{path} ({captions[0]!r}); loosen the filters")
        return kept

    def pick(self, path: str, rng: random.Random) -> str:
        """One caption for this step (textfiles with several lines: a seeded random one)."""
        captions = self.candidates(path)
        return captions[0] if len(captions) == 1 else captions[rng.randrange(len(captions))]


@dataclass
class MissingCaptions:
    count: int
    examples: list[str]


def check_captions(resolver: CaptionResolver, paths: Iterable[str], examples: int = 3) -> MissingCaptions:
    """How many of `paths` have no usable caption (a DataError from the resolver), with a few messages."""
    count, shown = 0, []
    for path in paths:
        try:
            resolver.candidates(path)
        except DataError as error:
            count += 1
            if len(shown) < examples:
                shown.append(str(error))
    return MissingCaptions(count, shown)
