"""Read the tensors of a PyTorch(-Lightning) checkpoint without executing anything from its pickle.

A `.ckpt` from CompVis/latent-diffusion is a `torch.save` zip (PyTorch >= 1.6 "zip" serialization:
`ARCHIVE/data.pkl` plus one raw file per storage in `ARCHIVE/data/KEY`, see
`torch/serialization.py`). Its pickle also carries Lightning bookkeeping, e.g. the `callbacks` dict
keyed by the class `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`, so
`torch.load(weights_only=True)` refuses it and a plain `torch.load` would import (and could run)
anything. Checkpoints are untrusted input, hence this restricted unpickler:

- `find_class` returns our own tensor-rebuilding functions and plain containers from an allow-list;
  any other global becomes an inert stub class that may be *stored* (as the Lightning class is, as
  a dict key) but raises `UnsafeCheckpoint` naming the global the moment the pickle tries to call
  it (REDUCE, NEWOBJ, INST, OBJ) or to set its state (BUILD). Nothing outside the allow-list runs.
- `persistent_load` gives each storage as a flat tensor of its dtype over the checkpoint's bytes,
  memory-mapped (copy-on-write) where the zip stores it uncompressed, as `torch.save` does: nothing
  is read until a tensor is used, so converting a 5 GB checkpoint touches only the weights it keeps
  (EMA or raw, never optimizer state) and needs no second copy in memory (`torch.load(mmap=True)`
  does the same). Compressed or misaligned entries are read into memory instead. Tensors are
  views made with `as_strided`, like `torch._utils._rebuild_tensor` does.

The legacy (pre-1.6, non-zip) format is refused.
"""

import collections
import mmap
import pickle
import struct
import zipfile
from pathlib import Path

import torch

from ...errors import RDMError, UnsafeCheckpoint

# Storage classes named in the pickle (`torch.FloatStorage` ...) -> dtype of their elements.
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "UntypedStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}

_DTYPE_NAMES = {
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64", "complex128",
}


class _StorageType:
    """What `find_class("torch", "FloatStorage")` returns: only a carrier of the element dtype."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"<storage type torch.{self.name}>"


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    """Stand-in for `torch._utils._rebuild_tensor_v2`: a strided view of a flat storage tensor."""
    if not isinstance(storage, torch.Tensor) or storage.dim() != 1:
        raise UnsafeCheckpoint("a tensor in the checkpoint is not backed by a storage of the archive")
    if backward_hooks:
        raise UnsafeCheckpoint("a tensor in the checkpoint carries backward hooks; refusing to load them")
    return storage.as_strided(tuple(size), tuple(stride), int(storage_offset))


def _rebuild_tensor(storage, storage_offset, size, stride):
    """Stand-in for `torch._utils._rebuild_tensor` (older checkpoints)."""
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """Stand-in for `torch._utils._rebuild_parameter(_with_state)`: parameters load as plain tensors."""
    if backward_hooks:
        raise UnsafeCheckpoint("a parameter in the checkpoint carries backward hooks; refusing to load them")
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    """Stand-in for `torch._utils._rebuild_parameter_with_state`; the extra state is dropped."""
    return _rebuild_parameter(data, requires_grad, backward_hooks)


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("__builtin__", "set"): set,  # protocol-2 pickles written by Python 2
    ("__builtin__", "frozenset"): frozenset,
}


class _StubMeta(type):
    """Metaclass of the stand-ins for non-allow-listed globals: they cannot be called."""

    def __call__(cls, *args, **kwargs):
        raise UnsafeCheckpoint(f"the checkpoint's pickle would call {cls._rdm_global}, which is not a tensor "
                               "or container type; refusing to load it (checkpoints are untrusted input)")

    def __repr__(cls) -> str:
        return f"<not loaded: {cls._rdm_global}>"


def _stub(module: str, name: str) -> type:
    """An inert class standing for the global `module.name`; calling or building it raises."""
    qualified = f"{module}.{name}"

    def refuse(*args, **kwargs):
        raise UnsafeCheckpoint(f"the checkpoint's pickle would instantiate or set the state of {qualified}; "
                               "refusing to load it (checkpoints are untrusted input)")

    return _StubMeta(name, (), {"_rdm_global": qualified, "__new__": refuse, "__setstate__": classmethod(refuse)})


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler of `data.pkl` that only builds tensors and containers (see module docstring)."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, mapped: mmap.mmap | None = None):
        super().__init__(file)
        self._archive, self._prefix, self._mapped = archive, prefix, mapped
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPE_NAMES:
            return getattr(torch, name)
        return _stub(module, name)

    def persistent_load(self, pid):
        # ("storage", storage_type, key, location, numel), written by torch.serialization._save
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpoint(f"unexpected persistent id in the checkpoint: {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise UnsafeCheckpoint(f"unexpected storage reference in the checkpoint: {pid!r:.80}")
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, storage_type.dtype, numel)
        return self._storages[key]

    def _read_storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """Flat tensor over the raw bytes of storage `key`, (numel,) of `dtype`: mapped, else read."""
        name = f"{self._prefix}data/{key}"
        try:
            info = self._archive.getinfo(name)
        except KeyError:
            raise RDMError(f"checkpoint is truncated: storage {key!r} is missing from the archive") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not info.file_size:
            flat = torch.empty(0, dtype=dtype)
        elif (start := self._mapped_start(info, itemsize)) is not None:
            flat = torch.frombuffer(self._mapped, dtype=dtype, count=info.file_size // itemsize, offset=start)
        else:
            flat = torch.frombuffer(bytearray(self._archive.read(name)), dtype=dtype)
        if numel is not None and flat.numel() < numel:
            raise RDMError(f"checkpoint is truncated: storage {key!r} holds {flat.numel()} of {numel} elements")
        return flat

    def _mapped_start(self, info: zipfile.ZipInfo, itemsize: int) -> int | None:
        """Offset of an entry's bytes in the mapped file; None when it must be read (compressed, misaligned)."""
        if self._mapped is None or info.compress_type != zipfile.ZIP_STORED:
            return None
        start = _entry_data_offset(self._mapped, info)
        if start % itemsize or info.file_size % itemsize:
            return None
        if start + info.file_size > len(self._mapped):
            raise RDMError(f"checkpoint is truncated: {info.filename} ends past the end of the file")
        return start


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length (APPNOTE 4.3.7)


def _entry_data_offset(mapped: mmap.mmap, info: zipfile.ZipInfo) -> int:
    """Where an entry's data starts: after its local file header, whose extra field may differ from the directory's."""
    header = mapped[info.header_offset:info.header_offset + _LOCAL_HEADER.size]
    if len(header) < _LOCAL_HEADER.size:
        raise RDMError(f"checkpoint is truncated: the header of {info.filename} is missing")
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(header)
    if signature != b"PK\x03\x04":
        raise RDMError(f"the checkpoint's zip is damaged: no local header for {info.filename}")
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def _data_pkl_name(archive: zipfile.ZipFile, path: Path) -> str:
    """Name of the single `*/data.pkl` record of a torch zip archive."""
    names = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(names) != 1:
        raise RDMError(f"{path} is a zip file but not a PyTorch checkpoint (no ARCHIVE/data.pkl inside)")
    return names[0]


def load_checkpoint(path) -> object:
    """The whole unpickled object of a torch zip checkpoint, built only from allow-listed parts."""
    path = Path(path)
    if not path.is_file():
        raise RDMError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80":
            raise RDMError(f"{path} is in PyTorch's legacy (pre-1.6, non-zip) format, which rdm does not read; "
                           "re-save it with a recent torch.save (in a sandbox) or convert it to safetensors")
        raise RDMError(f"{path} is not a PyTorch checkpoint (expected a torch.save zip archive)")
    with open(path, "rb") as f:  # copy-on-write: tensors may be written to, the file never is
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if path.stat().st_size else None
    with zipfile.ZipFile(path) as archive:
        pkl = _data_pkl_name(archive, path)
        prefix = pkl[: -len("data.pkl")]
        if f"{prefix}byteorder" in archive.namelist():
            order = archive.read(f"{prefix}byteorder").decode().strip()
            if order != "little":
                raise RDMError(f"{path} was saved with {order}-endian byte order; only little-endian is supported")
        with archive.open(pkl) as f:
            try:
                return _RestrictedUnpickler(f, archive, prefix, mapped).load()
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
                    RuntimeError) as e:
                raise RDMError(f"{path}: the checkpoint's pickle could not be read ({e})") from e


def load_checkpoint_state_dict(path) -> dict[str, torch.Tensor]:
    """The checkpoint's `state_dict` (or the checkpoint itself when it is a flat dict of tensors)."""
    obj = load_checkpoint(path)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise RDMError(f"{path} holds no state_dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(state) or not all(isinstance(k, str) for k in state):
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)][:5]
        raise RDMError(f"{path}: the state_dict holds entries that are not tensors: {bad}")
    return tensors
