"""``python -m keypointops`` (and ``torchrun -m keypointops``): the ``keypointops`` command."""
import sys

from keypointops.cli import main

if __name__ == "__main__":
    sys.exit(main())
