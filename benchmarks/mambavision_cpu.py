"""MambaVision-T vs timm's ConvNeXt-T and Swin-T on CPU: images/s and peak memory at 224 px, batch 1 and 32.

The paper reports MambaVision-T ahead of both on throughput (A100, batch 128, AMP; ``docs/mambavision.md``); this
measures the CPU. Method: :func:`mambazoo.bench.sweep` — fp32, ``inference_mode``, one input reused, the three models
built once per batch size, warmed up, then timed round-robin (each round runs every model once), medians over rounds;
``speed_vs_mambavision_t`` is the median over rounds of the per-round ratio model img/s ÷ MambaVision-T img/s, so
drift in machine load cancels. Peak memory is the CPU method of :mod:`mambazoo.bench` (peak RSS during the timed
steps above the RSS before them: activations and allocator slack, not the weights).

Usage: python benchmarks/mambavision_cpu.py [--batch-sizes 1 32] [--repeats 5] [--images-per-round 32]
    [--out-dir benchmarks/results]
"""
import argparse
from pathlib import Path

from mambazoo import bench

MODELS = ("mambavision_t", "convnext_tiny", "swin_tiny_patch4_window7_224")
BASELINE = "mambavision_t"
COLUMNS = ["model", "infer_batch_size", "infer_samples_per_sec", "infer_samples_per_sec_min",
           "infer_samples_per_sec_max", "infer_step_time", "infer_peak_mem_mb", "speed_vs_mambavision_t",
           "infer_gmacs", "param_count", "error"]


def run(batch_sizes: list[int], repeats: int, images_per_round: int, num_warm_iter: int) -> list[dict]:
    """One interleaved sweep per batch size at 224 px; rows carry the ratio to MambaVision-T."""
    rows = []
    for batch_size in batch_sizes:
        iters = max(1, round(images_per_round / batch_size))
        print(f"batch {batch_size}: {repeats} rounds of {iters} step(s) per model", flush=True)
        for row in bench.sweep(MODELS, [224], batch_size=batch_size, repeats=repeats, num_warm_iter=num_warm_iter,
                               num_bench_iter=iters, baseline=BASELINE, progress=False):
            row["speed_vs_mambavision_t"] = row.pop("speed_vs_baseline", None)
            rows.append(row)
    return rows


def summary(rows: list[dict]) -> list[str]:
    """MambaVision-T's throughput against each baseline, per batch size."""
    lines = []
    for batch_size in dict.fromkeys(row["infer_batch_size"] for row in rows):
        ratios = {row["model"]: row.get("speed_vs_mambavision_t") for row in rows
                  if row["infer_batch_size"] == batch_size}
        for model in MODELS[1:]:
            if ratios.get(model):
                lines.append(f"batch {batch_size}: MambaVision-T runs at {1 / ratios[model]:.2f}x the images/s of "
                             f"{model} (median per-round ratio)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--images-per-round", type=int, default=32,
                        help="images per model and round; steps = images / batch, at least 1 (default 32)")
    parser.add_argument("--num-warm-iter", type=int, default=2, help="warm-up steps per model (default 2)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    rows = run(args.batch_sizes, args.repeats, args.images_per_round, args.num_warm_iter)
    meta = dict(machine=bench.machine_description("cpu"), cpu_memory_method=bench.CPU_MEMORY_METHOD,
                command=f"python benchmarks/mambavision_cpu.py --batch-sizes {' '.join(map(str, args.batch_sizes))} "
                        f"--repeats {args.repeats} --images-per-round {args.images_per_round} "
                        f"--num-warm-iter {args.num_warm_iter}",
                method="224 px, fp32, inference_mode, models interleaved round-robin, medians over rounds; "
                       "speed_vs_mambavision_t = median per-round ratio model img/s / MambaVision-T img/s",
                summary=summary(rows))
    columns = [column for column in COLUMNS if any(column in row for row in rows)]
    print(bench.markdown_table(rows, columns))
    print("\n".join(meta["summary"]))
    for path in bench.write_results(rows, args.out_dir, "mambavision_cpu", meta, plot=False):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
