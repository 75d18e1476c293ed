"""Safe, strict loading of dense-model checkpoints with a readable diff, and atomic file writes."""
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["atomic_write", "load_state_dict_file", "state_dict_diff", "strict_load"]

WRAPPER_KEYS = ("state_dict", "model")


def atomic_write(path: Union[str, Path], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it over ``path``.

    A crash leaves either the previous file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_state_dict_file(path: Union[str, Path]) -> dict[str, Tensor]:
    """Load a state dict from safetensors or a ``torch.save`` file (``weights_only=True``).

    A ``{'state_dict': ...}`` or ``{'model': ...}`` wrapper (mmdet/mmseg and training checkpoints) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle/format errors: name the file
        raise ValueError(f"cannot load {path} with weights_only=True: {error}") from error
    for key in WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def state_dict_diff(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> list[str]:
    """Lines describing missing, unexpected and mis-shaped keys (empty when the two match)."""
    missing = sorted(expected.keys() - given.keys())
    unexpected = sorted(given.keys() - expected.keys())
    misshaped = sorted(k for k in expected.keys() & given.keys() if tuple(expected[k].shape) != tuple(given[k].shape))
    lines = [f"  missing ({len(missing)}): {', '.join(missing)}"] if missing else []
    lines += [f"  unexpected ({len(unexpected)}): {', '.join(unexpected)}"] if unexpected else []
    lines += [f"  mis-shaped: {k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in misshaped]
    return lines


def strict_load(module: nn.Module, state_dict: Mapping[str, Any], source: Optional[str] = None) -> None:
    """Load ``state_dict`` into ``module`` strictly; a ValueError lists every mismatch and names ``source``."""
    lines = state_dict_diff(module.state_dict(), state_dict)
    if lines:
        where = f" from {source}" if source else ""
        raise ValueError("\n".join([f"checkpoint{where} does not match {type(module).__name__}:"] + lines))
    module.load_state_dict(state_dict, strict=True)
