"""mambazoo.checkpoint on its own: the key listing, file errors, round trips and atomic writes."""
import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from mambazoo.checkpoint import (
    CheckpointError, CheckpointMismatchError, atomic_write, check_state_dict, describe_source, load_checkpoint_file,
    save_state_dict, unwrap_state_dict, write_text,
)


class Blocks(nn.Module):
    def __init__(self, depth: int = 12, width: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])
        self.head = nn.Linear(width, 3)


def test_listing_groups_block_indices_and_names_every_problem() -> None:
    model = Blocks()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("layers.3.", "layers.4.", "layers.7."))}
    state["layers.0.extra"] = torch.zeros(1)
    state["layers.11.weight"] = torch.zeros(5, 4)
    with pytest.raises(CheckpointMismatchError) as error:
        check_state_dict(state, model, source="file 'x.pth'")
    message = str(error.value)
    assert message.startswith("checkpoint file 'x.pth' does not match Blocks:")
    assert "missing (6): layers.{3-4,7}.weight, layers.{3-4,7}.bias" in message
    assert "unexpected (1): layers.0.extra" in message
    assert "mis-shaped (1):\n    layers.11.weight: checkpoint (5, 4) vs model (4, 4)" in message
    assert "another model" not in message  # most keys match: no hint
    assert error.value.missing == ["layers.3.weight", "layers.3.bias", "layers.4.weight", "layers.4.bias",
                                   "layers.7.weight", "layers.7.bias"]


def test_listing_of_a_foreign_checkpoint_hints_at_the_wrong_model() -> None:
    with pytest.raises(CheckpointMismatchError, match=r"only 1 of 26 model keys match .* another model or variant"):
        check_state_dict(Blocks(width=8).state_dict(), Blocks(width=4))


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint file given"):
        load_checkpoint_file("")
    with pytest.raises(IsADirectoryError, match=f"checkpoint path is a directory, not a file: '{tmp_path}'"):
        load_checkpoint_file(tmp_path)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors header")
    with pytest.raises(CheckpointError, match=f"'{broken}' is not a readable safetensors file"):
        load_checkpoint_file(broken)
    scalar = tmp_path / "scalar.pth"
    torch.save(torch.zeros(2), scalar)
    with pytest.raises(CheckpointError, match=f"'{scalar}' holds a Tensor, not a state dict"):
        load_checkpoint_file(scalar)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_save_and_load_round_trip(tmp_path: Path, suffix: str) -> None:
    state = Blocks().state_dict()
    state["layers.0.weight"] = state["layers.0.weight"].t()  # non-contiguous
    path = save_state_dict(state, tmp_path / f"model{suffix}")
    loaded = load_checkpoint_file(path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"model{suffix}"]  # no temporary left over


def test_atomic_write_keeps_the_previous_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text("previous")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_write(path) as temporary:
            assert temporary.parent == tmp_path and temporary.name.startswith(".results.json.tmp-")
            temporary.write_text("partial")
            raise RuntimeError("interrupted")
    assert path.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_atomic_write_gives_the_permissions_of_a_plain_write(tmp_path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    assert write_text(tmp_path / "new" / "out.json", "{}").read_text() == "{}"  # creates the folder
    assert stat.S_IMODE((tmp_path / "new" / "out.json").stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_safetensors_writes_copy_shared_and_strided_tensors_apart(tmp_path: Path) -> None:
    weight = torch.arange(6.0).view(2, 3)
    path = save_state_dict({"a": weight, "tied": weight, "strided": weight.t()}, tmp_path / "w.safetensors")
    loaded = load_checkpoint_file(path)
    assert torch.equal(loaded["tied"], weight) and torch.equal(loaded["strided"], weight.t())


def test_state_dicts_are_unwrapped_from_training_and_mm_checkpoints() -> None:
    weights = {"w": torch.zeros(1)}
    for checkpoint in (weights, {"state_dict": weights, "meta": {}}, {"model": weights, "epoch": 3}):
        assert unwrap_state_dict(checkpoint, "x.pth") == weights
    with pytest.raises(CheckpointError, match=r"x.pth holds no state dict of tensors \(top-level keys: \['epoch'\]"):
        unwrap_state_dict({"epoch": 3}, "x.pth")


def test_describe_source() -> None:
    assert describe_source(dict(file="a.pth", hf_hub_id="x/y")) == "file 'a.pth'"
    assert describe_source(dict(hf_hub_id="hustvl/Vim-tiny-midclstok", hf_hub_filename="v.pth")) == \
        "hf-hub:hustvl/Vim-tiny-midclstok (v.pth)"
    assert describe_source(dict(url="https://example.org/w.pth")) == "url https://example.org/w.pth"
    assert describe_source({}) is None
