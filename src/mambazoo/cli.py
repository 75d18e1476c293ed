"""Command line: ``mambazoo list | flops | bench | demo`` (also ``python -m mambazoo.cli``)."""
import argparse
import fnmatch
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import bench as bench_engine
from .flops import count_model_macs
from .zoo import MODEL_INFO, check_model_name, list_models

DEMO_CANDIDATES = ("vim_tiny_patch16_224", "plainmamba_l1", "spatialmamba_t", "mambaout_femto",
                   "deit_tiny_patch16_224:math", "deit_tiny_patch16_224")
DEMO_RESOLUTIONS = (224, 512, 768, 1024, 1248)
VIM, DEIT_SDPA, DEIT_MATH = "vim_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_patch16_224:math"


def _resolutions(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolutions must be comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"resolutions must be positive integers, got {text!r}")
    return values


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mambazoo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    listing = commands.add_parser("list", help="list the zoo's models (and metadata)")
    listing.add_argument("pattern", nargs="?", default="*")
    listing.add_argument("--pretrained", action="store_true", help="only names with pretrained weight tags")
    listing.add_argument("--info", action="store_true", help="print the published metadata table")

    flops = commands.add_parser("flops", help="count GMACs (conv/linear + 9·B·L·D·N per scan call)")
    flops.add_argument("models", nargs="+")
    flops.add_argument("--img-size", type=_positive, default=224)

    bench = commands.add_parser("bench", help="benchmark models (timm benchmark.py semantics + memory)")
    bench.add_argument("--model", "-m", action="append", required=True,
                       help="model name, or name:math for materialised attention; repeatable")
    bench.add_argument("--batch-size", "-b", type=_positive, default=256)
    bench.add_argument("--img-size", type=_positive, default=None)
    bench.add_argument("--bench", choices=("inference", "train", "both"), default="inference")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--precision", choices=("float32", "float16", "bfloat16", "amp"), default="float32")
    bench.add_argument("--amp-dtype", choices=("float16", "bfloat16"), default="bfloat16")
    bench.add_argument("--channels-last", action="store_true")
    bench.add_argument("--num-warm-iter", type=int, default=10)
    bench.add_argument("--num-bench-iter", type=_positive, default=40)
    bench.add_argument("--no-retry", action="store_true", help="do not lower the batch size on CUDA OOM")
    bench.add_argument("--sweep", type=_resolutions, default=None,
                       help="comma-separated resolutions: interleaved inference sweep instead of single runs")
    bench.add_argument("--repeats", type=_positive, default=3, help="interleaved rounds per resolution (sweep)")
    bench.add_argument("--out-dir", type=Path, default=None, help="write CSV/JSON/markdown (+PNG for sweeps)")
    bench.add_argument("--name", default="bench", help="file stem for --out-dir")
    bench.add_argument("--no-progress", action="store_true")

    demo = commands.add_parser("demo", help="Vim-Ti vs DeiT-Ti resolution sweep on this machine (the headline)")
    demo.add_argument("--resolutions", type=_resolutions, default=list(DEMO_RESOLUTIONS))
    demo.add_argument("--repeats", type=_positive, default=3)
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    demo.add_argument("--name", default="demo_sweep_cpu")
    demo.add_argument("--no-progress", action="store_true")
    return parser


def _check_models(names: Sequence[str]) -> None:
    for text in names:
        check_model_name(bench_engine.ModelSpec.parse(text).name)


def _command_list(args: argparse.Namespace) -> None:
    names = list_models(args.pattern, pretrained=args.pretrained)
    print("\n".join(names))
    if args.info:
        from .zoo import metadata_table

        rows = [row for row in metadata_table() if fnmatch.fnmatchcase(row["name"], args.pattern)]
        print()
        print(bench_engine.markdown_table(rows) if rows else f"no metadata for {args.pattern!r}")


def _command_flops(args: argparse.Namespace) -> None:
    _check_models(args.models)
    rows = []
    for name in args.models:
        count = count_model_macs(name, img_size=args.img_size)
        info = MODEL_INFO.get(name)
        rows.append(dict(model=name, img_size=args.img_size, gmacs=round(count.gmacs, 3),
                         scan_gmacs=round(count.scan / 1e9, 3),
                         reported_gmacs=info.reported_gmacs if info and args.img_size == 224 else None))
    print(bench_engine.markdown_table(rows))


def _command_bench(args: argparse.Namespace) -> None:
    _check_models(args.model)
    meta = dict(machine=bench_engine.machine_description(args.device), cpu_memory_method=bench_engine.CPU_MEMORY_METHOD)
    if args.sweep:
        if args.bench != "inference" or args.precision != "float32" or args.channels_last:
            raise ValueError("--sweep measures fp32 inference: drop --bench/--precision/--channels-last")
        rows = bench_engine.sweep(args.model, args.sweep, batch_size=args.batch_size, repeats=args.repeats,
                                  num_warm_iter=args.num_warm_iter, num_bench_iter=args.num_bench_iter,
                                  device=args.device, progress=not args.no_progress)
    else:
        rows = [bench_engine.benchmark(name, batch_size=args.batch_size, img_size=args.img_size, bench=args.bench,
                                       device=args.device, precision=args.precision, amp_dtype=args.amp_dtype,
                                       channels_last=args.channels_last, num_warm_iter=args.num_warm_iter,
                                       num_bench_iter=args.num_bench_iter, retry_oom=not args.no_retry)
                for name in args.model]
    print(bench_engine.markdown_table(rows))
    if args.out_dir:
        for path in bench_engine.write_results(rows, args.out_dir, args.name, meta, plot=bool(args.sweep)):
            print(f"wrote {path}")


def demo_summary(rows: list[dict]) -> list[str]:
    """The headline lines: where Vim-Ti's throughput crosses DeiT-Ti's, and the ratios at the largest resolution."""
    lines = []
    by_key = {(row["model"], row["infer_img_size"]): row for row in rows}
    largest = max(row["infer_img_size"] for row in rows)
    vim = by_key.get((VIM, largest))
    if vim is None or "error" in vim:
        return [f"{VIM} has no result (not registered or failed): no Vim-vs-DeiT headline."]
    for reference in (DEIT_SDPA, DEIT_MATH):
        base = by_key.get((reference, largest))
        if base is None or "error" in base:
            continue
        label = bench_engine.ModelSpec.parse(reference).label
        crossing = bench_engine.crossover_resolution(rows, VIM, reference)
        where = f"at ≈{crossing:.0f} px" if crossing else "nowhere in the swept range"
        lines.append(f"Vim-Ti's images/s curve crosses {label}'s {where}.")
        speed = vim["infer_samples_per_sec"] / base["infer_samples_per_sec"]
        memory = vim["infer_peak_mem_mb"] / base["infer_peak_mem_mb"]
        lines.append(f"At {largest} px vs {label}: Vim-Ti is {speed:.2f}x as fast "
                     f"(per-round median ratio {vim['speed_vs_baseline'] / base['speed_vs_baseline']:.2f}x) "
                     f"and uses {memory:.2f}x the peak memory ({100 * (1 - memory):+.1f}% saved).")
    return lines


def _command_demo(args: argparse.Namespace) -> None:
    registered = set(list_models()) | {DEIT_SDPA}
    models = [name for name in DEMO_CANDIDATES if bench_engine.ModelSpec.parse(name).name in registered]
    missing = [name for name in DEMO_CANDIDATES if name not in models]
    if missing:
        print(f"not registered (skipped): {', '.join(missing)}")
    print(f"demo sweep: {', '.join(models)} at {args.resolutions} px, batch 1, fp32, {args.repeats} interleaved "
          f"rounds, device {args.device}")
    rows = bench_engine.sweep(models, args.resolutions, batch_size=1, repeats=args.repeats, device=args.device,
                              baseline=DEIT_SDPA, progress=not args.no_progress)
    meta = dict(machine=bench_engine.machine_description(args.device), cpu_memory_method=bench_engine.CPU_MEMORY_METHOD,
                method="batch 1, fp32, inference_mode, 1 warm-up + 1 timed step per round; medians over rounds; "
                       "speed_vs_baseline = median per-round ratio vs deit_tiny_patch16_224 (SDPA)")
    columns = ["label", "infer_img_size", "infer_samples_per_sec", "infer_step_time", "infer_peak_mem_mb",
               "speed_vs_baseline", "infer_gmacs", "param_count", "error"]
    print(bench_engine.markdown_table(rows, [c for c in columns if any(c in row for row in rows)]))
    summary = demo_summary(rows)
    print("\n".join(summary))
    meta["summary"] = summary
    for path in bench_engine.write_results(rows, args.out_dir, args.name, meta):
        print(f"wrote {path}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``mambazoo`` command."""
    args = _parser().parse_args(argv)
    commands = dict(list=_command_list, flops=_command_flops, bench=_command_bench, demo=_command_demo)
    try:
        commands[args.command](args)
    except (ValueError, TypeError) as error:
        print(f"mambazoo {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
