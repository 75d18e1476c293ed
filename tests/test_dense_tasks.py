"""The dense tasks' pieces outside a run: flags and recipes, model building for every family, weights for
fine-tuning, parameter groups, evaluation modes, schedules, bad input, and the ``mambazoo predict`` command."""
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.models import is_model
from torch.utils.data import DataLoader

import mambazoo
from mambazoo import cli
from mambazoo.dense import RECIPES, TAP_SPECS, get_recipe
from mambazoo.dense.optim import param_groups
from mambazoo.dense.recipes import TASKS
from mambazoo.dense.synthetic import write_composite
from mambazoo.training.config import parse_train_args
from mambazoo.training.distributed import Distributed, find_blocks
from mambazoo.training.engine import create_schedule
from mambazoo.training.tasks import TaskContext, get_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(
    detection=["--min-size", "64", "--max-size", "96", "--head", "fpn_channels=16", "box_representation=32",
               "mask_head_channels=8"],
    segmentation=["--crop-size", "64", "--head", "channels=16", "aux_channels=8"],
)
FAMILIES = ("vim", "plainmamba", "mambaout", "mambavision", "spatialmamba")


@pytest.fixture(scope="module")
def composite(tmp_path_factory) -> Path:
    return write_composite(tmp_path_factory.mktemp("composite"), dict(train=4, val=2), image_size=(64, 80), seed=1)


def make_task(*argv: str):
    """A task as the engine creates it (one process), with its resolved flags."""
    args, _ = parse_train_args(list(argv))
    return get_task(args.task)(args, TaskContext(Distributed(), nullcontext))


def _skip_unregistered(name: str) -> None:
    mambazoo.list_models()
    if not is_model(name):
        pytest.skip(f"{name} not registered (family not landed)")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_builds_for_both_tasks_with_fsdp_units_inside_the_adapter(composite: Path, family: str) -> None:
    name = TAP_SPECS[family].test_model
    _skip_unregistered(name)
    for task_name in TASKS:
        task = make_task("--task", task_name, "--model", name, "--data-dir", str(composite), *TINY[task_name])
        model = task.build_model(task.build_datasets())
        inner = dict(model.named_modules())
        blocks = find_blocks(model)  # the engine's FSDP2 units: the backbone's blocks, found under the wrappers
        prefix = "backbone.body.model." if task_name == "detection" else "backbone.model."
        assert blocks and all(block_name.startswith(prefix) for block_name, _ in blocks)
        assert len(blocks) == len(find_blocks(inner[prefix[:-1]])), task_name
        expected = 10 if task_name == "detection" else 11  # digits + background for segmentation
        assert task.args.num_classes == expected


def test_dense_recipes_become_engine_flags() -> None:
    args, _ = parse_train_args(["--task", "segmentation", "--model", "mambavision_s", "--recipe", "mambavision"])
    assert (args.opt, args.sched, args.decay_rate, args.iterations, args.warmup_steps) == ("adamw", "poly", 1.0,
                                                                                            160_000, 1500)
    assert (args.lr, args.batch_size, args.weight_decay, args.drop_path) == (6e-5, 16, 0.01, 0.2)
    assert args.model_kwargs == dict(window_size=(8, 8, 160, 56)) and args.warmup_lr == pytest.approx(6e-5 * 1e-6)
    assert (args.crop_size, args.img_scale, args.sync_bn, args.sched_on_updates) == ([512, 512], [2048, 512], True,
                                                                                     True)
    args, _ = parse_train_args(["--task", "segmentation", "--model", "vim_tiny_patch16_224", "--recipe", "vim", "-b",
                                "8", "--epochs", "3"])  # learning rate scaled to the batch; --epochs replaces 60k
    assert args.lr == pytest.approx(2e-4 * 8 / 32) and (args.layer_decay, args.iterations, args.epochs) == (0.92,
                                                                                                          None, 3)
    assert args.head == dict(channels=None, aux_index=2, aux_weight=0.4)
    assert (args.test_mode, args.test_stride) == ("slide", [341, 341])
    args, _ = parse_train_args(["--task", "detection", "--model", "vim_small_patch16_224.in1k", "--recipe", "vim"])
    assert (args.sched, args.epochs, args.decay_milestones, args.layer_decay, args.amp) == ("multistep", 12, [8, 11],
                                                                                         0.837, True)
    assert (args.min_size, args.max_size, args.warmup_lr) == ([800], 1333, pytest.approx(1e-4 * 1e-3))
    args, _ = parse_train_args(["--task", "detection", "--model", "mambavision_t", "--recipe", "mambavision",
                                "--no-amp"])
    assert (args.epochs, args.decay_milestones, args.amp) == (36, [27, 33], False)
    args, _ = parse_train_args(["--task", "detection", "--model", "test_vim"])  # no recipe: Mask R-CNN 1x
    assert (args.lr, args.batch_size, args.weight_decay, args.layer_decay) == (1e-4, 16, 0.05, None)
    with pytest.raises(ValueError, match="--recipe vim is made for models matching vim_\\* test_vim, not "
                                         "'plainmamba_l1'"):
        parse_train_args(["--task", "detection", "--model", "plainmamba_l1", "--recipe", "vim"])


@pytest.mark.parametrize("task", TASKS)
def test_every_dense_recipe_names_real_flags(task: str) -> None:
    for family, recipe in get_task(task).recipes.items():
        parse_train_args(["--task", task, "--model", TAP_SPECS[family].test_model, "--recipe", family])
        assert recipe.source.endswith("(docs/dense.md, Recipes)")


def test_schedules_warm_up_per_update_then_poly_or_step() -> None:
    """The lr after each number of updates, against the formulas: linear warm-up from warmup_lr (an explicit value,
    or 0.001 × lr for detection), then poly (power 1) to 0 over the iterations, or ×0.1 at the epoch milestones; a
    layer-decayed group follows at its scale."""
    layers = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD([dict(params=[layers.weight], lr_scale=1.0), dict(params=[layers.bias], lr_scale=0.5)],
                                lr=0.1)
    args, _ = parse_train_args(["--task", "segmentation", "--model", "test_vim", "--lr", "0.1", "--iterations", "25",
                                "--warmup-steps", "5", "--warmup-lr", "0.01"])
    scheduler, epochs, stop = create_schedule(optimizer, args, updates_per_epoch=10)
    assert (epochs, stop) == (3, 25)  # the third epoch stops after 5 updates
    for step in range(25):
        scheduler.step_update(step)
        expected = 0.01 + 0.09 * step / 5 if step < 5 else 0.1 * (1 - step / 25)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)
        assert optimizer.param_groups[1]["lr"] == pytest.approx(0.5 * expected)
    args, _ = parse_train_args(["--task", "detection", "--model", "test_vim", "--lr", "0.1", "--epochs", "4",
                                "--decay-milestones", "2", "3", "--warmup-steps", "3"])
    scheduler, epochs, stop = create_schedule(optimizer, args, updates_per_epoch=10)
    assert (epochs, stop) == (4, 40)
    # timm's multistep convention: the value after `step` updates is decayed from step + 1 = milestone on
    for step, expected in ((0, 1e-4), (1, 1e-4 + (0.1 - 1e-4) / 3), (3, 0.1), (18, 0.1), (19, 0.01), (28, 0.01),
                           (29, 0.001), (39, 0.001)):
        scheduler.step_update(step)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected), step


def test_layer_decay_groups_follow_the_backbone_depth(composite: Path) -> None:
    task = make_task("--task", "segmentation", "--model", "test_vim", "--data-dir", str(composite),
                     "--layer-decay", "0.5", "--weight-decay", "0.05", *TINY["segmentation"])
    model = task.build_model(task.build_datasets())  # test_vim: 4 blocks, groups stem (0), blocks 1..4; heads on top
    groups = task.optimizer_params(model)
    scale_of = {name: group["lr_scale"] for group in groups for name in group["param_names"]}
    decay_of = {name: group["weight_decay"] for group in groups for name in group["param_names"]}
    assert scale_of["backbone.model.pos_embed"] == scale_of["backbone.model.patch_embed.proj.weight"] == 0.5 ** 5
    assert scale_of["backbone.model.layers.0.mixer.in_proj.weight"] == 0.5 ** 4
    assert scale_of["backbone.model.layers.3.mixer.in_proj.weight"] == 0.5
    assert scale_of["decode_head.conv_seg.weight"] == scale_of["backbone.pyramid.fpn1.0.weight"] == 1.0
    assert decay_of["backbone.model.pos_embed"] == decay_of["decode_head.conv_seg.bias"] == 0.0
    assert decay_of["backbone.model.layers.0.mixer.in_proj.weight"] == 0.05
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])
    flat = param_groups(model, weight_decay=0.05)
    assert {group["lr_scale"] for group in flat} == {1.0} and len(flat) == 2


def test_recipe_drop_path_and_head_width_reach_the_model(composite: Path) -> None:
    task = make_task("--task", "segmentation", "--model", "test_vim", "--recipe", "vim", "--data-dir", str(composite))
    model = task.build_model(task.build_datasets())  # Vim: UperNet as wide as the embedding, aux on level 2
    assert model.decode_head.conv_seg.in_channels == 32 and model.aux_index == 2
    assert model.backbone.model.layers[2].drop_path.drop_prob > 0
    assert isinstance(model.decode_head.bottleneck[1], torch.nn.BatchNorm2d)  # SyncBN only under DDP on GPUs


def test_recipe_window_override_reaches_mambavision_and_explicit_model_kwargs_win(composite: Path) -> None:
    common = ["--task", "segmentation", "--model", "test_mambavision", "--recipe", "mambavision", "--data-dir",
              str(composite), *TINY["segmentation"]]
    task = make_task(*common)
    model = task.build_model(task.build_datasets())  # the recipe's dense windows: levels 2 and 3 use them
    assert model.backbone.model.window_size == (8, 8, 64, 32)
    assert [level.window_size for level in model.backbone.model.levels][2:] == [64, 32]
    task = make_task(*common, "--model-kwargs", "window_size=(8,8,16,8)")
    assert task.build_model(task.build_datasets()).backbone.model.window_size == (8, 8, 16, 8)


def test_segmentation_slide_evaluation_matches_whole_when_windows_cover_the_images(composite: Path) -> None:
    whole = make_task("--task", "segmentation", "--model", "test_mambaout", "--data-dir", str(composite),
                      *TINY["segmentation"])
    datasets = whole.build_datasets()
    torch.manual_seed(0)
    model = whole.build_model(datasets).eval()
    whole.attach_transforms(model, datasets)
    slide = make_task("--task", "segmentation", "--model", "test_mambaout", "--data-dir", str(composite),
                      "--test-mode", "slide", "--test-crop", "96", "--test-stride", "32", *TINY["segmentation"])
    slide.attach_transforms(model, slide.build_datasets())
    loader = DataLoader(datasets.val, batch_size=1, collate_fn=whole.collate_fn(False))
    with torch.inference_mode():
        metrics = whole.evaluate(model, loader)
        np.testing.assert_equal(metrics, slide.evaluate(model, loader))  # NaN == NaN
    assert len([key for key in metrics if key.startswith("IoU.")]) == 11 and "IoU.background" in metrics
    assert metrics["loss"] > 0 and all(np.isnan(v) or 0 <= v <= 1 for k, v in metrics.items() if k != "loss")


def _official_vim_file(path: Path) -> dict[str, torch.Tensor]:
    """test_vim's weights in hustvl/Vim's training-file layout (``{"model": ..., "epoch": ...}``)."""
    torch.manual_seed(1)
    state = {k: torch.randn_like(v) for k, v in mambazoo.create_model("test_vim").state_dict().items()}
    torch.save({"model": state, "epoch": 299}, path)
    return state


def test_fine_tuning_starts_from_classification_or_downstream_backbone_weights(composite: Path,
                                                                              tmp_path: Path) -> None:
    official = _official_vim_file(tmp_path / "vim_t.pth")
    common = ["--task", "detection", "--model", "test_vim", "--data-dir", str(composite), *TINY["detection"]]
    task = make_task(*common, "--pretrained-path", str(tmp_path / "vim_t.pth"))
    model = task.build_model(task.build_datasets())
    loaded = model.backbone.body.model.state_dict()
    assert loaded and all(torch.equal(value, official[key]) for key, value in loaded.items())  # head, norm pruned

    # an mmseg checkpoint: backbone.<model keys> and Vim's neck fpn1-fpn4 (+ head entries), wrapped in "state_dict"
    pyramid = model.backbone.body.pyramid.state_dict()
    mmseg = {f"backbone.{key}": value + 1 for key, value in official.items() if key in loaded}
    mmseg.update({f"backbone.{key}": value + 2 for key, value in pyramid.items()})
    mmseg.update({"decode_head.conv_seg.bias": torch.zeros(3), "auxiliary_head.conv_seg.bias": torch.zeros(3)})
    torch.save({"state_dict": mmseg, "meta": {"iter": 160000}}, tmp_path / "upernet.pth")
    task = make_task(*common, "--backbone-checkpoint", str(tmp_path / "upernet.pth"))
    backbone = task.build_model(task.build_datasets()).backbone.body
    assert all(torch.equal(value, official[key] + 1) for key, value in backbone.model.state_dict().items())
    assert all(torch.equal(value, pyramid[key] + 2) for key, value in backbone.pyramid.state_dict().items())
    del mmseg["backbone.layers.3.mixer.D"]
    torch.save({"state_dict": mmseg}, tmp_path / "broken.pth")
    task = make_task(*common, "--backbone-checkpoint", str(tmp_path / "broken.pth"))
    with pytest.raises(ValueError, match=r"broken.pth does not match .*\n  missing \(1\): layers.3.mixer.D"):
        task.build_model(task.build_datasets())


@pytest.mark.parametrize("extra, error, message", [
    (["--dataset", "coco"], FileNotFoundError, "image folder not found: .*train2017"),
    (["--dataset", "digits"], ValueError, "--dataset must be one of folder, coco"),
    (["--pretrained-path", "a.pth", "--backbone-checkpoint", "b.pth"], ValueError, "give only one of"),
    (["--backbone-checkpoint", "missing.pth"], FileNotFoundError, "--backbone-checkpoint missing.pth does not exist"),
    (["--num-classes", "3"], ValueError, "--num-classes 3 is smaller than the 10 classes"),
    (["--min-size", "128", "--max-size", "96"], ValueError, "at most --max-size 96"),
    (["--model", "resnet18"], ValueError, "no dense tap description for model 'resnet18'"),
])
def test_bad_detection_input_fails_before_any_model_is_built(composite: Path, extra, error, message) -> None:
    task = make_task("--task", "detection", "--model", "test_vim", "--data-dir", str(composite), *extra)
    with pytest.raises(error, match=message):
        task.build_datasets()


def test_bad_segmentation_input_is_named(composite: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--test-mode slide needs --test-stride"):
        make_task("--task", "segmentation", "--model", "test_vim", "--data-dir", str(composite), "--test-mode",
                  "slide").build_datasets()
    with pytest.raises(FileNotFoundError, match="classes.json not found"):
        make_task("--task", "segmentation", "--model", "test_vim", "--data-dir", str(tmp_path)).build_datasets()
    with pytest.raises(ValueError, match="--task segmentation reads --data-dir"):
        make_task("--task", "segmentation", "--model", "test_vim").build_datasets()
    with pytest.raises(ValueError, match="--head and --model-kwargs"):
        task = make_task("--task", "segmentation", "--model", "test_vim", "--data-dir", str(composite), "--head",
                         "width=3")
        task.build_model(task.build_datasets())


def test_ade20k_layout_ignores_label_zero(tmp_path: Path) -> None:
    for split in ("training", "validation"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / split / "a.jpg")
        Image.fromarray(np.array([[0, 1, 150, 255]] * 4, np.uint8)).save(tmp_path / "annotations" / split / "a.png")
    task = make_task("--task", "segmentation", "--model", "test_vim", "--data-dir", str(tmp_path), "--dataset",
                     "ade20k")
    datasets = task.build_datasets()
    assert len(datasets.classes) == task.args.num_classes == 150
    assert datasets.val[0][1][0].tolist() == [255, 0, 149, 255]


def _predict(tmp_path: Path, composite: Path, task: str, *extra: str) -> int:
    image = composite / "val" / "images" / "000001.png"
    head = ["--head", "fpn_channels=16", "--head", "box_representation=32", "--head", "mask_head_channels=8"] \
        if task == "detection" else ["--head", "channels=16", "--head", "aux_channels=8"]
    return cli.main(["predict", "--model", "test_mambaout", "--task", task, "--image", str(image),
                     "--classes", str(composite / "classes.json"), "--output", str(tmp_path / f"{task}.png"),
                     "--min-size", "64", "--max-size", "96", "--score-threshold", "0", *head, *extra])


@pytest.mark.parametrize("task", TASKS)
def test_predict_draws_a_png_from_random_weights_or_a_checkpoint(tmp_path: Path, composite: Path, task: str,
                                                                capsys) -> None:
    assert _predict(tmp_path, composite, task) == 0
    assert "wrote" in capsys.readouterr().out
    drawn = np.array(Image.open(tmp_path / f"{task}.png"))
    original = np.array(Image.open(composite / "val" / "images" / "000001.png"))
    assert drawn.shape == original.shape and not np.array_equal(drawn, original)
    built = make_task("--task", task, "--model", "test_mambaout", *TINY[task], "--num-classes",
                      "10" if task == "detection" else "11").create_model()
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
    assert cli.main(["predict", "--image", image, "--output", str(tmp_path / "a.png"), "--num-classes", "3"]) == 2
    assert "give --model and --task, or a training run folder" in capsys.readouterr().err


def test_recipes_cover_every_family_and_carry_the_papers_values() -> None:
    assert {(family, task) for family in FAMILIES for task in TASKS} <= set(RECIPES)
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
