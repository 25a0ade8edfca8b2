"""``python -m straightflow.cli``: the ``straightflow`` command."""
import sys

from .main import main

sys.exit(main())
