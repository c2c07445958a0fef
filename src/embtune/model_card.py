"""The model card: README.md in a saved model folder, as sentence-transformers writes one.

:func:`card_text` turns plain facts (:class:`CardFacts`, filled by training/card_facts.py)
into the card: YAML front matter for the Hugging Face Hub (huggingface_hub's
``ModelCardData``), what the model is and how it embeds or scores, the training data, the
negatives budget, the options, the dev (and, when known, test) metrics, and how to load it in
sentence-transformers, transformers and FlagEmbedding with the settings it was trained with.
:func:`card_record` is the same content as data, for train_summary.json.

The card states only what the run measured: a figure the facts lack is left out, never
estimated; a test set the run did not evaluate is said to be unmeasured.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

README_FILE = "README.md"

# Metric columns in this order (then any other the evaluation reported, by name).
_METRIC_ORDER = ("ndcg", "mrr", "recall", "map")
_DIM_SUFFIX = re.compile(r"_dim(\d+)$")
# Dev evaluations shown in the card's table at most; all are in card_record / train_log.jsonl.
_SHOWN_EVALUATIONS = 8


@dataclass
class DataSummary:
    """What the run trained and was evaluated on."""

    train_files: list[str]  # --train-data as given
    rows: int  # training queries (after a --dev-fraction hold-out, bad rows left out)
    passages: int  # distinct passages the rows and the corpus fill draw from
    rejected_rows: int | None = None  # --skip-bad-rows: rows left out
    dev_source: str | None = None  # where the dev set came from, in words
    dev_queries: int | None = None
    dev_passages: int | None = None


@dataclass
class Evaluation:
    """One evaluation: its step (0 = the base model, before training) and metrics by name
    (``ndcg@10``, ``ndcg@10_dim64``, ...)."""

    step: int
    metrics: dict[str, float]


@dataclass
class CardFacts:
    """Everything a card says, as plain data (what the run measured and was set to)."""

    kind: str  # "bi-encoder" or "cross-encoder"
    model_id: str  # how the card's examples load the model: a Hub repository or a folder
    base_model: str  # --model as given
    base_model_on_hub: bool  # True when base_model names a Hub repository (not a folder)
    settings: dict[str, object]  # the saved EncoderSettings / RerankerSettings
    data: DataSummary
    budget_lines: list[str]  # NegativesBudget.lines()
    budget: dict[str, object]  # NegativesBudget.to_json()
    options: dict[str, object]  # the options that shaped training, by field name
    step: int  # optimizer steps behind the saved weights
    total_steps: int  # steps of the whole run
    processes: int = 1
    model_on_hub: bool = False  # model_id is the Hub repository the run uploads to
    lora: bool = False  # the folder is a LoRA adapter on base_model
    selected_by: str | None = None  # why these weights (best/: the best dev nDCG@10)
    training: dict[str, float] = field(default_factory=dict)  # measured: seconds, texts/s, ...
    dev: list[Evaluation] = field(default_factory=list)  # the run's dev evaluations
    best_step: int | None = None  # the step of the best dev nDCG@10
    reference: dict[str, dict[str, float]] = field(default_factory=dict)  # nDCG@10 base, end
    test: Evaluation | None = None  # only when a test split was evaluated
    embtune_version: str = ""


def front_matter(facts: CardFacts) -> dict[str, object]:
    """The card's YAML metadata as the Hub reads it (library, base model, tags, task)."""
    from huggingface_hub import ModelCardData

    reranker = facts.kind == "cross-encoder"
    tags = ["embtune", "sentence-transformers"]
    tags += ["cross-encoder", "reranker", "text-ranking"] if reranker else ["sentence-similarity"]
    if not reranker:
        tags.append("feature-extraction")
    if facts.lora:
        tags += ["peft", "lora"]
    base = facts.base_model if facts.base_model_on_hub else None
    data = ModelCardData(
        library_name="sentence-transformers",
        base_model=base,
        base_model_relation=("adapter" if facts.lora else "finetune") if base else None,
        pipeline_tag="text-ranking" if reranker else "sentence-similarity",
        tags=tags,
    )
    return data.to_dict()


def card_text(facts: CardFacts) -> str:
    """The whole README.md: front matter, then the sections."""
    import yaml

    header = yaml.safe_dump(front_matter(facts), sort_keys=False, allow_unicode=True)
    sections = [
        _title(facts),
        _model_section(facts),
        _data_section(facts),
        _budget_section(facts),
        _training_section(facts),
        _evaluation_section(facts),
        _usage_section(facts),
    ]
    return f"---\n{header}---\n\n" + "\n\n".join(s.strip("\n") for s in sections) + "\n"


def card_record(facts: CardFacts) -> dict[str, object]:
    """The card's content as data (train_summary.json's ``model_card``)."""
    return {"front_matter": front_matter(facts), **asdict(facts)}


# --- sections ----------------------------------------------------------------------------------


def _name(model_id: str) -> str:
    return model_id.rstrip("/").split("/")[-1] if "/" in model_id else model_id


def _base_link(facts: CardFacts) -> str:
    if facts.base_model_on_hub:
        return f"[{facts.base_model}](https://huggingface.co/{facts.base_model})"
    return f"`{facts.base_model}` (a local folder)"


def _title(facts: CardFacts) -> str:
    what = "A reranker (cross-encoder)" if facts.kind == "cross-encoder" else "An embedding model"
    adapter = " as a LoRA adapter" if facts.lora else ""
    version = f" {facts.embtune_version}" if facts.embtune_version else ""
    steps = f"after step {facts.step} of {facts.total_steps}"
    if facts.step == facts.total_steps:
        steps = f"{facts.total_steps} steps"
    lines = [
        f"# {_name(facts.model_id)}",
        "",
        f"{what} fine-tuned from {_base_link(facts)}{adapter} with embtune{version} ({steps}).",
    ]
    if facts.selected_by:
        lines += ["", f"These weights were chosen by {facts.selected_by}."]
    return "\n".join(lines)


def _table(rows: list[tuple[str, str]], header: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    return "\n".join(lines)


def _code(text: object) -> str:
    shown = str(text).replace("\n", "\\n").replace("|", "\\|")
    return f"`{shown}`" if shown else "none"


def _model_section(facts: CardFacts) -> str:
    s = facts.settings
    rows = [("base model", _base_link(facts)), ("kind", facts.kind)]
    if facts.kind == "cross-encoder":
        rows += [
            ("score", "the raw logit of the (query, passage) pair; higher = more relevant"),
            ("pair length", f"{s.get('max_len')} tokens, special tokens included"),
            ("query instruction", _code(s.get("query_instruction", ""))),
            ("passage instruction", _code(s.get("passage_instruction", ""))),
        ]
    else:
        normalized = bool(s.get("normalize"))
        rows += [
            ("pooling", f"`{s.get('pooling')}`"),
            ("normalized", "yes (scores are cosine similarities)" if normalized else "no (dot)"),
            ("query prompt", _code(s.get("query_instruction", ""))),
            ("passage prompt", _code(s.get("passage_instruction", ""))),
            ("max tokens", f"query {s.get('query_max_len')}, passage {s.get('passage_max_len')}"),
        ]
        if s.get("matryoshka_dims"):
            rows.append(("Matryoshka dimensions", ", ".join(map(str, s["matryoshka_dims"]))))
        if s.get("append_eos_token"):
            rows.append(("EOS token", "appended to every text by the saved tokenizer"))
    if facts.lora:
        rows.append(("weights", f"a LoRA adapter; loaders add the base model {facts.base_model}"))
    return "## Model\n\n" + _table(rows)


def _data_section(facts: CardFacts) -> str:
    d = facts.data
    lines = [
        "## Training data",
        "",
        "- files: " + ", ".join(f"`{f}`" for f in d.train_files),
        f"- training queries (rows): {d.rows}",
        f"- passages: {d.passages}",
    ]
    if d.rejected_rows is not None:
        lines.append(f"- bad rows left out (--skip-bad-rows): {d.rejected_rows}")
    if d.dev_source:
        size = ""
        if d.dev_queries is not None:
            size = f": {d.dev_queries} queries over {d.dev_passages} passages"
        lines.append(f"- dev set: {d.dev_source}{size}")
    else:
        lines.append("- dev set: none")
    return "\n".join(lines)


def _budget_section(facts: CardFacts) -> str:
    body = "\n".join(facts.budget_lines)
    intro = "What the group settings did with the data:"
    return f"## Negatives budget\n\n{intro}\n\n```text\n{body}\n```"


def _training_section(facts: CardFacts) -> str:
    t = facts.training
    lines = ["## Training", ""]
    lines.append(f"- steps: {facts.step} of {facts.total_steps}; processes: {facts.processes}")
    if "train_seconds" in t:
        lines.append(f"- training time: {t['train_seconds']:.1f} s")
    if "texts_per_second" in t:
        lines.append(f"- throughput: {t['texts_per_second']:.1f} texts/s")
    if "peak_memory_bytes" in t:
        lines.append(f"- peak memory: {t['peak_memory_bytes'] / 2**30:.2f} GiB")
    if "negative_coverage" in t:
        lines.append(f"- share of the data's negatives used: {t['negative_coverage']:.1%}")
    if t.get("skipped_steps"):
        lines.append(f"- steps skipped for a non-finite loss or gradient: {t['skipped_steps']:g}")
    rows = [(f"`--{key.replace('_', '-')}`", _code(value)) for key, value in facts.options.items()]
    lines += ["", "Options (the ones that shape training, and every one not at its default):", ""]
    lines.append(_table(rows, ("option", "value")))
    return "\n".join(lines)


# --- evaluation --------------------------------------------------------------------------------


def _metric_key(name: str) -> tuple[int, int, str]:
    base, _, k = name.partition("@")
    rank = _METRIC_ORDER.index(base) if base in _METRIC_ORDER else len(_METRIC_ORDER)
    return (rank, int(k) if k.isdigit() else 0, name)


def _shown(evaluations: list[Evaluation], best_step: int | None) -> list[Evaluation]:
    """Every evaluation when few; else the base model, the best and the last few."""
    if len(evaluations) <= _SHOWN_EVALUATIONS:
        return evaluations
    keep = {evaluations[0].step, evaluations[-1].step, best_step}
    keep |= {e.step for e in evaluations[-(_SHOWN_EVALUATIONS - 3) :]}
    return [e for e in evaluations if e.step in keep]


def _metrics_table(evaluations: list[Evaluation], best_step: int | None) -> str:
    names = sorted(
        {k for e in evaluations for k in e.metrics if not _DIM_SUFFIX.search(k)}, key=_metric_key
    )
    lines = ["| step | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for e in evaluations:
        label = "0 (base model)" if e.step == 0 else str(e.step)
        if e.step == best_step:
            label += " (best)"
        values = [f"{e.metrics[n]:.4f}" if n in e.metrics else "" for n in names]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _dimension_table(evaluation: Evaluation) -> str | None:
    """nDCG@10 at each Matryoshka dimension of one evaluation, or None without them."""
    dims = sorted(
        (int(m.group(1)), value)
        for key, value in evaluation.metrics.items()
        if key.startswith("ndcg@10") and (m := _DIM_SUFFIX.search(key))
    )
    if not dims:
        return None
    rows = [(str(dim), f"{value:.4f}") for dim, value in dims]
    return _table(rows, ("dimension", "nDCG@10"))


def _evaluation_section(facts: CardFacts) -> str:
    parts = ["## Evaluation", "", "### Dev set", ""]
    if facts.dev:
        shown = _shown(facts.dev, facts.best_step)
        parts.append(_metrics_table(shown, facts.best_step))
        if len(shown) < len(facts.dev):
            parts += ["", f"{len(shown)} of the run's {len(facts.dev)} evaluations are shown."]
        if dims := _dimension_table(facts.dev[-1]):
            parts += ["", f"nDCG@10 by embedding size at step {facts.dev[-1].step}:", "", dims]
    else:
        parts.append("Not evaluated: the run had no dev set.")
    if facts.reference:
        rows = []
        for name, entry in facts.reference.items():
            shown = [f"{when} {entry[when]:.4f}" for when in ("base", "end") if when in entry]
            rows.append((name, ", ".join(shown) or "not measured"))
        parts += ["", "### Reference sets (out of domain, never trained on)", ""]
        parts.append(_table(rows, ("set", "nDCG@10")))
    parts += ["", "### Test set", ""]
    if facts.test is not None:
        parts.append(_metrics_table([facts.test], None))
    else:
        model = f"--model {facts.model_id}"
        if facts.kind == "cross-encoder":
            model = f"--model RETRIEVER --reranker {facts.model_id}"
        command = f"embtune eval {model} --data BEIR_FOLDER --split test"
        parts.append(f"Not measured by this run; `{command}` measures it.")
    return "\n".join(parts)


# --- usage -------------------------------------------------------------------------------------

_QUERY = "how many people live in Berlin?"
_PASSAGE = "Berlin has 3.7 million inhabitants."


def _usage_section(facts: CardFacts) -> str:
    if facts.kind == "cross-encoder":
        blocks = [_reranker_sentence_transformers(facts), _reranker_transformers(facts)]
        blocks.append(_reranker_flagembedding(facts))
    else:
        blocks = [_embedder_sentence_transformers(facts), _embedder_transformers(facts)]
        blocks.append(_embedder_flagembedding(facts))
    needs = " (with `peft` installed: the folder is an adapter)" if facts.lora else ""
    intro = f"The examples use the settings the model was trained with{needs}."
    return "## Usage\n\n" + intro + "\n\n" + "\n\n".join(blocks)


def _python(title: str, code: str, note: str = "") -> str:
    text = f"### {title}\n\n```python\n{code.strip()}\n```"
    return text + (f"\n\n{note}" if note else "")


def _prompts(facts: CardFacts, names: tuple[str, str] = ("QUERY_PROMPT", "PASSAGE_PROMPT")) -> str:
    """The saved instructions as two constants the example uses."""
    s = facts.settings
    query, passage = s.get("query_instruction", ""), s.get("passage_instruction", "")
    return f"{names[0]} = {query!r}\n{names[1]} = {passage!r}"


def _embedder_sentence_transformers(facts: CardFacts) -> str:
    dims = facts.settings.get("matryoshka_dims") or []
    extra = f", truncate_dim={min(dims)}" if dims else ""
    code = f"""
from sentence_transformers import SentenceTransformer

model = SentenceTransformer({facts.model_id!r}{extra})
queries = model.encode([{_QUERY!r}], prompt_name="query")
passages = model.encode([{_PASSAGE!r}], prompt_name="document")
scores = model.similarity(queries, passages)
"""
    note = "The saved prompts `query` and `document` hold the query and passage prompts."
    if dims:
        note += f" `truncate_dim` takes any of the trained sizes: {', '.join(map(str, dims))}."
    return _python("sentence-transformers", code, note)


_POOLING_CODE = {
    "cls": "    embeddings = hidden[:, 0]",
    "mean": "    embeddings = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)",
    "last_token": (
        "    # the last real token of each text: left padding puts it at the end\n"
        '    last = mask.shape[1] - 1 if tokenizer.padding_side == "left" else mask.sum(1) - 1\n'
        "    embeddings = hidden[torch.arange(len(hidden)), last]"
    ),
}


def _embedder_transformers(facts: CardFacts) -> str:
    s = facts.settings
    pooling = str(s.get("pooling"))
    normalized = bool(s.get("normalize"))
    finish = "F.normalize(embeddings, dim=-1)" if normalized else "embeddings"
    code = f"""
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained({facts.model_id!r})
model = AutoModel.from_pretrained({facts.model_id!r}).eval()
{_prompts(facts)}


def embed(texts, prompt, max_length):
    batch = tokenizer([prompt + t for t in texts], padding=True, truncation=True,
                      max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"]
{_POOLING_CODE.get(pooling, _POOLING_CODE["cls"])}
    return {finish}  # {pooling} pooling{", normalized" if normalized else ""}


queries = embed([{_QUERY!r}], QUERY_PROMPT, {s.get("query_max_len")})
passages = embed([{_PASSAGE!r}], PASSAGE_PROMPT, {s.get("passage_max_len")})
scores = queries @ passages.T
"""
    return _python("transformers", code)


def _flag_model_path(facts: CardFacts) -> str:
    """What FlagEmbedding loads: the model, or for an adapter the merged model beside it."""
    if not facts.lora:
        return facts.model_id
    if facts.model_on_hub:  # the merged model is not uploaded
        return "OUTPUT_DIR/merged_model"
    return str(Path(facts.model_id) / "merged_model")


def _embedder_flagembedding(facts: CardFacts) -> str:
    s = facts.settings
    decoder = s.get("pooling") == "last_token"
    cls = "FlagLLMModel" if decoder else "FlagModel"
    args = [repr(_flag_model_path(facts))]
    if not decoder:
        args.append(f"pooling_method={s.get('pooling')!r}")  # FlagModel's default: cls
    args.append(f"normalize_embeddings={bool(s.get('normalize'))}")
    # A prompt is saved whole; the format "{}{}" puts it straight before the text, as trained.
    if s.get("query_instruction"):
        args += ["query_instruction_for_retrieval=QUERY_PROMPT", "query_instruction_format='{}{}'"]
    if s.get("passage_instruction"):
        args += ["passage_instruction_for_retrieval=PASSAGE_PROMPT"]
        args += ["passage_instruction_format='{}{}'"]
    joined = ",\n    ".join(args)
    with_prompts = s.get("query_instruction") or s.get("passage_instruction")
    prompts = f"\n{_prompts(facts)}" if with_prompts else ""
    code = f"""
from FlagEmbedding import {cls}
{prompts}
model = {cls}(
    {joined},
)
queries = model.encode_queries([{_QUERY!r}], max_length={s.get("query_max_len")})
passages = model.encode_corpus([{_PASSAGE!r}], max_length={s.get("passage_max_len")})
scores = queries @ passages.T
"""
    note = (
        f"`{cls}` pools the last token (the EOS the saved tokenizer appends)."
        if decoder
        else f"`FlagModel` defaults to `cls` pooling: `pooling_method={s.get('pooling')!r}` is "
        "what this model was trained with."
    )
    if facts.lora:
        note += (
            " FlagEmbedding loads full models, not adapters: the run must have saved the "
            "merged model (`--save-merged-lora-model`, OUTPUT_DIR/merged_model)."
        )
    return _python("FlagEmbedding", code, note)


def _reranker_sentence_transformers(facts: CardFacts) -> str:
    code = f"""
from sentence_transformers import CrossEncoder

model = CrossEncoder({facts.model_id!r})
{_prompts(facts, ("QUERY_INSTRUCTION", "PASSAGE_INSTRUCTION"))}
pairs = [({_QUERY!r}, {_PASSAGE!r})]
scores = model.predict([(QUERY_INSTRUCTION + q, PASSAGE_INSTRUCTION + p) for q, p in pairs])
"""
    note = "`predict` returns the raw logits the model was trained and evaluated with."
    return _python("sentence-transformers", code, note)


def _reranker_transformers(facts: CardFacts) -> str:
    code = f"""
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained({facts.model_id!r})
model = AutoModelForSequenceClassification.from_pretrained({facts.model_id!r}).eval()
{_prompts(facts, ("QUERY_INSTRUCTION", "PASSAGE_INSTRUCTION"))}
pairs = [({_QUERY!r}, {_PASSAGE!r})]
batch = tokenizer(
    [QUERY_INSTRUCTION + q for q, _ in pairs],
    [PASSAGE_INSTRUCTION + p for _, p in pairs],
    padding=True,
    truncation="only_second",
    max_length={facts.settings.get("max_len")},
    return_tensors="pt",
)
with torch.no_grad():
    scores = model(**batch).logits[:, 0]
"""
    return _python("transformers", code)


def _reranker_flagembedding(facts: CardFacts) -> str:
    s = facts.settings
    args = [repr(facts.model_id)]
    if s.get("query_instruction"):
        args.append(f"query_instruction_for_rerank={s['query_instruction']!r}")
    if s.get("passage_instruction"):
        args.append(f"passage_instruction_for_rerank={s['passage_instruction']!r}")
    if s.get("query_tokens"):
        args.append(f"query_max_length={s['query_tokens']}")  # its default: 3/4 of max_length
    args.append(f"max_length={s.get('max_len')}")
    joined = ",\n    ".join(args)
    code = f"""
from FlagEmbedding import FlagReranker

reranker = FlagReranker(
    {joined},
)
scores = reranker.compute_score([[{_QUERY!r}, {_PASSAGE!r}]])
"""
    note = "Raw logits, as trained; `normalize=True` maps them through a sigmoid to [0, 1]."
    return _python("FlagEmbedding", code, note)


def write_card(folder: Path, facts: CardFacts) -> None:
    """Write README.md into ``folder`` (a save's temporary folder: the save makes it atomic)."""
    (folder / README_FILE).write_text(card_text(facts), encoding="utf-8")
