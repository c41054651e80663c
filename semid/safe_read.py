"""Reading small files that may have been crafted, with the work bounded before it starts.

- YAML (:func:`load_yaml`, :func:`yaml_value`): safe tags only, no anchors or aliases (a 2 KB "billion laughs" file
  expands to gigabytes through them; semid never writes one), and a size cap on the file.
- JSON lines (:func:`json_object`): one line, one JSON object; anything else is an error naming the file and line.
- ``.npy`` (:func:`check_npy`) and ``.npz`` (:func:`check_npz`): the array header's shape and dtype, and for a zip
  member its sizes in the zip directory, are read and checked against the bytes really there before any array is
  read: a header claiming a huge shape, or a member that inflates a thousandfold (a zip bomb), is refused naming the
  file, instead of numpy allocating first.

Every error is a ValueError naming the file (and the array or line) and what to do.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from numbers import Integral
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import yaml

MAX_YAML_BYTES = 1 << 20  # a run's config.yaml is a few KB
MAX_ZIP_RATIO = 100  # semid writes .npz members stored (ratio 1); deflate reaches ~1000:1 on a bomb's zeros
_ZIP_SLACK = 1 << 16  # small members (headers, a JSON string) may compress better than MAX_ZIP_RATIO


# ---- YAML --------------------------------------------------------------------------------------------------------
class NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors (``&a``) and aliases (``*a``, ``<<: *a``) where it meets them, so a
    document that would expand exponentially fails at its first anchor."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, "anchors and aliases (&name, *name) are not allowed here (semid never writes them)", event.start_mark
            )
        return super().compose_node(parent, index)


def load_yaml(path: str | os.PathLike[str], *, max_bytes: int = MAX_YAML_BYTES) -> Any:
    """The YAML document in ``path``, read with :class:`NoAliasLoader` once its size is checked.

    Raises ValueError naming the file when it is larger than ``max_bytes``; YAML errors (``yaml.YAMLError``) and
    ``UnicodeDecodeError`` are left to the caller, which knows what the file is.
    """
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path}: {size:,} bytes, more than the {max_bytes:,} a semid YAML file may have; restore the file semid wrote")
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=NoAliasLoader)  # noqa: S506 (NoAliasLoader is a SafeLoader)


def yaml_value(text: str, where: str) -> Any:
    """One YAML-typed value given on the command line (``KEY=VALUE``): plain scalars, lists and mappings only.

    Args:
        where: what to name in the error, e.g. "`--model-option d_model`".
    """
    if len(text) > 10_000:
        raise ValueError(f"{where}: a value of {len(text):,} characters; give a plain number, string, list or mapping")
    try:
        return yaml.load(text, Loader=NoAliasLoader)  # noqa: S506
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{where}: {text!r} is not a plain YAML value ({problem}); give a number, string, true/false or a list") from None


# ---- values ------------------------------------------------------------------------------------------------------
def lone_surrogate(text: str) -> str | None:
    """The first lone surrogate in ``text`` (JSON's "\\ud800" or a Python literal's escape decode to one: not a
    character, so no UTF-8 file can hold it and every later writer fails), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return text[e.start : e.end]
    return None


def is_int(value: object) -> bool:
    """An integer given by a caller: Python's or numpy's (``np.int64`` from an array), never a bool (``np.bool_`` is no
    ``Integral``): the one test behind the argument checks that take numpy's ints."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def int64_of(name: str, x: object) -> Any:
    """``x`` (integers: a list, numpy array or tensor) as int64 of the same kind (a list becomes an array); a TypeError
    naming ``name`` for floats, bools or complex values (1.9 was item 1; a float code made float tokens), a ValueError
    for uint64 values beyond int64. The one integer-array check of the library's lookups and conversions."""
    import torch

    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"`{name}` must hold integers, got a tensor of {x.dtype}")
        return x.long()
    arr = np.asarray(x)
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"`{name}` must hold integers, got an array of {arr.dtype}")
    if arr.dtype == np.uint64 and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"`{name}` holds {int(arr.max())}, beyond int64")
    return arr.astype(np.int64, copy=False)


# ---- JSON lines --------------------------------------------------------------------------------------------------
def cut(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters ("..." at the end): what an error shows of a value, never all of it."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def repeated_key(pairs: list[tuple[str, Any]]) -> str | None:
    """The first key of a JSON object's (key, value) pairs given a second time; None where each is given once."""
    if len({k for k, _ in pairs}) == len(pairs):
        return None
    seen: set[str] = set()
    return next(k for k, _ in pairs if k in seen or seen.add(k))


class _Twice(Exception):
    """A key given twice in one JSON object (which one was meant is not ours to guess)."""


def _once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if (key := repeated_key(pairs)) is not None:
        raise _Twice(key)
    return dict(pairs)


def json_object(line: str, where: str, *, once: bool = False) -> dict[str, Any]:
    """The JSON object on one line of a JSON-lines file; ``where`` (``"path:lineno"``) is named in the error. ``once``:
    each key given once (semid's own files; a raw download's repeats are its publisher's, read as ``json`` reads them)."""
    try:
        rec = json.loads(line, object_pairs_hook=_once if once else None)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    except _Twice as e:
        raise ValueError(f"{where}: the key `{cut(str(e))}` is given twice in one object: keep one") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deep to read; write plain objects of strings, numbers and "
                         "lists") from None
    except ValueError:  # (an integer of more than 4,300 digits)
        raise ValueError(f"{where}: a number of more than 4,300 digits; ids and counts have at most 19") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    return rec


# ---- .npy and .npz: headers before data --------------------------------------------------------------------------
class NpyHeader(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int  # what the data needs: prod(shape) * itemsize
    offset: int  # bytes before the data


def read_npy_header(f: IO[bytes], where: str) -> NpyHeader:
    """The header of the ``.npy`` stream ``f`` (positioned at its start), checked to describe plain data."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"format version {version} (this semid reads 1.0 and 2.0)")
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise ValueError(f"{where}: not a readable .npy array header ({e})") from None
    if dtype.hasobject:
        raise ValueError(f"{where}: holds Python objects (dtype {dtype}), which semid never reads (they would be unpickled)")
    nbytes = math.prod(int(n) for n in shape) * dtype.itemsize
    return NpyHeader(tuple(int(n) for n in shape), dtype, nbytes, f.tell())


def _claims(where: str, h: NpyHeader, available: int) -> ValueError:
    return ValueError(
        f"{where}: its header claims an array of shape {h.shape} {h.dtype} ({h.nbytes:,} bytes), but the file holds "
        f"{available:,} bytes of data: the file is truncated, damaged or crafted; write it again"
    )


def check_npy(path: str | os.PathLike[str]) -> NpyHeader:
    """The header of the ``.npy`` file ``path``, refused unless the data it describes is exactly what the file holds
    (so ``np.load`` allocates no more than the file's size)."""
    path = Path(path)
    with open(path, "rb") as f:
        h = read_npy_header(f, str(path))
    available = path.stat().st_size - h.offset
    if h.nbytes != available:
        raise _claims(str(path), h, available)
    return h


def check_npz(path: str | os.PathLike[str]) -> dict[str, NpyHeader]:
    """The header of every array in the ``.npz`` file ``path`` (by name), read from the zip without inflating the
    data. Refused, naming the file and the array: a member that inflates more than :data:`MAX_ZIP_RATIO` times (a
    zip bomb), a header whose data is not the member's size, and arrays of Python objects."""
    path = Path(path)
    out = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            name = info.filename.removesuffix(".npy")
            where = f"{path}: array `{name}`"
            if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_ZIP_RATIO * info.compress_size + _ZIP_SLACK:
                raise ValueError(
                    f"{where} inflates from {info.compress_size:,} to {info.file_size:,} bytes (more than {MAX_ZIP_RATIO}:1): "
                    "refused as a zip bomb; semid writes these files uncompressed: write it again"
                )
            with z.open(info) as f:
                h = read_npy_header(f, where)
            if h.offset + h.nbytes != info.file_size:
                raise _claims(where, h, info.file_size - h.offset)
            out[name] = h
    return out


NPY_MAGIC = b"\x93NUMPY"  # the first bytes of every .npy file


def read_npy(path: str | os.PathLike[str], *, mmap: bool = False) -> np.ndarray:
    """The array in an ``.npy`` file of item embeddings (never pickled objects), unchecked otherwise; ``mmap``: mapped
    read-only, its rows read when used.

    A missing, empty, truncated or foreign file is a FileNotFoundError / ValueError naming it and saying what to do
    (numpy's own errors are an ``EOFError`` for an empty file, and advice to unpickle a foreign one).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no embeddings file here (write one with `semid embed`)")
    again = "write it again (`semid embed`, or numpy.save)"
    with open(path, "rb") as f:
        head = f.read(len(NPY_MAGIC))
    if not head:
        raise ValueError(f"{path}: not a readable .npy array: the file is empty (0 bytes); {again}")
    if head != NPY_MAGIC:
        raise ValueError(f"{path}: not a readable .npy array: it starts with {head!r}, not {NPY_MAGIC!r}; {again}")
    try:
        check_npy(path)  # the header's shape against the file's size, before numpy allocates it
    except ValueError as e:
        if "Python objects" in str(e):  # not damage: an array semid refuses to read
            raise ValueError(f"{e}; save the vectors as a float array (`semid embed`, or numpy.save of a float32 "
                             "array)") from None
        detail = str(e).removeprefix(f"{path}: ").removeprefix("not a readable .npy array header ").strip("()")
        raise ValueError(f"{path}: not a readable .npy array: truncated or damaged ({detail.removesuffix('; write it again')}); "
                         f"{again}") from None
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy array: truncated or damaged ({e}); {again}") from None


def npy_rows(path: str | os.PathLike[str], lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of the 2-D array in the ``.npy`` file ``path`` (checked by ``semid.data.read_npy`` first), read alone
    into memory of their own: a large file compared a chunk at a time never holds more than the chunk (a mapped file's
    pages stay resident once read)."""
    h = check_npy(path)
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        _, fortran, _ = read(f)
        if fortran or len(h.shape) != 2:  # (columns first: a row is not contiguous)
            return np.array(np.load(path, mmap_mode="r", allow_pickle=False)[lo:hi])
        width = h.shape[1]
        f.seek(h.offset + lo * width * h.dtype.itemsize)
        return np.fromfile(f, dtype=h.dtype, count=(hi - lo) * width).reshape(hi - lo, width)
