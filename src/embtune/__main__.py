"""`python -m embtune` is the `embtune` command (so `torchrun -m embtune train ...` works)."""

from embtune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
