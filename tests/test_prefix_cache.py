"""The engine's prefix cache: prompts that begin with an earlier request's tokens, under the
same adapters, take that KV from the cache, and generate what PEFT generates for them alone.

The pool itself is tested on a bare :class:`KVMemory` (its copies against the rows they came
from, its matching and eviction rules); the engine on a compiled tiny Llama (one engine for the
module) against PEFT's eager ``generate`` of each prompt alone, with nothing recompiled.
"""

from __future__ import annotations

import pytest
import torch

from hotswap_rt import HotswapError
from hotswap_rt.engine import EngineConfig, GenerationEngine, RequestError, SamplingParams
from hotswap_rt.engine.kv_cache import KVMemory
from hotswap_rt.engine.prefix_cache import BLOCK, PrefixCache

from .conftest import VOCAB, BaseModel, IdTokenizer
from .test_engine import (GREEDY, abc_adapters, abc_scene, loaded_runtime, prompt, reference_tokens,
                          tokens_of)


# ---------------------------------------------------------------------------------- the pool
def filled_memory(rows: int = 3, max_len: int = 96) -> KVMemory:
    memory = KVMemory(num_layers=2, kv_heads=2, head_dim=4, rows=rows, max_len=max_len,
                      dtype=torch.float32, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    for tensor in (*memory.keys, *memory.values):
        tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return memory


def positions(memory: KVMemory, row: int, length: int) -> list[torch.Tensor]:
    return [t[row, :, :length].clone() for t in (*memory.keys, *memory.values)]


def test_stored_kv_comes_back_in_another_row_and_the_rest_is_untouched() -> None:
    memory = filled_memory()
    cache = PrefixCache(memory, tokens=8 * BLOCK)
    tokens = list(range(100, 100 + 3 * BLOCK + 5))  # 3 whole blocks and a part
    cache.store("a", tokens, row=0)
    assert cache.stats.stored_blocks == 3
    expected = positions(memory, 0, 3 * BLOCK)
    after = [t[2].clone() for t in (*memory.keys, *memory.values)]
    match = cache.match("a", tokens + [7])
    assert match.tokens == 3 * BLOCK
    cache.load(match, row=2)
    for got, want in zip(positions(memory, 2, 3 * BLOCK), expected):
        assert torch.equal(got, want)
    for tensor, before in zip((*memory.keys, *memory.values), after):  # beyond the prefix: as it was
        assert torch.equal(tensor[2, :, 3 * BLOCK:], before[:, 3 * BLOCK:])
    assert cache.stats.hit == 3 * BLOCK and cache.stats.queried == len(tokens) + 1


def test_a_match_needs_the_same_key_the_same_tokens_and_leaves_the_last_token() -> None:
    cache = PrefixCache(filled_memory(), tokens=8 * BLOCK)
    tokens = list(range(2 * BLOCK))
    cache.store("a", tokens, row=0)
    assert cache.match("b", tokens + [1]).tokens == 0  # other weights
    assert cache.match("a", tokens).tokens == BLOCK  # the last token is always computed
    assert cache.match("a", tokens + [1]).tokens == 2 * BLOCK
    changed = list(tokens)
    changed[BLOCK + 3] = 999  # the second block differs: the first still matches
    assert cache.match("a", changed + [1]).tokens == BLOCK
    changed[0] = 999
    assert cache.match("a", changed + [1]).tokens == 0
    assert cache.match("a", tokens[:BLOCK]).tokens == 0


def test_a_longer_prompt_adds_only_its_new_blocks() -> None:
    memory = filled_memory()
    cache = PrefixCache(memory, tokens=8 * BLOCK)
    tokens = list(range(4 * BLOCK))
    cache.store("a", tokens[:2 * BLOCK], row=0)
    cache.store("a", tokens, row=1)  # blocks 0-1 already there (from row 0): 2 new ones
    assert cache.stats.stored_blocks == 4 and cache.stats.held_blocks == 4
    cache.load(cache.match("a", tokens + [0]), row=2)
    want = [torch.cat([a[:, :2 * BLOCK], b[:, 2 * BLOCK:]], dim=1)
            for a, b in zip(positions(memory, 0, 4 * BLOCK), positions(memory, 1, 4 * BLOCK))]
    for got, expected in zip(positions(memory, 2, 4 * BLOCK), want):
        assert torch.equal(got, expected)


def test_a_full_pool_evicts_the_least_recently_used_ends_first() -> None:
    cache = PrefixCache(filled_memory(), tokens=4 * BLOCK)
    first, second = list(range(2 * BLOCK)), list(range(1000, 1000 + 2 * BLOCK))
    cache.store("a", first, row=0)
    cache.store("a", second, row=1)
    assert cache.match("a", first + [0]).tokens == 2 * BLOCK  # first is now the more recent
    third = list(range(2000, 2000 + BLOCK))
    cache.store("a", third, row=2)  # one block needed: second's end goes
    assert cache.stats.evicted_blocks == 1
    assert cache.match("a", second + [0]).tokens == BLOCK
    assert cache.match("a", third + [0]).tokens == BLOCK
    assert cache.match("a", first + [0]).tokens == 2 * BLOCK  # used last: kept
    cache.store("a", list(range(3000, 3000 + 2 * BLOCK)), row=0)  # evicts second, then third
    assert cache.match("a", second + [0]).tokens == 0 and cache.match("a", third + [0]).tokens == 0
    assert cache.match("a", first + [0]).tokens == 2 * BLOCK
    assert cache.stats.held_blocks == 4


def test_a_prefix_in_use_outlives_its_old_continuation() -> None:
    """A shared prefix whose last use came after other blocks' stays when its own old
    continuation is evicted (matching it touches blocks that other blocks continue)."""
    cache = PrefixCache(filled_memory(), tokens=4 * BLOCK)
    first, other = list(range(3 * BLOCK)), list(range(1000, 1000 + BLOCK))
    cache.store("a", first, row=0)
    cache.store("a", other, row=1)
    assert cache.match("a", first[:2 * BLOCK] + [0]).tokens == 2 * BLOCK  # the shared part, in use
    cache.store("a", list(range(2000, 2000 + 2 * BLOCK)), row=2)  # 2 blocks: first's end, other
    assert cache.stats.evicted_blocks == 2
    assert cache.match("a", other + [0]).tokens == 0
    assert cache.match("a", first + [0]).tokens == 2 * BLOCK


def test_a_prefix_longer_than_the_pool_keeps_what_fits() -> None:
    cache = PrefixCache(filled_memory(), tokens=2 * BLOCK)
    tokens = list(range(5 * BLOCK))
    cache.store("a", tokens, row=0)
    assert cache.stats.stored_blocks == 2
    assert cache.match("a", tokens).tokens == 2 * BLOCK
    cache.store("a", tokens, row=0)  # its own first blocks are never evicted to extend it
    assert cache.match("a", tokens).tokens == 2 * BLOCK


def test_sizes_are_checked() -> None:
    with pytest.raises(HotswapError, match="holds no block"):
        PrefixCache(filled_memory(), tokens=BLOCK - 1)
    for bad in (-1, 1.5, True, "64"):
        with pytest.raises(HotswapError, match="prefix_cache_tokens"):
            EngineConfig(prefix_cache_tokens=bad)


# -------------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base, paths, reference = abc_scene(tmp_path_factory, "prefix")
    rt = loaded_runtime(base, {name: paths[name] for name in "ab"})
    engine = GenerationEngine(rt, IdTokenizer(), EngineConfig(
        max_seqs=4, max_prefill_seqs=2, prefill_chunk=16, decode_buckets=(1, 4),
        prefix_cache_tokens=8 * BLOCK))
    engine.start()
    yield engine, reference, paths
    engine.stop()



def run(engine, ids, adapter, new):
    return tokens_of(engine.submit(ids, adapter, SamplingParams(max_tokens=new, **GREEDY)))


def test_a_shared_prefix_is_reused_under_the_same_adapter_only(env) -> None:
    engine, reference, _ = env
    shared = prompt(21, 2 * BLOCK + 3)
    hits = engine.prefix_cache.stats.hit
    cases = [("a", shared + prompt(22, 9), 0), ("a", shared + prompt(23, 4), 2 * BLOCK),
             ("b", shared + prompt(24, 6), 0), (None, shared + prompt(25, 6), 0),
             ("b", shared + prompt(27, 6), 2 * BLOCK), (None, shared, 2 * BLOCK)]
    for adapter, ids, cached in cases:
        tokens, finish = run(engine, ids, adapter, 6)
        assert tokens == reference_tokens(reference, adapter, ids, 6), adapter
        assert finish.cached_tokens == cached, adapter
        assert finish.prompt_tokens == len(ids)
    assert engine.prefix_cache.stats.hit - hits == 6 * BLOCK
    assert engine.rt.guard.recompiles == 0


def test_a_cache_salt_shares_kv_only_with_the_same_salt(env) -> None:
    engine, reference, _ = env
    ids = prompt(91, 2 * BLOCK + 4)
    params = SamplingParams(max_tokens=5, **GREEDY)

    def salted(salt):
        return tokens_of(engine.submit(ids, "a", params, cache_salt=salt))

    run(engine, ids, "a", 1)  # unsalted
    cached = []
    for salt in ("tenant-1", "tenant-1", "tenant-2", None):
        tokens, finish = salted(salt)
        assert tokens == reference_tokens(reference, "a", ids, 5)
        cached.append(finish.cached_tokens)
    assert cached == [0, 2 * BLOCK, 0, 2 * BLOCK]
    waiting = engine.load()["waiting"]
    for bad in ("", 5, b"x"):
        with pytest.raises(RequestError, match="cache_salt"):
            engine.submit(ids, "a", params, cache_salt=bad)
    assert engine.load()["waiting"] == waiting


def test_a_weighted_mix_is_a_key_of_its_own(env) -> None:
    engine, _, _ = env
    ids = prompt(31, 3 * BLOCK + 1)
    run(engine, ids, "a", 2)
    run(engine, ids, "b", 2)
    first, finish = run(engine, ids, {"a": 0.5, "b": 1.0}, 8)
    assert finish.cached_tokens == 0
    again, finish = run(engine, ids, {"b": 1.0, "a": 0.5}, 8)  # the same mix, other order
    assert finish.cached_tokens == 3 * BLOCK and again == first
    _, finish = run(engine, ids, {"a": 1.0, "b": 1.0}, 2)
    assert finish.cached_tokens == 0
    assert engine.rt.guard.recompiles == 0


def test_the_next_turn_reuses_the_previous_turns_output(env) -> None:
    engine, reference, _ = env
    first = prompt(41, BLOCK + 5)
    answer, finish = run(engine, first, "b", 30)
    assert finish.cached_tokens == 0
    # the row held the prompt and every output token but the last when it finished
    computed = len(first) + len(answer) - 1
    second = first + answer + prompt(42, 7)
    tokens, finish = run(engine, second, "b", 6)
    assert finish.cached_tokens == computed // BLOCK * BLOCK
    assert tokens == reference_tokens(reference, "b", second, 6)
    assert engine.rt.guard.recompiles == 0


def test_a_replaced_adapter_never_reuses_the_old_weights_kv(env) -> None:
    engine, reference, paths = env
    ids = prompt(51, 2 * BLOCK + 2)
    run(engine, ids, "a", 2)
    _, finish = run(engine, ids, "a", 2)
    assert finish.cached_tokens == 2 * BLOCK
    try:
        engine.call(lambda rt: rt.load("a", paths["c"], replace=True)).result(timeout=60)
        tokens, finish = run(engine, ids, "a", 6)
        assert finish.cached_tokens == 0
        assert tokens == reference_tokens(reference, "c", ids, 6)
        _, finish = run(engine, ids, "a", 2)  # the new weights' own KV is kept
        assert finish.cached_tokens == 2 * BLOCK
    finally:
        engine.call(lambda rt: rt.load("a", paths["a"], replace=True)).result(timeout=60)
    tokens, finish = run(engine, ids, "a", 6)  # the same files again: other weights all the same
    assert finish.cached_tokens == 0
    assert tokens == reference_tokens(reference, "a", ids, 6)
    assert engine.rt.guard.recompiles == 0


def test_requests_in_one_batch_share_a_prefix_a_full_pool_evicts(env) -> None:
    engine, reference, _ = env
    shared = prompt(61, 2 * BLOCK)
    run(engine, shared + [1], "a", 1)
    prompts = [shared + prompt(62 + i, 5 + i) for i in range(4)]
    handles = [engine.submit(ids, "a", SamplingParams(max_tokens=5, **GREEDY)) for ids in prompts]
    for ids, handle in zip(prompts, handles):
        tokens, finish = tokens_of(handle)
        assert finish.cached_tokens == 2 * BLOCK
        assert tokens == reference_tokens(reference, "a", ids, 5)
    evicted = engine.prefix_cache.stats.evicted_blocks
    for i in range(6):  # 6 prompts of 2 blocks through a pool of 8: the oldest go
        run(engine, prompt(70 + i, 2 * BLOCK + 1), "b", 1)
    stats = engine.prefix_cache.stats
    assert stats.evicted_blocks > evicted and stats.held_blocks <= stats.capacity_blocks == 8
    tokens, finish = run(engine, shared + [1, 2], "a", 4)
    assert finish.cached_tokens == 0
    assert tokens == reference_tokens(reference, "a", shared + [1, 2], 4)
    assert engine.rt.guard.recompiles == 0


def test_no_prefix_cache_when_asked(tmp_path) -> None:
    base = BaseModel("llama", seed=11)
    rt = loaded_runtime(base, {})
    engine = GenerationEngine(rt, IdTokenizer(), EngineConfig(max_seqs=2, max_prefill_seqs=1,
                                                              compile=False, prefix_cache_tokens=0))
    assert engine.prefix_cache is None
    engine.start()
    try:
        ids = prompt(81, 3 * BLOCK)
        for _ in range(2):
            _, finish = run(engine, ids, None, 2)
            assert finish.cached_tokens == 0
    finally:
        engine.stop()
    default = GenerationEngine(rt, IdTokenizer(), EngineConfig(max_seqs=2, max_prefill_seqs=1, compile=False))
    assert default.prefix_cache.stats.capacity_blocks == default.memory.rows * 129 // 8 // BLOCK


def test_random_requests_with_shared_prefixes_answer_as_without_the_cache(tmp_path) -> None:
    """60 requests whose prompts begin with parts of 3 prefixes, random adapters and mixes,
    6 at a time through a pool that must evict: each equals the same request alone on an
    engine without a prefix cache (eager engines)."""
    import random

    base = BaseModel("llama", seed=11)
    paths = abc_adapters(base, tmp_path)

    def eager_engine(prefix_tokens: int) -> GenerationEngine:
        engine = GenerationEngine(loaded_runtime(base, paths), IdTokenizer(), EngineConfig(
            max_seqs=4, max_prefill_seqs=2, prefill_chunk=8, compile=False,
            prefix_cache_tokens=prefix_tokens))
        engine.start()
        return engine

    rng = random.Random(0)
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randint(20, 60))] for _ in range(3)]
    requests = []
    for _ in range(60):
        suffix = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 20))]
        ids = rng.choice(prefixes)[:rng.randint(10, 60)] + suffix
        requests.append((ids, rng.choice(["a", "b", "c", None, {"a": 0.5, "b": 1.0}]), rng.randint(1, 8)))
    alone = eager_engine(0)
    try:
        expected = [run(alone, ids, adapter, new)[0] for ids, adapter, new in requests]
    finally:
        alone.stop()
    engine = eager_engine(40 * BLOCK)
    got = []
    try:
        for wave in range(0, len(requests), 6):
            handles = [engine.submit(ids, adapter, SamplingParams(max_tokens=new, **GREEDY))
                       for ids, adapter, new in requests[wave:wave + 6]]
            got += [tokens_of(handle)[0] for handle in handles]
    finally:
        engine.stop()
    assert got == expected
    stats = engine.prefix_cache.stats
    assert stats.hit >= 20 * BLOCK and stats.evicted_blocks > 0  # it was used, and it was full
