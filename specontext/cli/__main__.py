"""``python -m specontext.cli``: the same as ``specontext-run``."""

import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
