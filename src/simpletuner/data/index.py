"""The image index: every listed file's size, modification time and image size.

Sizes come from image headers (no pixel decoding), after EXIF orientation. The
index is persisted per dataset in the cache directory (never inside the dataset)
and updated incrementally: new or changed files (size or mtime) are read,
deleted ones dropped, unchanged ones reused without being opened.

Files that cannot be used are kept in the index with a reason (zero_byte,
unreadable, undecodable, truncated) so a scan can say why. Images too small for
the dataset's settings are judged later, by `simpletuner.data.buckets` (the
settings may change; the index stays valid). An `unreadable` entry (an I/O
error, maybe passing) is read again next time.

Format: one `.npz` holding columns (numpy arrays) and the paths as one
NUL-separated UTF-8 blob: compact for 20k or 10M entries, written atomically.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from simpletuner.data.records import ImageRecord
from simpletuner.data.storage import DatasetStorage, FileEntry, WritableLocation
from simpletuner.errors import DataError
from simpletuner.log import get_logger

if TYPE_CHECKING:
    from simpletuner.config.schema import DatasetConfig

logger = get_logger(__name__)

FORMAT_VERSION = 1
INDEX_FILE = "image_index.npz"
# status codes persisted in the index
OK, ZERO_BYTE, UNREADABLE, UNDECODABLE, TRUNCATED = range(5)
REASONS = {ZERO_BYTE: "zero_byte", UNREADABLE: "unreadable", UNDECODABLE: "undecodable", TRUNCATED: "truncated"}
REASON_HELP = {
    "zero_byte": "empty files: re-copy or remove them",
    "unreadable": "could not be read (permissions, broken links, I/O errors); tried again on the next scan",
    "undecodable": "not an image Pillow can read, or a corrupt header: re-export them",
    "truncated": "the file ends before the image does (an incomplete download or copy): re-copy them",
}

HEAD_BYTES = 1 << 16
TAIL_BYTES = 4096
_FORMAT_HINTS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP",
                 ".tif": "TIFF", ".tiff": "TIFF", ".avif": "AVIF", ".jxl": "JXL"}
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


# --------------------------------------------------------------------------- reading one header


@dataclass(frozen=True, slots=True)
class HeaderResult:
    status: int
    width: int = 0
    height: int = 0
    detail: str = ""


def _read_head_and_tail(storage: DatasetStorage, entry: FileEntry) -> tuple[bytes, bytes]:
    try:
        return _read_head_and_tail_raw(storage, entry)
    except OSError as error:
        raise _ReadFailed(error) from error


def _read_head_and_tail_raw(storage: DatasetStorage, entry: FileEntry) -> tuple[bytes, bytes]:
    local = storage.local_path(entry.path)
    if local is not None:
        with open(local, "rb") as handle:
            head = handle.read(HEAD_BYTES)
            if entry.size <= HEAD_BYTES:
                return head, head[-TAIL_BYTES:]
            handle.seek(-TAIL_BYTES, os.SEEK_END)
            return head, handle.read(TAIL_BYTES)
    if entry.size <= HEAD_BYTES + TAIL_BYTES:
        data = storage.read_bytes(entry.path)
        return data, data[-TAIL_BYTES:]
    head = storage.read_bytes(entry.path, 0, HEAD_BYTES)
    return head, storage.read_bytes(entry.path, entry.size - TAIL_BYTES, entry.size)


def _orientation(image) -> int:
    """EXIF orientation without decoding pixels (PNG's getexif() would load the image: avoid it)."""
    try:
        if image.format == "TIFF" or "exif" in image.info:
            return int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block does not make the image unusable
        return 1
    return 1


# Phones append data after a JPEG's end: Google/Android motion photos (a video, declared in the XMP
# header) and Samsung's trailer (ending in "SEFT"). Such files are whole, not truncated.
_TRAILER_DECLARATIONS = (b"MotionPhoto", b"MicroVideo", b"Container:Directory")


def _declares_trailer(head: bytes, tail: bytes) -> bool:
    return b"SEFT" in tail[-16:] or any(mark in head for mark in _TRAILER_DECLARATIONS)


def _tail_problem(format_name: str, size: int, head: bytes, tail: bytes) -> str:
    """Why the file looks cut short, judged from its last bytes and header fields ('' if fine)."""
    if format_name in ("JPEG", "MPO"):
        if b"\xff\xd9" not in tail and not _declares_trailer(head, tail):
            return "no JPEG end-of-image marker in the last bytes"
    elif format_name == "PNG":
        if b"IEND" not in tail:
            return "no PNG IEND chunk at the end"
    elif format_name == "WEBP" and len(head) >= 8:
        riff_size = struct.unpack("<I", head[4:8])[0] + 8
        if size < riff_size:
            return f"file has {size} bytes, its RIFF header says {riff_size}"
    elif format_name == "BMP" and len(head) >= 14:
        pixel_offset = struct.unpack("<I", head[10:14])[0]
        if size <= pixel_offset:
            return f"file has {size} bytes, pixel data starts at {pixel_offset}"
    return ""


# --- fast paths for the common formats: Pillow's parsers cost ~100 us per JPEG, these ~10 us.
# Each returns (format, width, height, orientation) or None to let Pillow decide.

_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _exif_orientation(tiff: bytes) -> int:
    """Tag 0x0112 of IFD0 in a TIFF/EXIF block (1 when absent or unreadable, as Pillow treats it)."""
    if tiff[:6] == b"Exif\0\0":
        tiff = tiff[6:]
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    try:
        offset = struct.unpack_from(order + "I", tiff, 4)[0]
        count = struct.unpack_from(order + "H", tiff, offset)[0]
        for entry in range(offset + 2, offset + 2 + 12 * count, 12):
            tag, kind = struct.unpack_from(order + "HH", tiff, entry)
            if tag == 0x0112 and kind == 3:
                return int(struct.unpack_from(order + "H", tiff, entry + 8)[0])
    except struct.error:
        return 1
    return 1


def _jpeg_header(head: bytes) -> tuple[str, int, int, int] | None:
    """Walk the JPEG segments up to the start of scan: size from SOF, orientation from the first Exif APP1."""
    pos, end, size, orientation, seen_exif = 2, len(head), None, 1, False
    while pos + 4 <= end:
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        length = (head[pos + 2] << 8) | head[pos + 3]
        if marker == 0xDA:  # start of scan: the header is complete
            return ("JPEG", size[0], size[1], orientation) if size else None
        if length < 2:
            return None
        if marker == 0xE1 and not seen_exif and head[pos + 4:pos + 10] == b"Exif\0\0":
            seen_exif = True
            orientation = _exif_orientation(head[pos + 10:pos + 2 + length])
        elif marker in _JPEG_SOF and pos + 9 <= end:
            height, width = struct.unpack_from(">HH", head, pos + 5)
            if not (height and width):
                return None  # height given later by a DNL marker: Pillow's business
            size = (width, height)
        pos += 2 + length
    return None  # the header goes on past `head`: let Pillow read the whole file


def _png_header(head: bytes) -> tuple[str, int, int, int] | None:
    """IHDR (with its CRC checked) for the size; chunks up to IDAT for an eXIf orientation."""
    if len(head) < 33 or head[12:16] != b"IHDR" or zlib.crc32(head[12:29]) != struct.unpack_from(">I", head, 29)[0]:
        return None
    width, height = struct.unpack_from(">II", head, 16)
    pos, orientation = 8, 1
    while pos + 8 <= len(head):
        length = struct.unpack_from(">I", head, pos)[0]
        kind = head[pos + 4:pos + 8]
        if kind == b"IDAT":
            return "PNG", width, height, orientation
        if kind == b"eXIf":
            orientation = _exif_orientation(head[pos + 8:pos + 8 + length])
        pos += 12 + length
    return None


def _fast_header(head: bytes) -> tuple[str, int, int, int] | None:
    if head[:3] == b"\xff\xd8\xff":
        return _jpeg_header(head)
    if head[:8] == _PNG_SIGNATURE:
        return _png_header(head)
    if head[8:12] == b"WEBP":
        size = _webp_size(head)
        return ("WEBP", size[0], size[1], 1) if size else None
    return None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    """A WebP's size from its first chunk (Pillow's WebP plugin needs the whole file to open it).

    None where the header does not settle it (e.g. an EXIF chunk, which may rotate, lies at the end).
    """
    if len(head) < 30 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return None
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        return struct.unpack("<H", head[26:28])[0] & 0x3FFF, struct.unpack("<H", head[28:30])[0] & 0x3FFF
    if chunk == b"VP8L" and head[20] == 0x2F:
        bits = struct.unpack("<I", head[21:25])[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and not head[20] & 0x08:  # 0x08: has EXIF
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None


def _parse(head: bytes, hint: str | None):
    from PIL import Image

    formats = [hint] if hint else None
    try:
        return Image.open(io.BytesIO(head), formats=formats)
    except Exception:  # noqa: BLE001 - the extension may lie: try every format
        if hint is None:
            raise
        return Image.open(io.BytesIO(head))


def _open_header(storage: DatasetStorage, entry: FileEntry, head: bytes, hint: str | None):
    """(image, head) parsed from the first bytes, or from the whole file when its header is longer."""
    from PIL import UnidentifiedImageError

    try:
        return _parse(head, hint), head
    except UnidentifiedImageError:
        raise  # no format recognises the start of the file: more bytes will not help
    except (OSError, SyntaxError, struct.error, EOFError):
        if len(head) >= entry.size:
            raise
    # a header larger than our first read (big ICC/EXIF blocks): read the whole file
    try:
        head = storage.read_bytes(entry.path)
    except OSError as error:
        raise _ReadFailed(error) from error
    return _parse(head, hint), head


class _ReadFailed(Exception):
    """An I/O error while reading (as opposed to a parse error)."""


def read_header(storage: DatasetStorage, entry: FileEntry) -> HeaderResult:
    """Size (after EXIF orientation) of one image from its header, or why it cannot be used."""
    from PIL import UnidentifiedImageError

    if entry.size == 0:
        return HeaderResult(ZERO_BYTE)
    try:
        head, tail = _read_head_and_tail(storage, entry)
        problem = _tail_problem("WEBP", entry.size, head, tail) if head[8:12] == b"WEBP" else ""
        if problem:
            return HeaderResult(TRUNCATED, detail=problem)
        fast = _fast_header(head)
        if fast is not None:
            format_name, width, height, orientation = fast
        else:
            hint = _FORMAT_HINTS.get(os.path.splitext(entry.path)[1].lower())
            image, head = _open_header(storage, entry, head, hint)
            format_name, (width, height), orientation = image.format or "", image.size, _orientation(image)
            if format_name == "TIFF":  # some Pillow versions report TIFF sizes already oriented: use the tags
                width, height = (int(image.tag_v2.get(tag, side)) for tag, side in ((256, width), (257, height)))
        if orientation in _SWAPPING_ORIENTATIONS:
            width, height = height, width
        problem = _tail_problem(format_name, entry.size, head, tail)
    except _ReadFailed as failure:
        error = failure.__cause__
        return HeaderResult(UNREADABLE, detail=f"{type(error).__name__}: {error}")
    except UnidentifiedImageError as error:
        return HeaderResult(UNDECODABLE, detail=str(error).split(" <")[0])
    except (OSError, EOFError) as error:
        message = str(error)
        status = TRUNCATED if "runcated" in message or isinstance(error, EOFError) else UNDECODABLE
        return HeaderResult(status, detail=f"{type(error).__name__}: {message}")
    except Exception as error:  # noqa: BLE001 - any parser failure means: not usable, with the reason
        return HeaderResult(UNDECODABLE, detail=f"{type(error).__name__}: {error}")
    if problem:
        return HeaderResult(TRUNCATED, width, height, problem)
    if width <= 0 or height <= 0:
        return HeaderResult(UNDECODABLE, detail=f"header says {width}x{height}")
    bomb = _bomb_problem(width, height)
    if bomb:
        return HeaderResult(UNDECODABLE, width, height, bomb)
    return HeaderResult(OK, width, height)


def _bomb_problem(width: int, height: int) -> str:
    """Why Pillow would refuse to decode an image this large (its DecompressionBombError rule), or ''."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or width * height <= 2 * limit:
        return ""
    return (f"{width}x{height} = {width * height:,} pixels, over Pillow's decompression-bomb limit of "
            f"{2 * limit:,} (2 x PIL.Image.MAX_IMAGE_PIXELS)")


def skipped_rows(index: "ImageIndex") -> Iterator[tuple[str, str]]:
    """(path, reason) of every row the index excludes, with the error text where there is one."""
    for row in np.flatnonzero(index.status != OK).tolist():
        detail = index.details.get(row)
        reason = REASONS[int(index.status[row])]
        yield index.paths[row], f"{reason}: {detail}" if detail else reason


# --------------------------------------------------------------------------- the index


class PathTable(Sequence[str]):
    """Many relative paths in one bytes blob (NUL-separated) plus offsets: compact at 10M entries."""

    def __init__(self, blob: bytes, offsets: np.ndarray):
        self._blob = blob
        self._offsets = offsets  # int64, len(paths) + 1; path i is blob[offsets[i]:offsets[i+1]-1]

    @classmethod
    def from_paths(cls, paths: Sequence[str]) -> "PathTable":
        encoded = [path.encode("utf-8", "surrogateescape") for path in paths]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(item) + 1 for item in encoded], out=offsets[1:])
        return cls(b"".join(item + b"\0" for item in encoded), offsets)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, row):  # type: ignore[override]
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        start, end = self._offsets[row], self._offsets[row + 1] - 1
        return self._blob[start:end].decode("utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[str]:
        if not self._blob:
            return iter(())
        return iter(self._blob[:-1].decode("utf-8", "surrogateescape").split("\0"))

    @property
    def nbytes(self) -> int:
        return len(self._blob) + self._offsets.nbytes


@dataclass
class ImageIndex:
    """Columns of one dataset's index, sorted by path. Row i describes paths[i]."""

    location: str
    paths: PathTable
    file_size: np.ndarray  # int64
    mtime: np.ndarray  # float64
    width: np.ndarray  # int32 (after EXIF orientation)
    height: np.ndarray  # int32
    status: np.ndarray  # uint8: OK or a REASONS code
    details: dict[int, str] = field(default_factory=dict)  # row -> error text, failed rows only

    @classmethod
    def empty(cls, location: str) -> "ImageIndex":
        return cls(location, PathTable.from_paths([]), np.zeros(0, np.int64), np.zeros(0, np.float64),
                   np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.uint8))

    def __len__(self) -> int:
        return len(self.file_size)

    @property
    def usable(self) -> np.ndarray:
        return self.status == OK

    def records(self, mask: np.ndarray | None = None) -> list[ImageRecord]:
        """ImageRecords of the usable rows (and of `mask`, when given)."""
        keep = self.usable if mask is None else (self.usable & mask)
        return [ImageRecord(self.paths[row], int(self.file_size[row]), float(self.mtime[row]),
                            int(self.width[row]), int(self.height[row])) for row in np.flatnonzero(keep)]

    def nbytes(self) -> int:
        columns = (self.file_size, self.mtime, self.width, self.height, self.status)
        return self.paths.nbytes + sum(column.nbytes for column in columns)

    # persistence -------------------------------------------------------------

    def to_bytes(self) -> bytes:
        meta = {"version": FORMAT_VERSION, "location": self.location,
                "details": {str(row): text for row, text in self.details.items()}}
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                 paths=np.frombuffer(self.paths._blob, dtype=np.uint8), offsets=self.paths._offsets,
                 file_size=self.file_size, mtime=self.mtime, width=self.width, height=self.height,
                 status=self.status)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ImageIndex":
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            meta = json.loads(arrays["meta"].tobytes())
            if meta.get("version") != FORMAT_VERSION:
                raise ValueError(f"index format {meta.get('version')}, expected {FORMAT_VERSION}")
            return cls(meta["location"], PathTable(arrays["paths"].tobytes(), arrays["offsets"]),
                       arrays["file_size"], arrays["mtime"], arrays["width"], arrays["height"], arrays["status"],
                       {int(row): text for row, text in meta["details"].items()})


def load_index(cache: WritableLocation, location: str) -> ImageIndex | None:
    """The saved index of `location`, or None (missing, unreadable, other format, other dataset)."""
    if not cache.exists(INDEX_FILE):
        return None
    try:
        index = ImageIndex.from_bytes(cache.read_bytes(INDEX_FILE))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        logger.warning("ignoring the index at %s: %s", cache.url, error)
        return None
    if index.location != location:
        logger.info("index at %s belongs to %s, not %s: starting afresh", cache.url, index.location, location)
        return None
    return index


def save_index(cache: WritableLocation, index: ImageIndex) -> None:
    """Write the index atomically; a full disk (or a file size limit) is a DataError naming the place."""
    import errno

    try:
        cache.write_bytes(INDEX_FILE, index.to_bytes())
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        raise DataError(f"cannot save the image index in {cache.url}: {os.strerror(error.errno)}; free space "
                        "(or set cache_dir elsewhere), then run again") from None


# --------------------------------------------------------------------------- scanning


@dataclass
class ScanResult:
    """A fresh index and what it took: files read (opened) and rows reused from the previous index."""

    index: ImageIndex
    files_found: int
    read: int
    reused: int
    removed: int


def _unchanged_rows(previous: ImageIndex | None, listing: Sequence[FileEntry]) -> tuple[list[int], int]:
    """For each listed file, the row of the previous index to reuse (-1: read it); and how many were known."""
    if previous is None or len(previous) == 0:
        return [-1] * len(listing), 0
    lookup = {path: row for row, path in enumerate(previous.paths)}
    sizes, mtimes, status = previous.file_size, previous.mtime, previous.status
    rows, known = [], 0
    for entry in listing:
        row = lookup.get(entry.path, -1)
        known += row >= 0
        if row >= 0 and (sizes[row] != entry.size or mtimes[row] != entry.mtime or status[row] == UNREADABLE):
            row = -1
        rows.append(row)
    return rows, known


def _show_progress(count: int) -> bool:
    return count >= 2000 and sys.stderr.isatty()


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _read_all(storage: DatasetStorage, entries: list[FileEntry], workers: int | None) -> list[HeaderResult]:
    from tqdm import tqdm

    if not entries:
        return []
    # local reads from the page cache are CPU-bound under the GIL: one thread per core overlaps the syscalls;
    # remote reads wait on the network: many requests in flight
    workers = workers or storage.read_workers or (min(4, _usable_cores()) if storage.is_local else 32)
    chunk = 256 if storage.is_local else 8
    chunks = [entries[i:i + chunk] for i in range(0, len(entries), chunk)]
    results: list[HeaderResult] = []
    with tqdm(total=len(entries), unit="img", desc=f"indexing {storage.url}", disable=not _show_progress(len(entries)),
              smoothing=0.1) as bar, ThreadPoolExecutor(max_workers=workers) as pool:
        for part in pool.map(lambda group: [read_header(storage, entry) for entry in group], chunks):
            results.extend(part)
            bar.update(len(part))
    return results


def update_index(storage: DatasetStorage, listing: Sequence[FileEntry], previous: ImageIndex | None,
                 workers: int | None = None) -> ScanResult:
    """A new index for `listing`: unchanged rows of `previous` reused, everything else read."""
    listing = sorted(listing, key=lambda entry: entry.path)
    rows, known = _unchanged_rows(previous, listing)
    to_read = [entry for entry, row in zip(listing, rows) if row < 0]
    results = iter(_read_all(storage, to_read, workers))
    count = len(listing)
    size = np.fromiter((entry.size for entry in listing), np.int64, count)
    mtime = np.fromiter((entry.mtime for entry in listing), np.float64, count)
    width, height, status = np.zeros(count, np.int32), np.zeros(count, np.int32), np.zeros(count, np.uint8)
    details: dict[int, str] = {}
    for i, row in enumerate(rows):
        if row >= 0:
            assert previous is not None
            width[i], height[i], status[i] = previous.width[row], previous.height[row], previous.status[row]
            if row in previous.details:
                details[i] = previous.details[row]
        else:
            result = next(results)
            width[i], height[i], status[i] = result.width, result.height, result.status
            if result.detail:
                details[i] = result.detail
    index = ImageIndex(storage.url, PathTable.from_paths([entry.path for entry in listing]), size, mtime,
                       width, height, status, details)
    removed = (len(previous) if previous is not None else 0) - known
    return ScanResult(index, count, len(to_read), count - len(to_read), removed)


def index_location(dataset: "DatasetConfig", cache_root: str) -> WritableLocation:
    """Where a dataset's index lives: its cache_dir, or <cache_root>/index/<id>; never inside the dataset."""
    url = dataset.cache_dir or _join_url(cache_root, "index", dataset.id)
    location = WritableLocation(url, dataset)
    if location.inside(dataset.location()):
        raise DataError(f"dataset {dataset.id!r}: its index location {url!r} lies inside the dataset "
                        f"{dataset.location()!r}; source data is never written. Set cache_dir elsewhere.")
    return location


def _join_url(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if root.startswith("s3://") else os.path.join(root, *parts)


def scan_dataset(storage: DatasetStorage, cache: WritableLocation, workers: int | None = None,
                 listing: Sequence[FileEntry] | None = None) -> ScanResult:
    """List, update and save the index of one dataset (the dataset itself is only read)."""
    previous = load_index(cache, storage.url)
    result = update_index(storage, storage.list_images() if listing is None else listing, previous, workers)
    if result.read or result.removed or previous is None:
        save_index(cache, result.index)
    logger.info("%s: %d files, %d read, %d reused, %d removed", storage.url, result.files_found, result.read,
                result.reused, result.removed)
    return result


# --------------------------------------------------------------------------- reporting


@dataclass
class SkipGroup:
    reason: str
    count: int
    examples: list[str]  # a few paths, with the error text where there is one


def skipped_groups(index: ImageIndex, extra: dict[str, np.ndarray] | None = None,
                   examples: int = 3) -> list[SkipGroup]:
    """Excluded rows grouped by reason: the index's own, plus usable rows flagged by `extra` masks."""
    groups = []
    for code, reason in REASONS.items():
        rows = np.flatnonzero(index.status == code)
        if len(rows):
            shown = [_example(index, row) for row in rows[:examples]]
            groups.append(SkipGroup(reason, len(rows), shown))
    return groups


def _example(index: ImageIndex, row: int) -> str:
    detail = index.details.get(int(row))
    return f"{index.paths[row]}: {detail}" if detail else index.paths[row]
