"""Spatial-Mamba: mixer and state fusion vs float64 oracles, no stale fusion cache, parameter counts, FLOPs, official
checkpoint loading (strict, weights_only-safe), the timm contract, FX, export."""
import math
import os
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mambazoo.checkpoint import CheckpointError, Placeholder, load_checkpoint_file
from mambazoo.flops import count_model_macs
from mambazoo.models.spatialmamba import StateFusion, StructureAwareSSM, checkpoint_filter_fn, fuse_states, \
    fuse_states_merged
from mambazoo.ops.capabilities import backend_status
from official_keys import read_key_shapes

SCAN_BACKENDS = [name for name in ("torch", "native") if backend_status("state_scan")[name] == "available"]


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Trained-like weights: every parameter and BN statistic perturbed (fusion kernels and alpha included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            scale = max(param.std().item() if param.numel() > 1 else 0.0, 0.05)
            param.add_(torch.randn(param.shape, generator=generator) * 0.5 * scale)
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.2, generator=generator)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5, generator=generator)
    return model


def _clamped_fusion(states: torch.Tensor, kernels, alpha) -> torch.Tensor:
    """Oracle of the state fusion: explicit sums over taps with edge-clamped indices (replicate padding)."""
    _, _, height, width = states.shape
    fused = torch.zeros_like(states)
    for weight, kernel, dilation in zip(alpha, kernels, (1, 3, 5)):
        for a in (-1, 0, 1):
            rows = (torch.arange(height) + a * dilation).clamp(0, height - 1)
            for b in (-1, 0, 1):
                cols = (torch.arange(width) + b * dilation).clamp(0, width - 1)
                tap = kernel[:, 0, a + 1, b + 1].view(1, -1, 1, 1)
                fused += weight * tap * states[:, :, rows][:, :, :, cols]
    return fused


def test_state_fusion_matches_the_clamped_index_oracle_in_both_forms():
    generator = torch.Generator().manual_seed(1)
    states = torch.randn(2, 6, 9, 13, generator=generator, dtype=torch.float64)
    kernels = [torch.randn(6, 1, 3, 3, generator=generator, dtype=torch.float64) for _ in range(3)]
    alpha = torch.randn(3, generator=generator, dtype=torch.float64)
    expected = _clamped_fusion(states, kernels, alpha)
    torch.testing.assert_close(fuse_states(states, kernels, alpha), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fuse_states_merged(states, kernels, alpha), expected, rtol=1e-12, atol=1e-12)


def test_three_conv_and_merged_kernel_fusion_agree_in_float32():
    # On the hidden states a (randomised) model produces: within 4e-6; on unit-scale random states (fused values up to
    # ~50) within a few float32 roundings of the output scale.
    model = _randomise(timm.create_model("test_spatialmamba"), seed=2).eval()
    states = []
    hooks = [module.register_forward_hook(lambda module, inputs, output: states.append((module, inputs[0])))
             for module in model.modules() if isinstance(module, StateFusion)]
    with torch.no_grad():
        model(torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(3)))
        for hook in hooks:
            hook.remove()
        for fusion, hidden in states:
            merged = StateFusion(fusion.dim, merged_kernel=True)
            merged.load_state_dict(fusion.state_dict())
            assert (fusion(hidden) - merged(hidden)).abs().max() <= 4e-6
        unit = torch.randn(2, fusion.dim, 56, 56, generator=torch.Generator().manual_seed(4))
        expected = fusion(unit)
        assert (merged(unit) - expected).abs().max() <= 4e-7 * expected.abs().max()


@pytest.mark.parametrize("merged", [False, True])
def test_eval_output_follows_a_weight_update_between_calls(merged):
    # The official eval path caches the merged kernel on first use; here every call uses the current weights.
    model = _randomise(timm.create_model("test_spatialmamba", merged_fusion=merged), seed=4).eval()
    mixer = model.layers[1].blocks[0].self_attention
    mixer_outputs = []
    hook = mixer.register_forward_hook(lambda module, inputs, output: mixer_outputs.append(output))
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(images)
        mixer.state_fusion.kernel_3_1.mul_(-2.0)
        mixer.state_fusion.alpha[2] += 0.5
        after = model(images)
        hook.remove()
        fresh = timm.create_model("test_spatialmamba", merged_fusion=merged).eval()
        fresh.load_state_dict(model.state_dict())
        expected = fresh(images)
    first, second = mixer_outputs
    assert (second - first).abs().max() > 1e-3 * first.abs().max()  # the mixer saw the new fusion weights
    assert (after - before).abs().max() > 1e-6
    torch.testing.assert_close(after, expected, rtol=0, atol=0)  # exactly what a fresh model with them gives


def _mixer_oracle(mixer: StructureAwareSSM, x: torch.Tensor) -> torch.Tensor:
    """Float64 oracle of the SSM mixer, written from its equations: per-token loops for the scan."""
    p = {name: t.double() for name, t in mixer.state_dict().items()}
    batch, height, width, _ = x.shape
    inner, rank = mixer.d_inner, mixer.dt_rank
    xz = x @ p["in_proj.weight"].t()
    xs, z = xz[..., :inner], xz[..., inner:]
    conv = F.conv2d(xs.permute(0, 3, 1, 2), p["conv2d.weight"], p["conv2d.bias"], padding=1, groups=inner)
    u = F.silu(conv).flatten(2)  # (B, D, L), raster order
    proj = torch.einsum("rd,bdl->brl", p["x_proj_weight"], u)
    dt, Bm, Cm = proj[:, :rank], proj[:, rank], proj[:, rank + 1]
    delta = F.softplus(torch.einsum("dr,brl->bdl", p["dt_projs_weight"], dt) + p["dt_projs_bias"][:, None])
    A = -torch.exp(p["A_logs"][:, 0])
    states = torch.zeros_like(u)
    h = torch.zeros(batch, inner, dtype=torch.float64)
    for t in range(height * width):
        h = torch.exp(delta[:, :, t] * A) * h + delta[:, :, t] * Bm[:, None, t] * u[:, :, t]
        states[:, :, t] = h
    kernels = [p[f"state_fusion.{name}"] for name in ("kernel_3", "kernel_3_1", "kernel_3_2")]
    fused = _clamped_fusion(states.view(batch, inner, height, width), kernels, p["state_fusion.alpha"]).flatten(2)
    y = (fused * Cm[:, None] + u * p["Ds"][:, None]).transpose(1, 2)
    y = F.layer_norm(y, (inner,), p["out_norm.weight"], p["out_norm.bias"], eps=1e-5)
    y = y.view(batch, height, width, inner) * F.silu(z)
    return y @ p["out_proj.weight"].t()


@pytest.mark.parametrize("backend", ["reference"] + SCAN_BACKENDS)
def test_mixer_matches_float64_oracle(backend):
    mixer = _randomise(StructureAwareSSM(24, scan_backend=backend), seed=5)
    x = torch.randn(2, 5, 7, 24, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    expected = _mixer_oracle(mixer, x)
    if backend == "native":  # a float32 kernel: compare the float32 module
        torch.testing.assert_close(mixer(x.float()).double(), expected, rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(mixer.double()(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name, total", [
    ("spatialmamba_t", 26_748_862), ("spatialmamba_s", 43_074_280), ("spatialmamba_b", 95_745_592),
])
def test_parameter_counts(name, total):
    model = timm.create_model(name, device="meta")
    assert sum(p.numel() for p in model.parameters()) == total
    head = model.head.weight.numel() + model.head.bias.numel()
    assert sum(p.numel() for p in timm.create_model(name, num_classes=0, device="meta").parameters()) == total - head


def _hand_macs(dims, depths, side: int = 224, merged: bool = False) -> int:
    """Conv + linear MACs plus 9·L·D per all-states scan, derived from the architecture (docs/spatialmamba.md)."""
    half, tokens = dims[0] // 2, (side // 4) ** 2
    stem = (side // 2) ** 2 * (half * 27 + 2 * half * half * 9) + tokens * 4 * dims[0] * half * 9
    stem += tokens * 4 * dims[0] * dims[0]
    total = stem
    for i, (dim, depth) in enumerate(zip(dims, depths)):
        tokens = (side // 4 // 2 ** i) ** 2
        inner, rank = 2 * dim, math.ceil(dim / 16)
        fusion = 121 if merged else 27
        projections = dim * 2 * inner + inner * (rank + 2) + rank * inner + inner * dim
        mixer = tokens * (projections + inner * 9 + inner * fusion)
        block = 2 * tokens * dim * 9 + mixer + 2 * tokens * dim * 4 * dim + 9 * tokens * inner
        total += depth * block
        if i < len(dims) - 1:
            hidden, out = 8 * dim, 2 * dim
            total += tokens * dim * hidden + tokens // 4 * hidden * 9 + tokens // 4 * hidden * out
    return total + dims[-1] * 1000


@pytest.mark.parametrize("name, dims, depths, spec_counted, published", [
    ("spatialmamba_t", (64, 128, 256, 512), (2, 4, 8, 4), 4.66, 4.5),
    ("spatialmamba_s", (64, 128, 256, 512), (2, 4, 21, 5), 7.41, 7.1),
    ("spatialmamba_b", (96, 192, 384, 768), (2, 4, 21, 5), 16.24, 15.8),
])
def test_flops_match_the_architecture(name, dims, depths, spec_counted, published):
    model = timm.create_model(name, device="meta")
    count = count_model_macs(model)
    assert count.total == _hand_macs(dims, depths)
    assert abs(count.gmacs - published) <= 0.02 * published  # the paper's fvcore figure (docs/spatialmamba.md)
    scans = [9 * (56 // 2 ** i) ** 2 * 2 * dim * depth for i, (dim, depth) in enumerate(zip(dims, depths))]
    assert count.scan == sum(scans)
    # The spec's independent count: merged 11×11 fusion kernel at full size, scan excluded.
    merged = count_model_macs(timm.create_model(name, merged_fusion=True, device="meta"))
    assert merged.total == _hand_macs(dims, depths, merged=True)
    assert round((merged.total - merged.scan) / 1e9, 2) == spec_counted


def _official_state_dict(seed: int = 0) -> dict:
    """Random tensors under the official Spatial-Mamba-T key list and shapes."""
    generator = torch.Generator().manual_seed(seed)
    shapes = read_key_shapes("keys_spatialmamba_t.txt")
    return {key: torch.randn(shape, generator=generator) if shape else torch.tensor(7) for key, shape in shapes.items()}


def test_official_key_list_loads_strictly():
    state_dict = _official_state_dict()
    model = timm.create_model("spatialmamba_t")
    model.load_state_dict(checkpoint_filter_fn({"model": state_dict}, model), strict=True)
    torch.testing.assert_close(model.layers[2].blocks[5].self_attention.state_fusion.kernel_3_2,
                               state_dict["layers.2.blocks.5.self_attention.state_fusion.kernel_3_2"])
    assert list(model.state_dict()) == list(state_dict)  # the official names, in the official order


class TrainingConfig(dict):
    """Stands for a yacs CfgNode: a class outside PyTorch's weights-only allow-list, pickled with the weights."""


class Payload:
    """An object whose unpickling would run a command (if anything ever resolved ``os.system``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_official_training_checkpoint_with_config_loads_through_timm(tmp_path):
    source = _randomise(timm.create_model("test_spatialmamba"), seed=7).eval()
    config = TrainingConfig(MODEL=TrainingConfig(NAME="tiny"))
    state_dict = dict(source.state_dict(), **{"layers.0.blocks.0.self_attention.state_fusion._merge_weight":
                                              torch.zeros(32, 1, 11, 11)})
    marker = tmp_path / "executed"
    path = tmp_path / "official.pth"
    torch.save({"model": state_dict, "config": config, "epoch": 299, "payload": Payload(marker)}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    with pytest.raises(CheckpointError, match=r"official\.pth' pickles objects .*Unsupported global.*add_safe_globals"):
        load_checkpoint_file(path)  # other families refuse such files, naming the remedy
    checkpoint = load_checkpoint_file(path, unknown_objects="placeholder")
    assert isinstance(checkpoint["config"], Placeholder) and isinstance(checkpoint["payload"], Placeholder)
    assert not marker.exists()
    model = timm.create_model("test_spatialmamba", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert not marker.exists()
    images = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(images), source(images), rtol=0, atol=0)


def test_ema_weights_and_safetensors_and_head_adaptation(tmp_path):
    source, ema = timm.create_model("test_spatialmamba"), _randomise(timm.create_model("test_spatialmamba"), seed=8)
    path = tmp_path / "train.pth"
    torch.save({"model": source.state_dict(), "model_ema": ema.state_dict()}, path)
    model = timm.create_model("test_spatialmamba", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              checkpoint_key="model_ema")
    torch.testing.assert_close(model.layers[3].blocks[0].self_attention.A_logs,
                               ema.layers[3].blocks[0].self_attention.A_logs)
    safetensors = tmp_path / "model.safetensors"
    save_file(ema.state_dict(), str(safetensors))
    adapted = timm.create_model("test_spatialmamba", pretrained=True, num_classes=7,
                                pretrained_cfg_overlay=dict(file=str(safetensors)))
    assert adapted.head.out_features == 7
    torch.testing.assert_close(adapted.patch_embed.conv1.conv.weight, ema.patch_embed.conv1.conv.weight)


def test_mismatched_checkpoint_names_the_file_and_the_keys(tmp_path):
    state_dict = timm.create_model("test_spatialmamba").state_dict()
    state_dict.pop("layers.1.blocks.0.self_attention.Ds")
    state_dict["layers.2.blocks.0.self_attention.A_logs"] = torch.zeros(64, 2)
    state_dict["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save({"model": state_dict}, path)
    with pytest.raises(ValueError) as error:
        timm.create_model("test_spatialmamba", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    message = str(error.value)
    assert str(path) in message
    for fragment in ("missing (1): layers.1.blocks.0.self_attention.Ds", "unexpected (1): extra.weight",
                     "layers.2.blocks.0.self_attention.A_logs: checkpoint (64, 2) vs model (128, 1)"):
        assert fragment in message
    with pytest.raises(ValueError, match="checkpoint_key 'model_ema' not in the checkpoint"):
        timm.create_model("test_spatialmamba", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          checkpoint_key="model_ema")


def test_pretrained_without_a_file_fails_loudly():
    with pytest.raises(ValueError, match="manual download.*pretrained_cfg_overlay=dict\\(file=path\\)"):
        timm.create_model("spatialmamba_t", pretrained=True)


def test_unreadable_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"checkpoint file '{path}' is corrupt"):
        load_checkpoint_file(path, unknown_objects="placeholder")


@pytest.mark.parametrize("name", ["test_spatialmamba", pytest.param("spatialmamba_t", marks=pytest.mark.slow)])
def test_forward_backward_reaches_every_parameter(name):
    model = timm.create_model(name, num_classes=5, drop_path_rate=0.1).train()
    out = model(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


@pytest.mark.parametrize("backend", SCAN_BACKENDS)
def test_scan_backends_agree_with_reference_values_and_gradients(backend):
    torch.manual_seed(9)
    model = _randomise(timm.create_model("test_spatialmamba", num_classes=4), seed=9)
    images = torch.randn(2, 3, 64, 64)
    results = []
    for name in ("reference", backend):
        for module in model.modules():
            if isinstance(module, StructureAwareSSM):
                module.scan_backend = name
        model.zero_grad()
        out = model(images)
        out.sum().backward()
        grads = [model.layers[0].blocks[0].self_attention.dt_projs_bias.grad.clone(),
                 model.layers[2].blocks[0].self_attention.state_fusion.alpha.grad.clone()]
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    for actual, expected in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-5)


def test_states_and_fusion_stay_float32_under_bfloat16_autocast():
    model = _randomise(timm.create_model("test_spatialmamba"), seed=10).eval()
    seen = []
    fusion = model.layers[0].blocks[0].self_attention.state_fusion
    fusion.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0].dtype, output.dtype)))
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    assert seen == [(torch.float32, torch.float32)]
    with torch.no_grad():
        assert (out.float() - model(images)).abs().max() < 0.1 * model(images).abs().max()


def test_timm_contract():
    model = timm.create_model("test_spatialmamba", num_classes=6).eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = model.forward_features(images)
        assert features.shape == (2, 2, 3, 128) and model.output_fmt == "NHWC"
        assert model.forward_head(features, pre_logits=True).shape == (2, 128)
        torch.testing.assert_close(model.forward_head(features), model(images))
        final, maps = model.forward_intermediates(images)
        torch.testing.assert_close(final, features)
        assert [m.shape for m in maps] == [(2, 16, 16, 24), (2, 32, 8, 12), (2, 64, 4, 6), (2, 128, 2, 3)]
        nhwc = model.forward_intermediates(images, indices=[1], output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(nhwc[0], maps[1].permute(0, 2, 3, 1))
        normed = model.forward_intermediates(images, indices=1, norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], features.permute(0, 3, 1, 2))
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(images), model.forward_head(features))
    assert model.get_classifier().out_features == 6
    model.reset_classifier(0)
    assert model(images).shape == (2, 128)
    model.reset_classifier(0, "")
    assert model(images).shape == (2, 2, 3, 128)
    assert model.no_weight_decay() == set()
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert "patch_embed.conv1.conv.weight" in groups[0] and "norm.weight" in groups[max(groups)]
    assert "layers.1.downsample.conv.2.norm.bias" in groups[4]  # after stage 1's block, before stage 2's
    assert len(timm.models.group_parameters(model, model.group_matcher(coarse=True))) == 6  # stem, stages, norm+head
    for bad in (dict(indices=[4]), dict(indices=0), dict(output_fmt="NLC")):
        with pytest.raises(ValueError):
            model.forward_intermediates(images, **bad)
    with pytest.raises(ValueError, match="global_pool"):
        timm.create_model("test_spatialmamba", global_pool="max")


def test_features_only_gives_the_pre_downsample_stage_maps():
    model = timm.create_model("spatialmamba_t", features_only=True, device="meta")
    assert model.feature_info.channels() == [64, 128, 256, 512]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    full = _randomise(timm.create_model("test_spatialmamba"), seed=11).eval()
    features = timm.create_model("test_spatialmamba", features_only=True, out_indices=(1, 2)).eval()
    features.model.load_state_dict(full.state_dict(), strict=False)
    assert features.model.layers[-1].downsample is None and len(features.model.layers) == 3
    images = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        maps = features(images)
        expected = full.forward_intermediates(images, indices=(1, 2), intermediates_only=True)
    assert [m.shape for m in maps] == [(1, 32, 12, 8), (1, 64, 6, 4)]
    for actual, wanted in zip(maps, expected):
        torch.testing.assert_close(actual, wanted)


def test_fx_feature_extraction_matches_eager():
    from timm.models import create_feature_extractor  # timm's FX tracer, with the registered leaves

    model = _randomise(timm.create_model("test_spatialmamba"), seed=12).eval()
    extractor = create_feature_extractor(model, return_nodes={"layers.2.blocks.0": "stage2", "head": "logits"})
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        traced = extractor(images)
        torch.testing.assert_close(traced["logits"], model(images))
        stage2 = model.forward_intermediates(images, indices=[2], intermediates_only=True)[0]
    torch.testing.assert_close(traced["stage2"].permute(0, 3, 1, 2), stage2)


def test_torch_export_matches_eager_and_keeps_one_scan_op_per_block():
    model = _randomise(timm.create_model("test_spatialmamba"), seed=13).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        exported = torch.export.export(model, (images,))
        targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
        assert sum("state_scan" in target for target in targets) == 4  # one per block, no graph break
        torch.testing.assert_close(exported.module()(images), model(images))


@pytest.mark.slow
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(compile_backend):
    torch._dynamo.reset()
    model = _randomise(timm.create_model("test_spatialmamba"), seed=14).train()
    for module in model.modules():  # deterministic training-mode forward: BN batch statistics, no stochastic depth
        if isinstance(module, torch.nn.BatchNorm2d):
            module.track_running_stats = False
    images = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    eager_out = model(images)
    eager_grad = torch.autograd.grad(eager_out.square().sum(), model.layers[1].blocks[0].self_attention.A_logs)[0]
    compiled_out = compiled(images)
    compiled_grad = torch.autograd.grad(compiled_out.square().sum(),
                                        model.layers[1].blocks[0].self_attention.A_logs)[0]
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-3, atol=1e-6)
