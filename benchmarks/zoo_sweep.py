"""Whole-model CPU sweep of the zoo against DeiT-Ti: images/s and peak memory from 224 to 1248 px.

Runs ``mambazoo demo`` (Vim-Ti, PlainMamba-L1, MambaOut-Femto where registered; DeiT-Ti with fused SDPA attention and
with materialised attention) at more resolutions than ``make demo``: batch 1, fp32, ``inference_mode``, models
interleaved round-robin per resolution, medians over rounds, speed ratios as medians of per-round ratios to DeiT-Ti
(SDPA). Peak memory method: :data:`mambazoo.bench.CPU_MEMORY_METHOD`. Prints the table and where Vim-Ti's curve
crosses DeiT-Ti's, and writes CSV/JSON/markdown/PNG.

Usage: ``python benchmarks/zoo_sweep.py [--repeats 3] [--out-dir benchmarks/results]``
"""
import argparse
import sys

from mambazoo import cli

RESOLUTIONS = "224,384,512,640,768,1024,1248"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", default="3")
    parser.add_argument("--resolutions", default=RESOLUTIONS)
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args()
    return cli.main(["demo", "--resolutions", args.resolutions, "--repeats", args.repeats, "--out-dir", args.out_dir,
                     "--name", "zoo_sweep_cpu"])


if __name__ == "__main__":
    sys.exit(main())
