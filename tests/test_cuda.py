"""CUDA paths: pinned host rows, slot copies ordered after the forwards that read a slot,
and the engine's CUDA-graph buckets (``mode="reduce-overhead"``) with no re-recording.

Skipped without a CUDA device (CI has none); ``scripts/gpu_check.sh`` runs them on a GPU.
References are independent of the runtime: PEFT on the same device, and the engine run eagerly.
"""

from __future__ import annotations

import time

import pytest
import torch

from hotswap_rt import HotswapRuntime, RuntimeConfig
from hotswap_rt.engine import EngineConfig, GenerationEngine, SamplingParams

from .conftest import ATTENTION_TARGETS, VOCAB, BaseModel, IdTokenizer, logits, word_vocabulary

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TARGETS = ATTENTION_TARGETS["llama"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    base = BaseModel("llama", seed=3)
    paths = {name: base.make_adapter(root / name, seed=20 + i, r=4 * (i + 1), lora_alpha=8)
             for i, name in enumerate("ab")}
    reference = base.peft_reference(paths).cuda()
    return base, paths, reference


def peft_logits(reference, name: str | None, ids: torch.Tensor) -> torch.Tensor:
    if name is None:
        with reference.disable_adapter():
            return logits(reference, ids)
    reference.base_model.set_adapter(name)
    return logits(reference, ids)


def test_host_rows_are_pinned_and_swaps_into_one_slot_equal_peft(adapters) -> None:
    base, paths, reference = adapters
    rt = HotswapRuntime(base.clone().cuda(), RuntimeConfig(TARGETS, max_rank=8, device_slots=1))
    for name, path in paths.items():
        rt.load(name, path)
    assert rt.internals.arena.pin_host_rows
    for record in rt.internals.registry.records.values():
        assert all(row.is_pinned() for row in record.staged.rows.values())
    ids = torch.randint(0, VOCAB, (2, 9), device="cuda")
    for name in ("a", "b", "a", None, "b"):
        rt.activate(name)
        torch.testing.assert_close(logits(rt.model, ids), peft_logits(reference, name, ids),
                                   atol=1e-4, rtol=1e-4)
    assert rt.stats()["swaps"] >= 3  # one slot: every change of adapter was a copy


def test_a_swap_waits_for_the_queued_forward_that_reads_the_slot(adapters) -> None:
    """The forward is queued behind a ~50 ms GPU sleep; the swap that follows at once on the
    host must not overwrite the slot before that forward has read it."""
    base, paths, reference = adapters
    rt = HotswapRuntime(base.clone().cuda(), RuntimeConfig(TARGETS, max_rank=8, device_slots=1))
    for name, path in paths.items():
        rt.load(name, path)
    ids = torch.randint(0, VOCAB, (2, 9), device="cuda")
    expected = peft_logits(reference, "a", ids)
    rt.activate("a")
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # keeps the compute stream busy (~50 ms at 2 GHz)
    out = logits(rt.model, ids)  # queued, not run yet
    rt.activate("b")  # copies b into the one slot, queued behind that forward
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_a_switch_between_resident_adapters_does_not_wait_for_queued_forwards(adapters) -> None:
    """The selection is written from pinned memory without blocking: the host returns while the
    GPU still runs the forward queued before it, and that forward reads the old selection."""
    base, paths, reference = adapters
    rt = HotswapRuntime(base.clone().cuda(), RuntimeConfig(TARGETS, max_rank=8, device_slots=2))
    for name, path in paths.items():
        rt.load(name, path)
    ids = torch.randint(0, VOCAB, (2, 9), device="cuda")
    for name in ("a", "b", "a"):  # both resident; each selection's host values built once
        rt.activate(name)
        logits(rt.model, ids)
    swaps = rt.stats()["swaps"]
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # keeps the compute stream busy (~50 ms at 2 GHz)
    out_a = logits(rt.model, ids)  # queued behind the sleep
    rt.activate("b")
    still_busy = not torch.cuda.current_stream().query()
    out_b = logits(rt.model, ids)
    torch.cuda.synchronize()
    assert still_busy  # the switch did not wait for the sleep and the forward behind it
    assert rt.stats()["swaps"] == swaps  # a switch, no copy into a slot
    torch.testing.assert_close(out_a, peft_logits(reference, "a", ids), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_b, peft_logits(reference, "b", ids), atol=1e-4, rtol=1e-4)


def cuda_engine(base, paths, max_adapters_per_row: int | None = None, **config) -> GenerationEngine:
    """A fresh runtime on CUDA with adapters ``paths`` loaded, and its engine (4 sequences of at
    most 64 tokens; ``config`` sets or overrides the rest of the :class:`EngineConfig`)."""
    torch._dynamo.reset()
    rt = HotswapRuntime(base.clone().cuda(), RuntimeConfig(
        TARGETS, max_rank=8, device_slots=2, max_batch_size=4, max_adapters_per_row=max_adapters_per_row))
    for name, path in paths.items():
        rt.load(name, path)
    settings = dict(max_seqs=4, max_model_len=64, max_prefill_seqs=2, prefill_chunk=16, decode_buckets=(4,))
    return GenerationEngine(rt, IdTokenizer(), EngineConfig(**{**settings, **config}))


def test_engine_cuda_graph_buckets_equal_the_eager_engine_without_rerecording(adapters) -> None:
    base, paths, _ = adapters
    prompts = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (5, 11, 3, 17)]
    rows = ["a", "b", None, "a"]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outputs = {}
    for compiled in (False, True):
        engine = cuda_engine(base, paths, compile=compiled)
        rt = engine.rt
        engine.start()
        try:
            handles = [engine.submit(p, adapter, params) for p, adapter in zip(prompts, rows)]
            outputs[compiled] = [h.text()[0] for h in handles]
        finally:
            engine.stop()
        assert rt.internals.selection.per_row_decode_reduce  # per_row_decode="auto": in place on CUDA
        if compiled:
            assert engine.config.compile_mode is None  # default: reduce-overhead on CUDA
            assert rt.guard.recordings >= 1
            assert rt.guard.recompiles == 0 and rt.guard.rerecords == 0
    assert outputs[True] == outputs[False]


def test_engine_serving_while_compiling_on_cuda_answers_the_same_before_and_after(adapters) -> None:
    """``EngineConfig(serve_while_compiling=True)`` on CUDA (mode "default": no CUDA graphs; a
    graph per bucket): steps run eagerly on the engine thread while the compile thread traces
    and launches its warm-up on the same device, then the compiled graphs; greedy outputs are
    the same in both phases, nothing recompiles."""
    base, paths, _ = adapters
    prompts = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (5, 11, 3, 17)]
    rows = ["a", "b", None, "a"]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine = cuda_engine(base, paths, max_adapters_per_row=2, decode_buckets=(1, 4),
                         serve_while_compiling=True, compile_mode="default")
    rt = engine.rt
    engine.start()
    try:
        assert engine.compile_state == "compiling"
        by_phase: dict[str, list] = {}
        deadline = time.monotonic() + 300
        while "compiled" not in by_phase:
            phase = engine.compile_state
            handles = [engine.submit(p, adapter, params) for p, adapter in zip(prompts, rows)]
            outputs = [h.text()[0] for h in handles]
            if engine.compile_state == phase:  # the whole round ran in one phase
                by_phase.setdefault(phase, outputs)
            assert phase != "failed", engine.compile_error
            assert time.monotonic() < deadline, "the compile did not end"
    finally:
        engine.stop()
    assert "compiling" in by_phase, "no round ran wholly before the compile ended"
    assert by_phase["compiling"] == by_phase["compiled"]
    assert rt.guard.recordings == 0 and rt.guard.recompiles == 0, rt.guard.report()


def test_per_row_decode_reduce_compiled_on_cuda_equals_peft(adapters) -> None:
    """``per_row_decode="reduce"`` compiled on CUDA (triton kernels indexing the arena by each
    row's slot): one-token rows equal PEFT's, no recompile across selections."""
    base, paths, reference = adapters
    rt = HotswapRuntime(base.clone().cuda(), RuntimeConfig(TARGETS, max_rank=8, device_slots=2,
                                                            max_adapters_per_row=1, per_row_decode="reduce"))
    for name, path in paths.items():
        rt.load(name, path)
    ids = torch.randint(0, VOCAB, (4, 1), device="cuda")
    rows = ["a", None, "b", "a"]
    rt.activate_rows(rows)
    rt.compile(ids, guard="raise")
    for selection in (rows, ["b", "b", None, "a"]):
        rt.activate_rows(selection)
        expected = logits(reference, ids, adapter_names=[r or "__base__" for r in selection])
        torch.testing.assert_close(logits(rt.model, ids), expected, atol=1e-4, rtol=1e-4)
    assert rt.guard.recompiles == 0


def test_scale_vector_adapters_on_linear_and_conv_layers_equal_peft_on_cuda(tmp_path) -> None:
    """DoRA (its norm taken on the base weight's device), LoRA bias and IA3 on a ConvNet's convs
    and linear head, staged into pinned rows and run on CUDA: each equal to PEFT on CUDA,
    alone and mixed per row."""
    import copy

    from peft import PeftModel, get_peft_model

    from .test_layer_kinds import CONV_TARGETS, VECTOR_CONFIGS, ConvNet

    torch.manual_seed(0)
    base = ConvNet().eval()
    sample = torch.randn(3, 4, 8, 8, device="cuda")
    rt = HotswapRuntime(copy.deepcopy(base).cuda(), RuntimeConfig(
        CONV_TARGETS, max_rank=8, device_slots=3, max_batch_size=4, scale_vectors=True))
    expected = {}
    for seed, (name, make_config) in enumerate(VECTOR_CONFIGS.items()):
        torch.manual_seed(30 + seed)
        model = get_peft_model(copy.deepcopy(base), make_config())
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "magnitude" in key:
                    param.mul_(1 + 0.5 * torch.rand_like(param))
        model.save_pretrained(tmp_path / name)
        reference = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name).cuda().eval()
        with torch.no_grad():
            expected[name] = reference(sample)
        rt.load(name, tmp_path / name)
    with torch.no_grad():
        for name in expected:
            rt.activate(name)
            torch.testing.assert_close(rt.model(sample), expected[name], atol=1e-4, rtol=1e-4)
        rows = list(expected)
        rt.activate_rows(rows)
        out = rt.model(sample)
    for i, name in enumerate(rows):
        torch.testing.assert_close(out[i], expected[name][i], atol=1e-4, rtol=1e-4)


def test_slot_writes_reuse_one_event_per_thread_and_land_before_returning() -> None:
    """``write_slot`` waits on an event of the calling thread's own, recorded again on every
    write (two threads never wait on each other's record); after each write returns, the slot
    holds its row (read back on another stream, which does not wait for the compute stream)."""
    import threading

    from hotswap_rt.arena import SlotArena

    arena = SlotArena({"layer": (4096, 4096, torch.float32)}, max_rank=16, num_slots=2,
                      device=torch.device("cuda"))
    rows = [torch.randn(16 * 8192).pin_memory() for _ in range(4)]
    events: dict[str, list] = {}
    reader = torch.cuda.Stream()

    def write(slot: int, label: str, ordered: bool) -> None:
        for i in range(8):
            row = rows[(slot + i) % len(rows)]
            arena.write_slot(slot, {torch.float32: row}, ordered=ordered)
            events.setdefault(label, []).append(arena._copy_done.event)
            with torch.cuda.stream(reader):
                landed = arena.arenas[torch.float32][slot].to("cpu", non_blocking=False)
            assert torch.equal(landed, row), (label, i)

    failures: list[BaseException] = []

    def write_in_thread() -> None:
        try:
            write(1, "other", False)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failures.append(exc)

    other = threading.Thread(target=write_in_thread)
    other.start()
    write(0, "main", True)
    other.join()
    assert not failures, failures
    assert len(events["other"]) == 8 and len(events["main"]) == 8
    assert all(e is events["main"][0] for e in events["main"])
    assert all(e is events["other"][0] for e in events["other"])
    assert events["main"][0] is not events["other"][0]


def test_a_row_added_for_layers_of_a_new_dtype_is_pinned() -> None:
    """Layers of another dtype injected after an adapter was staged (a lazy runtime): the zero
    row its staged rows get for that dtype is pinned like every host row (the copy into a slot
    is a non-blocking one from pinned memory)."""
    from hotswap_rt.arena import SlotArena
    from hotswap_rt.peft_format import LoraModule, ParsedAdapter
    from hotswap_rt.staging import Stager

    arena = SlotArena({"q": (8, 4, torch.float32)}, max_rank=2, num_slots=2, device=torch.device("cuda"))
    stager = Stager(arena)
    module = LoraModule(torch.randn(2, 8), torch.randn(4, 2), 2, alpha=4.0, scaling=2.0)
    staged = stager.stage(ParsedAdapter(rank=2, alpha=4.0, use_rslora=False, modules={"q": module}))
    arena.extend({"half": (4, 4, torch.float16)})
    arena.enable_vectors()  # the new dtype's row then holds its scale vectors: not empty
    arena.write_slot(0, {torch.float16: torch.ones(arena.row_sizes[torch.float16], dtype=torch.float16)})
    stager.fit_rows(staged)
    assert staged.rows[torch.float16].numel() == arena.vector_sizes[torch.float16] > 0
    assert all(row.is_pinned() for row in staged.rows.values())
    arena.write_slot(0, staged.rows)
    assert arena.arenas[torch.float16][0].abs().sum().item() == 0


def test_prefix_cache_with_cuda_graphs_answers_as_without_it(adapters) -> None:
    """Static CUDA-graph shapes: a prefill that starts after the cached blocks (32 positions)
    gives what the whole prefill gives, with no re-recording."""
    base, paths, _ = adapters
    shared = torch.randint(0, VOCAB, (35,), generator=torch.Generator().manual_seed(7)).tolist()
    prompts = [shared + [1, 2, 3, 4, 5], shared + [9, 8, 7, 6, 5, 4, 3]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outputs, cached = {}, {}
    for tokens in (0, 128):
        engine = cuda_engine(base, paths, prefix_cache_tokens=tokens)
        rt = engine.rt
        engine.start()
        try:
            results = [engine.submit(p, "a", params).text() for p in prompts]  # one after the other
        finally:
            engine.stop()
        outputs[tokens] = [text for text, _ in results]
        cached[tokens] = [finish.cached_tokens for _, finish in results]
        assert rt.guard.recompiles == 0 and rt.guard.rerecords == 0
    assert cached == {0: [0, 0], 128: [0, 32]}
    assert outputs[128] == outputs[0]


def test_grammar_bias_on_the_device_equals_the_hosts() -> None:
    """Structured output's masks go to the GPU packed (pinned, one copy) and are unpacked there."""
    from hotswap_rt.engine.structured import Grammars, StructuredOutput, grammar_bias
    from hotswap_rt.serve.tokenizers import EOS_ID, ByteTokenizer

    tokens = ByteTokenizer().token_bytes()
    grammars = Grammars(tokens, EOS_ID, vocab_size=len(tokens) + 1)
    rows = [grammars.row(StructuredOutput.json_object()), grammars.row(StructuredOutput.regex("[a-c]+"))]
    rows[1].advance(ord("a"))
    on_device = grammar_bias(rows, torch.device("cuda"))
    assert on_device.device.type == "cuda"
    assert torch.equal(on_device.cpu(), grammar_bias(rows, torch.device("cpu")))


def test_sampling_and_sparse_bans_on_the_device_equal_the_hosts() -> None:
    """The sampler's pieces on the GPU (argmax, nucleus by a sort there, the draw through the
    whole running sum) pick what the CPU's (blocks, the largest first) pick; a state kept as
    banned ids masks the same scores there."""
    from hotswap_rt.engine.sampling import argmax_rows, draw_from, nucleus
    from hotswap_rt.engine.structured import Grammars, StructuredOutput, mask_scores
    from hotswap_rt.serve.tokenizers import EOS_ID

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5000, generator=generator) * torch.linspace(0.5, 8.0, 8).unsqueeze(1)
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.tensor([0.5, 0.9, 0.95, 1.0, 0.8, 0.99, 0.7, 0.6])
    uniform = torch.rand(8, dtype=torch.float64, generator=generator)
    gpu = torch.device("cuda")
    assert torch.equal(argmax_rows(logits.to(gpu)).cpu(), argmax_rows(logits))
    kept = nucleus(probs, top_p)
    assert torch.equal(nucleus(probs.to(gpu), top_p.to(gpu)).cpu() > 0, kept > 0)
    assert torch.equal(draw_from(kept.to(gpu), uniform.to(gpu)).cpu(), draw_from(kept, uniform))
    tokens = word_vocabulary()
    grammars = Grammars(tokens, EOS_ID, vocab_size=len(tokens))
    spec = StructuredOutput.json_schema({"type": "object", "properties": {"a": {"type": "string"}}})
    row = grammars.row(spec)
    for byte in b'{"a": "xy':
        row.advance(byte)
    scores = torch.randn(2, len(tokens), generator=generator)
    on_host = scores.clone()
    mask_scores(on_host, [row], [1])
    assert row.kept(torch.device("cpu"))[0].dtype == torch.int64  # a string: few banned
    on_device = scores.to(gpu)
    mask_scores(on_device, [row], [1])
    assert row.kept(on_device.device)[0].dtype == torch.int64  # kept under the scores' device, cuda:0
    assert torch.equal(on_device.cpu(), on_host)


def test_device_values_are_queued_behind_the_device_work_without_waiting_for_it() -> None:
    """The engine's per-step values (:func:`device_values`) reach the GPU equal to
    ``torch.tensor``'s, and the call returns while a long kernel queued before it still runs;
    ``torch.tensor(..., device="cuda")`` waits for it (what the engine no longer does)."""
    from hotswap_rt.engine.device_values import device_values

    cases = (([3, 1, 2], None), ([0.5, 2.0], None), ([True, False], None), ([[1, 2], [3, 4]], torch.long))
    for values, dtype in cases:
        got = device_values(values, torch.device("cuda"), dtype)
        assert got.device.type == "cuda" and torch.equal(got.cpu(), torch.tensor(values, dtype=dtype))
    busy = torch.cuda.Event()
    for make, waits in ((lambda: device_values([1, 2, 3], "cuda"), False),
                        (lambda: torch.tensor([1, 2, 3], device="cuda"), True)):
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)  # about a second of one multiprocessor's cycles
        busy.record()
        value = make()
        assert busy.query() is waits  # still running: the call did not wait for it
        assert value.tolist() == [1, 2, 3]
