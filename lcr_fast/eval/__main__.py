"""``python -m lcr_fast.eval``: the same as the ``lcr-eval`` command (see lcr_fast/eval/cli.py)."""
import sys

from lcr_fast.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
