"""Readers for the official state-dict key lists kept in tests/data/ (dumped from the official model classes)."""
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


def read_mambaout_sections(name: str = "keys_mambaout_femto.txt") -> tuple[list, list]:
    """(official entries, timm entries) of a MambaOut key list, each a list of (key, shape) in file order."""
    official, timm_names, current = [], [], None
    for line in (DATA / name).read_text().splitlines():
        if line.startswith("# key"):
            current = official
        elif line.startswith("# timm"):
            current = timm_names
        elif (entry := parse_key_line(line)) is not None and current is not None:
            current.append(entry)
    return official, timm_names
