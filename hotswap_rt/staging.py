"""Staging: read an adapter, validate it against the injected layers, pad and scale it into host
rows that are exactly a device slot row; and the background loads (``rt.prefetch``) that do it
on a thread pool.

::

    directory / Hub id / state_dict --read--> ParsedAdapter --check--> --lay out, scale--> StagedAdapter
                                     (peft_format)          (layouts)            rows: dtype -> [r * W]

Nothing here touches device memory or runtime state: a staged adapter is a value the runtime then
hands to :class:`~hotswap_rt.residency.Residency`.
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from .arena import LayerLayout, SlotArena, factor_views, vector_views
from .config import AdapterInfo
from .errors import AdapterFormatError, HotswapError, IncompatibleAdapterError, RankTooLargeError
from .peft_format import (
    LoraModule, ParsedAdapter, all_finite, config_as_dict, nonfinite_error, nonfinite_key,
    read_adapter_dir, resolve_source,
)
from .host_memory import HostMemoryPool
from .parse_cache import ParseCache


@dataclass(frozen=True)
class StagedAdapter:
    """An adapter validated against the layout and laid out as one host row per dtype.

    Attributes:
        adapter: the parsed, unpadded, unscaled factors (for ``save``); None once the ring
            keeps only the rows (:meth:`without_factors`: its files are read again instead).
        rows: dtype -> ``[V + r * W]`` host tensor: the prefix of a slot row holding the scale
            vectors (if the arena has them) and the adapter's ``r`` ranks (``r``: its largest
            rank on that dtype's layers, 0 if it has none), so its size is the adapter's true
            size (see :mod:`hotswap_rt.arena`).
        sizes: dtype -> ``(V, W)`` the rows were laid out for.
    """

    adapter: ParsedAdapter | None
    rows: dict[torch.dtype, torch.Tensor]
    sizes: dict[torch.dtype, tuple[int, int]]

    def without_factors(self) -> StagedAdapter:
        """The same rows without the factors as read (whose memory, a file buffer, is then
        free for the next load)."""
        return StagedAdapter(adapter=None, rows=self.rows, sizes=self.sizes)

    @functools.cached_property
    def nbytes(self) -> int:
        return sum(row.numel() * row.element_size() for row in self.rows.values())

    def describe(self, name: str) -> AdapterInfo:
        """The static part of this adapter's :class:`AdapterInfo` under ``name`` (kept when it
        drops to the disk tier)."""
        adapter = self.adapter
        assert adapter is not None, "described before its factors are dropped"
        return AdapterInfo(
            name=name,
            rank=adapter.rank,
            alpha=adapter.alpha,
            use_rslora=adapter.use_rslora,
            scaling=adapter.scaling,
            targets=tuple(adapter.modules),
            tier="host",
            bytes=self.nbytes,
            version=0,
            source=adapter.source,
            rank_pattern=dict(adapter.rank_pattern),
            alpha_pattern=dict(adapter.alpha_pattern),
            peft_type=adapter.peft_type,
            use_dora=adapter.use_dora,
            lora_bias=adapter.lora_bias,
            modules_to_save=tuple(adapter.saved_modules),
        )


BaseWeights = Callable[[str], "tuple[torch.Tensor, torch.Tensor | None]"]
ToModel = Callable[[ParsedAdapter], ParsedAdapter]


class Stager:
    """Reads, checks and stages adapters for the layers of ``arena`` (its layout only).

    Args:
        base_weights: layer name -> its frozen base weight as ``[d_out, d_in]`` (on the
            model's device) and bias: what DoRA's normalisation is computed from.
        to_model: applied to every adapter read, to match the model's layout (e.g. per-expert
            LoRA fused onto fused experts, :mod:`hotswap_rt.unfused_experts`).
    """

    def __init__(self, arena: SlotArena, base_weights: BaseWeights | None = None,
                 to_model: ToModel | None = None) -> None:
        self.arena = arena
        self.base_weights = base_weights
        self.to_model = to_model
        self._column_scales: dict[tuple[tuple[float, ...], tuple[int, ...]], torch.Tensor] = {}
        self._scaled_identities: dict[tuple[int, float], torch.Tensor] = {}
        self.parse_cache = ParseCache()  # adapters of one structure are validated once
        self.layouts = arena.layouts  # the arena's own dict: layers it gains appear here
        self.max_rank = arena.max_rank
        self.pin = arena.pin_host_rows
        self.memory = HostMemoryPool()  # file buffers (and unpinned rows) of dropped adapters

    def row_nbytes(self, adapter: ParsedAdapter, planned: Mapping[str, LayerLayout] | None = None) -> int:
        """Bytes of ``adapter``'s host rows (its true size), counting ``planned`` layers (about
        to be injected) into the rank widths."""
        widths, vector_sizes = self.arena.rank_widths, dict(self.arena.vector_sizes)
        layouts = {**self.layouts, **(planned or {})}
        vectors = self.arena.vectors or adapter.has_vectors  # vectors now or once it is loaded
        grown = [layout for layout in layouts.values() if layout.vectors < 0 and (
            layout.full or (vectors and layout.can_hold_vectors))]  # regions it would add
        for layout in (planned or {}).values():
            widths[layout.dtype] = widths.get(layout.dtype, 0) + layout.width
        for layout in grown:
            vector_sizes[layout.dtype] = vector_sizes.get(layout.dtype, 0) + layout.vector_width
        ranks = _ranks_by_dtype(adapter, layouts, widths)
        return sum((vector_sizes.get(dtype, 0) + ranks[dtype] * width) * dtype.itemsize
                   for dtype, width in widths.items())

    @torch.no_grad()
    def fit_rows(self, staged: StagedAdapter) -> None:
        """Re-lay ``staged``'s host rows (in place) for the arena's current ``(V, W)``, after
        layers were injected at the end of the rank blocks (or scale vectors added) since it was
        staged. Correct because the adapter was checked before those existed: it has nothing for
        them."""
        for dtype, width in self.arena.rank_widths.items():
            sizes = (self.arena.vector_sizes.get(dtype, 0), width)
            row = staged.rows.get(dtype)
            if row is None:  # a host row like any other: pinned for an accelerator
                staged.rows[dtype] = torch.zeros(sizes[0], dtype=dtype, pin_memory=self.pin)
            else:
                staged.rows[dtype] = self.arena.relayout(row, staged.sizes[dtype], sizes)
            staged.sizes[dtype] = sizes
        vars(staged).pop("nbytes", None)  # the cached size (a frozen dataclass refuses del)

    def read(
        self,
        source: str | os.PathLike[str] | None,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        config: Any = None,
        allow_pickle: bool = False,
        allow_nonfinite: bool = False,
        defer_finite: bool = False,
        mapped: bool = False,
    ) -> ParsedAdapter:
        """Parse and validate an adapter from a directory / Hub id, or ``state_dict`` + ``config``
        (a dict or a PEFT config object). ``defer_finite``: leave the NaN/Inf check to
        :meth:`stage` (``check_finite=True``), which does it in one pass over the staged rows.
        ``mapped``: a safetensors file's tensors are views of a private memory map of it (for
        an adapter staged and then dropped: see ``RuntimeConfig.map_adapter_files``).

        Raises:
            HotswapError: (a subclass) naming the file, key or value at fault.
        """
        if (source is None) == (state_dict is None):
            raise HotswapError("pass exactly one of a source (directory or Hub id) or state_dict=")
        if source is not None:
            directory = resolve_source(source)
            config_dict, state = read_adapter_dir(directory, allow_pickle=allow_pickle,
                                                  empty=self.memory.empty, mapped=mapped)
            where = str(directory)
        else:
            if config is None:
                raise HotswapError("state_dict= needs config= (the adapter_config as a dict)")
            config_dict = config_as_dict(config)
            if not isinstance(state_dict, Mapping):
                raise AdapterFormatError(f"state_dict= must map PEFT keys to tensors, got "
                                         f"{type(state_dict).__name__}")
            state, where = dict(state_dict), "state_dict"
        adapter = self.parse_cache.parse(config_dict, state, where, allow_nonfinite=allow_nonfinite,
                                          check_finite=not defer_finite)
        return self.to_model(adapter) if self.to_model is not None else adapter

    def check(self, adapter: ParsedAdapter, planned: Mapping[str, LayerLayout] | None = None,
              vectors_planned: bool = False) -> None:
        """Raise unless every module of ``adapter`` is an injected layer of matching shape
        (``planned``: layers about to be injected, checked as if they were; ``vectors_planned``:
        scale vectors about to be added).

        Raises:
            IncompatibleAdapterError: a module was not injected, or its shapes differ, or it
                needs scale vectors the arena does not have.
            RankTooLargeError: a module's rank exceeds ``max_rank``.
        """
        where = adapter.source or "state_dict"
        self._check_saved_modules(adapter, planned or {}, where)
        for name, module in adapter.modules.items():
            layout = self.layouts.get(name) or (planned or {}).get(name)
            if layout is None:
                field = "target_parameters" if module.kind == "experts" else "target_modules"
                raise IncompatibleAdapterError(
                    f"{where}: module {name!r} is not an injected layer of this runtime "
                    f"(widen RuntimeConfig.{field} to include it)"
                )
            if module.has_vectors:
                self._check_vectors(module, layout, vectors_planned, where)
                if module.rank == 0:
                    continue
            if module.rank > self.max_rank:
                fused = " (per-expert gate and up projections fuse into it with their ranks summed)" if (
                    module.kind == "experts" and name.endswith(".gate_up_proj")) else ""
                raise RankTooLargeError(
                    f"{where}: module {name!r} has rank {module.rank} > max_rank={self.max_rank}{fused}"
                )
            if (module.kind, module.kernel, module.groups) != (layout.kind, layout.kernel, layout.groups):
                held = _describe(module.kind, module.kernel, module.groups)
                raise IncompatibleAdapterError(
                    f"{where}: module {name!r}: the adapter holds {held} LoRA but the layer is "
                    f"{_describe(layout.kind, layout.kernel, layout.groups)}"
                )
            expected_a, expected_b = (module.rank, layout.d_in), (layout.d_out, module.rank)
            if tuple(module.lora_A.shape) != expected_a or tuple(module.lora_B.shape) != expected_b:
                raise IncompatibleAdapterError(
                    f"{where}: module {name!r}: lora_A {tuple(module.lora_A.shape)} / lora_B "
                    f"{tuple(module.lora_B.shape)} do not fit the layer (d_in={layout.d_in}, "
                    f"d_out={layout.d_out}); expected {expected_a} / {expected_b}"
                )

    def _check_saved_modules(self, adapter: ParsedAdapter, planned: Mapping[str, LayerLayout],
                             where: str) -> None:
        """Every ``modules_to_save`` module must be held per slot here (held in full) with the
        same shapes (an embedding's weight ``[num_embeddings, dim]``, no bias)."""
        for name, params in adapter.saved_modules.items():
            layout = self.layouts.get(name) or planned.get(name)
            if layout is None or not layout.full:
                held = "is not held" if layout is None else "is a LoRA layer, not held in full"
                raise IncompatibleAdapterError(
                    f"{where}: the adapter trains {name!r} in full (modules_to_save), which {held} "
                    f"per slot by this runtime (name it in RuntimeConfig.modules_to_save)")
            weight = params["weight"]
            embedding = layout.kind == "full_embedding"
            expected = (layout.d_in, layout.d_out) if embedding else (layout.d_out, layout.d_in)
            if tuple(weight.shape) != expected:
                raise IncompatibleAdapterError(
                    f"{where}: the saved module {name!r} has weight {tuple(weight.shape)}, the model's "
                    f"is {expected}")
            if embedding and "bias" in params:
                raise IncompatibleAdapterError(f"{where}: the saved module {name!r} has a bias, but "
                                               f"the model's is an nn.Embedding")

    def _check_vectors(self, module: LoraModule, layout: LayerLayout, vectors_planned: bool,
                       where: str) -> None:
        name = layout.name
        if not layout.can_hold_vectors:
            kind = _describe(layout.kind, layout.kernel, layout.groups)
            raise IncompatibleAdapterError(f"{where}: module {name!r}: IA3 / DoRA / lora_bias on {kind} "
                                           f"layer is not supported")
        if module.rank == 0 and layout.kind == "embedding":  # IA3
            raise IncompatibleAdapterError(f"{where}: module {name!r}: IA3 on an Embedding is not "
                                           f"supported (PEFT has no IA3 for embeddings)")
        if module.rank == 0 and (module.kind == "conv") != (layout.kind == "conv"):  # IA3
            held = "a Conv2d's [1, C, 1, 1]" if module.kind == "conv" else "a linear layer's"
            raise IncompatibleAdapterError(
                f"{where}: module {name!r}: its ia3_l has {held} shape but the layer is "
                f"{_describe(layout.kind, layout.kernel, layout.groups)}")
        if not (self.arena.vectors or vectors_planned):
            raise IncompatibleAdapterError(
                f"{where}: an IA3 / DoRA / lora_bias adapter needs scale vectors in the slots, which "
                f"this compiled runtime does not have (adding them would recompile it): create it "
                f"with RuntimeConfig(scale_vectors=True), or load such an adapter before compiling")
        if module.ia3 is not None:
            expected = layout.vector_in if module.ia3_feedforward else layout.d_out
            if module.ia3.numel() != expected:
                side = ("C_in" if layout.kind == "conv" else "d_in") if module.ia3_feedforward else "d_out"
                raise IncompatibleAdapterError(
                    f"{where}: module {name!r}: its ia3_l has {module.ia3.numel()} values but the "
                    f"layer's {side} is {expected}")

    @torch.no_grad()
    def stage(self, adapter: ParsedAdapter, fold_scaling: bool = True,
              check_finite: bool = False) -> StagedAdapter:
        """Check ``adapter``, then build its rank-prefix rows in host memory.

        Args:
            fold_scaling: multiply B by each module's scaling (inference). A trainable adapter
                keeps B unscaled (its scaling is applied through the selection weights), so the
                slot holds exactly the factors PEFT trains.
            check_finite: refuse NaN/Inf in the staged rows (one pass per dtype; the read
                deferred it), naming the key at fault.

        Raises:
            AdapterFormatError: ``check_finite`` and a value is NaN/Inf (or B * scaling
                overflows the slot dtype).
        """
        self.check(adapter)
        if adapter.has_vectors and not fold_scaling:
            raise HotswapError(f"{adapter.source or 'state_dict'}: IA3 / DoRA / lora_bias adapters are "
                               f"staged for inference only (not trainable in a slot)")
        widths, vector_sizes = self.arena.rank_widths, self.arena.vector_sizes
        ranks = _ranks_by_dtype(adapter, self.layouts, widths)
        rows = {  # every value is written below: zeros in the vector region, the blocks by one cat
            dtype: self._empty_row(vector_sizes.get(dtype, 0) + ranks[dtype] * width, dtype)
            for dtype, width in widths.items()
        }
        fused = {}
        for dtype, row in rows.items():
            row[: vector_sizes.get(dtype, 0)].zero_()
            fused[dtype] = self._stage_full_rank_factors(row, adapter, dtype, ranks[dtype], fold_scaling)
        for name, module in adapter.modules.items():
            layout = self.layouts[name]
            row = rows[layout.dtype]
            column_scale = self._stage_vectors(row, layout, module) if module.has_vectors else None
            if module.rank == 0 or name in fused[layout.dtype]:
                continue
            a_view, b_view = factor_views(row, layout, widths[layout.dtype], vector_sizes.get(layout.dtype, 0))
            a_view[: module.rank].copy_(module.lora_A)
            scale = module.scaling if fold_scaling else 1.0
            b_part = b_view[:, : module.rank]
            if layout.dtype == torch.float32 and column_scale is None:
                b_part.copy_(module.lora_B)
                if scale != 1.0:
                    b_part.mul_(scale)  # in place: faster than mul(out=) into a transposed view
            else:  # scale in fp32 before rounding to the slot dtype
                scaled = module.lora_B.float() * scale
                b_part.copy_(scaled if column_scale is None else scaled * column_scale[:, None])
        for name, params in adapter.saved_modules.items():
            self._stage_saved_module(rows[self.layouts[name].dtype], self.layouts[name], params)
        if check_finite and not all(all_finite(row) for row in rows.values()):
            where = adapter.source or "state_dict"
            key = nonfinite_key(adapter)
            if key is not None:
                raise nonfinite_error(where, key)
            raise AdapterFormatError(f"{where}: lora_B * scaling overflows the slot dtype (Inf)")
        sizes = {dtype: (vector_sizes.get(dtype, 0), width) for dtype, width in widths.items()}
        return StagedAdapter(adapter=adapter, rows=rows, sizes=sizes)

    def _empty_row(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A host row: pinned for an accelerator (PyTorch's caching host allocator reuses those),
        else from :attr:`memory`."""
        if self.pin:
            return torch.empty(numel, dtype=dtype, pin_memory=True)
        return self.memory.empty(numel, dtype)

    def _stage_full_rank_factors(self, row: torch.Tensor, adapter: ParsedAdapter, dtype: torch.dtype,
                                 ranks: int, fold_scaling: bool) -> set[str]:
        """Write all rank blocks of ``row`` ``[V + ranks * W]``: the factors of every module of
        ``adapter`` on ``dtype``'s layers that has the row's full ``ranks`` and no scale vectors,
        zeros elsewhere (the per-module path then fills those). Returns the names written.

        Rank block ``j`` is, layer by layer in offset order, A's row ``j`` then B's column
        ``j`` (scaled by the module's scaling when ``fold_scaling``); B is scaled in fp32 before
        rounding to a narrower slot dtype, as the per-module path does. Small layers are written
        by one ``cat`` and one column-scaling pass (a copy and a scaling per module would cost
        more Python than data); large fp32 ones piece by piece, B scaled in its transposing copy
        (:meth:`_write_pieces`), which saves that pass over the whole row."""
        layouts = sorted((layout for layout in self.layouts.values() if layout.dtype == dtype and layout.width),
                         key=lambda layout: layout.offset)
        width = self.arena.rank_widths[dtype]
        if not ranks or not layouts:
            return set()
        blocks = row[self.arena.vector_sizes.get(dtype, 0):].view(ranks, width)
        pieces: list[torch.Tensor | None] = []  # [ranks, size] each; None: zeros
        scales, sizes, written = [], [], set()
        for layout in layouts:
            module = adapter.modules.get(layout.name)
            if module is None or module.rank != ranks or module.has_vectors:
                pieces.append(None)
                scales.append(1.0)
                sizes.append(layout.width)
                continue
            # a state_dict's tensors may be on a GPU: the host row is not
            pieces += [module.lora_A.to(row.device), module.lora_B.to(row.device).t()]
            scales += [1.0, module.scaling if fold_scaling else 1.0]
            sizes += [layout.d_in, layout.d_out]
            written.add(layout.name)
        fp32 = dtype == torch.float32 and all(piece is None or piece.dtype == dtype for piece in pieces)
        large = blocks.numel() * blocks.element_size() >= self.PIECEWISE_MIN_BYTES * len(layouts)
        if fp32 and large and _exact_fp32_matmul():
            self._write_pieces(blocks, pieces, scales, sizes)
            return written
        zeros = None  # built when a layer needs it (a ~0.7 MB fill per load at Llama-7B widths)
        if any(piece is None for piece in pieces):  # not `None in pieces`: tensor == None compares values
            zeros = torch.zeros(ranks, max(sizes), dtype=dtype)
        pieces = [zeros[:, :size] if piece is None else piece for piece, size in zip(pieces, sizes)]
        uniform = all(scale == 1.0 for scale in scales)
        if fp32:
            torch.cat(pieces, dim=1, out=blocks)
            if not uniform:
                blocks.mul_(self._column_scale(scales, sizes))
        else:
            values = torch.cat([piece.float() for piece in pieces], dim=1)
            blocks.copy_(values if uniform else values.mul_(self._column_scale(scales, sizes)))
        return written

    PIECEWISE_MIN_BYTES = 128 * 1024
    """Rank blocks whose layers hold at least this many bytes each on average (all ranks, A
    and B) are written piece by piece (:meth:`_write_pieces`), smaller ones by one ``cat``.
    Measured (ad hoc, 2-core VM, r=16 fp32 files, read + stage + NaN check, interleaved):
    ~75 KiB a layer at hidden 512, the cat 10% faster; ~350 KiB at hidden 2048 and ~700 KiB at
    Llama-7B widths, piece by piece 10% / 15-20% faster."""

    def _write_pieces(self, blocks: torch.Tensor, pieces: list[torch.Tensor | None],
                      scales: list[float], sizes: list[int]) -> None:
        """Write ``pieces`` (``[r, size]`` fp32 each, None: zeros) side by side into ``blocks``
        ``[r, W]``, each multiplied by its scale. A scaled piece (B, transposed) is written by
        ``mm(scale * I_r, piece)`` into its columns: BLAS packs the transposed operand (at
        Llama-7B widths as fast as the ``cat``'s strided copy) and the scaling comes with it,
        exactly (each value is ``scale * b`` rounded once plus exact zeros; called only where
        fp32 matmuls are not allowed a narrower type, :func:`_exact_fp32_matmul`)."""
        offset = 0
        for piece, scale, size in zip(pieces, scales, sizes):
            view = blocks[:, offset : offset + size]
            offset += size
            if piece is None:
                view.zero_()
            elif scale == 1.0:
                view.copy_(piece)
            else:
                torch.mm(self._scaled_identity(piece.shape[0], scale), piece, out=view)

    def _scaled_identity(self, rank: int, scale: float) -> torch.Tensor:
        """``scale * I`` ``[rank, rank]`` fp32, kept (an adapter's modules mostly share one)."""
        return _kept(self._scaled_identities, (rank, scale), lambda: torch.eye(rank) * scale)

    def _column_scale(self, scales: list[float], sizes: list[int]) -> torch.Tensor:
        """``[sum(sizes)]`` fp32: ``scales[i]`` repeated ``sizes[i]`` times; kept for the next
        adapter with the same scalings on the same layers (building it costs ~0.1 ms at Llama-7B
        widths; most adapters of a runtime share them)."""
        return _kept(self._column_scales, (tuple(scales), tuple(sizes)), lambda: torch.repeat_interleave(
            torch.tensor(scales, dtype=torch.float32), torch.tensor(sizes)))

    def _base_weight(self, name: str, feature: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer ``name``'s base weight ``[d_out, d_in]`` and bias, which ``feature`` needs."""
        if self.base_weights is None:
            raise HotswapError(f"{feature} needs the base weights: this Stager was built without them")
        return self.base_weights(name)

    def _stage_saved_module(self, row: torch.Tensor, layout: LayerLayout,
                            params: Mapping[str, torch.Tensor]) -> None:
        """A ``modules_to_save`` module's weight and bias minus the base's, into its region of
        ``row`` (``[d_out * d_in]`` row-major, then ``[d_out]``; a saved bias on a base without
        one is its own delta; an embedding's: ``[num_embeddings * dim]`` row-major, no bias)."""
        weight, bias = self._base_weight(layout.name, "modules_to_save")
        region = row[layout.vectors : layout.vectors + layout.vector_width]
        if layout.kind == "full_embedding":  # the base weight comes as [dim, num_embeddings]
            region.view(layout.d_in, layout.d_out).copy_(
                params["weight"].float() - weight.detach().float().cpu().t())
            return
        d_weights = layout.d_out * layout.d_in
        region[:d_weights].view(layout.d_out, layout.d_in).copy_(
            params["weight"].float() - weight.detach().float().cpu())
        saved_bias = params.get("bias")
        if saved_bias is not None:
            base_bias = 0.0 if bias is None else bias.detach().float().cpu()
            region[d_weights:].copy_(saved_bias.float() - base_bias)

    def _stage_vectors(self, row: torch.Tensor, layout: LayerLayout, module: LoraModule) -> torch.Tensor | None:
        """Write ``module``'s scale vectors into ``row`` (see :class:`LoraModule`), each as its
        difference from the identity; return DoRA's per-output scale ``s [d_out]`` (fp32, B's
        rows are multiplied by it) or None.

        DoRA: ``y = base(x) + (s - 1) (W x) + s B' A x`` (``B'`` = scaling * B) is held as
        output scale ``s - 1``, output bias ``-(s - 1) * bias`` (the scale applies to the base
        output, bias included) and ``s`` folded into B."""
        in_scale, out_scale, out_bias = vector_views(row, layout)
        if module.ia3 is not None:
            (in_scale if module.ia3_feedforward else out_scale).copy_(module.ia3.float() - 1)
        if module.bias is not None:
            out_bias.copy_(module.bias.float() * module.scaling)
        if module.magnitude is None:
            return None
        weight, bias = self._base_weight(layout.name, "DoRA")
        scale = dora_scale(weight, module)
        out_scale.copy_(scale - 1)
        if bias is not None:
            out_bias.copy_(-(scale - 1) * bias.detach().float().cpu())
        return scale

    def read_and_stage(
        self,
        source: str | os.PathLike[str] | None,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        config: Any = None,
        allow_pickle: bool = False,
        allow_nonfinite: bool = False,
        fold_scaling: bool = True,
        mapped: bool = False,
    ) -> StagedAdapter:
        """:meth:`read` then :meth:`stage`."""
        adapter = self.read(source, state_dict, config, allow_pickle, allow_nonfinite,
                            defer_finite=not allow_nonfinite, mapped=mapped)
        return self.stage(adapter, fold_scaling=fold_scaling, check_finite=not allow_nonfinite)


def dora_scale(weight: torch.Tensor, module: LoraModule) -> torch.Tensor:
    """DoRA's ``s = m / ||W + scaling * B A||`` (norm of each output row), computed in fp32
    on ``weight``'s device (``[d_out, d_in]``; a Conv2d's ``[C_out, C_in, kh, kw]``, whose rows
    are flattened as A's are), returned on the CPU as ``[d_out]`` fp32."""
    assert module.magnitude is not None
    device = weight.device
    delta = module.lora_B.to(device, torch.float32) @ module.lora_A.to(device, torch.float32)
    norm = torch.linalg.norm(weight.detach().float().flatten(1) + module.scaling * delta, dim=1)
    return (module.magnitude.to(device, torch.float32) / norm).cpu()


def _kept(cache: dict[Any, torch.Tensor], key: Any, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``cache[key]``, built by ``build()`` the first time; the cache is emptied when it holds
    16 (a runtime's adapters mostly share a few)."""
    value = cache.get(key)
    if value is None:
        if len(cache) >= 16:
            cache.clear()
        value = cache[key] = build()
    return value


def _exact_fp32_matmul() -> bool:
    """fp32 matmuls keep full fp32 precision (``torch.set_float32_matmul_precision`` at its
    default, ``"highest"``; "high" / "medium" let backends compute them in TF32 / bf16)."""
    return torch.get_float32_matmul_precision() == "highest"


def _ranks_by_dtype(adapter: ParsedAdapter, layouts: Mapping[str, LayerLayout],
                    widths: Mapping[torch.dtype, int]) -> dict[torch.dtype, int]:
    """dtype -> the largest rank of ``adapter``'s modules on layers of that dtype (0: none):
    how many rank blocks its host row holds."""
    ranks = dict.fromkeys(widths, 0)
    for name, module in adapter.modules.items():
        dtype = layouts[name].dtype
        ranks[dtype] = max(ranks[dtype], module.rank)
    return ranks


def _describe(kind: str, kernel: tuple[int, ...], groups: int) -> str:
    if kind == "conv":
        return f"a Conv2d (kernel [C_in, kh, kw] = {list(kernel)}, groups={groups})"
    return "an Embedding" if kind == "embedding" else "a linear"


class BackgroundLoads:
    """Loads running on a thread pool, by adapter name, and the failures nobody has seen yet.

    A failure is reported once: by whoever waits for the load (:meth:`wait`), else kept until
    the name is next needed or loaded again (:meth:`forget`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, Future] = {}
        self._failed: dict[str, HotswapError] = {}
        self._executor: ThreadPoolExecutor | None = None

    def submit(self, name: str, job: Callable[[], Any]) -> Future:
        """Run ``job`` in the background as the load of ``name``; its Future."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hotswap-stage")
            future = self._executor.submit(job)
            self._pending[name] = future
            self._failed.pop(name, None)
        future.add_done_callback(lambda done: self._done(name, done))
        return future

    def _done(self, name: str, future: Future) -> None:
        with self._lock:
            error = None if future.cancelled() else future.exception()
            if self._pending.get(name) is future:
                if isinstance(error, HotswapError):  # before leaving _pending: see knows
                    self._failed[name] = error
                del self._pending[name]

    def in_flight(self, name: str) -> bool:
        future = self._pending.get(name)
        return future is not None and not future.done()

    def knows(self, name: str) -> bool:
        """A load of ``name`` is in flight or failed unseen. Read without the lock (every swap
        asks; taking it costs ~0.5 us when the caches are cold): a load's failure is recorded
        before the load leaves ``_pending``, so a name never passes through neither."""
        return name in self._pending or name in self._failed

    def wait(self, name: str) -> None:
        """Wait for the load of ``name`` if one is in flight; raise its (or an earlier unseen)
        failure.

        Raises:
            HotswapError: the background load of ``name`` failed.
        """
        future = self._pending.get(name)
        if future is None and name not in self._failed:
            return  # nothing in flight or unseen (the common case: no lock taken)
        error = future.exception() if future is not None else None  # waits for it
        with self._lock:
            if future is not None and self._pending.get(name) is future:
                del self._pending[name]  # consumed here, before its done-callback ran
                failure = error if isinstance(error, HotswapError) else None
            else:
                failure = self._failed.pop(name, None)
        if failure is not None:
            raise HotswapError(f"background load of {name!r} failed: {failure}") from failure

    def forget(self, name: str) -> None:
        """Drop an unseen failure of ``name`` (it was loaded again or unloaded)."""
        with self._lock:
            self._failed.pop(name, None)

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
