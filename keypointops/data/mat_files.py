"""A reader of the numeric matrices of MATLAB level-5 ``.mat`` files (MATLAB's ``save -v7`` and
earlier, ``scipy.io.savemat``), the format of the MARS and iLIDS-VID split files.

The dataset files come from the internet, and scipy's reader crashes the process (segmentation
fault, bus error) on some damaged files, so the datasets read them here instead: a file is a
128-byte header then data elements, each an 8-byte tag ``(type, byte count)`` (or a 4-byte
"small element" tag) and its data padded to 8 bytes; a ``miCOMPRESSED`` element holds one
zlib-compressed element; a ``miMATRIX`` element holds the array flags (its class), the
dimensions, the name and the real part (column-major). Only real full numeric matrices are read;
every check is on lengths before any copy, and any other content or damage raises a one-line
``ValueError`` naming the file. Memory: the file and one decompressed element at a time, the
decompressed size capped at :data:`MAX_ELEMENT_BYTES`.
"""
from __future__ import annotations

import os
import zlib

import numpy as np

__all__ = ["read_mat", "MAX_ELEMENT_BYTES"]

#: The largest decompressed element accepted (a guard against a compression bomb).
MAX_ELEMENT_BYTES = 1 << 30

_MI_MATRIX, _MI_COMPRESSED = 14, 15
# Data element types -> numpy type codes (without byte order).
_MI_TYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
# Numeric array classes -> numpy type codes of the returned array.
_MX_CLASSES = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
_COMPLEX_FLAG = 0x0800


class _Damaged(Exception):
    """A reason the file cannot be read (becomes the ValueError naming the file)."""


def read_mat(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The named numeric matrices of the level-5 .mat file ``path`` (each 2-D or more, as saved)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        if len(data) < 128:
            raise _Damaged(f"{len(data)} bytes, shorter than the 128-byte header")
        if data[126:128] not in (b"IM", b"MI"):
            raise _Damaged("not a MATLAB level-5 file (MATLAB 7.3 / HDF5 files: save with -v7)")
        order = "<" if data[126:128] == b"IM" else ">"
        arrays = {}
        for kind, body in _elements(data, 128, order):
            if kind == _MI_COMPRESSED:
                body = _inflate(body)
                kind, body = next(_elements(body, 0, order), (None, b""))
            if kind == _MI_MATRIX:
                name, array = _matrix(body, order)
                arrays[name] = array
        return arrays
    except _Damaged as err:
        raise ValueError(f"{os.fspath(path)}: unreadable .mat file: {err}") from None


def _elements(data: bytes, offset: int, order: str):
    """``(type, data)`` of each data element of ``data`` from ``offset``."""
    while offset < len(data):
        if offset + 8 > len(data):
            raise _Damaged(f"a truncated element tag at byte {offset}")
        first, second = np.frombuffer(data, f"{order}u4", 2, offset).tolist()
        if first >> 16:  # small data element: type and size in the first word, data in the second
            kind, size, start, end = first & 0xFFFF, first >> 16, offset + 4, offset + 8
            if size > 4:
                raise _Damaged(f"a small element of {size} > 4 bytes at byte {offset}")
        else:
            kind, size, start = first, second, offset + 8
            # compressed elements are not padded to 8 bytes; all others are
            end = start + (size if kind == _MI_COMPRESSED else -(-size // 8) * 8)
        if start + size > len(data):
            raise _Damaged(f"an element of {size} bytes at byte {offset} runs past the end ({len(data)} bytes)")
        yield kind, data[start:start + size]
        offset = max(end, start + size)


def _inflate(body: bytes) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(body, MAX_ELEMENT_BYTES)
    except zlib.error as err:
        raise _Damaged(f"a damaged compressed element ({err})") from None
    if inflater.unconsumed_tail:
        raise _Damaged(f"a compressed element larger than {MAX_ELEMENT_BYTES} bytes")
    return out


def _typed(kind: int, body: bytes, order: str) -> np.ndarray:
    if kind not in _MI_TYPES:
        raise _Damaged(f"an element of unknown data type {kind}")
    dtype = np.dtype(order + _MI_TYPES[kind])
    if len(body) % dtype.itemsize:
        raise _Damaged(f"{len(body)} bytes of {dtype.name} data")
    return np.frombuffer(body, dtype)


def _matrix(body: bytes, order: str) -> tuple[str, np.ndarray]:
    """The name and array of a ``miMATRIX`` element's data."""
    parts = list(_elements(body, 0, order))
    if len(parts) < 4:
        raise _Damaged(f"a matrix of {len(parts)} parts (flags, dimensions, name, data expected)")
    (flags_kind, flags), (dims_kind, dims), (name_kind, name), (data_kind, values) = parts[:4]
    flags = _typed(flags_kind, flags, order)
    if flags.size < 1:
        raise _Damaged("a matrix without array flags")
    klass, complex_ = int(flags[0]) & 0xFF, int(flags[0]) & _COMPLEX_FLAG
    try:
        name = _typed(name_kind, name, order).astype(np.uint8).tobytes().decode("ascii")
    except UnicodeDecodeError:
        raise _Damaged("a matrix name that is not ASCII") from None
    if klass not in _MX_CLASSES or complex_:
        raise _Damaged(f"variable {name!r} is not a real numeric matrix (class {klass})")
    shape = _typed(dims_kind, dims, order).astype(np.int64)
    if shape.size < 2 or (shape < 0).any():
        raise _Damaged(f"variable {name!r} has dimensions {shape.tolist()}")
    values = _typed(data_kind, values, order)
    if values.size != int(np.prod(shape.astype(object))):
        raise _Damaged(f"variable {name!r} holds {values.size} values for dimensions {shape.tolist()}")
    return name, values.astype(_MX_CLASSES[klass]).reshape(shape.tolist(), order="F")
