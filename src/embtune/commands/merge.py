"""`embtune merge`: mix the weights of models of one architecture (WiSE-FT, LM-Cocktail)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Mix the weights of models of one architecture into a new model, tensor by tensor.

Interpolation (WiSE-FT): --base B --model M --alpha A writes (1 - A) x B + A x M, i.e.
B + A x (M - B). Fine-tuning costs some general ability; moving the fine-tuned model back
toward its base recovers most of it. A = 0 is the base and A = 1 the model, bit for bit.

Weighted average (LM-Cocktail): --model M1 M2 ... --weights w1 w2 ... writes sum_i w_i x M_i,
the weights (>= 0, not all 0) normalised to sum to 1: `--weights 1 3` is 0.25 and 0.75
(LM-Cocktail's mix_models takes weights that already sum to 1; those mean the same here).
--base takes a single --model; to mix several models with their base, list the base among
the --model models and give it its weight.

The models must match: config.json's model_type and architectures, then every tensor's name,
shape and dtype (the first difference is named). Floating tensors are mixed in float64 and
saved in their dtype; other tensors (integer buffers) must be equal and are copied.

The output folder gets the (first) --model's files without its weight files (tokenizer,
config.json, sentence-transformers modules, embtune's settings), the merged weights as one
model.safetensors and merge.json recording the inputs, weights and rule. It is written
atomically: a failure or a kill leaves no half-written model. docs/merge.md has the details.

examples:
  embtune merge --base BAAI/bge-small-en-v1.5 --model out/run --alpha 0.5 -o out/merged
  embtune merge --model out/run-a out/run-b BAAI/bge-small-en-v1.5 --weights 0.4 0.4 0.2 \\
      -o out/cocktail
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `merge` sub-command."""
    from embtune.commands import HelpFormatter

    p = subparsers.add_parser(
        "merge",
        help="mix model weights: base + alpha x (fine-tuned - base), or a weighted average",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        nargs="+",
        metavar="MODEL",
        help="model folder(s) or hub name(s): one with --base, else two or more with --weights; "
        "the output gets its files (tokenizer, settings; of several, the first one's)",
    )
    p.add_argument(
        "--base",
        default=None,
        metavar="MODEL",
        help="the model --model was fine-tuned from: interpolate (1 - alpha) x base + alpha x "
        "model (default: none; mix the --model models with --weights)",
    )
    p.add_argument(
        "--alpha",
        default=None,
        metavar="A",
        help="with --base: the weight of --model, in [0, 1] (0 = the base, 1 = the model)",
    )
    p.add_argument(
        "--weights",
        default=None,
        nargs="+",
        metavar="W",
        help="without --base: one weight per --model, >= 0 and not all 0, normalised to sum "
        "to 1 (weights that already sum to 1, as LM-Cocktail's mix_models requires, are used "
        "as given)",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="DIR",
        help="folder of the merged model (written atomically; an existing non-empty one needs "
        "--overwrite)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --output if it exists and is not empty: everything in it is deleted "
        "(default: refuse; never allowed when it is or holds one of the models)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Merge (embtune.api.merge checks every option before a model is read), print the report."""
    from embtune import api

    result = api.merge(
        args.model,
        args.output,
        base=args.base,
        alpha=args.alpha,
        weights=args.weights,
        overwrite=args.overwrite,
    )
    print(result.text)
    return 0
