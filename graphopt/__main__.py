"""``python -m graphopt plan model.py ...``: the same as the ``graphopt`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
