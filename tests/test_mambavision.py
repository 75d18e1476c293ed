"""MambaVision: parameter counts, official key layout and loading, the window padding rule against an independent
float64 reference, backends, FLOPs against the paper, FX/export, and the timm contract."""
import argparse
import math
from pathlib import Path

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import create_feature_extractor

import mambazoo  # noqa: F401  (registers the models)
from mambazoo import cli
from mambazoo.flops import attention_macs, count_model_macs, scan_macs
from mambazoo.models.mambavision import Attention, MambaVisionMixer, checkpoint_filter_fn
from mambazoo.ops import available_backends
from mambazoo.zoo import MODEL_INFO
from official_keys import read_key_shapes

KEYS_T = Path(__file__).parent / "data" / "keys_mambavision_t.txt"  # copy of the spec's official key list (T)

# name: (exact parameter count with the 1000-class head, level-2 pattern, level-3 pattern), from the spec's table;
# the patterns are written out by hand (M mixer, A attention).
VARIANTS = {
    "mambavision_t": (31_794_248, "MMMMAAAA", "MMAA"),
    "mambavision_t2": (35_104_008, "MMMMMMAAAAA", "MMAA"),
    "mambavision_s": (50_140_584, "MMMMAAA", "MMMAA"),
    "mambavision_b": (97_685_288, "MMMMMAAAAA", "MMMAA"),
    "mambavision_l": (227_961_048, "MMMMMAAAAA", "MMMAA"),
    "mambavision_l2": (241_554_824, "MMMMMMAAAAAA", "MMMAA"),
    "mambavision_b_21k": (97_685_288, "MMMMMAAAAA", "MMMAA"),
    "mambavision_l_21k": (227_961_048, "MMMMMAAAAA", "MMMAA"),
    "mambavision_l2_512_21k": (241_554_824, "MMMMMMAAAAAA", "MMMAA"),
    "mambavision_l3_256_21k": (739_570_472, "M" * 10 + "A" * 10, "MMMMMAAAAA"),
    "mambavision_l3_512_21k": (739_570_472, "M" * 10 + "A" * 10, "MMMMMAAAAA"),
}


def random_state_dict(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Weights of trained-like scale, so that every term of every block matters (gammas near 1, not 1e-5)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        rand = torch.rand(value.shape, generator=generator, dtype=torch.float64)
        normal = torch.randn(value.shape, generator=generator, dtype=torch.float64)
        if not value.is_floating_point():
            new = value
        elif key.endswith("A_log"):
            new = torch.log(1 + 15 * rand)
        elif key.endswith(("gamma_1", "gamma_2", "running_var")):
            new = 0.5 + rand
        elif key.endswith(("norm1.weight", "norm2.weight", "norm.weight", "conv_down.1.weight", "conv_down.4.weight")):
            new = 1 + 0.1 * normal
        elif value.dim() == 1:  # biases, D, running means
            new = 0.3 * normal
        else:
            new = normal / math.sqrt(value[0].numel())
        state[key] = new.to(value.dtype)
    return state


def tiny(seed: int = 0, **kwargs) -> torch.nn.Module:
    model = timm.create_model("test_mambavision", **kwargs)
    model.load_state_dict(random_state_dict(model, seed))
    return model.eval()


# ---------------------------------------------------------------- independent float64 reference (spec §2)


def _bn(x, p, prefix, eps):
    shape = (1, -1, 1, 1)
    scale = p[f"{prefix}.weight"].view(shape) / torch.sqrt(p[f"{prefix}.running_var"].view(shape) + eps)
    return (x - p[f"{prefix}.running_mean"].view(shape)) * scale + p[f"{prefix}.bias"].view(shape)


def _ln(x, p, prefix):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * p[f"{prefix}.weight"] + p[f"{prefix}.bias"]


def _silu(x):
    return x / (1 + torch.exp(-x))


def _mixer(t, p, prefix):
    """The mixer on one window (L, C): hand-written symmetric conv, doubled dt bias, sequential scan, [y, z]."""
    w = lambda name: p[f"{prefix}.{name}"]  # noqa: E731
    half = t.shape[1] // 2
    xz = t @ w("in_proj.weight").T
    branches = []
    for part, conv in ((xz[:, :half], w("conv1d_x.weight")), (xz[:, half:], w("conv1d_z.weight"))):
        padded = F.pad(part.T, (1, 1))  # (C/2, L + 2), zero outside the window
        conved = conv[:, 0, 0, None] * padded[:, :-2] + conv[:, 0, 1, None] * padded[:, 1:-1] \
            + conv[:, 0, 2, None] * padded[:, 2:]
        branches.append(_silu(conved.T))
    x, z = branches
    rank = w("dt_proj.weight").shape[1]
    proj = x @ w("x_proj.weight").T
    dt, Bm, Cm = proj[:, :rank], proj[:, rank:rank + 8], proj[:, rank + 8:]
    delta = torch.log1p(torch.exp(dt @ w("dt_proj.weight").T + 2 * w("dt_proj.bias")))
    A = -torch.exp(w("A_log"))
    h = torch.zeros(half, 8, dtype=t.dtype)
    ys = []
    for step in range(t.shape[0]):
        h = torch.exp(delta[step, :, None] * A) * h + (delta[step] * x[step])[:, None] * Bm[step][None, :]
        ys.append(h @ Cm[step] + w("D") * x[step])
    return torch.cat([torch.stack(ys), z], dim=1) @ w("out_proj.weight").T


def _attention(t, p, prefix, heads):
    qkv = (t @ p[f"{prefix}.qkv.weight"].T + p[f"{prefix}.qkv.bias"]).view(t.shape[0], 3, heads, -1)
    outs = []
    for head in range(heads):
        q, k, v = qkv[:, 0, head], qkv[:, 1, head], qkv[:, 2, head]
        outs.append(torch.softmax(q @ k.T / math.sqrt(q.shape[1]), dim=-1) @ v)
    return torch.cat(outs, dim=1) @ p[f"{prefix}.proj.weight"].T + p[f"{prefix}.proj.bias"]


def _block(t, p, prefix, attention_heads):
    g1, g2 = p.get(f"{prefix}.gamma_1", 1.0), p.get(f"{prefix}.gamma_2", 1.0)
    normed = _ln(t, p, f"{prefix}.norm1")
    mixed = _attention(normed, p, f"{prefix}.mixer", attention_heads) if attention_heads \
        else _mixer(normed, p, f"{prefix}.mixer")
    t = t + g1 * mixed
    hidden = _ln(t, p, f"{prefix}.norm2") @ p[f"{prefix}.mlp.fc1.weight"].T + p[f"{prefix}.mlp.fc1.bias"]
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
    return t + g2 * (hidden @ p[f"{prefix}.mlp.fc2.weight"].T + p[f"{prefix}.mlp.fc2.bias"])


def _windowed_level(x, p, level, depth, heads, ws, rezero_padding):
    """Zero-pad bottom/right, cut windows by explicit slicing, run every block per window, paste back, crop."""
    batch, channels, height, width = x.shape
    padded_h, padded_w = math.ceil(height / ws) * ws, math.ceil(width / ws) * ws
    padded = torch.zeros(batch, channels, padded_h, padded_w, dtype=x.dtype)
    padded[:, :, :height, :width] = x
    valid = torch.zeros(padded_h, padded_w, dtype=x.dtype)
    valid[:height, :width] = 1
    out = torch.empty_like(padded)
    for b in range(batch):
        for i in range(padded_h // ws):
            for j in range(padded_w // ws):
                rows, cols = slice(i * ws, (i + 1) * ws), slice(j * ws, (j + 1) * ws)
                tokens = padded[b, :, rows, cols].reshape(channels, ws * ws).T  # raster order inside the window
                for k in range(depth):
                    attention = k >= math.ceil(depth / 2)
                    tokens = _block(tokens, p, f"levels.{level}.blocks.{k}", heads if attention else 0)
                    if rezero_padding:  # a *masked* alternative, to show the test can tell the rules apart
                        tokens = tokens * valid[rows, cols].reshape(-1, 1)
                out[b, :, rows, cols] = tokens.T.reshape(channels, ws, ws)
    return out[:, :, :height, :width]


def reference_forward(p, x, depths, heads, windows, rezero_padding=False):
    """MambaVision written from the spec's equations in float64 (state dict ``p``), no code shared with the model."""
    x = torch.relu(_bn(F.conv2d(x, p["patch_embed.conv_down.0.weight"], stride=2, padding=1), p,
                       "patch_embed.conv_down.1", 1e-4))
    x = torch.relu(_bn(F.conv2d(x, p["patch_embed.conv_down.3.weight"], stride=2, padding=1), p,
                       "patch_embed.conv_down.4", 1e-4))
    for level, depth in enumerate(depths):
        if level < 2:
            for k in range(depth):
                prefix = f"levels.{level}.blocks.{k}"
                y = _bn(F.conv2d(x, p[f"{prefix}.conv1.weight"], p[f"{prefix}.conv1.bias"], padding=1), p,
                        f"{prefix}.norm1", 1e-5)
                y = 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))  # tanh GELU
                x = x + _bn(F.conv2d(y, p[f"{prefix}.conv2.weight"], p[f"{prefix}.conv2.bias"], padding=1), p,
                            f"{prefix}.norm2", 1e-5)
        else:
            x = _windowed_level(x, p, level, depth, heads[level], windows[level], rezero_padding)
        if level < 3:
            x = F.conv2d(x, p[f"levels.{level}.downsample.reduction.0.weight"], stride=2, padding=1)
    x = _bn(x, p, "norm", 1e-5).mean(dim=(2, 3))
    return x @ p["head.weight"].T + p["head.bias"]


TINY = dict(depths=(1, 1, 3, 2), heads=(1, 2, 2, 4))


@pytest.mark.parametrize("size, windows", [
    ((64, 64), (8, 8, 4, 2)),  # window multiples: one window per level
    ((72, 88), (8, 8, 4, 2)),  # level-2 map 5×6 padded to 8×8, level-3 3×3 padded to 4×4
    ((50, 38), (8, 8, 3, 3)),  # 4×3 padded to 6×3, 2×2 padded to 3×3 (window sizes overridden at creation)
])
def test_window_padding_matches_float64_reference(size, windows):
    model = tiny(seed=1, window_size=windows, scan_backend="torch").double()
    p = {k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    batch = 2 if size == (72, 88) else 1  # two images once: windows of different images stay apart
    x = torch.randn(batch, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(x)
    expected = reference_forward(p, x, TINY["depths"], TINY["heads"], windows)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    masked = reference_forward(p, x, TINY["depths"], TINY["heads"], windows, rezero_padding=True)
    if size == (64, 64):
        torch.testing.assert_close(masked, expected, rtol=0, atol=1e-12)  # nothing padded: the rules coincide
    else:
        assert (masked - got).abs().max() > 1e-3  # padded tokens take part: masking would change the logits


# ---------------------------------------------------------------- variants and the official layout


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_exact_parameter_counts(name):
    model = timm.create_model(name, device="meta")
    assert sum(p.numel() for p in model.parameters()) == VARIANTS[name][0]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_attention_placement(name):
    model = timm.create_model(name, device="meta")
    for level, expected in zip(model.levels[2:], VARIANTS[name][1:]):
        kinds = "".join("A" if isinstance(block.mixer, Attention) else "M" for block in level.blocks)
        assert kinds == expected
    assert all(not hasattr(block, "mixer") for level in model.levels[:2] for block in level.blocks)


def test_state_dict_is_the_official_layout():
    model = timm.create_model("mambavision_t", device="meta")
    official = read_key_shapes(KEYS_T.name)
    assert len(official) == 252
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == list(official.items())
    with_scale = timm.create_model("mambavision_b", device="meta").state_dict()
    assert "levels.2.blocks.0.gamma_1" in with_scale and "levels.1.blocks.0.gamma" not in with_scale


def _official_t_weights() -> dict[str, torch.Tensor]:
    """Uninitialised tensors with the official T keys and shapes (loading is checked by identity, not values)."""
    return {key: torch.empty(shape, dtype=torch.int64 if not shape else torch.float32)
            for key, shape in read_key_shapes(KEYS_T.name).items()}


@pytest.mark.parametrize("layout", ["training_checkpoint", "hugging_face"])
def test_official_key_list_loads_strictly(layout):
    weights = _official_t_weights()
    if layout == "training_checkpoint":  # timm train.py file as released: weights under state_dict, args, optimizer
        checkpoint = {"epoch": 309, "state_dict": weights, "optimizer": {}, "args": argparse.Namespace(lr=5e-3)}
    else:  # the Hugging Face remote-code wrapper keeps the network as attribute ``model``
        checkpoint = {f"model.{key}": value for key, value in weights.items()}
    model = timm.create_model("mambavision_t", device="meta")
    model.load_state_dict(checkpoint_filter_fn(checkpoint, model), strict=True, assign=True)
    assert all(tensor.data_ptr() == weights[key].data_ptr() for key, tensor in model.state_dict().items())


@pytest.mark.parametrize("suffix", [".pth.tar", ".safetensors"])
def test_release_file_formats_load_through_timm(tmp_path, suffix):
    source = tiny(seed=4)
    weights = source.state_dict()
    path = tmp_path / f"mambavision{suffix}"
    if suffix == ".pth.tar":
        torch.save({"epoch": 309, "state_dict": weights, "optimizer": {"state": {}}, "version": 2,
                    "args": argparse.Namespace(model="mamba_vision_T", lr=5e-3)}, path)
    else:
        save_file({f"model.{key}": value for key, value in weights.items()}, str(path))
    model = timm.create_model("test_mambavision", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert all(torch.equal(model.state_dict()[key], value) for key, value in weights.items())


def test_prefixes_and_entries_are_unwrapped(tmp_path):
    source = tiny(seed=4)
    state = source.state_dict()
    path = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.encoder.{k}": v for k, v in state.items()}, "state_dict_ema": state}, path)
    model = timm.create_model("test_mambavision", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    ema = timm.create_model("test_mambavision", pretrained=True, checkpoint_key="state_dict_ema",
                            pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(ema.head.weight, state["head.weight"])
    with pytest.raises(ValueError, match=r"ddp\.pth.*no state dict under checkpoint_key 'ema'"):
        timm.create_model("test_mambavision", pretrained=True, checkpoint_key="ema",
                          pretrained_cfg_overlay=dict(file=str(path)))


def test_head_is_adapted_to_num_classes(tmp_path):
    source = tiny(seed=5)
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    model = timm.create_model("test_mambavision", pretrained=True, num_classes=7,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert model.head.weight.shape == (7, 128)
    assert torch.equal(model.levels[3].blocks[1].mixer.qkv.weight, source.levels[3].blocks[1].mixer.qkv.weight)


def test_wrong_files_give_errors_naming_the_file_and_the_problem(tmp_path):
    def load(path, name="test_mambavision", **kwargs):
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)

    with pytest.raises(FileNotFoundError, match=r"checkpoint file not found: '.*absent\.pth\.tar'"):
        load(tmp_path / "absent.pth.tar")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"'.*empty\.pth' is empty"):
        load(tmp_path / "empty.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"checkpoint file '.*junk\.pth' is corrupt"):
        load(tmp_path / "junk.pth")
    other = tmp_path / "plainmamba.pth"
    torch.save(timm.create_model("test_plainmamba").state_dict(), other)
    with pytest.raises(ValueError) as error:
        load(other)
    message = str(error.value)
    assert "plainmamba.pth" in message and "missing (" in message and "unexpected (" in message
    assert "patch_embed.conv_down.{0-1,3-4}.weight" in message and "pos_embed" in message
    no_scale = tmp_path / "no_scale.safetensors"
    save_file(timm.create_model("test_mambavision", layer_scale=0).state_dict(), str(no_scale))
    with pytest.raises(ValueError, match=r"(?s)no_scale\.safetensors.*missing \(10\): levels\.\{2-3\}\.blocks\.\{0-2\}"
                                         r"\.gamma_1.*layer_scale option must match"):
        load(no_scale)


def test_another_variants_weights_give_the_key_diff():
    t2 = timm.create_model("mambavision_t2", device="meta")  # T's weights: blocks 4-5 are mixers in T2, 8-10 extra
    with pytest.raises(ValueError) as error:
        checkpoint_filter_fn({"state_dict": _official_t_weights()}, t2)
    message = str(error.value)
    assert message.startswith("checkpoint does not match MambaVision")
    assert "missing (54): " in message and "levels.2.blocks.{8-10}.mixer.proj.bias" in message
    assert "unexpected (8): " in message and "levels.2.blocks.{4-5}.mixer.proj.bias" in message


# ---------------------------------------------------------------- numerics and training


@pytest.mark.parametrize("backend", [b for b in ("native", "torch") if b in available_backends()])
def test_backends_agree_with_reference(backend):
    x = torch.randn(2, 3, 72, 88, generator=torch.Generator().manual_seed(6))
    outputs = []
    for name in ("reference", backend):
        model = tiny(seed=6, scan_backend=name)
        out = model(x)
        out.square().sum().backward()
        outputs.append((out.detach(), model.levels[2].blocks[0].mixer.in_proj.weight.grad))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs[1][1], outputs[0][1], rtol=1e-3, atol=1e-4)


def test_gradients_reach_every_parameter_and_are_finite():
    model = timm.create_model("test_mambavision", num_classes=5, drop_path_rate=0.2, drop_rate=0.1).train()
    out = model(torch.randn(2, 3, 50, 70))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().sum().backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
           or not p.grad.abs().sum() > 0]
    assert not bad


def test_grad_checkpointing_gives_same_output_and_gradients():
    model = tiny(seed=7).train()
    x = torch.randn(2, 3, 72, 88)
    torch.manual_seed(0)
    expected = model(x)
    expected.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert all(level.grad_checkpointing for level in model.levels)
    torch.manual_seed(0)
    got = model(x)
    got.sum().backward()
    torch.testing.assert_close(got, expected)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_initialisation_follows_the_official_scheme():
    torch.manual_seed(0)
    model = timm.create_model("mambavision_t")
    mixer = model.levels[2].blocks[0].mixer
    assert torch.equal(mixer.A_log[7], torch.log(torch.arange(1.0, 9.0))) and torch.equal(mixer.D, torch.ones(160))
    assert torch.equal(mixer.dt_proj.bias, torch.zeros(160)) and 0.015 < mixer.dt_proj.weight.std() < 0.025
    assert torch.equal(model.head.bias, torch.zeros(1000)) and 0.019 < model.head.weight.std() < 0.021
    assert not hasattr(model.levels[2].blocks[0], "gamma_1") or model.levels[2].blocks[0].gamma_1 is None
    scaled = timm.create_model("test_mambavision")
    assert torch.equal(scaled.levels[3].blocks[1].gamma_2, torch.full((128,), 1e-5))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="global_pool"):
        timm.create_model("test_mambavision", global_pool="max")
    with pytest.raises(ValueError, match="depths must be 4 positive"):
        timm.create_model("test_mambavision", depths=(1, 1, 2))
    with pytest.raises(ValueError, match="window_size must be 4 positive"):
        timm.create_model("test_mambavision", window_size=(8, 8, 0, 7))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        timm.create_model("test_mambavision", num_heads=(1, 2, 3, 4))
    with pytest.raises(ValueError, match="d_conv must be odd"):
        MambaVisionMixer(16, d_conv=4)


# ---------------------------------------------------------------- FLOPs


def _hand_macs(dim, in_dim, depths, windows, side):
    """(conv + linear MACs, attention MACs, scan MACs) at a square input, derived from the architecture."""
    conv_linear = (side // 2) ** 2 * in_dim * 3 * 9 + (side // 4) ** 2 * dim * in_dim * 9
    attention = scan = 0
    for level, depth in enumerate(depths):
        width, side_l = dim * 2 ** level, side // 4 // 2 ** level
        tokens = side_l ** 2
        if level < 2:
            conv_linear += depth * 2 * tokens * width * width * 9
        else:
            length = windows[level] ** 2  # one window at these sizes
            half, rank = width // 2, math.ceil(width / 16)
            mixers = math.ceil(depth / 2)
            per_mixer = 2 * width * width + width * 3 + half * (rank + 16) + rank * half
            conv_linear += tokens * (mixers * per_mixer + (depth - mixers) * 4 * width * width + depth * 8 * width ** 2)
            attention += (depth - mixers) * attention_macs((1, 1, length, width), (1, 1, length, width),
                                                           (1, 1, length, width))
            scan += mixers * scan_macs(1, length, half, 8)
        if level < 3:
            conv_linear += (side_l // 2) ** 2 * 2 * width * width * 9
    return conv_linear + dim * 8 * 1000, attention, scan


def test_flop_counter_matches_a_hand_count_of_mambavision_t():
    count = count_model_macs("mambavision_t")
    conv_linear, attention, scan = _hand_macs(80, 32, (1, 3, 8, 4), (8, 8, 14, 7), 224)
    assert (count.scan, count.attention, count.total) == (scan, attention, conv_linear + attention + scan)
    assert count.excl_scan_attention == conv_linear


# name: (resolution, reported GMACs, counted conv+linear GMACs to 2 decimals). The paper's numbers come from ptflops,
# which counts conv and linear layers only (neither the scan nor the matmuls inside scaled_dot_product_attention).
# Tolerance 1.5%: ptflops and this counter agree within 0.2% on ten variants, and T is published as 4.4 against
# 4.46 counted (1.4%); the counted figures of the spec are met to their last digit.
PAPER_GMACS = {
    "mambavision_t": (224, 4.4, 4.46), "mambavision_t2": (224, 5.1, 5.11), "mambavision_s": (224, 7.5, 7.48),
    "mambavision_b": (224, 15.0, 14.96), "mambavision_l": (224, 34.9, 34.84), "mambavision_l2": (224, 37.5, 37.50),
    "mambavision_b_21k": (224, 15.0, None), "mambavision_l_21k": (224, 34.9, None),
    "mambavision_l2_512_21k": (512, 196.3, None), "mambavision_l3_256_21k": (256, 122.3, None),
    "mambavision_l3_512_21k": (512, 489.1, None),
}


@pytest.mark.parametrize("name", sorted(PAPER_GMACS))
def test_flops_reproduce_the_paper(name):
    size, published, counted = PAPER_GMACS[name]
    gmacs = count_model_macs(name, img_size=size).excl_scan_attention / 1e9
    assert gmacs == pytest.approx(published, rel=0.015)
    if counted is not None:
        assert gmacs == pytest.approx(counted, abs=0.005)
    assert MODEL_INFO[name].reported_gmacs == published and MODEL_INFO[name].img_size == size


def test_cli_flops_prints_the_paper_convention(capsys):
    assert cli.main(["flops", "mambavision_t"]) == 0
    header, _, row = capsys.readouterr().out.strip().splitlines()
    columns = dict(zip(header.strip("| ").split(" | "), row.strip("| ").split(" | ")))
    assert columns["gmacs_excl_scan_attn"] == "4.46" and columns["reported_gmacs"] == "4.4"
    total = float(columns["gmacs_excl_scan"]) + float(columns["scan_gmacs"])
    assert float(columns["gmacs"]) == pytest.approx(total, abs=2e-3)


# ---------------------------------------------------------------- timm contract, features, tracing


def test_configs_and_registry_names():
    names = set(mambazoo.list_models("*mambavision*"))
    assert names == set(VARIANTS) | {"test_mambavision"}
    # none is one of the upstream package's ``mamba_vision_*`` names or a timm model: all resolve to this module
    assert all(timm.models.model_entrypoint(n).__module__ == "mambazoo.models.mambavision" for n in names)
    cfg = timm.models.get_pretrained_cfg
    assert cfg("mambavision_t").hf_hub_id == "nvidia/MambaVision-T-1K" and cfg("mambavision_t").crop_pct == 1.0
    assert cfg("mambavision_t2").crop_pct == 0.98 and cfg("mambavision_s").crop_pct == 0.93
    assert cfg("mambavision_l2_512_21k").hf_hub_id == "nvidia/MambaVision-L2-512-21K"
    assert cfg("mambavision_l2_512_21k").input_size == (3, 512, 512)
    assert cfg("mambavision_l2_512_21k").crop_mode == "squash"
    assert cfg("mambavision_l3_256_21k").input_size == (3, 256, 256)
    assert cfg("mambavision_b").license == "cc-by-nc-sa-4.0"
    assert timm.create_model("mambavision_l3_512_21k", device="meta").window_size == (8, 8, 32, 16)
    dense = timm.create_model("mambavision_t", window_size=(8, 8, 112, 56), device="meta")
    assert [level.window_size for level in dense.levels] == [None, None, 112, 56]


def test_forward_features_head_and_classifier_reset():
    model = tiny(seed=8)
    x = torch.randn(2, 3, 72, 88)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 128, 3, 3)
        pooled = model.forward_head(features, pre_logits=True)
        torch.testing.assert_close(pooled, features.mean(dim=(2, 3)))
        torch.testing.assert_close(model(x), pooled @ model.head.weight.T + model.head.bias)
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pooled)
        model.reset_classifier(0, "")
        assert model(x).shape == (2, 128, 3, 3)
        model.reset_classifier(4, "avg")
        assert model(x).shape == (2, 4) and model.get_classifier() is model.head
    assert {"levels.2.blocks.0.mixer.A_log", "levels.3.blocks.1.gamma_2"} <= model.no_weight_decay()
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert len(groups) == 9 and "patch_embed.conv_down.0.weight" in groups[0] and groups[8] == ["head.weight",
                                                                                                 "head.bias"]
    assert {"levels.1.blocks.0.conv1.weight", "levels.1.downsample.reduction.0.weight"} <= set(groups[2])
    assert {"levels.3.blocks.1.mlp.fc2.bias", "norm.weight"} <= set(groups[7])  # with the last block before them
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.9)
    assert len(optimizer.param_groups) > 4


def test_forward_intermediates_are_the_pre_downsample_level_maps():
    model = tiny(seed=9)
    x = torch.randn(1, 3, 72, 88)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        manual, stem = [], model.patch_embed(x)
        for level in model.levels:
            manual.append(level.forward_blocks(stem))
            stem = level.downsample(manual[-1])
        assert [tuple(m.shape) for m in maps] == [(1, 16, 18, 22), (1, 32, 9, 11), (1, 64, 5, 6), (1, 128, 3, 3)]
        for got, expected in zip(maps, manual):
            torch.testing.assert_close(got, expected)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True, norm=True)
        torch.testing.assert_close(last_two[1], model.norm(maps[3]))
        early = model.forward_intermediates(x, indices=[0, -3], stop_early=True)[1]
        assert len(early) == 2 and torch.equal(early[1], maps[1])
    for bad in (dict(indices=[4]), dict(indices=0), dict(output_fmt="NHWC")):
        with pytest.raises(ValueError):
            model.forward_intermediates(x, **bad)


def test_features_only_strides_channels_and_pruning():
    full = tiny(seed=10)
    features = timm.create_model("test_mambavision", features_only=True, out_indices=(0, 2)).eval()
    weights = full.state_dict()
    features.model.load_state_dict({key: weights[key] for key in features.model.state_dict()})
    assert features.feature_info.reduction() == [4, 16] and features.feature_info.channels() == [16, 64]
    assert len(features.model.levels) == 3 and isinstance(features.model.levels[2].downsample, torch.nn.Identity)
    x = torch.randn(2, 3, 72, 88)
    with torch.no_grad():
        maps = features(x)
        expected = full.forward_intermediates(x, indices=(0, 2), intermediates_only=True)
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want)
    t = timm.create_model("mambavision_t", features_only=True, device="meta")
    assert t.feature_info.reduction() == [4, 8, 16, 32] and t.feature_info.channels() == [80, 160, 320, 640]


def test_fx_trace_forward_and_backward_match_eager():
    model = tiny(seed=11)
    traced = create_feature_extractor(model, return_nodes=["head"])  # timm's FX path: its leaves and wrapped functions
    x = torch.randn(2, 3, 72, 88)
    with torch.no_grad():
        torch.testing.assert_close(traced(x)["head"], model(x))
    model.train(), traced.train()
    weight = model.levels[2].blocks[0].mixer.in_proj.weight
    eager_grad = torch.autograd.grad(model(x).sum(), weight)[0]
    traced_grad = torch.autograd.grad(traced(x)["head"].sum(), traced.get_parameter(
        "levels.2.blocks.0.mixer.in_proj.weight"))[0]
    torch.testing.assert_close(traced_grad, eager_grad)


def test_torch_export_matches_eager():
    model = tiny(seed=12)
    x = torch.randn(1, 3, 72, 88)
    with torch.no_grad():
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mambavision_t", "mambavision_b"])
def test_real_variant_forward_backward(name):
    model = timm.create_model(name, num_classes=3).train()
    out = model(torch.randn(2, 3, 256, 320))
    out.square().sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("compile_backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph_matches_eager(compile_backend):
    """The whole model (scan and conv custom ops, window padding, SDPA) traces without a graph break; values and the
    gradient of a mixer's A_log agree with eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model("test_mambavision").eval()
    mixer = next(module for module in model.modules() if isinstance(module, MambaVisionMixer))
    images = torch.randn(2, 3, 72, 72)  # not a window multiple at every level: the padding is traced too
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    eager_out = model(images)
    eager_grad = torch.autograd.grad(eager_out.square().sum(), mixer.A_log)[0]
    compiled_out = compiled(images)
    compiled_grad = torch.autograd.grad(compiled_out.square().sum(), mixer.A_log)[0]
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-3, atol=1e-6)
