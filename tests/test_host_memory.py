"""hotswap_rt.host_memory: memory comes back for reuse only once no tensor over it is left (views
and a caller's state dict included), within the pool's limits; and a runtime reloading adapters
reuses its file buffers and host rows while serving each adapter's own values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hotswap_rt import HotswapRuntime, RuntimeConfig
from hotswap_rt.host_memory import ALIGNMENT, HUGE_PAGE, HostMemoryPool

from .conftest import BaseModel, logits, max_diff

TARGETS = ["q_proj", "v_proj"]


def test_memory_is_reused_only_after_its_last_view_is_gone() -> None:
    pool = HostMemoryPool()
    first = pool.empty(256, torch.float32)
    assert first.shape == (256,) and first.dtype == torch.float32 and first.is_contiguous()
    assert first.data_ptr() % ALIGNMENT == 0
    address = first.data_ptr()
    first.fill_(1.0)
    view = first[10:20].view(2, 5).t()  # a view outlives the tensor it came from
    del first
    second = pool.empty(256, torch.float32)
    assert second.data_ptr() != address and pool.reused == 0
    second_address = second.data_ptr()
    assert torch.equal(view, torch.ones(5, 2))  # still its own memory
    del view
    third = pool.empty(256, torch.float32)
    assert third.data_ptr() == address and pool.reused == 1
    del second, third
    assert pool.empty(1024, torch.uint8).data_ptr() in {address, second_address}  # the same 1024 bytes
    assert pool.reused == 2
    assert pool.empty(128, torch.bfloat16).dtype == torch.bfloat16


def test_the_pool_keeps_at_most_its_limits() -> None:
    pool = HostMemoryPool(per_size=2, limit=3)
    small = [pool.empty(64, torch.uint8) for _ in range(4)]
    large = [pool.empty(128, torch.uint8) for _ in range(4)]
    del small, large  # 8 released: 2 of each size fit per_size, 3 in all
    again = [pool.empty(64, torch.uint8) for _ in range(4)] + [pool.empty(128, torch.uint8) for _ in range(4)]
    assert pool.reused == 3
    del again
    capped = HostMemoryPool(limit_bytes=200)
    buffers = [capped.empty(64, torch.uint8) for _ in range(2)] + [capped.empty(128, torch.uint8)]
    del buffers  # 64 + 64 fit in 200 bytes, the 128 then does not
    kept = [capped.empty(64, torch.uint8) for _ in range(2)] + [capped.empty(128, torch.uint8)]
    assert capped.reused == 2
    del kept
    pool.clear()
    pool.empty(64, torch.uint8)
    assert pool.reused == 3  # cleared: nothing left to reuse


@pytest.fixture(scope="module")
def base() -> BaseModel:
    return BaseModel("llama")


def test_reloads_reuse_memory_and_never_overwrite_what_a_caller_holds(
        base: BaseModel, tmp_path: Path, input_ids: torch.Tensor) -> None:
    paths = [base.make_adapter(tmp_path / str(seed), seed, r=4, lora_alpha=8, target_modules=TARGETS)
             for seed in (1, 2)]
    rt = HotswapRuntime(base.clone(), RuntimeConfig(TARGETS, max_rank=8, device_slots=1, host_slots=2))
    rt.load("resident", paths[0])
    rt.pin("resident")  # the one slot stays taken: "x" lives in the host ring only
    rt.load("x", paths[0])
    held = rt.adapter_state_dict("x")  # views of x's file buffer, held by the caller
    expected = {key: tensor.clone() for key, tensor in held.items()}
    for i in range(6):  # each replacement drops the previous x: its memory comes back
        rt.load("x", paths[(i + 1) % 2], replace=True)
    memory = rt.internals.stager.memory
    assert memory.reused >= 4  # later loads ran in reused rows and file buffers
    for key, tensor in held.items():
        assert torch.equal(tensor, expected[key]), key  # what the caller holds was never reused
    on_disk = load_file(str(paths[0] / "adapter_model.safetensors"))
    assert {key: torch.equal(expected[key], on_disk[key]) for key in on_disk} == dict.fromkeys(on_disk, True)
    rt.unpin("resident")
    reference = base.peft_reference({"x": paths[0]})  # the last load was paths[0]'s adapter
    rt.activate("x")
    assert max_diff(logits(rt.model, input_ids), logits(reference, input_ids)) < 1e-5


def _mapping_of(address: int) -> dict[str, str] | None:
    """The ``/proc/self/smaps`` fields of the mapping holding ``address`` (None: unmapped)."""
    fields: dict[str, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            if fields is not None:
                return fields  # the next mapping begins
            if int(head[1], 16) <= address < int(head[2], 16):
                fields = {}
        elif fields is not None:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def _huge_pages_on() -> bool:
    """Linux with transparent huge pages not switched off (``always`` or ``madvise``)."""
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return Path("/proc/self/smaps").exists() and setting.exists() and "[never]" not in setting.read_text()


@pytest.mark.skipif(not _huge_pages_on(), reason="Linux with transparent huge pages only")
def test_large_buffers_start_on_a_huge_page_are_advised_and_are_unmapped_once_released() -> None:
    pool = HostMemoryPool(per_size=0)  # keeps nothing: a released buffer is unmapped
    buffer = pool.empty(HUGE_PAGE * 2 + 12345, torch.float32)  # ~16 MB
    buffer.fill_(1.0)
    address = buffer.data_ptr()
    assert address % HUGE_PAGE == 0
    fields = _mapping_of(address)
    assert fields is not None and fields["THPeligible"] == "1"  # advised (the kernel may still lack pages)
    small = pool.empty(1000, torch.float32)  # below a huge page: ordinary memory
    assert small.data_ptr() % ALIGNMENT == 0
    del buffer
    assert _mapping_of(address) is None
