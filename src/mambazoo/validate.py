"""``python -m mambazoo.validate``: evaluate a classifier (timm ``validate.py`` semantics).

Same flags as ``mambazoo validate``; see ``docs/training.md``.
"""
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Validate with command-line flags; returns the exit status (2 with a one-line message for bad input)."""
    from .training import validate
    from .training.distributed import shutdown_distributed

    try:
        validate(argv)
    except (ValueError, FileNotFoundError) as error:
        print(f"mambazoo validate: error: {error}", file=sys.stderr)
        return 2
    shutdown_distributed()  # the run's objects are gone: the process group can go before the interpreter does
    return 0


if __name__ == "__main__":
    sys.exit(main())
