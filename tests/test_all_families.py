"""Every registered family, through its tiny ``test_*`` variant: input errors, checkpoint errors, FX tracing and
``torch.export`` against eager. Parametrized over the registry, so families added later are covered automatically."""
import argparse
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import create_feature_extractor, get_graph_node_names
from timm.models import model_entrypoint

import mambazoo
from mambazoo.checkpoint import CheckpointError, CheckpointMismatchError, save_state_dict

MODELS = mambazoo.list_models("test_*")
OWN_MODELS = [name for name in MODELS if model_entrypoint(name).__module__.startswith("mambazoo.")]


def _input_size(model: torch.nn.Module) -> tuple[int, int, int]:
    """The model's configured input size, capped at 64 px where the model takes any size (keeps the tests fast)."""
    channels, height, width = model.pretrained_cfg["input_size"]
    if model.pretrained_cfg.get("fixed_input_size"):
        return channels, height, width
    return channels, min(height, 64), min(width, 64)


def _model_and_images(name: str, batch: int = 2) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    return model, torch.randn(batch, *_input_size(model))


def test_the_registry_has_every_family() -> None:
    assert {"test_vim", "test_plainmamba", "test_mambaout"} <= set(MODELS)


# ---------------------------------------------------------------- input errors


@pytest.mark.parametrize("name", OWN_MODELS)
def test_unbatched_image_gets_an_error_naming_the_expected_shape(name: str) -> None:
    model, images = _model_and_images(name, batch=1)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*unbatched image of shape \(3, .*x\.unsqueeze\(0\)"):
        model(images[0])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got a tensor of shape \(1, 4, "):
        model(torch.randn(1, 4, *images.shape[-2:]))
    with pytest.raises(ValueError, match=r"unbatched image"):
        model.forward_intermediates(images[0])


# ---------------------------------------------------------------- checkpoint errors


def _other_family(name: str) -> str:
    family = name.removeprefix("test_")
    return next(other for other in OWN_MODELS if other.removeprefix("test_") != family)


@pytest.mark.parametrize("create", [timm.create_model, mambazoo.create_model], ids=["timm", "mambazoo"])
@pytest.mark.parametrize("name", OWN_MODELS)
def test_another_models_checkpoint_gives_the_key_listing_naming_the_file(tmp_path: Path, name: str, create) -> None:
    path = save_state_dict(timm.create_model(_other_family(name)).state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(CheckpointMismatchError) as error:
        create(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    message = str(error.value)
    assert message.startswith(f"checkpoint file '{path}' does not match ")
    assert "are these the weights of another model or variant?" in message
    assert "missing (" in message and "unexpected (" in message


def test_vim_small_weights_into_vim_tiny_list_the_mis_shaped_keys() -> None:
    from mambazoo.models.vim import checkpoint_filter_fn

    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        small, tiny = timm.create_model("vim_small_patch16_224"), timm.create_model("vim_tiny_patch16_224")
    with pytest.raises(CheckpointMismatchError) as error:
        checkpoint_filter_fn({"model": small.state_dict()}, tiny)
    message = str(error.value)
    assert "pos_embed: checkpoint (1, 197, 384) vs model (1, 197, 192)" in message  # not "is not a square grid"
    assert "layers.{0-23}.mixer.in_proj.weight: checkpoint (1536, 384) vs model (768, 192)" in message
    assert error.value.mismatched and not error.value.missing and not error.value.unexpected


@pytest.mark.parametrize("create", [timm.create_model, mambazoo.create_model], ids=["timm", "mambazoo"])
@pytest.mark.parametrize("name", MODELS)
def test_missing_empty_and_truncated_files_are_named(tmp_path: Path, name: str, create) -> None:
    if create is timm.create_model and name not in OWN_MODELS:
        pytest.skip("timm's own models load files with timm's loader; mambazoo.create_model checks them")
    missing, empty, truncated = tmp_path / "missing.pth", tmp_path / "empty.pth", tmp_path / "truncated.pth"
    empty.touch()
    torch.save(timm.create_model(name).state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(FileNotFoundError, match=f"checkpoint file not found: '{missing}'"):
        create(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))
    with pytest.raises(CheckpointError, match=rf"checkpoint file '{empty}' is empty \(0 bytes\)"):
        create(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(empty)))
    if name in OWN_MODELS:
        with pytest.raises(CheckpointError, match=f"checkpoint file '{truncated}' is truncated or not a PyTorch"):
            create(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(truncated)))


def test_mambaout_file_of_another_model_is_named_by_the_zoo(tmp_path: Path) -> None:
    path = save_state_dict(timm.create_model("test_vim").state_dict(), tmp_path / "vim.safetensors")
    expected = f"(?s)checkpoint file '{path}' does not match test_mambaout: .*Missing key"
    with pytest.raises(CheckpointError, match=expected):
        mambazoo.create_model("test_mambaout", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_disallowed_pickled_class_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "with_args.pth"
    torch.save({"state_dict": timm.create_model("test_plainmamba").state_dict(), "args": argparse.Namespace(lr=1)},
               path)
    with pytest.raises(CheckpointError, match=f"checkpoint file '{path}' pickles objects that weights_only"):
        timm.create_model("test_plainmamba", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


# ---------------------------------------------------------------- FX and torch.export


def _parameter_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("name", MODELS)
def test_fx_traced_model_matches_eager_forward_and_backward(name: str) -> None:
    model, images = _model_and_images(name)
    feature_module = model.feature_info[-1]["module"]
    nodes = get_graph_node_names(model)[1]
    traced = create_feature_extractor(model, return_nodes={nodes[-1]: "logits", feature_module: "feature"})
    captured = {}
    getattr(model, "get_submodule")(feature_module).register_forward_hook(
        lambda module, args, output: captured.update(feature=output))

    logits = model(images)
    logits.logsumexp(-1).sum().backward()
    eager_grads = _parameter_grads(model)
    out = traced(images)
    out["logits"].logsumexp(-1).sum().backward()
    traced_grads = _parameter_grads(model)  # the traced module shares the model's parameters

    torch.testing.assert_close(out["logits"], logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["feature"], captured["feature"], rtol=1e-5, atol=1e-6)
    assert eager_grads.keys() == traced_grads.keys() and len(eager_grads) == len(list(model.parameters()))
    for key, grad in eager_grads.items():
        torch.testing.assert_close(traced_grads[key], grad, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", MODELS)
def test_timm_fx_features_only(name: str) -> None:
    model, images = _model_and_images(name)
    features = timm.create_model(name, features_only=True, feature_cls="fx", out_indices=(-2, -1)).eval()
    features.load_state_dict(model.state_dict(), strict=False)
    maps = features(images)
    assert len(maps) == 2 and all(torch.isfinite(m).all() for m in maps)
    assert [m.shape[0] for m in maps] == [images.shape[0]] * 2


@pytest.mark.parametrize("name", MODELS)
def test_exported_program_matches_eager(name: str) -> None:
    model, images = _model_and_images(name)
    with torch.no_grad():
        exported = torch.export.export(model, (images,))
        expected = model(images)
        torch.testing.assert_close(exported.module()(images), expected, rtol=1e-5, atol=1e-6)
        other = torch.randn_like(images)
        torch.testing.assert_close(exported.module()(other), model(other), rtol=1e-5, atol=1e-6)
