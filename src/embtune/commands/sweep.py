"""`embtune sweep`: short trainings over a grid of options, one table and plots to compare them."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Train one short run per configuration of a grid, evaluate each on the dev set, and compare
them in one folder: sweep.md and sweep.csv (loss, chance level, dev nDCG@10, texts/s, peak
memory, negative coverage per configuration), sweep.json, loss.png (loss against the step,
chance levels dashed) and by_group_size.png (dev nDCG@10, texts/s and memory against
train_group_size).

Grid axes: --train-group-size, --batch-size, --learning-rate, --temperature,
--negative-sampling and --cache-chunk-size take several values; --data-variant NAME=PATH,
repeated, compares training files. The grid is every combination. Every other `embtune train`
option (and --config YAML) is passed unchanged to every run.

Each configuration trains in its own `python -m embtune train` process into
OUTPUT_DIR/runs/<label>/ (its console output in OUTPUT_DIR/logs/<label>.log), so its peak
memory is its own and a crash fails one row, not the sweep. Running the same command again
reuses finished runs and trains the rest.

exit status: 0 every run finished; 1 some run failed (the table says why); 2 refused before
any run (bad option or input, one line).

examples:
  embtune sweep --model ./base --train-data train.jsonl --eval-data scifact/ \\
      --train-group-size 2 4 8 16 --batch-size 8 16 --max-steps 50 -o sweeps/groups
  embtune sweep --model ./base --data-variant neg1=n1.jsonl --data-variant neg10=n10.jsonl \\
      --train-group-size 4 --dev-fraction 0.1 -o sweeps/negatives
"""

# Sweep default for --max-steps: a sweep trains many configurations, so each run is short
# unless asked otherwise (--max-steps 0 trains the full --epochs).
DEFAULT_MAX_STEPS = 50


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `sweep` sub-command."""
    from embtune.commands import HelpFormatter
    from embtune.config import TrainConfig, add_arguments, argument_type, flag
    from embtune.sweep import AXES

    parser = subparsers.add_parser(
        "sweep",
        help="short trainings over a grid of options, compared in a table and plots",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
        # Every train option is added first (one definition, in TrainConfig); the options
        # below then replace the ones whose meaning differs in a sweep.
        conflict_handler="resolve",
    )
    add_arguments(parser)
    parser.add_argument(
        "--train-data",
        dest="train_data",
        nargs="+",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="FlagEmbedding jsonl files, folders of them, or BEIR folders, for every run "
        "(required unless --data-variant)",
    )
    # A sweep restarts or resumes its runs by itself: the train options that do that are
    # hidden and refused with the reason (--no-* spellings replaced too, so none is left over).
    for spelling in ("--resume", "--no-resume", "--resume-from"):
        parser.add_argument(
            spelling,
            dest="refused_" + spelling.lstrip("-").replace("-", "_"),
            nargs="?",
            const=True,
            help=argparse.SUPPRESS,
        )
    for spelling in ("--no-overwrite-output-dir", "--no-overwrite"):
        parser.add_argument(
            spelling,
            dest="overwrite_output_dir",
            action="store_false",
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )

    sweep = parser.add_argument_group(
        "sweep options", "the grid (options given with several values) and the sweep folder"
    )
    for name in AXES:  # the options declared sweepable (``sweep`` metadata in TrainConfig)
        f = TrainConfig.__dataclass_fields__[name]
        kwargs: dict = {"type": argument_type(f)}  # `auto` reaches plan_sweep, refused there
        if f.metadata.get("choices"):
            kwargs = {"choices": f.metadata["choices"]}
        sweep.add_argument(
            flag(name),
            dest=name,
            nargs="+",
            default=argparse.SUPPRESS,
            metavar=name.split("_")[-1].upper(),
            help=f"{f.metadata['sweep'].get('help', f.metadata['help'])} (default: "
            f"{f.default!r}); several values: one run each",
            **kwargs,
        )
    sweep.add_argument(
        "--data-variant",
        dest="data_variants",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a data axis: train each configuration on PATH (jsonl file, folder, or BEIR "
        "folder; several paths comma-separated), labelled NAME; repeat for each variant; "
        "replaces --train-data",
    )
    sweep.add_argument(
        "-o",
        "--output-dir",
        dest="output_dir",
        default=argparse.SUPPRESS,
        help="sweep folder: runs/<label>/ per configuration, logs/, sweep.md, sweep.csv, "
        "sweep.json, loss.png, by_group_size.png (required; rerunning the sweep there reuses "
        "finished runs)",
    )
    sweep.add_argument(
        "--max-steps",
        dest="max_steps",
        type=int,
        default=argparse.SUPPRESS,
        help=f"steps per run (default: {DEFAULT_MAX_STEPS}; 0 = the full --epochs)",
    )
    sweep.add_argument(
        "--overwrite-output-dir",
        "--overwrite",
        dest="overwrite_output_dir",
        action="store_true",
        default=argparse.SUPPRESS,
        help="train every configuration again, replacing finished runs (default: reuse them)",
    )
    sweep.add_argument(
        "--dry-run",
        action="store_true",
        help="print the configurations and their `embtune train` commands, run nothing",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Plan the grid (every refusal first), run or reuse each configuration, print the table."""
    import shlex
    from pathlib import Path

    from embtune.errors import UsageError
    from embtune.sweep import (
        AXES,
        GROUP_PNG,
        LOSS_PNG,
        SWEEP_CSV,
        SWEEP_JSON,
        SWEEP_MD,
        markdown_table,
        parse_data_variant,
        plan_sweep,
        run_sweep,
    )

    for spelling in ("resume", "no-resume", "resume-from"):
        if getattr(args, "refused_" + spelling.replace("-", "_"), None) is not None:
            raise UsageError(
                f"--{spelling}: a sweep resumes by itself: run the same command again; "
                "finished runs are reused, unfinished ones continue"
            )
    if getattr(args, "push_to_hub", False):
        raise UsageError(
            "--push-to-hub: a sweep trains many models into one repository's place; push the "
            "run you choose with `embtune train ... --push-to-hub` or upload its folder"
        )
    if not getattr(args, "output_dir", None):
        raise UsageError("--output-dir is required: the sweep folder")
    out = Path(args.output_dir)
    del args.output_dir
    overwrite = bool(getattr(args, "overwrite_output_dir", False))
    if hasattr(args, "overwrite_output_dir"):
        del args.overwrite_output_dir
    if not hasattr(args, "max_steps"):
        args.max_steps = DEFAULT_MAX_STEPS
    variants = [parse_data_variant(text) for text in args.data_variants]
    axes = {name: getattr(args, name) for name in AXES if hasattr(args, name)}
    for name in axes:
        delattr(args, name)

    plan = plan_sweep(args, axes, variants, out, overwrite=overwrite)
    if variants and plan.points[0].config.dev_fraction:
        # Each variant would hold out its own rows and search its own passages.
        print(
            "embtune sweep: note: with --dev-fraction every data variant has its own dev set, so "
            "dev nDCG@10 does not compare across variants; --eval-data DIR gives them one"
        )
    if args.dry_run:
        from embtune.sweep import child_command

        for i, point in enumerate(plan.points, start=1):
            print(f"[{i}/{len(plan.points)}] {point.label}")
            print("  " + shlex.join(["embtune", *child_command(point, None)[3:]]))
        return 0

    results = run_sweep(plan)
    print()
    print(markdown_table(plan, results))
    print()
    failed = sum(r.status == "failed" for r in results)
    if failed:
        print(f"embtune sweep: {failed} of {len(results)} runs failed (see the table and logs/)")
    files = ", ".join((SWEEP_CSV, SWEEP_JSON, LOSS_PNG, GROUP_PNG))
    print(f"embtune sweep: results in {out / SWEEP_MD} (also {files} there)")
    return 1 if failed else 0
