"""Shared fixtures: tiny random models of three families, and adapters made with real PEFT.

Everything is built from configs (no download). Adapters are created with
``get_peft_model(..., init_lora_weights=False)`` (random A and B, so every adapter changes the
output) and saved with ``save_pretrained``: exactly what users load.
"""

from __future__ import annotations

import copy
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers import Qwen2Config, Qwen2ForCausalLM

VOCAB = 128


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(config)


def tiny_qwen2() -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return Qwen2ForCausalLM(config)


FAMILIES: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "qwen2": tiny_qwen2,
}
# Attention projections of each family (what a typical adapter targets).
ATTENTION_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


class IdTokenizer:
    """The engine's tokenizer protocol with token ids as text (``" 12 7 99"``): exact and easy to
    compare."""

    eos_token_id = None

    def decode(self, ids: list[int]) -> str:
        return "".join(f" {i}" for i in ids)


class BaseModel:
    """A tiny random base model that can be cloned with identical weights any number of times."""

    def __init__(self, family: str, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.family = family
        self.model = FAMILIES[family]().eval()

    def clone(self) -> torch.nn.Module:
        return copy.deepcopy(self.model).eval()

    def make_adapter(
        self, directory: Path, seed: int, **lora_kwargs: Any
    ) -> Path:
        """Create a random PEFT LoRA adapter on a clone of this model and save it."""
        lora_kwargs.setdefault("target_modules", ATTENTION_TARGETS[self.family])
        lora_kwargs.setdefault("init_lora_weights", False)
        if self.family == "gpt2":
            lora_kwargs.setdefault("fan_in_fan_out", True)
        torch.manual_seed(seed)
        peft_model = get_peft_model(self.clone(), LoraConfig(**lora_kwargs))
        peft_model.save_pretrained(str(directory))
        return directory

    def peft_reference(self, adapters: dict[str, Path]) -> PeftModel:
        """A PeftModel on a clone of this model with every adapter loaded under its name."""
        names = list(adapters)
        reference = PeftModel.from_pretrained(self.clone(), str(adapters[names[0]]), names[0])
        for name in names[1:]:
            reference.load_adapter(str(adapters[name]), adapter_name=name)
        return reference.eval()


def logits(model: torch.nn.Module, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_rows_equal_alone(ours: torch.Tensor, ids: torch.Tensor, rows: list[str | None],
                            models: dict[str, torch.nn.Module], base: torch.nn.Module,
                            tol: float = 1e-4) -> None:
    """Row ``b`` of the logits ``ours`` equals ``models[rows[b]]`` (``base`` for None) run on
    ``ids[b]`` alone (the reference for a mixed batch: PEFT running each row's adapter alone)."""
    for row, name in enumerate(rows):
        model = base if name is None else models[name]
        assert max_diff(ours[row : row + 1], logits(model, ids[row : row + 1])) <= tol, name


@pytest.fixture(scope="session")
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(7))


def snapshot_state(rt: Any, ids: torch.Tensor) -> dict[str, Any]:
    """Everything a failed operation must leave as it was: slots, selection, registry, logits."""
    return {
        "arena": {dtype: a.clone() for dtype, a in rt.internals.arena.arenas.items()},
        "active_slots": rt.internals.selection.active_slots.clone(),
        "row_weights": rt.internals.selection.row_weights.clone(),
        "registry": {n: (r.slot, r.version, id(r.staged)) for n, r in rt.internals.registry.records.items()},
        "slot_owner": list(rt.internals.registry.slot_owner),
        "rows": rt.active,
        "logits": logits(rt.model, ids),
    }


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    for dtype in before["arena"]:
        assert torch.equal(before["arena"][dtype], after["arena"][dtype]), "slot contents changed"
    for key in ("active_slots", "row_weights", "logits"):
        assert torch.equal(before[key], after[key]), f"{key} changed"
    for key in ("registry", "slot_owner", "rows"):
        assert before[key] == after[key], f"{key} changed"


def loaded_and_compiled(model: torch.nn.Module, config: Any, adapters: dict[str, Path],
                        input_ids: torch.Tensor) -> Any:
    """A runtime over ``model`` with ``config`` (a ``RuntimeConfig``), every adapter of
    ``adapters`` loaded under its name, compiled for ``input_ids``."""
    from hotswap_rt import HotswapRuntime

    rt = HotswapRuntime(model, config)
    for name, path in adapters.items():
        rt.load(name, path)
    rt.compile(input_ids=input_ids)
    return rt


def file_is_mapped(path: Path) -> bool:
    """Whether this process maps the file ``path`` (Linux's ``/proc/self/maps``, by inode), once
    the values handed to the release thread (a load's mapped factors) have been dropped."""
    from hotswap_rt.release import wait_for_releases

    wait_for_releases()
    inode = str(path.stat().st_ino)
    return any(inode in line.split() for line in Path("/proc/self/maps").read_text().splitlines())


CAN_SEE_MAPS = Path("/proc/self/maps").exists()

def _can_lease() -> bool:
    """Whether this process gets read leases on files where pytest's ``tmp_path`` lives (the
    system's temp dir): without them (not Linux, a file system without leases) adapter files
    are read, not mapped, and the tests of mapping are skipped, saying why."""
    import os
    import tempfile

    from hotswap_rt.file_lease import close_now, open_leased

    handle, name = tempfile.mkstemp()
    os.close(handle)  # no descriptor open for writing, or no lease
    try:
        fd = open_leased(name)
        if fd is None:
            return False
        close_now(fd)
        return True
    finally:
        os.unlink(name)


CAN_LEASE = _can_lease()  # read leases keep writers out of mapped files


def start_writer(path: Path, data: bytes) -> subprocess.Popen:
    """Another process that truncates ``path`` and writes ``data`` into it (``open(path,
    "wb")``, as PEFT's ``save_pretrained`` writes a file), started and given 0.3 s past the
    moment it opens the file: a writer not kept out by a lease has finished by then."""
    code = ("import sys; print('opening', flush=True); "
            f"f = open({str(path)!r}, 'wb'); f.write(sys.stdin.buffer.read()); f.close()")
    writer = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert writer.stdin is not None and writer.stdout is not None
    writer.stdin.write(data)
    writer.stdin.close()
    assert writer.stdout.readline() == b"opening\n"
    time.sleep(0.3)
    return writer


@pytest.fixture
def mapped_reads(monkeypatch) -> list[Path]:
    """The files ``hotswap_rt.safetensors_read`` maps during the test, in order (it still maps
    them)."""
    from hotswap_rt import safetensors_read

    files: list[Path] = []
    real = safetensors_read._mapped

    def recording(path: Path):
        files.append(Path(path))
        return real(path)

    monkeypatch.setattr(safetensors_read, "_mapped", recording)
    return files


@pytest.fixture(scope="module")
def weather_server():
    """An eager server of the built-in model with the ``weather`` demo adapter and Hermes
    "auto" tool choice: an ``openai`` client and the URL."""
    import openai

    from hotswap_rt.serve import ServeConfig, build_app
    from hotswap_rt.serve.background import BackgroundServer
    from hotswap_rt.serve.demo_adapters import tool_adapter_path

    config = ServeConfig(compile=False, max_rank=8, enable_auto_tool_choice=True, tool_call_parser="hermes",
                         adapters={"weather": str(tool_adapter_path())})
    with BackgroundServer(build_app(config)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120), url


def word_vocabulary() -> list[bytes | None]:
    """The byte tokenizer's tokens, then ~6000 words of letters and spaces (1 in 100 with
    quotes and braces), as a real vocabulary has most of its tokens: inside a JSON string a
    state bans under 1/32 of them (``structured.SPARSE_BELOW``). (Here, not in test_structured,
    so that test_cuda needs no HTTP stack on a GPU machine.)"""
    from hotswap_rt.serve.tokenizers import ByteTokenizer

    words, letters = random.Random(7), "abcdefghijklmnopqrstuvwxyz "
    return ByteTokenizer().token_bytes() + sorted({
        "".join(words.choice(letters if n % 100 else '",}ab') for _ in range(words.randint(2, 5))).encode()
        for n in range(6000)})
