"""Benchmark engine and CLI: end-to-end runs on tiny test models, output files, peak memory, arguments."""
import csv
import json
from pathlib import Path

import pytest
import torch

from mambazoo import bench, cli
from mambazoo.flops import count_model_macs

TIMM_COLUMNS = {"model", "infer_samples_per_sec", "infer_step_time", "infer_batch_size", "infer_img_size",
                "param_count", "infer_gmacs"}


def test_benchmark_inference_and_train_columns() -> None:
    row = bench.benchmark("test_mambaout", batch_size=2, img_size=32, bench="both", num_warm_iter=1,
                          num_bench_iter=2)
    assert TIMM_COLUMNS | {"infer_peak_mem_mb", "train_samples_per_sec", "train_step_time", "train_peak_mem_mb",
                           "train_batch_size", "train_img_size"} <= set(row)
    assert row["infer_batch_size"] == row["train_batch_size"] == 2 and row["infer_img_size"] == 32
    assert row["infer_samples_per_sec"] > 0 and row["train_step_time"] > 0 and row["infer_peak_mem_mb"] >= 0
    assert row["infer_gmacs"] == round(count_model_macs("test_mambaout", img_size=32).gmacs, 2)
    model = bench.build_model(bench.ModelSpec("test_mambaout"), 32, torch.device("cpu"))
    assert row["param_count"] == round(sum(p.numel() for p in model.parameters()) / 1e6, 2)


def test_materialised_attention_spec_switches_every_attention_and_keeps_the_math() -> None:
    spec = bench.ModelSpec.parse("test_vit:math")
    assert spec == bench.ModelSpec("test_vit", materialize_attention=True) and spec.key == "test_vit:math"
    assert "materialised" in spec.label and "SDPA" in bench.ModelSpec.parse("deit_tiny_patch16_224").label
    torch.manual_seed(0)
    fused = bench.build_model(bench.ModelSpec("test_vit"), 160, torch.device("cpu")).eval()
    math = bench.build_model(spec, 160, torch.device("cpu")).eval()
    math.load_state_dict(fused.state_dict())
    flags = [m.fused_attn for m in math.modules() if hasattr(m, "fused_attn")]
    assert flags and not any(flags)
    images = torch.randn(1, 3, 160, 160)
    with torch.inference_mode():
        torch.testing.assert_close(math(images), fused(images), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no timm attention module"):
        bench.build_model(bench.ModelSpec.parse("test_mambaout:math"), 32, torch.device("cpu"))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_cpu_peak_memory_sees_a_64_mb_allocation() -> None:
    with bench.PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(16 * 2**20)  # 64 MiB, written so that it is resident
        del block
    assert 60 <= memory.mb < 200
    with bench.PeakMemory(torch.device("cpu")) as idle:
        pass
    assert idle.mb < 20


def test_sweep_writes_valid_csv_json_markdown_png(tmp_path: Path) -> None:
    models = ["test_mambaout", "test_vit:math", "test_vit"]
    rows = bench.sweep(models, [32, 48], repeats=2, progress=False)
    assert [(r["model"], r["infer_img_size"]) for r in rows] == [(m, s) for s in (32, 48) for m in models]
    assert all(r["infer_samples_per_sec"] > 0 and "error" not in r for r in rows)
    assert all(r["speed_vs_baseline"] == 1.0 for r in rows if r["model"] == "test_vit")  # ratio to itself
    paths = bench.write_results(rows, tmp_path, "sweep", meta=dict(machine=bench.machine_description()))
    assert [p.suffix for p in paths] == [".csv", ".json", ".md", ".png"]
    with open(paths[0]) as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 6 and float(table[0]["infer_samples_per_sec"]) == rows[0]["infer_samples_per_sec"]
    stored = json.loads(paths[1].read_text())
    assert stored["results"] == rows and stored["meta"]["machine"]["torch"] == torch.__version__
    report = paths[2].read_text()
    assert report.startswith("# sweep\n") and f"torch: {torch.__version__}" in report
    assert sum(line.startswith("| test_") for line in report.splitlines()) == 6
    assert paths[3].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("precision,expected", [("amp", torch.bfloat16), ("bfloat16", torch.bfloat16)])
def test_sweep_runs_reduced_precision(monkeypatch, precision, expected) -> None:
    seen = []
    build = bench.build_model

    def build_and_watch(*args, **kwargs):
        model = build(*args, **kwargs)
        model.head.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
        return model

    monkeypatch.setattr(bench, "build_model", build_and_watch)
    rows = bench.sweep(["test_vit"], [32], repeats=1, precision=precision, amp_dtype="bfloat16", progress=False)
    assert rows[0]["infer_precision"] == precision and rows[0]["infer_samples_per_sec"] > 0
    assert seen and set(seen) == {expected}


def test_cli_sweep_accepts_amp_and_refuses_train(tmp_path: Path, capsys) -> None:
    arguments = ["bench", "-m", "test_vit", "--sweep", "32", "-b", "1", "--repeats", "1", "--num-warm-iter", "0",
                 "--num-bench-iter", "1", "--no-progress", "--precision", "amp", "--amp-dtype", "bfloat16"]
    assert cli.main(arguments + ["--out-dir", str(tmp_path), "--name", "amp"]) == 0
    stored = json.loads((tmp_path / "amp.json").read_text())
    assert stored["meta"]["precision"] == "amp (bfloat16)" and stored["results"][0]["infer_precision"] == "amp"
    assert cli.main(arguments + ["--bench", "train"]) == 2
    assert "--sweep measures eager inference" in capsys.readouterr().err


def test_sweep_records_failures_instead_of_aborting() -> None:
    rows = bench.sweep(["test_vit", "test_mambaout:math"], [32], repeats=1, progress=False, baseline="test_vit")
    assert "no timm attention module" in rows[1]["error"] and rows[0]["infer_samples_per_sec"] > 0


def test_cuda_out_of_memory_lowers_the_batch_and_retries() -> None:
    tried = []

    def run(batch_size: int) -> dict:
        tried.append(batch_size)
        if batch_size > 100:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return dict(samples_per_sec=1.0)

    assert bench.run_with_oom_retry(run, 256, torch.device("cuda")) == (dict(samples_per_sec=1.0), 96)
    assert tried == [256, 192, 128, 96]  # timm's decay_batch_step
    with pytest.raises(torch.OutOfMemoryError):
        bench.run_with_oom_retry(run, 256, torch.device("cuda"), retry=False)
    with pytest.raises(torch.OutOfMemoryError):  # on CPU an allocation failure is not retried
        bench.run_with_oom_retry(run, 256, torch.device("cpu"))


def test_crossover_resolution_interpolates_log_ratio() -> None:
    rows = [dict(model="a", infer_img_size=100, infer_samples_per_sec=1.0),
            dict(model="b", infer_img_size=100, infer_samples_per_sec=2.0),
            dict(model="a", infer_img_size=200, infer_samples_per_sec=4.0),
            dict(model="b", infer_img_size=200, infer_samples_per_sec=2.0)]
    assert bench.crossover_resolution(rows, "a", "b") == pytest.approx(150.0)  # log ratios -ln2 -> +ln2
    assert bench.crossover_resolution(rows, "b", "a") is None


def test_demo_summary_reports_crossing_and_ratios() -> None:
    def row(model, size, speed, memory, ratio):
        return dict(model=model, infer_img_size=size, infer_samples_per_sec=speed, infer_peak_mem_mb=memory,
                    speed_vs_baseline=ratio)
    rows = [row(cli.VIM, 224, 1.0, 10.0, 0.5), row(cli.DEIT_SDPA, 224, 2.0, 10.0, 1.0),
            row(cli.VIM, 1248, 0.8, 20.0, 2.0), row(cli.DEIT_SDPA, 1248, 0.4, 40.0, 1.0)]
    lines = cli.demo_summary(rows)
    # crossing: log ratios -ln2 at 224, +ln2 at 1248 -> midpoint 736; speed 2x, memory 0.5x (50% saved)
    assert "at about 736 px" in lines[0] and "2.00x as fast" in lines[1] and "0.50x the peak memory" in lines[1]
    assert "+50.0% saved" in lines[1]


def test_bad_arguments_give_clear_errors(capsys) -> None:
    with pytest.raises(ValueError, match="unknown model name 'no_such_model'"):
        bench.benchmark("no_such_model", batch_size=1)
    with pytest.raises(ValueError, match="batch_size must be positive, got 0"):
        bench.benchmark("test_mambaout", batch_size=0)
    with pytest.raises(ValueError, match="bench must be"):
        bench.benchmark("test_mambaout", bench="everything")
    with pytest.raises(ValueError, match="precision must be"):
        bench.benchmark("test_mambaout", batch_size=1, precision="float8")
    with pytest.raises(ValueError, match="resolution 0 must be positive"):
        bench.sweep(["test_mambaout"], [0])
    assert cli.main(["bench", "-m", "no_such_model"]) == 2
    assert "unknown model name 'no_such_model'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "-m", "test_mambaout", "-b", "0"])
    assert "must be a positive integer" in capsys.readouterr().err


def test_cli_bench_and_flops(tmp_path: Path, capsys) -> None:
    assert cli.main(["bench", "-m", "test_mambaout", "-b", "1", "--img-size", "32", "--num-warm-iter", "0",
                     "--num-bench-iter", "1", "--out-dir", str(tmp_path), "--name", "single"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["single.csv", "single.json", "single.md"]
    assert json.loads((tmp_path / "single.json").read_text())["results"][0]["model"] == "test_mambaout"
    capsys.readouterr()
    assert cli.main(["flops", "mambaout_femto"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("| model"))
    row = next(line for line in lines if line.startswith("| mambaout_femto"))
    cells = dict(zip(header.strip("| ").split(" | "), row.strip("| ").split(" | ")))
    assert (cells["img_size"], cells["scan_gmacs"], cells["reported_gmacs"]) == ("224", "0.0", "1.2")
    assert float(cells["gmacs"]) == pytest.approx(1.15, rel=5e-3)  # docs/mambaout.md counted figure
    assert cells["gmacs_excl_scan"] == cells["gmacs_excl_scan_attn"] == cells["gmacs"]  # no scan, no attention
