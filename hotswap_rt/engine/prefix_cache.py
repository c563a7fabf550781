"""KV of prompt prefixes kept for later requests: a request that starts with tokens an earlier
one had, under the same adapters, copies their keys and values instead of computing them.

::

    pool keys[l], values[l]: [blocks, kv_heads, BLOCK, head_dim]   allocated once
    a block: BLOCK tokens' KV at positions j*BLOCK .. (j+1)*BLOCK-1 of some sequence
    tree: block -> parent block (the tokens before it); a root block is keyed by the adapters

A block is found by ``(parent, its tokens)``; the first block of a sequence by ``(adapters,
its tokens)``, where ``adapters`` names the weights (:attr:`AdapterInfo.weights_id`, and each
mix weight): the same tokens under other weights have other keys and values. Since attention
is causal, the KV of a prefix does not depend on what follows it, so every path from a root is
a prefix some request computed. Lookups match whole blocks only, and leave at least the
prompt's last token to compute (its logits give the first output token).

When the pool is full, the least recently used block that no other block continues is evicted
first (so a path stays whole from its root). A block that no longer has a continuation takes
the place its own last use gives it: the newest if it was used after the oldest other such
block, else the oldest (a prefix many prompts share, whose old continuations went, stays).

Keys and values move by one gather or one scatter per layer tensor (:meth:`PrefixCache.load` /
:meth:`PrefixCache.store`); the engine thread alone uses the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Iterator, Sequence

import torch

from ..errors import HotswapError
from .device_values import device_values
from .kv_cache import KVMemory

BLOCK = 16  # tokens per block: the granularity of a match


@dataclass(eq=False)
class _Block:
    key: tuple
    index: int  # in the pool
    parent: _Block | None
    children: int = 0
    last_used: int = 0  # the cache's clock at its last match or store


@dataclass
class PrefixCacheStats:
    """Counts since start, in tokens (``queried``: prompt tokens looked up; ``hit``: those
    whose KV came from the cache) and blocks."""

    queried: int = 0
    hit: int = 0
    stored_blocks: int = 0
    evicted_blocks: int = 0
    held_blocks: int = 0
    capacity_blocks: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"block_tokens": BLOCK, **self.__dict__}


@dataclass
class PrefixMatch:
    """The cached blocks that begin a prompt: ``tokens`` positions' KV (a multiple of BLOCK)."""

    blocks: list[_Block] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return len(self.blocks) * BLOCK


class PrefixCache:
    """Blocks of prefix KV (see the module doc).

    Args:
        memory: the engine's KV rows (geometry, dtype and device of the pool).
        tokens: pool size in tokens (rounded down to whole blocks; at least one block).
    """

    def __init__(self, memory: KVMemory, tokens: int) -> None:
        blocks = tokens // BLOCK
        if blocks < 1:
            raise HotswapError(f"a prefix cache of {tokens} tokens holds no block of {BLOCK}")
        sample = memory.keys[0]
        _, heads, _, head_dim = sample.shape
        shape = (blocks, heads, BLOCK, head_dim)
        self.keys = [torch.zeros(shape, dtype=sample.dtype, device=sample.device) for _ in memory.keys]
        self.values = [torch.zeros(shape, dtype=sample.dtype, device=sample.device) for _ in memory.keys]
        self._memory = memory
        self._blocks: dict[tuple, _Block] = {}
        self._leaves: OrderedDict[int, _Block] = OrderedDict()  # by block index, least recent first
        self._free = list(range(blocks - 1, -1, -1))
        self._clock = 0
        self.stats = PrefixCacheStats(capacity_blocks=blocks)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def match(self, adapters: Hashable, tokens: Sequence[int]) -> PrefixMatch:
        """The longest cached prefix of ``tokens`` under ``adapters``, whole blocks, short of
        the last token; its blocks become the most recently used. Counted in the stats."""
        found = self._path(adapters, tokens, len(tokens) - 1)
        self._touch(found)
        self.stats.queried += len(tokens)
        self.stats.hit += len(found) * BLOCK
        return PrefixMatch(found)

    @torch.no_grad()
    def load(self, match: PrefixMatch, row: int) -> None:
        """Copy the matched blocks' KV into positions ``0 .. match.tokens - 1`` of KV row ``row``."""
        if not match.blocks:
            return
        index = device_values([b.index for b in match.blocks], self.keys[0].device)
        for cached, memory in self._pool_and_rows():
            _blocked(memory, row, 0, len(match.blocks)).copy_(cached.index_select(0, index))

    @torch.no_grad()
    def store(self, adapters: Hashable, tokens: Sequence[int], row: int) -> None:
        """Keep the KV of ``tokens`` (its whole blocks), which KV row ``row`` holds at positions
        ``0 .. len(tokens) - 1``, for later prompts: the blocks not cached yet are copied, as
        many as free or evictable blocks allow."""
        path = self._path(adapters, tokens, len(tokens))
        self._touch(path)
        starts = range(len(path) * BLOCK, len(tokens) - BLOCK + 1, BLOCK)  # of the blocks to add
        if not starts:
            return
        last = path[-1] if path else None
        indices = self._take(len(starts), protected=last)
        if not indices:
            return
        for start, index in zip(starts, indices):
            parent = _root(adapters) if last is None else last.index
            key = (parent, tuple(tokens[start:start + BLOCK]))
            block = _Block(key, index, last, last_used=self._clock)
            if last is not None:
                last.children += 1
                self._leaves.pop(last.index, None)
            self._blocks[key] = block
            self._leaves[index] = block
            last = block
        index = device_values(indices, self.keys[0].device)
        for cached, memory in self._pool_and_rows():
            cached.index_copy_(0, index, _blocked(memory, row, len(path), len(indices)))
        self.stats.stored_blocks += len(indices)
        self.stats.held_blocks = len(self._blocks)

    def clear(self) -> None:
        """Forget every block."""
        self._blocks.clear()
        self._leaves.clear()
        self._free = list(range(self.stats.capacity_blocks - 1, -1, -1))
        self.stats.held_blocks = 0

    # ------------------------------------------------------------------------------ internals
    def _path(self, adapters: Hashable, tokens: Sequence[int], end: int) -> list[_Block]:
        """The cached blocks that begin ``tokens[:end]`` under ``adapters`` (whole blocks, in
        order)."""
        path: list[_Block] = []
        parent: Hashable = _root(adapters)
        for start in range(0, end - BLOCK + 1, BLOCK):
            block = self._blocks.get((parent, tuple(tokens[start:start + BLOCK])))
            if block is None:
                break
            path.append(block)
            parent = block.index
        return path

    def _pool_and_rows(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each pool tensor with the KV rows' tensor of the same layer, keys then values."""
        yield from zip(self.keys, self._memory.keys)
        yield from zip(self.values, self._memory.values)

    def _touch(self, path: list[_Block]) -> None:
        self._clock += 1
        for block in path:
            block.last_used = self._clock
            if block.index in self._leaves:
                self._leaves.move_to_end(block.index)

    def _take(self, wanted: int, protected: _Block | None) -> list[int]:
        """Up to ``wanted`` free pool blocks, evicting least recently used leaves (never
        ``protected``, the block the new ones continue)."""
        while len(self._free) < wanted and self._leaves:
            victim = next(iter(self._leaves.values()))
            if victim is protected:
                if len(self._leaves) == 1:
                    break
                self._leaves.move_to_end(victim.index)
                continue
            self._evict(victim)
        return [self._free.pop() for _ in range(min(wanted, len(self._free)))]

    def _evict(self, block: _Block) -> None:
        del self._leaves[block.index]
        del self._blocks[block.key]
        self._free.append(block.index)
        self.stats.evicted_blocks += 1
        parent = block.parent
        if parent is not None:
            parent.children -= 1
            if parent.children == 0:
                oldest = next(iter(self._leaves.values()), None)
                self._leaves[parent.index] = parent  # the newest ...
                if oldest is not None and parent.last_used < oldest.last_used:
                    self._leaves.move_to_end(parent.index, last=False)  # ... or the oldest


def _root(adapters: Hashable) -> tuple:
    """What a sequence's first block is keyed under (the parent of a root block)."""
    return ("root", adapters)


def _blocked(tensor: torch.Tensor, row: int, first: int, count: int) -> torch.Tensor:
    """Positions ``first*BLOCK .. (first+count)*BLOCK - 1`` of KV row ``row`` of ``tensor``
    (``[rows, H, max_len + 1, D]``) as ``[count, H, BLOCK, D]`` (a view)."""
    span = tensor[row, :, first * BLOCK:(first + count) * BLOCK]  # [H, count*BLOCK, D]
    return span.unflatten(1, (count, BLOCK)).transpose(0, 1)
