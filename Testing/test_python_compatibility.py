"""The numeric cores stay importable on Python 3.9 (Slicer 5.6 and 5.8 ship 3.9.10).

The static check runs on any Python: annotations that Python evaluates (dataclass fields,
function signatures) must not use ``X | Y`` unless the file has ``from __future__ import
annotations`` (that the code parses as Python 3.9 is a structure check, ``structure_checks.py``).
CI also runs this file under Python 3.9, where the import test imports every module for real
(modules that need torch are covered by the static check when torch is not installed).
"""

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"FetalAnnotateLib": ROOT / "FetalAnnotate" / "FetalAnnotateLib",
            "FetalInpaintLib": ROOT / "FetalInpaint" / "FetalInpaintLib"}
SOURCES = sorted(path for folder in ("FetalAnnotate", "FetalInpaint") for path in (ROOT / folder).rglob("*.py"))


def _evaluated_annotations(tree):
    """Annotations Python evaluates at run time: function signatures and class / module variables."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            for argument in arguments.posonlyargs + arguments.args + arguments.kwonlyargs + [arguments.vararg,
                                                                                              arguments.kwarg]:
                if argument is not None and argument.annotation is not None:
                    yield argument.annotation
            if node.returns is not None:
                yield node.returns
        elif isinstance(node, (ast.ClassDef, ast.Module)):
            for statement in node.body:
                if isinstance(statement, ast.AnnAssign):
                    yield statement.annotation


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_evaluated_annotations_work_on_python_3_9(path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    postponed = any(isinstance(node, ast.ImportFrom) and node.module == "__future__"
                    and any(alias.name == "annotations" for alias in node.names) for node in tree.body)
    if postponed:
        return
    unions = [f"line {annotation.lineno}: {ast.unparse(annotation)}" for annotation in _evaluated_annotations(tree)
              if any(isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) for node in ast.walk(annotation))]
    assert unions == [], "X | Y in an evaluated annotation fails on Python 3.9; use typing.Optional / Union"


def _modules():
    for package, folder in PACKAGES.items():
        yield package
        for info in pkgutil.iter_modules([str(folder)]):
            yield f"{package}.{info.name}"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_every_module_of_the_numeric_cores_imports(module):
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != "torch":
            raise
        pytest.skip(f"{module} needs torch, which is not installed (Python {sys.version.split()[0]})")
