"""Sub-commands of the `embtune` CLI: each module defines `register(subparsers)`.

A command module only parses options and calls the library; the work lives in the library
modules (`train.py`, `evaluate.py`, `mine.py`, ...), so it is usable from Python too.
"""
