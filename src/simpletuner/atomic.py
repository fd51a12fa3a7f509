"""Files that appear whole or not at all: write under a temporary name beside the target, then rename."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def written_atomically(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """A temporary name beside `path` (`.tmp-<name>`) for the block to write to.

    When the block ends without error the file is made `mode` (if given) and renamed over `path`, so
    a reader sees the old file or the whole new one; otherwise the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".tmp-{path.name}")
    try:
        yield temp
        if mode is not None:
            os.chmod(temp, mode)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
