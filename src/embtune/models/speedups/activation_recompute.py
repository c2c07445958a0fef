"""Activations that a training step recomputes in backward instead of keeping: cheap ones only.

Why this is hand-written: what autograd keeps for backward is most of a CPU training step's
memory (all-MiniLM-L6-v2, batch 16, group 4, 256 tokens: 2.5 GiB of 4.7 GiB peak), and two
kinds of it are kept twice over in BERT-style layers:

* Feed-forward blocks, ``output.dense(act(intermediate.dense(x)))``, keep both the
  pre-activation ``h`` (for the activation's backward) and ``act(h)`` (for the second linear's
  weight gradient), each [tokens, 4 x hidden]. :func:`recompute_feed_forward_activations` lets
  the second linear receive ``h`` and apply the activation itself, keeping only ``h``.
* Every LayerNorm keeps its input, and the linear layers after it keep its output.
  :func:`recompute_norm_outputs` stores a recipe instead of the output (saved-tensor hooks).

Both recompute one elementwise pass in backward (under 1% of a step) and together keep 864 MiB
less at those sizes (576 + 288 MiB). Under bf16 autocast the feed-forward path runs its products
in bf16 as autocast would, and :func:`share_attention_input_cast` keeps one bf16 copy of an
attention block's input where autocast keeps three. Activation checkpointing
(``--gradient-checkpointing``) would instead run whole layers again, about a third more
compute. Outputs and gradients are those of the plain model (the norm path bit for bit; the
feed-forward path, which works through the tokens in blocks, to float rounding); weights and
saved files do not change: ``forward`` is replaced on module instances only.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

# transformers classes whose forward is intermediate_act_fn(dense(x)), nothing else (checked in
# transformers 5.24's modeling code).
INTERMEDIATE_MODULES = frozenset(
    {"BertIntermediate", "RobertaIntermediate", "XLMRobertaIntermediate", "MPNetIntermediate"}
)


# transformers classes whose forward reads hidden_states only through query / key / value
# (checked in transformers 5.24's modeling code).
SELF_ATTENTION_MODULES = frozenset(
    {"BertSelfAttention", "RobertaSelfAttention", "XLMRobertaSelfAttention"}
)


class _ActivatedLinear(torch.autograd.Function):
    """``linear(act(h), weight, bias)`` with only ``h`` kept for backward.

    Both passes go through the tokens in blocks of :data:`_ROWS`, so ``act(h)`` and the
    gradient with respect to it exist one block at a time, never as whole [tokens, 4 x hidden]
    temporaries: on CPU those would each be fresh, zero-filled pages from the operating system
    and leave holes among the activations the step keeps.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, act):  # noqa: ANN001, ANN205
        ctx.save_for_backward(h, weight)
        ctx.act, ctx.has_bias = act, bias is not None
        rows = h.reshape(-1, h.shape[-1])
        out = rows.new_empty(rows.shape[0], weight.shape[0])
        for block in _blocks(rows.shape[0]):
            out[block] = F.linear(act(rows[block]), weight, bias)
        return out.view(*h.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        h, weight = ctx.saved_tensors
        rows = h.reshape(-1, h.shape[-1])
        grad_rows = grad.reshape(-1, grad.shape[-1])
        want_h, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(rows) if want_h else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        # Under bf16 autocast h and grad are bf16 and the fp32 weight was cast in forward: the
        # products run in bf16 as autocast's would, the weight gradient adds up in fp32.
        mixed = h.dtype != weight.dtype
        product_weight = weight.to(h.dtype) if mixed else weight
        for block in _blocks(rows.shape[0]):
            with torch.enable_grad():
                inputs = rows[block].detach().requires_grad_()
                activated = ctx.act(inputs)
            if want_weight and mixed:
                grad_weight.add_(grad_rows[block].T @ activated.detach())
            elif want_weight:
                grad_weight.addmm_(grad_rows[block].T, activated.detach())
            if want_h:
                (grad_h[block],) = torch.autograd.grad(
                    activated, inputs, grad_rows[block] @ product_weight
                )
        grad_bias = None
        if ctx.has_bias and want_bias:
            grad_bias = grad_rows.sum(0, dtype=weight.dtype) if mixed else grad_rows.sum(0)
        if grad_h is not None:
            grad_h = grad_h.view(h.shape)
        return grad_h, grad_weight, grad_bias, None


# Tokens per block: 1024 x 1536 fp32 (MiniLM's 4 x hidden) is 6 MiB, cache-sized.
_ROWS = 1024


def _blocks(count: int) -> list[slice]:
    return [slice(start, start + _ROWS) for start in range(0, count, _ROWS)]


def _activated_linear(
    act: Callable[[torch.Tensor], torch.Tensor], linear: torch.nn.Linear, h: torch.Tensor
) -> torch.Tensor:
    return _ActivatedLinear.apply(h, linear.weight, linear.bias, act)


def recompute_feed_forward_activations(model: torch.nn.Module) -> int:
    """Switch every BERT-style feed-forward block of ``model``; returns how many were switched.

    A block is a module whose ``intermediate`` is one of :data:`INTERMEDIATE_MODULES` (their
    ``forward`` is exactly ``intermediate_act_fn(dense(x))``) and whose ``output.dense`` is a
    Linear; other architectures are left as they are (0).
    """
    switched = 0
    for module in model.modules():
        intermediate = getattr(module, "intermediate", None)
        output = getattr(module, "output", None)
        act = getattr(intermediate, "intermediate_act_fn", None)
        first = getattr(intermediate, "dense", None)
        second = getattr(output, "dense", None)
        if not (
            type(intermediate).__name__ in INTERMEDIATE_MODULES
            and callable(act)
            and isinstance(first, torch.nn.Linear)
            and isinstance(second, torch.nn.Linear)
            and "forward" not in vars(second)  # not switched already
        ):
            continue
        intermediate.forward = first.forward
        second.forward = functools.partial(_activated_linear, act, second)
        switched += 1
    return switched


class _NormOutputs:
    """Saved-tensor hooks: a LayerNorm output kept for a later op's backward is stored as a
    recipe (the norm and its input, which the norm keeps for its own backward anyway) and
    recomputed when that backward runs."""

    def __init__(self) -> None:
        # storage address -> (weak reference to the output, norm, its input); cleared after
        # every forward. The weak reference proves that the address still holds that output.
        self.outputs: dict[int, tuple[weakref.ref, torch.nn.LayerNorm, torch.Tensor]] = {}

    def record(self, norm: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor):
            key = output.untyped_storage().data_ptr()
            # Detached: a recipe that held the input's autograd history would form a reference
            # cycle through the graph that keeps every step's activations alive.
            self.outputs[key] = (weakref.ref(output), norm, args[0].detach())

    def pack(self, saved: torch.Tensor) -> object:
        entry = self.outputs.get(saved.untyped_storage().data_ptr()) if self.outputs else None
        if entry is None or entry[0]() is None:
            # Detached: an op's saved output returned as is would hold its own grad_fn, a cycle
            # that keeps branches whose backward never runs (BERT's pooler) alive forever.
            return saved.detach()
        _, norm, norm_input = entry
        return (norm, norm_input, saved.size(), saved.stride(), saved.storage_offset())

    @staticmethod
    def unpack(packed: object) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        norm, norm_input, size, stride, offset = packed
        with torch.no_grad():
            output = F.layer_norm(
                norm_input, norm.normalized_shape, norm.weight, norm.bias, norm.eps
            )
        return output.as_strided(size, stride, offset)


def recompute_norm_outputs(model: torch.nn.Module) -> int:
    """Make ``model``'s forward keep no LayerNorm output for backward; returns how many norms.

    In a BERT-style layer each LayerNorm output is the input of the next linear layers, which
    keep it for their weight gradients, while the norm keeps its own input: two [tokens,
    hidden] tensors per norm where one suffices. With this, the later backward recomputes the
    output from the norm's input (one cheap elementwise pass): 2 tensors per layer less, 288 MiB
    for all-MiniLM-L6-v2 at batch 16, group 4, 256 tokens. Results are bitwise the same.
    """
    if "forward" in vars(model):
        return 0  # switched already
    norms = [m for m in model.modules() if type(m) is torch.nn.LayerNorm]
    if not norms:
        return 0
    hooks = _NormOutputs()
    for norm in norms:
        norm.register_forward_hook(hooks.record)
    plain_forward = model.forward

    @functools.wraps(plain_forward)
    def forward(*args: object, **kwargs: object) -> object:
        try:
            with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
                return plain_forward(*args, **kwargs)
        finally:
            hooks.outputs.clear()

    model.forward = forward
    return len(norms)


class _SharedCast(torch.autograd.Function):
    """The bf16 copy ``low`` of ``x``, as autocast's cast would give it, but sharing storage
    with the other projections' copies; backward converts the gradient to fp32 as autocast's
    cast does, so the three projections' gradients still add up in fp32."""

    @staticmethod
    def forward(ctx, x, low):  # noqa: ANN001, ANN205
        ctx.dtype = x.dtype
        return low.detach()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return grad.to(ctx.dtype), None


class _CastOnce:
    """Forward pre-hook of the query, key and value projections: under CPU autocast, the first
    of them casts the shared input, the others reuse that copy."""

    def __init__(self) -> None:
        self.source: weakref.ref | None = None
        self.version = -1
        self.low: torch.Tensor | None = None

    def __call__(self, linear: torch.nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args else None
        if not (
            torch.is_autocast_enabled("cpu")
            and isinstance(x, torch.Tensor)
            and x.dtype == torch.float32
            and torch.is_grad_enabled()
        ):
            return None
        if self.source is None or self.source() is not x or self.version != x._version:
            self.source, self.version = weakref.ref(x), x._version
            self.low = x.detach().to(torch.get_autocast_dtype("cpu"))
        return (_SharedCast.apply(x, self.low), *args[1:])

    def clear(self, *_: object) -> None:
        self.source, self.low = None, None


def share_attention_input_cast(model: torch.nn.Module) -> int:
    """Under CPU autocast, cast a BERT-style self-attention's input once for its three
    projections; returns how many attention modules were switched.

    Autocast casts an activation anew for every linear layer that reads it (only weights are
    cached), and each linear keeps its own copy for backward: the query, key and value
    projections keep three bf16 copies of the same [tokens, hidden] input. Cast once, they
    share one; each projection still has its own cast node in the graph, so gradients add up
    in fp32 as before and results are bitwise those of plain autocast. Without autocast (or
    without a graph) nothing changes. Switched: :data:`SELF_ATTENTION_MODULES`.
    """
    switched = 0
    for module in model.modules():
        if type(module).__name__ not in SELF_ATTENTION_MODULES or getattr(
            module, "_embtune_casts_once", False
        ):
            continue
        cast = _CastOnce()
        for name in ("query", "key", "value"):
            getattr(module, name).register_forward_pre_hook(cast)
        # The copy stays alive through what backward keeps, not through the hook.
        module.register_forward_hook(cast.clear)
        module._embtune_casts_once = True
        switched += 1
    return switched
