"""Readers for the official state-dict key lists copied from the specs into tests/data/."""
import re
from pathlib import Path
from typing import Optional

DATA = Path(__file__).parent / "data"


def parse_key_line(line: str) -> Optional[tuple[str, tuple[int, ...]]]:
    """(key, shape) of a ``key<TAB>(d0, d1, ...)[<TAB>...]`` line; None for blank and ``#`` comment lines."""
    if not line or line.startswith("#"):
        return None
    key, shape = line.split("\t")[:2]
    return key, tuple(int(d) for d in re.findall(r"\d+", shape))


def read_key_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape for every entry of ``tests/data/<name>``."""
    entries = (parse_key_line(line) for line in (DATA / name).read_text().splitlines())
    return dict(entry for entry in entries if entry is not None)
