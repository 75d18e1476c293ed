"""The training engine: one loop for every task, one process or many (DDP, FSDP2) under ``torchrun``.

Built from timm's factories (optimiser, scheduler, EMA, data config, transforms, Mixup, losses, evaluator); the
engine adds distributed setup, checkpointing with exact resume, the progress bar and the run records. Usage, the
task interface and the resume guarantee are documented in ``docs/training.md``.
"""
import argparse
import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .. import __version__
from .checkpoints import CheckpointManager, read_manifest
from .config import RESUMABLE_CHANGES, load_run_config, parse_train_args
from .data import EpochSampler, create_eval_loader, create_train_loader
from .distributed import Distributed, init_distributed, no_sync, shard_with_fsdp, wrap_ddp
from .records import plot_summary, write_config, write_summary
from .tasks import TaskContext, get_task

__all__ = ["TrainResult", "Trainer", "check_run_args", "create_schedule", "enable_grad_checkpointing",
           "seed_everything", "train"]

STATE_FORMAT = "mambazoo-train-state"
RUN_FILES = ("config.json", "summary.csv", "checkpoints.json")


@dataclass
class TrainResult:
    """What a finished run leaves: its folder, the per-epoch history and the trained model (unwrapped)."""

    run_dir: Path
    history: list[dict[str, Any]]
    model: nn.Module
    ema_model: Optional[nn.Module] = None
    best: list[dict[str, Any]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """This process's RNG states in ``weights_only``-loadable types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = dict(python=random.getstate(), torch=torch.random.get_rng_state(),
                 numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                            has_gauss=int(has_gauss), gauss=float(gauss)))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.random.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """One training run; build it from resolved flags (:func:`mambazoo.training.config.parse_train_args`).

    Args:
        args: The resolved configuration.
        explicit: Names of the flags given explicitly (checked against the saved configuration on ``--resume``).
    """

    def __init__(self, args: argparse.Namespace, explicit: set[str]) -> None:
        self.dist = init_distributed(args.device)
        self.resume_state_file: Optional[Path] = None
        if args.resume:
            args = self._resumed_args(args, explicit)
        self.args = args
        check_run_args(args, self.dist)
        self.run_dir = self._run_dir()
        self.task_cls = get_task(args.task)
        self.context = TaskContext(self.dist, self._autocast, args.channels_last)
        seed_everything(args.seed)  # identical initial weights on every rank
        self.task = self.task_cls(args, self.context)
        self.datasets = self.task.build_datasets()
        module = self.task.build_model(self.datasets)
        self.data_config = self.task.attach_transforms(module, self.datasets)
        self._build_model(module)
        self._build_loaders()
        self._build_optimization()
        ranked = "ema" if self.ema is not None else "model"
        self.checkpoints = CheckpointManager(self.run_dir, args.checkpoint_hist, self.task.metric,
                                             self.task.higher_is_better, ranked)
        seed_everything(args.seed + self.dist.rank)  # training randomness differs per rank
        self.history: list[dict[str, Any]] = []
        self.epoch, self.batch, self.global_step = 0, 0, 0
        self.partial = dict(loss_sum=0.0, samples=0, seconds=0.0)
        if self.resume_state_file is not None:
            self._load_state(self.resume_state_file)
        self._write_config()

    # ----------------------------------------------------------------------------------------------- setup
    def _resumed_args(self, args: argparse.Namespace, explicit: set[str]) -> argparse.Namespace:
        resume = Path(args.resume)
        if not resume.exists():
            raise FileNotFoundError(f"--resume {resume} does not exist (give a run folder or its .state.pt file)")
        run_dir = resume if resume.is_dir() else resume.parent.parent
        saved = load_run_config(run_dir)["args"]
        conflicts = sorted(name for name in explicit - RESUMABLE_CHANGES
                           if name in saved and _comparable(getattr(args, name)) != _comparable(saved[name]))
        if conflicts:
            details = ", ".join(f"--{n.replace('_', '-')} {getattr(args, n)!r} (run: {saved[n]!r})" for n in conflicts)
            raise ValueError(f"--resume {resume}: these flags differ from the run's configuration: {details}")
        resumed = argparse.Namespace(**saved)
        for name in explicit & RESUMABLE_CHANGES:
            setattr(resumed, name, getattr(args, name))
        resumed.resume, resumed.output, resumed.experiment = str(resume), str(run_dir), None
        # the weights come from the checkpoint: do not fetch or read the initial ones again
        resumed.pretrained, resumed.pretrained_path, resumed.initial_checkpoint = False, None, None
        self.resume_state_file = resume if resume.is_file() else CheckpointManager(
            run_dir, resumed.checkpoint_hist, "", True).last_state_file
        if self.resume_state_file is None or not self.resume_state_file.is_file():
            read_manifest(run_dir)  # raises a clear error when there is no checkpoint at all
            raise FileNotFoundError(f"--resume: state file {self.resume_state_file} is missing")
        return resumed

    def _run_dir(self) -> Path:
        args = self.args
        if args.output:
            run_dir = Path(args.output) / args.experiment if args.experiment else Path(args.output)
        else:
            stamp = self.dist.broadcast_object(datetime.now().strftime("%Y%m%d-%H%M%S"))
            size = getattr(args, "img_size", None) or "default"  # a classification flag
            run_dir = Path("output/train") / f"{stamp}-{args.model}-{size}"
        taken = [name for name in RUN_FILES if (run_dir / name).exists()]
        if taken and not args.resume:
            raise ValueError(f"output folder {run_dir} holds another run ({', '.join(taken)}); continue it with "
                             f"--resume {run_dir} or choose another --output")
        return run_dir

    def _autocast(self):
        if not self.args.amp:
            return nullcontext()
        return torch.autocast(self.dist.device.type, dtype=getattr(torch, self.args.amp_dtype))

    def _build_model(self, module: nn.Module) -> None:
        args, device = self.args, self.dist.device
        if args.sync_bn and self.dist.enabled:
            if device.type == "cpu":
                self._print("--sync-bn: SyncBatchNorm runs on GPUs only; on CPU every process keeps its own "
                            "BatchNorm statistics")
            else:
                module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        module.to(device)
        if args.channels_last:
            module.to(memory_format=torch.channels_last)
        if args.grad_checkpointing:
            enable_grad_checkpointing(module)
        self.ema = None
        if args.model_ema:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(module, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
        self.module = module
        self.num_params = sum(p.numel() for p in module.parameters())
        model = module
        if args.fsdp:
            shard_with_fsdp(module, device, self.dist.world_size)
            if self.ema is not None:
                shard_with_fsdp(self.ema.module, device, self.dist.world_size)
        if args.torchcompile:
            model = torch.compile(model, backend=args.torchcompile)
        self.eval_model = model
        if self.dist.enabled and not args.fsdp:
            model = wrap_ddp(model, device)
        self.model = model

    def _build_loaders(self) -> None:
        args, dist = self.args, self.dist
        self.local_batch = args.batch_size // dist.world_size
        self.sampler = EpochSampler(len(self.datasets.train), dist.world_size, dist.rank, args.seed,
                                    repeats=args.aug_repeats)
        pin = dist.device.type == "cuda"
        self.train_loader = create_train_loader(self.datasets.train, self.local_batch, self.sampler, args.workers,
                                                self.task.collate_fn(True), pin)
        if len(self.train_loader) == 0:
            raise ValueError(f"the training set ({len(self.datasets.train)} samples, {self.sampler.per_rank} per "
                             f"process) is smaller than one batch per process ({self.local_batch})")
        eval_batch = (args.validation_batch_size or args.batch_size) // dist.world_size
        self.eval_loader = create_eval_loader(self.datasets.val, eval_batch, dist.world_size, dist.rank,
                                              args.workers, self.task.collate_fn(False), pin)

    def _build_optimization(self) -> None:
        from timm.optim import create_optimizer_v2

        args = self.args
        extra = {}
        if args.opt_eps is not None:
            extra["eps"] = args.opt_eps
        if args.opt_betas is not None:
            extra["betas"] = tuple(args.opt_betas)
        self.optimizer = create_optimizer_v2(self.task.optimizer_params(self.module), opt=args.opt, lr=args.lr,
                                             weight_decay=args.weight_decay, momentum=args.momentum,
                                             layer_decay=args.layer_decay, **extra)
        self.batches_per_epoch = len(self.train_loader)
        self.updates_per_epoch = math.ceil(self.batches_per_epoch / args.grad_accum_steps)
        self.scheduler, self.num_epochs, self.max_updates = create_schedule(self.optimizer, args,
                                                                            self.updates_per_epoch)
        cuda_fp16 = args.amp and args.amp_dtype == "float16" and self.dist.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if cuda_fp16 else None

    def _write_config(self) -> None:
        config = dict(args=vars(self.args), data=self.data_config, dataset=self.datasets.description,
                      classes=list(self.datasets.classes), world_size=self.dist.world_size,
                      model_params=self.num_params, num_epochs=self.num_epochs,
                      updates_per_epoch=self.updates_per_epoch, max_updates=self.max_updates,
                      mambazoo=__version__, torch=torch.__version__,
                      recipe_notes=list(self.task_cls.recipes[self.args.recipe].notes) if self.args.recipe else [])
        if self.dist.is_primary:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not self.args.resume:  # a resumed run keeps its original record
                write_config(self.run_dir, config)
            self._print(f"run folder: {self.run_dir}")
            self._print("resolved config: " + json.dumps(vars(self.args), sort_keys=True, default=str))
            for note in config["recipe_notes"]:
                self._print(f"recipe note: {note}")
        self.dist.barrier()

    def _print(self, text: str) -> None:
        if self.dist.is_primary:
            print(text, flush=True)

    # ------------------------------------------------------------------------------------------ checkpoints
    def _gather_weights(self, module: nn.Module) -> dict[str, Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=self.dist.enabled)
        return get_model_state_dict(module, options=options)

    def _save(self, name: str, epoch: int, metric: Optional[float] = None) -> None:
        """Checkpoint the current position (every rank takes part in gathering; rank 0 writes).

        Args:
            name: Checkpoint name.
            epoch: The epoch it belongs to (the finished one at an epoch end).
            metric: The ranking metric (epoch ends only).
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=self.dist.enabled)
        self._sync_norm_statistics()
        weights = self._gather_weights(self.module)
        ema_weights = self._gather_weights(self.ema.module) if self.ema is not None else None
        optimizer = get_optimizer_state_dict(self.module, self.optimizer, options=options)
        rng = self.dist.gather_objects(_rng_state())
        if self.dist.is_primary:
            state = dict(format=STATE_FORMAT, version=1, epoch=self.epoch, batch=self.batch,
                         global_step=self.global_step, world_size=self.dist.world_size, optimizer=optimizer,
                         scheduler=self.scheduler.state_dict(), rng=rng, history=self.history, partial=self.partial,
                         scaler=self.scaler.state_dict() if self.scaler is not None else None)
            self.checkpoints.save(name, weights, ema_weights, state, epoch, self.global_step, metric)
        self.dist.barrier()

    def _sync_norm_statistics(self) -> None:
        """Under FSDP2, average the BatchNorm running statistics of the model and its EMA over the ranks (timm's
        ``distribute_bn``) so that evaluation and checkpoints see one model; DDP broadcasts rank 0's buffers at every
        forward pass itself."""
        if self.args.fsdp and self.dist.enabled:
            from timm.utils import distribute_bn

            for module in (self.module, self.ema.module if self.ema is not None else None):
                if module is not None:
                    distribute_bn(module, self.dist.world_size, reduce=True)

    def _load_state(self, path: Path) -> None:
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict)

        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"{path} is not a mambazoo training state")
        if state["world_size"] != self.dist.world_size:
            raise ValueError(f"{path} was written by {state['world_size']} processes, this run has "
                             f"{self.dist.world_size}: resume with the same --nproc_per_node")
        options = StateDictOptions(full_state_dict=True)
        stem = path.name.removesuffix(".state.pt")
        set_model_state_dict(self.module, load_file(str(path.with_name(f"{stem}.safetensors"))), options=options)
        if self.ema is not None:
            ema_file = path.with_name(f"{stem}.ema.safetensors")
            set_model_state_dict(self.ema.module, load_file(str(ema_file)), options=options)
        set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"], options=options)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch, self.global_step = state["epoch"], state["batch"], state["global_step"]
        self.history, self.partial = state["history"], state["partial"]
        _set_rng_state(state["rng"][self.dist.rank])
        self._print(f"resumed {path}: epoch {self.epoch}, batch {self.batch}, step {self.global_step}")

    # --------------------------------------------------------------------------------------------- the loop
    def run(self) -> TrainResult:
        """Train to the end of the schedule, evaluating and checkpointing after every epoch."""
        if self.epoch >= self.num_epochs:
            self._print(f"nothing to train: the run has completed its {self.num_epochs} epochs")
        while self.epoch < self.num_epochs:
            self._train_epoch()
            row = self._finish_epoch()
            self._print(_epoch_line(row, self.num_epochs))
        if self.dist.is_primary and self.history:
            try:
                plot_summary(self.run_dir, self.history, self.task.metric)
            except ImportError:
                self._print("summary.png skipped: matplotlib is not installed (pip install 'mambazoo[train]')")
        self.dist.barrier()
        return TrainResult(self.run_dir, self.history, self.module, self.ema.module if self.ema else None,
                           self.checkpoints.manifest["best"])

    def _progress(self):
        from tqdm.auto import tqdm

        total = self.batches_per_epoch * self.args.batch_size
        return tqdm(total=total, initial=self.batch * self.args.batch_size, unit="img", unit_scale=True,
                    desc=f"epoch {self.epoch}/{self.num_epochs}", dynamic_ncols=True, leave=False,
                    disable=not self.dist.is_primary or self.args.no_progress)

    def _train_epoch(self) -> None:
        args = self.args
        self.model.train()
        self.sampler.set_epoch(self.epoch, start=self.batch * self.local_batch)
        bar = self._progress()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        samples, start = 0, time.perf_counter()
        last_group = self.batches_per_epoch - (self.updates_per_epoch - 1) * args.grad_accum_steps
        for index, batch in enumerate(self.train_loader, start=self.batch):
            final_group = index // args.grad_accum_steps == self.updates_per_epoch - 1
            group_size = last_group if final_group else args.grad_accum_steps
            update = (index + 1) % args.grad_accum_steps == 0 or index + 1 == self.batches_per_epoch
            with no_sync(self.model, skip_sync=not update):
                with self._autocast():
                    loss, count = self.task.training_step(self.model, batch, self.epoch)
                self._backward(loss / group_size)
            loss_sum += loss.detach().double() * count
            samples += count
            bar.update(count * self.dist.world_size)
            self.batch = index + 1
            if update:
                self._optimizer_step()
                if self.global_step % args.log_interval == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self._lr():.3g}")
                finished = self.max_updates is not None and self.global_step >= self.max_updates
                if args.recovery_interval and self.global_step % args.recovery_interval == 0 \
                        and self.batch < self.batches_per_epoch and not finished:
                    self._accumulate(loss_sum, samples, start)
                    loss_sum.zero_()
                    samples, start = 0, time.perf_counter()
                    self._save(f"step{self.global_step:08d}", self.epoch)
                if finished:  # --iterations reached inside the last epoch
                    break
        bar.close()
        self._accumulate(loss_sum, samples, start)

    def _accumulate(self, loss_sum: Tensor, samples: int, start: float) -> None:
        """Fold this rank's running loss into the epoch totals (summed over ranks)."""
        totals = torch.tensor([loss_sum.item(), float(samples)], dtype=torch.float64, device=self.dist.device)
        self.dist.all_reduce_sum(totals)
        self.partial = dict(loss_sum=self.partial["loss_sum"] + totals[0].item(),
                            samples=self.partial["samples"] + int(totals[1].item()),
                            seconds=self.partial["seconds"] + time.perf_counter() - start)

    def _backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _optimizer_step(self) -> None:
        from timm.utils import dispatch_clip_grad

        args = self.args
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if args.clip_grad is not None:
            dispatch_clip_grad(self.module.parameters(), args.clip_grad, mode=args.clip_mode)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(self.module, step=self.global_step)
        self.scheduler.step_update(num_updates=self.global_step)

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """The task's metrics of ``model`` on the validation set (eval mode, inference mode)."""
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            metrics = self.task.evaluate(model, self.eval_loader)
        model.train(was_training)
        return metrics

    def _finish_epoch(self) -> dict[str, Any]:
        partial = self.partial
        row = dict(epoch=self.epoch, train_loss=partial["loss_sum"] / max(partial["samples"], 1))
        self._sync_norm_statistics()
        row.update({f"eval_{k}": v for k, v in self.evaluate(self.eval_model).items()})
        if self.ema is not None:
            row.update({f"ema_eval_{k}": v for k, v in self.evaluate(self.ema.module).items()})
        row["lr"] = self._lr()
        row["train_samples_per_sec"] = partial["samples"] / max(partial["seconds"], 1e-9)
        metric = row[f"{'ema_' if self.ema is not None else ''}eval_{self.task.metric}"]
        self.history.append(row)
        self.scheduler.step(self.epoch + 1, metric)
        finished = self.epoch
        self.epoch, self.batch = self.epoch + 1, 0
        self.partial = dict(loss_sum=0.0, samples=0, seconds=0.0)
        self._save(f"epoch{finished:04d}", finished, metric)
        if self.dist.is_primary:
            write_summary(self.run_dir, self.history)
        return row


def create_schedule(optimizer: torch.optim.Optimizer, args: argparse.Namespace,
                    updates_per_epoch: int) -> tuple[Any, int, Optional[int]]:
    """timm's learning-rate scheduler for the flags (``create_scheduler_v2``).

    With ``--iterations`` or ``--warmup-steps`` every length is counted in optimiser updates (timm's factory counts
    whole epochs): the schedule spans ``--iterations`` updates (or ``--epochs`` × ``updates_per_epoch``) and warms up
    over ``--warmup-steps`` (or ``--warmup-epochs`` × ``updates_per_epoch``).

    Returns:
        The scheduler, the number of epochs to run, and the number of updates after which training stops (None:
        at the end of the last epoch).
    """
    from timm.scheduler import create_scheduler_v2

    lengths = dict(num_epochs=args.epochs, warmup_epochs=args.warmup_epochs, decay_epochs=args.decay_epochs,
                   decay_milestones=args.decay_milestones, cooldown_epochs=args.cooldown_epochs)
    in_updates = bool(args.iterations or args.warmup_steps)
    if in_updates:
        lengths = {name: [value * updates_per_epoch for value in length] if isinstance(length, list)
                   else length * updates_per_epoch for name, length in lengths.items()}
        lengths["num_epochs"] = args.iterations or lengths["num_epochs"]
        lengths["warmup_epochs"] = args.warmup_steps or lengths["warmup_epochs"]
    scheduler, length = create_scheduler_v2(
        optimizer, sched=args.sched, **lengths, decay_rate=args.decay_rate, min_lr=args.min_lr,
        warmup_lr=args.warmup_lr, warmup_prefix=args.warmup_prefix, step_on_epochs=not args.sched_on_updates,
        updates_per_epoch=1 if in_updates else updates_per_epoch)
    if not in_updates:
        return scheduler, length, None
    return scheduler, math.ceil(length / updates_per_epoch), length


def enable_grad_checkpointing(module: nn.Module) -> None:
    """Turn on gradient checkpointing in ``module`` or, for wrappers without the switch (e.g. torchvision's
    detectors), in every submodule that has one (timm's ``set_grad_checkpointing``)."""
    switches = [module] if hasattr(module, "set_grad_checkpointing") else \
        [m for m in module.modules() if hasattr(m, "set_grad_checkpointing")]
    if not switches:
        raise ValueError(f"--grad-checkpointing: {type(module).__name__} has no set_grad_checkpointing()")
    for switch in switches:
        switch.set_grad_checkpointing(True)


def check_run_args(args: argparse.Namespace, dist: Distributed) -> None:
    """Reject flag values the engine cannot run with, before any work starts."""
    world = dist.world_size
    if not args.model:
        raise ValueError("--model is required")
    for name in ("iterations", "warmup_steps"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "iterations" else 0):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if value and not args.sched_on_updates:
            raise ValueError(f"--{name.replace('_', '-')} counts optimiser updates: add --sched-on-updates")
    for name in ("batch_size", "grad_accum_steps", "epochs", "log_interval"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("checkpoint_hist", "recovery_interval", "workers", "aug_repeats"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    for name in ("batch_size", "validation_batch_size"):
        value = getattr(args, name)
        if value is not None and value % world:
            raise ValueError(f"--{name.replace('_', '-')} {value} is not divisible by the world size {world} "
                             f"(it is the global batch, split evenly over the processes)")
    if args.fsdp and not dist.enabled:
        raise ValueError("--fsdp needs several processes: run under torchrun --nproc_per_node=N")
    if args.amp and args.amp_dtype == "float16" and dist.device.type == "cpu":
        raise ValueError("--amp-dtype float16 is not supported on CPU; use bfloat16")


def _comparable(value: Any) -> Any:
    """Normalise flag values for comparison with a configuration read back from JSON."""
    return list(value) if isinstance(value, tuple) else value


def _epoch_line(row: dict[str, Any], num_epochs: int) -> str:
    """The printed epoch summary: every float of the row except per-class values (``eval_IoU.<class>``), which
    ``summary.csv`` keeps."""
    parts = [f"epoch {row['epoch']}/{num_epochs}"]
    parts += [f"{key} {value:.4g}" for key, value in row.items()
              if key != "epoch" and isinstance(value, float) and "." not in key]
    return " | ".join(parts)


def train(argv: Optional[Sequence[str]] = None) -> TrainResult:
    """Run ``mambazoo train`` with command-line flags (``argv``; default ``sys.argv[1:]``)."""
    args, explicit = parse_train_args(argv)
    return Trainer(args, explicit).run()
