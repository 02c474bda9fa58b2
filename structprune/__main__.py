"""``python -m structprune``: the command line, the same as the ``structprune`` script."""
import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
