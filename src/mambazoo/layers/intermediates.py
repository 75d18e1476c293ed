"""Which blocks or stages ``forward_intermediates`` returns: one rule for every family."""
from typing import Optional, Sequence, Union

__all__ = ["resolve_indices"]


def resolve_indices(count: int, indices: Optional[Union[int, Sequence[int]]],
                 default: Optional[Sequence[int]] = None) -> tuple[list[int], int]:
    """Absolute, sorted, distinct indices among ``count`` blocks (or stages), and the largest of them.

    Args:
        count: How many blocks there are.
        indices: None (``default``, or all blocks), an int n (the last n) or a sequence of indices (negative ones
            count from the end).
        default: The indices that None stands for (e.g. PlainMamba's quarter points); None means every block.

    Raises:
        ValueError: A count outside 1..count, an empty sequence or an index out of range, named in the message.
    """
    if indices is None:
        indices = list(range(count)) if default is None else list(default)
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise ValueError(f"indices as a count must be in 1..{count}, got {indices}")
        indices = list(range(count - indices, count))
    if not indices or any(not -count <= index < count for index in indices):
        raise ValueError(f"indices must be a non-empty sequence of indices in -{count}..{count - 1}, got {indices}")
    taken = sorted({index % count for index in indices})
    return taken, taken[-1]
