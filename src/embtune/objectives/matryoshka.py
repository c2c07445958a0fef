"""Matryoshka dimensions: an objective applied to every leading slice of the embeddings
(Kusupati et al. 2022; sentence-transformers' MatryoshkaLoss, FlagEmbedding's ``use_mrl``), so
that the first 64 components of a 384-wide embedding are an embedding on their own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from embtune.data.batching import GroupLayout
from embtune.models.encoder import truncate_embeddings
from embtune.objectives.base import Objective, ObjectiveOutput

# Signal keys of the wrapper itself (not of the inner objective): each dimension's loss summed
# over steps and processes, and the count of those sums.
_LOSS_KEY = "matryoshka_loss_dim"
_STEPS_KEY = "matryoshka_steps"


class Matryoshka:
    r"""``sum_d w_d * L(trunc_d(r))``: the inner objective at each dimension, weighted.

    .. math::

        \mathcal{L} = \sum_{d \in D} w_d \, \mathcal{L}_{inner}\big(\{\,
        \mathrm{trunc}_d(r_{part})\,\}\big), \qquad
        \mathrm{trunc}_d(r) = \frac{r_{1..d}}{\lVert r_{1..d} \rVert}

    Every representation (``queries`` [B, H], ``passages`` [P, H], whatever parts the inner
    objective reads) is cut to its first ``d`` components and, when ``normalize``, L2-normalized
    again, so the inner objective's inner product is the cosine at that size; the layout is
    passed on unchanged. As in sentence-transformers, the weighted losses are added, not
    averaged. Use it when the model should also serve smaller embeddings (less memory and
    faster search): ``--matryoshka-dims 384 256 128 64``.

    The inner objective can be anything (InfoNCE, distillation, a :class:`WeightedSum`): it
    only sees representations and the layout, so the cached and cross-device strategies work
    unchanged. Terms: ``dim<d>`` per dimension, the inner loss at ``d`` (unweighted). Signals:
    the inner objective's at the largest dimension under their usual names (``accuracy``,
    ``chance_loss``, ...), the other dimensions' prefixed ``dim<d>_`` (``dim64_accuracy``);
    each dimension's record gets its own mean loss, so ``dim64_loss_over_chance`` is the loss
    at 64 over the chance level.
    """

    name = "matryoshka"

    def __init__(
        self,
        inner: Objective,
        dims: Sequence[int],
        weights: Sequence[float],
        normalize: bool,
    ) -> None:
        if not dims or len(weights) != len(dims) or len(set(dims)) != len(dims):
            raise ValueError(f"Matryoshka needs distinct dims, one weight each: {dims} {weights}")
        self.inner = inner
        self.dims = [int(d) for d in dims]
        self.weights = [float(w) for w in weights]
        self.normalize = normalize
        self.largest = max(self.dims)
        # The largest dimension's signals keep their names; it comes first in the record.
        order = [self.largest, *(d for d in self.dims if d != self.largest)]
        self.prefixes = {d: "" if d == self.largest else f"dim{d}_" for d in order}

    def __call__(
        self, representations: Mapping[str, torch.Tensor], layout: GroupLayout
    ) -> ObjectiveOutput:
        """The inner objective on the representations truncated to each dimension."""
        width = min(rep.shape[-1] for rep in representations.values())
        if self.largest > width:
            raise ValueError(f"Matryoshka dimension {self.largest} exceeds the width {width}")
        outputs = [
            self.inner(
                {
                    name: truncate_embeddings(rep, d, self.normalize)
                    for name, rep in representations.items()
                },
                layout,
            )
            for d in self.dims
        ]
        loss = sum(
            (w * out.loss for w, out in zip(self.weights, outputs, strict=True)),
            torch.zeros((), device=outputs[0].loss.device),
        )
        terms = {f"dim{d}": out.loss for d, out in zip(self.dims, outputs, strict=True)}

        def signal_sums() -> dict[str, float]:
            losses = torch.stack([out.loss.detach().float() for out in outputs]).tolist()
            merged: dict[str, float] = {_STEPS_KEY: 1.0}
            for d, out, value in zip(self.dims, outputs, losses, strict=True):
                merged[f"{_LOSS_KEY}{d}"] = value
                merged.update({self.prefixes[d] + k: v for k, v in out.signal_sums().items()})
            return merged

        return ObjectiveOutput(loss, terms, signal_sums, dict(zip(self.dims, outputs, strict=True)))

    def window_record(self, sums: Mapping[str, float], loss: float) -> dict[str, float | None]:
        """The inner record at each dimension (largest first), with that dimension's loss."""
        steps = sums.get(_STEPS_KEY)
        others = tuple(prefix for prefix in self.prefixes.values() if prefix)
        record: dict[str, float | None] = {}
        for d, prefix in self.prefixes.items():
            if prefix:
                own = {k[len(prefix) :]: v for k, v in sums.items() if k.startswith(prefix)}
            else:
                mine = (*others, _LOSS_KEY, _STEPS_KEY)
                own = {k: v for k, v in sums.items() if not k.startswith(mine)}
            dim_loss = sums[f"{_LOSS_KEY}{d}"] / steps if steps else loss
            record.update(
                {prefix + k: v for k, v in self.inner.window_record(own, dim_loss).items()}
            )
        return record
