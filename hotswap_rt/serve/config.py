"""What a server serves and its limits (:class:`ServeConfig`), and building its model and runtime."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import RuntimeConfig
from ..runtime import HotswapRuntime
from .default_model import MODEL_NAME, TARGETS, ByteTokenizer, build_default_model
from .demo_adapters import demo_adapter_paths


@dataclass
class ServeConfig:
    """Server settings; every CLI flag of ``hotswap-rt serve`` maps to one field.

    Args:
        model: a local directory or Hub id; None serves the built-in tiny model and its demo
            adapters (no download).
        adapters: adapter name -> directory (or Hub id), loaded at start.
        max_batch_size, max_prompt_tokens, max_new_tokens: the one batch shape every generate
            call has (prompts are left-padded; see :mod:`hotswap_rt.serve.generation`).
        batch_wait_ms: how long the first waiting request waits for others to join its batch.
        allow_runtime_adapter_updates: expose ``/v1/load_lora_adapter`` and
            ``/v1/unload_lora_adapter``; paths must lie under ``adapter_root``.
        compile: ``torch.compile`` the model at start (off only for quick tests).
        mixed_batches: rows for different adapters share a batch; False runs one adapter per
            batch (the PEFT-style baseline of ``benchmarks/serve_load.py``).
    """

    model: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    target_modules: Any = "all-linear"
    max_rank: int = 16
    device_slots: int = 4
    host_slots: int = 16
    max_batch_size: int = 8
    batch_wait_ms: float = 5.0
    max_prompt_tokens: int = 128
    max_new_tokens: int = 64
    request_timeout_s: float = 60.0
    max_body_bytes: int = 1 << 20
    allow_runtime_adapter_updates: bool = False
    adapter_root: str | None = None
    device: str = "cpu"
    compile: bool = True
    mixed_batches: bool = True

    def __post_init__(self) -> None:
        for name in ("max_rank", "device_slots", "host_slots", "max_batch_size",
                     "max_prompt_tokens", "max_new_tokens", "max_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if self.batch_wait_ms < 0 or self.request_timeout_s <= 0:
            raise ValueError("batch_wait_ms must be >= 0 and request_timeout_s > 0")
        if self.allow_runtime_adapter_updates and not self.adapter_root:
            raise ValueError("allow_runtime_adapter_updates needs adapter_root (the only place "
                             "adapters may be loaded from)")
        if self.adapter_root is not None and not Path(self.adapter_root).is_dir():
            raise ValueError(f"adapter_root {self.adapter_root!r} is not a directory")


class HFTokenizer:
    """A ``transformers`` tokenizer behind the small interface the server uses."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        if getattr(self._tokenizer, "chat_template", None):
            return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return ByteTokenizer().chat_prompt(messages)


@dataclass
class Served:
    """What a server built: the runtime, its tokenizer, the base model's name."""

    rt: HotswapRuntime
    tokenizer: Any
    model_name: str
    default_temperature: float


def build_runtime(config: ServeConfig) -> Served:
    """Load (or build) the model and tokenizer, inject, and load the start-up adapters."""
    if config.model is None:
        model, tokenizer, name = build_default_model(), ByteTokenizer(), MODEL_NAME
        targets = TARGETS if config.target_modules == "all-linear" else config.target_modules
        adapters = {**{n: str(p) for n, p in demo_adapter_paths().items()}, **config.adapters}
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(config.model, dtype="auto").eval()
        tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(config.model))
        name, targets, adapters = config.model, config.target_modules, dict(config.adapters)
    model.to(torch.device(config.device))
    generation = getattr(model, "generation_config", None)
    do_sample = bool(getattr(generation, "do_sample", False))
    temperature = float(getattr(generation, "temperature", 1.0) or 1.0) if do_sample else 0.0
    rt = HotswapRuntime(model, RuntimeConfig(
        targets, max_rank=config.max_rank, device_slots=config.device_slots,
        host_slots=max(config.host_slots, config.device_slots),
        max_batch_size=config.max_batch_size, max_active_adapters=config.device_slots))
    for adapter_name, source in adapters.items():
        if adapter_name == name:
            raise ValueError(f"adapter name {adapter_name!r} is the base model's name")
        rt.load(adapter_name, os.fspath(source))
    return Served(rt, tokenizer, name, temperature)
