"""The one definition of every choice list: the CLI, YAML, `inspect` and the model read them here.

Kept free of heavy imports (no torch, no transformers): `embtune --help` builds every parser
from these lists without waiting for a library to load.
"""

from __future__ import annotations

POOLING_MODES = ("cls", "mean", "last_token")
"""How token states become one vector (models/encoder.py ``pool``)."""

NEGATIVE_FILL_POLICIES = ("corpus", "repeat", "shrink")
"""What a row with too few negatives gets (data/groups.py ``GroupSampler``)."""

NEGATIVE_SAMPLING_POLICIES = ("random", "cycle")
"""Which of a row's negatives a step uses (data/groups.py ``GroupSampler``)."""

PADDING_SIDES = ("right", "left")
"""Where a batch is padded (data/batching.py ``pad_tokens``; decoder models often pad left)."""

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
"""Attention kernels passed to transformers (``attn_implementation``)."""

ENCODE_PRECISIONS = ("fp32", "bf16")
"""Precision of evaluation and mining encodes (models/encoder.py ``Encoder.encode_tokens``)."""

KD_LOSS_TYPES = ("kl_div", "m3_kd_loss", "margin_mse")
"""Distillation losses of ``--kd-loss-type`` (objectives/distillation.py)."""

TEACHER_KINDS = ("auto", "cross-encoder", "bi-encoder")
"""What `embtune score --teacher-kind` accepts (scoring/teachers.py ``teacher_kind``)."""

MODEL_KINDS = ("bi-encoder", "cross-encoder")
"""What `embtune train --model-kind` trains (embtune/kinds: one module per kind)."""

RERANKER_LOSSES = ("listwise", "pointwise")
"""A cross-encoder's hard objective, ``--reranker-loss`` (objectives/reranking.py)."""

FSDP_MODES = ("off", "full_shard", "shard_grad_op")
"""Sharding of ``--fsdp`` (training/sharding.py ``fsdp_plugin``)."""

ROW_PROMPT_RULES = ("flagembedding", "always", "never")
"""When a training row's own ``prompt`` replaces the query instruction (``--row-prompts``,
data/pipeline.py ``row_prompts_apply``)."""

REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")
"""Where `embtune train --report-to` sends the log (training/trackers.py; HF Trainer's name)."""
