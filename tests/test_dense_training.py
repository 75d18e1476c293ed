"""Detection and segmentation through the training engine: Mask R-CNN and UperNet overfit a handful of composite
images, `mambazoo validate` and `mambazoo predict` reuse the run folder, a detection run killed with SIGKILL resumes
bit for bit, and two processes under torchrun train with DDP and FSDP2."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mambazoo import cli
from mambazoo.dense.synthetic import write_composite
from mambazoo.training import TrainResult, train, validate
from mambazoo.training.config import parse_train_args
from mambazoo.training.distributed import Distributed
from mambazoo.training.engine import seed_everything
from mambazoo.training.tasks import TaskContext, get_task
from training_helpers import KILLER, max_abs_diff

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMON = ["--model", "test_mambaout", "-j", "0", "--no-progress", "--hflip", "0", "--weight-decay", "0"]
# Tiny Mask R-CNN heads and proposal counts for 64 px images with 1-3 objects.
DETECTION = ["--task", "detection", *COMMON, "--min-size", "64", "--max-size", "64", "--head", "fpn_channels=32",
             "box_representation=64", "mask_head_channels=16", "rpn_pre_nms_top_n_train=200",
             "rpn_post_nms_top_n_train=100", "rpn_pre_nms_top_n_test=100", "rpn_post_nms_top_n_test=50",
             "box_batch_size_per_image=64", "rpn_batch_size_per_image=64"]
SEGMENTATION = ["--task", "segmentation", *COMMON, "--crop-size", "64", "--ratio-range", "1", "1", "--head",
                "channels=32", "aux_channels=16"]
# 4 images, each seen 20 times an epoch at batch 4: 20 AdamW steps per epoch.
OVERFIT = ["-b", "4", "--train-repeats", "20", "--warmup-steps", "5", "--seed", "0"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Four 64 px composite images with 1-3 digit glyphs each (24-40 px), the same images as train and val."""
    root = write_composite(tmp_path_factory.mktemp("overfit"), dict(train=4), image_size=64, objects=(1, 3),
                           scales=(3, 5), seed=1)
    shutil.copytree(root / "train", root / "val")
    return root


def _train_one_thread(argv: list[str]) -> TrainResult:
    """A run on one torch thread, as the subprocesses and the other tests (module fixtures start before the
    function-scoped ``one_torch_thread``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def detection_run(images: Path, tmp_path_factory) -> TrainResult:
    output = tmp_path_factory.mktemp("detection") / "run"
    return _train_one_thread(DETECTION + OVERFIT + ["--data-dir", str(images), "--epochs", "3", "--lr", "2e-3",
                                                    "--output", str(output)])


def _column(run_dir: Path, name: str) -> list[float]:
    with open(run_dir / "summary.csv") as handle:
        return [float(row[name]) for row in csv.DictReader(handle)]


# Thresholds: seeded, single-threaded CPU runs are deterministic; over seeds 0-2 the third epoch (60 steps) reached box
# AP 0.69/0.75/0.65, AP50 1.0 each, mask AP 0.46/0.38/0.33 (from ~0.1 and 0.0 after the first epoch), so the bounds
# below keep at least 0.13 of margin for numeric drift between machines and library versions.
def test_mask_rcnn_overfits_a_handful_of_images_through_the_engine(detection_run: TrainResult) -> None:
    history, run_dir = detection_run.history, detection_run.run_dir
    assert len(history) == 3 and [row["epoch"] for row in history] == [0, 1, 2]
    last = history[-1]
    assert last["eval_bbox_AP"] >= 0.5 and last["eval_bbox_AP50"] >= 0.85 and last["eval_segm_AP"] >= 0.2, last
    assert history[0]["eval_segm_AP"] < 0.1 < last["eval_segm_AP"]
    assert history[0]["train_loss"] > 1.5 * last["train_loss"]
    columns = open(run_dir / "summary.csv").readline().strip().split(",")
    assert {f"eval_{kind}_{stat}" for kind in ("bbox", "segm") for stat in ("AP", "AP50", "AP75", "APs", "APm", "APl")
            } <= set(columns) and "eval_loss" not in columns
    manifest = json.loads((run_dir / "checkpoints.json").read_text())
    assert manifest["metric"] == "bbox_AP" and manifest["last"]["step"] == 60
    assert manifest["best"][0]["metric"] == max(row["eval_bbox_AP"] for row in history)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["classes"] == [str(digit) for digit in range(10)] and config["dataset"]["train_repeats"] == 20


def test_validate_and_predict_reuse_the_detection_run(detection_run: TrainResult, images: Path, tmp_path: Path,
                                                      capsys) -> None:
    run_dir = detection_run.run_dir
    results = validate([str(run_dir), "-j", "0"])  # its best checkpoint, data, classes and evaluation settings
    best = max(detection_run.history, key=lambda row: row["eval_bbox_AP"])
    assert results["task"] == "detection" and results["samples"] == 4
    assert all(results[key] == best[f"eval_{key}"] or np.isnan(best[f"eval_{key}"])
               for key in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP75"))
    weights = run_dir / "checkpoints" / f"{json.loads((run_dir / 'checkpoints.json').read_text())['best'][0]['name']}"
    # without the run folder: the task's flags (sizes, heads) follow --task, the weights of the whole model
    flags = DETECTION[DETECTION.index("--min-size"):]  # the task's own flags: sizes and heads
    plain = validate(["--task", "detection", "--model", "test_mambaout", *flags, "--checkpoint",
                      f"{weights}.safetensors", "--data-dir", str(images), "-b", "4", "-j", "0"])
    assert plain["bbox_AP"] == results["bbox_AP"] and plain["checkpoint"] == f"{weights}.safetensors"
    image = images / "val" / "images" / "000002.png"
    assert cli.main(["predict", "--checkpoint", str(run_dir), "--image", str(image), "--output",
                     str(tmp_path / "boxes.png")]) == 0
    assert "test_mambaout detection on 000002.png" in capsys.readouterr().out
    drawn, original = np.array(Image.open(tmp_path / "boxes.png")), np.array(Image.open(image))
    assert drawn.shape == original.shape and not np.array_equal(drawn, original)
    assert cli.main(["predict", "--checkpoint", str(run_dir), "--task", "segmentation", "--image", str(image),
                     "--output", str(tmp_path / "x.png")]) == 2
    assert "trained detection" in capsys.readouterr().err


# Over seeds 0-2, 50 steps (poly decay to 0 over exactly these steps) reached mIoU 0.50/0.70/0.68 (from 0.27-0.60
# after the first epoch); the bound keeps 0.15 of margin.
def test_upernet_overfits_through_the_engine_and_stops_at_the_iteration_count(images: Path, tmp_path: Path) -> None:
    result = train(SEGMENTATION + OVERFIT + ["--data-dir", str(images), "--iterations", "50", "--lr", "5e-3",
                                             "--output", str(tmp_path / "run")])
    history = result.history
    assert len(history) == 3  # 20 + 20 + 10 updates
    manifest = json.loads((tmp_path / "run" / "checkpoints.json").read_text())
    assert (manifest["last"]["step"], manifest["metric"]) == (50, "mIoU")
    assert max(row["eval_mIoU"] for row in history) >= 0.35, history
    assert history[-1]["eval_loss"] < 0.7 * history[0]["eval_loss"]
    # poly, power 1: the rate for the next update, 5e-3 × (1 - updates / 50)
    assert [row["lr"] for row in history] == pytest.approx([5e-3 * (1 - 20 / 50), 5e-3 * (1 - 40 / 50), 0.0])
    ious = [column for column in history[-1] if column.startswith("eval_IoU.")]
    assert len(ious) == 11 and "eval_IoU.background" in ious  # per-class IoU columns in summary.csv
    assert _column(tmp_path / "run", "eval_mIoU") == [row["eval_mIoU"] for row in history]



@pytest.mark.parametrize("flags", [DETECTION, SEGMENTATION], ids=["detection", "segmentation"])
def test_amp_ema_gradient_checkpointing_and_channels_last_run_the_dense_models(images: Path, tmp_path: Path,
                                                                               flags: list[str]) -> None:
    result = train(flags + ["--data-dir", str(images), "-b", "4", "--epochs", "1", "--warmup-steps", "0", "--amp",
                            "--model-ema", "--grad-checkpointing", "--channels-last", "--output", str(tmp_path)])
    metric = "eval_bbox_AP" if "detection" in flags else "eval_mIoU"
    assert np.isfinite(result.history[0]["train_loss"]) and f"ema_{metric}" in result.history[0]
    assert any(getattr(module, "grad_checkpointing", False) for module in result.model.modules())


def test_detection_run_killed_mid_checkpoint_resumes_bitwise(images: Path, tmp_path: Path) -> None:
    """Multi-scale resizing and RPN/RoI sampling (torch RNG), flips (per-sample seeds) and drop path are on; 4 steps
    an epoch at batch 2, recovery checkpoints every 3 steps."""
    args = DETECTION + ["--data-dir", str(images), "-b", "2", "--train-repeats", "2", "--epochs", "2", "--lr", "1e-3",
                        "--warmup-steps", "2", "--hflip", "0.5", "--min-size", "48", "64", "--drop-path", "0.1",
                        "--recovery-interval", "3", "--seed", "4"]
    straight = train(args + ["--output", str(tmp_path / "straight")])

    # Weights files: step 3, epoch 0 (step 4), step 6, epoch 1 (step 8): the 4th write dies, step 6 is the last.
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    run_dir = tmp_path / "killed"
    child = subprocess.run([sys.executable, str(script), "4", *args, "--output", str(run_dir)],
                           capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    manifest = json.loads((run_dir / "checkpoints.json").read_text())
    assert manifest["last"]["name"] == "step00000006" and [e["name"] for e in manifest["best"]] == ["epoch0000"]
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if ".tmp-" in p.name]  # died mid-write

    resumed = train(["--resume", str(run_dir)])
    assert not [p for p in (run_dir / "checkpoints").iterdir() if ".tmp-" in p.name]
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    for row_straight, row_resumed in zip(straight.history, resumed.history, strict=True):
        row_straight, row_resumed = dict(row_straight), dict(row_resumed)
        row_straight.pop("train_samples_per_sec"), row_resumed.pop("train_samples_per_sec")
        np.testing.assert_equal(row_straight, row_resumed)  # NaN == NaN (no object in a size range)


JOB = textwrap.dedent("""
    import gc
    import json
    import sys
    import torch
    import torch.distributed as dist
    from mambazoo.training import train, validate

    out, detection, segmentation = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ddp = train(detection + ["--output", f"{out}/ddp"])
    torch.save(ddp.model.state_dict(), f"{out}/ddp_rank{rank}.pt")
    results = validate([f"{out}/ddp", "-j", "0"])
    fsdp = train(segmentation + ["--output", f"{out}/fsdp", "--fsdp"])
    if rank == 0:
        json.dump(dict(validate=results, fsdp=fsdp.history), open(f"{out}/results.json", "w"))
    del ddp, fsdp  # the models hold the groups' meshes: free them while the interpreter is whole
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
""")


def test_torchrun_ddp_detection_and_fsdp_segmentation(images: Path, tmp_path: Path) -> None:
    """Two gloo processes: DDP Mask R-CNN keeps the ranks identical and `validate` under torchrun reproduces the
    reported box AP, as does one process; FSDP2 shards UperNet's backbone blocks (inside the dense wrapper), averages
    the BatchNorm statistics of the ranks, and its checkpoint evaluates in one process to the reported mIoU.

    Mask R-CNN's losses are means over each process's own RPN/RoI samples, so a 2-process run is not the 1-process
    run up to summation order (unlike classification, tests/test_training_distributed.py)."""
    detection = DETECTION + ["--data-dir", str(images), "-b", "4", "--train-repeats", "3", "--epochs", "1", "--lr",
                             "1e-3", "--warmup-steps", "1", "--seed", "2", "--sync-bn"]
    segmentation = SEGMENTATION + ["--data-dir", str(images), "-b", "4", "--train-repeats", "3", "--epochs", "1",
                                   "--lr", "1e-3", "--warmup-steps", "1", "--seed", "2"]
    script = tmp_path / "job.py"
    script.write_text(JOB)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(tmp_path), json.dumps(detection), json.dumps(segmentation)]
    job = subprocess.run(command, capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "SyncBatchNorm runs on GPUs only" in job.stdout
    rank0 = torch.load(tmp_path / "ddp_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "ddp_rank1.pt", weights_only=True)
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0), "DDP ranks diverged"
    seed_everything(2)  # the engine's initialisation
    args = parse_train_args(detection)[0]
    task = get_task("detection")(args, TaskContext(Distributed(), nullcontext))
    assert max_abs_diff(rank0, task.build_model(task.build_datasets()).state_dict()) > 1e-3  # it trained
    results = json.loads((tmp_path / "results.json").read_text())
    reported = json.loads((tmp_path / "ddp" / "checkpoints.json").read_text())["best"][0]["metric"]
    assert results["validate"]["world_size"] == 2 and results["validate"]["bbox_AP"] == reported
    assert validate([str(tmp_path / "ddp"), "-j", "0"])["bbox_AP"] == pytest.approx(reported, abs=1e-6)
    assert len(results["fsdp"]) == 1 and 0 <= results["fsdp"][0]["eval_mIoU"] <= 1
    assert validate([str(tmp_path / "fsdp"), "-j", "0"])["mIoU"] == pytest.approx(results["fsdp"][0]["eval_mIoU"],
                                                                                 abs=1e-6)
