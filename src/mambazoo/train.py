"""``python -m mambazoo.train`` (and ``torchrun --nproc_per_node=N -m mambazoo.train``): train or fine-tune.

Same flags as ``mambazoo train``; see ``docs/training.md``.
"""
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Train with command-line flags; returns the exit status (2 with a one-line message for bad input)."""
    from .training import train
    from .training.distributed import shutdown_distributed

    try:
        train(argv)
    except (ValueError, FileNotFoundError) as error:
        print(f"mambazoo train: error: {error}", file=sys.stderr)
        return 2
    shutdown_distributed()  # the run's objects are gone: the process group can go before the interpreter does
    return 0


if __name__ == "__main__":
    sys.exit(main())
