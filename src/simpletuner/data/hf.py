"""Hugging Face datasets as a dataset source: every row of a split is one image.

A row is read like a file named `row-000123` (zero-padded to the same width, at least six digits, so
names sort in row order), through
the read-only interface of `DatasetStorage`: the index reads each row's image header, captions
come from the caption columns, and the location that cache keys hash names the dataset's
fingerprint, so a changed dataset never reuses stale entries. The `datasets` library loads it:

- a folder written by `save_to_disk`: `load_from_disk` (streaming does not apply: its rows are
  memory-mapped);
- anything else (a Hub id, a folder of parquet files or of images): `load_dataset(dataset_name,
  dataset_config, split=, revision=, streaming=, cache_dir=)`.

Images are read undecoded (an Image feature's bytes, or the file its path names, or a binary
column), so a row whose image is broken is reported by the index like a broken file, under its
row name. With streaming, rows come from a stream read in order; asking for a row before the
current one starts the stream again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Callable, Iterable, Iterator

from simpletuner.data.storage import FileEntry
from simpletuner.errors import DataError, UserError
from simpletuner.log import get_logger

if TYPE_CHECKING:
    import pyarrow as pa
    from PIL import Image

    from simpletuner.config.schema import DatasetConfig

logger = get_logger(__name__)

ROW_PREFIX = "row-"
BATCH_ROWS = 256  # rows per Arrow batch while listing or streaming
RECENT_ROWS = 64  # streamed rows kept, so reads a little out of order do not restart the stream


@dataclass(frozen=True)
class HubSpec:
    """What to load: the entry's top-level keys, else its `huggingface` block, else the defaults."""

    dataset_id: str
    dataset_name: str
    dataset_config: str | None = None
    split: str = "train"
    revision: str | None = None
    image_column: str = "image"
    caption_columns: tuple[str, ...] = ("caption",)
    fallback_caption_column: str | None = None
    streaming: bool = False
    cache_dir: str | None = None

    @classmethod
    def from_config(cls, dataset: "DatasetConfig") -> "HubSpec":
        block = dataset.huggingface

        def pick(name: str, default: Any = None) -> Any:
            value = getattr(dataset, name)
            if value is None and block is not None:
                value = getattr(block, name)
            return default if value is None else value

        captions = pick("caption_column", "caption")
        cache_dir = block.cache_dir if block is not None and block.cache_dir else None
        if cache_dir is None and dataset.cache_dir and "://" not in dataset.cache_dir:
            cache_dir = dataset.cache_dir  # SimpleTuner's fallback: the entry's own cache folder
        return cls(dataset.id, pick("dataset_name"), pick("dataset_config"), pick("split", "train"),
                   pick("revision"), pick("image_column", "image"),
                   tuple(captions) if isinstance(captions, list) else (captions,),
                   pick("fallback_caption_column"), bool(pick("streaming", False)), cache_dir)

    def describe(self) -> str:
        """e.g. `user/name[train]` or `user/name[config:train]`."""
        part = f"{self.dataset_config}:{self.split}" if self.dataset_config else self.split
        return f"{self.dataset_name}[{part}]"


def row_name(row: int, rows: int) -> str:
    """The name of `row` among `rows`: zero-padded to one width (at least six digits), so names sort in row order."""
    return f"{ROW_PREFIX}{row:0{max(6, len(str(rows - 1)))}d}"


def row_number(name: str) -> int:
    """The row of a name such as `row-000123` (FileNotFoundError for any other name)."""
    digits = name.rsplit("/", 1)[-1].removeprefix(ROW_PREFIX)
    if not name.rsplit("/", 1)[-1].startswith(ROW_PREFIX) or not digits.isdigit():
        raise FileNotFoundError(f"{name!r} is not a row of a Hugging Face dataset (rows are named row-000000, ...)")
    return int(digits)


# --------------------------------------------------------------------------- cell values


def image_bytes(value: Any, column: str) -> bytes:
    """The encoded image of one cell: an Image feature's bytes or the file its path names, or raw bytes."""
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            import fsspec

            with fsspec.open(value["path"], "rb") as handle:
                return handle.read()
        return b""
    raise DataError(f"column {column!r} holds {type(value).__name__} values, not images; set image_column")


def caption_values(value: Any) -> list[str]:
    """The non-empty captions of one cell (a string, or a list of them)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [text for item in value for text in caption_values(item)]
    text = str(value).strip()
    return [text] if text else []


def _image_sizes(column: "pa.ChunkedArray") -> list[int]:
    """Byte length of each cell's image without copying the bytes (paths are stat'ed)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = column.combine_chunks()
    if pa.types.is_struct(column.type):
        sizes = pc.binary_length(pc.struct_field(column, "bytes")).to_pylist()
        paths = pc.struct_field(column, "path").to_pylist()
        return [size if size else _path_size(path) for size, path in zip(sizes, paths)]
    return [size or 0 for size in pc.binary_length(column).to_pylist()]


def _path_size(path: str | None) -> int:
    if not path:
        return 0
    import fsspec

    fs, inner = fsspec.core.url_to_fs(path)
    try:
        return int(fs.size(inner) or 0)
    except FileNotFoundError:
        return -1  # listed, so the index reports it as unreadable


# --------------------------------------------------------------------------- row sources


@dataclass
class Listing:
    """Every row's image size (bytes) and candidate captions."""

    sizes: list[int]
    captions: list[list[str]]


class _RowsBase(ABC):
    """Reading one split: its identity, a listing, and one row's image."""

    fingerprint: str
    sequential: bool

    def __init__(self, spec: HubSpec):
        self.spec = spec

    def _caption_columns(self, names: Iterable[str]) -> list[str]:
        wanted = [*self.spec.caption_columns]
        if self.spec.fallback_caption_column:
            wanted.append(self.spec.fallback_caption_column)
        return [column for column in wanted if column in names]

    def _list_table(self, table: "pa.Table", listing: Listing) -> None:
        listing.sizes += _image_sizes(table.column(self.spec.image_column))
        columns = {name: table.column(name).to_pylist() for name in self._caption_columns(table.column_names)}
        for row in range(table.num_rows):
            found = [text for name in self.spec.caption_columns if name in columns
                     for text in caption_values(columns[name][row])]
            fallback = self.spec.fallback_caption_column
            if not found and fallback in columns:
                found = caption_values(columns[fallback][row])
            listing.captions.append(found)

    @abstractmethod
    def listing(self) -> Listing:
        """Every row's image size and captions (one pass over the rows)."""

    @abstractmethod
    def image(self, row: int) -> bytes:
        """The encoded image of one row (b"" when it has none)."""


class RandomRows(_RowsBase):
    """A `datasets.Dataset` (Arrow files, memory-mapped): any row at any time."""

    sequential = False

    def __init__(self, spec: HubSpec, dataset: Any):
        super().__init__(spec)
        _check_columns(spec, dataset.column_names, dataset.features)
        self.fingerprint = str(dataset._fingerprint)  # the library's content/recipe hash of this split
        self._arrow = dataset.with_format("arrow")
        self._count = len(dataset)

    def listing(self) -> Listing:
        listing = Listing([], [])
        columns = [self.spec.image_column, *self._caption_columns(self._arrow.column_names)]
        narrow = self._arrow.select_columns(list(dict.fromkeys(columns)))
        for start in range(0, self._count, BATCH_ROWS):
            self._list_table(narrow[start:start + BATCH_ROWS], listing)
        return listing

    def image(self, row: int) -> bytes:
        if not 0 <= row < self._count:
            raise FileNotFoundError(f"row {row} is beyond the {self._count} rows of {self.spec.describe()}")
        cell = self._arrow[row:row + 1].column(self.spec.image_column)[0].as_py()
        return image_bytes(cell, self.spec.image_column)


class StreamRows(_RowsBase):
    """A `datasets.IterableDataset`: rows in order; a read before the current row restarts the stream."""

    sequential = True

    def __init__(self, spec: HubSpec, stream: Any, fingerprint: str):
        super().__init__(spec)
        if stream.column_names is not None:
            _check_columns(spec, stream.column_names, stream.features)
        self.fingerprint = fingerprint
        self._stream = stream.with_format("arrow")
        self._lock = threading.Lock()
        self._cells: Iterator[Any] | None = None
        self._next = 0  # the row the stream yields next
        self._recent: OrderedDict[int, bytes | Exception] = OrderedDict()  # a row's image, or why it has none
        self.restarts = 0

    def _tables(self, columns: list[str] | None) -> Iterator["pa.Table"]:
        stream = self._stream if columns is None else self._stream.select_columns(columns)
        return stream.iter(batch_size=BATCH_ROWS)

    def listing(self) -> Listing:
        names = self._stream.column_names  # None when the stream does not declare its features
        columns = None if names is None else [self.spec.image_column, *self._caption_columns(names)]
        listing = Listing([], [])
        for table in self._tables(columns):
            if not listing.sizes:
                _check_columns(self.spec, table.column_names)
            self._list_table(table, listing)
        return listing

    def _cell_stream(self) -> Iterator[Any]:
        for table in self._tables([self.spec.image_column]):
            yield from table.column(self.spec.image_column).to_pylist()

    def image(self, row: int) -> bytes:
        with self._lock:
            found = self._recent.get(row)
            if found is None:
                found = self._advance_to(row)
        if isinstance(found, Exception):
            raise found
        return found

    def _advance_to(self, row: int) -> bytes | Exception:
        """Read the stream up to `row` (from the start if it lies behind); the caller holds the lock."""
        if self._cells is None or row < self._next:
            if self._cells is not None:
                self.restarts += 1
                logger.debug("%s: row %d is behind the stream (at %d): reading from the start",
                             self.spec.describe(), row, self._next)
            self._cells, self._next = self._cell_stream(), 0
        while self._next <= row:
            try:
                cell = next(self._cells)
            except StopIteration:
                self._cells = None
                raise FileNotFoundError(f"row {row} is beyond the {self._next} rows of "
                                        f"{self.spec.describe()}") from None
            try:
                self._recent[self._next] = image_bytes(cell, self.spec.image_column)
            except (DataError, OSError) as error:  # this row's problem, reported when it is read
                self._recent[self._next] = error
            self._next += 1
            if len(self._recent) > RECENT_ROWS:
                self._recent.popitem(last=False)
        return self._recent[row]


def _check_columns(spec: HubSpec, names: list[str], features: Any = None) -> None:
    """The image column exists and, where the features are declared, holds images or bytes."""
    if spec.image_column not in names:
        raise DataError(f"dataset {spec.dataset_id!r}: {spec.describe()} has no column {spec.image_column!r}; its "
                        f"columns are {names}. Set image_column.")
    feature = features.get(spec.image_column) if features is not None else None
    kind = type(feature).__name__
    if feature is not None and kind != "Image" and getattr(feature, "dtype", None) not in ("binary", "large_binary"):
        raise DataError(f"dataset {spec.dataset_id!r}: column {spec.image_column!r} of {spec.describe()} holds "
                        f"{feature}, not images (an Image feature or bytes). Set image_column.")


# --------------------------------------------------------------------------- loading


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as error:
        raise UserError(f"type='huggingface' datasets need the 'datasets' package, which is not installed: "
                        f"`pip install datasets` (or simpletuner[hf]) ({error})") from error
    return datasets


def _saved_to_disk(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, name))
                                       for name in ("state.json", "dataset_dict.json"))


def _digest(document: Any) -> str:
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def load_rows(spec: HubSpec) -> _RowsBase:
    """Open the split `spec` names; DataError (naming the dataset) when it cannot be loaded."""
    datasets = _import_datasets()
    local = os.path.expanduser(spec.dataset_name)
    try:
        if _saved_to_disk(local):
            if spec.streaming:
                logger.warning("dataset %r: %s was written by save_to_disk; its rows are read from its Arrow files "
                               "(memory-mapped), not streamed", spec.dataset_id, local)
            loaded = datasets.load_from_disk(local)
            if isinstance(loaded, datasets.DatasetDict):
                if spec.split not in loaded:
                    raise DataError(f"dataset {spec.dataset_id!r}: {local} has no split {spec.split!r}; its splits "
                                    f"are {sorted(loaded)}. Set split.")
                loaded = loaded[spec.split]
            return RandomRows(spec, loaded)
        options = dict(name=spec.dataset_config, split=spec.split, revision=spec.revision, cache_dir=spec.cache_dir)
        if not spec.streaming:
            return RandomRows(spec, datasets.load_dataset(spec.dataset_name, **options))
        builder = datasets.load_dataset_builder(spec.dataset_name, spec.dataset_config, revision=spec.revision,
                                                cache_dir=spec.cache_dir)
        # the builder's hash covers its data files (their revision on the Hub, their times locally)
        fingerprint = _digest({"builder": builder.hash, "config": builder.config_id, "split": spec.split})
        return StreamRows(spec, datasets.load_dataset(spec.dataset_name, streaming=True, **options), fingerprint)
    except (DataError, UserError):
        raise
    except Exception as error:  # noqa: BLE001 - the library's many failures become one explanation
        raise DataError(f"dataset {spec.dataset_id!r}: cannot load {spec.describe()} with the datasets library "
                        f"({type(error).__name__}: {error}); check dataset_name, dataset_config, split and "
                        f"revision") from error


# --------------------------------------------------------------------------- the storage


class HuggingFaceStorage:
    """Read-only access to one split's rows with `DatasetStorage`'s reading methods.

    `url` names the split and its fingerprint (`hf-dataset:user/name[train]@3f2a...`): cache keys
    hash it with the row name, so another revision or changed files never hit stale entries.
    """

    is_local = False  # no row has a path of its own to open

    def __init__(self, rows: _RowsBase):
        self._rows = rows
        self.spec = rows.spec
        self.url = f"hf-dataset:{rows.spec.describe()}@{rows.fingerprint}"
        self.read_workers: int | None = 1 if rows.sequential else None  # a stream is read in order
        self._listing: Listing | None = None

    @classmethod
    def from_config(cls, dataset: "DatasetConfig") -> "HuggingFaceStorage":
        return cls(load_rows(HubSpec.from_config(dataset)))

    def __repr__(self) -> str:
        return f"HuggingFaceStorage({self.url!r})"

    @property
    def sequential(self) -> bool:
        return self._rows.sequential

    def _listed(self) -> Listing:
        if self._listing is None:
            self._listing = self._rows.listing()
        return self._listing

    def local_path(self, relative: str) -> None:
        return None

    def list_files(self, extensions: Iterable[str] | None = None) -> list[FileEntry]:
        """Every row, as a file named row-NNNNNN whose size is its image's (0: the row has no image)."""
        sizes = self._listed().sizes
        return [FileEntry(row_name(row, len(sizes)), size, 0.0) for row, size in enumerate(sizes)]

    def list_images(self) -> list[FileEntry]:
        return self.list_files()

    def exists(self, relative: str) -> bool:
        try:
            return row_number(relative) < len(self._listed().sizes)
        except FileNotFoundError:
            return False

    def read_bytes(self, relative: str, start: int | None = None, end: int | None = None) -> bytes:
        data = self._rows.image(row_number(relative))
        return data[start or 0:end] if start is not None or end is not None else data

    def read_text(self, relative: str) -> str:
        raise FileNotFoundError(f"{self.url}/{relative}: a Hugging Face dataset has rows, not text files")

    def open(self, relative: str, size: int | None = None, block_size: int = 1 << 16) -> IO[bytes]:
        return io.BytesIO(self.read_bytes(relative))

    def open_image(self, relative: str) -> "Image.Image":
        from PIL import Image

        return Image.open(self.open(relative))

    def captions(self, relative: str) -> list[str]:
        """The row's captions from caption_column (or fallback_caption_column); [] when it has none."""
        return list(self._listed().captions[row_number(relative)])

    def source_reader(self) -> Callable[[str], bytes]:
        """Reads a source URL `<url>/row-NNNNNN` (what cache items name) as the image's bytes."""
        prefix = self.url + "/"

        def read(source: str) -> bytes:
            if not source.startswith(prefix):
                raise FileNotFoundError(f"{source!r} is not a row of {self.url}")
            return self.read_bytes(source[len(prefix):])

        return read
