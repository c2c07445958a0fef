"""Feed-forward blocks that recompute their activation in backward compute what they did."""

from __future__ import annotations

import copy

import torch

from embtune.activation_recompute import _ActivatedLinear, recompute_feed_forward_activations
from embtune.model import Encoder
from tests.conftest import single_thread


def test_activated_linear_gradients_match_finite_differences() -> None:
    h = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    act = torch.nn.GELU()
    assert torch.autograd.gradcheck(
        lambda a, w, b: _ActivatedLinear.apply(a, w, b, act), (h, weight, bias)
    )


def _step(encoder: Encoder, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Embeddings and the bytes autograd keeps for backward, then the backward pass."""
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(3)  # the same dropout masks for both models
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        emb = encoder(ids, mask)
    emb.square().sum().backward()
    return emb.detach(), sum(kept.values())


def test_a_switched_model_computes_the_same_and_keeps_less(tiny_model) -> None:
    with single_thread():
        plain = Encoder.from_pretrained(tiny_model, pooling="mean")
        switched = copy.deepcopy(plain)
        assert recompute_feed_forward_activations(switched.model) == 2  # one per layer
        assert recompute_feed_forward_activations(switched.model) == 0  # already switched
        ids = torch.randint(1000, 2000, (4, 12))
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0
        plain.eval()
        switched.eval()
        assert torch.equal(plain(ids, mask), switched(ids, mask))
        plain.train()
        switched.train()
        emb, plain_bytes = _step(plain, ids, mask)
        same_emb, switched_bytes = _step(switched, ids, mask)
    assert torch.equal(emb, same_emb)
    for (name, a), (_, b) in zip(
        plain.named_parameters(), switched.named_parameters(), strict=True
    ):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)
    # One [tokens, intermediate] fp32 tensor less per layer: 2 layers x 48 tokens x 64.
    assert plain_bytes - switched_bytes >= 2 * 4 * 12 * 64 * 4
    assert plain.state_dict().keys() == switched.state_dict().keys()


def test_models_of_other_architectures_are_left_alone() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    assert recompute_feed_forward_activations(model) == 0
