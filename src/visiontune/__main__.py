"""``python -m visiontune ...``: the same as the ``visiontune`` console script (and ``torchrun -m visiontune``)."""

import sys

from visiontune.cli import main

if __name__ == "__main__":
    sys.exit(main())
