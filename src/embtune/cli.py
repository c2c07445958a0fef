"""The `embtune` command line: finds the sub-commands, runs one, turns user errors into exit 2.

Each sub-command lives in `embtune/commands/<name>.py` and exposes
``register(subparsers) -> None``, which adds its parser and sets ``func`` (a callable taking
the parsed namespace and returning an exit status). Heavy imports (torch, transformers) happen
inside those functions so that `embtune --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
import threading

from embtune import __version__, commands
from embtune.commands import HelpFormatter
from embtune.errors import TrainingStopped, UsageError

USAGE_ERROR = 2  # bad option or input: nothing was done (docs/reliability.md lists the codes)
TRAINING_STOPPED = TrainingStopped.exit_status  # 3: work was done and saved, then it had to stop


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="embtune",
        description=(
            "Fine-tune text-embedding models with contrastive learning over hard negatives,\n"
            "with every training decision visible.\n\n"
            "Run `embtune COMMAND --help` for the options of one command."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"embtune {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(subparsers)
    return parser


def _quiet_libraries() -> None:
    # transformers prints weight-loading bars and advice on every load; our own bars and
    # summaries say what the user needs.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # accelerate reports every file of every checkpoint save and load at INFO.
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _quiet_thread_write_errors(args: threading.ExceptHookArgs) -> None:
    """A background writer's OSError (TensorBoard's event thread on a full disk) is not
    printed: the writer re-raises it in the main thread at its next flush, where the run
    reports it in one line (exit 2 before the first step, 3 after); its traceback from the
    thread would only bury that line."""
    if isinstance(args.exc_value, OSError):
        logging.getLogger("embtune").debug("background writer failed: %s", args.exc_value)
        return
    threading.__excepthook__(args)


def train_flags(argv: list[str]) -> list[str]:
    """`embtune train`'s flags with FlagEmbedding's spellings rewritten (flagembedding_flags);
    what is accepted without effect is said once, by the main process."""
    from embtune.flagembedding_flags import translate

    argv, notes = translate(argv)
    if os.environ.get("RANK", "0") == "0":
        for note in notes:
            print(f"embtune train: note: {note}", file=sys.stderr)
    return argv


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `embtune` console script and `python -m embtune`."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        try:
            argv = ["train", *train_flags(argv[1:])]
        except UsageError as exc:
            for line in exc.lines():
                print(f"embtune train: error: {line}", file=sys.stderr)
            return USAGE_ERROR
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return USAGE_ERROR
    _quiet_libraries()
    threading.excepthook = _quiet_thread_write_errors
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        for line in exc.lines():
            print(f"embtune {args.command}: error: {line}", file=sys.stderr)
        return USAGE_ERROR
    except TrainingStopped as exc:
        for line in exc.lines():
            print(f"embtune {args.command}: stopped: {line}", file=sys.stderr)
        return TRAINING_STOPPED
    except KeyboardInterrupt:
        print(f"embtune {args.command}: interrupted", file=sys.stderr)
        return 130
