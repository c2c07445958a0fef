"""The names of the files and folders in a run folder, defined once.

`embtune train` writes them, `embtune sweep` and the demo read them, `--overwrite-output-dir`
knows which ones are a previous run's. Free of heavy imports, so the sweep's planning (and
`embtune --help`) can name them without loading torch.
"""

from __future__ import annotations

LOG_FILE = "train_log.jsonl"  # one JSON record per logging window, dev evaluation or skip
CONFIG_FILE = "train_config.yaml"  # the run's resolved options
BUDGET_FILE = "negatives_budget.json"  # the negatives budget printed before training
SUMMARY_FILE = "train_summary.json"  # written when the run finished
DEV_SPLIT_FILE = "dev_split.json"  # the rows --dev-fraction held out
REJECTED_FILE = "rejected_rows.jsonl"  # --skip-bad-rows: the rows left out and why
DIMENSIONS_PLOT = "matryoshka_dims.png"  # --matryoshka-dims with dev data: nDCG@10 by dim
BEST_DIR = "best"  # --save-best: the model with the best dev nDCG@10
MERGED_DIR = "merged_model"  # --save-merged-lora-model: the adapter merged (FlagEmbedding's name)
INTERPOLATED_DIR = "interpolated"  # --interpolate-base: the model mixed with the base
INTERPOLATION_FILE = "interpolation.json"  # --interpolate-base: factors, scores, the choice
INTERPOLATION_TABLE = "interpolation.md"  # the same as a table
INTERPOLATION_PLOT = "interpolation.png"  # dev and reference nDCG@10 against the factor
TENSORBOARD_DIR = "tensorboard"  # accelerate's TensorBoard tracker
TRAINER_STATE_FILE = "trainer_state.json"  # in each checkpoint; at the top once finished
LEARNING_RATE_SEARCH_DIR = "learning_rate_search"  # --learning-rate auto: trials, choice.json
LOCK_FILE = ".embtune.lock"  # held by the run writing the folder (embtune/run_lock.py)
