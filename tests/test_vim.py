"""Vision Mamba: parameter counts, official checkpoint layout and loading, forward parity, resizing, timm contract."""
import argparse
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import timm
import timm.optim
from safetensors.torch import save_file

from mambazoo.models.vim import checkpoint_filter_fn, resize_pos_embed
from mambazoo.ops import available_backends
from official_keys import read_key_shapes

KEYS_FILE = Path(__file__).parent / "data" / "keys_vim_tiny.txt"
VARIANTS = ["vim_tiny_patch16_224", "vim_tiny_patch16_stride8_224", "vim_small_patch16_224",
            "vim_small_patch16_stride8_224", "vim_base_patch16_224"]
# Published exact counts with a 1000-class head (docs/vim.md, from the official models).
PARAM_COUNTS = dict(zip(VARIANTS, [7_148_008, 7_250_344, 25_796_584, 26_001_256, 97_598_440]))


def official_keys() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official Vim-Ti state dict (dumped from the official model)."""
    return read_key_shapes(KEYS_FILE.name)


def random_state_dict(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random weights that keep the forward well behaved (A_log for A in [-16, -1], small linear weights)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(("A_log", "A_b_log")):
            state[key] = torch.log(1 + 15 * torch.rand(value.shape, generator=generator))
        elif key.endswith(("dt_proj.bias", "dt_proj_b.bias")):
            state[key] = torch.randn(value.shape, generator=generator) - 3
        else:
            state[key] = (value.float() + 0.1 * torch.randn(value.shape, generator=generator)).to(value.dtype)
    return state


# ---------------------------------------------------------------- independent float64 reference of the official math


def _reference_direction(x, z, p, suffix):
    """One direction of the v2 mixer on channels-first (B, E, L) inputs, as the official CUDA path computes it."""
    weight, bias = p[f"conv1d{suffix}.weight"], p[f"conv1d{suffix}.bias"]
    length = x.shape[-1]
    xc = F.silu(F.conv1d(x, weight, bias, padding=weight.shape[-1] - 1, groups=x.shape[1])[..., :length])
    rank = p[f"dt_proj{suffix}.weight"].shape[1]
    x_dbl = torch.einsum("bel,re->blr", xc, p[f"x_proj{suffix}.weight"])
    n_state = (x_dbl.shape[-1] - rank) // 2
    dt_raw, Bm, Cm = x_dbl[..., :rank], x_dbl[..., rank:rank + n_state], x_dbl[..., rank + n_state:]
    delta = F.softplus(dt_raw @ p[f"dt_proj{suffix}.weight"].T + p[f"dt_proj{suffix}.bias"])  # (B, L, E)
    A = -torch.exp(p["A_b_log" if suffix else "A_log"])
    D = p["D_b" if suffix else "D"]
    h = torch.zeros(x.shape[0], x.shape[1], n_state, dtype=x.dtype)
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * Bm[:, t, None, :] * xc[:, :, t, None]
        ys.append((h * Cm[:, t, None, :]).sum(-1) + D * xc[:, :, t])
    return torch.stack(ys, dim=-1) * F.silu(z)


def reference_vim_forward(p: dict, x: torch.Tensor, depth: int, stride: int) -> torch.Tensor:
    """Official Vim forward written from its equations (docs/vim.md): flipped backward branch, deferred-add RMSNorm."""
    def rms(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    tokens = F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=stride)
    tokens = tokens.flatten(2).transpose(1, 2)
    middle = tokens.shape[1] // 2
    cls = p["cls_token"].expand(x.shape[0], -1, -1)
    hidden = torch.cat([tokens[:, :middle], cls, tokens[:, middle:]], 1) + p["pos_embed"]
    residual = None
    for i in range(depth):
        lp = {k[len(f"layers.{i}.mixer."):]: v for k, v in p.items() if k.startswith(f"layers.{i}.mixer.")}
        residual = hidden if residual is None else residual + hidden
        u = rms(residual, p[f"layers.{i}.norm.weight"])
        xz = (u @ lp["in_proj.weight"].T).transpose(1, 2)
        xs, z = xz.chunk(2, dim=1)
        y = _reference_direction(xs, z, lp, "")
        y_b = _reference_direction(xs.flip(-1), z.flip(-1), lp, "_b").flip(-1)
        hidden = ((y + y_b) / 2).transpose(1, 2) @ lp["out_proj.weight"].T
    out = rms(residual + hidden, p["norm_f.weight"])
    return out[:, middle] @ p["head.weight"].T + p["head.bias"]


# ---------------------------------------------------------------- parameter counts and checkpoint layout


@pytest.mark.parametrize("name", VARIANTS)
def test_exact_parameter_counts(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name]


def test_state_dict_layout_matches_official_keys():
    with torch.device("meta"):
        model = timm.create_model("vim_tiny_patch16_224")
        plus = timm.create_model("vim_tiny_patch16_stride8_224")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_keys()
    assert tuple(plus.state_dict()["pos_embed"].shape) == (1, 730, 192)


def test_registry_names_do_not_collide_with_timm_defaults():
    assert set(VARIANTS + ["test_vim"]) <= set(timm.list_models("*vim*"))
    assert timm.models.get_pretrained_cfg("vim_small_patch16_224").hf_hub_id == "hustvl/Vim-small-midclstok"


# ---------------------------------------------------------------- numerics


def test_forward_matches_float64_reference_of_official_math():
    model = timm.create_model("test_vim", img_size=48, scan_backend="torch").double().eval()
    state = {k: v.double() for k, v in random_state_dict(model, seed=1).items()}
    model.load_state_dict(state)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        got = model(x)
    expected = reference_vim_forward(state, x, depth=4, stride=16)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_backward_branch_parameters_matter():
    """Guards against the upstream slow-path bug that silently drops the backward branch."""
    model = timm.create_model("test_vim").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        for name, param in model.named_parameters():
            if "_b." in name or name.endswith(("A_b_log", "D_b")):
                param.add_(0.5)
        after = model(x)
    assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_scan_backends_agree_at_model_level(backend):
    if backend not in available_backends():
        pytest.skip(f"{backend} backend not built")
    torch.manual_seed(0)
    model = timm.create_model("test_vim", scan_backend="reference").eval()
    state = random_state_dict(model, seed=2)
    model.load_state_dict(state)
    other = timm.create_model("test_vim", scan_backend=backend).eval()
    other.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=2e-5)


def test_torch_compile_matches_eager():
    # fullgraph: the whole model (scan and conv custom ops, backend dispatch) traces without a graph break
    model = timm.create_model("test_vim", img_size=32, depth=1).eval()  # one block keeps the compile time low
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("name", ["test_vim"] + [pytest.param(n, marks=pytest.mark.slow) for n in VARIANTS])
def test_forward_backward_every_parameter_gets_a_gradient(name):
    model = timm.create_model(name, img_size=32, num_classes=5, drop_path_rate=0.1)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_grad_checkpointing_gives_same_output_and_gradients():
    model = timm.create_model("test_vim", img_size=32).train()
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_initialisation_follows_official_scheme():
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224")
    mixer = model.layers[3].mixer
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5) and dt.std() > 0
    assert torch.equal(mixer.dt_proj_b.bias, torch.zeros(384))  # upstream quirk: zeroed, so initial dt_b = ln 2
    torch.testing.assert_close(mixer.A_log[5], torch.log(torch.arange(1.0, 17.0)))
    assert torch.equal(mixer.A_b_log, mixer.A_log) and torch.equal(mixer.D_b, torch.ones(384))
    # out_proj: kaiming_uniform(a=sqrt(5)) bound 1/sqrt(fan_in), divided by sqrt(depth)
    assert mixer.out_proj.weight.abs().max() <= 1 / math.sqrt(384) / math.sqrt(24)
    assert mixer.out_proj.weight.abs().max() > 0.9 / math.sqrt(384) / math.sqrt(24)
    assert mixer.dt_proj.weight.abs().max() <= 12 ** -0.5
    assert torch.equal(model.patch_embed.proj.bias, torch.zeros(192))
    assert torch.equal(model.head.bias, torch.zeros(1000))
    assert 0.015 < model.pos_embed.std() < 0.025


# ---------------------------------------------------------------- checkpoints


def official_checkpoint(model, path, seed=3):
    """An official-format training checkpoint (model, EMA, args as argparse.Namespace) saved with torch.save."""
    weights, ema = random_state_dict(model, seed), random_state_dict(model, seed + 1)
    ckpt = {"model": weights, "model_ema": ema, "optimizer": {}, "lr_scheduler": {}, "epoch": 299, "scaler": {},
            "args": argparse.Namespace(model="vim", lr=1e-3, drop_path=0.0)}
    torch.save(ckpt, path)
    return weights, ema


@pytest.mark.parametrize("checkpoint_key", ["model", "model_ema"])
def test_official_training_checkpoint_loads_weights_only(tmp_path, checkpoint_key):
    template = timm.create_model("test_vim")
    weights, ema = official_checkpoint(template, tmp_path / "vim.pth")
    expected = weights if checkpoint_key == "model" else ema
    model = timm.create_model("test_vim", pretrained=True, checkpoint_key=checkpoint_key,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "vim.pth")))
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_official_layout_checkpoint_loads_into_tiny_and_stride8(tmp_path):
    keys = official_keys()
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=generator) for k, shape in keys.items()}
    model = timm.create_model("vim_tiny_patch16_224")
    model.load_state_dict(checkpoint_filter_fn({"model": state, "args": None}, model), strict=True)
    assert torch.equal(model.layers[7].mixer.x_proj_b.weight, state["layers.7.mixer.x_proj_b.weight"])
    state["pos_embed"] = torch.randn(1, 730, 192, generator=generator)
    plus = timm.create_model("vim_tiny_patch16_stride8_224")
    plus.load_state_dict(checkpoint_filter_fn(state, plus), strict=True)
    assert torch.equal(plus.pos_embed, state["pos_embed"])


def test_mismatched_checkpoint_lists_every_problem():
    model = timm.create_model("test_vim")
    state = model.state_dict()
    del state["layers.1.mixer.D_b"]
    state["layers.0.mixer.rope.freqs"] = torch.zeros(3)
    state["layers.2.mixer.x_proj.weight"] = torch.zeros(5, 64)
    with pytest.raises(ValueError) as error:
        checkpoint_filter_fn(state, model)
    message = str(error.value)
    assert "missing (1): layers.1.mixer.D_b" in message
    assert "unexpected (1): layers.0.mixer.rope.freqs" in message
    assert "layers.2.mixer.x_proj.weight: checkpoint (5, 64) vs model (18, 64)" in message
    with pytest.raises(ValueError, match="checkpoint_key 'ema'"):
        checkpoint_filter_fn({"model": model.state_dict()}, model, checkpoint_key="ema")


def test_pretrained_path_offline_with_head_adaptation(tmp_path):
    source = timm.create_model("test_vim")
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    model = timm.create_model("test_vim", pretrained=True, num_classes=7,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")))
    assert model.head.weight.shape == (7, 32)
    for key, value in source.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(model.state_dict()[key], value), key


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="global_pool"):
        timm.create_model("test_vim", global_pool="max")
    with pytest.raises(ValueError, match="pos_embed_resize"):
        timm.create_model("test_vim", pos_embed_resize="nearest")
    model = timm.create_model("test_vim")
    with pytest.raises(ValueError, match="img_size"):
        model(torch.randn(1, 3, 80, 64))


# ---------------------------------------------------------------- resolution


def test_mid_cls_pos_embed_resize_moves_the_cls_slot():
    old_grid, new_grid = (4, 4), (5, 7)
    pos_embed = torch.ones(1, 17, 8)
    pos_embed[:, 8] = -5.0  # the middle cls slot of a 4x4 grid
    resized = resize_pos_embed(pos_embed, old_grid, new_grid)
    expected = torch.ones(1, 36, 8)
    expected[:, 35 // 2] = -5.0
    torch.testing.assert_close(resized, expected)
    # upstream's resize treats index 0 as the cls slot and smears the cls embedding into the grid
    upstream = resize_pos_embed(pos_embed, old_grid, new_grid, mode="upstream")
    assert upstream.shape == (1, 36, 8) and upstream[:, 0].eq(1).all() and (upstream[:, 1:] - 1).abs().max() > 0.5
    torch.testing.assert_close(resize_pos_embed(pos_embed, old_grid, old_grid), pos_embed)


def test_new_resolution_from_checkpoint_equals_dynamic_img_size():
    source = timm.create_model("test_vim", stride=8).eval()
    state = random_state_dict(source, seed=4)
    resized = timm.create_model("test_vim", stride=8, img_size=(160, 192)).eval()
    resized.load_state_dict(checkpoint_filter_fn(state, resized))
    dynamic = timm.create_model("test_vim", stride=8, dynamic_img_size=True).eval()
    dynamic.load_state_dict(state)
    x = torch.randn(1, 3, 160, 192)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), resized(x), rtol=0, atol=1e-6)
        features = resized.forward_intermediates(x, indices=[-1], intermediates_only=True)
    assert resized.pos_embed.shape == (1, 19 * 23 + 1, 32) and features[0].shape == (1, 32, 19, 23)


# ---------------------------------------------------------------- timm contract and features


def test_head_pooling_and_classifier_reset():
    model = timm.create_model("test_vim").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 17, 32)
        pre_logits = model.forward_head(tokens, pre_logits=True)
        torch.testing.assert_close(pre_logits, tokens[:, 8])  # the middle cls token of 16 patches
        torch.testing.assert_close(model(x), pre_logits @ model.head.weight.T + model.head.bias)
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pre_logits)
        model.reset_classifier(3, "avg")
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True),
                                   torch.cat([tokens[:, :8], tokens[:, 9:]], 1).mean(1))
        model.reset_classifier(0, "")
        assert model(x).shape == (2, 17, 32)
    assert model.get_classifier() is model.head
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}


def test_forward_intermediates_drop_the_middle_cls_token():
    model = timm.create_model("test_vim").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)
        final, feats = model.forward_intermediates(x, indices=2, norm=True, output_fmt="NLC")
        pairs = model.forward_intermediates(x, indices=[0], return_prefix_tokens=True, intermediates_only=True)
        mixer = model.forward_intermediates(x, indices=[1], mixer_output=True, intermediates_only=True)
    torch.testing.assert_close(final, tokens)
    torch.testing.assert_close(feats[-1], torch.cat([tokens[:, :8], tokens[:, 9:]], 1))
    patches, cls_token = pairs[0]
    assert patches.shape == (2, 32, 4, 4) and cls_token.shape == (2, 1, 32) and mixer[0].shape == (2, 32, 4, 4)
    assert not torch.allclose(mixer[0], model.forward_intermediates(x, indices=[1], intermediates_only=True)[0])


@pytest.mark.parametrize("stride", [16, 8])
def test_features_only(stride):
    model = timm.create_model("test_vim", stride=stride, features_only=True, out_indices=(1, 3))
    features = model(torch.randn(2, 3, 64, 64))
    grid = (64 - 16) // stride + 1
    assert [f.shape for f in features] == [(2, 32, grid, grid)] * 2
    assert model.feature_info.reduction() == [stride] * 2 and model.feature_info.channels() == [32, 32]


def test_prune_and_param_groups():
    model = timm.create_model("test_vim")
    assert model.prune_intermediate_layers([1]) == [1] and len(model.layers) == 2
    assert model.get_classifier().__class__.__name__ == "Identity"
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.9)
    assert len(optimizer.param_groups) > 2
