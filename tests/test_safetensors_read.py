"""hotswap_rt.safetensors_read: the same tensors as safetensors' own ``load_file`` (every dtype
LoRA files hold, unaligned offsets, scalars, empty tensors), read into memory or mapped, and
every malformed header refused with a clear error, as safetensors refuses it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import safetensors.torch
from safetensors.torch import load_file, save_file

from hotswap_rt import safetensors_read
from hotswap_rt.errors import AdapterFormatError
from hotswap_rt.safetensors_read import read_safetensors

from .conftest import CAN_LEASE, CAN_SEE_MAPS, file_is_mapped, start_writer


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a.lora_A.weight": torch.randn(4, 7, generator=generator),
        "b.int8": torch.tensor([1, -2, 3], dtype=torch.int8),  # 3 bytes: what follows is unaligned
        "c.bf16": torch.randn(3, 5, generator=generator).to(torch.bfloat16),
        "d.f16": torch.randn(2, generator=generator).to(torch.float16),
        "e.i64": torch.tensor([7, -9], dtype=torch.int64),
        "f.bool": torch.tensor([True, False, True]),
        "g.scalar": torch.tensor(2.5),
        "h.empty": torch.zeros(0, 3),
        "i.f64": torch.randn(3, generator=generator, dtype=torch.float64),
    }


def _write_in_order(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file with the tensors' bytes in the given order (safetensors' own writer
    sorts by alignment, so it never writes an unaligned offset; other writers may)."""
    names = {torch.float32: "F32", torch.int8: "I8", torch.bfloat16: "BF16", torch.float16: "F16",
             torch.int64: "I64", torch.bool: "BOOL", torch.float64: "F64"}
    header, data, position = {"__metadata__": {"format": "pt"}}, b"", 0
    for name, tensor in tensors.items():
        raw = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [position, position + len(raw)]}
        data, position = data + raw, position + len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


@pytest.mark.parametrize("mapped", [False, True], ids=["read", "mapped"])
@pytest.mark.parametrize("writer", ["safetensors", "unaligned"])
def test_equals_safetensors_load_file(tmp_path: Path, writer: str, mapped: bool) -> None:
    path = tmp_path / "x.safetensors"
    if writer == "safetensors":
        save_file(_tensors(), str(path), metadata={"format": "pt"})
    else:
        _write_in_order(path, _tensors())
    ours, theirs = read_safetensors(path, mapped=mapped), load_file(str(path))
    assert set(ours) == set(theirs) == set(_tensors())
    for name, tensor in theirs.items():
        mine = ours[name]
        assert mine.dtype == tensor.dtype and mine.shape == tensor.shape and mine.is_contiguous()
        assert torch.equal(mine, tensor), name
        assert mine.data_ptr() % mine.element_size() == 0  # copied out where the offset was not aligned
    offsets = {name: entry["data_offsets"][0] for name, entry in json.loads(_header(path)).items()
               if name != "__metadata__"}
    unaligned = [name for name, start in offsets.items() if start % ours[name].element_size()]
    assert bool(unaligned) == (writer == "unaligned")


def _header(path: Path) -> bytes:
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return raw[8 : 8 + size]


def _rewrite(path: Path, edit, data_edit=None) -> Path:
    """``path`` with its JSON header passed through ``edit`` (and its data through ``data_edit``)."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    text = edit(header) if edit is not None else json.dumps(header)
    data = raw[8 + size :] if data_edit is None else data_edit(raw[8 + size :])
    encoded = text.encode() if isinstance(text, str) else text
    out = path.with_name("edited.safetensors")
    out.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)
    return out


def _set(name: str, **fields):
    def edit(header: dict) -> str:
        header[name].update(fields)
        return json.dumps(header)
    return edit


DUPLICATED_DTYPE = '"dtype": "F32", "dtype": "F32"'
BAD = {
    "gap": (_set("w", data_offsets=[4, 68]), None, "starts at byte 4"),
    "shape": (_set("w", shape=[4, 5]), None, "is not the 64 bytes"),
    "dtype": (_set("w", dtype="F12"), None, "unknown dtype"),
    "dtype not a string": (_set("w", dtype=["F32"]), None, "unknown dtype"),  # was a TypeError
    "dtype an object": (_set("w", dtype={"F32": 1}), None, "unknown dtype"),
    "duplicate field": (lambda header: json.dumps(header).replace('"dtype": "F32"', DUPLICATED_DTYPE, 1),
                        None, "duplicate field"),
    "negative shape": (_set("w", shape=[-4, -4]), None, "non-negative"),
    "offsets": (_set("w", data_offsets=[8]), None, "data_offsets"),
    "missing field": (lambda header: json.dumps({**header, "w": {"dtype": "F32", "shape": [4, 4]}}),
                      None, "expected dtype, shape and data_offsets"),
    "not an object": (lambda header: "[1, 2]", None, "not a JSON object"),
    "not JSON": (lambda header: b"{\xff", None, "not JSON"),
    "metadata": (lambda header: json.dumps({**header, "__metadata__": {"k": 1}}), None, "__metadata__"),
    "metadata list": (lambda header: json.dumps({**header, "__metadata__": []}), None, "__metadata__"),
    "short data": (None, lambda data: data[:-4], "cover 128 bytes but the data region has 124"),
    "long data": (None, lambda data: data + b"\0" * 4, "cover 128 bytes but the data region has 132"),
    "duplicate": (lambda header: json.dumps(header)[:-1] + ', "w": ' + json.dumps(header["w"]) + "}",
                  None, "duplicate tensor name"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_files_are_refused(tmp_path: Path, case: str) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"v": torch.ones(4, 4), "w": torch.ones(4, 4)}, str(path))
    edit, data_edit, message = BAD[case]
    bad = _rewrite(path, edit, data_edit)
    for mapped in (False, True):
        with pytest.raises(AdapterFormatError, match=message):
            read_safetensors(bad, mapped=mapped)
    if case not in ("duplicate", "gap"):  # safetensors refuses these too (it keeps the last
        with pytest.raises(Exception):    # duplicate; a gap it reports differently per version)
            load_file(str(bad))


def test_null_metadata_is_accepted_like_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.arange(4.0)}, str(path))
    edited = _rewrite(path, lambda header: json.dumps({**header, "__metadata__": None}))
    assert torch.equal(read_safetensors(edited)["w"], load_file(str(edited))["w"])


@pytest.mark.parametrize("mapped", [False, True], ids=["read", "mapped"])
def test_truncated_and_missing_files(tmp_path: Path, mapped: bool) -> None:
    path = tmp_path / "t.safetensors"
    for content in (b"", b"\x05\x00"):  # an empty file cannot be mapped: refused before
        path.write_bytes(content)
        with pytest.raises(AdapterFormatError, match="header too small"):
            read_safetensors(path, mapped=mapped)
    path.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(AdapterFormatError, match="exceeds the file"):
        read_safetensors(path, mapped=mapped)
    with pytest.raises(AdapterFormatError, match="unreadable"):
        read_safetensors(tmp_path / "missing.safetensors", mapped=mapped)
    with pytest.raises(AdapterFormatError, match="unreadable"):
        read_safetensors(tmp_path, mapped=mapped)  # a directory


def test_mapped_tensors_are_private_and_outlive_a_replaced_file(tmp_path: Path) -> None:
    """A mapped file's views: writing one never reaches the file (copy-on-write); a file
    replaced by a rename (as ``save`` replaces one) leaves the views holding the old bytes; the
    map is released with the last view."""
    import gc

    path = tmp_path / "x.safetensors"
    save_file({"w": torch.arange(6.0), "v": torch.ones(3)}, str(path))
    original = path.read_bytes()
    tensors = read_safetensors(path, mapped=True)
    tensors["w"].mul_(-1.0)  # a private page now
    assert path.read_bytes() == original
    assert torch.equal(tensors["w"], -torch.arange(6.0))
    assert torch.equal(read_safetensors(path, mapped=True)["w"], torch.arange(6.0))

    replacement = tmp_path / "new.safetensors"
    save_file({"w": torch.full((6,), 9.0), "v": torch.zeros(3)}, str(replacement))
    os.replace(replacement, path)
    assert torch.equal(tensors["v"], torch.ones(3))  # the old file, still mapped
    assert torch.equal(read_safetensors(path, mapped=True)["v"], torch.zeros(3))

    del tensors
    gc.collect()
    if not CAN_SEE_MAPS or not CAN_LEASE:
        pytest.skip("the rest reads /proc/self/maps (Linux), and files are mapped only under read leases")
    assert not file_is_mapped(path)
    views = read_safetensors(path, mapped=True)
    assert views["v"].untyped_storage().nbytes() == path.stat().st_size  # the whole file, mapped
    assert file_is_mapped(path)
    view = views["v"][1:]
    del views
    gc.collect()
    assert file_is_mapped(path)  # a view still holds it
    del view
    gc.collect()
    assert not file_is_mapped(path)  # unmapped with its last view


def test_a_read_that_returns_in_pieces_is_read_to_the_end(tmp_path: Path, monkeypatch) -> None:
    """A single read may return fewer bytes than asked (Linux caps one call near 2 GiB): the
    reader goes on until the buffer is full, and a file that ends early is refused."""
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(64.0), "v": torch.arange(5, dtype=torch.int8)}, str(path))
    calls: list[int] = []
    real_open = open

    class Trickle:  # an unbuffered file that hands out at most 100 bytes a call
        def __init__(self, raw) -> None:
            self.raw = raw

        def readinto(self, view: memoryview) -> int:
            calls.append(len(view))
            return self.raw.readinto(view[:100])

        def __getattr__(self, name: str):
            return getattr(self.raw, name)

        def __enter__(self) -> Trickle:
            return self

        def __exit__(self, *exc) -> None:
            self.raw.close()

    monkeypatch.setattr(safetensors_read, "open", lambda *args, **kwargs: Trickle(real_open(*args, **kwargs)),
                        raising=False)
    tensors = read_safetensors(path)
    assert len(calls) == -(-path.stat().st_size // 100)  # every byte, 100 at a time
    for name, tensor in load_file(str(path)).items():
        assert torch.equal(tensors[name], tensor)
    monkeypatch.setattr(os, "fstat", lambda fd: type("Stat", (), {"st_size": path.stat().st_size + 8})())
    with pytest.raises(AdapterFormatError, match="shorter than its size when opened"):
        read_safetensors(path)


@pytest.fixture()
def parsed(monkeypatch) -> list[bytes]:
    """The headers parsed from here on (none kept before)."""
    parsed: list[bytes] = []
    parse = safetensors_read._parse_header
    monkeypatch.setattr(safetensors_read, "_VALID_HEADERS", {})
    monkeypatch.setattr(safetensors_read, "_parse_header",
                        lambda path, raw: parsed.append(raw) or parse(path, raw))
    return parsed


def test_a_known_header_is_parsed_once_and_each_file_read_for_itself(tmp_path: Path, parsed: list) -> None:
    files = []
    for seed in (1, 2):  # one header (names, dtypes, shapes, offsets), other values
        files.append(tmp_path / f"{seed}.safetensors")
        save_file({"w": torch.randn(4, 4, generator=torch.Generator().manual_seed(seed))}, str(files[-1]))
    assert _header(files[0]) == _header(files[1])
    for path in files:
        assert torch.equal(read_safetensors(path)["w"], load_file(str(path))["w"])
    assert len(parsed) == 1
    safetensors_read.forget_headers()
    read_safetensors(files[0])
    assert len(parsed) == 2
    short = tmp_path / "short.safetensors"  # the known header over too little data
    short.write_bytes(files[0].read_bytes()[:-4])
    with pytest.raises(AdapterFormatError, match="cover 64 bytes but the data region has 60"):
        read_safetensors(short)
    bad = _rewrite(files[0], _set("w", dtype="F12"))  # an invalid header is never kept
    for _ in range(2):
        with pytest.raises(AdapterFormatError, match="unknown dtype"):
            read_safetensors(bad)
    assert len(parsed) == 4


def test_a_header_over_a_mebibyte_is_not_kept(tmp_path: Path, parsed: list) -> None:
    path = tmp_path / "big-header.safetensors"
    save_file({"w": torch.ones(2)}, str(path), metadata={"notes": "x" * (1 << 20)})
    for _ in range(2):
        assert torch.equal(read_safetensors(path)["w"], torch.ones(2))
    assert len(parsed) == 2 and safetensors_read._VALID_HEADERS == {}


_JSON_LEAF = (st.none() | st.booleans() | st.integers(-3, 70) | st.floats(allow_nan=False) | st.text(max_size=5)
              | st.sampled_from(["F32", "BF16", "I8"]))
_JSON = st.recursive(_JSON_LEAF, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=5)
_ENTRY = st.fixed_dictionaries({}, optional={
    "dtype": _JSON | st.sampled_from(["F32", "F16", "U8"]),
    "shape": _JSON | st.lists(st.integers(0, 4), max_size=3),
    "data_offsets": _JSON | st.lists(st.integers(0, 64), min_size=2, max_size=2),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(st.text(max_size=4) | st.just("__metadata__"), _ENTRY | _JSON, max_size=4),
       data=st.binary(max_size=64))
def test_any_json_header_is_read_or_refused_with_a_format_error(tmp_path: Path, header, data: bytes) -> None:
    """Headers of any JSON shape (wrong types anywhere, missing fields, nested objects): read,
    or refused as an AdapterFormatError, never another exception; the same on a second read
    (its header kept if it was valid)."""
    raw = json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    outcomes = []
    for _ in range(2):
        try:
            outcomes.append(sorted(read_safetensors(path)))
        except AdapterFormatError:
            outcomes.append("refused")
    assert outcomes[0] == outcomes[1]


def test_a_file_that_cannot_be_mapped_is_read_instead(tmp_path: Path, monkeypatch) -> None:
    """A file system without mmap (``ENODEV``): ``mapped=True`` reads the file into memory and
    returns the same tensors (not views of a map); a file that shrank before it was mapped is
    refused as unreadable."""
    import errno
    import mmap

    path = tmp_path / "x.safetensors"
    save_file(_tensors(), str(path))

    def no_mmap(*args, **kwargs):
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(mmap, "mmap", no_mmap)
    tensors = read_safetensors(path, mapped=True)
    for name, tensor in load_file(str(path)).items():
        assert torch.equal(tensors[name], tensor)
    assert tensors["a.lora_A.weight"].untyped_storage().nbytes() == path.stat().st_size  # the read buffer

    def shrunk(*args, **kwargs):
        raise ValueError("mmap length is greater than file size")

    monkeypatch.setattr(mmap, "mmap", shrunk)
    with pytest.raises(AdapterFormatError, match="unreadable"):
        read_safetensors(path, mapped=True)


@pytest.mark.skipif(not CAN_LEASE, reason="no read leases here (not Linux, or the temp dir's file system)")
def test_a_mapped_file_keeps_writers_out_until_its_map_is_gone(tmp_path: Path) -> None:
    """Mapped under a read lease: while any view of the map lives, opening the file for writing
    (non-blocking here) is refused and another process's ``open(path, "wb")`` (which truncates:
    a page of the map read after it would raise ``SIGBUS``) waits; once the map is gone, both
    go through. The lease's break signal ends nothing (``SIGIO`` would end the process)."""
    import gc

    path = tmp_path / "x.safetensors"
    save_file(_tensors(), str(path))
    original = path.read_bytes()
    tensors = read_safetensors(path, mapped=True)
    if CAN_SEE_MAPS:
        assert file_is_mapped(path)
    with pytest.raises(BlockingIOError):
        os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    view = tensors["a.lora_A.weight"][1:]
    del tensors
    gc.collect()
    writer = start_writer(path, b"new")
    assert writer.poll() is None  # waiting: a view still holds the map
    assert path.read_bytes() == original
    assert torch.equal(view, load_file(str(path))["a.lora_A.weight"][1:])  # every page still reads
    del view
    gc.collect()
    assert writer.wait(timeout=30) == 0 and path.read_bytes() == b"new"
    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.skipif(not CAN_LEASE or not CAN_SEE_MAPS, reason="no read leases here, or no /proc/self/maps")
def test_without_a_lease_a_file_is_read_not_mapped(tmp_path: Path, monkeypatch) -> None:
    """Where no read lease can be taken (the file is open for writing elsewhere, or Python
    handles both signals a lease break could send), ``mapped=True`` reads the file into memory:
    the same tensors, no map, and a writer is not held up."""
    import signal

    path = tmp_path / "x.safetensors"
    save_file(_tensors(), str(path))
    expected = safetensors.torch.load(path.read_bytes())  # load_file would map the file

    def check_read() -> None:
        tensors = read_safetensors(path, mapped=True)
        assert not file_is_mapped(path)
        assert tensors.keys() == expected.keys()
        assert all(torch.equal(tensors[name], tensor) for name, tensor in expected.items())
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # no lease held

    with open(path, "r+b"):  # open for writing: no read lease
        check_read()
    calls: list[int] = []

    def both_handled(signum: int, real=signal.getsignal):
        calls.append(signum)
        return (lambda *args: None) if signum in (signal.SIGURG, signal.SIGWINCH) else real(signum)

    monkeypatch.setattr(signal, "getsignal", both_handled)
    check_read()
    assert calls == [signal.SIGURG, signal.SIGWINCH]  # both asked, both handled: no lease


@pytest.mark.skipif(not CAN_LEASE, reason="no read leases here (not Linux, or the temp dir's file system)")
def test_a_lease_break_reaches_no_python_handler(tmp_path: Path) -> None:
    """With a Python handler on ``SIGURG``, a lease is taken with ``SIGWINCH`` as its break
    signal: a writer breaking it calls no handler of this process, and waits for the map."""
    import gc
    import signal

    calls: list[int] = []
    previous = signal.signal(signal.SIGURG, lambda signum, frame: calls.append(signum))
    try:
        path = tmp_path / "x.safetensors"
        save_file(_tensors(), str(path))
        tensors = read_safetensors(path, mapped=True)
        writer = start_writer(path, b"new")
        assert writer.poll() is None  # kept out: a lease was taken
        del tensors
        gc.collect()
        assert writer.wait(timeout=30) == 0
        time.sleep(0.05)  # a signal handler runs between bytecodes
        assert calls == []
    finally:
        signal.signal(signal.SIGURG, previous)


@pytest.mark.skipif(not CAN_LEASE, reason="no read leases here (not Linux, or the temp dir's file system)")
def test_a_child_forked_during_a_mapped_read_does_not_keep_writers_out(tmp_path: Path) -> None:
    """The lease belongs to the open file, which a forked child shares: the child closes its
    copy at once and maps through another open file, so once this process drops the map a
    writer goes through while the child still lives."""
    import gc

    path = tmp_path / "x.safetensors"
    save_file(_tensors(), str(path))
    tensors = read_safetensors(path, mapped=True)
    release_child, child_done = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: wait to be told, touch nothing
        os.read(release_child, 1)
        os._exit(0)
    try:
        with pytest.raises(BlockingIOError):
            os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # leased while the map lives here
        del tensors
        gc.collect()
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # the child lives on, holding nothing
    finally:
        os.write(child_done, b"x")
        assert os.waitpid(pid, 0)[1] == 0
        os.close(release_child)
        os.close(child_done)
