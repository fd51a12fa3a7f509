"""One training run per output_dir: a lock file holding the owner's pid and host.

`output_dir/.simpletuner.lock` is created exclusively (O_CREAT | O_EXCL) by the main process
when a run starts and removed when it ends. A second run on the same folder is refused
with a message naming the owner. A lock left by a run that died (kill -9, power loss) is
stale when its host is this host and its pid is no longer alive: it is replaced with a
warning. A lock from another host cannot be checked from here, nor one whose pid was reused by
another process since; the message says which file to delete once that run is known to be gone.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from simpletuner.errors import UserError
from simpletuner.log import get_logger

logger = get_logger(__name__)

LOCK_NAME = ".simpletuner.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written or damaged: treated as held by an unknown owner
    return owner if isinstance(owner, dict) else {}


def _is_stale(owner: dict[str, Any]) -> bool:
    pid = owner.get("pid")
    return owner.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


def acquire(output_dir: str | os.PathLike[str]) -> Path:
    """Take the lock of `output_dir` (created if needed) or raise a UserError naming its owner."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for _ in range(3):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read(path)
            if owner is None:
                continue  # released in between: try again
            if _is_stale(owner):
                logger.warning("removing a stale run lock %s (pid %s on this host is not running)", path,
                               owner.get("pid"))
                path.unlink(missing_ok=True)
                continue
            raise UserError(f"output_dir {str(folder)!r} is in use by another training run (pid "
                            f"{owner.get('pid', '?')} on host {owner.get('host', '?')}, started "
                            f"{owner.get('started', '?')}): wait for it to end, or train into another output_dir; "
                            f"if that run is gone, delete {path}") from None
        except OSError as error:
            raise UserError(f"output_dir {str(folder)!r}: cannot create the run lock {path} "
                            f"({error.strerror or error})") from None
        with os.fdopen(descriptor, "w") as handle:
            handle.write(json.dumps(me))
        return path
    raise UserError(f"output_dir {str(folder)!r}: could not take the run lock {path}; try again")


def release(path: Path) -> None:
    """Remove the lock if this process still owns it."""
    owner = _read(path)
    if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextmanager
def run_lock(output_dir: str | os.PathLike[str], enabled: bool = True) -> Iterator[None]:
    """Hold the output_dir lock for the block (`enabled` False on all but the main process)."""
    if not enabled:
        yield
        return
    path = acquire(output_dir)
    try:
        yield
    finally:
        release(path)
