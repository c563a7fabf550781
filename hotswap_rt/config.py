"""Frozen configuration and report dataclasses: :class:`RuntimeConfig` and :class:`AdapterInfo`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Sequence

from .errors import HotswapError

if TYPE_CHECKING:
    import torch

Tier = Literal["device", "host", "disk"]


@dataclass(frozen=True)
class RuntimeConfig:
    """How a :class:`~hotswap_rt.HotswapRuntime` injects and sizes its slots.

    Args:
        target_modules: which layers get a LoRA slot, by PEFT's rules: a list of names (a module
            matches if its full name equals an entry or ends with ``"." + entry``), a regex string
            (``re.fullmatch`` on the full name), or ``"all-linear"`` (every linear layer except the
            output head); or None for *lazy injection*: before compiling, the injected layers
            are the union of what the loaded adapters target (layers are added as adapters
            arrive); once compiled, an adapter needing another layer is refused.
        max_rank: every slot is allocated at this rank; smaller adapters are zero-padded.
        device_slots: adapters resident in the model's device memory at once.
        host_slots: adapters held validated and padded in host memory (must be >= device_slots).
        max_batch_size: the largest batch a forward may carry (rows of the selection tensors).
        max_active_adapters: how many adapters one forward can combine (a weighted sum, or the
            distinct adapters of an ``activate_rows`` batch). Each costs one rank-``max_rank``
            LoRA product per layer whether used or not; ``None`` means ``device_slots``.
        max_adapters_per_row: how many adapters one batch row (or a uniform activation) may
            combine in a per-row product. An int ``m`` smaller than ``max_active_adapters``:
            each row is computed with only its own adapters' factors (gathered per row, a
            batched matmul: cost ~ ``m`` instead of ``max_active_adapters``), and a selection
            that combines more in a row is refused (see ``per_row_overflow``); equal to
            ``max_active_adapters``: the stacked product only (every row times every active
            slot). ``None`` (default, "auto"): ``rt.compile`` compiles both the per-row graph
            with ``m = 1`` and the stacked one; a selection where no row combines adapters runs
            per row, one mixing adapters in a row (a weighted sum) runs stacked. Per-row is the
            faster at every shape measured with several slots (``benchmarks/test_mixed_decode.py``);
            the cost is twice the graphs at ``rt.compile``. Without ``rt.compile`` (eager, or
            your own ``torch.compile`` / :func:`~hotswap_rt.enable_hotswap`) ``None`` runs the
            stacked product only: one graph, so no selection can recompile it.
        per_row_overflow: what a selection with a row combining more than
            ``max_adapters_per_row`` adapters does when that is smaller than
            ``max_active_adapters``: ``"refuse"`` (a :class:`SelectionError`) or ``"stacked"``:
            that selection runs the stacked product (every row times the active slots, up to
            ``max_active_adapters``), the others stay per row. Both graphs are compiled at
            ``rt.compile`` (twice the warm-up); switching between them never recompiles.
            ``None`` (default): ``"stacked"`` with ``max_adapters_per_row=None``, else
            ``"refuse"``.
        exclude_modules: never injected, by ``target_modules``' rules (a list of names or
            suffixes, or one regex string over the whole name); excluding nothing is an error.
        batch_input: the forward argument whose dim 0 is the batch, checked against the rows
            the selection was written for; ``None`` finds it: ``input_ids``, else
            ``inputs_embeds``, else the forward's first parameter (``sample`` of a diffusers
            UNet). Every injected layer must see the batch in dim 0 of its input, as
            transformers and diffusers layers do (per-row selection indexes dim 0).
        slot_reads: how the stacked (not per-row) LoRA product reads the slots: ``"gather"``
            copies the ``max_active_adapters`` selected slots' factors out of the arena each
            forward; ``"in_place"`` multiplies by all ``device_slots`` as they lie in the arena
            (no copy; unselected slots get weight 0); ``"auto"``: in place when
            ``max_active_adapters == device_slots`` (same product size, no copy). Fixed for the
            runtime's life. In place, every device slot is read by every forward, so a
            non-finite adapter (``allow_nonfinite``) poisons all outputs once resident.
        per_row_decode: how the per-row product (see ``max_adapters_per_row``) runs a step of
            one token per row: ``"bmm"`` gathers each row's slots' factors out of the arena and
            multiplies with two batched matmuls (as for longer inputs); ``"reduce"`` reads them
            where they lie, as a broadcast product summed over ``d_in`` then over the ranks:
            compiled, the slot gather becomes the kernels' own loads (no gathered copy, no
            matmul library call: two fused kernels a layer on a GPU, where the batched matmuls
            of a decode step cost far more than their bytes). ``"auto"`` (default): ``"reduce"``
            when the model is on a CUDA device (measured faster there by ``gpu_check``),
            ``"bmm"`` elsewhere (on CPU both cost the same); fixed for the runtime's life.
            Inputs of more than one token always use ``"bmm"``. Measure both on your device
            (``scripts/gpu_check.sh``'s ``decode_k`` reports ``per_row`` and
            ``per_row_reduce``); a graph compiled with a dynamic token dimension specializes on
            it with ``"reduce"``.
        rank_buckets: compute that follows the selected adapters' rank: e.g. ``(4, 16)`` with
            ``max_rank=64`` gives three graphs (ranks 4, 16, 64; ``max_rank`` is always the
            last bucket), all compiled at ``rt.compile``; each forward multiplies only the first
            ``b`` ranks of every slot, ``b`` the smallest bucket holding every selected
            adapter's rank. Switching buckets then runs another compiled graph (no recompile).
            ``None``: one graph at ``max_rank``.
        scale_vectors: reserve in every slot, for each injected layer, an input scale, an
            output scale and an output bias vector: what IA3, DoRA and ``lora_bias`` adapters
            need (``d_in + 2*d_out`` values per layer per slot, a Conv2d's ``C_in + 2*C_out``,
            an Embedding's ``2*dim``; every forward then
            applies them, ~ two elementwise passes). ``False``: added when the first such
            adapter is loaded before compiling; once compiled, such an adapter is refused.
        modules_to_save: ``nn.Linear`` and ``nn.Embedding`` modules (PEFT's names and
            matching rules, e.g. ``["score"]``, ``["lm_head"]``, ``["embed_tokens"]``) that
            adapters may train in full: every slot holds a whole weight (and bias) delta for
            each (``d_out * (d_in + 1)`` values; an embedding's ``num_embeddings * dim``),
            selected per row like the LoRA factors (an embedding's rows looked up in place).
            A module made of such layers (RoBERTa's ``classifier`` head: ``dense``,
            ``out_proj``) is held as its layers, as PEFT saves it; one with any other
            parameter (a norm) is refused. ``None``: none, or with lazy injection
            (``target_modules=None``) what the loaded adapters name, before compiling.
        target_parameters: expert parameters of fused MoE experts modules (PEFT's names and
            suffix rule, e.g. ``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``) that get
            per-expert LoRA slots (:mod:`hotswap_rt.experts`). ``None``: none, or with lazy
            injection what the loaded adapters target, before compiling.
        keep_factors: also keep each directory-loaded adapter's factors as read in the host
            ring, beside its staged rows (about twice the host memory per entry), so that
            ``save`` / ``adapter_state_dict`` write them without reading its files again.
            ``False`` (default): the ring holds the staged rows only (``AdapterInfo.bytes``),
            and those read its files again, as for the disk tier (``AdapterChangedError`` if
            they changed since the load). Adapters with no files (``state_dict=``,
            ``add_adapter``, trainable loads) always keep their factors.
        map_adapter_files: stage a loaded adapter (``load``, ``prefetch``, a disk-tier adapter
            read again) straight from a private memory map of its safetensors file, when its
            factors are not kept (``keep_factors=False``, not trainable): one pass over the
            data fewer than reading the file into memory first. A file truncated while its map
            is read would raise ``SIGBUS`` and end the process, so a file is mapped only under a
            read lease (Linux, :mod:`hotswap_rt.file_lease`): until it is staged (a few
            milliseconds per load), another open of the file for writing (PEFT's
            ``save_pretrained`` truncates it) or a truncate waits. Where no lease can be taken
            (other systems, a file another user owns or another process holds open for
            writing, file systems without leases) the file is read into memory, as with
            ``False``: files are read into memory (reused buffers) and staged from there.
            Either way, files rewritten in place while they are read are detected (their
            stamp, before and after) and the load refused; a load that injects layers or adds
            scale vectors first copies its factors out of the map before that change, so the
            check precedes it.
    """

    target_modules: Sequence[str] | str | None = ("q_proj", "k_proj", "v_proj", "o_proj")
    max_rank: int = 64
    device_slots: int = 4
    host_slots: int = 16
    max_batch_size: int = 64
    max_active_adapters: int | None = None
    exclude_modules: Sequence[str] | str = field(default_factory=tuple)
    max_adapters_per_row: int | None = None
    per_row_overflow: str | None = None
    batch_input: str | None = None
    slot_reads: str = "auto"
    per_row_decode: str = "auto"
    rank_buckets: Sequence[int] | None = None
    scale_vectors: bool = False
    modules_to_save: Sequence[str] | None = None
    target_parameters: Sequence[str] | None = None
    keep_factors: bool = False
    map_adapter_files: bool = True

    def __post_init__(self) -> None:
        if self.batch_input is not None and (not isinstance(self.batch_input, str) or not self.batch_input):
            raise HotswapError(f"RuntimeConfig.batch_input must be an argument name, got {self.batch_input!r}")
        if self.target_modules is not None:
            self._names_or_regex("target_modules", allow_empty=False)
        self._names_or_regex("exclude_modules", allow_empty=True)
        for name in ("keep_factors", "map_adapter_files"):
            if not isinstance(getattr(self, name), bool):
                raise HotswapError(f"RuntimeConfig.{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("max_rank", "device_slots", "host_slots", "max_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise HotswapError(f"RuntimeConfig.{name} must be a positive int, got {value!r}")
        if self.host_slots < self.device_slots:
            raise HotswapError(
                f"RuntimeConfig.host_slots ({self.host_slots}) must be >= device_slots "
                f"({self.device_slots}): every device-resident adapter keeps its host copy"
            )
        self._default_or_up_to("max_active_adapters", "device_slots")
        if self.max_adapters_per_row is not None:
            self._default_or_up_to("max_adapters_per_row", "max_active_adapters")
        if self.per_row_overflow not in (None, "refuse", "stacked"):
            raise HotswapError(f"RuntimeConfig.per_row_overflow must be 'refuse' or 'stacked', "
                               f"got {self.per_row_overflow!r}")
        if self.max_adapters_per_row is None and self.per_row_overflow == "refuse":
            raise HotswapError(
                "RuntimeConfig.per_row_overflow='refuse' needs an explicit max_adapters_per_row: "
                "with None (auto) rows that mix adapters run the stacked product")
        if (self.per_row_overflow == "stacked" and self.max_adapters_per_row is not None
                and self.max_adapters_per_row >= self.max_active_adapters):
            raise HotswapError(
                f"RuntimeConfig.per_row_overflow='stacked' needs max_adapters_per_row "
                f"({self.max_adapters_per_row}) < max_active_adapters ({self.max_active_adapters}): "
                f"otherwise no row can overflow")
        if self.rank_buckets is not None:
            buckets = tuple(self.rank_buckets)
            if not buckets or not all(isinstance(b, int) and not isinstance(b, bool)
                                      and 1 <= b <= self.max_rank for b in buckets):
                raise HotswapError(f"RuntimeConfig.rank_buckets must be ranks in 1..max_rank "
                                   f"({self.max_rank}), got {self.rank_buckets!r}")
            object.__setattr__(self, "rank_buckets", tuple(sorted({*buckets, self.max_rank})))
        for name in ("modules_to_save", "target_parameters"):
            self._names_or_none(name)
        if not isinstance(self.scale_vectors, bool):
            raise HotswapError(f"RuntimeConfig.scale_vectors must be a bool, got {self.scale_vectors!r}")
        if self.per_row_decode not in ("auto", "bmm", "reduce"):
            raise HotswapError(f"RuntimeConfig.per_row_decode must be 'auto', 'bmm' or 'reduce', "
                               f"got {self.per_row_decode!r}")
        if self.slot_reads not in ("auto", "gather", "in_place"):
            raise HotswapError(f"RuntimeConfig.slot_reads must be 'auto', 'gather' or 'in_place', "
                               f"got {self.slot_reads!r}")

    @property
    def per_row_auto(self) -> bool:
        """``max_adapters_per_row=None`` with several active adapters: ``rt.compile`` adds the
        per-row graph (one adapter per row) next to the stacked one."""
        return self.max_adapters_per_row is None and self.max_active_adapters > 1

    @property
    def adapters_per_row(self) -> int:
        """The per-row product's ``m``: ``max_adapters_per_row``, or 1 when auto (which equals
        ``max_active_adapters`` with a single active adapter: no per-row product)."""
        return 1 if self.max_adapters_per_row is None else self.max_adapters_per_row

    @property
    def mixes_overflow(self) -> str:
        """What a row combining more than :attr:`adapters_per_row` adapters does: ``"stacked"``
        or ``"refuse"`` (``per_row_overflow`` resolved)."""
        if self.per_row_overflow is not None:
            return self.per_row_overflow
        return "stacked" if self.max_adapters_per_row is None else "refuse"

    def reduces_per_row_decode(self, device: torch.device) -> bool:
        """Whether one-token per-row steps read the slots in place on ``device`` (see
        ``per_row_decode``; ``"auto"``: on CUDA devices only)."""
        if self.per_row_decode == "auto":
            return device.type == "cuda"
        return self.per_row_decode == "reduce"

    @property
    def reads_slots_in_place(self) -> bool:
        """Whether layers multiply by every device slot in place (see ``slot_reads``)."""
        if self.slot_reads == "auto":
            return self.max_active_adapters == self.device_slots
        return self.slot_reads == "in_place"

    def _names_or_regex(self, name: str, allow_empty: bool) -> None:
        """Field ``name`` checked by :func:`names_or_regex` and kept in its form."""
        object.__setattr__(self, name, names_or_regex(getattr(self, name), f"RuntimeConfig.{name}",
                                                      allow_empty))

    def _names_or_none(self, name: str) -> None:
        """Field ``name`` is None or a non-empty list of names (kept as a tuple)."""
        names = getattr(self, name)
        if names is None:
            return
        names = (names,) if isinstance(names, str) else tuple(names)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise HotswapError(f"RuntimeConfig.{name} must be a non-empty list of names, got "
                               f"{getattr(self, name)!r}")
        object.__setattr__(self, name, names)

    def _default_or_up_to(self, name: str, bound: str) -> None:
        """``name`` defaults to the field ``bound``; else it must be an int in 1..bound."""
        value, limit = getattr(self, name), getattr(self, bound)
        if value is None:
            object.__setattr__(self, name, limit)
        elif not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise HotswapError(
                f"RuntimeConfig.{name} must be an int in 1..{bound} ({limit}), got {value!r}")


@dataclass(frozen=True)
class AdapterInfo:
    """What the runtime knows about one loaded adapter.

    ``rank``/``alpha`` are the adapter's default ``r``/``lora_alpha``; per-module overrides are in
    ``rank_pattern``/``alpha_pattern`` (module name -> value, only where they differ).
    ``scaling`` is the default ``alpha / r`` (``alpha / sqrt(r)`` for rsLoRA).
    ``peft_type`` is ``"LORA"`` or ``"IA3"`` (rank, alpha and scaling 0: scaling vectors only);
    ``use_dora`` / ``lora_bias`` PEFT's LoRA flags; ``modules_to_save`` the modules it
    replaces in full (their weight deltas live in its slot row).
    ``bytes`` is the size of its padded slot row(s); ``version`` counts loads under this name;
    ``weights_id`` names the weights served under it now: a new number at each load,
    replacement, and start and end of training (``freeze``), never reused in the process.
    ``tier`` is "device", "host" (staged in the host ring) or "disk" (re-read on activation);
    ``slot`` the device slot it occupies (None unless ``tier == "device"``).
    """

    name: str
    rank: int
    alpha: float
    use_rslora: bool
    scaling: float
    targets: tuple[str, ...]
    tier: Tier
    bytes: int
    version: int
    source: str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    trainable: bool = False
    pinned: bool = False
    leases: int = 0
    slot: int | None = None
    peft_type: str = "LORA"
    use_dora: bool = False
    lora_bias: bool = False
    modules_to_save: tuple[str, ...] = ()
    weights_id: int = 0


def lora_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling factor: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def names_or_regex(value: object, what: str, allow_empty: bool = False) -> tuple[str, ...] | str:
    """``value`` as PEFT's module patterns take it: a regex string (full match; also
    ``"all-linear"``) or a list of names (exact or suffix match), returned as a tuple.

    Raises:
        HotswapError: neither (an int, an empty name, an invalid regex), naming ``what``.
    """
    if isinstance(value, str):
        if not value:
            raise HotswapError(f"{what} is an empty string")
        problem = regex_problem(value)
        if problem is not None:
            raise HotswapError(f"{what}={value!r} is not a valid regex ({problem})")
        return value
    names = tuple(value) if isinstance(value, (list, tuple, set, frozenset)) else None
    if names is None or (not names and not allow_empty) or not all(isinstance(n, str) and n for n in names):
        expected = "a list of names or a regex string" if allow_empty else (
            "a non-empty list of names, a regex string or 'all-linear'")
        raise HotswapError(f"{what} must be {expected}; got {value!r}")
    return names


def check_flags(method: str, **flags: object) -> None:
    """Raise :class:`HotswapError` unless every flag is a bool (``trainable="no"`` would
    otherwise be read as True)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise HotswapError(f"{method}: {name} must be True or False, got {value!r}")


def regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a valid regex (``re``'s message), or None."""
    try:
        re.compile(pattern)
    except re.error as exc:
        return str(exc)
    return None


def name_matches(patterns: Sequence[str] | str, name: str) -> bool:
    """PEFT's rule: regex fullmatch for a string, exact-or-suffix match for a list."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return name in patterns or any(name.endswith("." + p) for p in patterns)
