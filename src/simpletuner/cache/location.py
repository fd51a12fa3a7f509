"""Where a cache lives: a local folder or an fsspec URL (s3://...), with atomic writes.

This is the cache's own small seam over storage. Local folders get temporary
names renamed into place (atomic on POSIX) and memory-mapped reads; remote
locations get whole-object PUTs (atomic on S3) and ranged GETs, each retried on
transient errors with the storage layer's `RetryPolicy`. (The storage layer's
`WritableLocation` has no listing, deletion, ranged reads or file uploads, which a
store needs; this module is the one place to change if it grows them.)
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

TEMP_PREFIX = ".tmp-"


def is_remote(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


class Location:
    """A folder (local or remote) holding files addressed by '/'-separated relative names."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None):
        self.remote = is_remote(root)
        self.storage_options = dict(storage_options or {})
        if self.remote:
            import fsspec

            self.fs, _ = fsspec.core.url_to_fs(root, **self.storage_options)
            self.protocol = root.split("://", 1)[0]
            self.root = root.rstrip("/")
            self._bare = self.fs._strip_protocol(self.root)
            from simpletuner.data.storage import RetryPolicy

            self._retry = RetryPolicy()
        else:
            self.fs = None
            self.root = str(Path(root.removeprefix("file://")).absolute())

    def __repr__(self) -> str:
        return f"Location({self.root!r})"

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _remote_path(self, name: str) -> str:
        return f"{self._bare}/{name}"

    def _call(self, method: str, name: str, *args: Any, **kwargs: Any) -> Any:
        """`self.fs.<method>(<remote path of name>, ...)`, retried on transient errors."""
        operation = getattr(self.fs, method)
        path = self._remote_path(name)
        return self._retry.call(lambda: operation(path, *args, **kwargs), f"{method} {self.root}/{name}")

    def local_path(self, name: str) -> str | None:
        """A path the OS can open (and memory-map), or None for a remote location."""
        return None if self.remote else os.path.join(self.root, name)

    def makedirs(self, name: str) -> None:
        if not self.remote:
            os.makedirs(os.path.join(self.root, name), exist_ok=True)

    def list(self, folder: str) -> dict[str, int]:
        """File names directly in `folder` with their sizes; {} if the folder does not exist."""
        if not self.remote:
            try:
                with os.scandir(os.path.join(self.root, folder)) as it:
                    return {e.name: e.stat().st_size for e in it if e.is_file()}
            except FileNotFoundError:
                return {}
        path = self._remote_path(folder)
        self.fs.invalidate_cache(path)
        try:
            entries = self._call("ls", folder, detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries if e["type"] == "file"}

    def read_bytes(self, name: str) -> bytes:
        if not self.remote:
            with open(os.path.join(self.root, name), "rb") as f:
                return f.read()
        return self._call("cat_file", name)

    def read_range(self, name: str, start: int, end: int) -> bytes:
        if not self.remote:
            with open(os.path.join(self.root, name), "rb") as f:
                f.seek(start)
                return f.read(end - start)
        return self._call("cat_file", name, start=start, end=end)

    def mtime(self, name: str) -> float:
        if not self.remote:
            return os.stat(os.path.join(self.root, name)).st_mtime
        info = self._call("info", name)
        modified = info.get("LastModified") or info.get("mtime")
        return modified.timestamp() if hasattr(modified, "timestamp") else float(modified or 0)

    def write_bytes_atomic(self, name: str, data: bytes) -> None:
        """Readers see the old file or the whole new one, never a part."""
        if self.remote:
            self._call("pipe_file", name, data)
            return
        final = os.path.join(self.root, name)
        folder, base = os.path.split(final)
        os.makedirs(folder, exist_ok=True)
        temp = os.path.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{base}")
        try:
            with open(temp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, final)
        except BaseException:
            if os.path.exists(temp):
                os.remove(temp)
            raise

    def put_file_atomic(self, local_file: str, name: str) -> None:
        """Move a finished local file to `name`; the file appears whole or not at all."""
        if self.remote:
            self._retry.call(lambda: self.fs.put_file(local_file, self._remote_path(name)), f"put {self.root}/{name}")
            os.remove(local_file)
            return
        final = os.path.join(self.root, name)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        if os.path.dirname(os.path.abspath(local_file)) != os.path.dirname(final):
            staged = os.path.join(os.path.dirname(final), f"{TEMP_PREFIX}{uuid.uuid4().hex[:8]}")
            shutil.move(local_file, staged)
            local_file = staged
        os.replace(local_file, final)

    def temp_file_for(self, name: str) -> str:
        """A local path to write `name` into before `put_file_atomic` (same folder when local)."""
        if self.remote:
            import tempfile

            fd, path = tempfile.mkstemp(prefix="simpletuner-shard-")
            os.close(fd)
            return path
        folder, base = os.path.split(os.path.join(self.root, name))
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, f"{TEMP_PREFIX}{base}")

    def delete(self, name: str) -> bool:
        """Remove a file; False if it was already gone."""
        try:
            if self.remote:
                self._call("rm_file", name)
            else:
                os.remove(os.path.join(self.root, name))
            return True
        except FileNotFoundError:
            return False

    def download(self, name: str, local_file: str) -> None:
        self._retry.call(lambda: self.fs.get_file(self._remote_path(name), local_file), f"get {self.root}/{name}")


def storage_options_for(url: str, dataset: Any = None) -> dict[str, Any]:
    """fsspec options for a cache URL: S3 keys, endpoint and region from a dataset's aws_* fields.

    Unset fields fall back to the environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...).
    """
    if not url.startswith("s3://"):
        return {}
    env = os.environ

    def pick(field: str, *variables: str) -> str | None:
        value = getattr(dataset, field, None) if dataset is not None else None
        return value or next((env[v] for v in variables if env.get(v)), None)

    options: dict[str, Any] = {"skip_instance_cache": True, "client_kwargs": {}}
    key = pick("aws_access_key_id", "AWS_ACCESS_KEY_ID")
    secret = pick("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY")
    if key and secret:
        options.update(key=key, secret=secret)
    endpoint = pick("aws_endpoint_url", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    region = pick("aws_region_name", "AWS_REGION", "AWS_DEFAULT_REGION")
    if region:
        options["client_kwargs"]["region_name"] = region
    return options


def inside(child: str, parent: str) -> bool:
    """Whether location `child` is `parent` or lies under it (local paths resolved, URLs compared)."""
    if is_remote(child) != is_remote(parent):
        return False
    if is_remote(child):
        a, b = child.rstrip("/"), parent.rstrip("/")
    else:
        a = os.path.realpath(os.path.expanduser(child.removeprefix("file://")))
        b = os.path.realpath(os.path.expanduser(parent.removeprefix("file://")))
    return a == b or a.startswith(b.rstrip("/") + "/")
