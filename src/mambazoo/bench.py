"""Benchmark engine: timm ``benchmark.py`` semantics plus peak memory, train steps and resolution sweeps.

Method (as timm's ``benchmark.py``): the input ``torch.randn((batch,) + input_size)`` is made once and reused;
``model.eval()`` under ``torch.inference_mode()`` (plus autocast for ``precision="amp"``); ``num_warm_iter`` warm-up
steps, then ``num_bench_iter`` timed steps, each ``perf_counter`` → forward → device sync → ``perf_counter``.
``infer_samples_per_sec`` = samples / wall time of the timed loop, ``infer_step_time`` = mean step in ms,
``param_count`` in millions, ``infer_gmacs`` from :mod:`mambazoo.flops` at batch 1 (conv/linear MACs + 9·B·L·D·N per
scan). Train steps: ``model.train()``, cross-entropy on random targets, SGD (lr 1e-4), zero_grad → forward → loss →
backward → step. On CUDA an out-of-memory error lowers the batch size (timm's ``decay_batch_step``) and retries.

Peak memory (added to timm's columns as ``*_peak_mem_mb``): on CUDA ``torch.cuda.max_memory_allocated()`` after
``reset_peak_memory_stats()`` just before the timed loop (weights, input and activations). On CPU see
:data:`CPU_MEMORY_METHOD`.
"""
import contextlib
import ctypes
import json
import math
import os
import platform
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import timm
import torch
from timm.utils import decay_batch_step
from torch import Tensor, nn

from .checkpoint import atomic_write
from .flops import count_model_macs
from .zoo import create_model_for_size

__all__ = [
    "CPU_MEMORY_METHOD",
    "DEFAULT_BATCH_SIZE",
    "ModelSpec",
    "PeakMemory",
    "benchmark",
    "build_model",
    "crossover_resolution",
    "default_batch_size",
    "is_oom",
    "load_warning",
    "machine_description",
    "markdown_table",
    "measure",
    "plot_sweep",
    "resolve_device",
    "run_with_oom_retry",
    "sweep",
    "write_results",
]

CPU_MEMORY_METHOD = (
    "CPU peak memory = peak resident set size (VmHWM from /proc/self/status) during the timed loop minus the RSS "
    "just before it; the kernel's high-water mark is reset by writing 5 to /proc/self/clear_refs, after glibc "
    "malloc_trim(0) returns cached free memory. Includes allocator slack; excludes weights and input (already "
    "resident)."
)
# Images per step when none is given: timm's 256 on accelerators; 1 on CPU, where a batch of 256 of a large model
# would take minutes per step (timm's published CPU configuration is batch 1 as well).
DEFAULT_BATCH_SIZE = {"cpu": 1, "cuda": 256}
LOADED_FRACTION = 0.5  # warn when the 1-minute load average exceeds this fraction of the usable cores
_PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "amp": torch.float32}
_MATERIALIZED_SUFFIX = ":math"


@dataclass(frozen=True)
class ModelSpec:
    """A model to benchmark: a registered name, optionally with attention forced to the materialised (math) path.

    Written as ``name`` or ``name:math`` on the command line. ``:math`` switches every timm attention module to
    softmax(QKᵀ)V with the (L × L) matrix materialised instead of fused ``scaled_dot_product_attention``.
    """

    name: str
    materialize_attention: bool = False

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        """Parse ``name`` or ``name:math``."""
        if not isinstance(text, str) or not text:
            raise ValueError(f"model must be a non-empty name, got {text!r}")
        if text.endswith(_MATERIALIZED_SUFFIX):
            return cls(text[: -len(_MATERIALIZED_SUFFIX)], materialize_attention=True)
        return cls(text)

    @property
    def key(self) -> str:
        """The spec as written on the command line."""
        return self.name + (_MATERIALIZED_SUFFIX if self.materialize_attention else "")

    @property
    def label(self) -> str:
        """Human-readable label used in tables and plots."""
        if self.materialize_attention:
            return f"{self.name} (materialised attn)"
        return f"{self.name} (SDPA attn)" if self.name.startswith(("deit", "vit")) else self.name


def build_model(spec: ModelSpec, img_size: int, device: torch.device, dtype: torch.dtype = torch.float32,
                channels_last: bool = False, model_kwargs: Optional[dict[str, Any]] = None) -> nn.Module:
    """Create a randomly initialised benchmark model for ``img_size`` inputs on ``device``.

    ``model_kwargs`` go to the model's constructor (e.g. ``scan_backend="torch"``), as timm's ``--model-kwargs``.
    """
    model = create_model_for_size(spec.name, img_size, **(model_kwargs or {}))
    if spec.materialize_attention:
        attention_modules = [m for m in model.modules() if hasattr(m, "fused_attn")]
        if not attention_modules:
            raise ValueError(f"{spec.name} has no timm attention module to materialise (':math' given)")
        for module in attention_modules:
            module.fused_attn = False
    model = model.to(device=device, dtype=dtype)
    return model.to(memory_format=torch.channels_last) if channels_last else model


class PeakMemory:
    """Context manager measuring peak memory in MB (see the module docstring); read ``.mb`` after exit."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mb = float("nan")
        self._baseline = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif _can_reset_cpu_peak():
            _malloc_trim()
            self._baseline = _proc_status_kib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif _can_reset_cpu_peak():
            self.mb = max(_proc_status_kib("VmHWM") - self._baseline, 0) / 1024


def _can_reset_cpu_peak() -> bool:
    return os.access("/proc/self/clear_refs", os.W_OK)


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str, amp_dtype: torch.dtype):
    return torch.autocast(device.type, dtype=amp_dtype) if precision == "amp" else nullcontext()


def _timed_loop(step: Callable[[], None], device: torch.device, num_iter: int,
                bar: Optional[Any] = None) -> tuple[float, float]:
    """Run ``step`` ``num_iter`` times; returns (wall seconds of the loop, summed step seconds)."""
    step_total = 0.0
    start = time.perf_counter()
    for _ in range(num_iter):
        t0 = time.perf_counter()
        step()
        _sync(device)
        step_total += time.perf_counter() - t0
        if bar is not None:
            bar.update(1)
    return time.perf_counter() - start, step_total


def _inference_step(model: nn.Module, inputs: Tensor, device: torch.device, precision: str,
                    amp_dtype: torch.dtype) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), _autocast(device, precision, amp_dtype):
            model(inputs)
    return step


def _train_step(model: nn.Module, inputs: Tensor, device: torch.device, precision: str,
                amp_dtype: torch.dtype) -> Callable[[], None]:
    num_classes = model.num_classes if getattr(model, "num_classes", 0) else 1000
    targets = torch.randint(0, num_classes, (inputs.shape[0],), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, precision, amp_dtype):
            loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
    return step


def _measure(step: Callable[[], None], device: torch.device, batch_size: int, num_warm_iter: int,
             num_bench_iter: int, bar: Optional[Any] = None) -> dict:
    """Warm up, then time ``num_bench_iter`` steps; ``bar`` (a tqdm bar) advances once per step."""
    for _ in range(num_warm_iter):
        step()
        if bar is not None:
            bar.update(1)
    _sync(device)
    with PeakMemory(device) as memory:
        wall, step_total = _timed_loop(step, device, num_bench_iter, bar)
    return dict(samples_per_sec=float(f"{batch_size * num_bench_iter / wall:.4g}"),
                step_time=round(1000 * step_total / num_bench_iter, 3), peak_mem_mb=round(memory.mb, 1))


def measure(step: Callable[[], None], device: torch.device, batch_size: int, num_warm_iter: int,
            num_bench_iter: int) -> dict:
    """Time any ``step`` (e.g. a detector's forward) as :func:`benchmark` times a model.

    ``num_warm_iter`` untimed calls, then ``num_bench_iter`` timed calls under :class:`PeakMemory`.

    Returns:
        ``samples_per_sec``, ``step_time`` (mean ms) and ``peak_mem_mb``.
    """
    return _measure(step, device, batch_size, num_warm_iter, num_bench_iter)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


def resolve_device(device: str) -> torch.device:
    """The torch device named ``device`` if it can run a benchmark here, else a ValueError saying why not.

    Unknown names, the ``meta`` device (shapes without data: nothing to time), an unavailable accelerator and an
    out-of-range device index are refused.
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "meta":
        raise ValueError("the meta device holds shapes without data, so there is nothing to time; use 'cpu' or 'cuda'")
    if resolved.type == "cpu":
        return resolved
    backend = getattr(torch, resolved.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        why = "this is a CPU-only PyTorch build" if resolved.type == "cuda" and torch.version.cuda is None else \
            f"torch {torch.__version__} finds no {resolved.type} device"
        raise ValueError(f"device {device!r} requested but {resolved.type.upper()} is not available here ({why}); "
                         f"use 'cpu'")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if resolved.index is not None and resolved.index >= count:
        raise ValueError(f"device {device!r} does not exist: {count} {resolved.type} device(s) visible")
    return resolved


def default_batch_size(device: str) -> int:
    """Images per step when none is given (see :data:`DEFAULT_BATCH_SIZE`)."""
    return DEFAULT_BATCH_SIZE.get(torch.device(device).type, DEFAULT_BATCH_SIZE["cuda"])


def load_warning() -> Optional[str]:
    """A warning when the machine is visibly loaded (1-minute load average above half the usable cores), else None.

    Benchmarks share the CPU with whatever else runs; ratios measured interleaved survive moderate load, absolute
    numbers do not.
    """
    if not hasattr(os, "getloadavg"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0]
    if load <= LOADED_FRACTION * cores:
        return None
    return (f"warning: the machine is loaded (1-minute load average {load:.1f} on {cores} usable cores); timings "
            f"will be slower and noisier than on a quiet machine")


@contextlib.contextmanager
def _cuda_benchmark_flags(device: torch.device) -> Iterator[None]:
    """timm's CUDA benchmark settings (TF32 matmuls, cuDNN autotuning) for the duration, then the previous ones."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = True, True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = saved


def _resolve_options(device: str, precision: str, amp_dtype: str) -> tuple[torch.device, torch.dtype, torch.dtype]:
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
    if amp_dtype not in ("float16", "bfloat16"):
        raise ValueError(f"amp_dtype must be 'float16' or 'bfloat16', got {amp_dtype!r}")
    return resolve_device(device), _PRECISIONS[precision], _PRECISIONS[amp_dtype]


def _default_img_size(name: str) -> int:
    cfg = timm.models.get_pretrained_cfg(name)
    size = (getattr(cfg, "test_input_size", None) or getattr(cfg, "input_size", None)) if cfg else None
    return size[-1] if size else 224


def is_oom(error: BaseException) -> bool:
    """Whether ``error`` is an out-of-memory error (CUDA or allocator)."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def run_with_oom_retry(run: Callable[[int], dict], batch_size: int, device: torch.device,
                       retry: bool = True) -> tuple[dict, int]:
    """Call ``run(batch_size)``; on a CUDA out-of-memory error lower the batch (timm's ``decay_batch_step``) and retry.

    Returns:
        The result and the batch size that worked.
    """
    while True:
        try:
            return run(batch_size), batch_size
        except RuntimeError as error:
            if not (retry and device.type == "cuda" and is_oom(error)) or batch_size <= 1:
                raise
            torch.cuda.empty_cache()
            batch_size = decay_batch_step(batch_size)


def benchmark(
        model: str,
        batch_size: Optional[int] = None,
        img_size: Optional[int] = None,
        bench: str = "inference",
        device: str = "cpu",
        precision: str = "float32",
        amp_dtype: str = "bfloat16",
        channels_last: bool = False,
        num_warm_iter: int = 10,
        num_bench_iter: int = 40,
        count_gmacs: bool = True,
        retry_oom: bool = True,
        model_kwargs: Optional[dict[str, Any]] = None,
        torchcompile: Optional[str] = None,
        progress: bool = False,
) -> dict:
    """Benchmark one model; returns a row with timm's column names plus ``*_peak_mem_mb``.

    On CUDA, TF32 matmuls and cuDNN autotuning are switched on for the run (as timm's benchmark) and restored after.

    Args:
        model: Registered model name, or ``name:math`` for materialised attention (see :class:`ModelSpec`).
        batch_size: Images per step; default :data:`DEFAULT_BATCH_SIZE` for the device (1 on CPU, timm's 256 on
            CUDA). Lowered and retried on CUDA out-of-memory.
        img_size: Square input resolution; default the model's ``test_input_size`` (timm's default).
        bench: ``"inference"``, ``"train"`` or ``"both"``.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (see :func:`resolve_device`).
        precision: ``"float32"``, ``"float16"``, ``"bfloat16"`` (model and input cast) or ``"amp"`` (autocast).
        amp_dtype: Autocast dtype for ``precision="amp"``.
        channels_last: Use the channels-last memory format for model and input.
        num_warm_iter: Untimed warm-up steps.
        num_bench_iter: Timed steps.
        count_gmacs: Add ``infer_gmacs`` (batch 1, :mod:`mambazoo.flops`; skipped when compiled, as timm does).
        retry_oom: On CUDA out-of-memory, lower the batch size and retry (as timm's ``--no-retry`` off).
        model_kwargs: Extra model constructor arguments (timm's ``--model-kwargs``), e.g. ``scan_backend="torch"``.
        torchcompile: ``torch.compile`` backend (timm's ``--torchcompile``, e.g. ``"inductor"``); None for eager.
        progress: Show a progress bar over the warm-up and timed steps (on stderr).
    """
    spec = ModelSpec.parse(model)
    if bench not in ("inference", "train", "both"):
        raise ValueError(f"bench must be 'inference', 'train' or 'both', got {bench!r}")
    img_size = _default_img_size(spec.name) if img_size is None else img_size
    device_, dtype, amp_dtype_ = _resolve_options(device, precision, amp_dtype)
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    _check_positive(batch_size=batch_size, img_size=img_size, num_bench_iter=num_bench_iter)
    if num_warm_iter < 0:
        raise ValueError(f"num_warm_iter must be >= 0, got {num_warm_iter}")
    with _cuda_benchmark_flags(device_):
        net = build_model(spec, img_size, device_, dtype, channels_last, model_kwargs)
        row = dict(model=spec.key, param_count=round(sum(p.numel() for p in net.parameters()) / 1e6, 2))
        if torchcompile:
            net = torch.compile(net, backend=torchcompile)
        kinds = ("inference", "train") if bench == "both" else (bench,)
        bar = _progress_bar(len(kinds) * (num_warm_iter + num_bench_iter), progress, f"bench {spec.key}", "step")
        for kind in kinds:
            prefix = "infer" if kind == "inference" else "train"
            bar.set_postfix_str(f"{kind} {img_size}px")

            def run(size: int, kind: str = kind) -> dict:
                return _run_kind(kind, net, size, img_size, device_, dtype, precision, amp_dtype_, channels_last,
                                 num_warm_iter, num_bench_iter, bar)

            result, current = run_with_oom_retry(run, batch_size, device_, retry_oom)
            row.update({f"{prefix}_{key}": value for key, value in result.items()})
            row.update({f"{prefix}_batch_size": current, f"{prefix}_img_size": img_size})
        bar.close()
    if count_gmacs and "inference" in kinds and not torchcompile:
        row["infer_gmacs"] = round(count_model_macs(spec.name, img_size=img_size, **(model_kwargs or {})).gmacs, 2)
    return row


def _run_kind(kind: str, net: nn.Module, batch_size: int, img_size: int, device: torch.device, dtype: torch.dtype,
              precision: str, amp_dtype: torch.dtype, channels_last: bool, num_warm_iter: int,
              num_bench_iter: int, bar: Optional[Any] = None) -> dict:
    inputs = torch.randn((batch_size, 3, img_size, img_size), device=device, dtype=dtype)
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    if kind == "inference":
        net.eval()
        step = _inference_step(net, inputs, device, precision, amp_dtype)
    else:
        net.train()
        step = _train_step(net, inputs, device, precision, amp_dtype)
    return _measure(step, device, batch_size, num_warm_iter, num_bench_iter, bar)


def sweep(
        models: Sequence[str],
        resolutions: Sequence[int],
        batch_size: int = 1,
        repeats: int = 3,
        num_warm_iter: int = 1,
        num_bench_iter: int = 1,
        device: str = "cpu",
        precision: str = "float32",
        amp_dtype: str = "bfloat16",
        channels_last: bool = False,
        baseline: Optional[str] = None,
        progress: bool = True,
) -> list[dict]:
    """Inference sweep over resolutions, models interleaved: each round runs every model once, ``repeats`` rounds.

    For every resolution all models are built, warmed up, then timed round-robin so that machine drift hits them
    alike; a row per (model, resolution) reports medians over rounds, and ``speed_vs_baseline`` is the median of the
    per-round ratios (model samples/s ÷ baseline samples/s). A model that fails at a resolution gets an ``error``
    entry instead of numbers.

    Args:
        models: Model specs (``name`` or ``name:math``).
        resolutions: Square input sizes.
        batch_size: Images per step.
        repeats: Interleaved rounds per resolution.
        num_warm_iter: Warm-up steps per model and resolution.
        num_bench_iter: Timed steps per model and round.
        device: Torch device string.
        precision: ``"float32"``, ``"float16"``, ``"bfloat16"`` (model and input cast) or ``"amp"`` (autocast).
        amp_dtype: Autocast dtype for ``precision="amp"``.
        channels_last: Use the channels-last memory format for models and input.
        baseline: Spec to compute ratios against; default the last model.
        progress: Show a tqdm progress bar.
    """
    if not models or not resolutions:
        raise ValueError("models and resolutions must be non-empty")
    _check_positive(batch_size=batch_size, repeats=repeats, num_bench_iter=num_bench_iter,
                    **{f"resolution {r}": r for r in resolutions})
    specs = [ModelSpec.parse(text) for text in models]
    baseline_spec = ModelSpec.parse(baseline) if baseline else specs[-1]
    if baseline_spec not in specs:
        raise ValueError(f"baseline {baseline!r} is not among the models {list(models)}")
    device_, dtype, amp_dtype_ = _resolve_options(device, precision, amp_dtype)
    setup = _SweepSetup(batch_size, repeats, num_warm_iter, num_bench_iter, device_, dtype, precision, amp_dtype_,
                        channels_last)
    bar = _progress_bar(len(resolutions) * len(specs) * (1 + repeats), progress, "sweep", "run")
    rows = []
    for img_size in resolutions:
        rows.extend(_sweep_resolution(specs, baseline_spec, img_size, setup, bar))
    bar.close()
    return rows


def _progress_bar(total: int, enabled: bool, description: str, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=description, unit=unit)


@dataclass(frozen=True)
class _SweepSetup:
    """What every run of a sweep shares."""

    batch_size: int
    repeats: int
    num_warm_iter: int
    num_bench_iter: int
    device: torch.device
    dtype: torch.dtype
    precision: str
    amp_dtype: torch.dtype
    channels_last: bool


def _sweep_resolution(specs: list[ModelSpec], baseline: ModelSpec, img_size: int, setup: _SweepSetup,
                      bar) -> list[dict]:
    inputs = torch.randn((setup.batch_size, 3, img_size, img_size), device=setup.device, dtype=setup.dtype)
    if setup.channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    steps, errors, params = {}, {}, {}
    for spec in specs:
        bar.set_postfix_str(f"{img_size}px build+warm-up {spec.key}")
        try:
            net = build_model(spec, img_size, setup.device, setup.dtype, setup.channels_last).eval()
            params[spec] = round(sum(p.numel() for p in net.parameters()) / 1e6, 2)
            steps[spec] = _inference_step(net, inputs, setup.device, setup.precision, setup.amp_dtype)
            for _ in range(setup.num_warm_iter):
                steps[spec]()
        except (RuntimeError, ValueError, TypeError, AssertionError) as error:
            errors[spec] = f"{type(error).__name__}: {error}"[:200]
            steps.pop(spec, None)
        bar.update(1)
    results = {spec: [] for spec in steps}
    for _ in range(setup.repeats):
        for spec, step in steps.items():
            bar.set_postfix_str(f"{img_size}px {spec.key}")
            results[spec].append(_measure(step, setup.device, setup.batch_size, 0, setup.num_bench_iter))
            bar.update(1)
        bar.update(len(errors))
    return [_sweep_row(spec, img_size, setup, params.get(spec), results.get(spec), results.get(baseline),
                       errors.get(spec)) for spec in specs]


def _sweep_row(spec: ModelSpec, img_size: int, setup: _SweepSetup, params: Optional[float], runs: Optional[list],
               baseline_runs: Optional[list], error: Optional[str]) -> dict:
    row = dict(model=spec.key, label=spec.label, infer_img_size=img_size, infer_batch_size=setup.batch_size,
               infer_precision=setup.precision, param_count=params)
    if error is not None:
        return dict(row, error=error)
    speeds = [run["samples_per_sec"] for run in runs]
    row.update(
        infer_samples_per_sec=float(f"{statistics.median(speeds):.4g}"),
        infer_step_time=round(statistics.median(run["step_time"] for run in runs), 3),
        infer_peak_mem_mb=round(statistics.median(run["peak_mem_mb"] for run in runs), 1),
        infer_samples_per_sec_min=min(speeds),
        infer_samples_per_sec_max=max(speeds),
        infer_gmacs=round(count_model_macs(spec.name, img_size=img_size).gmacs, 2),
    )
    if baseline_runs:
        ratios = [run["samples_per_sec"] / base["samples_per_sec"] for run, base in zip(runs, baseline_runs)]
        row["speed_vs_baseline"] = round(statistics.median(ratios), 3)
    return row


def crossover_resolution(rows: Iterable[dict], model: str, reference: str) -> Optional[float]:
    """Resolution where ``model``'s samples/s first overtakes ``reference``'s (log-linear interpolation).

    Returns None when there is no crossing in the swept range (or one of the models has no numbers).
    """
    speed = {(row["model"], row["infer_img_size"]): row.get("infer_samples_per_sec") for row in rows}
    sizes = sorted({size for name, size in speed if name == model})
    ratios = [(size, speed.get((model, size)), speed.get((reference, size))) for size in sizes]
    ratios = [(size, math.log(a / b)) for size, a, b in ratios if a and b]
    for (size0, r0), (size1, r1) in zip(ratios, ratios[1:]):
        if r0 < 0 <= r1:
            return size0 + (size1 - size0) * (-r0) / (r1 - r0)
    return None


def machine_description(device: str = "cpu") -> dict:
    """Hardware and software facts to store next to results."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    description = dict(cpu=cpu, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                       cpu_capability=torch.backends.cpu.get_cpu_capability(), torch=torch.__version__,
                       timm=timm.__version__, python=platform.python_version(), device=device,
                       load_average_1_5_15min=[round(load, 2) for load in os.getloadavg()])
    if torch.device(device).type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return description


def write_results(rows: list[dict], out_dir: Path, stem: str, meta: dict, plot: bool = True,
                  plot_title: Optional[str] = None) -> list[Path]:
    """Write ``rows`` as CSV, JSON (rows + ``meta``), a markdown table and, for sweeps, a PNG plot.

    Each file is written atomically (a temporary file, then a rename), so an interrupted run leaves the previous
    files intact. ``plot_title`` labels the plot (e.g. device, batch and precision).
    """
    import csv
    import io

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    paths = [out_dir / f"{stem}.csv", out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    texts = (table.getvalue(), json.dumps(dict(meta=meta, results=rows), indent=2) + "\n",
             _markdown_report(stem, rows, columns, meta))
    for path, text in zip(paths, texts):
        with atomic_write(path) as temporary:
            temporary.write_text(text, newline="" if path.suffix == ".csv" else None)
    if plot:
        paths.append(plot_sweep(rows, out_dir / f"{stem}.png", plot_title))
    return paths


def _markdown_report(title: str, rows: list[dict], columns: list[str], meta: dict) -> str:
    lines = [f"# {title}", ""]
    for key, value in meta.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        elif isinstance(value, list):
            value = " ".join(str(v) for v in value)
        lines.append(f"* **{key}**: {value}")
    return "\n".join(lines + ["", markdown_table(rows, columns), ""])


def markdown_table(rows: list[dict], columns: Optional[list[str]] = None) -> str:
    """Rows as a GitHub-flavoured markdown table."""
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def plot_sweep(rows: list[dict], path: Path, title: Optional[str] = None) -> Path:
    """Plot images/s and peak memory against resolution, one line per model; returns ``path`` (written atomically).

    ``title`` goes above both panels (e.g. device, batch size and precision).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed_axis, memory_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for model in dict.fromkeys(row["model"] for row in rows):
        points = [row for row in rows if row["model"] == model and row.get("infer_samples_per_sec")]
        if not points:
            continue
        sizes = [row["infer_img_size"] for row in points]
        label = points[0].get("label", model)
        speed_axis.plot(sizes, [row["infer_samples_per_sec"] for row in points], marker="o", label=label)
        memory_axis.plot(sizes, [row["infer_peak_mem_mb"] for row in points], marker="o", label=label)
    speed_axis.set(xlabel="resolution (px)", ylabel="images/s", yscale="log", title="Inference throughput")
    memory_axis.set(xlabel="resolution (px)", ylabel="peak memory (MB)", yscale="log", title="Peak memory")
    for axis in (speed_axis, memory_axis):
        axis.grid(True, which="both", alpha=0.3)
    speed_axis.legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    with atomic_write(path) as temporary:
        figure.savefig(temporary, dpi=120, format="png")
    plt.close(figure)
    return Path(path)
