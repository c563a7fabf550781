"""A per-row LoRA delta for one-token steps as two hand-written Triton kernels (Punica's
shrink / expand split), a candidate that :mod:`benchmarks.gpu_check`'s ``kernels`` stage times
against the runtime's compiled form. Needs Triton and a CUDA device (or ``TRITON_INTERPRET=1``).

- ``shrink``: ``part[b, s, :] = sum_{d in chunk s} x[b, d] * A[slot[b], :, d]``, ``d_in`` cut
  into ``split`` chunks so that ``B * split`` programs share the reads (float32 partial sums).
- ``expand``: ``out[b, o] = sum_r (sum_s part[b, s, r]) * Bt[slot[b], r, o]``, ``block`` outputs
  a program, the factors read along ``d_out`` (coalesced).
- ``expand_after_fused``: the rank sum after a base matmul whose weight has every slot's A rows
  appended (``yh = x @ [W; A_0; ...; A_S-1]^T``: ``y`` and every slot's ranks in one GEMM):
  ``out[b, o] = yh[b, o] + sum_r yh[b, d_out + slot[b] R + r] * Bt[slot[b], r, o]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _shrink(x_ptr, a_ptr, slot_ptr, part_ptr, D_IN, CHUNK: tl.constexpr, R: tl.constexpr,
            BLOCK_K: tl.constexpr):
    b = tl.program_id(0)
    s = tl.program_id(1)
    slot = tl.load(slot_ptr + b)
    r = tl.arange(0, R)
    acc = tl.zeros([R], dtype=tl.float32)
    start = s * CHUNK
    for k in range(0, CHUNK, BLOCK_K):
        offs = start + k + tl.arange(0, BLOCK_K)
        inside = (offs < D_IN) & (offs < start + CHUNK)
        x = tl.load(x_ptr + b * D_IN + offs, mask=inside, other=0.0).to(tl.float32)
        a_rows = a_ptr + slot * R * D_IN + r[:, None] * D_IN
        a = tl.load(a_rows + offs[None, :], mask=inside[None, :], other=0.0)
        acc += tl.sum(a.to(tl.float32) * x[None, :], axis=1)
    tl.store(part_ptr + (b * tl.num_programs(1) + s) * R + r, acc)


@triton.jit
def _expand(part_ptr, bt_ptr, slot_ptr, out_ptr, D_OUT, SPLIT: tl.constexpr, R: tl.constexpr,
            BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < D_OUT
    slot = tl.load(slot_ptr + b)
    r = tl.arange(0, R)
    h = tl.sum(tl.load(part_ptr + b * SPLIT * R + tl.arange(0, SPLIT)[:, None] * R + r[None, :]), axis=0)
    bt_rows = bt_ptr + slot * R * D_OUT + r[:, None] * D_OUT
    bt = tl.load(bt_rows + offs[None, :], mask=inside[None, :], other=0.0)
    acc = tl.sum(h[:, None] * bt.to(tl.float32), axis=0)
    tl.store(out_ptr + b * D_OUT + offs, acc.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _expand_after_fused(yh_ptr, bt_ptr, slot_ptr, out_ptr, D_OUT, ROW, R: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < D_OUT
    slot = tl.load(slot_ptr + b)
    r = tl.arange(0, R)
    h = tl.load(yh_ptr + b * ROW + D_OUT + slot * R + r).to(tl.float32)
    bt_rows = bt_ptr + slot * R * D_OUT + r[:, None] * D_OUT
    bt = tl.load(bt_rows + offs[None, :], mask=inside[None, :], other=0.0)
    acc = tl.sum(h[:, None] * bt.to(tl.float32), axis=0)
    y = tl.load(yh_ptr + b * ROW + offs, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * D_OUT + offs, (y + acc).to(out_ptr.dtype.element_ty), mask=inside)


def expand_after_fused(yh: torch.Tensor, bt: torch.Tensor, slots: torch.Tensor,
                       block: int = 128) -> torch.Tensor:
    """``yh [B, d_out + S * R]`` (contiguous: the fused matmul's output), ``bt [S, R, d_out]``,
    ``slots [B]`` int64: ``y`` plus each row's delta, ``[B, d_out]``."""
    batch, rank, d_out = yh.shape[0], bt.shape[1], bt.shape[2]
    out = torch.empty(batch, d_out, device=yh.device, dtype=yh.dtype)
    _expand_after_fused[(batch, triton.cdiv(d_out, block))](yh, bt, slots, out, d_out, yh.shape[1], R=rank,
                                                           BLOCK=block)
    return out


def lora_delta(x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, slots: torch.Tensor,
               split: int = 16, block_k: int = 64, block: int = 128) -> torch.Tensor:
    """``x [B, d_in]``, ``a [S, R, d_in]``, ``bt [S, R, d_out]`` (contiguous; ``R`` a power of
    two), ``slots [B]`` int64: each row's delta ``[B, d_out]`` in ``x``'s dtype. The defaults
    were the fastest of five tried on an H200 (2026-11-30, ad hoc)."""
    batch, d_in = x.shape
    rank, d_out = bt.shape[1], bt.shape[2]
    part = torch.empty(batch, split, rank, device=x.device, dtype=torch.float32)
    _shrink[(batch, split)](x, a, slots, part, d_in, CHUNK=triton.cdiv(d_in, split), R=rank, BLOCK_K=block_k)
    out = torch.empty(batch, d_out, device=x.device, dtype=x.dtype)
    _expand[(batch, triton.cdiv(d_out, block))](part, bt, slots, out, d_out, SPLIT=split, R=rank, BLOCK=block)
    return out
