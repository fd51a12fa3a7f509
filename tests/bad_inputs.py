"""The corpus of bad inputs, as data: one small function per KIND that adds its files to a dataset folder.

`KINDS` is the table the parametrised test in test_bad_inputs.py runs over: what each kind writes, what
`scan` must say about it (None where the header-only scan cannot see it: broken pixel data shows when
it is decoded, and the run's report names it), whether `train` completes (exit 0) or stops with one line
(exit 2), which images the run's skipped.jsonl must list (with the stage that left them out), and text
the run prints.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    """A PNG file from its IHDR fields and the (compressed) IDAT payload, every chunk CRC valid."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def broken_png(path: Path, size: tuple[int, int] = (64, 64)) -> None:
    """Valid signature, IHDR and chunk CRCs; the IDAT deflate stream is garbage (reserved block type)."""
    path.write_bytes(png(size[0], size[1], 8, 2, b"\x78\x9c" + b"\xff" * 200))


def bomb_png(path: Path, side: int = 30000) -> None:
    """A real decompression bomb: side x side 1-bit pixels (900 M at 30000, over twice Pillow's
    MAX_IMAGE_PIXELS), all zero, about 110 KB compressed."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    parts = [packer.compress(row * 1000) for _ in range(side // 1000)]
    parts.append(packer.compress(row * (side % 1000)) + packer.flush())
    path.write_bytes(png(side, side, 1, 0, b"".join(parts)))


def gradient16() -> np.ndarray:
    """A 64x64 16-bit gradient from 0 to 65535 (left to right)."""
    return np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (64, 1))


def gray16_png(path: Path) -> None:
    Image.fromarray(gradient16()).save(path)  # Pillow writes mode I;16 as a 16-bit grayscale PNG


def rgb48_png(path: Path) -> None:
    """A 48-bit RGB PNG (16 bits per channel): the gradient in red, its mirror in green, half in blue."""
    red = gradient16()
    pixels = np.stack([red, red[:, ::-1], red // 2], axis=-1).astype(">u2")
    rows = b"".join(b"\x00" + pixels[y].tobytes() for y in range(64))
    path.write_bytes(png(64, 64, 16, 2, zlib.compress(rows)))


def _caption(path: Path, text: str = "a grey picture") -> None:
    path.with_suffix(".txt").write_text(text + "\n")


# ------------------------------------------------------------------------------------- the kinds


def add_broken(folder: Path) -> list[str]:
    broken_png(folder / "broken.png")
    _caption(folder / "broken.png")
    return ["broken.png"]


def add_bomb(folder: Path) -> list[str]:
    bomb_png(folder / "bomb.png")
    _caption(folder / "bomb.png")
    return ["bomb.png"]


def add_failing_bucket(folder: Path) -> list[str]:
    """Two broken images with an aspect ratio (4:1) no other image has: a bucket whose every image fails."""
    names = ["wide-a.png", "wide-b.png"]
    for name in names:
        broken_png(folder / name, (128, 32))
        _caption(folder / name)
    return names


def add_16bit(folder: Path) -> list[str]:
    gray16_png(folder / "gray16.png")
    rgb48_png(folder / "rgb48.png")
    _caption(folder / "gray16.png")
    _caption(folder / "rgb48.png")
    return []


def add_latin1_caption(folder: Path) -> list[str]:
    Image.new("RGB", (64, 64), (200, 120, 40)).save(folder / "cafe.png")
    (folder / "cafe.txt").write_bytes("a café in orange, señor\n".encode("latin-1"))
    return []


def add_unreadable_caption(folder: Path) -> list[str]:
    Image.new("RGB", (64, 64), (10, 200, 40)).save(folder / "secret.png")
    _caption(folder / "secret.png")
    os.chmod(folder / "secret.txt", 0)
    return ["secret.png"]


def add_self_symlink(folder: Path) -> list[str]:
    os.symlink("loop.png", folder / "loop.png")
    return ["loop.png"]


def add_tiny(folder: Path) -> list[str]:
    Image.new("RGB", (1, 1), (255, 0, 0)).save(folder / "dot.png")
    _caption(folder / "dot.png")
    return []


def only_broken(folder: Path) -> list[str]:
    """A dataset with no good image at all (replaces the good ones)."""
    for entry in folder.iterdir():
        entry.unlink()
    names = [f"b{i}.png" for i in range(4)]
    for name in names:
        broken_png(folder / name)
        _caption(folder / name)
    return names


@dataclass(frozen=True)
class Kind:
    name: str
    write: Callable[[Path], list[str]]  # adds files; returns the images the run must leave out
    scan_says: str | None  # text the scan report must show (None: the header scan cannot see it)
    exit_code: int  # of `simpletuner train`
    stage: str | None  # stage in skipped.jsonl of the left-out images
    run_says: tuple[str, ...] = field(default_factory=tuple)  # text train's output must show
    unprivileged: bool = False  # needs a process without CAP_DAC_OVERRIDE when run as root


KINDS = [
    Kind("broken-png", add_broken, None, 0, "cache", ("broken.png", "FAILED and skipped")),
    Kind("decompression-bomb", add_bomb, "over Pillow's decompression-bomb limit", 0, "scan"),
    Kind("bucket-all-failing", add_failing_bucket, None, 0, "cache", ("has no image left", "dropped")),
    Kind("16-bit", add_16bit, None, 0, None),
    Kind("latin-1-caption", add_latin1_caption, None, 0, None, ("cafe.txt is not UTF-8", "read it as cp1252")),
    Kind("unreadable-caption", add_unreadable_caption, "caption unreadable", 0, "caption", unprivileged=True),
    Kind("self-symlink", add_self_symlink, "Too many levels of symbolic links", 0, "scan"),
    Kind("1x1", add_tiny, "enlarged more than 2x", 0, None),
    Kind("every-image-broken", only_broken, None, 2, "cache", ("no image is left to train on",)),
]
