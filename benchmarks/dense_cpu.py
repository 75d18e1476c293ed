"""Dense prediction on CPU: backbone + head images/s and peak memory at detection and segmentation sizes.

Configurations (batch 1, fp32, ``inference_mode``, random weights):

* detection: Mask R-CNN + FPN (torchvision heads at the papers' widths) on an 800×1333 image (``min_size`` 800,
  ``max_size`` 1333, so no resize; the batch is padded to 800×1344). The score threshold is 0, so every model runs
  the mask head on the same 100 detections and head costs do not depend on random scores.
* segmentation: UperNet (512 channels, auxiliary head off at inference) on a 512×512 image.
* backbone: the dense backbone alone (adapter, per-level norms or simple pyramid) at the padded detection size
  (800×1344), to separate the backbone's cost from the heads' (the Mask R-CNN heads and FPN are the same for every
  model).

Models: Vim-Ti, PlainMamba-L1, MambaOut-Femto, MambaVision-T and Spatial-Mamba-T when registered, next to the
baselines DeiT-Ti with the ViTDet-style simple pyramid and ConvNeXt-T with per-stage norms. Each model is built
with its family's dense creation arguments and recipe model arguments (MambaVision's enlarged windows).

Method: per configuration all models are built and warmed up, then timed round-robin (``--rounds`` rounds of
``--iters`` forwards each) so that machine drift hits them alike; the table gives medians over rounds and the median
of per-round speed ratios against both baselines. Timing and peak memory come from ``mambazoo.bench.measure``
(CPU peak memory = peak RSS above the pre-loop RSS, see ``mambazoo.bench.CPU_MEMORY_METHOD``). Results are written
with the machine description to ``benchmarks/results/<name>.{csv,json,md}``.

Usage: python benchmarks/dense_cpu.py [--rounds 3] [--models ...] [--det-size 800 1333] [--seg-size 512]
"""
import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from timm.models import is_model

import mambazoo
from mambazoo import bench
from mambazoo.dense import UperNet, build_mask_rcnn, create_backbone, get_recipe

MODELS = ("vim_tiny_patch16_224", "plainmamba_l1", "mambaout_femto", "mambavision_t", "spatialmamba_t",
          "deit_tiny_patch16_224", "convnext_tiny")
BASELINES = ("deit_tiny_patch16_224", "convnext_tiny")


def _model_kwargs(name: str, task: str) -> dict:
    try:
        return dict(get_recipe(name, task).model_kwargs)
    except ValueError:  # baselines have no recipe
        return {}


def build(name: str, task: str, size: tuple[int, int]) -> torch.nn.Module:
    """A randomly initialised dense model for ``task`` with inputs of ``size`` (height, width)."""
    backbone = create_backbone(name, **_model_kwargs(name, "segmentation" if task == "segmentation" else "detection"))
    if task == "backbone":
        return backbone
    if task == "detection":
        return build_mask_rcnn(backbone, num_classes=80, min_size=min(size), max_size=max(size),
                               box_score_thresh=0.0)
    return UperNet(backbone, num_classes=150, aux_channels=0)


def step_for(model: torch.nn.Module, task: str, image: torch.Tensor) -> Callable[[], None]:
    """One inference call of ``model`` on ``image`` (3, H, W)."""
    model.eval()

    def step() -> None:
        with torch.inference_mode():
            model([image]) if task == "detection" else model(image[None])
    return step


def run_config(names: list[str], baselines: list[str], task: str, size: tuple[int, int], rounds: int,
               iters: int) -> list[dict]:
    """Interleaved rounds over ``names`` for one (task, size); one row per model."""
    device = torch.device("cpu")
    image = torch.rand(3, *size)
    steps, params, errors = {}, {}, {}
    for name in names:
        try:
            model = build(name, task, size)
            params[name] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
            steps[name] = step_for(model, task, image)
            steps[name]()  # warm-up
        except (RuntimeError, ValueError, TypeError) as error:
            errors[name] = f"{type(error).__name__}: {error}"[:200]
            steps.pop(name, None)
        print(f"  built {task} {name}", flush=True)
    runs = {name: [] for name in steps}
    for round_index in range(rounds):
        for name, step in steps.items():
            runs[name].append(bench.measure(step, device, 1, 0, iters))
        print(f"  round {round_index + 1}/{rounds} done", flush=True)
    return [_row(name, task, size, params.get(name), runs.get(name), runs, baselines, errors.get(name))
            for name in names]


def _row(name: str, task: str, size: tuple[int, int], params, model_runs, runs: dict, baselines: list[str],
         error) -> dict:
    row = dict(model=name, task=task, img_size=f"{size[0]}x{size[1]}", param_count=params)
    if error is not None:
        return dict(row, error=error)
    speeds = [run["samples_per_sec"] for run in model_runs]
    row.update(infer_samples_per_sec=float(f"{statistics.median(speeds):.4g}"),
               infer_step_time=round(statistics.median(run["step_time"] for run in model_runs), 1),
               infer_peak_mem_mb=round(statistics.median(run["peak_mem_mb"] for run in model_runs), 1),
               infer_samples_per_sec_min=min(speeds), infer_samples_per_sec_max=max(speeds))
    for baseline in baselines:
        if runs.get(baseline):
            ratios = [a["samples_per_sec"] / b["samples_per_sec"] for a, b in zip(model_runs, runs[baseline])]
            row[f"speed_vs_{baseline}"] = round(statistics.median(ratios), 3)
    return row


def write(rows: list[dict], out_dir: Path, name: str, meta: dict) -> list[Path]:
    """Write CSV/JSON/markdown via ``mambazoo.bench.write_results``, each file moved into place atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tmp-") as tmp:
        written = bench.write_results(rows, Path(tmp), name, meta, plot=False)
        paths = [out_dir / path.name for path in written]
        for source, target in zip(written, paths):
            os.replace(source, target)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    """Run the configurations, print the table, write the results; returns the rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--det-size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    parser.add_argument("--seg-size", type=int, default=512)
    parser.add_argument("--baselines", nargs="*", default=list(BASELINES), help="models to compute speed ratios to")
    parser.add_argument("--tasks", nargs="+", choices=("detection", "segmentation", "backbone"),
                        default=["detection", "segmentation", "backbone"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=1, help="timed forwards per model and round")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="dense_cpu")
    args = parser.parse_args(argv)
    mambazoo.list_models()  # register every family that has landed
    names = [name for name in args.models if is_model(name)]
    skipped = [name for name in args.models if name not in names]
    if skipped:
        print(f"not registered (skipped): {', '.join(skipped)}")
    padded = tuple(-(-side // 32) * 32 for side in args.det_size)  # what the detector's transform feeds the backbone
    sizes = dict(detection=tuple(args.det_size), segmentation=(args.seg_size, args.seg_size), backbone=padded)
    rows = []
    for task in args.tasks:
        print(f"{task} at {sizes[task]}: {', '.join(names)}", flush=True)
        rows += run_config(names, args.baselines, task, sizes[task], args.rounds, args.iters)
    columns = ["model", "task", "img_size", "infer_samples_per_sec", "infer_step_time", "infer_peak_mem_mb",
               *[f"speed_vs_{name}" for name in args.baselines], "param_count", "error"]
    print(bench.markdown_table(rows, [c for c in columns if any(c in row for row in rows)]))
    meta = dict(machine=bench.machine_description("cpu"), cpu_memory_method=bench.CPU_MEMORY_METHOD,
                method=f"batch 1, fp32, inference_mode, random weights; {args.rounds} interleaved rounds of "
                       f"{args.iters} forward(s) per model after one warm-up; medians over rounds; speed_vs_* = "
                       "median per-round img/s ratio; detection = Mask R-CNN + FPN (score threshold 0, 100 "
                       "detections), segmentation = UperNet 512 channels without the auxiliary head, backbone = "
                       "the dense backbone alone at the padded detection size",
                command="python benchmarks/dense_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    for path in write(rows, args.out_dir, args.name, meta):
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
