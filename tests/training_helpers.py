"""Shared settings of the training tests: a tiny Vim on scikit-learn's digits at 32 px, on one thread, and the
training entry point that kills itself in the middle of a checkpoint write."""
import textwrap

import torch
from safetensors.torch import load_file

# test_vim (width 32, 4 blocks) on digits at 32 px: 2×2 patches + the cls token, about 1 s per epoch on 2 cores.
DIGITS_ARGS = ["--model", "test_vim", "--dataset", "digits", "--img-size", "32", "--opt", "adamw",
               "--weight-decay", "0.05", "--warmup-epochs", "0", "--sched-on-updates", "--scale", "0.5", "1",
               "--hflip", "0", "-j", "0", "--no-progress"]


# A script: `python killer.py KILL_AT FLAG...` runs `mambazoo.train FLAG...` with safetensors' writer replaced; the
# KILL_AT-th weights file is written halfway, then the process SIGKILLs itself.
KILLER = textwrap.dedent("""
    import os, signal, sys
    import safetensors.torch
    from safetensors.torch import save_file

    kill_at, calls = int(sys.argv[1]), []

    def crash_midway(tensors, path, metadata=None):
        calls.append(path)
        save_file(tensors, path, metadata=metadata)
        if len(calls) == kill_at:
            os.truncate(path, os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    safetensors.torch.save_file = crash_midway  # what mambazoo.checkpoint.save_state_dict calls
    from mambazoo.train import main
    sys.exit(main(sys.argv[2:]))
""")


def read_weights(path) -> dict[str, torch.Tensor]:
    """A safetensors file as a state dict."""
    return load_file(str(path))


def max_abs_diff(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    """Largest element-wise difference between two state dicts with the same keys."""
    assert first.keys() == second.keys()
    return max((first[k].double() - second[k].double()).abs().max().item() for k in first)
