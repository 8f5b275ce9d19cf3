"""Entry point of ``python -m pipeline``."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while the CLI imports: exit as an interrupted command does, no traceback
    sys.exit(130)

if __name__ == "__main__":  # multiprocessing may import this module as __mp_main__
    sys.exit(main())
