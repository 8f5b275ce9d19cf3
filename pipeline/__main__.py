"""Entry point of ``python -m pipeline``."""

import sys

from .cli import main

if __name__ == "__main__":  # multiprocessing may import this module as __mp_main__
    sys.exit(main())
