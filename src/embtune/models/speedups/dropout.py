"""Dropout for CPU training, computed the way the model defines it but at a fraction of the cost.

Why this is hand-written: in training mode a BERT-style encoder applies dropout to its attention
probabilities. PyTorch's fused CPU attention kernel has no dropout, so
``scaled_dot_product_attention(dropout_p > 0)`` falls back to the unfused "math" path: it keeps
the full [batch, heads, length, length] probability matrix, a dropped copy and a mask per layer
for the backward pass, and draws each random number with a scalar Mersenne Twister. Both anchors
(FlagEmbedding, sentence-transformers) pay that cost. Replacing it took one all-MiniLM-L6-v2
training step (batch 16, group 4, 256 tokens, 2 quiet cores) from 13.3 s to 9.9 s and its
peak resident memory from 8.2 to 4.4 GiB (docs/performance.md).

Here the same computation (softmax(QK^T / sqrt(d) + mask), Bernoulli(1 - p) keep mask scaled by
1 / (1 - p), times V) runs a few sequences at a time, so the probabilities stay in cache and are
never kept: the backward pass recomputes them (as FlashAttention does) from Q and K; the keep
mask is kept packed to one bit per probability (6 MiB per layer at 64 x 256 tokens). Random
bits come from NumPy's PCG64 generator seeded from torch's generator, so runs stay reproducible
and resumable (torch's RNG state is checkpointed); the keep decision compares 16-bit random
integers, so the dropout probability is p to within 1/65536. Hidden-state dropout uses the same
generator and packed masks (:class:`FastDropout`).

In bf16 autocast (``--bf16`` on a CPU with native bf16) the same path takes bf16 q, k, v,
keeps them (half the memory) and computes in fp32, as the math path does: the [L, L] work is
elementwise, where bf16 saves little, and converting [L, L] tensors to and from bf16 took 37% of
a profiled bf16 training step when the products there ran in bf16. Without this path, dropout
in bf16 would again take the unfused math path, which keeps the [L, L] matrices (measured: bf16
training slower than fp32 at twice its memory, docs/performance.md).

Everything else (GPU, fp16, inference, causal or grouped-query attention) goes to the
model's usual SDPA kernel: this path only replaces what is slow on CPU.
"""

from __future__ import annotations

import numpy as np
import torch

ATTENTION_NAME = "embtune_cpu_dropout"
# fp32, and bf16 as autocast produces it on a CPU.
FAST_DTYPES = (torch.float32, torch.bfloat16)
# Rows of [heads, L, L] handled at once: 2 x 12 heads x 256 x 256 fp32 is 6 MiB, inside L3.
_SEQUENCES_PER_CHUNK = 2


def _seed() -> int:
    """A seed drawn from torch's default generator (so checkpoints restore it)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def _keep_bits(seed: int, count: int, p: float) -> np.ndarray:
    # Keep when a 16-bit random number is >= round(p * 65536). Its high byte alone decides
    # unless it equals the threshold's high byte (1 time in 256): only then is a low byte drawn,
    # so the same decision costs about 1 random byte instead of 2.
    high, low = divmod(int(round(p * 65536)), 256)
    generator = np.random.Generator(np.random.PCG64(seed))
    first = np.frombuffer(generator.bytes(count), dtype=np.uint8)
    keep = first > high
    undecided = np.flatnonzero(first == high)
    keep[undecided] = np.frombuffer(generator.bytes(len(undecided)), dtype=np.uint8) >= low
    return keep


def _as_weights(
    keep: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    # Multiplying by float 1.0 / 0.0 is several times faster on CPU than masked_fill with bools.
    if dtype == torch.float32:
        return torch.from_numpy(keep.astype(np.float32)).view(shape)
    return torch.from_numpy(keep).view(shape).to(dtype)


def keep_mask(seed: int, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """Bool tensor, True with probability 1 - p (to within 1/65536), reproducible from ``seed``."""
    return torch.from_numpy(_keep_bits(seed, int(np.prod(shape)), p)).view(shape)


class _DropoutAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) with dropout, times v; probabilities recomputed in backward.

    Of size [L, L] only the keep masks are kept between forward and backward, packed 8 to a byte
    (unpacking them is ~8x cheaper than drawing them again). The output is laid out
    [B, L, H, d] (returned as a [B, H, L, d] view), the layout the model's next layer reads, so
    it shares storage with that layer's saved input.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, p: float, scale: float, seed: int):  # noqa: ANN001, ANN205
        with torch.autocast("cpu", enabled=False):
            out, ctx.packed = _attend(*_widened(q, k, v), bias, p, scale, seed)
        out = out.to(q.dtype)  # the layout is preserved
        ctx.save_for_backward(q, k, v, bias, out)  # bf16 inputs are kept as bf16
        ctx.p, ctx.scale = p, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        q, k, v, bias, out = ctx.saved_tensors
        low = q.dtype
        q, k, v, out, grad_out = _widened(q, k, v, out, grad_out)
        p, scale = ctx.p, ctx.scale
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype) for t in (q, k, v))
        inv_keep = 1.0 / (1.0 - p)
        # sum_j P_ij dP_ij = dO_i . O_i: a row sum over [L, d] instead of over [L, L].
        row_dot = (grad_out * out).sum(-1, keepdim=True)
        for chunk, start in enumerate(range(0, q.shape[0], _SEQUENCES_PER_CHUNK)):
            rows = slice(start, start + _SEQUENCES_PER_CHUNK)
            probs = _probabilities(q[rows], k[rows], None if bias is None else bias[rows], scale)
            keep = np.unpackbits(ctx.packed[chunk], count=probs.numel())
            keep = _as_weights(keep, tuple(probs.shape))
            torch.matmul((probs * keep).transpose(-1, -2), grad_out[rows], out=dv[rows])
            grad_probs = torch.matmul(grad_out[rows], v[rows].transpose(-1, -2))
            grad_probs.mul_(keep).mul_(inv_keep)
            grad_scores = grad_probs.sub_(row_dot[rows]).mul_(probs)
            torch.matmul(grad_scores, k[rows], out=dq[rows])
            torch.matmul(grad_scores.transpose(-1, -2), q[rows], out=dk[rows])
        dv.mul_(inv_keep)
        dq.mul_(scale)
        dk.mul_(scale)
        return dq.to(low), dk.to(low), dv.to(low), None, None, None, None


def _widened(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """bf16 tensors as fp32, others as they are: the attention computes in fp32 (its [L, L]
    work is elementwise; see the module docstring)."""
    return tuple(t.to(_computed_in(t.dtype)) for t in tensors)


def _attend(q, k, v, bias, p: float, scale: float, seed: int):  # noqa: ANN001, ANN202
    batch, heads, length, dim = q.shape
    out = q.new_empty(batch, length, heads, dim).transpose(1, 2)
    packed = []
    for start in range(0, batch, _SEQUENCES_PER_CHUNK):
        rows = slice(start, start + _SEQUENCES_PER_CHUNK)
        probs = _probabilities(q[rows], k[rows], None if bias is None else bias[rows], scale)
        keep = _keep_bits(seed + start, probs.numel(), p)
        packed.append(np.packbits(keep))
        probs.mul_(_as_weights(keep, tuple(probs.shape)))
        out[rows] = torch.matmul(probs, v[rows])
    out.mul_(1.0 / (1.0 - p))
    return out, packed


def _probabilities(
    q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:
    scores = torch.matmul(q * scale, k.transpose(-1, -2))
    if bias is not None:
        scores += bias
    return torch.softmax(scores, dim=-1)


def _computed_in(dtype: torch.dtype) -> torch.dtype:
    """The dtype the attention computes in for inputs of ``dtype``: fp32 for bf16."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


def dropout_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor | None,
    p: float,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention with dropout on the probabilities; [B, H, L, d] in, [B, H, L, d] out.

    ``attention_mask``: None, a bool mask (True = attend) or an additive float mask, broadcastable
    to [B, H, L, L] (what transformers' SDPA mask function builds).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bias = None
    if attention_mask is not None:
        rows = attention_mask[..., :1, :]
        if attention_mask.dim() == 4 and torch.equal(
            rows.expand_as(attention_mask), attention_mask
        ):
            # A padding mask repeats one row for every query: one row per sequence is enough
            # (the bias is kept for the backward pass: [B, L, L] per layer otherwise).
            attention_mask = rows
        # In the scores' dtype (fp32 for bf16 q): it is added to them in _probabilities.
        wide = _computed_in(q.dtype)
        if attention_mask.dtype == torch.bool:
            bias = torch.zeros(attention_mask.shape, dtype=wide)
            bias.masked_fill_(~attention_mask, torch.finfo(wide).min)
        else:
            bias = attention_mask.to(wide)
        bias = bias.expand(q.shape[0], *bias.shape[1:]).contiguous()
    return _DropoutAttention.apply(q, k, v, bias, p, scale, _seed())


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface entry: our CPU dropout path, else the model's SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    simple = (
        # With or without a graph: the cached loss's first pass (no graph) and its replay (with
        # one) must draw the same dropout.
        dropout > 0
        and query.device.type == "cpu"
        and query.dtype in FAST_DTYPES
        and not is_causal
        and not getattr(module, "is_causal", False)
        and getattr(module, "num_key_value_groups", 1) == 1
        and query.shape == key.shape == value.shape
        and not any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "sinks"))
    )
    if not simple:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    out = dropout_attention(query, key, value, attention_mask, dropout, scaling)
    return out.transpose(1, 2).contiguous(), None


class _FastDropoutFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float, seed: int):  # noqa: ANN001, ANN205
        keep = _keep_bits(seed, x.numel(), p)
        ctx.packed, ctx.shape, ctx.scale = np.packbits(keep), tuple(x.shape), 1.0 / (1.0 - p)
        # The weights' buffer becomes the output: no second [tokens, hidden] temporary.
        return _as_weights(keep, ctx.shape, x.dtype).mul_(x).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        keep = np.unpackbits(ctx.packed, count=grad.numel())
        return _as_weights(keep, ctx.shape, grad.dtype).mul_(grad).mul_(ctx.scale), None, None


class FastDropout(torch.nn.Dropout):
    """``nn.Dropout`` whose CPU training path (fp32 or bf16) draws its mask as :func:`keep_mask`
    does and keeps it packed to one bit per element for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            not self.training
            or self.p == 0
            or x.device.type != "cpu"
            or x.dtype not in FAST_DTYPES
            or self.inplace
        ):
            return super().forward(x)
        if self.p >= 1:
            return torch.zeros_like(x)
        return _FastDropoutFunction.apply(x, self.p, _seed())


def register() -> None:
    """Make ``attn_implementation=ATTENTION_NAME`` known to transformers (mask format: SDPA's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, attention_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


def use_fast_cpu_dropout(model: torch.nn.Module) -> bool:
    """Switch a loaded Hugging Face model to the fast CPU dropout paths; True when it could.

    Only models on the SDPA attention interface are switched (their attention function is looked
    up by name at each call); ``nn.Dropout`` modules become :class:`FastDropout` (same ``p``, no
    parameters, so saved weights do not change).
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    model.set_attn_implementation(ATTENTION_NAME)
    for module in model.modules():
        if type(module) is torch.nn.Dropout:
            module.__class__ = FastDropout
    return True
