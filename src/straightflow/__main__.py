"""``python -m straightflow``: the ``straightflow`` command (the entry point, above the ``cli`` layer)."""
import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
