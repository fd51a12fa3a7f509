"""A large JSON configuration read without making a Python object of every top-level key.

A file with millions of unknown options (issue 12's probe holds 2.5 million) takes seconds to read into a dict.
`select` keeps only what the checks use: the entries whose names are recognised, the first `unknown` others in
file order, and the number of entries it left out. It works on the bytes with msgspec (which checks the syntax in
C) and numpy (which finds the top-level names and hashes them, in 32-bit positions and in chunks, so that the
memory it touches stays a few times the file's size), and returns None, so that the caller reads the whole file
as before, whenever the result could differ from reading it whole:

- not JSON that msgspec accepts (Infinity, NaN, a trailing comma, ...), or a top level that is not an object;
- a backslash anywhere (a name may be written with escapes), or a file of 2 GiB or more;
- a number that may have more digits than Python converts to an int (reading the file whole reports it);
- containers nested `max_depth` levels deep or more (reading the file whole reports the exact limit);
- two top-level names that are the same once a leading "--" is dropped (or whose hashes collide), or a name
  longer than MAX_NAME_BYTES.

So every top-level name in a selection is distinct, and the count of left-out entries is a count of names.
"""

from __future__ import annotations

import sys
from collections.abc import Collection
from dataclasses import dataclass

import msgspec
import numpy as np

MAX_NAME_BYTES = 256
_CHUNK = 1 << 22  # bytes marked at a time
_TABLE_SIZE = 1 << 20  # bits of the first, approximate test for recognised names
_QUOTE, _COLON, _DASH, _OPEN_OBJECT = 34, 58, 45, 123
_QUOTE_MARK, _OPEN_MARK, _CLOSE_MARK = 1, 2, 3
# bytes.translate table: a quote, an opening and a closing bracket become 1, 2 and 3; every other byte 0
_MARKS = bytes({_QUOTE: _QUOTE_MARK, ord("{"): _OPEN_MARK, ord("["): _OPEN_MARK, ord("}"): _CLOSE_MARK,
                ord("]"): _CLOSE_MARK}.get(byte, 0) for byte in range(256))
_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_MASKS = np.array([(1 << (8 * n)) - 1 for n in range(9)], dtype=np.uint64)  # the low n bytes of a word
_MIX = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class Selection:
    """The kept entries as a JSON object (in file order, as written), and how many entries were left out."""

    text: str
    left_out: int


@dataclass
class _TopLevel:
    """The top-level entries: where each key's opening quote, name (after any "--"), closing quote and colon are,
    and where the object closes."""

    opens: np.ndarray
    names: np.ndarray
    closes: np.ndarray
    colons: np.ndarray
    end: int


def select(data: bytes, recognised: Collection[str], unknown: int, max_depth: int) -> Selection | None:
    """The entries of the JSON object `data` whose names (without a leading "--") are in `recognised`, and the
    first `unknown` others; None when the whole file must be read instead (see the module's list)."""
    if _unsupported(data) or (top := _top_level(data, max_depth)) is None:
        return None
    lengths = top.closes - top.names
    if lengths.max(initial=0) > MAX_NAME_BYTES:
        return None
    hashes = _hashes(data, top.names, lengths)
    ordered = np.sort(hashes)
    if (ordered[1:] == ordered[:-1]).any():
        return None  # a name given twice (or two hashes alike): only a dict tells which value wins
    kept = set()
    for index in _recognised(hashes, recognised).tolist():
        if data[top.names[index]: top.closes[index]].decode() not in recognised:
            return None  # a hash alike a recognised name's
        kept.add(index)
    others = 0
    for index in range(len(top.opens)):
        if others == unknown:
            break
        if index not in kept:
            kept.add(index)
            others += 1
    body = b",".join(_entry(data, top, index) for index in sorted(kept))
    return Selection(text=(b"{" + body + b"}").decode(), left_out=len(top.opens) - len(kept))


def _unsupported(data: bytes) -> bool:
    """Whether `data` needs the whole-file reading (see the module's list), before looking at its structure."""
    if b"\\" in data or len(data) >= 2**31:
        return True
    try:
        msgspec.json.decode(data, type=msgspec.Raw)
    except (msgspec.DecodeError, RecursionError):  # nesting too deep for msgspec is reported by the whole reading
        return True
    return not data.lstrip().startswith(b"{")


def _marked(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Positions (int32) of the quotes and brackets of `data` (inside strings too), and their marks."""
    positions, marks = [], []
    for start in range(0, len(data), _CHUNK):
        chunk = np.frombuffer(data[start: start + _CHUNK].translate(_MARKS), dtype=np.uint8)
        found = np.flatnonzero(chunk)
        marks.append(chunk[found])
        positions.append(found.astype(np.int32) + np.int32(start))
    return np.concatenate(positions), np.concatenate(marks)


def _long_number(data: bytes, quotes: np.ndarray) -> bool:
    """Whether a number outside strings may have more digits than Python converts to an int: only possible where
    two quotes (or a quote and an end of the file) lie further apart than that limit."""
    limit = sys.get_int_max_str_digits()
    if not limit:
        return False
    if quotes.size and max(int(np.diff(quotes).max(initial=0)), int(quotes[0]), len(data) - int(quotes[-1])) <= limit:
        return False
    return b"0" * (limit + 1) in data.translate(_DIGITS)


def _skip_space(array: np.ndarray, positions: np.ndarray) -> np.ndarray | None:
    """`positions` (changed in place) each moved past JSON whitespace; None when some need more than 16 steps."""
    pending = np.flatnonzero(_is_space(array[positions]))
    for _ in range(16):
        if pending.size == 0:
            return positions
        positions[pending] += 1
        pending = pending[_is_space(array[positions[pending]])]
    return None if pending.size else positions


def _is_space(values: np.ndarray) -> np.ndarray:
    return (values == 32) | (values == 10) | (values == 13) | (values == 9)


def _top_level(data: bytes, max_depth: int) -> _TopLevel | None:
    array = np.frombuffer(data, dtype=np.uint8)
    positions, marks = _marked(data)
    quotes = positions[marks == _QUOTE_MARK]  # no backslash: strings are the pairs of quotes, in order
    brackets = positions[marks != _QUOTE_MARK]
    del positions, marks
    if _long_number(data, quotes):
        return None
    brackets = brackets[np.searchsorted(quotes, brackets) % 2 == 0]  # outside strings
    depths = np.cumsum(np.where(np.isin(array[brackets], (ord("{"), ord("["))), 1, -1))
    if depths.max(initial=0) >= max_depth or array[brackets[0]] != _OPEN_OBJECT:
        return None
    opens, closes = quotes[0::2], quotes[1::2]
    colons = _skip_space(array, closes + np.int32(1))
    if colons is None:
        return None
    is_key = array[colons] == _COLON
    if brackets.size > 2:  # else every key is in the top-level object
        is_key &= depths[np.searchsorted(brackets, opens) - 1] == 1
    opens, closes, colons = opens[is_key], closes[is_key], colons[is_key]
    names = opens + np.int32(1)
    dashed = (array[names] == _DASH) & (array[np.minimum(names + 1, closes)] == _DASH) & (closes - names >= 2)
    names += 2 * dashed.astype(np.int32)
    return _TopLevel(opens, names, closes, colons, int(brackets[-1]))


def _hashes(data: bytes, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each byte string data[start: start + length], read 8 bytes at a time. In place: the
    arrays may be long. Strings within 8 bytes of the end are hashed again from a padded copy of the end."""
    if len(data) < 8:
        data += bytes(8)
    hashes = _hashes_within(data, starts, lengths)
    tail = np.flatnonzero(starts + lengths > len(data) - 8)
    if tail.size:
        first = int(starts[tail].min())
        padded = data[first:] + bytes(8)
        hashes[tail] = _hashes_within(padded, starts[tail] - np.int32(first), lengths[tail])
    return hashes


def _hashes_within(data: bytes, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """_hashes for strings that end at least 8 bytes before the end of `data` (others get wrong hashes)."""
    words = np.ndarray(shape=(len(data) - 7,), dtype="<u8", buffer=data, strides=(1,))  # one at each byte
    hashes = lengths.astype(np.uint64)
    hashes *= _MIX
    index, rest, mask = np.empty_like(starts), np.empty_like(lengths), np.empty_like(hashes)
    for offset in range(0, int(lengths.max(initial=0)), 8):
        np.add(starts, offset, out=index)
        np.minimum(index, len(words) - 1, out=index)
        word = words[index]  # (np.take would first copy the strided view whole)
        np.subtract(lengths, offset, out=rest)
        np.clip(rest, 0, 8, out=rest)
        np.take(_MASKS, rest, out=mask)  # the bytes of the string, none after it
        word &= mask
        active = rest > 0  # a string is mixed once per 8 of its bytes, however long the others are
        np.bitwise_xor(hashes, word, out=hashes, where=active)
        np.multiply(hashes, _MIX, out=hashes, where=active)
        np.right_shift(hashes, np.uint64(29), out=mask)
        np.bitwise_xor(hashes, mask, out=hashes, where=active)
    return hashes


def _recognised(hashes: np.ndarray, recognised: Collection[str]) -> np.ndarray:
    """Indices of the hashes equal to the hash of a recognised name: first through a table of _TABLE_SIZE bits
    (one gather), then exactly for the few that pass."""
    names = [name.encode() for name in recognised] or [b""]
    buffer = b"".join(names)
    lengths = np.array([len(name) for name in names], dtype=np.int32)
    known = np.sort(_hashes(buffer, (np.cumsum(lengths) - lengths).astype(np.int32), lengths))
    table = np.zeros(_TABLE_SIZE, dtype=bool)
    table[known & np.uint64(_TABLE_SIZE - 1)] = True
    candidates = np.flatnonzero(table[hashes & np.uint64(_TABLE_SIZE - 1)])
    slots = np.minimum(np.searchsorted(known, hashes[candidates]), len(known) - 1)
    return candidates[known[slots] == hashes[candidates]]


def _entry(data: bytes, top: _TopLevel, index: int) -> bytes:
    """Entry `index` as written: its key, the colon and its value (without the comma after it)."""
    last = index + 1 == len(top.opens)
    value = data[top.colons[index] + 1: top.end if last else top.opens[index + 1]].rstrip()
    if not last:
        value = value[:-1]  # the comma between entries
    return data[top.opens[index]: top.colons[index] + 1] + value
