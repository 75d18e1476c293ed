"""Kill and resume: a run killed by SIGKILL in the middle of a checkpoint write, then resumed, ends with exactly the
weights of an uninterrupted run, and the checkpoint before the crash stays loadable."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from mambazoo.training import train
from training_helpers import DIGITS_ARGS, KILLER, read_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Mixup (numpy RNG), drop path (torch RNG), random augmentation (per-sample seeds) and EMA are all on, so every
# piece of resumable state matters. 11 steps per epoch at batch 128; checkpoints every 4 steps plus epoch ends.
RUN_ARGS = DIGITS_ARGS + ["-b", "128", "--epochs", "2", "--lr", "3e-3", "--mixup", "0.2", "--drop-path", "0.1",
                          "--model-ema", "--model-ema-decay", "0.9", "--recovery-interval", "4", "--seed", "3"]


def test_kill_during_checkpoint_write_then_resume_is_bitwise_identical(tmp_path):
    straight = train(RUN_ARGS + ["--output", str(tmp_path / "straight")])

    # Saves (model + EMA: 2 files each) at global steps 4, 8, 11 (end of epoch 0), 12, 16, 20, 22 (end). The 11th
    # file is the model weights of step 20: the run dies in epoch 1 with step 16 (5 batches into it) as the last.
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    run_dir = tmp_path / "killed"
    child = subprocess.run([sys.executable, str(script), "11", *RUN_ARGS, "-j", "1", "--output", str(run_dir)],
                           capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]

    manifest = json.loads((run_dir / "checkpoints.json").read_text())
    assert manifest["last"]["name"] == "step00000016"
    assert [e["name"] for e in manifest["best"]] == ["epoch0000"]
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1 and leftovers[0].startswith(".step00000020.safetensors"), leftovers  # died mid-write
    previous = run_dir / "checkpoints" / "step00000016"
    assert read_weights(previous.with_suffix(".safetensors")).keys() == straight.model.state_dict().keys()
    state = torch.load(previous.with_suffix(".state.pt"), weights_only=True)
    assert (state["epoch"], state["batch"], state["global_step"]) == (1, 5, 16)

    # Resumed with one loader worker (the straight run had none): the per-sample seeds make this irrelevant.
    resumed = train(["--resume", str(run_dir)])
    assert not [p for p in (run_dir / "checkpoints").iterdir() if ".tmp-" in p.name]
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    for key, value in straight.ema_model.state_dict().items():
        assert torch.equal(value, resumed.ema_model.state_dict()[key]), key
    assert len(resumed.history) == len(straight.history) == 2
    for row_straight, row_resumed in zip(straight.history, resumed.history):
        row_straight, row_resumed = dict(row_straight), dict(row_resumed)
        row_straight.pop("train_samples_per_sec"), row_resumed.pop("train_samples_per_sec")
        assert row_straight == row_resumed
