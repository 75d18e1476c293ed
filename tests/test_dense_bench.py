"""Smoke tests of the dense CPU benchmark scripts (tiny models and sizes, one round): rows, ratios and result files."""
import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "dense_cpu.py"


def test_dense_benchmark_runs_interleaved_and_writes_results(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("dense_cpu", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = script.main(["--models", "test_mambaout", "test_vit", "no_such_model", "--baselines", "test_vit",
                        "--tasks", "segmentation", "backbone", "--det-size", "60", "90", "--seg-size", "32",
                        "--rounds", "1", "--out-dir", str(tmp_path), "--name", "smoke"])
    assert [(r["model"], r["task"], r["img_size"]) for r in rows] == [
        ("test_mambaout", "segmentation", "32x32"), ("test_vit", "segmentation", "32x32"),
        ("test_mambaout", "backbone", "64x96"), ("test_vit", "backbone", "64x96")]  # padded to multiples of 32
    assert all(r["infer_samples_per_sec"] > 0 and r["infer_peak_mem_mb"] >= 0 for r in rows)
    assert [r["speed_vs_test_vit"] for r in rows if r["model"] == "test_vit"] == [1.0, 1.0]  # itself
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved["results"] == rows and "cpu" in saved["meta"]["machine"]
    assert {p.name for p in tmp_path.iterdir()} == {"smoke.csv", "smoke.json", "smoke.md"}


def test_dense_training_benchmark_compares_the_engine_with_the_raw_step(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("dense_train_cpu", SCRIPT.with_name("dense_train_cpu.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = script.main(["--models", "test_mambaout", "no_such_model", "--tasks", "segmentation", "--img-size", "32",
                        "--steps", "1", "--warm-iter", "0", "--repeats", "1", "--out-dir", str(tmp_path)])
    assert [(r["task"], r["model"], r["img_size"]) for r in rows] == [("segmentation", "test_mambaout", 32)]
    row = rows[0]
    assert row["raw_train_samples_per_sec"] > 0 and row["engine_train_samples_per_sec"] > 0
    # one round: the ratio of the two speeds, computed before each was rounded to 3 decimals (±0.0005)
    engine, raw = row["engine_train_samples_per_sec"], row["raw_train_samples_per_sec"]
    assert (engine - 5e-4) / (raw + 5e-4) - 5e-4 <= row["engine_vs_raw"] <= (engine + 5e-4) / (raw - 5e-4) + 5e-4
    assert json.loads((tmp_path / "dense_train_cpu.json").read_text())["results"] == rows
