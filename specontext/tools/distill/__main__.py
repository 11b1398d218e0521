"""``python -m specontext.tools.distill``: the same as ``specontext-distill``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
