#!/usr/bin/env bash
# sentence-transformers 6.2 anchor: run st_train.py under /usr/bin/time -v (peak RSS),
# then evaluate the saved model on SciFact test with `embtune eval`.
#
# usage: st_train.sh TRAIN_JSONL OUT_DIR
#   OUT_DIR is emptied and filled with: model/, train_info.json, train.log, time.txt,
#   train_command.txt, eval.json, eval.log, eval_command.txt, summary.json
# env: DATA (BEIR folder, default /work/shared/data/scifact), SEED (default 42)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="$ROOT/bench/.venv-st"
TRAIN="$(realpath "$1")"
OUT="$(realpath -m "$2")"
DATA="${DATA:-/work/shared/data/scifact}"
SEED="${SEED:-42}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

rm -rf "$OUT"
mkdir -p "$OUT"

train_cmd=("$VENV/bin/python" "$HERE/st_train.py" --train "$TRAIN" --output "$OUT" --seed "$SEED")
printf '%q ' "${train_cmd[@]}" > "$OUT/train_command.txt"; echo >> "$OUT/train_command.txt"
echo "== sentence-transformers training: $(cat "$OUT/train_command.txt")"
/usr/bin/time -v -o "$OUT/time.txt" "${train_cmd[@]}" > "$OUT/train.log" 2>&1 || {
  echo "training failed; last lines of $OUT/train.log:" >&2; tail -30 "$OUT/train.log" >&2; exit 1; }
tail -1 "$OUT/train.log"

# The saved folder has Pooling(mean) + Normalize modules; the settings are passed
# explicitly anyway, the same as for the other anchors.
eval_cmd=(
  "$ROOT/.venv/bin/embtune" eval --model "$OUT/model" --data "$DATA" --split test
  --pooling mean --normalize --query-max-len 64 --passage-max-len 256
  --device cpu --json "$OUT/eval.json"
)
printf '%q ' "${eval_cmd[@]}" > "$OUT/eval_command.txt"; echo >> "$OUT/eval_command.txt"
echo "== evaluation: $(cat "$OUT/eval_command.txt")"
"${eval_cmd[@]}" > "$OUT/eval.log" 2>&1 || { tail -30 "$OUT/eval.log" >&2; exit 1; }

"$ROOT/.venv/bin/python" "$HERE/report.py" summarize --system "sentence-transformers 6.2.0 (MNRL)" \
  --version-python "$VENV/bin/python" --packages sentence-transformers transformers torch \
  --out-dir "$OUT"
