"""Run a computation under several torch thread counts (the native kernels' results must not depend on them)."""
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def results_per_thread_count(compute: Callable[[], T], counts: tuple[int, ...] = (1, 2, 3)) -> list[T]:
    """``compute()`` once with each torch thread count in ``counts``; the previous count is restored afterwards."""
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in counts:
            torch.set_num_threads(threads)
            results.append(compute())
        return results
    finally:
        torch.set_num_threads(previous)
