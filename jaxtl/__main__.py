"""`python -m jaxtl ...`: the `jaxtl` command (e.g. from a checkout on PYTHONPATH, without the console script)."""

import sys

from jaxtl.cli import main

if __name__ == "__main__":  # not in worker processes, which import the main module as __mp_main__
    sys.exit(main())
