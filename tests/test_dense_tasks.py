"""Task pieces for the training engine (loss from a batch, evaluation, parameter groups), the recipes, and the
``mambazoo predict`` command."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from mambazoo import cli
from mambazoo.dense import RECIPES, build_task, get_recipe
from mambazoo.dense.optim import param_groups
from mambazoo.dense.recipes import TASKS
from mambazoo.dense.synthetic import write_composite

TINY = dict(
    detection=dict(min_size=64, max_size=96, fpn_channels=16, box_representation=32, mask_head_channels=8),
    segmentation=dict(crop_size=64, channels=16, aux_channels=8),
)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def composite(tmp_path_factory) -> Path:
    return write_composite(tmp_path_factory.mktemp("composite"), dict(train=4, val=2), image_size=(64, 80), seed=1)


def _loss_curve(task, model, batch, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW(task.param_groups(model, lr=1e-3, weight_decay=0.05))
    model.train()
    losses = []
    for _ in range(steps):
        loss, logs = task.loss(model, batch, CPU)
        assert abs(sum(v for k, v in logs.items() if k != "loss") - loss.item()) < 1e-4
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# Seeded CPU curves (identical with 1 and 2 threads) end at these fractions of the first loss after 6 steps:
# detection 0.44 (MambaOut, 4.04 -> 1.77) and 0.74 (Vim, 3.74 -> 2.78), segmentation 0.90 (MambaOut, 3.46 -> 3.10)
# and 0.88 (PlainMamba, 3.63 -> 3.21); the thresholds leave 0.05-0.26 of margin for numeric drift.
@pytest.mark.parametrize("task_name, name, ratio", [
    ("detection", "test_mambaout", 0.7),
    ("detection", "test_vim", 0.85),
    ("segmentation", "test_mambaout", 0.95),
    ("segmentation", "test_plainmamba", 0.95),
])
def test_a_few_optimizer_steps_on_one_batch_lower_the_loss(composite: Path, task_name: str, name: str,
                                                          ratio: float) -> None:
    torch.manual_seed(0)
    task = build_task(task_name, **TINY[task_name])
    train, val = task.build_datasets(composite)
    model = task.build_model(name, len(task.class_names(train)))
    losses = _loss_curve(task, model, task.collate([train[i] for i in range(2)]), steps=6)
    assert losses[-1] < ratio * losses[0], losses
    metrics = task.evaluate(model, DataLoader(val, batch_size=2, collate_fn=task.collate), CPU)
    assert task.primary_metric in metrics and not model.training
    if task_name == "detection":
        assert {f"{t}_{s}" for t in ("bbox", "segm") for s in ("AP", "AP50", "APm")} <= set(metrics)
    else:
        assert len([key for key in metrics if key.startswith("IoU.")]) == 11 and "IoU.background" in metrics
    assert all(np.isnan(v) or 0.0 <= v <= 1.0 for v in metrics.values())


def test_segmentation_task_slide_mode_matches_whole_when_crops_cover_the_images(composite: Path) -> None:
    torch.manual_seed(0)
    whole = build_task("segmentation", **TINY["segmentation"])
    slide = build_task("segmentation", test_mode="slide", test_stride=32, **dict(TINY["segmentation"], crop_size=96))
    train, val = whole.build_datasets(composite)
    model = whole.build_model("test_mambaout", 11)
    loader = DataLoader(val, batch_size=1, collate_fn=whole.collate)
    np.testing.assert_equal(whole.evaluate(model, loader, CPU), slide.evaluate(model, loader, CPU))  # NaN == NaN
    with pytest.raises(ValueError, match="test_mode"):
        build_task("segmentation", test_mode="slide")
    with pytest.raises(ValueError, match="task must be one of"):
        build_task("keypoints")


def test_layer_decay_groups_follow_the_backbone_depth() -> None:
    torch.manual_seed(0)
    task = build_task("segmentation", **TINY["segmentation"])
    model = task.build_model("test_vim", 3)  # 4 blocks: groups stem (0), blocks 1..4; heads on top
    groups = param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale_of = {name: group["lr_scale"] for group in groups for name in group["param_names"]}
    decay_of = {name: group["weight_decay"] for group in groups for name in group["param_names"]}
    assert scale_of["backbone.model.pos_embed"] == scale_of["backbone.model.patch_embed.proj.weight"] == 0.5 ** 5
    assert scale_of["backbone.model.layers.0.mixer.in_proj.weight"] == 0.5 ** 4
    assert scale_of["backbone.model.layers.3.mixer.in_proj.weight"] == 0.5
    assert scale_of["decode_head.conv_seg.weight"] == scale_of["backbone.pyramid.fpn1.0.weight"] == 1.0
    assert decay_of["backbone.model.pos_embed"] == decay_of["decode_head.conv_seg.bias"] == 0.0
    assert decay_of["backbone.model.layers.0.mixer.in_proj.weight"] == 0.05
    assert all(group["lr"] == pytest.approx(1e-3 * group["lr_scale"]) for group in groups)
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])
    flat = param_groups(model, lr=1e-3, weight_decay=0.05)
    assert {group["lr_scale"] for group in flat} == {1.0} and len(flat) == 2


def test_recipes_cover_every_family_and_carry_the_papers_values() -> None:
    families = {"vim", "plainmamba", "mambaout", "mambavision", "spatialmamba"}
    assert {(family, task) for family in families for task in TASKS} <= set(RECIPES)
    vim_seg = get_recipe("vim_tiny_patch16_224", "segmentation")
    assert (vim_seg.lr, vim_seg.weight_decay, vim_seg.layer_decay, vim_seg.iterations) == (2e-4, 0.1, 0.92, 60_000)
    assert (vim_seg.test_mode, vim_seg.test_stride, vim_seg.head_channels) == ("slide", (341, 341), None)
    assert get_recipe("vim_small_patch16_224", "detection").layer_decay == 0.837
    assert get_recipe("vim_small_patch16_224", "segmentation").layer_decay == 0.95
    assert (vim_seg.batch_size, vim_seg.drop_path_rate) == (32, 0.1)
    mv_seg = get_recipe("mambavision_s", "segmentation")
    assert (mv_seg.lr, mv_seg.model_kwargs) == (6e-5, dict(window_size=(8, 8, 160, 56)))
    assert get_recipe("mambavision_t", "detection").model_kwargs == dict(window_size=(8, 8, 112, 56))
    assert get_recipe("mambavision_t", "segmentation").model_kwargs == dict(window_size=(8, 8, 64, 32))
    assert get_recipe("plainmamba_l3", "segmentation").drop_path_rate == 0.3
    assert get_recipe("plainmamba_l1", "segmentation").aux_index == 3
    assert get_recipe("mambaout_base", "detection").drop_path_rate == 0.6
    assert get_recipe("mambaout_femto", "detection").layer_decay is None
    assert get_recipe("spatialmamba_b", "detection").drop_path_rate == 0.5
    assert get_recipe("spatialmamba_t", "segmentation").lr == 6e-5
    with pytest.raises(ValueError, match="task must be one of"):
        get_recipe("test_vim", "depth")
    with pytest.raises(ValueError, match="no segmentation recipe for family 'vit'"):
        get_recipe("deit_tiny_patch16_224", "segmentation")


def test_recipe_applies_drop_path_and_head_width_when_building() -> None:
    task = build_task("segmentation")
    recipe = get_recipe("test_vim", "segmentation")  # Vim: UperNet as wide as the embedding, aux on level 2
    model = task.build_model("test_vim", 4, recipe=recipe, drop_path_rate=0.1)
    assert model.decode_head.conv_seg.in_channels == 32 and model.aux_index == 2
    assert model.backbone.model.layers[2].drop_path.drop_prob > 0
    from_recipe = type(task).from_recipe(recipe)
    assert (from_recipe.crop_size, from_recipe.scale) == ((512, 512), (2048, 512))
    assert (from_recipe.test_mode, from_recipe.test_stride) == ("slide", (341, 341))
    detection = build_task("detection").from_recipe(get_recipe("mambavision_t", "detection"), flip_prob=0.0)
    assert (detection.min_size, detection.max_size, detection.flip_prob) == (800, 1333, 0.0)


def _predict(tmp_path: Path, composite: Path, task: str, *extra: str) -> int:
    image = composite / "val" / "images" / "000001.png"
    head = ["--head", "fpn_channels=16", "--head", "box_representation=32", "--head", "mask_head_channels=8"] \
        if task == "detection" else ["--head", "channels=16", "--head", "aux_channels=8"]
    return cli.main(["predict", "--model", "test_mambaout", "--task", task, "--image", str(image),
                     "--classes", str(composite / "classes.json"), "--output", str(tmp_path / f"{task}.png"),
                     "--min-size", "64", "--max-size", "96", "--score-threshold", "0", *head, *extra])


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_predict_draws_a_png_from_random_weights_or_a_checkpoint(tmp_path: Path, composite: Path, task: str,
                                                                capsys) -> None:
    assert _predict(tmp_path, composite, task) == 0
    assert "wrote" in capsys.readouterr().out
    drawn = np.array(Image.open(tmp_path / f"{task}.png"))
    original = np.array(Image.open(composite / "val" / "images" / "000001.png"))
    assert drawn.shape == original.shape and not np.array_equal(drawn, original)
    built = build_task(task, **TINY[task]).build_model("test_mambaout", 10 if task == "detection" else 11)
    save_file({k: v.contiguous() for k, v in built.state_dict().items()}, str(tmp_path / "model.safetensors"))
    assert _predict(tmp_path, composite, task, "--checkpoint", str(tmp_path / "model.safetensors")) == 0
    wrong = {k: v.contiguous() for k, v in built.state_dict().items() if "outnorm3" not in k}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    assert _predict(tmp_path, composite, task, "--checkpoint", str(tmp_path / "wrong.safetensors")) == 2
    assert "wrong.safetensors does not match" in capsys.readouterr().err


def test_predict_rejects_bad_arguments(tmp_path: Path, composite: Path, capsys) -> None:
    image = str(composite / "val" / "images" / "000001.png")
    base = ["predict", "--model", "test_mambaout", "--task", "segmentation", "--image", image]
    assert cli.main(base + ["--output", str(tmp_path / "a.jpg"), "--num-classes", "3"]) == 2
    assert "--output must be a .png" in capsys.readouterr().err
    assert cli.main(base + ["--output", str(tmp_path / "a.png")]) == 2
    assert "--num-classes" in capsys.readouterr().err
    missing = ["--checkpoint", str(tmp_path / "none.pth"), "--num-classes", "3"]
    assert cli.main(base + ["--output", str(tmp_path / "a.png"), *missing]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
