"""``python -m specontext.tools.eagle3``: the same as ``specontext-import-eagle3``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
