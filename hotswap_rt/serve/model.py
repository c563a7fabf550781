"""Building what a server serves: the model, its tokenizer and the runtime with the start-up
adapters (:func:`build_runtime`; :func:`serve_model` for a model already in memory)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..config import RuntimeConfig
from ..engine.config import context_length
from ..runtime import HotswapRuntime
from .config import ServeConfig
from .default_model import MODEL_NAME, TARGETS, build_default_model
from .demo_adapters import demo_adapter_paths
from .tokenizers import ByteTokenizer, HFTokenizer, Tokenizer


@dataclass
class Served:
    """What a server built: the runtime, its tokenizer, the base model's name, and the sampling
    defaults of requests that do not say (:func:`sampling_defaults`; ``default_max_tokens``
    None: what remains of the context)."""

    rt: HotswapRuntime
    tokenizer: Tokenizer
    model_name: str
    default_temperature: float = 1.0
    default_top_p: float = 1.0
    default_top_k: int = 0
    default_min_p: float = 0.0
    default_repetition_penalty: float = 1.0
    default_presence_penalty: float = 0.0
    default_frequency_penalty: float = 0.0
    default_max_tokens: int | None = None


GENERATION_DEFAULTS = {  # a generation config's field -> (Served's default, its type), as vLLM takes them
    "temperature": ("default_temperature", float), "top_p": ("default_top_p", float),
    "top_k": ("default_top_k", int), "min_p": ("default_min_p", float),
    "repetition_penalty": ("default_repetition_penalty", float),
    "presence_penalty": ("default_presence_penalty", float),
    "frequency_penalty": ("default_frequency_penalty", float), "max_new_tokens": ("default_max_tokens", int)}


def sampling_defaults(generation_config) -> dict[str, float | int]:
    """vLLM's defaults (its ``--generation-config auto``): ``temperature``, ``top_p``,
    ``top_k``, ``min_p``, ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``
    and ``max_new_tokens`` (the default ``max_tokens``) where the model's generation config sets
    them (values that differ from transformers' defaults, not None); the others keep
    :class:`Served`'s (1.0 / 1.0 / off / 0 / 1.0 / 0 / 0 / the rest of the context)."""
    given = generation_config.to_diff_dict() if generation_config is not None else {}
    defaults: dict[str, float | int] = {}
    for field, (name, kind) in GENERATION_DEFAULTS.items():
        if given.get(field) is not None:
            defaults[name] = kind(given[field])
    if defaults.get("default_top_k", 0) < 0:  # transformers' "off" may be written -1 too
        defaults["default_top_k"] = 0
    return defaults


def build_runtime(config: ServeConfig) -> Served:
    """Load (or build) the model and tokenizer, inject, and load the start-up adapters."""
    if config.model is None:  # the demo model answers greedily unless a request samples
        targets = TARGETS if config.target_modules == "all-linear" else config.target_modules
        adapters = {**{n: str(p) for n, p in demo_adapter_paths().items()}, **config.adapters}
        return serve_model(build_default_model(), ByteTokenizer(), MODEL_NAME, config, targets, adapters,
                           default_temperature=0.0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(config.model, dtype="auto").eval()
    return serve_model(model, HFTokenizer(AutoTokenizer.from_pretrained(config.model)), config.model, config,
                       config.target_modules, config.adapters,
                       **sampling_defaults(getattr(model, "generation_config", None)))


def serve_model(model: torch.nn.Module, tokenizer: Tokenizer, name: str, config: ServeConfig,
                targets: Any = None, adapters: Mapping[str, Any] | None = None,
                **defaults: float | int | None) -> Served:
    """``model`` (a causal LM already in memory) injected for serving with ``config``'s slots
    and limits, ``adapters`` (name -> source) loaded: what :func:`build_app` takes as
    ``served``. ``targets``: the modules to inject (None: ``config.target_modules``);
    ``defaults``: :class:`Served`'s sampling defaults."""
    model.to(torch.device(config.device))
    rt = HotswapRuntime(model, RuntimeConfig(
        config.target_modules if targets is None else targets, max_rank=config.max_rank,
        device_slots=config.device_slots,
        host_slots=max(config.host_slots, config.device_slots),
        max_batch_size=max(config.max_num_seqs, config.max_prefill_seqs),
        max_active_adapters=config.device_slots,
        max_adapters_per_row=min(config.max_adapters_per_request, config.device_slots),
        per_row_overflow="stacked" if config.stacked_mixes else "refuse",
        target_parameters=config.target_parameters, modules_to_save=config.modules_to_save,
        scale_vectors=config.scale_vectors, map_adapter_files=config.map_adapter_files))
    for adapter_name, source in (adapters or {}).items():
        if adapter_name == name:
            raise ValueError(f"adapter name {adapter_name!r} is the base model's name")
        rt.load(adapter_name, os.fspath(source))
    return Served(rt, tokenizer, name, **defaults)


def model_max_len(config: ServeConfig) -> int:
    """The context length a server for ``config`` has (without building it): the configured
    ``max_model_len``, else the model config's."""
    if config.max_model_len is not None:
        return config.max_model_len
    if config.model is None:
        return context_length(build_default_model().config)
    from transformers import AutoConfig

    return context_length(AutoConfig.from_pretrained(config.model))
