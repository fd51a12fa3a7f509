"""One read-only interface over dataset locations: local folders and s3:// (fsspec).

`DatasetStorage` lists, reads and opens files under a dataset's root and has no
method that writes, moves or deletes: source data stays untouched by
construction. Caches and indexes go through `WritableLocation`, a separate small
class that writes atomically (temporary name, then rename; a plain put on S3).

Remote calls are retried with exponential backoff on transient errors
(connection failures, 5xx, throttling), never on missing objects or denied access.
"""

from __future__ import annotations

import errno
import os
import random
import time
import uuid
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Callable, Iterable, TypeVar

from simpletuner.errors import DataError
from simpletuner.log import get_logger

if TYPE_CHECKING:
    from PIL import Image

    from simpletuner.config.schema import DatasetConfig
    from simpletuner.data.hf import HuggingFaceStorage

logger = get_logger(__name__)
T = TypeVar("T")

_ALWAYS_READABLE = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tiff", ".tif")


def image_extensions() -> frozenset[str]:
    """Lower-case extensions of the images we list: the usual ones, plus jxl/avif where Pillow reads them."""
    from PIL import Image, features

    extensions = set(_ALWAYS_READABLE)
    registered = Image.registered_extensions()
    for optional in (".avif", ".jxl"):
        module = optional[1:]
        readable = optional in registered
        if module in features.modules:
            readable = readable and bool(features.check_module(module))
        if readable:
            extensions.add(optional)
    return frozenset(extensions)


@dataclass(frozen=True, slots=True)
class FileEntry:
    """A file under a dataset root, as the listing reports it."""

    path: str  # relative to the root, '/'-separated
    size: int  # bytes; -1 when the listing could not stat it (e.g. a dangling symlink)
    mtime: float  # seconds since the epoch


# --------------------------------------------------------------------------- retries


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt n waits up to min(cap, base * 2**n) seconds."""

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 10.0
    sleep: Callable[[float], None] = time.sleep

    def call(self, operation: Callable[[], T], description: str) -> T:
        for attempt in range(self.attempts):
            try:
                return operation()
            except Exception as error:  # noqa: BLE001 - classified below
                if attempt + 1 >= self.attempts or not is_transient(error):
                    raise
                delay = random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))
                logger.info("%s failed (%s); retry %d in %.2fs", description, error, attempt + 1, delay)
                self.sleep(delay)
        raise AssertionError("unreachable")


_THROTTLE_CODES = {
    "Throttling", "ThrottlingException", "ThrottledException", "SlowDown", "RequestLimitExceeded",
    "TooManyRequestsException", "RequestThrottled", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "503", "500", "502", "504",
}
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
                     errno.EAGAIN, errno.EPIPE, getattr(errno, "EREMOTEIO", 121)}


def _chain(error: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_transient_one(error: BaseException) -> bool | None:
    """True/False when this exception decides it, None when it says nothing."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    response = getattr(error, "response", None)
    if isinstance(response, dict) and "Error" in response:  # botocore ClientError
        code = str(response["Error"].get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return code in _THROTTLE_CODES or status >= 500 or status == 429
    name = type(error).__name__
    if isinstance(error, (ConnectionError, TimeoutError)) or name in {
        "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
        "ClientConnectorError", "ServerDisconnectedError", "ClientPayloadError", "ClientOSError",
        "FSTimeoutError", "IncompleteRead", "ResponseParserError", "ProxyConnectionError",
    }:
        return True
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
        return True
    return None


def is_transient(error: BaseException) -> bool:
    """Whether a failed remote call is worth retrying (connection, 5xx, throttling; not 404/403)."""
    for link in _chain(error):
        verdict = _is_transient_one(link)
        if verdict is not None:
            return verdict
    return False


# --------------------------------------------------------------------------- filesystems


def _is_storage_error(error: BaseException) -> bool:
    """An error of the storage service or its client (not a bug of ours)."""
    module = type(error).__module__ or ""
    return isinstance(error, OSError) or module.startswith(("botocore", "aiobotocore", "aiohttp", "s3fs"))


def _s3_options(dataset: "DatasetConfig | None") -> dict[str, Any]:
    """s3fs options from the dataset's aws_* fields, falling back to the environment."""
    env = os.environ
    get = (lambda name: getattr(dataset, name, None)) if dataset is not None else (lambda name: None)
    key = get("aws_access_key_id") or env.get("AWS_ACCESS_KEY_ID")
    secret = get("aws_secret_access_key") or env.get("AWS_SECRET_ACCESS_KEY")
    endpoint = get("aws_endpoint_url") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = get("aws_region_name") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    options: dict[str, Any] = {
        # our RetryPolicy owns retries (botocore's and s3fs's are set to one attempt): no multiplied backoffs
        "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}},
        "client_kwargs": {},
        "use_listings_cache": False,  # a rescan must see the bucket as it is now
    }
    if key and secret:
        options.update(key=key, secret=secret)
    if endpoint:
        options["endpoint_url"] = endpoint
    if region:
        options["client_kwargs"]["region_name"] = region
    return options


def _filesystem(url: str, dataset: "DatasetConfig | None") -> tuple[Any, str, bool]:
    """(fsspec filesystem, root path inside it, is_local) for a folder path or s3:// URL."""
    import fsspec

    if url.startswith("s3://"):
        try:
            import s3fs  # noqa: F401
        except ImportError as error:
            raise DataError(f"{url}: reading s3:// needs s3fs; install it with `pip install s3fs`") from error
        fs = fsspec.filesystem("s3", **_s3_options(dataset))
        fs.retries = 1
        return fs, url[len("s3://"):].rstrip("/"), False
    if "://" in url and not url.startswith("file://"):
        raise DataError(f"{url!r}: unsupported location; use a local folder or s3://bucket/prefix")
    path = url[len("file://"):] if url.startswith("file://") else url
    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path)), True


def _join(root: str, relative: str) -> str:
    relative = relative.lstrip("/")
    return f"{root}/{relative}" if root else relative


def _mtime(info: dict[str, Any]) -> float:
    value = info.get("mtime", info.get("LastModified", info.get("last_modified", 0.0)))
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    return float(value or 0.0)


def _walk_local(root: str, keep: Callable[[str], bool]) -> list[FileEntry]:
    """Recursive listing with one stat per kept file (os.scandir; follows directory symlinks once)."""
    entries: list[FileEntry] = []
    pending = [(root, "")]
    visited: set[str] = set()
    while pending:
        folder, prefix = pending.pop()
        real = os.path.realpath(folder)
        if real in visited:
            continue
        visited.add(real)
        with os.scandir(folder) as listing:
            for item in listing:
                relative = prefix + item.name
                try:
                    is_dir = item.is_dir()
                except OSError:  # a symlink loop (ELOOP) or an unreadable link: listed, so the index reports it
                    is_dir = False
                if is_dir:
                    pending.append((item.path, relative + "/"))
                elif keep(item.name):
                    try:
                        stat = item.stat()
                    except OSError:  # a dangling or looping symlink: listed, so the index reports it
                        entries.append(FileEntry(relative, -1, 0.0))
                        continue
                    entries.append(FileEntry(relative, stat.st_size, stat.st_mtime))
    entries.sort(key=lambda entry: entry.path)
    return entries


class DatasetStorage:
    """Read-only access to the files under one dataset root (a folder or s3://bucket/prefix).

    It has no method that writes, moves or deletes anything: sources stay as they are.
    """

    read_workers: int | None = None  # threads reading image headers (None: as many as suit the location)

    def __init__(self, url: str, dataset: "DatasetConfig | None" = None, retry: RetryPolicy | None = None):
        self.url = url
        self._fs, self._root, self.is_local = _filesystem(url, dataset)
        self._retry = retry or RetryPolicy()
        if self.is_local and not os.path.isdir(self._root):
            raise DataError(f"dataset folder {url!r} does not exist (resolved to {self._root})")

    @classmethod
    def from_config(cls, dataset: "DatasetConfig", retry: RetryPolicy | None = None) -> "DatasetStorage":
        return cls(dataset.location(), dataset, retry)

    def __repr__(self) -> str:
        return f"DatasetStorage({self.url!r})"

    def _remote(self, operation: Callable[[], T], description: str) -> T:
        if self.is_local:
            return operation()
        return self._retry.call(operation, description)

    def local_path(self, relative: str) -> str | None:
        """The absolute path of a file of a local dataset (None for remote ones)."""
        return os.path.join(self._root, relative) if self.is_local else None

    def list_files(self, extensions: Iterable[str] | None = None) -> list[FileEntry]:
        """Every file under the root (recursively) whose lower-case extension is in `extensions`.

        Sizes and modification times come from the listing itself: no extra request per file.
        """
        wanted = None if extensions is None else {ext.lower() for ext in extensions}

        def keep(name: str) -> bool:
            return wanted is None or os.path.splitext(name)[1].lower() in wanted

        if self.is_local:
            return _walk_local(self._root, keep)
        try:
            found = self._remote(lambda: self._fs.find(self._root, detail=True), f"listing {self.url}")
        except Exception as error:  # noqa: BLE001 - S3 client errors become an explanation; bugs pass through
            if not _is_storage_error(error):
                raise
            endpoint = getattr(self._fs, "endpoint_url", None) or self._fs.client_kwargs.get("endpoint_url")
            raise DataError(f"cannot list {self.url} ({type(error).__name__}: {error}); check aws_bucket_name, "
                            f"aws_data_prefix, the keys and aws_endpoint_url (now {endpoint or 'AWS default'})"
                            ) from error
        prefix = self._root + "/" if self._root else ""
        entries = []
        for name, info in found.items():
            if info.get("type") == "directory" or not name.startswith(prefix) or not keep(name):
                continue
            entries.append(FileEntry(name[len(prefix):], int(info.get("size") or 0), _mtime(info)))
        entries.sort(key=lambda entry: entry.path)
        return entries

    def list_images(self) -> list[FileEntry]:
        """Every image file (see `image_extensions`) under the root."""
        return self.list_files(image_extensions())

    def exists(self, relative: str) -> bool:
        path = _join(self._root, relative)
        return self._remote(lambda: self._fs.exists(path), f"checking {self.url}/{relative}")

    def read_bytes(self, relative: str, start: int | None = None, end: int | None = None) -> bytes:
        """The file's bytes, or the range [start, end) of them."""
        path = _join(self._root, relative)
        if self.is_local:
            with open(path, "rb") as handle:
                if start:
                    handle.seek(start)
                return handle.read() if end is None else handle.read(end - (start or 0))
        return self._remote(lambda: self._fs.cat_file(path, start=start, end=end), f"reading {self.url}/{relative}")

    def read_text(self, relative: str) -> str:
        """The file as text: UTF-8 (a BOM is dropped); else cp1252, else latin-1, with a warning naming the file."""
        return decode_text(self.read_bytes(relative), f"{self.url}/{relative}")

    def open(self, relative: str, size: int | None = None, block_size: int = 1 << 16) -> IO[bytes]:
        """A read-only binary file object (lazy range reads on S3; pass the known size to skip a HEAD)."""
        path = _join(self._root, relative)
        if self.is_local:
            return open(path, "rb")
        kwargs: dict[str, Any] = {"block_size": block_size, "cache_type": "readahead"}
        if size is not None:
            kwargs["size"] = size
        return self._remote(lambda: self._fs.open(path, "rb", **kwargs), f"opening {self.url}/{relative}")

    def open_image(self, relative: str) -> "Image.Image":
        """The image, decoded lazily by Pillow (call .load() or convert to get pixels)."""
        import io

        from PIL import Image

        return Image.open(io.BytesIO(self.read_bytes(relative)))


def decode_text(data: bytes, name: str) -> str:
    """UTF-8 (BOM dropped); a file that is not UTF-8 falls back to cp1252, then latin-1 (which reads any byte)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        for encoding in TEXT_FALLBACKS:
            try:
                text = data.decode(encoding)
            except UnicodeDecodeError:
                continue
            logger.warning("%s is not UTF-8 (byte 0x%02x at position %d); read it as %s", name,
                           data[error.start], error.start, encoding)
            return text
    raise AssertionError("unreachable: latin-1 decodes every byte")


TEXT_FALLBACKS = ("cp1252", "latin-1")


def open_source(dataset: "DatasetConfig") -> "DatasetStorage | HuggingFaceStorage":
    """The read-only source of a dataset entry: its folder or bucket, or its Hugging Face dataset's rows."""
    if dataset.type == "huggingface":
        from simpletuner.data.hf import HuggingFaceStorage

        return HuggingFaceStorage.from_config(dataset)
    return DatasetStorage.from_config(dataset)


# --------------------------------------------------------------------------- writable places


class WritableLocation:
    """A folder or s3:// prefix for caches and indexes (never a dataset's own location).

    Writes are atomic: a temporary name, then a rename (local); a single put (S3).
    """

    def __init__(self, url: str, dataset: "DatasetConfig | None" = None, retry: RetryPolicy | None = None):
        self.url = url.rstrip("/") if url.startswith("s3://") else url
        self._fs, self._root, self.is_local = _filesystem(url, dataset)
        self._retry = retry or RetryPolicy()

    def __repr__(self) -> str:
        return f"WritableLocation({self.url!r})"

    def path(self, relative: str) -> str:
        return _join(self._root, relative) if not self.is_local else os.path.join(self._root, relative)

    def _remote(self, operation: Callable[[], T], description: str) -> T:
        if self.is_local:
            return operation()
        return self._retry.call(operation, description)

    def exists(self, relative: str) -> bool:
        target = self.path(relative)
        return self._remote(lambda: self._fs.exists(target), f"checking {self.url}/{relative}")

    def read_bytes(self, relative: str) -> bytes:
        target = self.path(relative)
        if self.is_local:
            with open(target, "rb") as handle:
                return handle.read()
        return self._remote(lambda: self._fs.cat_file(target), f"reading {self.url}/{relative}")

    def write_bytes(self, relative: str, data: bytes) -> None:
        target = self.path(relative)
        if not self.is_local:
            self._remote(lambda: self._fs.pipe_file(target, data), f"writing {self.url}/{relative}")
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        temporary = f"{target}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise

    def inside(self, other_url: str) -> bool:
        """Whether this location lies inside `other_url` (used to keep caches out of datasets)."""
        if self.is_local != (not other_url.startswith("s3://")):
            return False
        if self.is_local:
            mine = os.path.realpath(self._root)
            theirs = os.path.realpath(os.path.expanduser(other_url))
        else:
            mine, theirs = self._root, other_url[len("s3://"):].rstrip("/")
        return mine == theirs or mine.startswith(theirs.rstrip("/") + "/")


def read_fsspec_url(url: str, storage_options: dict[str, Any] | None = None,
                    retry: RetryPolicy | None = None) -> bytes:
    """The bytes of a remote file named by an fsspec URL, with the retry policy (a local path is read directly)."""
    from fsspec.core import url_to_fs

    if "://" not in url or url.startswith("file://"):
        with open(url.removeprefix("file://"), "rb") as handle:
            return handle.read()
    options = dict(storage_options or {})
    if url.startswith("s3://"):  # our policy owns retries: one attempt each in botocore and s3fs
        options.setdefault("config_kwargs", {"retries": {"max_attempts": 1, "mode": "standard"}})
    fs, path = url_to_fs(url, **options)
    if hasattr(fs, "retries"):
        fs.retries = 1
    return (retry or RetryPolicy()).call(lambda: fs.cat_file(path), f"reading {url}")


def read_url(url: str, dataset: "DatasetConfig | None" = None, retry: RetryPolicy | None = None) -> bytes:
    """The bytes of one file given as a local path or s3:// URL (credentials from `dataset` or the environment)."""
    fs, path, is_local = _filesystem(url, dataset)
    if is_local:
        with open(path, "rb") as handle:
            return handle.read()
    return (retry or RetryPolicy()).call(lambda: fs.cat_file(path), f"reading {url}")
