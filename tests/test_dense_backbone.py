"""Dense backbone adapters: the tap registry, strides/channels of every registered family, tap semantics checked
against hooks on the models' own modules, per-level norms, official downstream checkpoint layout."""
import copy
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models import is_model

import mambazoo
from mambazoo.dense import TAP_SPECS, DenseBackbone, TapSpec, create_backbone, load_backbone_checkpoint, register_taps
from mambazoo.dense.taps import tap_spec_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ("vim", "plainmamba", "mambaout", "mambavision", "spatialmamba")
TEST_MODELS = sorted(spec.test_model for spec in TAP_SPECS.values())
HIERARCHICAL_MODELS = sorted(spec.test_model for spec in TAP_SPECS.values() if spec.kind == "hierarchical")
SIZE = (128, 96)


def _skip_unregistered(name: str) -> None:
    mambazoo.list_models()  # imports every mambazoo model module
    if not is_model(name):
        pytest.skip(f"{name} not registered (family not landed)")


def _backbone(name: str, **kwargs) -> DenseBackbone:
    _skip_unregistered(name)
    torch.manual_seed(0)
    return create_backbone(name, **kwargs).eval()


def _randomise_norms(backbone: DenseBackbone) -> None:
    """Give the per-level norms non-trivial affine parameters so that applying them is visible."""
    with torch.no_grad():
        for name in filter(None, backbone.norm_names):
            for param in getattr(backbone, name).parameters():
                param.normal_()


def test_registry_covers_the_five_families_and_names_resolve() -> None:
    assert set(FAMILIES) <= set(TAP_SPECS)
    expected = {"vim_tiny_patch16_224": "vim", "vim_small_patch16_stride8_224.in1k": "vim", "test_vim": "vim",
                "plainmamba_l3": "plainmamba", "mambaout_femto": "mambaout", "mambaout_base_plus_rw": "mambaout",
                "mambavision_t": "mambavision", "test_spatialmamba": "spatialmamba"}
    assert {name: tap_spec_for(name).family for name in expected} == expected
    assert {TAP_SPECS[f].kind for f in ("mambaout", "mambavision", "spatialmamba")} == {"hierarchical"}
    assert {TAP_SPECS[f].kind for f in ("vim", "plainmamba")} == {"plain"}
    # Vim-Ti taps mixer outputs, Vim-S's training script the residual stream (use_residual_as_feature=True)
    assert tap_spec_for("vim_tiny_patch16_224").intermediates_kwargs == dict(mixer_output=True)
    assert tap_spec_for("vim_small_patch16_224.in1k").intermediates_kwargs == {}
    # official names: PlainMamba's seg norms carry the layer index, the hierarchical ones the level
    assert TAP_SPECS["plainmamba"].level_norm_names((5, 11, 17, 23)) == [
        "norm_layer5", "norm_layer11", "norm_layer17", None]
    assert TAP_SPECS["mambavision"].level_norm_names((0, 1, 2, 3)) == [f"outnorm{i}" for i in range(4)]
    assert TAP_SPECS["vim"].level_norm_names((5, 11, 17, 23)) == [None] * 4
    with pytest.raises(ValueError, match="no dense tap description for model 'resnet50'.*vim"):
        tap_spec_for("resnet50")
    with pytest.raises(ValueError, match="already has a tap spec"):
        register_taps(TAP_SPECS["vim"])
    with pytest.raises(ValueError, match="kind must be"):
        TapSpec(family="x", patterns=("x*",), kind="pyramid", taps="stages")


def test_plain_taps_are_the_blocks_the_papers_name() -> None:
    # Vim-Ti/S and PlainMamba-L1/L2 segmentation taps: blocks 5, 11, 17, 23; PlainMamba-L3: 8, 17, 26, 35.
    assert TAP_SPECS["vim"].tap_indices(SimpleNamespace(feature_info=[{}] * 24)) == (5, 11, 17, 23)
    assert TAP_SPECS["plainmamba"].tap_indices(SimpleNamespace(feature_info=[{}] * 36)) == (8, 17, 26, 35)
    with torch.device("meta"):
        model = mambazoo.create_model("vim_tiny_patch16_224")
    assert TAP_SPECS["vim"].tap_indices(model) == (5, 11, 17, 23)
    assert TAP_SPECS["mambaout"].tap_indices(model) == (0, 1, 2, 3)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_adapter_gives_strides_4_to_32_and_declared_channels(name: str) -> None:
    backbone = _backbone(name)
    with torch.no_grad():
        maps = backbone(torch.randn(2, 3, *SIZE))
    assert isinstance(maps, OrderedDict) and list(maps) == ["0", "1", "2", "3"]
    assert backbone.strides == (4, 8, 16, 32) and len(backbone.out_channels) == 4
    for (key, feature), stride, channels in zip(maps.items(), backbone.strides, backbone.out_channels):
        assert feature.shape == (2, channels, SIZE[0] // stride, SIZE[1] // stride), key
    if backbone.spec.kind == "hierarchical":
        info = [entry["num_chs"] for entry in backbone.model.feature_info[:4]]
        assert backbone.out_channels == info
    else:
        assert len(set(backbone.out_channels)) == 1


@pytest.mark.parametrize("name", TEST_MODELS)
def test_every_backbone_parameter_gets_a_gradient(name: str) -> None:
    backbone = _backbone(name).train()
    maps = backbone(torch.randn(2, 3, 64, 64))
    sum(feature.square().mean() for feature in maps.values()).backward()
    missing = [n for n, p in backbone.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def _hook_outputs(modules: list[torch.nn.Module]) -> tuple[list, list]:
    captured, handles = [], []
    for module in modules:
        handles.append(module.register_forward_hook(lambda _m, _i, output: captured.append(output)))
    return captured, handles


def test_vim_taps_are_mixer_outputs_of_the_quarter_blocks() -> None:
    backbone = _backbone("test_vim")
    taps = backbone.taps
    assert taps == (0, 1, 2, 3) and backbone.spec.intermediates_kwargs == dict(mixer_output=True)
    captured, handles = _hook_outputs([backbone.model.layers[i].mixer for i in taps])
    images = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        maps = backbone(images)
    for handle in handles:
        handle.remove()
    grid = (SIZE[0] // 16, SIZE[1] // 16)
    middle = grid[0] * grid[1] // 2
    expected = [torch.cat([t[:, :middle], t[:, middle + 1:]], 1).transpose(1, 2).reshape(1, -1, *grid)
                for t in captured]  # mixer outputs without the middle cls token, as maps
    torch.testing.assert_close(maps["2"], expected[2], rtol=0, atol=0)  # stride 16: identity
    torch.testing.assert_close(maps["3"], F.max_pool2d(expected[3], 2), rtol=0, atol=0)
    torch.testing.assert_close(maps["1"], backbone.pyramid.fpn2(expected[1]))
    torch.testing.assert_close(maps["0"], backbone.pyramid.fpn1(expected[0]))
    # the mixer output is not the residual stream that forward_intermediates returns by default
    residual = backbone.model.forward_intermediates(images, indices=list(taps), intermediates_only=True)
    assert not torch.allclose(residual[2], expected[2])


def test_vim_stride8_models_pad_to_an_exact_stride8_grid() -> None:
    backbone = _backbone("test_vim", stride=8)
    assert backbone.spec.input_padding(backbone.model) == 8
    assert [type(m).__name__ for m in (backbone.pyramid.fpn2, backbone.pyramid.fpn3)] == ["Identity", "MaxPool2d"]
    assert backbone.pyramid.fpn4.kernel_size == 4
    captured, handles = _hook_outputs([backbone.model.layers[1].mixer])
    images = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        maps = backbone(images)
    handles[0].remove()
    grid = (SIZE[0] // 8, SIZE[1] // 8)  # (H + 8 - 16) / 8 + 1 patches with the padding
    middle = grid[0] * grid[1] // 2
    tokens = torch.cat([captured[0][:, :middle], captured[0][:, middle + 1:]], 1)
    torch.testing.assert_close(maps["1"], tokens.transpose(1, 2).reshape(1, -1, *grid), rtol=0, atol=0)


def test_plainmamba_taps_are_normalised_residual_stream_outputs() -> None:
    backbone = _backbone("test_plainmamba")
    _randomise_norms(backbone)
    assert [n for n in backbone.norm_names] == ["norm_layer0", "norm_layer1", "norm_layer2", None]
    captured, handles = _hook_outputs([backbone.model.layers[i] for i in backbone.taps])
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, *SIZE))
    for handle in handles:
        handle.remove()
    grid = (SIZE[0] // 16, SIZE[1] // 16)

    def layer_norm(tokens: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
        normed = F.layer_norm(tokens, tokens.shape[-1:], norm.weight, norm.bias, norm.eps)
        return normed.transpose(1, 2).reshape(1, -1, *grid)

    assert backbone.norm_layer2.eps == 1e-6
    torch.testing.assert_close(maps["2"], layer_norm(captured[2], backbone.norm_layer2))
    torch.testing.assert_close(maps["3"], F.max_pool2d(layer_norm(captured[3], backbone.model.ln1), 2))


@pytest.mark.parametrize("name", HIERARCHICAL_MODELS)
def test_hierarchical_levels_are_stage_maps_through_the_level_norms(name: str) -> None:
    backbone = _backbone(name)
    _randomise_norms(backbone)
    reference = copy.deepcopy(backbone.model)  # the same weights, queried directly
    images = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        maps = backbone(images)
        stages = reference.forward_intermediates(images, indices=[0, 1, 2, 3], intermediates_only=True)
    for level, (feature, stage) in enumerate(zip(maps.values(), stages)):
        norm = getattr(backbone, backbone.norm_names[level])
        assert norm.eps == backbone.spec.level_norm_eps
        expected = F.layer_norm(stage.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(feature, expected.permute(0, 3, 1, 2))


def test_mambaout_levels_are_taken_before_the_next_downsample() -> None:
    backbone = _backbone("test_mambaout")
    model = backbone.model
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = backbone(x)
        x = model.stem(x)
        for level, stage in enumerate(model.stages):  # timm's stage i starts with the downsample into it
            x = stage(x)
            norm = getattr(backbone, f"outnorm{level}")
            torch.testing.assert_close(maps[str(level)], norm(x.permute(0, 3, 1, 2)))


@pytest.mark.parametrize("name", ["test_vim", "test_mambaout"])
def test_pretrained_classification_weights_load_before_pruning(name: str, tmp_path: Path) -> None:
    _skip_unregistered(name)
    torch.manual_seed(1)
    classifier = mambazoo.create_model(name)
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(tmp_path / "w.safetensors"))
    backbone = create_backbone(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "w.safetensors")))
    loaded = backbone.model.state_dict()
    assert loaded and all(torch.equal(value, classifier.state_dict()[key]) for key, value in loaded.items())


def test_adapter_rejects_sizes_that_are_not_multiples_of_32() -> None:
    backbone = _backbone("test_mambaout")
    with pytest.raises(ValueError, match=r"input size \(100, 64\) must be a multiple of 32"):
        backbone(torch.randn(1, 3, 100, 64))


@pytest.mark.parametrize("name", [m for m in HIERARCHICAL_MODELS if m != "test_convnext"])
def test_official_downstream_checkpoint_backbone_part_loads(name: str, tmp_path: Path) -> None:
    source = _backbone(name)
    _randomise_norms(source)
    assert [n for n in source.norm_names] == [f"outnorm{i}" for i in range(4)]
    # mmdet/mmseg layout: backbone.<model keys>, backbone.outnorm{i}.*, plus neck and head entries
    official = {f"backbone.{k}": v for k, v in source.model.state_dict().items()}
    official.update({f"backbone.outnorm{i}.{p}": getattr(source, f"outnorm{i}").state_dict()[p]
                     for i in range(4) for p in ("weight", "bias")})
    official.update({"neck.lateral_convs.0.conv.weight": torch.zeros(1), "decode_head.conv_seg.bias": torch.zeros(1)})
    target = _backbone(name)
    assert load_backbone_checkpoint(target, official, source="det.pth") == 2
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0, msg=key)
    del official["backbone.outnorm3.bias"]
    with pytest.raises(ValueError, match=r"det\.pth does not match DenseBackbone:\n  missing \(1\): outnorm3"):
        load_backbone_checkpoint(target, official, source="det.pth")
    with pytest.raises(ValueError, match="no keys start with 'encoder.'"):
        load_backbone_checkpoint(target, official, prefix="encoder.")


def test_a_new_family_plugs_in_by_registering_a_tap_spec() -> None:
    register_taps(TapSpec(family="resnet_test", patterns=("test_resnet",), kind="hierarchical", taps="stages"))
    try:
        with pytest.raises(ValueError, match=r"hierarchical taps must have strides .* gives \(2, 4, 8, 16\)"):
            create_backbone("test_resnet")  # timm's ResNet feature_info starts at the stride-2 stem
        spec = TapSpec(family="resnet_test", patterns=("test_resnet",), kind="hierarchical", taps=(1, 2, 3, 4),
                       level_norm_eps=1e-5, test_model="test_resnet")
        register_taps(spec, overwrite=True)
        backbone = create_backbone("test_resnet")
        maps = backbone(torch.randn(1, 3, 64, 64))
        assert backbone.spec is spec and backbone.taps == (1, 2, 3, 4) and hasattr(backbone, "outnorm3")
        assert [tuple(m.shape[-2:]) for m in maps.values()] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    finally:
        del TAP_SPECS["resnet_test"]
