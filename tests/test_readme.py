"""Every ```python block of README.md and docs/*.md runs as written; every `mambazoo ...` command line parses
(``mambazoo train``/``validate`` and ``torchrun -m mambazoo.train`` lines with the training parsers, a dense task's
flags after ``validate --task`` with that task's).

A block that needs a download is preceded by an HTML comment the reader does not see::

    <!-- readme-test
    replace: TEXT => REPLACEMENT        (applied to the block's source; REPLACEMENT may use WEIGHTS["name"])
    check: EXPRESSION                   (evaluated in the block's namespace afterwards, must be true)
    skip: REASON                        (the block is not run; the reason is reported)
    -->

``WEIGHTS["format:model"]`` is the path of a local stand-in for a downloaded file, written on first use: random weights
of ``model`` in an official file format (``vim-training-checkpoint``, ``mmcls``, ``mambaout-release``,
``timm-training-checkpoint``, ``hf-safetensors``, ``spatialmamba-training-checkpoint``), a plain
``safetensors`` state dict, or ``pt2``, a ``torch.export`` program.
"""
import argparse
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import timm
import torch

from mambazoo import cli
from mambazoo.checkpoint import save_state_dict
from official_keys import read_mambaout_sections

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"(?:<!--\s*readme-test\s*\n(?P<directives>.*?)-->\s*\n)?```(?P<lang>\w+)\n(?P<code>.*?)```",
                    re.S)


@dataclass
class Snippet:
    document: str
    index: int
    code: str
    replacements: list[tuple[str, str]] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    skip: Optional[str] = None

    @property
    def name(self) -> str:
        return f"{self.document}#{self.index}"


def _snippets(language: str) -> list[Snippet]:
    snippets = []
    for document in DOCUMENTS:
        blocks = [m for m in _BLOCK.finditer(document.read_text()) if m.group("lang") == language]
        for index, match in enumerate(blocks):
            snippet = Snippet(str(document.relative_to(ROOT)), index, match.group("code"))
            for line in (match.group("directives") or "").splitlines():
                kind, _, value = line.strip().partition(": ")
                if kind == "replace":
                    old, new = value.split(" => ")
                    snippet.replacements.append((old, new))
                elif kind == "check":
                    snippet.checks.append(value)
                elif kind == "skip":
                    snippet.skip = value
                elif kind:
                    raise ValueError(f"unknown readme-test directive {line!r} in {snippet.name}")
            snippets.append(snippet)
    return snippets


class TrainingConfig(dict):
    """A pickled config object of a kind ``weights_only`` loading refuses (as the yacs ``CfgNode`` upstream saves)."""


class LocalWeights(dict):
    """Stand-in files for downloads, created on first use in one folder."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def __missing__(self, key: str) -> str:
        file_format, name = key.split(":")
        torch.manual_seed(0)
        path = self.folder / f"{name}.{file_format}"
        if file_format == "mambaout-release":  # official key names, from the official key list
            official, _ = read_mambaout_sections(f"keys_{name}.txt")
            torch.save({key: torch.randn(shape) for key, shape in official}, path)
            self[key] = str(path)
            return self[key]
        model = timm.create_model(name).eval()
        state = model.state_dict()
        if file_format == "vim-training-checkpoint":  # what hustvl/Vim publishes
            torch.save({"model": state, "model_ema": state, "args": argparse.Namespace(model=name)}, path)
        elif file_format == "mmcls":  # what ChenhongyiYang/PlainMamba publishes
            torch.save({"state_dict": {("head.fc." + k[5:] if k.startswith("head.") else "backbone." + k): v
                                       for k, v in state.items()}}, path)
        elif file_format == "timm-training-checkpoint":  # what NVIDIA publishes as mambavision_*.pth.tar
            torch.save({"epoch": 310, "state_dict": state, "args": argparse.Namespace(model=name)}, path)
        elif file_format == "hf-safetensors":  # the Hugging Face wrapper keeps the network as attribute `model`
            save_state_dict({f"model.{k}": v for k, v in state.items()}, path.with_suffix(".safetensors"))
            path = path.with_suffix(".safetensors")
        elif file_format == "spatialmamba-training-checkpoint":  # what EdwardChasel/Spatial-Mamba publishes
            torch.save({"model": state, "model_ema": state, "epoch": 300, "config": TrainingConfig(MODEL=dict(TYPE=name))},
                       path)
        elif file_format == "safetensors":
            save_state_dict(state, path)
        elif file_format == "pt2":
            torch.export.save(torch.export.export(model, (torch.randn(2, 3, 224, 224),)), path)
        else:
            raise ValueError(f"unknown stand-in format {file_format!r}")
        self[key] = str(path)
        return self[key]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> LocalWeights:
    return LocalWeights(tmp_path_factory.mktemp("weights"))


@pytest.mark.parametrize("snippet", _snippets("python"), ids=lambda s: s.name)
def test_python_snippet_runs(snippet: Snippet, weights: LocalWeights, tmp_path: Path, monkeypatch) -> None:
    if snippet.skip:
        pytest.skip(f"{snippet.name}: {snippet.skip}")
    code = snippet.code
    for old, new in snippet.replacements:
        assert old in code, f"{snippet.name}: replace target {old!r} not found"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)  # files a snippet writes land in the test's folder
    namespace = {"__name__": "__readme__", "WEIGHTS": weights}
    exec(compile(code, snippet.name, "exec"), namespace)
    for check in snippet.checks:
        assert eval(check, namespace), f"{snippet.name}: {check}"


def _command_lines() -> list[tuple[str, str]]:
    lines = []
    for snippet in _snippets("bash"):
        for line in snippet.code.replace("\\\n", " ").splitlines():  # join continued lines
            command = line.split("#")[0].strip()
            if command.startswith(("mambazoo ", "python -m mambazoo ", "python -m mambazoo.train ",
                                   "python -m mambazoo.validate ")) or " -m mambazoo.train " in command:
                lines.append((snippet.name, command))
    return lines


def _parse(words: list[str]) -> None:
    """Parse a documented command line with the parser that would run it (training flags have their own)."""
    from mambazoo.training.config import parse_train_args
    from mambazoo.training.evaluation import build_validate_parser
    from mambazoo.training.tasks import get_task

    if words[0] in ("python", "torchrun"):  # python -m mambazoo[.train|.validate] ..., torchrun ... -m ...
        module = words[words.index("-m") + 1]
        words = ["mambazoo", *([module.split(".")[1]] if "." in module else []), *words[words.index("-m") + 2:]]
    command, arguments = (words[1], words[2:]) if len(words) > 1 else (None, [])
    if command == "train":
        parse_train_args(arguments)
    elif command == "validate":  # another task's flags come with its --task
        task = build_validate_parser().parse_known_args(arguments)[0].task
        build_validate_parser(task=get_task(task) if task else None).parse_args(arguments)
    else:
        cli._parser().parse_args(words[1:])


@pytest.mark.parametrize("where, command", _command_lines(), ids=[c for _, c in _command_lines()])
def test_documented_command_lines_parse(where: str, command: str) -> None:
    try:
        _parse(shlex.split(command))
    except SystemExit as error:
        pytest.fail(f"{where}: `{command}` does not parse (exit {error.code})")


def test_every_document_has_snippets_found() -> None:
    names = {s.document for s in _snippets("python")}
    assert "README.md" in names and "docs/export.md" in names
