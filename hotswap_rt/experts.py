"""LoRA on fused MoE experts (PEFT's ``target_parameters``), in the same slots as every layer.

transformers 5 keeps a MoE layer's experts as 3-D parameters of one module (``gate_up_proj``
``[E, 2*I, H]`` and ``down_proj`` ``[E, H, I]`` for Qwen3-MoE / Mixtral / Qwen2-MoE; ``up_proj``
without a gate; transposed ``[E, in, out]`` for gpt-oss), with a shared forward interface
(``forward(hidden_states [N, H], top_k_index [N, K], top_k_weights [N, K])``, ``has_gate``,
``has_bias``, ``is_transposed``, ``_apply_gate``). PEFT's LoRA on such a parameter is one LoRA per
expert, ``delta_e = scaling * B_e A_e``.

A targeted parameter is a layer of kind ``"experts"`` in the arena (``d_in = E * in``,
``d_out = E * out``: rank ``j`` of the slot row holds every expert's A row ``j`` and B column
``j``), read by an :class:`ExpertFactors`. The experts module itself is replaced by
:class:`LoraSlotExperts`, which computes the experts the way transformers' ``batched_mm``
implementation does (each token-expert pair multiplies its expert's gathered weight; no
data-dependent shapes, so it compiles with ``fullgraph``) and adds, for each pair, the LoRA of its
expert from the slots its row selects::

    P = N * K pairs (token t, its k-th expert e), row b = the batch row of t
    proj_p = W_e x_t + sum_s w[b, s] * B_{s,e} A_{s,e} x_t      (gate_up / up, then down)
    y_t    = sum_k route[t, k] * down(gate(proj))

Cost: the pairs gather their experts' weights (``P * out * in`` values per projection, as
``batched_mm`` does) and the selected slots' factors (``P * n * r * (in + out)``, ``n`` the
slots read per row). With many pairs per expert (prefill) that gather outgrows reading every
expert's weight once, so unless the model's experts implementation is ``"batched_mm"`` the
pairs are sorted by expert and the base projections run as transformers' ``grouped_mm`` does
(one matmul per expert over its pairs; the LoRA deltas stay per pair), except in a graph whose
static shapes have fewer than :data:`GROUPED_FROM_PAIRS_PER_EXPERT` pairs per expert (decode),
which keeps the batched gather (decided at trace time without adding a guard: with dynamic
shapes, grouped).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .arena import LayerShape
from .config import name_matches
from .layers import SlotLayer, weigh
from .peft_format import EXPERT_PARAMS
from .selection import Selection

try:  # transformers' grouped expert matmul (torch grouped_mm, else its per-expert fallback op)
    from transformers.integrations.moe import _grouped_linear
except ImportError:  # a transformers without it: every shape takes the batched path
    _grouped_linear = None

# Pairs per expert from which the base projections run grouped by expert (see the module doc).
GROUPED_FROM_PAIRS_PER_EXPERT = 4


def is_experts_module(module: nn.Module) -> bool:
    """A transformers fused experts module (the ``use_experts_implementation`` interface)."""
    if isinstance(module, LoraSlotExperts):
        return True
    return all(hasattr(module, attr) for attr in ("num_experts", "is_transposed", "has_gate", "has_bias",
                                                  "down_proj", "act_fn"))


def unsupported_reason(module: nn.Module) -> str | None:
    """Why an experts module cannot carry slots (None: it can)."""
    base = module.base if isinstance(module, LoraSlotExperts) else module
    if not is_experts_module(base):
        return f"{type(base).__name__} is not a transformers fused-experts module"
    if getattr(base, "has_post_expert_norm", False) or getattr(base, "_is_expert_parallel", False):
        return f"{type(base).__name__}: experts with a post-expert norm or expert parallelism are not supported"
    return None


def expert_param_shape(module: nn.Module, param: str) -> LayerShape:
    """The slot shape of ``module.<param>``, an ``[E, out, in]`` (``[E, in, out]`` when
    transposed) expert parameter.

    Raises:
        TypeError: not an experts module we can wrap, or not one of its expert parameters.
    """
    reason = unsupported_reason(module)
    if reason:
        raise TypeError(reason)
    base = module.base if isinstance(module, LoraSlotExperts) else module
    weight = getattr(base, param, None)
    if param not in EXPERT_PARAMS or not isinstance(weight, torch.Tensor) or weight.dim() != 3:
        raise TypeError(f"{type(base).__name__}.{param} is not a 3-D expert parameter "
                        f"(one of {EXPERT_PARAMS})")
    experts, first, second = weight.shape
    d_in, d_out = (first, second) if base.is_transposed else (second, first)
    return LayerShape(experts * d_in, experts * d_out, weight.dtype, "experts", (int(experts),))


def find_target_parameters(model: nn.Module, patterns: list[str] | tuple[str, ...]) -> list[str]:
    """``<module>.<param>`` names of the expert parameters matching PEFT's ``target_parameters``
    (exact name or suffix), in ``named_modules`` order."""
    found = []
    for name, module in model.named_modules():
        if name and is_experts_module(module) and not isinstance(module, LoraSlotExperts):
            for param in EXPERT_PARAMS:
                if isinstance(getattr(module, param, None), torch.Tensor) and name_matches(
                        list(patterns), f"{name}.{param}"):
                    found.append(f"{name}.{param}")
    return found


class ExpertFactors(SlotLayer):
    """The slot reads of one expert parameter (not a module of the model: the experts module's
    :class:`LoraSlotExperts` calls :meth:`delta`). ``base`` is the experts module."""

    def forward(self, *args: object) -> torch.Tensor:  # pragma: no cover - never called
        raise RuntimeError("ExpertFactors is read by LoraSlotExperts, not called")

    def delta(self, x: torch.Tensor, experts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Each pair's LoRA delta ``[P, out]`` for inputs ``x [P, in]``, pair experts
        ``experts [P]`` and batch rows ``rows [P]``."""
        num_experts = self.shape.kernel[0]
        a_stack, bt_stack = self.slot_views()  # [S, r, E*in], [S, r, E*out]
        a_stack = a_stack.unflatten(2, (num_experts, -1))  # [S, r, E, in]
        bt_stack = bt_stack.unflatten(2, (num_experts, -1))  # [S, r, E, out]
        slots, weights, on = self._pair_slots(rows)  # [P, n] each
        a_pair = a_stack[slots, :, experts[:, None]]  # [P, n, r, in]
        bt_pair = bt_stack[slots, :, experts[:, None]]  # [P, n, r, out]
        h = torch.einsum("pi,pnri->pnr", x.to(a_pair.dtype), a_pair)
        h = weigh(h, weights[:, :, None], on[:, :, None], self._selection.zero)
        return torch.einsum("pnr,pnro->po", h, bt_pair)

    def _pair_slots(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The slots each pair reads, their weights and which weights are on, ``[P, n]`` each:
        its row's own slots (per-row mode), else the active positions with the row's weights."""
        selection: Selection = self._selection
        if selection.per_row:
            return selection.row_slots[rows], selection.row_slot_weights[rows], selection.row_slot_on[rows]
        slots = selection.active_slots.expand(rows.shape[0], -1)
        return slots, selection.row_weights[rows], selection.row_on[rows]


def _batched_linear(x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``x [P, in]`` through per-pair weights ``[P, out, in]`` (``[P, in, out]`` transposed)."""
    if transposed:
        return torch.bmm(x.unsqueeze(1), weight).squeeze(1)
    return torch.bmm(weight, x.unsqueeze(-1)).squeeze(-1)


class LoraSlotExperts(nn.Module):
    """Replaces a fused experts module: the experts' forward (see the module doc) with each
    targeted parameter's per-expert LoRA from the slots (:class:`ExpertFactors` in
    :attr:`factors`, by parameter name)."""

    def __init__(self, base: nn.Module, selection: Selection) -> None:
        super().__init__()
        reason = unsupported_reason(base)
        if reason:
            raise TypeError(reason)
        self.base = base
        self._selection = selection
        self.factors: dict[str, ExpertFactors] = {}  # a plain dict: not submodules (base is shared)

    def add(self, param: str, factors: ExpertFactors) -> None:
        self.factors[param] = factors

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        base = self.base
        tokens, top_k = top_k_index.shape
        experts = top_k_index.reshape(-1)  # [P], pair p = (token p // K, its (p % K)-th expert)
        token_rows = self._token_rows(tokens, hidden_states.device)
        offsets = None
        if self._grouped(tokens * top_k):
            experts, order = torch.sort(experts)  # pairs grouped by expert
            pair_tokens = order // top_k
            counts = torch.histc(experts.float() if experts.device.type in ("cpu", "mps") else experts.int(),
                                 bins=base.num_experts, min=0, max=base.num_experts - 1)
            offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)  # end of each expert's pairs
            x, rows = hidden_states[pair_tokens], token_rows[pair_tokens]
            route = top_k_weights.reshape(-1)[order]
        else:
            x = hidden_states.repeat_interleave(top_k, dim=0)  # [P, H]
            rows, route = token_rows.repeat_interleave(top_k), top_k_weights.reshape(-1)
        first = "gate_up_proj" if base.has_gate else "up_proj"
        proj = self._project(first, x, experts, rows, offsets)
        proj = base._apply_gate(proj) if base.has_gate else base.act_fn(proj)
        out = self._project("down_proj", proj, experts, rows, offsets)  # [P, H]
        out = out * route[:, None].to(out.dtype)
        if offsets is not None:  # back to pair order
            out = torch.empty_like(out).index_copy_(0, order, out)
        return out.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)

    def _grouped(self, pairs: int | torch.SymInt) -> bool:
        """Whether the base projections run grouped by expert (see the module doc)."""
        config = getattr(self.base, "config", None)
        if _grouped_linear is None or getattr(config, "_experts_implementation", None) == "batched_mm":
            return False
        return not statically_known_true(pairs < GROUPED_FROM_PAIRS_PER_EXPERT * self.base.num_experts)

    def _project(self, param: str, x: torch.Tensor, experts: torch.Tensor, rows: torch.Tensor,
                 offsets: torch.Tensor | None) -> torch.Tensor:
        """``x [P, in]`` through each pair's expert ``param`` plus its LoRA; ``offsets``: the
        pairs are sorted by expert and these end each expert's group (grouped matmul)."""
        base = self.base
        weight = getattr(base, param)
        bias = getattr(base, f"{param}_bias") if base.has_bias else None
        if offsets is not None:
            out = _grouped_linear(x, weight, offsets, bias=None if bias is None else bias[experts],
                                  is_transposed=base.is_transposed)
        else:
            out = _batched_linear(x, weight[experts], base.is_transposed)
            if bias is not None:
                out = out + bias[experts]
        factors = self.factors.get(param)
        if factors is not None:
            out = out + factors.delta(x, experts, rows).to(out.dtype)
        return out

    def _token_rows(self, tokens: int, device: torch.device) -> torch.Tensor:
        """The batch row of each flattened token ``[N]``: the selection's rows split the tokens
        evenly (``N = rows * T``; one row for a uniform selection)."""
        count = self._selection.row_count
        return torch.arange(tokens, device=device) * count // tokens
