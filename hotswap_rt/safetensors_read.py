"""Read a safetensors file into one host buffer whose views are its tensors.

``safetensors.torch.load_file`` creates every tensor on its own (a few microseconds apiece: most of
a LoRA file's load time, hundreds of small tensors). Here the data region is read with one
``readinto`` into a single uint8 tensor (or the file is memory-mapped, ``mapped=True``) and each
tensor is a view of it::

    [8 bytes: N little-endian] [N bytes: JSON header] [data: every tensor's bytes, back to back]
    header: {name: {"dtype": "F32", "shape": [d0, ...], "data_offsets": [start, end]}, ...,
             "__metadata__": {str: str}}  (optional)

Everything safetensors checks is checked (a JSON object header, known dtypes, shapes of
non-negative ints, ``end - start`` = the shape's bytes, offsets that tile the data region with no
gap or overlap, a file as long as the header says), and duplicate names, which safetensors
accepts silently keeping the last. Any violation is an :class:`AdapterFormatError` naming the
file, raised before any tensor exists.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from .errors import AdapterFormatError
from .file_lease import close_now, close_with, open_leased

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


Allocate = Callable[[int, torch.dtype], torch.Tensor]  # (numel, dtype) -> a contiguous CPU tensor


def _torch_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(numel, dtype=dtype)


class _Entry(NamedTuple):
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int
    strides: tuple[int, ...]  # contiguous, in elements


_KEPT_HEADERS = 64
_KEPT_HEADER_BYTES = 1 << 20  # larger headers (up to MAX_HEADER_BYTES) are parsed every time
_VALID_HEADERS: dict[bytes, tuple[_Entry, ...]] = {}  # see _header_entries


def read_safetensors(path: str | os.PathLike[str], empty: Allocate | None = None,
                     mapped: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, by name: contiguous CPU views of one buffer holding
    the whole file (a tensor whose bytes do not start on a multiple of its element size is
    copied out instead). ``empty(numel, dtype)`` allocates that buffer (``torch.empty`` by
    default; the runtime lends memory it reuses, :mod:`hotswap_rt.host_memory`).

    ``mapped=True``: the buffer is a private, copy-on-write memory map of the file instead
    (:func:`_mapped`): nothing is read up front, and whoever reads a tensor reads the page
    cache directly, while a read lease keeps writers out of the file. For tensors that are read
    once and dropped (staging a load whose factors are not kept); ``empty`` is then unused,
    unless no lease can be taken or the file system cannot map the file, which is then read as
    with ``mapped=False``.

    The file is read whole, from its first byte, by unbuffered reads into the buffer: the page
    cache's pages and the buffer then share their alignment, and the kernel's copy runs at a
    plain copy's speed (reading only the data region, which starts at ``8 + N``, took ~1.6x as
    long: a 10 MB file at Llama-7B widths, 1.15 vs 0.73 ms). The header is parsed from the
    buffer, so it describes exactly the bytes read.

    Raises:
        AdapterFormatError: the file is unreadable or not a valid safetensors file.
    """
    path = Path(path)
    if sys.byteorder != "little":  # the views would need a byte swap: let safetensors do it
        return _read_with_safetensors(path)
    if mapped:
        tensors = _mapped(path)
        if tensors is not None:
            return tensors
    try:
        with open(path, "rb", buffering=0) as f:
            file_size = _checked_size(path, f.fileno())
            buffer = (empty or _torch_empty)(file_size, torch.uint8)
            if _read_into(f, memoryview(buffer.numpy())) != file_size:
                raise _invalid(path, "the file is shorter than its size when opened (rewritten while read?)")
    except OSError as exc:
        raise AdapterFormatError(f"{path}: unreadable ({exc})") from exc
    return _tensors_of(path, buffer)


def _mapped(path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors of a safetensors file as views of a private memory map of it (checked as a
    file read into memory is), the file kept safe from writers by a read lease until the map
    is gone; None where no lease can be taken or the file system cannot map the file (the
    caller reads it instead: the same tensors, one pass slower).

    Nothing is copied until a tensor is read, and then straight from the page cache: staging
    from the map skips the pass over the data that reading the file into memory is (the ring
    benchmark's cold-load floors, read vs mapped, show what that pass costs). The map is
    copy-on-write (``ACCESS_COPY``): writing to a view never reaches the file. It is unmapped
    once the last view is gone, and the file's descriptor closed then.

    The file must stay as it is while the views are read: reading a page past the end of a
    file truncated meanwhile raises ``SIGBUS``, which ends the process. So the file is mapped
    only under a read lease (:func:`hotswap_rt.file_lease.open_leased`, Linux), held by a
    descriptor closed with the map: meanwhile another open of the file for writing (PEFT's
    ``save_pretrained``) or a truncate waits (at most the kernel's lease-break-time, 45 s by
    default). Without a lease (another OS, a file another user owns or another process has
    open for writing, a file system without leases) the file is read into memory.

    Raises:
        AdapterFormatError: the file is unreadable or not a valid safetensors file.
    """
    try:
        lease_fd = open_leased(path)
    except OSError as exc:
        raise AdapterFormatError(f"{path}: unreadable ({exc})") from exc
    if lease_fd is None:
        return None
    mapping = None
    try:
        # The map gets an open file of its own (Python's mmap keeps a duplicate of the
        # descriptor it maps), so the lease is held by lease_fd's open file alone, which a
        # forked child closes at once (file_lease): the child does not hold it until it exits.
        with open(path, "rb", buffering=0) as f:
            file_size = _checked_size(path, f.fileno())  # under the lease: the file keeps this size
            if _file_id(lease_fd) == _file_id(f.fileno()):  # not replaced in between
                try:
                    mapping = mmap.mmap(f.fileno(), file_size, access=mmap.ACCESS_COPY)
                except OSError:  # e.g. ENODEV: a file system without mmap
                    pass
    except (OSError, ValueError) as exc:  # ValueError: the file shrank before it was mapped
        raise AdapterFormatError(f"{path}: unreadable ({exc})") from exc
    finally:
        if mapping is None:
            close_now(lease_fd)
    if mapping is None:
        return None
    close_with(mapping, lease_fd)  # the lease lasts as long as the map
    return _tensors_of(path, torch.frombuffer(mapping, dtype=torch.uint8))  # the views hold the map


def _file_id(fd: int) -> tuple[int, int]:
    """The device and inode of the file open as ``fd``."""
    status = os.fstat(fd)
    return status.st_dev, status.st_ino


def _checked_size(path: Path, fd: int) -> int:
    """The size in bytes of the file open as ``fd``, at least a header's 8."""
    file_size = os.fstat(fd).st_size
    if file_size < 8:
        raise _invalid(path, "header too small")
    return file_size


def _tensors_of(path: Path, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of the whole file held in ``buffer`` (uint8), its header checked."""
    file_size = buffer.numel()
    header_size = int.from_bytes(buffer[:8].numpy().tobytes(), "little")
    if header_size > MAX_HEADER_BYTES or 8 + header_size > file_size:
        raise _invalid(path, f"header size {header_size} exceeds the file ({file_size} bytes)")
    entries = _header_entries(path, buffer[8 : 8 + header_size].numpy().tobytes())
    _check_offsets(path, entries, file_size - 8 - header_size)
    return _views(buffer, entries, 8 + header_size)


def _read_into(file: Any, view: memoryview) -> int:
    """Read ``file`` (unbuffered) into ``view`` until it is full or the file ends; the bytes
    read (a single read may return fewer, e.g. Linux's ~2 GiB cap per call)."""
    done = 0
    while done < len(view):
        count = file.readinto(view[done:])
        if not count:
            break
        done += count
    return done


def _views(buffer: torch.Tensor, entries: tuple[_Entry, ...], data_start: int) -> dict[str, torch.Tensor]:
    """Each entry as a tensor over ``buffer`` (uint8, the whole file; the data region from byte
    ``data_start``): one ``as_strided`` on a view of the buffer in the entry's dtype (~1 us a
    tensor, a third of slicing then viewing twice); an entry whose bytes do not start on a
    multiple of its element size is copied out."""
    typed: dict[torch.dtype, torch.Tensor] = {}
    tensors = {}
    for entry in entries:
        itemsize = entry.dtype.itemsize
        start = data_start + entry.start
        if start % itemsize:  # a view of another dtype must start on its element size
            piece = buffer[start : data_start + entry.end].clone().view(entry.dtype).view(entry.shape)
        else:
            flat = typed.get(entry.dtype)
            if flat is None:
                usable = buffer.numel() - buffer.numel() % itemsize
                flat = typed[entry.dtype] = buffer[:usable].view(entry.dtype)
            piece = flat.as_strided(entry.shape, entry.strides, start // itemsize)
        tensors[entry.name] = piece
    return tensors


def _contiguous_strides(shape: list[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _header_entries(path: Path, raw: bytes) -> tuple[_Entry, ...]:
    """:func:`_parse_header`, kept by the header's bytes: adapters trained with one configuration
    share their header (names, dtypes, shapes, offsets), and parsing it is most of a small file's
    Python cost (~130 us for 56 tensors). Only valid headers of at most 1 MiB are kept, 64 at most
    (the data region's size is checked against each file)."""
    entries = _VALID_HEADERS.get(raw)
    if entries is None:
        entries = tuple(_parse_header(path, raw))
        if len(raw) <= _KEPT_HEADER_BYTES:  # a LoRA file's header: ~70 KB for 448 tensors
            if len(_VALID_HEADERS) >= _KEPT_HEADERS:
                _VALID_HEADERS.clear()
            _VALID_HEADERS[raw] = entries
    return entries


def forget_headers() -> None:
    """Forget every kept header (the next file of each is parsed again)."""
    _VALID_HEADERS.clear()


class _Pairs(list):
    """A JSON object as its ``(key, value)`` pairs in order (``json``'s ``object_pairs_hook``:
    a C-level constructor, unlike a Python hook that checks keys, and a type arrays never have);
    duplicate keys stay visible."""

    __slots__ = ()


def _unique(path: Path, pairs: _Pairs, what: str) -> dict[str, Any]:
    """``pairs`` as a dict; duplicate keys (which ``json`` would silently drop) are refused."""
    result = dict(pairs)
    if len(result) != len(pairs):
        counts = Counter(name for name, _ in pairs)
        duplicated = sorted(name for name, count in counts.items() if count > 1)
        raise AdapterFormatError(f"{path}: duplicate {what} {duplicated} in the header")
    return result


def _parse_header(path: Path, raw: bytes) -> list[_Entry]:
    """The header's tensor entries, sorted by offset (~3 us a tensor: 160 us for 56)."""
    try:
        pairs = json.loads(raw.decode("utf-8"), object_pairs_hook=_Pairs)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _invalid(path, f"the header is not JSON ({exc})") from exc
    if type(pairs) is not _Pairs:
        raise _invalid(path, "the header is not a JSON object")
    header = _unique(path, pairs, "tensor name(s)")
    metadata = header.pop("__metadata__", None)  # null is accepted, as safetensors does
    if metadata is not None and (type(metadata) is not _Pairs or not all(
            type(value) is str for value in _unique(path, metadata, "__metadata__ key(s)").values())):
        raise _invalid(path, "__metadata__ must map names to strings")
    entries = []
    for name, info in header.items():
        fields = {}
        if type(info) is _Pairs:
            fields = dict(info)
            if len(fields) != len(info):
                _unique(path, info, f"field(s) of tensor {name!r}")  # raises, naming them
        dtype_name, shape, offsets = fields.get("dtype"), fields.get("shape"), fields.get("data_offsets")
        if dtype_name is None or shape is None or offsets is None:
            raise _invalid(path, f"tensor {name!r}: expected dtype, shape and data_offsets, got "
                                 f"{fields if type(info) is _Pairs else info!r}")
        dtype = DTYPES.get(dtype_name) if type(dtype_name) is str else None
        if dtype is None:
            raise _invalid(path, f"tensor {name!r}: unknown dtype {dtype_name!r}")
        if type(shape) is not list or not _are_counts(shape):
            raise _invalid(path, f"tensor {name!r}: shape {shape!r} is not a list of non-negative ints")
        if (type(offsets) is not list or len(offsets) != 2 or not _are_counts(offsets)
                or offsets[0] > offsets[1]):
            raise _invalid(path, f"tensor {name!r}: data_offsets {offsets!r} are not [start, end]")
        start, end = offsets
        if math.prod(shape) * dtype.itemsize != end - start:
            raise _invalid(path, f"tensor {name!r}: shape {shape} of {dtype_name} is not the "
                                 f"{end - start} bytes of its data_offsets")
        entries.append(_Entry(name, dtype, tuple(shape), start, end, _contiguous_strides(shape)))
    entries.sort(key=_by_offsets)
    return entries


def _by_offsets(entry: _Entry) -> tuple[int, int]:
    return entry.start, entry.end


def _check_offsets(path: Path, entries: tuple[_Entry, ...], data_size: int) -> None:
    """The entries (sorted) tile ``[0, data_size)`` exactly."""
    position = 0
    for entry in entries:
        if entry.start != position:
            raise _invalid(path, f"tensor {entry.name!r} starts at byte {entry.start}, expected {position} "
                                 f"(tensors must tile the data with no gap or overlap)")
        position = entry.end
    if position != data_size:
        raise _invalid(path, f"the tensors cover {position} bytes but the data region has {data_size}")


def _are_counts(values: list) -> bool:
    """Every value is a non-negative int (not a bool). Runs once per tensor: a plain loop."""
    for value in values:
        if type(value) is not int or value < 0:
            return False
    return True


def _invalid(path: Path, reason: str) -> AdapterFormatError:
    return AdapterFormatError(f"{path}: not a valid safetensors file ({reason})")


def _read_with_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ValueError on a corrupt header
        raise _invalid(path, str(exc)) from exc
