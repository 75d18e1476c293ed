"""PlainMamba: scan orders, mixer semantics (vs a float64 loop oracle), parameter counts, FLOPs, loading, contract."""
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mambazoo.checkpoint import CheckpointMismatchError
from mambazoo.models.plainmamba import PlainMamba2D, checkpoint_filter_fn, zigzag_scan_orders
from mambazoo.ops import available_backends
from official_keys import read_key_shapes

KEYS_L1 = Path(__file__).parent / "data" / "keys_plainmamba_l1.txt"  # official L1 key list (docs/plainmamba.md)

# Expected orders / direction ids written by hand from the definition (docs/plainmamba.md): o1 row snake from the
# top-left, o2 = reverse(o1), o3 column snake from the top-left, o4 = reverse(o3); ids 0 start, 1 right, 2 left,
# 3 up, 4 down.
HAND_ORDERS = {
    (3, 4): (
        [[0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11], [11, 10, 9, 8, 4, 5, 6, 7, 3, 2, 1, 0],
         [0, 4, 8, 9, 5, 1, 2, 6, 10, 11, 7, 3], [3, 7, 11, 10, 6, 2, 1, 5, 9, 8, 4, 0]],
        [[0, 1, 1, 1, 4, 2, 2, 2, 4, 1, 1, 1], [0, 2, 2, 2, 3, 1, 1, 1, 3, 2, 2, 2],
         [0, 4, 4, 1, 3, 3, 1, 4, 4, 1, 3, 3], [0, 4, 4, 2, 3, 3, 2, 4, 4, 2, 3, 3]],
    ),
    (4, 3): (
        [[0, 1, 2, 5, 4, 3, 6, 7, 8, 11, 10, 9], [9, 10, 11, 8, 7, 6, 3, 4, 5, 2, 1, 0],
         [0, 3, 6, 9, 10, 7, 4, 1, 2, 5, 8, 11], [11, 8, 5, 2, 1, 4, 7, 10, 9, 6, 3, 0]],
        [[0, 1, 1, 4, 2, 2, 4, 1, 1, 4, 2, 2], [0, 1, 1, 3, 2, 2, 3, 1, 1, 3, 2, 2],
         [0, 4, 4, 4, 1, 3, 3, 3, 1, 4, 4, 4], [0, 3, 3, 3, 2, 4, 4, 4, 2, 3, 3, 3]],
    ),
    (5, 5): (
        [[0, 1, 2, 3, 4, 9, 8, 7, 6, 5, 10, 11, 12, 13, 14, 19, 18, 17, 16, 15, 20, 21, 22, 23, 24],
         [24, 23, 22, 21, 20, 15, 16, 17, 18, 19, 14, 13, 12, 11, 10, 5, 6, 7, 8, 9, 4, 3, 2, 1, 0],
         [0, 5, 10, 15, 20, 21, 16, 11, 6, 1, 2, 7, 12, 17, 22, 23, 18, 13, 8, 3, 4, 9, 14, 19, 24],
         [24, 19, 14, 9, 4, 3, 8, 13, 18, 23, 22, 17, 12, 7, 2, 1, 6, 11, 16, 21, 20, 15, 10, 5, 0]],
        [[0, 1, 1, 1, 1, 4, 2, 2, 2, 2, 4, 1, 1, 1, 1, 4, 2, 2, 2, 2, 4, 1, 1, 1, 1],
         [0, 2, 2, 2, 2, 3, 1, 1, 1, 1, 3, 2, 2, 2, 2, 3, 1, 1, 1, 1, 3, 2, 2, 2, 2],
         [0, 4, 4, 4, 4, 1, 3, 3, 3, 3, 1, 4, 4, 4, 4, 1, 3, 3, 3, 3, 1, 4, 4, 4, 4],
         [0, 3, 3, 3, 3, 2, 4, 4, 4, 4, 2, 3, 3, 3, 3, 2, 4, 4, 4, 4, 2, 3, 3, 3, 3]],
    ),
}


def _walk(height: int, width: int, column_wise: bool) -> tuple[list[int], list[int]]:
    """Walk a snake path cell by cell (an independent construction) and record each move's direction id."""
    cells = []
    for outer in range(width if column_wise else height):
        inner = range(height if column_wise else width)
        for step in (inner if outer % 2 == 0 else reversed(inner)):
            cells.append((step, outer) if column_wise else (outer, step))
    moves = {(0, 1): 1, (0, -1): 2, (-1, 0): 3, (1, 0): 4}
    directions = [0] + [moves[(b[0] - a[0], b[1] - a[1])] for a, b in zip(cells, cells[1:])]
    return [i * width + j for i, j in cells], directions


def _reverse_path(order: list[int], width: int) -> tuple[list[int], list[int]]:
    cells = [divmod(index, width) for index in reversed(order)]
    moves = {(0, 1): 1, (0, -1): 2, (-1, 0): 3, (1, 0): 4}
    return order[::-1], [0] + [moves[(b[0] - a[0], b[1] - a[1])] for a, b in zip(cells, cells[1:])]


@pytest.mark.parametrize("hw", sorted(HAND_ORDERS))
def test_scan_orders_match_hand_written_tables(hw):
    orders, directions = zigzag_scan_orders(*hw)
    assert orders.tolist() == HAND_ORDERS[hw][0]
    assert directions.tolist() == HAND_ORDERS[hw][1]


def test_scan_orders_14x14_follow_the_definition():
    orders, directions = zigzag_scan_orders(14, 14)
    rows, row_dirs = _walk(14, 14, column_wise=False)
    cols, col_dirs = _walk(14, 14, column_wise=True)
    expected = [(rows, row_dirs), _reverse_path(rows, 14), (cols, col_dirs), _reverse_path(cols, 14)]
    for k, (order, dirs) in enumerate(expected):
        assert orders[k].tolist() == order and directions[k].tolist() == dirs
    # start corners at 14×14: top-left, bottom-left, top-left, top-right (docs/plainmamba.md)
    assert orders[:, 0].tolist() == [0, 13 * 14, 0, 13]


def test_scan_orders_reject_empty_grid():
    with pytest.raises(ValueError, match="height and width"):
        zigzag_scan_orders(0, 3)


def _mixer_oracle(mixer: PlainMamba2D, x: torch.Tensor, hw: tuple[int, int], quirky: bool) -> torch.Tensor:
    """Float64 loop implementation of the mixer equations (docs/plainmamba.md), using the hand-written orders."""
    p = {name: t.double() for name, t in mixer.state_dict().items()}
    height, width = hw
    inner, rank, n = mixer.d_inner, mixer.dt_rank, mixer.d_state
    xz = x @ p["in_proj.weight"].t() + p["in_proj.bias"]
    xs, z = xz[..., :inner], xz[..., inner:]
    xc = F.conv2d(xs.reshape(1, height, width, inner).permute(0, 3, 1, 2), p["conv2d.weight"], p["conv2d.bias"],
                  padding=mixer.conv2d.padding, groups=inner)
    xc = F.silu(xc).flatten(2)[0].t()  # (L, E)
    proj = xc @ p["x_proj.weight"].t()
    dt, Bm, Cm = proj[:, :rank], proj[:, rank:rank + n], proj[:, rank + n:]
    bias = p["dt_proj.bias"] * (2 if quirky else 1)
    delta = F.softplus(dt @ p["dt_proj.weight"].t() + bias)
    A = -torch.exp(p["A_log"])
    y = torch.zeros_like(xc)
    orders, directions = HAND_ORDERS[hw]
    for order, dirs in zip(orders, directions):
        h = torch.zeros(inner, n, dtype=torch.float64)
        for t, (token, move) in enumerate(zip(order, dirs)):
            s = t if quirky else token  # quirk: Δ, B, C come from raster token t
            b = Bm[s] + p["direction_Bs"][move]
            h = torch.exp(delta[s][:, None] * A) * h + (delta[s] * xc[token])[:, None] * b[None, :]
            y[token] += h @ Cm[s] + p["D"] * xc[token]
    out = (y * F.silu(z[0])) @ p["out_proj.weight"].t() + p["out_proj.bias"]
    return out[None]


@pytest.mark.parametrize("hw", [(3, 4), (4, 3)])
@pytest.mark.parametrize("quirky", [True, False])
def test_mixer_matches_loop_oracle(hw, quirky):
    torch.manual_seed(1)
    mixer = PlainMamba2D(12, d_state=4, conv_size=3, double_dt_bias=quirky, raster_ssm_inputs=quirky)
    with torch.no_grad():
        mixer.direction_Bs.normal_(0, 0.5)
        mixer.dt_proj.bias.normal_(0, 0.5)
    x = torch.randn(1, hw[0] * hw[1], 12)
    expected = _mixer_oracle(mixer, x.double(), hw, quirky)
    mixer.double()
    for backend in ("reference", "torch"):
        mixer.scan_backend = backend
        torch.testing.assert_close(mixer(x.double(), hw), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("quirk", ["double_dt_bias", "raster_ssm_inputs"])
def test_each_quirk_changes_the_output(quirk):
    torch.manual_seed(2)
    model = timm.create_model("test_plainmamba").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for name, param in model.named_parameters():  # weights of trained-like scale, so every term matters
            if param.dim() > 1 and "pos_embed" not in name:
                param.copy_(torch.randn_like(param) / param[0].numel() ** 0.5)
        reference = model(x)
        for module in model.modules():
            if isinstance(module, PlainMamba2D):
                setattr(module, quirk, False)
        changed = model(x)
    assert (changed - reference).abs().max() > 1e-4


@pytest.mark.parametrize("name, total, backbone", [
    ("plainmamba_l1", 7_551_656, 7_358_656),
    ("plainmamba_l2", 26_145_832, 25_760_832),
    ("plainmamba_l3", 50_956_456, 50_507_456),
])
def test_parameter_counts(name, total, backbone):
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(timm.create_model(name, device="meta")) == total
    assert count(timm.create_model(name, num_classes=0, device="meta")) == backbone


def _hand_macs(dim: int, depth: int, num_stem_convs: int, dwconv_layers: int, side: int = 224) -> int:
    """Conv + linear MACs plus 9·L·E·N per scan call (4 calls a layer), derived from the architecture."""
    stem_side = side // 2
    tokens = (stem_side // 8) ** 2
    inner, rank, n = 2 * dim, math.ceil(dim / 16), 16
    stem = stem_side ** 2 * 64 * (3 * 49 + num_stem_convs * 64 * 9) + tokens * dim * 64 * 64
    layer = tokens * (dim * 2 * inner + inner * 49 + inner * (rank + 2 * n) + rank * inner + inner * dim)
    scan = 4 * 9 * tokens * inner * n
    return stem + depth * (layer + scan) + dwconv_layers * tokens * dim * 9 + dim * 1000


@pytest.mark.parametrize("name, args, published", [
    ("plainmamba_l1", (192, 24, 1, 1), 3.0),
    ("plainmamba_l2", (384, 24, 2, 0), 8.1),
    ("plainmamba_l3", (448, 36, 2, 0), 14.4),
])
def test_flops_reproduce_the_paper(name, args, published):
    macs = _hand_macs(*args)
    assert round(macs / 1e9, 1) == published
    flops = pytest.importorskip("mambazoo.flops")
    assert flops.count_model_macs(timm.create_model(name, device="meta")).total == macs


@pytest.mark.parametrize("name", [
    "test_plainmamba",
    "plainmamba_l1",
    pytest.param("plainmamba_l2", marks=pytest.mark.slow),
    pytest.param("plainmamba_l3", marks=pytest.mark.slow),
])
def test_every_variant_forward_backward(name):
    # built on the meta device and filled cheaply: the real initialiser costs seconds for L2/L3 on 2 cores
    model = timm.create_model(name, num_classes=5, drop_path_rate=0.1, device="meta").to_empty(device="cpu")
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            param.normal_(-1.0 if param_name.endswith("A_log") else 0.0, 0.02)
        for buffer_name, buffer in model.named_buffers():
            buffer.fill_(1 if buffer_name.endswith("running_var") else 0)
    x = torch.randn(2, 3, 40, 56)
    out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def _official_l1_keys() -> dict[str, tuple[int, ...]]:
    return read_key_shapes(KEYS_L1.name)


def test_official_l1_key_list_loads_strictly():
    official = _official_l1_keys()
    model = timm.create_model("plainmamba_l1")
    state_dict = {key: torch.full(shape, 0.5) if shape else torch.tensor(3) for key, shape in official.items()}
    model.load_state_dict(checkpoint_filter_fn({"state_dict": state_dict}, model), strict=True)
    assert torch.all(model.layers[0].mamba.direction_Bs == 0.5) and torch.all(model.head.bias == 0.5)


def _to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(key.replace("head.", "head.fc.") if key.startswith("head.") else "backbone." + key): value
            for key, value in state_dict.items()}


@pytest.mark.parametrize("wrapped", [True, False])
def test_official_format_round_trip(tmp_path, wrapped):
    source = timm.create_model("test_plainmamba").eval()
    official = _to_official(source.state_dict())
    path = tmp_path / "official.pth"
    torch.save({"state_dict": official, "meta": {}} if wrapped else official, path)
    loaded = timm.create_model("test_plainmamba", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_strict_load_reports_the_bad_keys(tmp_path):
    source = timm.create_model("test_plainmamba")
    official = _to_official(source.state_dict())
    official.pop("backbone.layers.1.mamba.direction_Bs")
    official["backbone.layers.2.mamba.A_log"] = torch.zeros(3, 3)
    official["backbone.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(official, path)
    with pytest.raises(CheckpointMismatchError) as error:
        timm.create_model("test_plainmamba", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    message = str(error.value)
    assert f"checkpoint file '{path}' does not match PlainMamba (test_plainmamba)" in message
    assert "missing (1): layers.1.mamba.direction_Bs" in message and "unexpected (1): extra.weight" in message
    assert "layers.2.mamba.A_log: checkpoint (3, 3) vs model (64, 8)" in message


def test_offline_pretrained_path_adapts_head(tmp_path):
    source = timm.create_model("test_plainmamba")
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), str(path))
    model = timm.create_model(
        "test_plainmamba", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=7,
    )
    assert model.head.out_features == 7
    torch.testing.assert_close(model.pos_embed, source.pos_embed)
    torch.testing.assert_close(model.layers[3].mamba.A_log, source.layers[3].mamba.A_log)


def test_resolution_change():
    model = timm.create_model("test_plainmamba").eval()
    # token grid = ceil(ceil(side / 2) / 8): 97 -> 49 -> 7, 131 -> 66 -> 9 (corner padding of the stem map)
    assert model.forward_features(torch.randn(1, 3, 97, 131)).shape == (1, 63, 32)
    # a model whose stored grid is 10×12 (filtered from the 14×14 checkpoint) equals on-the-fly resizing
    resized = timm.create_model("test_plainmamba", img_size=(160, 192)).eval()
    resized.load_state_dict(checkpoint_filter_fn(model.state_dict(), resized))
    assert resized.pos_embed.shape == (1, 120, 32)
    x = torch.randn(1, 3, 160, 192)
    with torch.no_grad():
        torch.testing.assert_close(resized(x), model(x))


@pytest.mark.parametrize("backend", [b for b in ("torch", "native") if b in available_backends()])
def test_backends_agree_with_reference(backend):
    torch.manual_seed(3)
    model = timm.create_model("test_plainmamba", num_classes=4)
    x = torch.randn(2, 3, 48, 64)
    results = []
    for name in ("reference", backend):
        for module in model.modules():
            if isinstance(module, PlainMamba2D):
                module.scan_backend = name
        model.zero_grad()
        out = model(x)
        out.sum().backward()
        results.append((out.detach(), model.layers[1].mamba.in_proj.weight.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-3, atol=1e-5)


def test_timm_contract():
    model = timm.create_model("test_plainmamba", num_classes=6).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 20, 32)
        assert model.forward_head(features, pre_logits=True).shape == (2, 32)
        torch.testing.assert_close(model.forward_head(features), model(x))
        final, taps = model.forward_intermediates(x)
        torch.testing.assert_close(final, features)
        assert [t.shape for t in taps] == [(2, 32, 4, 5)] * 4
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), model.forward_head(features))
    assert model.get_classifier().out_features == 6
    model.reset_classifier(0)
    assert model(x).shape == (2, 32)
    model.reset_classifier(0, "")
    assert model(x).shape == (2, 20, 32)
    assert {"pos_embed", "layers.0.mamba.A_log", "layers.3.mamba.direction_Bs"} <= model.no_weight_decay()
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert len(groups) == 5 and "patch_embed.stem.0.weight" in groups[0]  # stem, then one group per layer
    assert "layers.2.mamba.D" in groups[3] and "ln1.weight" in groups[4]


def test_forward_intermediates_options_and_errors():
    model = timm.create_model("test_plainmamba", depth=8).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        quarter = model.forward_intermediates(x, intermediates_only=True)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True, output_fmt="NLC", norm=True)
        picked = model.forward_intermediates(x, indices=[-1, 1], intermediates_only=True)
    assert len(quarter) == 4 and torch.equal(quarter[3], picked[1]) and torch.equal(quarter[0], picked[0])
    assert last_two[1].shape == (1, 16, 32)
    torch.testing.assert_close(last_two[1], model.ln1(quarter[3].flatten(2).transpose(1, 2)))
    for bad in (dict(indices=[8]), dict(indices=0), dict(output_fmt="NHWC")):
        with pytest.raises(ValueError):
            model.forward_intermediates(x, **bad)
    with pytest.raises(ValueError, match="global_pool"):
        timm.create_model("test_plainmamba", global_pool="max")
    with pytest.raises(ValueError, match="dwconv_layers"):
        timm.create_model("test_plainmamba", dwconv_layers=(9,))


def test_features_only_and_pruning():
    model = timm.create_model("plainmamba_l1", features_only=True, device="meta")
    assert model.feature_info.reduction() == [16] * 4
    assert model.feature_info.module_name() == [f"layers.{i}" for i in (5, 11, 17, 23)]
    l3 = timm.create_model("plainmamba_l3", features_only=True, device="meta")
    assert l3.feature_info.module_name() == [f"layers.{i}" for i in (8, 17, 26, 35)]
    small = timm.create_model("test_plainmamba", features_only=True, out_indices=(0, 2))
    maps = small(torch.randn(1, 3, 64, 48))
    assert [m.shape for m in maps] == [(1, 32, 4, 3)] * 2
    assert len(small.model.layers) == 3


@pytest.mark.slow
def test_compile_matches_eager():
    torch._dynamo.reset()
    model = timm.create_model("test_plainmamba").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)  # no graph break anywhere in the model
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def _train_step(model: torch.nn.Module, images: torch.Tensor) -> None:
    model.train()
    model(images).logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_training_after_inference_mode_forward_same_and_new_instance():
    images = torch.randn(2, 3, 64, 64)
    model = timm.create_model("test_plainmamba").eval()
    with torch.inference_mode():
        model(images)
    _train_step(model, images)
    _train_step(timm.create_model("test_plainmamba"), images)


def test_meta_forward_then_cpu_forward():
    with torch.device("meta"):
        meta_model = timm.create_model("test_plainmamba")
    assert meta_model(torch.empty(1, 3, 64, 64, device="meta")).device.type == "meta"
    model = timm.create_model("test_plainmamba").eval()
    logits = model(torch.randn(1, 3, 64, 64))
    assert logits.device.type == "cpu" and torch.isfinite(logits).all()


def test_eager_forward_after_torch_export_matches():
    torch.manual_seed(0)
    model = timm.create_model("test_plainmamba").eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(images)
        torch.export.export(model, (images,))
        after = model(images)
    _train_step(model, images)
    torch.testing.assert_close(after, before)
