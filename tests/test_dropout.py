"""The fast CPU dropout paths compute what the model's own dropout computes."""

from __future__ import annotations

import copy

import pytest
import torch

from embtune.models.encoder import Encoder
from embtune.models.speedups.dropout import (
    FastDropout,
    dropout_attention,
    keep_mask,
    use_fast_cpu_dropout,
)
from tests.conftest import single_thread


def test_keep_mask_keeps_one_minus_p_and_is_reproducible() -> None:
    mask = keep_mask(123, (1000, 1000), 0.1)
    assert mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - 0.9) < 0.002
    assert torch.equal(mask, keep_mask(123, (1000, 1000), 0.1))
    assert not torch.equal(mask, keep_mask(124, (1000, 1000), 0.1))


def test_dropout_attention_gradients_match_finite_differences() -> None:
    q, k, v = (torch.randn(3, 2, 7, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., 5:] = False  # padding of the second sequence

    def attention(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(5)  # the same keep masks at every evaluation
        return dropout_attention(a, b, c, mask, 0.3, 0.5)

    assert torch.autograd.gradcheck(attention, (q, k, v))


def test_dropout_attention_is_softmax_attention_with_a_scaled_keep_mask() -> None:
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    bias = torch.zeros(2, 1, 1, 5)
    bias[0, ..., 4] = torch.finfo(torch.float32).min
    torch.manual_seed(0)
    ours = dropout_attention(q, k, v, bias, 0.25, 0.5)
    # Redraw the mask the function drew: its seed comes from torch's generator (2 rows = 1 chunk).
    torch.manual_seed(0)
    keep = keep_mask(int(torch.randint(0, 2**62, (1,)).item()), (2, 3, 5, 5), 0.25)
    probs = torch.softmax(q @ k.transpose(-1, -2) * 0.5 + bias, -1)
    expected = (probs * keep / 0.75) @ v
    assert (ours - expected).abs().max().item() < 1e-5
    with pytest.raises(AssertionError):  # the mask does drop something
        torch.testing.assert_close(ours, probs @ v)


def test_full_size_masks_padding_or_not_mask_what_they_say() -> None:
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    padding = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    padding[1, ..., 3:] = False
    causal = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 1, 5, 5)
    # [B, 1, L, L] as transformers builds it: a padding mask (kept as one row per sequence) and
    # one whose rows differ (kept whole).
    for mask in (padding.expand(2, 1, 5, 5).contiguous(), causal):
        torch.manual_seed(0)
        ours = dropout_attention(q, k, v, mask, 0.25, 0.5)
        torch.manual_seed(0)
        keep = keep_mask(int(torch.randint(0, 2**62, (1,)).item()), (2, 3, 5, 5), 0.25)
        bias = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        probs = torch.softmax(q @ k.transpose(-1, -2) * 0.5 + bias, -1)
        assert (ours - (probs * keep / 0.75) @ v).abs().max().item() < 1e-5


def test_fast_dropout_scales_kept_values_and_zeroes_the_rest() -> None:
    layer = FastDropout(0.2)
    x = torch.ones(200, 500, requires_grad=True)
    y = layer(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.01
    assert torch.allclose(y[kept], torch.tensor(1.25))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(sum)/dx = keep / (1 - p)
    layer.eval()
    assert torch.equal(layer(x), x)


def test_a_switched_model_computes_the_same_in_eval_and_is_seeded_in_training(
    tiny_model,
) -> None:
    with single_thread():
        plain = Encoder.from_pretrained(tiny_model, pooling="mean")
        fast = copy.deepcopy(plain)
        assert use_fast_cpu_dropout(fast.model)
        ids = torch.randint(1000, 2000, (4, 12))
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0
        plain.eval()
        fast.eval()
        assert torch.equal(plain(ids, mask), fast(ids, mask))
        fast.train()
        torch.manual_seed(1)
        first = fast(ids, mask)
        torch.manual_seed(1)
        again = fast(ids, mask)
        torch.manual_seed(2)
        other = fast(ids, mask)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert (first - plain(ids, mask)).abs().max().item() < 0.5  # same model, some units dropped


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_dropout_attention_in_bf16_draws_the_fp32_masks_and_agrees_to_bf16_rounding() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 10, 8, requires_grad=True) for _ in range(3))
    mask = torch.ones(3, 1, 1, 10, dtype=torch.bool)
    mask[1, ..., 7:] = False
    grad = torch.randn(3, 2, 10, 8)
    torch.manual_seed(5)
    full = dropout_attention(q, k, v, mask, 0.1)
    full.backward(grad)
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(5)
    half = dropout_attention(*low, mask, 0.1)
    half.backward(grad.bfloat16())
    assert half.dtype == torch.bfloat16 and all(t.grad.dtype == torch.bfloat16 for t in low)
    # The same keep masks: a dropped probability is zero in both.
    assert torch.equal(full == 0, half == 0)
    # bf16 keeps 8 bits of mantissa (relative rounding 2**-9 = 0.2%, a few of them per product).
    assert _relative(half, full) < 0.01
    for ours, theirs in zip(low, (q, k, v), strict=True):
        assert _relative(ours.grad, theirs.grad) < 0.02


def test_fast_dropout_in_bf16_uses_the_fp32_mask() -> None:
    layer = FastDropout(0.2)
    x = torch.randn(40, 50, requires_grad=True)
    torch.manual_seed(1)
    full = layer(x)
    full.sum().backward()
    low = x.detach().bfloat16().requires_grad_()
    torch.manual_seed(1)
    half = layer(low)
    half.float().sum().backward()
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, (x.detach() * (full != 0)).bfloat16() * torch.tensor(1.25).bfloat16())
    assert torch.equal(low.grad.float(), x.grad)  # 0 and 1.25 are exact in bf16
