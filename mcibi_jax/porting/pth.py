"""Torch-free reading and writing of PyTorch checkpoint (``.pth``) files.

Supported on read: the zip format of ``torch.save`` (PyTorch >= 1.6) and the
older stream format (a sequence of pickles followed by raw storages). Tensors
come back as C-contiguous numpy arrays. The pickle is unpacked by a restricted
unpickler that resolves only the handful of names a tensor checkpoint needs,
each to a local stand-in, so no code from the file is ever run. Nothing is allocated on the
file's say alone: storage sizes in the pickle must match their records and the bytes present,
compressed records inflate in bounded chunks, and tensor copies are bounded by the storages.

Writing produces the zip format, readable by ``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import bisect
import io
import math
import os
import pickle
import re
import struct
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["PthError", "load_checkpoint", "load_state_dict", "save_state_dict"]


class PthError(ValueError):
    """A checkpoint file that cannot (or must not) be read or written."""


class _Bad(Exception):
    """Internal failure; turned into a :class:`PthError` naming the file."""

    def __init__(self, message: str, verb: str = "cannot load"):
        super().__init__(message)
        self.verb = verb


# torch dtype name -> numpy dtype
_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    # Dtypes without a legacy storage class (torch pickles them with _rebuild_tensor_v3).
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
}

# legacy typed storage class name -> torch dtype name
_STORAGE_CLASSES: dict[str, str] = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
_STORAGE_CLASS_OF = {dtype: cls for cls, dtype in _STORAGE_CLASSES.items()}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ALIGNMENT = 64


# ---------------------------------------------------------------------------
# Stand-ins for the globals a checkpoint may reference.


class _Frozen:
    """Base of every object the pickle can reach: immutable, so that a BUILD opcode
    (which sets attributes on the object below it) cannot alter the loader."""

    __slots__ = ()

    def __init__(self, **fields: Any):
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise _Bad(
            f"it tries to modify {self!r}; released checkpoints never do", verb="refusing to load"
        )

    def __repr__(self) -> str:
        return getattr(self, "name", "a storage")


class _Global(_Frozen):
    """An allowed global, callable by REDUCE."""

    __slots__ = ("name", "fn")

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


class _StorageType(_Frozen):
    """Stand-in for ``torch.FloatStorage`` & co. (``dtype`` is uint8 for untyped storages)."""

    __slots__ = ("name", "dtype")


class _TorchDtype(_Frozen):
    """Stand-in for a ``torch.<dtype>`` object; ``numpy`` is the matching numpy dtype."""

    __slots__ = ("name", "numpy")


class _TensorClass(_Frozen):
    """Stand-in for ``torch.Tensor`` / ``torch.nn.Parameter`` as used by ``_rebuild_from_type_v2``."""

    __slots__ = ("name",)


class _Budget:
    """Bytes the tensor copies of one load may still take: twice the storages read plus
    ``_COPY_SLACK``, so that broadcast (stride 0) or repeated views cannot blow a small file
    up into any amount of memory, while tied weights and views of a storage still load."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = _COPY_SLACK

    def add_storage(self, nbytes: int) -> None:
        self.left += 2 * nbytes

    def charge(self, nbytes: int, size: tuple[int, ...]) -> None:
        if nbytes > self.left:
            raise _Bad(
                f"a tensor of shape {size} would take {nbytes} bytes: more than the file's storages "
                "can fill (broadcast or repeated views of the same data)",
                verb="refusing to load",
            )
        self.left -= nbytes


_COPY_SLACK = 1 << 26


class _Buffer:
    """The raw bytes of one stored storage; ``raw`` is None while only the layout is known."""

    __slots__ = ("raw", "big_endian", "handed_out", "budget")

    def __init__(
        self,
        raw: np.ndarray | None,
        budget: _Budget,
        big_endian: bool = False,
        handed_out: bool = False,
    ):
        self.raw = raw
        self.big_endian = big_endian
        self.handed_out = handed_out
        self.budget = budget


class _Storage(_Frozen):
    """A storage as the pickle sees it: a buffer read with the element type of its storage class."""

    __slots__ = ("buffer", "dtype")

    def __init__(self, buffer: _Buffer, dtype: np.dtype):
        super().__init__(buffer=buffer, dtype=dtype)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(_is_int(v) and v >= 0 for v in value):
        raise _Bad(f"tensor {what} {value!r} is not a tuple of non-negative ints")
    return tuple(value)


def _c_contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for n, s in zip(reversed(size), reversed(stride)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _tensor(
    storage: Any, offset: Any, size: Any, stride: Any, dtype: np.dtype | None = None
) -> np.ndarray | None:
    """C-contiguous array of ``size`` read from ``storage`` at element ``offset`` with ``stride``."""
    if not isinstance(storage, _Storage):
        raise _Bad(f"tensor data is a {type(storage).__name__}, not a storage")
    if not _is_int(offset) or offset < 0:
        raise _Bad(f"tensor storage offset {offset!r} is not a non-negative int")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise _Bad(f"tensor size {size} and stride {stride} differ in length")
    dtype = storage.dtype if dtype is None else dtype
    buffer = storage.buffer
    if buffer.raw is None:  # legacy format, first pass: storages not read yet
        return None
    numel = math.prod(size)
    if numel == 0:
        return np.zeros(size, dtype)
    capacity = buffer.raw.nbytes // dtype.itemsize
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= capacity:
        raise _Bad(
            f"tensor of shape {size} (offset {offset}, stride {stride}) runs past the end "
            f"of its storage of {capacity} {dtype.name} elements"
        )
    stored_dtype = dtype.newbyteorder(">") if buffer.big_endian and dtype.itemsize > 1 else dtype
    flat = buffer.raw[: capacity * dtype.itemsize].view(stored_dtype)
    if (
        not buffer.handed_out
        and stored_dtype == dtype
        and offset == 0
        and numel == capacity
        and _c_contiguous(size, stride)
    ):
        # The tensor is exactly its storage: hand the buffer over instead of copying it.
        # Any later tensor on the same storage gets a copy, so no two results alias.
        buffer.handed_out = True
        return flat.reshape(size)
    buffer.budget.charge(numel * dtype.itemsize, size)
    view = np.lib.stride_tricks.as_strided(
        flat[offset:],
        shape=size,
        strides=tuple(s * dtype.itemsize for s in stride),
        writeable=False,
    )
    return np.array(view, dtype=dtype, order="C")


def _apply_metadata(array: np.ndarray | None, metadata: Any) -> np.ndarray | None:
    if not metadata:
        return array
    if not isinstance(metadata, dict) or set(metadata) - {"conj", "neg"}:
        raise _Bad(f"unsupported tensor metadata {metadata!r}")
    if array is not None and metadata.get("conj"):
        array = np.conj(array)
    if array is not None and metadata.get("neg"):
        array = np.negative(array)
    return array


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
):
    return _apply_metadata(_tensor(storage, storage_offset, size, stride), metadata)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
):
    if not isinstance(dtype, _TorchDtype):
        raise _Bad(f"tensor dtype {dtype!r} is not a torch dtype")
    return _apply_metadata(_tensor(storage, storage_offset, size, stride, dtype.numpy), metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


_TENSOR_REBUILDS = (
    _rebuild_tensor,
    _rebuild_tensor_v2,
    _rebuild_tensor_v3,
    _rebuild_parameter,
    _rebuild_parameter_with_state,
)


def _rebuild_from_type_v2(func, new_type, args, state):
    # A tensor or parameter carrying Python attributes: keep the data, drop the attributes.
    if not (
        isinstance(func, _Global)
        and func.fn in _TENSOR_REBUILDS
        and isinstance(new_type, _TensorClass)
    ):
        raise _Bad("unsupported tensor subclass")
    if not isinstance(args, tuple):
        raise _Bad("malformed tensor record")
    return func.fn(*args)


def _encode(text: str, encoding: str = "latin1") -> bytes:
    # Protocol-2 pickles spell ``bytes`` as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Bad("unsupported _codecs.encode call")
    return text.encode("latin1")


def _device(kind: Any, index: Any = None) -> str:
    return str(kind) if index is None else f"{kind}:{index}"


def _bytearray(*args: Any) -> bytearray:
    # How pickles spell a bytearray: (), (bytes,) or (str, 'latin-1'); never bytearray(n),
    # which would allocate n bytes on the file's say.
    if not args or (len(args) == 1 and isinstance(args[0], bytes)):
        return bytearray(*args)
    if len(args) == 2 and isinstance(args[0], str):
        return bytearray(_encode(*args))
    raise _Bad("unsupported bytearray call")


class _Dict(dict):
    """What ``collections.OrderedDict`` unpickles to until :func:`_plain` makes it a dict.

    No instance attributes (``__slots__``), so a BUILD opcode cannot shadow its methods
    (``keys``, ``items``) and empty the state dict; the BUILD state is dropped (torch
    stores a state_dict's ``_metadata`` there, which a numpy state dict has no use for).
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        pass


def _plain(obj: Any, seen: dict[int, Any]) -> Any:
    """``obj`` with every :class:`_Dict` in it replaced by a plain dict (lists and dicts in place)."""
    if id(obj) in seen:
        return seen[id(obj)]
    if isinstance(obj, dict):
        out = dict(obj) if type(obj) is _Dict else obj
        seen[id(obj)] = out
        for key, value in out.items():
            out[key] = _plain(value, seen)
        return out
    if isinstance(obj, list):
        seen[id(obj)] = obj
        obj[:] = [_plain(v, seen) for v in obj]
        return obj
    if isinstance(obj, tuple):
        items = [_plain(v, seen) for v in obj]
        out = obj if all(a is b for a, b in zip(items, obj)) else tuple(items)
        seen[id(obj)] = out
        return out
    return obj


_CALLABLES: dict[str, Callable[..., Any]] = {
    "collections.OrderedDict": _Dict,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter_with_state,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.Size": tuple,
    "torch.device": _device,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.bytearray": _bytearray,
    "builtins.complex": complex,
    "_codecs.encode": _encode,
}
_ALLOWED: dict[str, _Frozen] = {name: _Global(name=name, fn=fn) for name, fn in _CALLABLES.items()}
for _name in ("torch.Tensor", "torch.nn.parameter.Parameter"):
    _ALLOWED[_name] = _TensorClass(name=_name)
for _name in ("torch.UntypedStorage", "torch.storage.UntypedStorage"):
    _ALLOWED[_name] = _StorageType(name=_name, dtype=np.dtype(np.uint8))
for _cls, _dtype_name in _STORAGE_CLASSES.items():
    for _module in ("torch", "torch.cuda"):  # torch < 1.13 names GPU storages torch.cuda.*
        _ALLOWED[f"{_module}.{_cls}"] = _StorageType(
            name=f"{_module}.{_cls}", dtype=_DTYPES[_dtype_name]
        )
for _dtype_name, _dtype in _DTYPES.items():
    _ALLOWED[f"torch.{_dtype_name}"] = _TorchDtype(name=f"torch.{_dtype_name}", numpy=_dtype)


def _find_global(module: str, name: str) -> Any:
    if module == "__builtin__":  # Python 2 pickles
        module = "builtins"
    full = f"{module}.{name}"
    if full in _ALLOWED:
        return _ALLOWED[full]
    if module.startswith("torch.nn.modules."):
        raise _Bad(f"it pickles a whole model ({full}); this reader needs a state_dict checkpoint")
    if module == "torch" or module.startswith("torch."):
        raise _Bad(
            f"it uses {full}, which this torch-free reader does not support "
            "(only dense tensors in plain containers)"
        )
    raise _Bad(
        f"it references {full}; released checkpoints only contain tensors", verb="refusing to load"
    )


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, persistent_load: Callable[[Any], Any]):
        super().__init__(file, encoding="utf-8")
        self._load_persistent = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        return _find_global(module, name)

    def persistent_load(self, pid: Any) -> Any:
        return self._load_persistent(pid)


def _no_persistent(pid: Any) -> Any:
    raise _Bad("unexpected storage reference outside the main pickle")


def _unpickle(
    file: io.BufferedIOBase, persistent_load: Callable[[Any], Any] = _no_persistent
) -> Any:
    try:
        return _plain(_Unpickler(file, persistent_load).load(), {})
    except _Bad:
        raise
    except RecursionError:
        raise _Bad("its pickle nests too deeply") from None
    except AttributeError as e:  # BUILD on an object without attributes (e.g. a list)
        raise _Bad(
            f"it tries to set attributes ({e}); released checkpoints never do",
            verb="refusing to load",
        ) from None
    except Exception as e:  # anything the pickle machine raises on malformed input
        raise _Bad(f"corrupt or truncated pickle data ({type(e).__name__}: {e})") from None


def _storage_id(pid: Any, legacy: bool) -> tuple[_StorageType, str, int, Any]:
    """(storage type, key, numel, view metadata) of a persistent id."""
    if not isinstance(pid, tuple) or not pid:
        raise _Bad(f"malformed storage reference {pid!r}")
    kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if kind != "storage" or len(pid) != (6 if legacy else 5):
        raise _Bad(f"unsupported persistent record {kind!r}")
    storage_type, key, _location, numel = pid[1:5]
    view = pid[5] if legacy else None
    if (
        not isinstance(storage_type, _StorageType)
        or not isinstance(key, str)
        or not _is_int(numel)
        or numel < 0
    ):
        raise _Bad(f"malformed storage reference {pid!r}")
    return storage_type, key, numel, view


# ---------------------------------------------------------------------------
# Zip format (torch >= 1.6)


def _read_exact(file: io.BufferedIOBase, size: int, what: str) -> np.ndarray:
    out = np.empty(size, np.uint8)
    view, done = memoryview(out), 0
    while done < size:
        got = file.readinto(view[done : done + (1 << 26)])
        if not got:
            raise _Bad(f"file is truncated inside {what}")
        done += got
    return out


_DEFLATE_MAX_RATIO = 1032  # deflate cannot expand its input more than ~1032-fold
_MAX_PICKLE_BYTES = 1 << 28  # a state_dict pickle of 100k tensors is ~20 MB
_CHUNK = 1 << 24


class _Records:
    """Reads zip records with every size checked before anything is allocated.

    A record is read only when its size is known in advance (from the pickle, for a
    storage), its bytes lie inside the file and overlap no record read before (so no
    two storages can share, and multiply, the same bytes), and a compressed record is
    inflated in bounded chunks, never past that size.
    """

    def __init__(self, file: io.BufferedIOBase, archive: zipfile.ZipFile):
        self.file, self.archive = file, archive
        self.length = file.seek(0, io.SEEK_END)
        self.spans: list[tuple[int, int]] = []  # (start, end) of the records read, sorted

    def read(self, info: zipfile.ZipInfo, size: int) -> np.ndarray:
        """The ``size`` bytes of record ``info`` as a writable uint8 array."""
        name = info.filename
        if info.flag_bits & 0x1:
            raise _Bad(f"{name} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _Bad(
                f"{name} uses zip compression method {info.compress_type}; "
                "only stored and deflated records are supported"
            )
        if info.file_size != size:
            raise _Bad(f"{name} holds {info.file_size} bytes, but the pickle needs {size}")
        self.file.seek(info.header_offset)
        header = self.file.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise _Bad(f"corrupt zip entry {name}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        data_start = info.header_offset + 30 + name_len + extra_len
        data_end = data_start + info.compress_size
        if data_end > self.length:
            raise _Bad(f"file is truncated inside {name}")
        self._claim(info.header_offset, data_end, name)
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != size:
                raise _Bad(f"corrupt zip entry {name} (stored with two different sizes)")
            self.file.seek(data_start)
            data = _read_exact(self.file, size, name)
            if zlib.crc32(data) != info.CRC:
                raise _Bad(f"checksum mismatch in {name}: the file is corrupt")
            return data
        if size > info.compress_size * _DEFLATE_MAX_RATIO + 1024:
            raise _Bad(
                f"{name} claims to inflate {info.compress_size} bytes to {size}, "
                "more than deflate can (a zip bomb?)",
                verb="refusing to load",
            )
        out, done = np.empty(size, np.uint8), 0
        try:
            with self.archive.open(info) as stream:  # stops at file_size, checks the CRC there
                while done < size:
                    chunk = stream.read(min(_CHUNK, size - done))
                    if not chunk:
                        raise _Bad(f"{name} inflates to fewer bytes than its declared {size}")
                    out[done : done + len(chunk)] = np.frombuffer(chunk, np.uint8)
                    done += len(chunk)
        except _Bad:
            raise
        except Exception as e:
            raise _Bad(f"cannot decompress {name} ({e})") from None
        return out

    def _claim(self, start: int, end: int, name: str) -> None:
        i = bisect.bisect(self.spans, (start, end))
        if (i > 0 and self.spans[i - 1][1] > start) or (
            i < len(self.spans) and self.spans[i][0] < end
        ):
            raise _Bad(
                f"{name} overlaps another record; torch never writes that", verb="refusing to load"
            )
        self.spans.insert(i, (start, end))


def _load_zip(file: io.BufferedIOBase) -> Any:
    try:
        archive = zipfile.ZipFile(file)
        names = archive.namelist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, struct.error) as e:
        raise _Bad(f"corrupt zip archive ({e})") from None
    if not names:
        raise _Bad("the zip archive is empty")
    root = names[0].split("/", 1)[0]  # torch puts every record under one top-level folder
    if f"{root}/data.pkl" not in names:
        if any(n.startswith(f"{root}/code/") for n in names):
            raise _Bad("it is a TorchScript archive (torch.jit.save), not a checkpoint")
        raise _Bad("the zip archive has no data.pkl record; not a PyTorch checkpoint")
    records = _Records(file, archive)

    big_endian = False
    if f"{root}/byteorder" in names:
        info = archive.getinfo(f"{root}/byteorder")
        if info.file_size > 16:
            raise _Bad(f"unknown byte order (a {info.file_size}-byte byteorder record)")
        order = records.read(info, info.file_size).tobytes().decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise _Bad(f"unknown byte order {order!r}")
        big_endian = order == "big"

    buffers: dict[str, _Buffer] = {}
    storages: dict[tuple[str, np.dtype], _Storage] = {}
    budget = _Budget()

    def persistent_load(pid: Any) -> _Storage:
        storage_type, key, numel, _ = _storage_id(pid, legacy=False)
        size = numel * storage_type.dtype.itemsize
        if key not in buffers:
            try:
                info = archive.getinfo(f"{root}/data/{key}")
            except KeyError:
                raise _Bad(f"storage record data/{key} is missing") from None
            buffers[key] = _Buffer(records.read(info, size), budget, big_endian)
            budget.add_storage(size)
        elif buffers[key].raw.nbytes != size:
            raise _Bad(
                f"storage {key} is referenced with two sizes ({buffers[key].raw.nbytes} and {size} bytes)"
            )
        ident = (key, storage_type.dtype)
        if ident not in storages:
            storages[ident] = _Storage(buffers[key], storage_type.dtype)
        return storages[ident]

    info = archive.getinfo(f"{root}/data.pkl")
    if info.file_size > _MAX_PICKLE_BYTES:
        raise _Bad(
            f"its data.pkl claims {info.file_size} bytes, more than the "
            f"{_MAX_PICKLE_BYTES >> 20} MiB a checkpoint's pickle needs",
            verb="refusing to load",
        )
    pickled = records.read(info, info.file_size)
    return _unpickle(io.BytesIO(memoryview(pickled)), persistent_load)


# ---------------------------------------------------------------------------
# Legacy stream format (torch < 1.6, or _use_new_zipfile_serialization=False)


def _load_legacy(file: io.BufferedIOBase) -> Any:
    file.seek(0)
    try:
        magic = _unpickle(file)
    except _Bad:
        magic = None
    if magic != _LEGACY_MAGIC:
        raise _Bad("not a PyTorch checkpoint (neither a zip archive nor the legacy format)")
    version = _unpickle(file)
    if version != _LEGACY_PROTOCOL:
        raise _Bad(f"unsupported legacy protocol version {version!r}")
    _unpickle(file)  # system info; the storages are always little-endian
    start = file.tell()

    buffers: dict[str, _Buffer] = {}
    dtypes: dict[str, np.dtype] = {}
    numels: dict[str, int] = {}
    budget = _Budget()
    views: dict[tuple[str, np.dtype], _Storage] = {}

    def persistent_load(pid: Any) -> _Storage:
        storage_type, key, numel, view = _storage_id(pid, legacy=True)
        dtype = storage_type.dtype
        if key not in buffers:
            buffers[key], dtypes[key], numels[key] = _Buffer(None, budget), dtype, numel
        elif dtypes[key] != dtype:
            raise _Bad(f"storage {key} is referenced with two element types")
        elif numels[key] != numel:
            raise _Bad(
                f"storage {key} is referenced with two sizes ({numels[key]} and {numel} elements)"
            )
        buffer = buffers[key]
        if view is None:
            return _Storage(buffer, dtype)
        # A view on part of a storage (very old files): (view key, element offset, element count).
        if not (
            isinstance(view, tuple) and len(view) == 3 and _is_int(view[1]) and _is_int(view[2])
        ):
            raise _Bad(f"malformed storage view {view!r}")
        view_key, offset, count = view
        if (view_key, dtype) not in views:
            raw = None
            if buffer.raw is not None:
                lo, hi = offset * dtype.itemsize, (offset + count) * dtype.itemsize
                if offset < 0 or count < 0 or hi > buffer.raw.nbytes:
                    raise _Bad(f"storage view {view_key} lies outside storage {key}")
                raw = buffer.raw[lo:hi]
            views[(view_key, dtype)] = _Storage(_Buffer(raw, budget, handed_out=True), dtype)
        return views[(view_key, dtype)]

    _unpickle(file, persistent_load)  # first pass: learn which storages exist
    keys_at = file.tell()
    length = file.seek(0, io.SEEK_END)
    file.seek(keys_at)
    keys = _unpickle(file)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise _Bad("malformed storage key list")
    for key in keys:
        if key not in buffers:
            raise _Bad(f"storage {key} is stored but never referenced")
        header = file.read(8)
        if len(header) != 8:
            raise _Bad(f"file is truncated before storage {key}")
        (numel,) = struct.unpack("<q", header)
        if numel != numels[key]:
            raise _Bad(f"storage {key} holds {numel} elements, expected {numels[key]}")
        if buffers[key].raw is not None:
            raise _Bad(f"storage {key} is stored twice")
        size = numel * dtypes[key].itemsize
        if size > length - file.tell():  # checked before allocating the buffer
            raise _Bad(
                f"file is truncated inside storage {key} ({size} bytes declared, "
                f"{length - file.tell()} left in the file)"
            )
        buffers[key].raw = _read_exact(file, size, f"storage {key}")
        budget.add_storage(size)
    missing = [k for k, b in buffers.items() if b.raw is None]
    if missing:
        raise _Bad(f"storage record {missing[0]} is missing")

    file.seek(start)
    views.clear()
    return _unpickle(file, persistent_load)  # second pass: build the arrays


# ---------------------------------------------------------------------------
# Public API


def _open_and(path: str | os.PathLike, action: Callable[[io.BufferedIOBase], Any]) -> Any:
    try:
        with open(path, "rb") as file:
            return action(file)
    except _Bad as e:
        raise PthError(f"{e.verb} {path}: {e}") from None
    except OSError as e:
        raise PthError(f"cannot read {path}: {e.strerror or e}") from e
    except MemoryError:
        raise PthError(f"cannot load {path}: not enough memory") from None


def _load(file: io.BufferedIOBase) -> Any:
    head = file.read(512)
    if not head:
        raise _Bad("the file is empty")
    file.seek(0)
    if zipfile.is_zipfile(file):
        return _load_zip(file)
    if head.startswith(b"PK\x03\x04"):
        raise _Bad("truncated or corrupt zip archive (no central directory)")
    file.seek(0)
    if len(head) == 512 and tarfile.is_tarfile(file):
        raise _Bad("it uses the pre-0.4 tar checkpoint format, which is not supported")
    return _load_legacy(file)


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Unpickles a ``torch.save`` file with every tensor as a numpy array.

    Tensors and parameters become C-contiguous arrays of their shape, in their dtype
    (bfloat16 and float8 via ``ml_dtypes``); containers, strings and numbers stay as
    pickled. Raises :class:`PthError` on anything that is not a plain tensor checkpoint.
    """
    return _open_and(path, _load)


def load_state_dict(path: str | os.PathLike, entry: str | None = None) -> dict[str, np.ndarray]:
    """The model ``state_dict`` of a checkpoint, ``{key: array}`` in stored order.

    Takes ``ckpt[entry]`` when ``entry`` is given, otherwise ``ckpt['model']``,
    ``ckpt['state_dict']`` or ``ckpt`` itself when it maps names to tensors. A
    ``module.`` prefix present on every key (DataParallel) is removed.
    """
    ckpt = load_checkpoint(path)
    if entry is not None:
        if not isinstance(ckpt, Mapping) or entry not in ckpt:
            keys = sorted(map(str, ckpt)) if isinstance(ckpt, Mapping) else []
            raise PthError(f"cannot load {path}: no entry {entry!r} (top-level keys: {keys})")
        state = ckpt[entry]
    elif isinstance(ckpt, Mapping) and isinstance(ckpt.get("model"), Mapping):
        state = ckpt["model"]
    elif isinstance(ckpt, Mapping) and isinstance(ckpt.get("state_dict"), Mapping):
        state = ckpt["state_dict"]
    else:
        state = ckpt
    if not isinstance(state, Mapping):
        raise PthError(
            f"cannot load {path}: the state_dict is a {type(state).__name__}, not a dict"
        )
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
    if bad and state is ckpt:
        keys = [str(k) for k in list(ckpt)[:10]]
        raise PthError(
            f"cannot load {path}: found no 'model' or 'state_dict' entry and the top level is not "
            f"a state_dict (top-level keys: {keys}); pick one with entry="
        )
    if bad:
        raise PthError(
            f"cannot load {path}: not a state_dict, its entry {bad[0]!r} is not a tensor"
        )
    out = dict(state)
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module.") :]: v for k, v in out.items()}
    return out


# ---------------------------------------------------------------------------
# Writing


class _PickleWriter:
    """Emits the protocol-2 pickle of ``{wrap_key: OrderedDict(key -> tensor)}`` by hand,
    so that torch's names can be written without importing torch."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2
        self._memo: dict[tuple[str, str], int] = {}

    def global_(self, module: str, name: str) -> None:
        if (module, name) in self._memo:
            self.out += b"j" + struct.pack("<I", self._memo[(module, name)])  # LONG_BINGET
            return
        self.out += b"c" + f"{module}\n{name}\n".encode("ascii")  # GLOBAL
        self._memo[(module, name)] = len(self._memo)
        self.out += b"r" + struct.pack("<I", self._memo[(module, name)])  # LONG_BINPUT

    def str_(self, text: str) -> None:
        data = text.encode("utf-8")
        self.out += b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE

    def int_(self, value: int) -> None:
        if -(2**31) <= value < 2**31:
            self.out += b"J" + struct.pack("<i", value)  # BININT
        else:
            data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(data)]) + data  # LONG1

    def int_tuple(self, values: tuple[int, ...]) -> None:
        self.out += b"("  # MARK
        for v in values:
            self.int_(v)
        self.out += b"t"  # TUPLE

    def ordered_dict(self) -> None:
        self.global_("collections", "OrderedDict")
        self.out += b")R"  # EMPTY_TUPLE, REDUCE

    def tensor(self, key: str, array: np.ndarray, torch_dtype: str) -> None:
        """``_rebuild_tensor_v2/v3`` of a contiguous tensor on its own storage ``key``."""
        shape = tuple(int(n) for n in array.shape)
        stride, step = [], 1
        for n in reversed(shape):  # torch's contiguous strides
            stride.append(step)
            step *= max(n, 1)
        typed = torch_dtype in _STORAGE_CLASS_OF
        self.global_("torch._utils", "_rebuild_tensor_v2" if typed else "_rebuild_tensor_v3")
        self.out += b"(("  # MARK (arguments), MARK (persistent id)
        self.str_("storage")
        if typed:
            self.global_("torch", _STORAGE_CLASS_OF[torch_dtype])
        else:
            self.global_("torch.storage", "UntypedStorage")
        self.str_(key)
        self.str_("cpu")
        self.int_(array.size if typed else array.nbytes)
        self.out += b"tQ"  # TUPLE, BINPERSID
        self.int_(0)
        self.int_tuple(shape)
        self.int_tuple(tuple(reversed(stride)))
        self.out += b"\x89"  # NEWFALSE (requires_grad)
        self.ordered_dict()  # backward hooks
        if not typed:
            self.global_("torch", torch_dtype)
        self.out += b"tR"  # TUPLE, REDUCE


def _torch_dtype_name(dtype: np.dtype) -> str | None:
    for name, candidate in _DTYPES.items():
        if candidate == dtype:
            return name
    return None


def _archive_name(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)
    return name or "archive"


def save_state_dict(
    state_dict: Mapping[str, Any], path: str | os.PathLike, wrap_key: str | None = "model"
) -> None:
    """Writes ``state_dict`` as a PyTorch zip checkpoint that ``torch.load`` reads.

    Args:
      state_dict: ``{name: array}``; arrays (numpy, jax, ...) of any dtype in
        float32/64/16, bfloat16, int64/32/16/8, uint8, bool (and a few more torch knows).
      path: file to write.
      wrap_key: store the state_dict as ``{wrap_key: state_dict}`` (the released
        checkpoints' layout); None stores it bare.
    """
    path = Path(path)
    writer = _PickleWriter()
    arrays: list[np.ndarray] = []
    if wrap_key is not None:
        writer.out += b"}"  # EMPTY_DICT
        writer.str_(wrap_key)
    writer.ordered_dict()
    items = list(state_dict.items())
    for start in range(0, len(items), 1000):
        writer.out += b"("  # MARK
        for name, value in items[start : start + 1000]:
            if not isinstance(name, str):
                raise PthError(f"cannot save {path}: state_dict key {name!r} is not a string")
            array = np.asarray(value)
            if array.dtype.byteorder not in "=|":
                array = array.astype(array.dtype.newbyteorder("="))
            torch_dtype = _torch_dtype_name(array.dtype)
            if torch_dtype is None:
                raise PthError(
                    f"cannot save {path}: {name!r} has dtype {array.dtype}, which torch cannot hold"
                )
            array = np.asarray(array, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
            writer.str_(name)
            writer.tensor(str(len(arrays)), array, torch_dtype)
            arrays.append(array)
        writer.out += b"u"  # SETITEMS
    if wrap_key is not None:
        writer.out += b"s"  # SETITEM
    writer.out += b"."  # STOP

    root = _archive_name(path)
    records: list[tuple[str, Any]] = [
        ("data.pkl", bytes(writer.out)),
        (".format_version", b"1"),
        (".storage_alignment", str(_ALIGNMENT).encode()),
        ("byteorder", sys.byteorder.encode()),
    ]
    records += [(f"data/{i}", a.reshape(-1).view(np.uint8)) for i, a in enumerate(arrays)]
    records.append(("version", b"3\n"))
    try:
        with open(path, "wb") as file, zipfile.ZipFile(file, "w", zipfile.ZIP_STORED) as archive:
            for name, data in records:
                _write_aligned(archive, file, f"{root}/{name}", data)
    except OSError as e:
        raise PthError(f"cannot save {path}: {e.strerror or e}") from e


def _write_aligned(archive: zipfile.ZipFile, file: io.BufferedIOBase, name: str, data: Any) -> None:
    """Adds a stored record whose data starts on a 64-byte boundary (as torch's writer does)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = len(data) if isinstance(data, bytes) else data.nbytes
    # zipfile's own rule for a 20-byte zip64 extra
    zip64 = info.file_size * 1.05 > zipfile.ZIP64_LIMIT
    header = 30 + len(name.encode("utf-8")) + (20 if zip64 else 0) + 4
    pad = -(file.tell() + header) % _ALIGNMENT
    info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # padding field, id "FB" like torch
    with archive.open(info, "w", force_zip64=zip64) as out:
        out.write(data if isinstance(data, bytes) else memoryview(data))
