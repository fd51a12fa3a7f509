"""Write failures at the run's output boundary (checkpoints, export) as one line a person can act on.

A full disk shows up as OSError 28 from Python, as a SafetensorError ("No space left on
device") from safetensors, or as a RuntimeError from torch's zip writer (inline_container:
"file write failed" or "unexpected pos", no errno). All three, and any other OSError (quota, read-only folder, file too
large), become a UserError that says what could not be written, why, how much space is
left, and what is still intact. Other RuntimeErrors are bugs and pass through.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from simpletuner.errors import UserError

_WRITE_WORDS = ("write", "space", "file", "inline_container", "pytorchstreamwriter")


def _free_text(folder: Path) -> str:
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return f"{shutil.disk_usage(candidate).free / 2**20:.1f} MiB free there"
            except OSError:
                return "free space unknown"
    return "free space unknown"


def _reason(error: BaseException) -> str | None:
    """Why a write failed, or None when `error` is not a write failure."""
    text = str(error)
    if isinstance(error, OSError):
        if error.errno == errno.ENOSPC:
            return "no space left on device"
        return error.strerror or text
    if "No space left" in text or "StorageFull" in text:
        return "no space left on device"
    if type(error).__name__ == "SafetensorError" or (
            isinstance(error, RuntimeError) and any(word in text.lower() for word in _WRITE_WORDS)):
        first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        return f"a file could not be written ({first})"
    return None


@contextmanager
def explained_write_errors(what: str, folder: Path, intact: str) -> Iterator[None]:
    """Turn a failed write inside the block into a UserError: 'cannot WHAT: reason (free space); INTACT'."""
    try:
        yield
    except UserError:
        raise
    except (OSError, RuntimeError) as error:
        reason = _reason(error)
        if reason is None:
            raise
        raise UserError(f"cannot {what}: {reason} ({_free_text(folder)}); {intact}") from error
    except Exception as error:  # safetensors' SafetensorError derives from Exception only
        reason = _reason(error) if type(error).__name__ == "SafetensorError" else None
        if reason is None:
            raise
        raise UserError(f"cannot {what}: {reason} ({_free_text(folder)}); {intact}") from error
