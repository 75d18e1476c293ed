"""``python -m mambazoo``: the ``mambazoo`` command line."""
import sys

from .cli import main

sys.exit(main())
