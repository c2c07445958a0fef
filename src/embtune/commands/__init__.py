"""Sub-commands of the `embtune` CLI: each module defines `register(subparsers)`.

A command module only parses options, calls :mod:`embtune.api` and prints; the work lives in
the library modules (`training/`, `eval/`, `mining/`, `data/`), so it is usable from Python too.

Every module of this package is a sub-command (the CLI registers each one it finds), so shared
CLI helpers live here, in the package itself, not in a module of their own.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps example blocks in descriptions as written."""
