"""Published ImageNet-1k training recipes of the families, as flag presets (``--recipe FAMILY``).

Values come from the official training scripts and configs (sources in each recipe's ``source``; summarised in
``docs/training.md``). A recipe replaces the flag defaults; flags given explicitly still win. Learning rates are
given as ``lr_base`` at ``lr_base_size`` and scaled linearly to the effective global batch
(``--batch-size × --grad-accum-steps``) unless ``--lr`` is given, as timm's ``train.py`` does.
"""
import fnmatch
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RECIPES", "Recipe"]

_IMAGENET_AUG = dict(mixup=0.8, cutmix=1.0, smoothing=0.1, aa="rand-m9-mstd0.5-inc1", reprob=0.25)


@dataclass(frozen=True)
class Recipe:
    """A family's training recipe.

    Attributes:
        family: The ``--recipe`` value.
        source: Where the values come from.
        settings: Flag values (argparse destinations) for every variant.
        variants: ``(model-name pattern, settings)`` pairs applied on top for matching models, in order.
        lr_ratios: Flags set relative to the resolved learning rate (e.g. ``min_lr`` = 0.01 × lr), unless explicit.
        notes: Parts of the recipe this engine does not reproduce, or assumptions.
        models: Model-name patterns the recipe is made for (empty: any model).
    """

    family: str
    source: str
    settings: dict[str, Any]
    variants: tuple[tuple[str, dict[str, Any]], ...] = ()
    lr_ratios: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    models: tuple[str, ...] = ()

    def check_model(self, model: str) -> None:
        """Raise a ValueError unless the recipe is made for ``model`` (tags such as ``.in1k`` ignored)."""
        base = model.split(".")[0]
        if self.models and not any(fnmatch.fnmatchcase(base, pattern) for pattern in self.models):
            raise ValueError(f"--recipe {self.family} is made for models matching {' '.join(self.models)}, "
                             f"not {model!r}")

    def resolve(self, model: str) -> dict[str, Any]:
        """The flag values for ``model`` (family settings, then the matching variant settings)."""
        values = dict(self.settings)
        for pattern, overrides in self.variants:
            if fnmatch.fnmatchcase(model, pattern):
                values.update(overrides)
        return values


RECIPES: dict[str, Recipe] = {recipe.family: recipe for recipe in (
    Recipe(
        "vim",
        "hustvl/Vim vim/main.py defaults (DeiT) and vim/scripts/pt-vim-{t,s}.sh: 8 GPUs x 128",
        dict(opt="adamw", lr_base=5e-4, lr_base_size=512, lr_base_scale="linear", batch_size=1024, epochs=300,
             cooldown_epochs=0, sched="cosine", warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, weight_decay=0.05,
             color_jitter=0.3, train_interpolation="bicubic", aug_repeats=3, model_ema=True,
             model_ema_decay=0.99996, amp=False, drop_path=0.1, **_IMAGENET_AUG),
        variants=(("vim_tiny*", dict(weight_decay=0.1, drop_path=0.0)),
                  ("vim_small*", dict(weight_decay=0.05, drop_path=0.05))),
        notes=("The stride-8 (+) models are fine-tuned from the stride-16 ones: 30 epochs, lr 1e-5, wd 1e-8, "
               "drop path 0 (pass these flags with --pretrained-path).",),
    ),
    Recipe(
        "plainmamba",
        "ChenhongyiYang/PlainMamba ImageNet configs (mmcls): 8 GPUs x 256 (L3: 4 x 256)",
        dict(opt="adamw", lr_base=5e-4, lr_base_size=512, lr_base_scale="linear", batch_size=2048, epochs=300,
             cooldown_epochs=0, sched="cosine", warmup_epochs=15, weight_decay=0.05, clip_grad=5.0, amp=True,
             model_ema=False, drop_path=0.2, **_IMAGENET_AUG),
        variants=(("plainmamba_l2", dict(warmup_epochs=20, clip_grad=1.0, amp=False, model_ema=True,
                                         model_ema_decay=0.9999)),
                  ("plainmamba_l3", dict(warmup_epochs=20, clip_grad=1.0, amp=False, model_ema=True,
                                         model_ema_decay=0.9999, drop_path=0.4, batch_size=1024))),
        lr_ratios=dict(min_lr=0.01),
        notes=("RandAugment policy assumed to be rand-m9-mstd0.5-inc1 (mmcls RandAugment).",),
    ),
    Recipe(
        "mambaout",
        "yuweihao/MambaOut scripts/train_mambaout_*.sh and train.py defaults (timm): global batch 4096",
        dict(opt="adamw", lr_base=4e-3, lr_base_size=4096, lr_base_scale="linear", batch_size=4096, epochs=300,
             cooldown_epochs=10, sched="cosine", warmup_epochs=20, warmup_lr=1e-6, min_lr=1e-5, weight_decay=0.05,
             color_jitter=0.4, model_ema=False, drop=0.0, **_IMAGENET_AUG),
        variants=(("mambaout_femto", dict(drop_path=0.025)), ("mambaout_kobe", dict(drop_path=0.025)),
                  ("mambaout_tiny", dict(drop_path=0.2)), ("mambaout_small", dict(drop_path=0.4)),
                  ("mambaout_base", dict(drop_path=0.6))),
    ),
    Recipe(
        "mambavision",
        "NVlabs/MambaVision mambavision/configs/mambavision_*_1k.yaml: LAMB, global batch 4096",
        dict(opt="lamb", lr_base=5e-3, lr_base_size=4096, lr_base_scale="linear", batch_size=4096, epochs=310,
             cooldown_epochs=10, sched="cosine", warmup_epochs=20, warmup_lr=1e-6, min_lr=5e-6, weight_decay=0.05,
             clip_grad=5.0, amp=True, channels_last=True, model_ema=True, model_ema_decay=0.9998, color_jitter=0.4,
             drop_path=0.2, **_IMAGENET_AUG),
        variants=(("mambavision_b*", dict(warmup_epochs=35, weight_decay=0.075, drop_path=0.3)),
                  ("mambavision_l*", dict(weight_decay=0.12, drop_path=0.3))),
        notes=("MESA (EMA-teacher self-distillation, weight 0.5-6 from 25-30 % of training) is not implemented.",),
    ),
    Recipe(
        "spatialmamba",
        "EdwardChasel/Spatial-Mamba classification/config.py and configs/spatialmamba/*.yaml (Swin-style)",
        dict(opt="adamw", lr_base=5e-4, lr_base_size=512, lr_base_scale="linear", batch_size=1024, epochs=300,
             cooldown_epochs=0, sched="cosine", warmup_epochs=20, warmup_prefix=True, weight_decay=0.05,
             clip_grad=5.0, amp=True, model_ema=True, model_ema_decay=0.9999, color_jitter=0.4,
             train_interpolation="bicubic", drop_path=0.2, **_IMAGENET_AUG),
        variants=(("spatialmamba_s*", dict(drop_path=0.3)), ("spatialmamba_b*", dict(drop_path=0.5))),
        lr_ratios=dict(min_lr=0.01, warmup_lr=0.001),
        notes=("MESA (EMA-teacher self-distillation) is not implemented.",
               "Global batch 1024 (128 per GPU x 8) assumed; the learning rates scale with it."),
    ),
)}
