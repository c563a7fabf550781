"""KV memory allocated once, one row per sequence, and the transformers ``Cache`` a forward sees.

::

    keys[l], values[l]: [rows, kv_heads, max_len + 1, head_dim]     per decoder layer l
        rows 0 .. max_seqs-1                 decode rows: the running sequences, packed
        rows max_seqs .. max_seqs+P-1        prefill rows: prompts being prefilled, packed
        position max_len                     scratch: padding tokens write here, never read

Each sequence sits in one row at its own length (gpt-fast style). A forward over ``B`` rows
starting at row ``offset`` writes its new keys/values at per-token positions ``write_at [B, T]``
(one ``index_put_`` into the whole buffer, so nothing is copied) and attends over
``keys[offset:offset+B, :, :L]`` with a 4-D mask ``[B, 1, T, L]`` built from per-token positions.
Rows are kept packed: a sequence that finishes (or ends its prefill) is replaced by moving
another row's first ``n`` positions (:meth:`KVMemory.move`), so a decode step reads a plain
slice of the buffer, never a gather.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..errors import HotswapError
from .config import EngineConfig

log = logging.getLogger(__name__)


class KVMemory:
    """The KV buffers of every decoder layer (see the module doc).

    Args:
        num_layers, kv_heads, head_dim: the model's attention geometry.
        rows: total rows (decode + prefill).
        max_len: the longest sequence a row holds.
        dtype, device: of the model's activations.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, rows: int, max_len: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.rows, self.max_len = rows, max_len
        self.scratch = max_len  # the write position of padding tokens
        shape = (rows, kv_heads, max_len + 1, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        for tensor in (*self.keys, *self.values):
            torch._dynamo.mark_static_address(tensor)  # read in place by every graph

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @torch.no_grad()
    def move(self, source: int, destination: int, length: int) -> None:
        """Copy the first ``length`` positions of row ``source`` into row ``destination``."""
        if source == destination or length == 0:
            return
        for tensor in (*self.keys, *self.values):
            tensor[destination, :, :length].copy_(tensor[source, :, :length])


class _RowLayer(CacheLayerMixin):
    """Tells transformers' mask and cache helpers what kind of layer this is (full attention,
    compileable); the data lives in :class:`KVMemory`."""

    is_compileable = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("StepCache.update writes KVMemory directly")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        raise NotImplementedError("the engine passes a 4-D attention mask")

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1


class StepCache(Cache):
    """The ``Cache`` one forward sees: rows ``offset .. offset+B-1`` of ``memory``.

    Before each forward the engine sets ``write_at`` (``[B, T]`` int64: the KV position of each
    input token, ``memory.scratch`` for padding) and ``mask`` (the ``[B, 1, T, L]`` attention
    mask passed to the model, whose last dimension says how many positions attention reads).
    """

    def __init__(self, memory: KVMemory, offset: int) -> None:
        super().__init__(layers=[_RowLayer() for _ in memory.keys])
        self.memory = memory
        self.offset = offset
        self.write_at: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
        *args: Any, **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``key_states``/``value_states`` ``[B, H, T, D]`` at ``write_at``; return the
        keys/values attention reads, ``[B, H, L, D]`` views of the buffers."""
        keys, values = self.memory.keys[layer_idx], self.memory.values[layer_idx]
        batch = key_states.shape[0]
        if key_states.shape[1:2] + key_states.shape[3:] != keys.shape[1:2] + keys.shape[3:]:
            raise HotswapError(
                f"layer {layer_idx}: keys of shape {tuple(key_states.shape)} do not fit the KV "
                f"memory {tuple(keys.shape)} (kv_heads, head_dim)"
            )
        rows = torch.arange(self.offset, self.offset + batch, device=keys.device).unsqueeze(1)
        # index_put_ into the whole buffer (not a slice of it): compiled, it writes in place.
        keys[rows, :, self.write_at] = key_states.transpose(1, 2)
        values[rows, :, self.write_at] = value_states.transpose(1, 2)
        length = self.mask.shape[-1]
        rows_slice = slice(self.offset, self.offset + batch)
        return keys[rows_slice, :, :length], values[rows_slice, :, :length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - not POSIX
        return 8 << 30


def rows_for_budget(config: EngineConfig, bytes_per_token: int, tokens_per_row: int,
              device: torch.device) -> int:
    """Decode rows (``max_seqs`` at most) whose KV fits the budget, next to the prefill rows."""
    if config.kv_cache_tokens is not None:
        rows, budget = config.kv_cache_tokens // tokens_per_row, f"kv_cache_tokens={config.kv_cache_tokens}"
    else:
        wanted = config.max_seqs + config.max_prefill_seqs
        rows = min(wanted, int(0.4 * free_memory(device)) // (bytes_per_token * tokens_per_row))
        budget = "40% of the free memory"
    decode_rows = min(config.max_seqs, rows - config.max_prefill_seqs)
    if decode_rows < 1:
        raise HotswapError(
            f"the KV budget ({budget}) holds {rows} sequences of {tokens_per_row} tokens; the "
            f"engine needs max_prefill_seqs={config.max_prefill_seqs} + 1 at least (lower "
            f"max_model_len or raise kv_cache_tokens)")
    if decode_rows < config.max_seqs:
        log.warning("KV budget (%s): %d decode rows instead of max_seqs=%d", budget, decode_rows,
                    config.max_seqs)
    return decode_rows
