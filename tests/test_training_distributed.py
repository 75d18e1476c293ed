"""torchrun, 2 processes, gloo on CPU: DDP keeps the ranks identical and matches one process with the same global
batch; FSDP2 trains, saves, and its checkpoint loads into a plain single-process model."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from mambazoo import create_model
from mambazoo.training import load_model_weights, resolve_weights_file, train, validate
from training_helpers import DIGITS_ARGS, max_abs_diff, read_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# One epoch, global batch 128 (64 per rank): 11 steps. No mixup, dropout or drop path, so the only difference
# between one and two processes is the order of floating-point sums (gradients averaged over two halves).
RUN_ARGS = DIGITS_ARGS + ["-b", "128", "--epochs", "1", "--lr", "3e-3", "--seed", "5"]
# 11 AdamW steps from identical starts differ only by summation order; measured max |Δw| 5.7e-6 (DDP) and 5.5e-6
# (FSDP2) against one process, with identical validation accuracy. A wrong gradient average or data split is >1e-3.
TOLERANCE = 5e-5

JOB = textwrap.dedent("""
    import gc
    import json
    import sys
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from mambazoo.training import train, validate

    out, args = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ddp = train(args + ["--output", f"{out}/ddp"])
    torch.save(ddp.model.state_dict(), f"{out}/ddp_rank{rank}.pt")
    results = validate([f"{out}/ddp", "-j", "0"])
    if rank == 0:
        json.dump(results, open(f"{out}/ddp_validate.json", "w"))
    fsdp = train(args + ["--output", f"{out}/fsdp", "--fsdp"])
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(fsdp.model, options=options)
    resumed = train(["--resume", f"{out}/fsdp"])  # loads the sharded model and optimiser from the full checkpoint
    reloaded = get_model_state_dict(resumed.model, options=options)
    if rank == 0:
        torch.save(full, f"{out}/fsdp_full.pt")
        torch.save(reloaded, f"{out}/fsdp_resumed.pt")
    del ddp, fsdp, resumed  # the models hold the groups' meshes: free them while the interpreter is whole
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
""")


def test_torchrun_ddp_and_fsdp2_match_one_process(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(tmp_path), *RUN_ARGS]
    job = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    single = train(RUN_ARGS + ["--output", str(tmp_path / "single")]).model.state_dict()

    rank0 = torch.load(tmp_path / "ddp_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "ddp_rank1.pt", weights_only=True)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "DDP ranks diverged"
    changed = max_abs_diff(rank0, create_model("test_vim", num_classes=10, img_size=32).state_dict())
    assert changed > 1e-2  # the weights did train
    assert max_abs_diff(rank0, single) < TOLERANCE

    # Only rank 0 wrote: one run folder per job, with its records; `validate` under torchrun reproduces its accuracy.
    ddp_config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert ddp_config["world_size"] == 2 and (tmp_path / "ddp" / "summary.csv").is_file()
    ddp_best = json.loads((tmp_path / "ddp" / "checkpoints.json").read_text())["best"][0]["metric"]
    ddp_validate = json.loads((tmp_path / "ddp_validate.json").read_text())
    assert ddp_validate["world_size"] == 2 and ddp_validate["top1"] == ddp_best

    # The FSDP2 checkpoint is a plain full state dict: it loads strictly into a single-process model.
    fsdp_full = torch.load(tmp_path / "fsdp_full.pt", weights_only=True)
    plain = create_model("test_vim", num_classes=10, img_size=32)
    load_model_weights(plain, tmp_path / "fsdp")
    saved = read_weights(resolve_weights_file(tmp_path / "fsdp"))
    assert all(torch.equal(saved[k], fsdp_full[k]) for k in saved)
    assert all(torch.equal(plain.state_dict()[k], saved[k]) for k in saved)
    assert max_abs_diff(fsdp_full, single) < TOLERANCE
    resumed = torch.load(tmp_path / "fsdp_resumed.pt", weights_only=True)
    assert all(torch.equal(resumed[k], fsdp_full[k]) for k in fsdp_full)

    # Evaluating the FSDP run's checkpoint in one process reproduces the accuracy the 2-process run reported.
    reported = json.loads((tmp_path / "fsdp" / "checkpoints.json").read_text())["best"][0]["metric"]
    assert abs(validate([str(tmp_path / "fsdp"), "-j", "0"])["top1"] - reported) < 1e-9


def test_command_line_run_destroys_its_process_group_only_after_success(tmp_path):
    """`mambazoo train` (so `torchrun -m mambazoo.train`) leaves the process group once the run succeeded; after an
    error the group stays (a failed rank must not wait in a collective for the others)."""
    import torch.distributed as dist

    from mambazoo.train import main

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert main(RUN_ARGS + ["--output", str(tmp_path / "run"), "--model", "no_such_model"]) == 2
        assert dist.is_initialized()
        assert main(RUN_ARGS + ["--output", str(tmp_path / "run")]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
