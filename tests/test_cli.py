"""The command line and the import cost: help texts, version, device errors, defaults, demo output location."""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mambazoo
from mambazoo import bench, cli

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args, "-c", code] if code else [sys.executable, *args],
                          capture_output=True, text=True, env=env, timeout=300)


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices, mambazoo=parser)


@pytest.mark.parametrize("command", ["mambazoo", "list", "flops", "bench", "demo", "export"])
def test_help_is_plain_and_every_option_states_its_default(command: str) -> None:
    parser = _subparsers()[command]
    assert parser.format_help().isascii()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        assert action.help, action.dest
        if action.option_strings:
            assert "(default:" in action.help or "(required)" in action.help, (command, action.dest)


def test_help_and_version_do_not_import_torch_and_ops_do_not_import_timm() -> None:
    code = """
import sys
from mambazoo import cli
for argv in (["--help"], ["bench", "--help"], ["--version"]):
    try:
        cli.main(argv)
    except SystemExit:
        pass
print("AFTER_HELP", sorted(m for m in ("torch", "timm", "triton") if m in sys.modules))
import mambazoo.ops
heavy = ("timm", "triton", "mambazoo.models", "mambazoo.ops.native", "mambazoo.ops.triton_scan")
print("AFTER_OPS", sorted(m for m in heavy if m in sys.modules))
import timm
print("REGISTERED", timm.is_model("test_vim"), timm.is_model("test_plainmamba"))
"""
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert "AFTER_HELP []" in result.stdout and "AFTER_OPS []" in result.stdout
    assert "REGISTERED True True" in result.stdout  # models register when timm is imported after mambazoo
    assert f"mambazoo {mambazoo.__version__}" in result.stdout


def test_python_m_mambazoo_works() -> None:
    result = _run_python("", "-m", "mambazoo", "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"mambazoo {mambazoo.__version__}"


def test_version_matches_the_package_metadata() -> None:
    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert mambazoo.__version__ == declared


@pytest.mark.parametrize("device, message", [
    ("foo", "unknown device 'foo'"),
    ("meta", "the meta device holds shapes without data"),
    pytest.param("cuda", "CUDA is not available", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="GPU")),
])
def test_bad_devices_give_clear_errors(device: str, message: str, capsys) -> None:
    assert cli.main(["bench", "-m", "test_mambaout", "--device", device]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match=message):
        bench.benchmark("test_mambaout", device=device)


def test_batch_size_defaults_fit_the_device() -> None:
    assert bench.default_batch_size("cpu") == 1 and bench.default_batch_size("cuda:0") == 256
    row = bench.benchmark("test_mambaout", img_size=32, num_warm_iter=0, num_bench_iter=1, count_gmacs=False)
    assert row["infer_batch_size"] == 1


def test_model_kwargs_reach_the_model(capsys) -> None:
    assert cli.main(["bench", "-m", "test_vim", "--model-kwargs", "depth=1", "scan_backend=torch",
                     "--num-warm-iter", "0", "--num-bench-iter", "1", "--no-progress"]) == 0
    table = capsys.readouterr().out
    one_block = mambazoo.create_model("test_vim", depth=1)
    params = round(sum(p.numel() for p in one_block.parameters()) / 1e6, 2)
    assert f"| test_vim | {params} |" in table
    parsed = cli._parser().parse_args(["bench", "-m", "x", "--model-kwargs", "a=1", "b=torch", "c=(1, 2)"])
    assert parsed.model_kwargs == {"a": 1, "b": "torch", "c": (1, 2)}


def test_torchcompile_runs_compiled_and_skips_gmacs() -> None:
    row = bench.benchmark("test_mambaout", batch_size=1, img_size=32, num_warm_iter=1, num_bench_iter=1,
                          torchcompile="eager")
    assert row["infer_samples_per_sec"] > 0 and "infer_gmacs" not in row


def test_benchmark_restores_the_global_cuda_flags(monkeypatch) -> None:
    seen = {}

    def build_and_fail(*args, **kwargs):
        seen.update(tf32=torch.backends.cuda.matmul.allow_tf32, cudnn=torch.backends.cudnn.benchmark)
        raise RuntimeError("stop after the flags were set")

    monkeypatch.setattr(bench, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(bench, "build_model", build_and_fail)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    with pytest.raises(RuntimeError, match="stop after"):
        bench.benchmark("test_mambaout", device="cuda")
    assert seen == dict(tf32=True, cudnn=True)  # timm's settings while benchmarking
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark) == before


def test_load_warning_compares_load_average_with_cores(monkeypatch) -> None:
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "getloadavg", lambda: (cores * 0.5 + 0.2, 0.0, 0.0))
    assert f"on {cores} usable cores" in bench.load_warning()
    monkeypatch.setattr(os, "getloadavg", lambda: (cores * 0.5, 0.0, 0.0))
    assert bench.load_warning() is None


def test_demo_writes_to_the_user_cache_not_the_checkout(tmp_path: Path, monkeypatch, capsys) -> None:
    def fake_sweep(models, resolutions, **kwargs):
        return [dict(model=m, label=m, infer_img_size=r, infer_batch_size=1, infer_samples_per_sec=1.0 + i,
                     infer_step_time=1.0, infer_peak_mem_mb=1.0, speed_vs_baseline=1.0)
                for r in resolutions for i, m in enumerate(models)]

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "sweep", fake_sweep)
    assert cli.main(["demo", "--resolutions", "32,64", "--no-progress"]) == 0
    out_dir = tmp_path / "cache" / "mambazoo" / "results"
    assert sorted(p.name for p in out_dir.iterdir()) == [f"demo_sweep_cpu.{s}" for s in ("csv", "json", "md", "png")]
    assert f"results go to {out_dir}" in capsys.readouterr().out
    assert not (tmp_path / "benchmarks").exists()
    meta = json.loads((out_dir / "demo_sweep_cpu.json").read_text())["meta"]
    assert meta["machine"]["device"] == "cpu" and "load_average_1_5_15min" in meta["machine"]


def test_plot_title_names_device_batch_and_precision() -> None:
    title = cli._plot_title(bench.machine_description("cpu"), 1, "float32")
    assert title.startswith("cpu: ") and "batch 1, float32" in title


def test_list_info_shows_only_registered_families(capsys) -> None:
    assert cli.main(["list", "--info"]) == 0
    out = capsys.readouterr().out
    registered = set(mambazoo.list_models())
    from mambazoo.zoo import MODEL_INFO
    for name, info in MODEL_INFO.items():
        row = f"| {name} | {info.family} |"
        assert (row in out) == (name in registered), name
    assert "specs/" not in out


def test_export_command_writes_a_loadable_program(tmp_path: Path, capsys) -> None:
    path = tmp_path / "mambaout.pt2"
    assert cli.main(["export", "-m", "test_mambaout", "-o", str(path), "--img-size", "32"]) == 0
    assert f"wrote {path} (pt2, input (3, 32, 32) with dynamic batch)" in capsys.readouterr().out
    program = torch.export.load(path)
    assert program.module()(torch.randn(3, 3, 32, 32)).shape == (3, 1000)
    assert cli.main(["export", "-m", "test_mambaout", "-o", str(tmp_path / "x.bin")]) == 2
    assert "pass --format onnx or --format pt2" in capsys.readouterr().err
    assert cli.main(["export", "-m", "test_vim", "--checkpoint", str(tmp_path / "missing.pth")]) == 2
    assert f"checkpoint file not found: '{tmp_path / 'missing.pth'}'" in capsys.readouterr().err
