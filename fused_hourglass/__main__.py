"""`python -m fused_hourglass`: the command line (see `fused_hourglass.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
