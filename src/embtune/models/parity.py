"""Does embtune embed a model the way the model's own configuration does? (`embtune check-model`)

A model that ships a sentence-transformers configuration says how it embeds: its pooling
(``1_Pooling/config.json``), whether it normalizes (a ``Normalize`` module), its prompts
(``config_sentence_transformers.json``), and, in its tokenizer, the padding side and whether
every text ends with EOS. The most frequent silent failure with decoder embedders is a model
used with other settings than those (FlagEmbedding #1238 and #1326, sentence-transformers
#3208 and #2836): a cls-pooled Qwen3-Embedding, a missing instruction, no EOS where the model
was trained with one. This module compares embtune's settings for a model with the model's
own, setting by setting, and, where sentence-transformers is installed, the embeddings of a
few probe texts as both libraries compute them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

import torch

from embtune.errors import UsageError
from embtune.models.encoder import Encoder, EncoderSettings, model_file, saved_settings
from embtune.models.special_tokens import appends_eos

# Modules embtune's Encoder runs; any other in a model's modules.json changes its embeddings.
KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")
PROBE_QUERIES = ["what is a protein?", "how do cells divide"]
PROBE_PASSAGES = [
    "Proteins are large molecules made of amino acids.",
    "Cells divide by mitosis: one cell becomes two, each with a full copy of the genome.",
]
TOLERANCE = 1e-4  # largest absolute difference of normalized embeddings that counts as equal


@dataclass
class Difference:
    """One setting in which embtune's use of a model differs from the model's own."""

    setting: str
    ours: str
    model_own: str
    refuses: bool = True  # False: reported, not a reason to stop (e.g. an instruction added)


@dataclass
class ParityReport:
    """What `embtune check-model` reports (and `train` / `eval` check before they start)."""

    model: str
    has_own_config: bool
    differences: list[Difference] = field(default_factory=list)
    max_abs_difference: float | None = None  # against sentence-transformers' embeddings
    compared_with: str = ""  # what the embeddings were compared with, or why they were not

    @property
    def blocking(self) -> list[Difference]:
        """The differences that stop a run (unless it is told to go on)."""
        return [d for d in self.differences if d.refuses]

    @property
    def embeddings_differ(self) -> bool:
        """True when the embeddings were compared and differ by more than :data:`TOLERANCE`."""
        return self.max_abs_difference is not None and self.max_abs_difference > TOLERANCE

    @property
    def ok(self) -> bool:
        """True when nothing blocking differs and the embeddings agree (where compared)."""
        return not self.blocking and not self.embeddings_differ

    def lines(self) -> list[str]:
        """The report as printed: one line per difference, then the embeddings' comparison."""
        if not self.has_own_config:
            missing = "no sentence-transformers configuration (modules.json)"
            return [f"{self.model}: {missing}: nothing to compare embtune's settings with"]
        out = [
            f"{d.setting}: embtune {d.ours}, the model's own {d.model_own}"
            + ("" if d.refuses else " (noted, not refused)")
            for d in self.differences
        ]
        if self.max_abs_difference is not None:
            verdict = "differ" if self.embeddings_differ else "agree"
            out.append(
                f"embeddings {verdict} with {self.compared_with}: largest difference "
                f"{self.max_abs_difference:.2e} over {len(PROBE_QUERIES) + len(PROBE_PASSAGES)} "
                f"probe texts (tolerance {TOLERANCE:g})"
            )
        elif self.compared_with:
            out.append(f"embeddings not compared: {self.compared_with}")
        if not self.differences:
            out.insert(0, "settings: the same as the model's own")
        return out

    def to_json(self) -> dict:
        """The report as a JSON object (`check-model --json`)."""
        return {**asdict(self), "ok": self.ok}


def check_settings(
    settings: EncoderSettings,
    padding_side: str | None,
    model: str,
    append_eos_token: bool | None,
) -> ParityReport:
    """Compare the settings embtune embeds ``model`` with (``settings``, batches padded on
    ``padding_side``, EOS appended or not: None for either leaves it to the tokenizer, so it
    cannot differ) against the ones the model ships; nothing is embedded, no weights are
    loaded."""
    modules = _modules(model)
    if modules is None:
        return ParityReport(model=model, has_own_config=False)
    own = saved_settings(model, own_file=False)
    tokenizer = _own_tokenizer(model)
    report = ParityReport(model=model, has_own_config=True)
    unknown = [t for t in modules if t.rsplit(".", 1)[-1] not in KNOWN_MODULES]
    if unknown:
        report.differences.append(
            Difference("modules", "Transformer, Pooling, Normalize", ", ".join(modules))
        )
    own_eos = None if tokenizer is None else _on_off(appends_eos(tokenizer))
    our_eos = own_eos if append_eos_token is None else _on_off(append_eos_token)
    pairs = [
        ("pooling", settings.pooling, own.pooling),
        ("normalization", _on_off(settings.normalize), _on_off(own.normalize)),
        ("EOS at the end of every text", our_eos, own_eos),
    ]
    for setting, mine, theirs in pairs:
        if theirs is not None and mine != theirs:
            report.differences.append(Difference(setting, mine, theirs))
    for setting, mine, theirs in (
        ("query instruction", settings.query_instruction, own.query_instruction),
        ("passage instruction", settings.passage_instruction, own.passage_instruction),
    ):
        if mine != theirs:
            # Adding an instruction to a model that has none is a training choice; dropping or
            # changing the one it ships is the mismatch.
            report.differences.append(Difference(setting, repr(mine), repr(theirs), bool(theirs)))
    side = None if tokenizer is None else tokenizer.padding_side
    if side and padding_side and side != padding_side:
        # Pooling reads the attention mask, so the side changes rounding only; the embedding
        # comparison (check_model) shows by how much.
        report.differences.append(Difference("padding side", padding_side, side, refuses=False))
    return report


def refuse_mismatch(report: ParityReport, option: str) -> None:
    """Stop with every blocking difference of ``report`` in one message, naming ``option``
    (the flag that goes on anyway)."""
    if report.ok:
        return
    what = "; ".join(report.lines())
    raise UsageError(
        f"{report.model} would be embedded differently from its own sentence-transformers "
        f"configuration: {what}. Give the model's own settings, or {option} to go on "
        "(`embtune check-model` shows the comparison)"
    )


def check_model(encoder: Encoder, model: str, compare_embeddings: bool = True) -> ParityReport:
    """:func:`check_settings`, and the probe texts' embeddings from ``encoder`` against the
    model's own sentence-transformers ones (when it is installed and the model has a config)."""
    settings = encoder.settings
    report = check_settings(
        settings, encoder.tokenizer.padding_side, model, settings.append_eos_token
    )
    if not report.has_own_config or not compare_embeddings:
        return report
    try:
        import sentence_transformers
        from sentence_transformers import SentenceTransformer
    except ImportError:
        report.compared_with = "sentence-transformers is not installed (pip install it to compare)"
        return report
    # Its loading message and progress bars would drown the report's few lines.
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    theirs = SentenceTransformer(model, device=str(encoder.device))
    quiet = {"show_progress_bar": False}
    prompts = getattr(theirs, "prompts", {}) or {}
    query_prompt = "query" if prompts.get("query") else None
    passage_prompt = "document" if prompts.get("document") else None
    with torch.inference_mode():
        ours = torch.cat(
            [
                encoder.encode_queries(PROBE_QUERIES),
                encoder.encode_passages(PROBE_PASSAGES),
            ]
        )
        other = torch.cat(
            [
                torch.as_tensor(theirs.encode(PROBE_QUERIES, prompt_name=query_prompt, **quiet)),
                torch.as_tensor(theirs.encode(PROBE_PASSAGES, prompt_name=passage_prompt, **quiet)),
            ]
        ).float()
    report.max_abs_difference = float((ours - other).abs().max())
    report.compared_with = f"sentence-transformers {sentence_transformers.__version__}"
    return report


def _modules(model: str) -> list[str] | None:
    path = model_file(model, "modules.json")
    if path is None:
        return None
    try:
        modules = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(modules, list):
        return None
    return [str(m.get("type", "")) for m in modules if isinstance(m, dict)]


def _on_off(value: bool) -> str:
    return "on" if value else "off"


def _own_tokenizer(model: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError):
        return None
