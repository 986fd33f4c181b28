"""Reading rows of a 2-d float16/float32 .npy with plain reads (sources of vectors and segments share it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

VECTOR_DTYPES = ("float32", "float16")


def _npy_header(f) -> tuple[int, tuple, np.dtype]:
    """(data offset, shape, dtype) from an open .npy's header; ValueError unless a C-ordered float16/32 array."""
    f.seek(0)
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"unsupported .npy format version {version}")
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran or dtype.name not in VECTOR_DTYPES or dtype.byteorder == ">":
        raise ValueError(f"not a C-ordered float16/float32 array ({dtype}, fortran order {fortran})")
    return f.tell(), tuple(shape), dtype


def npy_layout(path: Path) -> tuple[int, tuple, np.dtype]:
    """(data offset, shape, dtype) of a C-ordered float16/float32 .npy file, from its header (_npy_header)."""
    with open(path, "rb") as f:
        return _npy_header(f)


def read_npy_rows(path: Path, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Rows lo..hi of a 2-d .npy with plain reads: streaming a file through a memory map would leave every
    page it touched resident (and counted in the process's RSS) for as long as the map lives."""
    offset, shape, dtype = npy_layout(path)
    hi = shape[0] if hi is None else min(hi, shape[0])
    row = int(np.prod(shape[1:])) * dtype.itemsize
    with open(path, "rb") as f:
        f.seek(offset + lo * row)
        out = np.fromfile(f, dtype=dtype, count=max(0, hi - lo) * row // dtype.itemsize)
    return out.reshape((max(0, hi - lo),) + tuple(shape[1:]))
