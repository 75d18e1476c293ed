"""Write the offline dense datasets: ``python -m mambazoo.dense composite OUT`` or ``... nuclei OUT``."""
import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .synthetic import write_composite, write_nuclei


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m mambazoo.dense", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    composite = commands.add_parser("composite", help="glyphs pasted on canvases (COCO + mask folders)")
    composite.add_argument("out", type=Path)
    composite.add_argument("--train", type=int, default=32, help="training images")
    composite.add_argument("--val", type=int, default=8, help="validation images")
    composite.add_argument("--size", type=int, default=128, help="square canvas side")
    composite.add_argument("--glyphs", choices=("digits", "fashion-mnist"), default="digits")
    composite.add_argument("--seed", type=int, default=0)
    nuclei = commands.add_parser("nuclei", help="the stardist fluorescence-nuclei sample (125 instances)")
    nuclei.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "composite":
            write_composite(args.out, dict(train=args.train, val=args.val), args.size, glyphs=args.glyphs,
                            seed=args.seed)
        else:
            write_nuclei(args.out)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
