"""Activations recomputed in backward (feed-forward, LayerNorm outputs) give the plain results."""

from __future__ import annotations

import copy
import gc
import warnings

import torch

from embtune.models.encoder import Encoder
from embtune.models.speedups import activation_recompute
from embtune.models.speedups.activation_recompute import (
    _ActivatedLinear,
    recompute_feed_forward_activations,
    recompute_norm_outputs,
    share_attention_input_cast,
)
from tests.conftest import single_thread


def test_activated_linear_gradients_match_finite_differences(monkeypatch) -> None:
    monkeypatch.setattr(activation_recompute, "_ROWS", 4)  # 15 tokens: 4 blocks, one partial
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


def assert_same_gradients(plain: torch.nn.Module, switched: torch.nn.Module) -> None:
    """Every parameter's gradient bitwise equal in the two models."""
    for (name, a), (_, b) in zip(
        plain.named_parameters(), switched.named_parameters(), strict=True
    ):
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad), name


def test_a_switched_model_computes_the_same_and_keeps_less(tiny_model, monkeypatch) -> None:
    monkeypatch.setattr(activation_recompute, "_ROWS", 5)  # 48 tokens: 10 blocks
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
        # Blocks change only the order of the matrix products' sums.
        torch.testing.assert_close(plain(ids, mask), switched(ids, mask), rtol=1e-6, atol=1e-6)
        plain.train()
        switched.train()
        emb, plain_bytes = _step(plain, ids, mask)
        same_emb, switched_bytes = _step(switched, ids, mask)
    torch.testing.assert_close(emb, same_emb, rtol=1e-6, atol=1e-6)
    for (name, a), (_, b) in zip(
        plain.named_parameters(), switched.named_parameters(), strict=True
    ):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    # One [tokens, intermediate] fp32 tensor less per layer: 2 layers x 48 tokens x 64.
    assert plain_bytes - switched_bytes >= 2 * 4 * 12 * 64 * 4
    assert plain.state_dict().keys() == switched.state_dict().keys()


def test_models_of_other_architectures_are_left_alone() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    assert recompute_feed_forward_activations(model) == 0


def test_norm_outputs_are_recomputed_with_the_same_gradients_and_less_kept(
    tiny_model, monkeypatch
) -> None:
    # Inside the model our hooks replace the outer ones of _step: count what they keep.
    kept: dict[int, int] = {}
    pack = activation_recompute._NormOutputs.pack

    def counting_pack(self: object, saved: torch.Tensor) -> object:
        packed = pack(self, saved)
        if isinstance(packed, torch.Tensor):
            kept[packed.untyped_storage().data_ptr()] = packed.untyped_storage().nbytes()
        return packed

    monkeypatch.setattr(activation_recompute._NormOutputs, "pack", counting_pack)
    with single_thread():
        plain = Encoder.from_pretrained(tiny_model, pooling="mean")
        switched = copy.deepcopy(plain)
        # Embeddings + 2 per layer; a second call changes nothing.
        assert recompute_norm_outputs(switched.model) == 5
        assert recompute_norm_outputs(switched.model) == 0
        ids = torch.randint(1000, 2000, (4, 12))
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0
        plain.train()
        switched.train()
        emb, plain_bytes = _step(plain, ids, mask)
        same_emb, outside_bytes = _step(switched, ids, mask)
    switched_bytes = outside_bytes + sum(kept.values())
    assert torch.equal(emb, same_emb)
    assert_same_gradients(plain, switched)
    # Per layer, the attention block's and the feed-forward block's norm outputs: 2 x 2 x
    # [48 tokens, 32] fp32 (the embeddings' norm output goes through dropout first).
    assert plain_bytes - switched_bytes >= 2 * 2 * 48 * 32 * 4


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on deprecated lazy torch attributes
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


def test_norm_recompute_leaves_nothing_alive_after_a_step(tiny_model) -> None:
    # BERT's pooler runs in forward but never in backward: what its ops keep must still go.
    with single_thread():
        encoder = Encoder.from_pretrained(tiny_model, pooling="mean")
        recompute_norm_outputs(encoder.model)
        encoder.train()
        ids = torch.randint(1000, 2000, (4, 12))
        counts = []
        for _ in range(3):
            encoder(ids, torch.ones_like(ids)).sum().backward()
            counts.append(_live_tensors())
    assert counts[0] == counts[1] == counts[2]


def test_activated_linear_under_bf16_autocast_is_autocasts_linear() -> None:
    torch.manual_seed(0)
    linear, act = torch.nn.Linear(16, 8), torch.nn.GELU()
    h = torch.randn(20, 16, requires_grad=True)
    grad = torch.randn(20, 8)
    results = []
    for ours in (True, False):
        linear.zero_grad()
        h.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = h * 1  # a bf16 input as the first dense layer gives it
            low = low.bfloat16()
            if ours:
                out = _ActivatedLinear.apply(low, linear.weight, linear.bias, act)
            else:
                out = linear(act(low))
        out.float().backward(grad)
        results.append((out, h.grad.clone(), linear.weight.grad.clone(), linear.bias.grad.clone()))
    (out, grad_h, grad_w, grad_b), (ref, ref_h, ref_w, ref_b) = results
    assert out.dtype == torch.bfloat16 and grad_w.dtype == torch.float32
    assert torch.equal(out, ref)
    assert torch.equal(grad_h, ref_h) and torch.equal(grad_w, ref_w)
    # The bias gradient is summed in fp32 here, in bf16 by autocast's linear.
    torch.testing.assert_close(grad_b, ref_b, rtol=1e-2, atol=1e-2)


def test_an_attention_input_cast_once_gives_autocasts_results_and_keeps_less(tiny_model) -> None:
    with single_thread():
        plain = Encoder.from_pretrained(tiny_model, pooling="mean")
        switched = copy.deepcopy(plain)
        assert share_attention_input_cast(switched.model) == 2  # one per layer
        assert share_attention_input_cast(switched.model) == 0
        ids = torch.randint(1000, 2000, (4, 12))
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0
        kept = []
        for encoder in (plain, switched):
            encoder.eval()  # no dropout: both runs compute the same function
            with torch.autocast("cpu", dtype=torch.bfloat16):
                kept.append(_step(encoder, ids, mask))
        # Without autocast the hook does nothing.
        torch.testing.assert_close(plain(ids, mask), switched(ids, mask), rtol=0, atol=0)
    (emb, plain_bytes), (same_emb, switched_bytes) = kept
    assert torch.equal(emb, same_emb)
    assert_same_gradients(plain, switched)
    # Two bf16 [48 tokens, 32] copies less per layer (key's and value's).
    assert plain_bytes - switched_bytes >= 2 * 2 * 48 * 32 * 2


def test_a_bf16_cpu_run_gets_the_fast_paths_and_its_step_agrees_with_fp32(tiny_model) -> None:
    from embtune.config import TrainConfig
    from embtune.models.speedups.for_training import apply_training_speedups

    config = TrainConfig(model="m", train_data=["t.jsonl"], output_dir="o", bf16=True)
    grads = []
    with single_thread():
        for bf16 in (False, True):
            encoder = Encoder.from_pretrained(tiny_model, pooling="mean")
            apply_training_speedups(encoder.model, config, torch.device("cpu"))
            layer = encoder.model.encoder.layer[0]
            assert "forward" in vars(layer.output.dense)  # the feed-forward recompute
            assert layer.attention.self._embtune_casts_once
            encoder.train()
            ids = torch.randint(1000, 2000, (4, 12), generator=torch.Generator().manual_seed(0))
            torch.manual_seed(3)  # the same dropout masks in both precisions
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                emb = encoder(ids, torch.ones_like(ids))
            direction = torch.randn(emb.shape[-1], generator=torch.Generator().manual_seed(1))
            (emb.float() @ direction).sin().sum().backward()
            grads.append(layer.intermediate.dense.weight.grad)
    full, half = grads
    assert torch.isfinite(half).all()
    # Measured 0.24% apart; other dropout masks would be ~100% apart.
    assert ((half - full).norm() / full.norm()).item() < 0.02
