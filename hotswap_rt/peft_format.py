"""Read and write PEFT's LoRA on-disk format without importing peft.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys
look like ``base_model.model.<module name>.lora_A.weight`` (A: ``[r, d_in]``) and
``...lora_B.weight`` (B: ``[d_out, r]``). ``<module name>`` is the layer's name in the
transformers model. Scaling is ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), where ``r`` and
``lora_alpha`` may be overridden per module by ``rank_pattern`` / ``alpha_pattern``.

This module only parses and validates the adapter in isolation; whether it fits a model is checked
by :mod:`hotswap_rt.arena` against the injected layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import lora_scaling, name_matches, regex_problem
from .errors import AdapterFormatError
from .safetensors_read import Allocate, read_safetensors

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
_KEY_PREFIXES = ("base_model.model.", "base_model.")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<which>A|B)$")
# PEFT's save_embedding_layers: the targeted embedding's own weight saved beside its LoRA.
_SAVED_BASE_KEY = re.compile(r"^(?P<module>.+)\.base_layer\.weight$")
# Per-module vectors: DoRA's magnitude, LoRA's bias on B (lora_bias), IA3's scaling vector.
_VECTOR_KEYS = (
    (re.compile(r"^(?P<module>.+)\.lora_magnitude_vector$"), "magnitude"),
    (re.compile(r"^(?P<module>.+)\.lora_B\.bias$"), "bias"),
    (re.compile(r"^(?P<module>.+)\.ia3_l$"), "ia3"),
)

LINEAR, CONV, EMBEDDING, EXPERTS = "linear", "conv", "embedding", "experts"  # LoraModule.kind
# The expert parameters of transformers' fused experts modules, in the order they are defined
# (and PEFT wraps them: the first innermost, see _parameter_targets).
EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")

# Config fields naming PEFT features a LoRA slot cannot represent yet; refused when set.
_UNSUPPORTED_FIELDS = {
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QALoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
}


@dataclass(frozen=True)
class LoraModule:
    """One layer's LoRA factors, unpadded and unscaled, as matrices (the slot layout).

    Linear layers store exactly this on disk. The other kinds are converted on read and back on
    write (:func:`disk_factors`):

    - ``"conv"`` (``nn.Conv2d``): on disk A ``[rank, C_in, kh, kw]`` and B
      ``[C_out, rank / groups, 1, 1]`` (a 1x1 conv with the base layer's ``groups``). Here A is
      flattened to ``[rank, C_in*kh*kw]`` and B expanded to its block-diagonal ``[C_out, rank]``
      (output group ``j`` reads only ranks ``j*rank/groups ..``), so the delta is the linear
      LoRA formula over the conv's patches.
    - ``"embedding"`` (``nn.Embedding``): ``lora_embedding_A`` ``[rank, num_embeddings]`` and
      ``lora_embedding_B`` ``[embedding_dim, rank]``, already matrices.

    Besides the factors a module may carry vectors (on linear and Conv2d layers; on an
    Embedding DoRA only), held in a slot's scale vectors (:func:`~hotswap_rt.arena.vector_views`):

    - ``magnitude`` (DoRA, ``use_dora``): ``m [d_out]``; the layer computes
      ``base(x) + (s - 1) * (W x) + s * scaling * B A x`` with ``s = m / ||W + scaling B A||``
      (the norm of each output row, computed at staging from the base weight).
    - ``bias`` (``lora_bias``): ``lora_B.bias [d_out]``, added as ``scaling * bias``.
    - ``ia3`` (an IA3 adapter, rank 0, no factors): the vector ``l``, scaling the layer's output
      ``[d_out]``, or with ``ia3_feedforward`` its input ``[d_in]`` (a Conv2d: its output or
      input channels; ``kind`` is then ``"conv"``).

    On a Conv2d (ungrouped) these act per channel; its magnitude is ``[1, C_out, 1, 1]`` on disk.

    Attributes:
        lora_A: ``[rank, d_in]`` (``[0, 0]`` for IA3).
        lora_B: ``[d_out, rank]`` (``[0, 0]`` for IA3).
        rank: this module's rank (``lora_A.shape[0]``).
        alpha: this module's ``lora_alpha`` after ``alpha_pattern``.
        scaling: ``alpha / rank`` (or ``alpha / sqrt(rank)`` with rsLoRA).
        kind: ``"linear"``, ``"conv"`` or ``"embedding"``.
        kernel: ``"conv"`` only: A's on-disk dims after the rank, ``(C_in, kh, kw)``.
        groups: ``"conv"`` only: the 1x1 B conv's groups.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    rank: int
    alpha: float
    scaling: float
    kind: str = LINEAR
    kernel: tuple[int, ...] = ()
    groups: int = 1
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    ia3: torch.Tensor | None = None
    ia3_feedforward: bool = False

    @property
    def has_vectors(self) -> bool:
        """Whether the slot must hold scale vectors for this module."""
        return self.magnitude is not None or self.bias is not None or self.ia3 is not None

    def vectors(self) -> dict[str, torch.Tensor]:
        """The vectors it carries, by PEFT key suffix."""
        named = (("lora_magnitude_vector", self.magnitude), ("lora_B.bias", self.bias))
        found = {key: value for key, value in named if value is not None}
        if self.ia3 is not None:
            found["ia3_l"] = self.ia3
        return found


@dataclass(frozen=True)
class ParsedAdapter:
    """A validated PEFT adapter (LoRA, DoRA, LoRA with bias, or IA3): its default
    hyper-parameters and per-module factors and vectors.

    ``saved_base_weights``: module -> the base weight PEFT saved beside its LoRA
    (``save_embedding_layers``); loading checks it equals the model's own, saving leaves it out.
    ``peft_type``: ``"LORA"`` or ``"IA3"`` (rank 0, alpha 0: vectors only). ``use_dora`` /
    ``lora_bias``: the LoRA config's flags (every module then carries a magnitude / a bias).
    ``saved_modules``: the ``modules_to_save`` modules' own trained parameters, module name ->
    ``{"weight": [d_out, d_in], "bias": [d_out]}`` (bias if saved); ``modules_to_save`` the
    config's names for them. ``target_parameters``: the config's names of the expert parameters
    its ``"experts"`` modules (named ``<experts module>.<param>``) were trained on.
    """

    rank: int
    alpha: float
    use_rslora: bool
    modules: dict[str, LoraModule]
    saved_base_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    source: str | None = None
    peft_type: str = "LORA"
    use_dora: bool = False
    lora_bias: bool = False
    saved_modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    target_parameters: tuple[str, ...] = ()

    @property
    def scaling(self) -> float:
        """The default ``alpha / r`` (0 for IA3, which has no LoRA factors)."""
        return lora_scaling(self.rank, self.alpha, self.use_rslora) if self.rank else 0.0

    @property
    def has_vectors(self) -> bool:
        return any(module.has_vectors for module in self.modules.values())


# ----------------------------------------------------------------------------------------- reading
def resolve_source(source: str | os.PathLike[str], local_files_only: bool = False) -> Path:
    """Find an adapter directory: a local path, else a Hugging Face Hub id via ``huggingface_hub``.

    Hub ids resolve through the local HF cache only when ``local_files_only`` or
    ``HF_HUB_OFFLINE`` is set (as on machines without network); otherwise ``huggingface_hub``
    may download into the cache.

    Raises:
        AdapterFormatError: the path does not exist and the id is not in the cache / on the Hub.
    """
    if not isinstance(source, (str, os.PathLike)) or isinstance(os.fspath(source), bytes):
        raise AdapterFormatError(f"an adapter source is a directory (str or path) or a Hub id, got "
                                 f"{type(source).__name__} {source!r}")
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if path.exists():
        raise AdapterFormatError(f"adapter source {text!r} is a file; pass its directory")
    if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", text):
        raise AdapterFormatError(f"adapter source {text!r} is neither a directory nor a Hub id")
    from huggingface_hub import constants, snapshot_download

    try:
        local = snapshot_download(
            repo_id=text,
            allow_patterns=[CONFIG_NAME, SAFETENSORS_NAME],
            local_files_only=local_files_only or bool(constants.HF_HUB_OFFLINE),
        )
    except Exception as exc:  # huggingface_hub raises many types; all mean "not found here"
        raise AdapterFormatError(
            f"adapter source {text!r} is not a local directory and could not be resolved as a "
            f"Hugging Face Hub id ({type(exc).__name__}: {exc})"
        ) from exc
    return Path(local)


FileStamp = tuple[str, int, int, int, int, int]  # name, size, mtime (ns), ctime (ns), device, inode


def adapter_files_stamp(directory: str | os.PathLike[str]) -> tuple[FileStamp, ...]:
    """What tells whether an adapter directory still holds the files once read: for each of its
    config and weights files present, its name, size, modification and change times, device and
    inode. A replacement changes the inode; a rewrite in place changes the change time, which
    the kernel sets on every write and no one can set back (``cp -p`` or ``touch -r`` restore
    the modification time only); a ``chmod`` changes it too, a false alarm that errs on the
    safe side. Symlinks, as in the Hub cache, are followed."""
    stamps, base = [], os.fspath(directory)
    for name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME):
        try:
            stat = os.stat(os.path.join(base, name))
        except OSError:
            continue
        stamps.append((name, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_dev, stat.st_ino))
    return tuple(stamps)


def changed_files(directory: str | os.PathLike[str], stamp: tuple[FileStamp, ...]) -> list[str]:
    """The names of ``directory``'s adapter files whose :func:`adapter_files_stamp` differs from
    ``stamp`` (changed, appeared or gone), sorted; empty when none does."""
    now = adapter_files_stamp(directory)
    if now == stamp:
        return []
    return sorted({entry[0] for entry in set(now) ^ set(stamp)})


def read_adapter_dir(
    directory: str | os.PathLike[str], allow_pickle: bool = False, empty: Allocate | None = None,
    mapped: bool = False,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read ``adapter_config.json`` and the weights file of a PEFT adapter directory.

    Args:
        directory: the adapter directory.
        allow_pickle: also accept ``adapter_model.bin`` (read with ``torch.load(weights_only=True)``)
            when there is no safetensors file.
        empty: allocates the buffer a safetensors file is read into (see
            :func:`~hotswap_rt.safetensors_read.read_safetensors`).
        mapped: a safetensors file's tensors are views of a private memory map of it, read
            when used (see :func:`~hotswap_rt.safetensors_read.read_safetensors`).

    Returns:
        The config as a dict and the state dict (CPU tensors).

    Raises:
        AdapterFormatError: a file is missing, unreadable, not JSON, or not a valid weights file.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterFormatError(f"{config_path}: missing (not a PEFT adapter directory)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFormatError(f"{config_path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{config_path}: expected a JSON object, got {type(config).__name__}")

    weights_path = directory / SAFETENSORS_NAME
    if weights_path.is_file():
        return config, read_safetensors(weights_path, empty, mapped)
    bin_path = directory / BIN_NAME
    if bin_path.is_file():
        if not allow_pickle:
            raise AdapterFormatError(
                f"{bin_path}: pickle weights are refused by default; pass allow_pickle=True to read "
                f"them with torch.load(weights_only=True), or convert to safetensors"
            )
        try:
            state = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AdapterFormatError(f"{bin_path}: unreadable ({exc})") from exc
        if not isinstance(state, dict):
            raise AdapterFormatError(f"{bin_path}: expected a state dict")
        return config, state
    raise AdapterFormatError(f"{weights_path}: missing (no adapter weights in {directory})")


# ----------------------------------------------------------------------------------------- parsing
def config_as_dict(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """An adapter config given as a dict or a PEFT config object (``to_dict()``) as a plain
    dict, enum values as their values (``PeftType.LORA`` -> ``"LORA"``)."""
    raw = config.to_dict() if hasattr(config, "to_dict") else config
    if not isinstance(raw, Mapping) or not all(isinstance(key, str) for key in raw):
        raise AdapterFormatError(f"config= must be an adapter config: a dict of field names, or a PEFT "
                                 f"config object (to_dict()), got {type(config).__name__}")
    return {key: getattr(value, "value", value) for key, value in raw.items()}


def parse_adapter(
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    source: str | None = None,
    allow_nonfinite: bool = False,
    check_finite: bool = True,
) -> ParsedAdapter:
    """Validate a PEFT LoRA config and state dict completely and group the factors by module.

    Args:
        config: the contents of ``adapter_config.json``.
        state_dict: PEFT-style keys (``base_model.model.<module>.lora_A.weight``; the prefix is
            optional) to tensors.
        source: where it came from, quoted in error messages.
        allow_nonfinite: accept NaN/Inf values in the weights.
        check_finite: look for NaN/Inf here; False when the caller checks the staged rows in
            one pass instead (:meth:`~hotswap_rt.staging.Stager.stage`), naming the key through
            :func:`nonfinite_key` if it finds one.

    Raises:
        AdapterFormatError: anything PEFT would not load, or a feature we cannot represent.
    """
    where = source or "state_dict"
    if config.get("peft_type") == "IA3":
        return _parse_ia3(config, state_dict, where, allow_nonfinite or not check_finite)
    rank, alpha, use_rslora = _parse_hyperparameters(config, where)
    use_dora, lora_bias = _flag(config, "use_dora", where), _flag(config, "lora_bias", where)
    if use_dora and lora_bias:
        raise AdapterFormatError(f"{where}: DoRA together with lora_bias is not supported")
    state_dict, saved_modules, modules_to_save = _split_saved_modules(
        config, state_dict, where, allow_nonfinite or not check_finite)
    rank_pattern = _parse_pattern(config, "rank_pattern", where, integer=True)
    alpha_pattern = _parse_pattern(config, "alpha_pattern", where, integer=False)

    _reject_unsupported_keys([str(key) for key in state_dict], where)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, str] = {}
    saved_base: dict[str, torch.Tensor] = {}
    vectors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        module, which = _split_key(str(key), where)
        if which == "base":
            saved_base[module] = _check_tensor(key, tensor, where, True, dims=(2,))
            continue
        if which in ("magnitude", "bias", "ia3"):
            if which == "ia3":
                raise AdapterFormatError(f"{where}: key {key!r} is an IA3 vector but peft_type is "
                                         f"{config.get('peft_type', 'LORA')!r}")
            vectors.setdefault(module, {})[which] = _check_tensor(  # a Conv2d's magnitude: 4-D
                key, tensor, where, allow_nonfinite or not check_finite,
                dims=(1, 4) if which == "magnitude" else (1,))
            continue
        kind = EMBEDDING if which.startswith("embedding") else LINEAR
        which = which[-1]
        if kinds.setdefault(module, kind) != kind:
            raise AdapterFormatError(f"{where}: module {module!r} has both lora_A/B.weight and "
                                     f"lora_embedding_A/B keys")
        pairs.setdefault(module, {})
        if which in pairs[module]:
            raise AdapterFormatError(f"{where}: duplicate lora_{which} for module {module!r}")
        dims = (2,) if kind == EMBEDDING else (2, 4)
        pairs[module][which] = _check_tensor(key, tensor, where, allow_nonfinite or not check_finite,
                                             dims=dims)
    if not pairs:
        raise AdapterFormatError(f"{where}: no LoRA weights (no '*.lora_A.weight' keys)")
    stray = sorted(set(saved_base) - {m for m, kind in kinds.items() if kind == EMBEDDING})
    if stray:
        raise AdapterFormatError(f"{where}: base weights saved for {stray[:3]}, which have no "
                                 f"embedding LoRA (only save_embedding_layers is understood)")

    target_parameters = _names_list(config, "target_parameters", where)
    params = _parameter_targets(target_parameters, list(pairs), where)  # key module -> "<module>.<param>"
    pairs = {params.get(name, name): pair for name, pair in pairs.items()}
    kinds = {params.get(name, name): kind for name, kind in kinds.items()}
    vectors = {params.get(name, name): held for name, held in vectors.items()}
    _check_target_modules(config.get("target_modules"), sorted(set(pairs) - set(params.values())), where)
    _check_lora_vectors(vectors, pairs, kinds, use_dora, lora_bias, where)
    modules: dict[str, LoraModule] = {}
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            missing = "B" if "A" in pair else "A"
            suffix = f"lora_embedding_{missing}" if kinds[name] == EMBEDDING else f"lora_{missing}.weight"
            raise AdapterFormatError(f"{where}: module {name!r} has no {suffix}")
        module_rank = pair["A"].shape[0]
        declared = rank_pattern.get(_pattern_key(rank_pattern, name), rank)
        module_alpha = alpha_pattern.get(_pattern_key(alpha_pattern, name), alpha)
        if name in params.values():
            if vectors.get(name):
                raise AdapterFormatError(f"{where}: DoRA / lora_bias on the expert parameter {name!r} is not "
                                         f"supported")
            modules[name] = _experts_module(name, pair["A"], pair["B"], declared, where, alpha=module_alpha,
                                            scaling=lora_scaling(declared, module_alpha, use_rslora))
            continue
        if declared != module_rank:
            raise AdapterFormatError(
                f"{where}: module {name!r} has rank {module_rank} in its weights but the config "
                f"declares r={declared}"
            )
        module = _matrix_module(
            name, pair["A"], pair["B"], kinds[name], where,
            alpha=module_alpha, scaling=lora_scaling(module_rank, module_alpha, use_rslora),
        )
        modules[name] = _with_lora_vectors(module, vectors.get(name, {}), name, where)
    return ParsedAdapter(
        rank=rank,
        alpha=alpha,
        use_rslora=use_rslora,
        modules=modules,
        saved_base_weights=saved_base,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        base_model_name_or_path=config.get("base_model_name_or_path"),
        task_type=config.get("task_type"),
        source=source,
        use_dora=use_dora,
        lora_bias=lora_bias,
        saved_modules=saved_modules,
        modules_to_save=modules_to_save,
        target_parameters=target_parameters,
    )


def _flag(config: Mapping[str, Any], key: str, where: str) -> bool:
    value = config.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise AdapterFormatError(f"{where}: '{key}' must be a bool, got {value!r}")
    return value


def _check_lora_vectors(vectors: Mapping[str, Mapping[str, torch.Tensor]], pairs: Mapping[str, Any],
                        kinds: Mapping[str, str], use_dora: bool, lora_bias: bool, where: str) -> None:
    """DoRA magnitudes / LoRA biases exactly for the LoRA modules, as the config's flags say
    (LoRA biases not on embeddings: PEFT has none there)."""
    stray = sorted(set(vectors) - set(pairs))
    if stray:
        raise AdapterFormatError(f"{where}: DoRA magnitude or lora_B.bias keys for {stray[:3]}, "
                                 f"which have no lora_A/lora_B")
    for which, flag, feature, key in (("magnitude", use_dora, "use_dora", "lora_magnitude_vector"),
                                      ("bias", lora_bias, "lora_bias", "lora_B.bias")):
        having = sorted(name for name, held in vectors.items() if which in held)
        if having and not flag:
            raise AdapterFormatError(f"{where}: key '{having[0]}.{key}' but the config does not set "
                                     f"{feature}=true")
        if flag:
            lacking = sorted(set(pairs) - set(having))
            if lacking:
                raise AdapterFormatError(f"{where}: {feature}=true but module {lacking[0]!r} has no {key}")
            embeddings = sorted(name for name in pairs if kinds[name] == EMBEDDING)
            if embeddings and which == "bias":  # PEFT cannot create one either
                raise AdapterFormatError(f"{where}: lora_bias on the embedding {embeddings[0]!r} is not "
                                         f"supported (PEFT has no lora_bias for embeddings)")


def _with_lora_vectors(module: LoraModule, held: Mapping[str, torch.Tensor], name: str,
                       where: str) -> LoraModule:
    """``module`` with its DoRA magnitude / LoRA bias (``[d_out]``; a Conv2d's magnitude is
    ``[1, C_out, 1, 1]`` on disk, held flat)."""
    if not held:
        return module
    if module.kind == CONV and module.groups > 1:
        raise AdapterFormatError(f"{where}: DoRA / lora_bias on the grouped Conv2d {name!r} is not "
                                 f"supported (linear and ungrouped Conv2d layers only)")
    d_out = module.lora_B.shape[0]
    flat = {}
    for which, vector in held.items():
        expected = (1, d_out, 1, 1) if module.kind == CONV and which == "magnitude" else (d_out,)
        if tuple(vector.shape) != expected:
            raise AdapterFormatError(f"{where}: module {name!r}: its {which} vector has shape "
                                     f"{tuple(vector.shape)}; lora_B's {d_out} output features "
                                     f"make it {expected}")
        flat[which] = vector.flatten()
    return dataclasses.replace(module, magnitude=flat.get("magnitude"), bias=flat.get("bias"))


def _parse_ia3(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], where: str,
               allow_nonfinite: bool) -> ParsedAdapter:
    """An IA3 adapter: ``<module>.ia3_l`` vectors, ``[d_out, 1]`` (output scale) or, for the
    ``feedforward_modules``, ``[1, d_in]`` (input scale); on a Conv2d ``[1, C, 1, 1]`` (C_out,
    or for feed-forward modules C_in), held flat with ``kind="conv"``."""
    _reject_unsupported_fields(config, where)
    feedforward = config.get("feedforward_modules") or []
    if not isinstance(feedforward, (str, list, tuple, set, frozenset)) or (
            not isinstance(feedforward, str) and not all(isinstance(f, str) for f in feedforward)):
        raise AdapterFormatError(f"{where}: 'feedforward_modules' must be a list of names or a regex, "
                                 f"got {feedforward!r}")
    patterns = feedforward if isinstance(feedforward, str) else list(feedforward)
    state_dict, saved_modules, modules_to_save = _split_saved_modules(config, state_dict, where,
                                                                      allow_nonfinite)
    modules: dict[str, LoraModule] = {}
    for key, tensor in state_dict.items():
        module, which = _split_key(str(key), where)
        if which != "ia3":
            raise AdapterFormatError(f"{where}: key {key!r}: an IA3 adapter holds only '<module>.ia3_l' "
                                     f"vectors")
        if module in modules:
            raise AdapterFormatError(f"{where}: duplicate ia3_l for module {module!r}")
        vector = _check_tensor(key, tensor, where, allow_nonfinite, dims=(2, 4))
        try:
            is_feedforward = bool(patterns) and name_matches(patterns, module)
        except re.error as exc:
            raise AdapterFormatError(f"{where}: feedforward_modules regex {patterns!r}: {exc}") from exc
        conv = vector.dim() == 4
        if conv:
            misfit, expected = vector.shape[0] * vector.shape[2] * vector.shape[3] != 1, "[1, C, 1, 1]"
        else:
            misfit = vector.shape[1 - int(is_feedforward)] != 1
            expected = "[1, d_in]" if is_feedforward else "[d_out, 1]"
        if misfit:
            raise AdapterFormatError(
                f"{where}: key {key!r} has shape {tuple(vector.shape)}; IA3 on a "
                f"{'feed-forward' if is_feedforward else 'non-feed-forward'} "
                f"{'Conv2d' if conv else 'module'} is {expected}")
        empty = torch.zeros(0, 0, dtype=vector.dtype)
        modules[module] = LoraModule(empty, empty, 0, 0.0, 0.0, ia3=vector.flatten(),
                                     ia3_feedforward=is_feedforward, kind=CONV if conv else LINEAR)
    if not modules:
        raise AdapterFormatError(f"{where}: no IA3 weights (no '*.ia3_l' keys)")
    _check_target_modules(config.get("target_modules"), sorted(modules), where)
    return ParsedAdapter(rank=0, alpha=0.0, use_rslora=False, modules=dict(sorted(modules.items())),
                         base_model_name_or_path=config.get("base_model_name_or_path"),
                         task_type=config.get("task_type"), source=where, peft_type="IA3",
                         saved_modules=saved_modules, modules_to_save=modules_to_save)


_MODULE_PARAM_KEY = re.compile(r"^(?P<module>.+)\.(?P<param>weight|bias)$")


def _split_saved_modules(
    config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], where: str, allow_nonfinite: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], tuple[str, ...]]:
    """Take the ``modules_to_save`` modules' parameters (``<module>.weight`` / ``.bias``, the
    module matching a config name by PEFT's suffix rule, or inside one that does: PEFT saves a
    saved head made of layers, RoBERTa's ``classifier``, as ``classifier.dense.weight``, ...)
    out of ``state_dict``, by the layer that holds them.

    Returns:
        The other keys, module -> ``{"weight", "bias"}`` tensors, the config's names.
    """
    names = config.get("modules_to_save") or []
    if isinstance(names, str) or not isinstance(names, (list, tuple, set, frozenset)) or not all(
            isinstance(n, str) and n for n in names):
        raise AdapterFormatError(f"{where}: 'modules_to_save' must be a list of module names, got {names!r}")
    if not names:
        return dict(state_dict), {}, ()
    names = sorted(names)
    rest: dict[str, torch.Tensor] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        body = _key_body(str(key))
        match = _MODULE_PARAM_KEY.match(body)
        module = match.group("module") if match else ""
        if not match or ".lora_" in body or ".base_layer." in body or not _in_saved_module(names, module):
            rest[key] = tensor
            continue
        param = match.group("param")
        if param in saved.get(module, {}):
            raise AdapterFormatError(f"{where}: duplicate {param} for the saved module {module!r}")
        saved.setdefault(module, {})[param] = _check_tensor(key, tensor, where, allow_nonfinite,
                                                            dims=(2,) if param == "weight" else (1,))
    if not saved:
        raise AdapterFormatError(f"{where}: modules_to_save={names} but the weights hold none of them")
    for module, params in saved.items():
        if "weight" not in params:
            raise AdapterFormatError(f"{where}: the saved module {module!r} has a bias but no weight")
        weight, bias = params["weight"], params.get("bias")
        if bias is not None and bias.shape[0] != weight.shape[0]:
            raise AdapterFormatError(f"{where}: the saved module {module!r}: bias {tuple(bias.shape)} "
                                     f"does not fit weight {tuple(weight.shape)}")
    return rest, dict(sorted(saved.items())), tuple(names)


def _in_saved_module(names: list[str], module: str) -> bool:
    """Whether ``module`` or a module holding it matches ``names`` (PEFT's suffix rule)."""
    parts = module.split(".")
    return any(name_matches(names, ".".join(parts[:end])) for end in range(len(parts), 0, -1))


def _key_body(key: str) -> str:
    """``key`` without PEFT's ``base_model.model.`` prefix."""
    for prefix in _KEY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _names_list(config: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    """Config field ``key`` as a tuple of names (absent / null / empty: ``()``)."""
    names = config.get(key) or []
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(
            isinstance(n, str) and n for n in names):
        raise AdapterFormatError(f"{where}: '{key}' must be a list of names, got {names!r}")
    return tuple(names)


def _parameter_targets(target_parameters: tuple[str, ...], modules: list[str], where: str) -> dict[str, str]:
    """Which key modules hold LoRA on an expert parameter, and on which: ``{key module:
    "<module>.<param>"}``.

    PEFT wraps the targeted parameters of one module in the order the module defines them
    (``named_parameters``: ``gate_up_proj`` / ``up_proj`` before ``down_proj`` in transformers'
    experts), each wrapper around the last, so the first parameter's keys sit deepest:
    ``<module>.base_layer.lora_A.weight`` for the first of two, ``<module>.lora_A.weight`` for
    the second (``n - 1 - i`` times ``.base_layer`` for the ``i``-th of ``n``). Shapes are
    checked against the model's parameters when loading."""
    depths: dict[str, set[int]] = {}
    for name in modules:
        module, depth = name, 0
        while module.endswith(".base_layer"):
            module, depth = module[: -len(".base_layer")], depth + 1
        if target_parameters and any(_parameter_of(entry, module) for entry in target_parameters):
            depths.setdefault(module, set()).add(depth)
        elif depth:
            raise AdapterFormatError(f"{where}: keys under {name!r}.lora_A/B, but no target_parameters "
                                     f"entry names a parameter of {module!r}")
    targets: dict[str, str] = {}
    for module, seen in depths.items():
        params = _wrapped_parameters(target_parameters, module)
        if max(seen) >= len(params):
            raise AdapterFormatError(f"{where}: {module!r} has LoRA keys {max(seen) + 1} wrappers deep but "
                                     f"target_parameters names {len(params)} of its parameters {params}")
        for depth in seen:
            key = module + ".base_layer" * depth
            targets[key] = f"{module}.{params[len(params) - 1 - depth]}"
    return targets


def _wrapped_parameters(target_parameters: tuple[str, ...], module: str) -> list[str]:
    """The expert parameters of ``module`` the entries name, in the order PEFT wraps them."""
    named = {_parameter_of(entry, module) for entry in target_parameters}
    return [param for param in EXPERT_PARAMS if param in named]


def _parameter_of(entry: str, module: str) -> str | None:
    """The parameter a ``target_parameters`` entry (``"mlp.experts.down_proj"``) names on
    ``module`` (PEFT's suffix rule on ``<module>.<param>``), or None."""
    owner, _, param = entry.rpartition(".")
    if param and (not owner or module == owner or module.endswith("." + owner)):
        return param
    return None


def _experts_module(name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, rank: int, where: str,
                    alpha: float, scaling: float) -> LoraModule:
    """PEFT's LoRA on an expert parameter, A ``[r*E, in]`` (expert-major rows) and B
    ``[out, r*E]`` (column ``j*E + e``: rank ``j`` of expert ``e``), as slot matrices: A
    ``[r, E*in]`` and B ``[E*out, r]`` (rank ``j`` holds every expert's A row and B column)."""
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != lora_B.shape[1] or lora_A.shape[0] % rank:
        raise AdapterFormatError(
            f"{where}: expert parameter {name!r}: lora_A {tuple(lora_A.shape)} / lora_B {tuple(lora_B.shape)} "
            f"are not PEFT's [r*E, in] / [out, r*E] with r={rank}")
    experts = lora_A.shape[0] // rank
    d_in, d_out = lora_A.shape[1], lora_B.shape[0]
    slot_a = lora_A.reshape(experts, rank, d_in).permute(1, 0, 2).reshape(rank, experts * d_in)
    slot_b = lora_B.reshape(d_out, rank, experts).permute(2, 0, 1).reshape(experts * d_out, rank)
    return LoraModule(slot_a, slot_b, rank, alpha, scaling, kind=EXPERTS, kernel=(experts,))


def _matrix_module(name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, kind: str, where: str,
                   alpha: float, scaling: float) -> LoraModule:
    """The on-disk factors of one module as a :class:`LoraModule` (see there for the forms)."""
    rank = lora_A.shape[0]
    if lora_A.dim() != lora_B.dim():
        raise AdapterFormatError(f"{where}: module {name!r}: lora_A is {tuple(lora_A.shape)} but "
                                 f"lora_B is {tuple(lora_B.shape)} (one 2-D, one 4-D)")
    if lora_A.dim() == 2:
        if lora_B.shape[1] != rank:
            raise AdapterFormatError(
                f"{where}: module {name!r}: lora_A is {tuple(lora_A.shape)} (rank {rank}) "
                f"but lora_B is {tuple(lora_B.shape)} (rank {lora_B.shape[1]})"
            )
        return LoraModule(lora_A, lora_B, rank, alpha, scaling, kind=kind)
    # Conv2d: A [r, C_in, kh, kw], B [C_out, r / groups, 1, 1]
    per_group = lora_B.shape[1]
    if tuple(lora_B.shape[2:]) != (1, 1) or rank % per_group != 0:
        raise AdapterFormatError(
            f"{where}: module {name!r}: conv lora_A is {tuple(lora_A.shape)} (rank {rank}) but "
            f"lora_B is {tuple(lora_B.shape)}; expected [C_out, rank / groups, 1, 1]"
        )
    groups = rank // per_group
    d_out = lora_B.shape[0]
    if d_out % groups != 0:
        raise AdapterFormatError(f"{where}: module {name!r}: lora_B has {d_out} output channels, "
                                 f"not divisible by its groups={groups}")
    full_b = torch.zeros(d_out, rank, dtype=lora_B.dtype)
    out_per_group = d_out // groups
    for group in range(groups):
        rows = slice(group * out_per_group, (group + 1) * out_per_group)
        cols = slice(group * per_group, (group + 1) * per_group)
        full_b[rows, cols] = lora_B[rows, :, 0, 0]
    return LoraModule(lora_A.flatten(1), full_b, rank, alpha, scaling, kind=CONV,
                      kernel=tuple(lora_A.shape[1:]), groups=groups)


def disk_factors(module: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """``module``'s factors in PEFT's on-disk shapes (the inverse of the conversion on read;
    a conv's B keeps only its block diagonal)."""
    if module.kind == EXPERTS:
        experts, rank = module.kernel[0], module.rank
        lora_A = module.lora_A.reshape(rank, experts, -1).permute(1, 0, 2).reshape(experts * rank, -1)
        lora_B = module.lora_B.reshape(experts, -1, rank).permute(1, 2, 0).reshape(-1, rank * experts)
        return lora_A, lora_B
    if module.kind != CONV:
        return module.lora_A, module.lora_B
    lora_A = module.lora_A.reshape(module.rank, *module.kernel)
    d_out, per_group = module.lora_B.shape[0], module.rank // module.groups
    out_per_group = d_out // module.groups
    blocks = [
        module.lora_B[g * out_per_group : (g + 1) * out_per_group, g * per_group : (g + 1) * per_group]
        for g in range(module.groups)
    ]
    return lora_A, torch.cat(blocks, dim=0)[:, :, None, None]


def _check_target_modules(target_modules: Any, modules: list[str], where: str) -> None:
    """The weights must be for modules ``target_modules`` covers (PEFT saves nothing else)."""
    if target_modules is None or (
        isinstance(target_modules, str) and target_modules.lower() == "all-linear"
    ):
        return
    if isinstance(target_modules, str):
        patterns: str | list[str] = target_modules
    elif isinstance(target_modules, (list, tuple, set, frozenset)) and all(
        isinstance(t, str) for t in target_modules
    ):
        patterns = list(target_modules)  # a LoraConfig's to_dict() gives a set
    else:
        raise AdapterFormatError(
            f"{where}: 'target_modules' must be a list of names or a regex, got {target_modules!r}"
        )
    try:
        uncovered = [m for m in modules if not name_matches(patterns, m)]
    except re.error as exc:
        raise AdapterFormatError(f"{where}: target_modules regex {patterns!r}: {exc}") from exc
    if uncovered:
        raise AdapterFormatError(
            f"{where}: weights for {uncovered[:3]} but target_modules={target_modules!r} names "
            f"no such layer"
        )


def _reject_unsupported_fields(config: Mapping[str, Any], where: str) -> None:
    """Refuse a config that sets a PEFT feature a slot cannot represent (:data:`_UNSUPPORTED_FIELDS`)."""
    for key, feature in _UNSUPPORTED_FIELDS.items():
        if config.get(key):
            raise AdapterFormatError(f"{where}: {feature} is not supported ({key}={config[key]!r})")


def _parse_hyperparameters(config: Mapping[str, Any], where: str) -> tuple[int, float, bool]:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterFormatError(f"{where}: peft_type {peft_type!r} is not supported (only 'LORA' "
                                 f"and 'IA3')")
    _reject_unsupported_fields(config, where)
    if config.get("bias", "none") not in ("none", None):
        raise AdapterFormatError(f"{where}: bias={config['bias']!r} is not supported (only 'none')")
    if "r" not in config:
        raise AdapterFormatError(f"{where}: adapter_config has no 'r'")
    rank = config["r"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise AdapterFormatError(f"{where}: 'r' must be a positive integer, got {rank!r}")
    alpha = config.get("lora_alpha", 8)
    if not _is_positive_number(alpha):
        raise AdapterFormatError(f"{where}: 'lora_alpha' must be a positive number, got {alpha!r}")
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise AdapterFormatError(f"{where}: 'use_rslora' must be a bool, got {use_rslora!r}")
    return rank, float(alpha), use_rslora


def _parse_pattern(config: Mapping[str, Any], key: str, where: str, integer: bool) -> dict:
    pattern = config.get(key) or {}
    if not isinstance(pattern, dict):
        raise AdapterFormatError(f"{where}: '{key}' must be an object, got {pattern!r}")
    for name, value in pattern.items():
        ok = (
            isinstance(value, int) and not isinstance(value, bool) and value > 0
            if integer
            else _is_positive_number(value)
        )
        if not ok:
            raise AdapterFormatError(f"{where}: {key}[{name!r}] = {value!r} is not positive")
        problem = regex_problem(name)
        if problem is not None:
            raise AdapterFormatError(f"{where}: {key} key {name!r} is not a valid regex ({problem})")
    return {name: (int(v) if integer else float(v)) for name, v in pattern.items()}


def _is_positive_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _pattern_key(pattern: Mapping[str, Any], module_name: str) -> str:
    """PEFT's ``get_pattern_key``: the first pattern key matching the end of the module name."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return module_name


_UNSUPPORTED_KEYS = (
    (re.compile(r"\.lora_A\.bias$"), "a bias on lora_A is not supported (PEFT's lora_bias is on lora_B)"),
    (re.compile(r"modules_to_save"), "modules_to_save weights are not supported"),
)


def _reject_unsupported_keys(keys: list[str], where: str) -> None:
    """Name a recognised unsupported feature before complaining about any unknown key."""
    for pattern, reason in _UNSUPPORTED_KEYS:
        for key in keys:
            if pattern.search(key):
                raise AdapterFormatError(f"{where}: key {key!r}: {reason}")


def _split_key(key: str, where: str) -> tuple[str, str]:
    """``base_model.model.a.b.lora_A.weight`` -> (``a.b``, ``"A"``); ``...lora_embedding_B`` ->
    (module, ``"embedding_B"``); ``...<embedding>.base_layer.weight`` -> (module, ``"base"``);
    ``...lora_magnitude_vector`` / ``...lora_B.bias`` / ``...ia3_l`` -> (module,
    ``"magnitude"`` / ``"bias"`` / ``"ia3"``); else a clear error."""
    key_body = _key_body(key)
    for pattern, prefix in ((_LORA_KEY, ""), (_EMBEDDING_KEY, "embedding_")):
        match = pattern.match(key_body)
        if match:
            return match.group("module"), prefix + match.group("which")
    match = _SAVED_BASE_KEY.match(key_body)
    if match:
        return match.group("module"), "base"
    for pattern, which in _VECTOR_KEYS:
        match = pattern.match(key_body)
        if match:
            return match.group("module"), which
    raise AdapterFormatError(
        f"{where}: key {key!r}: not a LoRA weight key ('<module>.lora_A.weight' / "
        f"'<module>.lora_B.weight' / '<module>.lora_embedding_A')"
    )


def _check_tensor(
    key: str, tensor: Any, where: str, allow_nonfinite: bool, dims: tuple[int, ...] = (2,)
) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise AdapterFormatError(f"{where}: key {key!r} is a {type(tensor).__name__}, not a tensor")
    if tensor.is_meta or tensor.layout is not torch.strided:
        what = "a meta tensor (no values)" if tensor.is_meta else f"a {tensor.layout} tensor"
        raise AdapterFormatError(f"{where}: key {key!r} is {what}; adapter weights must be dense tensors "
                                 f"with values")
    if not tensor.dtype.is_floating_point:
        raise AdapterFormatError(
            f"{where}: key {key!r} has dtype {tensor.dtype}; LoRA weights must be floating point"
        )
    if tensor.dim() not in dims or 0 in tensor.shape:
        expected = " or ".join(f"{d}-D" for d in dims)
        raise AdapterFormatError(
            f"{where}: key {key!r} has shape {tuple(tensor.shape)}; expected a non-empty {expected} tensor"
        )
    if not allow_nonfinite and not _all_finite(tensor):
        raise nonfinite_error(where, key)
    return tensor


def nonfinite_error(where: str, key: str) -> AdapterFormatError:
    """The error for NaN/Inf values under ``key`` (raised by the parser, or by staging when it
    checked the staged rows instead)."""
    return AdapterFormatError(
        f"{where}: key {key!r} contains NaN or Inf values (pass allow_nonfinite=True to load)")


def nonfinite_key(adapter: ParsedAdapter) -> str | None:
    """The PEFT key of the first factor of ``adapter`` holding NaN or Inf, if any."""
    for name, module in adapter.modules.items():
        for which, tensor in (("A", module.lora_A), ("B", module.lora_B)):
            if not all_finite(tensor):
                key = f"lora_embedding_{which}" if module.kind == EMBEDDING else f"lora_{which}.weight"
                return f"base_model.model.{name}.{key}"
        for key, vector in module.vectors().items():
            if not all_finite(vector):
                return f"base_model.model.{name}.{key}"
    for name, params in adapter.saved_modules.items():
        for param, tensor in params.items():
            if not all_finite(tensor):
                return f"base_model.model.{name}.{param}"
    return None


def with_tensors_copied(adapter: ParsedAdapter) -> ParsedAdapter:
    """``adapter`` with every tensor it holds copied into memory of its own (e.g. out of a
    file's memory map, which may then be dropped)."""

    def own(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.clone()

    modules = {name: dataclasses.replace(module, lora_A=own(module.lora_A), lora_B=own(module.lora_B),
                                         magnitude=own(module.magnitude), bias=own(module.bias),
                                         ia3=own(module.ia3))
               for name, module in adapter.modules.items()}
    return dataclasses.replace(
        adapter, modules=modules,
        saved_base_weights={name: own(weight) for name, weight in adapter.saved_base_weights.items()},
        saved_modules={name: {key: own(value) for key, value in params.items()}
                       for name, params in adapter.saved_modules.items()})


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no value of ``tensor`` is NaN or +-Inf (one reduction pass)."""
    return tensor.numel() == 0 or _all_finite(tensor)


def _all_finite(tensor: torch.Tensor) -> bool:
    """True when no value is NaN or +-Inf. One reduction pass: a NaN or an Inf makes the sum NaN
    or Inf; a finite sum settles it (a third faster than ``aminmax``, ~8x faster than
    ``isfinite(t).all()``, which materializes a bool tensor). Only a sum that overflows (finite
    values past the dtype's range, e.g. fp16's 65504) takes a second pass: min and max propagate
    NaN, and an Inf is an extreme."""
    if math.isfinite(tensor.sum().item()):
        return True
    low, high = tensor.aminmax()
    return math.isfinite(low.item()) and math.isfinite(high.item())


# ----------------------------------------------------------------------------------------- writing
def adapter_config_dict(adapter: ParsedAdapter) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT expects for ``adapter`` (r is its true rank)."""
    targets = sorted({name.rsplit(".", 1)[-1] for name, module in adapter.modules.items()
                      if module.kind != EXPERTS})
    if adapter.peft_type == "IA3":
        return {
            "peft_type": "IA3",
            "task_type": adapter.task_type,
            "base_model_name_or_path": adapter.base_model_name_or_path,
            "target_modules": targets,
            "feedforward_modules": sorted({name.rsplit(".", 1)[-1] for name, module
                                           in adapter.modules.items() if module.ia3_feedforward}),
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_ia3_weights": True,
            "modules_to_save": list(adapter.modules_to_save) or None,
        }
    return {
        "peft_type": "LORA",
        "task_type": adapter.task_type,
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "use_rslora": adapter.use_rslora,
        "target_modules": targets,
        "rank_pattern": dict(adapter.rank_pattern),
        "alpha_pattern": dict(adapter.alpha_pattern),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": adapter.use_dora,
        "lora_bias": adapter.lora_bias,
        "modules_to_save": list(adapter.modules_to_save) or None,
        "target_parameters": list(adapter.target_parameters) or None,
    }


def adapter_state_dict(adapter: ParsedAdapter) -> dict[str, torch.Tensor]:
    """PEFT key names to unpadded, unscaled, contiguous CPU tensors."""
    state: dict[str, torch.Tensor] = {}
    key_modules = _expert_key_modules(adapter)
    conv_shape = (1, -1, 1, 1)  # a Conv2d's ia3_l and DoRA magnitude on disk
    for name, module in adapter.modules.items():
        name = key_modules.get(name, name)
        if module.ia3 is not None:
            shape = conv_shape if module.kind == CONV else (1, -1) if module.ia3_feedforward else (-1, 1)
            state[f"base_model.model.{name}.ia3_l"] = module.ia3.detach().cpu().reshape(shape).contiguous()
            continue
        for key, vector in module.vectors().items():
            if module.kind == CONV and key == "lora_magnitude_vector":
                vector = vector.reshape(conv_shape)
            state[f"base_model.model.{name}.{key}"] = vector.detach().cpu().contiguous()
        lora_A, lora_B = disk_factors(module)
        keys = ("lora_embedding_A", "lora_embedding_B") if module.kind == EMBEDDING else (
            "lora_A.weight", "lora_B.weight")
        state[f"base_model.model.{name}.{keys[0]}"] = lora_A.detach().cpu().contiguous()
        state[f"base_model.model.{name}.{keys[1]}"] = lora_B.detach().cpu().contiguous()
    for name, params in adapter.saved_modules.items():
        for param, tensor in params.items():
            state[f"base_model.model.{name}.{param}"] = tensor.detach().cpu().contiguous()
    return state


def _expert_key_modules(adapter: ParsedAdapter) -> dict[str, str]:
    """``"<module>.<param>"`` -> the module name PEFT's keys use for it (the inverse of
    :func:`_parameter_targets`: ``.base_layer`` once per later-wrapped parameter)."""
    by_module: dict[str, list[str]] = {}
    for name, module in adapter.modules.items():
        if module.kind == EXPERTS:
            owner, _, param = name.rpartition(".")
            by_module.setdefault(owner, []).append(param)
    keys: dict[str, str] = {}
    for owner, held in by_module.items():
        order = _wrapped_parameters(adapter.target_parameters, owner)  # as PEFT wraps them, first innermost
        for param in held:
            keys[f"{owner}.{param}"] = owner + ".base_layer" * (len(order) - 1 - order.index(param))
    return keys


# what an adapter directory holds (PEFT's and transformers' save_pretrained): save(overwrite=True)
# replaces a directory holding only these, never anything else
REPLACEABLE_FILES = frozenset({CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME, "README.md", "generation_config.json"})


def write_adapter_dir(
    adapter: ParsedAdapter, directory: str | os.PathLike[str], overwrite: bool = False
) -> Path:
    """Write ``adapter`` in PEFT's format, atomically: into a temp dir, then renamed into place.
    ``overwrite`` replaces an existing adapter directory whole: one that holds only an adapter's
    files (:data:`REPLACEABLE_FILES`), never any other directory or file.

    Raises:
        AdapterFormatError: ``directory`` exists and is not empty, and ``overwrite`` is False;
            or it holds anything but an adapter's files (or is a file).
    """
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        if not overwrite:
            raise AdapterFormatError(f"{target}: exists and is not empty (pass overwrite=True)")
        others = ["(a file)"] if not target.is_dir() else sorted(
            entry.name for entry in target.iterdir()
            if entry.name not in REPLACEABLE_FILES or entry.is_symlink() or not entry.is_file())
        if others:
            raise AdapterFormatError(
                f"{target}: overwrite=True replaces an adapter directory whole, and this one holds "
                f"more than an adapter's files ({others[:5]}); nothing was written (remove it yourself, "
                f"or save(..., into_existing=True) to replace only the adapter's two files)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _write_files(adapter, staging)
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def write_adapter_files(adapter: ParsedAdapter, directory: str | os.PathLike[str]) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``
    (created if needed), replacing those two files each atomically and leaving any other file
    there alone, as transformers' ``save_pretrained`` does."""
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise AdapterFormatError(f"{target}: exists and is not a directory")
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".adapter.", dir=target))
    try:
        _write_files(adapter, staging)
        for name in (CONFIG_NAME, SAFETENSORS_NAME):
            os.replace(staging / name, target / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_files(adapter: ParsedAdapter, directory: Path) -> None:
    from safetensors.torch import save_file

    (directory / CONFIG_NAME).write_text(
        json.dumps(adapter_config_dict(adapter), indent=2, sort_keys=True), encoding="utf-8"
    )
    save_file(adapter_state_dict(adapter), str(directory / SAFETENSORS_NAME), {"format": "pt"})


def task_type_for(model: Any) -> str | None:
    """PEFT's ``task_type`` for a transformers model class, where the name says it."""
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None
