"""Command line: mambazoo list | flops | bench | demo | export | predict | train | validate (python -m mambazoo).

Each subcommand is a pair of functions: ``_add_<name>(commands)`` declares its arguments and ``_run_<name>(args)``
runs it. Heavy modules (torch, timm, the models) are imported inside the ``_run_*`` functions, so ``mambazoo --help``
starts in a fraction of a second. ``train`` and ``validate`` are handed to their own modules (``mambazoo.train``,
``mambazoo.validate``, which ``torchrun -m`` also runs) with their own flags.
"""
import argparse
import ast
import fnmatch
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from . import __version__

DEMO_CANDIDATES = ("vim_tiny_patch16_224", "plainmamba_l1", "mambavision_t", "spatialmamba_t", "mambaout_femto",
                   "deit_tiny_patch16_224:math", "deit_tiny_patch16_224")
DEMO_RESOLUTIONS = (224, 512, 768, 1024, 1248)
# Subcommands handled by their own modules (flags: ``mambazoo train --help``; docs/training.md).
DELEGATED = {"train": "train or fine-tune a model, one process or many under torchrun",
             "validate": "evaluate weights or a training run (top-1/top-5, box/mask AP or mIoU)"}
VIM, DEIT_SDPA, DEIT_MATH = "vim_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_patch16_224:math"
EXPORT_FORMATS = ("onnx", "pt2")


def default_results_dir() -> Path:
    """Where ``mambazoo demo`` writes by default: $XDG_CACHE_HOME/mambazoo/results (~/.cache/mambazoo/results)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "mambazoo" / "results"


def _resolutions(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolutions must be comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"resolutions must be positive integers, got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


class ParseKwargs(argparse.Action):
    """``key=value`` pairs into a dict; values are Python literals where they parse (as timm's ``ParseKwargs``).

    Repeating the flag adds to the pairs given before.
    """

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        kwargs = dict(getattr(namespace, self.dest, None) or {})
        for item in values:
            key, separator, text = item.partition("=")
            if not separator or not key:
                raise argparse.ArgumentError(self, f"expected key=value, got {item!r}")
            try:
                kwargs[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                kwargs[key] = text
        setattr(namespace, self.dest, kwargs)


def _add_list(commands) -> None:
    parser = commands.add_parser("list", help="list the zoo's models and their metadata",
                                 description="List the registered models of the zoo.")
    parser.add_argument("pattern", nargs="?", default="*",
                        help="shell-style name pattern, e.g. 'vim_*' (default: *, every model)")
    parser.add_argument("--pretrained", action="store_true",
                        help="list only names with pretrained weight tags (default: off)")
    parser.add_argument("--info", action="store_true",
                        help="also print the published metadata of the registered variants (default: off)")


def _add_flops(commands) -> None:
    parser = commands.add_parser("flops", help="count GMACs (conv and linear MACs plus 9*B*L*D*N per scan call); "
                                               "also without the scan, and without scan and attention (the "
                                               "conventions of some papers)",
                                 description="Count inference GMACs the way the papers report them.")
    parser.add_argument("models", nargs="+", help="model names")
    parser.add_argument("--img-size", type=_positive, default=224, help="square input size in pixels (default: 224)")


def _add_bench(commands) -> None:
    parser = commands.add_parser("bench", help="benchmark models (timm benchmark.py semantics plus peak memory)",
                                 description="Benchmark models with timm's benchmark.py method plus peak memory.")
    parser.add_argument("--model", "-m", action="append", required=True,
                        help="model name, or name:math for materialised attention; repeatable (required)")
    parser.add_argument("--batch-size", "-b", type=_positive, default=None,
                        help="images per step (default: 1 on CPU, 256 on CUDA as timm)")
    parser.add_argument("--img-size", type=_positive, default=None,
                        help="square input size (default: the model's test input size)")
    parser.add_argument("--bench", choices=("inference", "train", "both"), default="inference",
                        help="what to time (default: inference)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--precision", choices=("float32", "float16", "bfloat16", "amp"), default="float32",
                        help="model and input precision, or amp for autocast (default: float32)")
    parser.add_argument("--amp-dtype", choices=("float16", "bfloat16"), default="bfloat16",
                        help="autocast dtype with --precision amp (default: bfloat16)")
    parser.add_argument("--channels-last", action="store_true",
                        help="use the channels-last memory format (default: off)")
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                        help="extra model arguments, e.g. scan_backend=torch (default: none)")
    parser.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="torch.compile the model with this backend; alone it means inductor (default: eager)")
    parser.add_argument("--num-warm-iter", type=_non_negative, default=10, help="untimed warm-up steps (default: 10)")
    parser.add_argument("--num-bench-iter", type=_positive, default=40, help="timed steps (default: 40)")
    parser.add_argument("--no-retry", action="store_true",
                        help="do not lower the batch size on CUDA out-of-memory (default: retry)")
    parser.add_argument("--sweep", type=_resolutions, default=None,
                        help="comma-separated resolutions: interleaved inference sweep instead of single runs "
                             "(default: single runs)")
    parser.add_argument("--repeats", type=_positive, default=3,
                        help="interleaved rounds per resolution in a sweep (default: 3)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="write CSV, JSON and markdown (and a PNG for sweeps) there (default: print only)")
    parser.add_argument("--name", default="bench", help="file name stem in --out-dir (default: bench)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")


def _add_demo(commands) -> None:
    parser = commands.add_parser("demo", help="Vim-Ti vs DeiT-Ti resolution sweep on this machine (the main job)",
                                 description="Sweep Vim-Ti, PlainMamba-L1, MambaOut-Femto and DeiT-Ti over "
                                             "resolutions at batch 1, fp32, and report where Vim-Ti overtakes DeiT-Ti.")
    parser.add_argument("--resolutions", type=_resolutions, default=list(DEMO_RESOLUTIONS),
                        help=f"comma-separated resolutions (default: {','.join(map(str, DEMO_RESOLUTIONS))})")
    parser.add_argument("--repeats", type=_positive, default=3, help="interleaved rounds per resolution (default: 3)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help=f"where to write the CSV, JSON, markdown and PNG (default: {default_results_dir()}, "
                             f"i.e. $XDG_CACHE_HOME/mambazoo/results)")
    parser.add_argument("--name", default=None,
                        help="file name stem (default: demo_sweep_<device type>, e.g. demo_sweep_cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")


def _add_export(commands) -> None:
    parser = commands.add_parser("export", help="export a model to ONNX (.onnx) or a torch.export program (.pt2)",
                                 description="Export a model to ONNX (opset 18, dynamic batch, checked with ONNX "
                                             "Runtime against PyTorch) or to a torch.export program.")
    parser.add_argument("--model", "-m", required=True, help="model name (required)")
    parser.add_argument("--output", "-o", type=Path, default=None,
                        help="output file (default: <model>.<format> in the current directory)")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default=None,
                        help="onnx or pt2 (default: from the --output suffix, else onnx)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="weights file to load (.safetensors or .pth) (default: random weights)")
    parser.add_argument("--pretrained", action="store_true",
                        help="download the official weights (default: off; needs network)")
    parser.add_argument("--num-classes", type=_non_negative, default=None,
                        help="classifier outputs, 0 for features (default: the model's)")
    parser.add_argument("--img-size", type=_positive, default=None,
                        help="square input size fixed in the export (default: the model's input size)")
    parser.add_argument("--batch-size", type=_positive, default=2,
                        help="batch of the example input; the batch stays dynamic unless --static-batch "
                             "(default: 2)")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size (default: dynamic)")
    parser.add_argument("--opset", type=_positive, default=18, help="ONNX opset (default: 18)")
    parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                        help="extra model arguments, e.g. scan_backend=torch (default: none)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the ONNX Runtime check against PyTorch (default: check)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mambazoo", description="Visual state-space models for timm: list, count "
                                     "FLOPs, benchmark, export, train, detect and segment.")
    parser.add_argument("--version", action="version", version=f"mambazoo {__version__}",
                        help="print the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_list, _add_flops, _add_bench, _add_demo, _add_export, _add_predict):
        add(commands)
    for name, text in DELEGATED.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


def _check_models(names: Sequence[str]) -> None:
    from .bench import ModelSpec
    from .zoo import check_model_name

    for text in names:
        check_model_name(ModelSpec.parse(text).name)


def _warn_if_loaded() -> None:
    from .bench import load_warning

    warning = load_warning()
    if warning:
        print(warning, file=sys.stderr)


def _run_list(args: argparse.Namespace) -> None:
    from .bench import markdown_table
    from .zoo import list_models, metadata_table

    print("\n".join(list_models(args.pattern, pretrained=args.pretrained)))
    if args.info:
        rows = [row for row in metadata_table(registered_only=True) if fnmatch.fnmatchcase(row["name"], args.pattern)]
        print()
        print(markdown_table([{k: v for k, v in row.items() if k != "registered"} for row in rows]) if rows
              else f"no metadata for {args.pattern!r}")


def _run_flops(args: argparse.Namespace) -> None:
    from .bench import markdown_table
    from .flops import count_model_macs
    from .zoo import MODEL_INFO

    _check_models(args.models)
    rows = []
    for name in args.models:
        count = count_model_macs(name, img_size=args.img_size)
        info = MODEL_INFO.get(name)
        rows.append(dict(model=name, img_size=args.img_size, gmacs=round(count.gmacs, 3),
                         scan_gmacs=round(count.scan / 1e9, 3), attn_gmacs=round(count.attention / 1e9, 3),
                         gmacs_excl_scan=round(count.excl_scan / 1e9, 3),
                         gmacs_excl_scan_attn=round(count.excl_scan_attention / 1e9, 3),
                         reported_gmacs=info.reported_gmacs if info and args.img_size == info.img_size else None))
    print(markdown_table(rows))


def _run_bench(args: argparse.Namespace) -> None:
    from . import bench

    _check_models(args.model)
    bench.resolve_device(args.device)
    batch_size = args.batch_size or bench.default_batch_size(args.device)
    _warn_if_loaded()
    precision = args.precision + (f" ({args.amp_dtype})" if args.precision == "amp" else "")
    meta = dict(machine=bench.machine_description(args.device), cpu_memory_method=bench.CPU_MEMORY_METHOD,
                precision=precision)
    if args.sweep:
        if args.bench != "inference" or args.torchcompile or args.model_kwargs:
            raise ValueError("--sweep measures eager inference: drop --bench/--torchcompile/--model-kwargs")
        rows = bench.sweep(args.model, args.sweep, batch_size=batch_size, repeats=args.repeats,
                           num_warm_iter=args.num_warm_iter, num_bench_iter=args.num_bench_iter,
                           device=args.device, precision=args.precision, amp_dtype=args.amp_dtype,
                           channels_last=args.channels_last, progress=not args.no_progress)
    else:
        rows = [bench.benchmark(name, batch_size=batch_size, img_size=args.img_size, bench=args.bench,
                                device=args.device, precision=args.precision, amp_dtype=args.amp_dtype,
                                channels_last=args.channels_last, num_warm_iter=args.num_warm_iter,
                                num_bench_iter=args.num_bench_iter, retry_oom=not args.no_retry,
                                model_kwargs=args.model_kwargs, torchcompile=args.torchcompile,
                                progress=not args.no_progress)
                for name in args.model]
    print(bench.markdown_table(rows))
    if args.out_dir:
        title = _plot_title(meta["machine"], batch_size, precision)
        for path in bench.write_results(rows, args.out_dir, args.name, meta, plot=bool(args.sweep),
                                        plot_title=title):
            print(f"wrote {path}")


def _plot_title(machine: dict, batch_size: int, precision: str) -> str:
    where = machine.get("gpu") or f"{machine['cpu']} ({machine['torch_threads']} threads)"
    return f"{machine['device']}: {where}, batch {batch_size}, {precision}, inference"


def demo_summary(rows: list[dict]) -> list[str]:
    """The headline lines: where Vim-Ti's throughput crosses DeiT-Ti's, and the ratios at the largest resolution."""
    from .bench import ModelSpec, crossover_resolution

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
        label = ModelSpec.parse(reference).label
        crossing = crossover_resolution(rows, VIM, reference)
        where = f"at about {crossing:.0f} px" if crossing else "nowhere in the swept range"
        lines.append(f"Vim-Ti's images/s curve crosses {label}'s {where}.")
        speed = vim["infer_samples_per_sec"] / base["infer_samples_per_sec"]
        memory = vim["infer_peak_mem_mb"] / base["infer_peak_mem_mb"]
        lines.append(f"At {largest} px vs {label}: Vim-Ti is {speed:.2f}x as fast "
                     f"(per-round median ratio {vim['speed_vs_baseline'] / base['speed_vs_baseline']:.2f}x) "
                     f"and uses {memory:.2f}x the peak memory ({100 * (1 - memory):+.1f}% saved).")
    return lines


def _run_demo(args: argparse.Namespace) -> None:
    from . import bench
    from .zoo import list_models

    bench.resolve_device(args.device)
    out_dir = args.out_dir or default_results_dir()
    registered = set(list_models()) | {DEIT_SDPA}
    models = [name for name in DEMO_CANDIDATES if bench.ModelSpec.parse(name).name in registered]
    missing = [name for name in DEMO_CANDIDATES if name not in models]
    if missing:
        print(f"not registered (skipped): {', '.join(missing)}")
    _warn_if_loaded()
    print(f"demo sweep: {', '.join(models)} at {args.resolutions} px, batch 1, fp32, {args.repeats} interleaved "
          f"rounds, device {args.device}; results go to {out_dir}")
    rows = bench.sweep(models, args.resolutions, batch_size=1, repeats=args.repeats, device=args.device,
                       baseline=DEIT_SDPA, progress=not args.no_progress)
    meta = dict(machine=bench.machine_description(args.device), cpu_memory_method=bench.CPU_MEMORY_METHOD,
                method="batch 1, fp32, inference_mode, 1 warm-up + 1 timed step per round; medians over rounds; "
                       "speed_vs_baseline = median per-round ratio vs deit_tiny_patch16_224 (SDPA)")
    columns = ["label", "infer_img_size", "infer_samples_per_sec", "infer_step_time", "infer_peak_mem_mb",
               "speed_vs_baseline", "infer_gmacs", "param_count", "error"]
    print(bench.markdown_table(rows, [c for c in columns if any(c in row for row in rows)]))
    summary = demo_summary(rows)
    print("\n".join(summary))
    meta["summary"] = summary
    title = _plot_title(meta["machine"], 1, "float32")
    name = args.name or f"demo_sweep_{args.device.split(':')[0]}"
    for path in bench.write_results(rows, out_dir, name, meta, plot_title=title):
        print(f"wrote {path}")


def _run_export(args: argparse.Namespace) -> None:
    from . import export
    from .zoo import create_model

    _check_models([args.model])
    fmt = args.format or (args.output.suffix.lstrip(".") if args.output and args.output.suffix else "onnx")
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"cannot tell the format from {args.output}: pass --format onnx or --format pt2")
    output = args.output or Path(f"{args.model}.{fmt}")
    kwargs = dict(args.model_kwargs)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    if args.checkpoint is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(args.checkpoint))
    model = _create_for_export(create_model, args.model, args.pretrained or args.checkpoint is not None, kwargs)
    example = export.example_input(model, args.batch_size, args.img_size)
    if fmt == "onnx":
        result = export.export_onnx(model, output, example, dynamic_batch=not args.static_batch, opset=args.opset,
                                    verify=not args.no_verify)
    else:
        result = export.export_program(model, output, example, dynamic_batch=not args.static_batch)
    batch = "dynamic batch" if result.dynamic_batch else f"batch {result.input_shape[0]}"
    print(f"wrote {result.path} ({fmt}, input {tuple(result.input_shape[1:])} with {batch})")
    if result.max_abs_error is not None:
        print(f"max |exported - eager| = {result.max_abs_error:.3g} (outputs up to {result.max_abs_output:.3g})")


def _create_for_export(create: Callable, name: str, pretrained: bool, kwargs: dict[str, Any]):
    """Create the model; models without an ``img_size`` argument take any size, so it is dropped for them."""
    try:
        return create(name, pretrained=pretrained, **kwargs)
    except TypeError as error:
        if "img_size" not in str(error) or "img_size" not in kwargs:
            raise
    return create(name, pretrained=pretrained, **{k: v for k, v in kwargs.items() if k != "img_size"})


def _add_predict(commands) -> None:
    parser = commands.add_parser("predict", help="draw detections or a segmentation of an image into a PNG",
                                 description="Run a detection (Mask R-CNN) or segmentation (UperNet) model on one "
                                             "image and draw its boxes, masks or class map into a PNG: a training "
                                             "run (--checkpoint RUN_FOLDER), or --model and --task with random "
                                             "weights or --checkpoint FILE.")
    parser.add_argument("--model", "-m", default=None,
                        help="registered backbone name, e.g. vim_tiny_patch16_224 (default: the run's)")
    parser.add_argument("--task", choices=("detection", "segmentation"), default=None,
                        help="the head (default: the run's)")
    parser.add_argument("--image", type=Path, required=True, help="input image, any format PIL reads (required)")
    parser.add_argument("--output", "-o", type=Path, required=True, help="PNG to write (required)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a detection/segmentation training run folder (its model, classes and best weights), "
                             "or a file with the weights of the whole dense model (default: random weights)")
    parser.add_argument("--classes", type=Path, default=None,
                        help="a dataset's classes.json giving names and count, without a run folder (default: none)")
    parser.add_argument("--num-classes", type=_positive, default=None,
                        help="class count when no --classes is given (default: none)")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="detection: lowest score drawn (default: 0.5)")
    parser.add_argument("--min-size", type=_positive, default=None,
                        help="detection: shorter side after resizing (default: the run's, else 800)")
    parser.add_argument("--max-size", type=_positive, default=None,
                        help="detection: longer side limit (default: the run's, else 1333)")
    parser.add_argument("--slide", type=_positive, nargs=2, metavar=("CROP", "STRIDE"), default=None,
                        help="segmentation: sliding-window inference with square crops (default: the run's test "
                             "mode, else whole image)")
    parser.add_argument("--head", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE",
                        help="options of build_mask_rcnn / UperNet without a run folder, e.g. fpn_channels=128; "
                             "must match the checkpoint (default: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default: 0)")


def _run_predict(args: argparse.Namespace) -> None:
    from .dense.predict import run_predict

    run_predict(args)


_COMMANDS = dict(list=_run_list, flops=_run_flops, bench=_run_bench, demo=_run_demo, export=_run_export,
                 predict=_run_predict)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``mambazoo`` command; returns the exit status (2 for errors in the arguments or inputs)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        return importlib.import_module(f"mambazoo.{argv[0]}").main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        _COMMANDS[args.command](args)
    except (ValueError, TypeError, OSError, ImportError) as error:
        print(f"mambazoo {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
