"""The shared install helper's plain-Python part: reading requirement files, finding what is missing.

The install dialogs need the Slicer application; what they install is decided here.
"""

import importlib.metadata
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement

from FetalAnnotateDependencies import (
    DependencyStatus,
    ensureRequirements,
    missingRequirements,
    readRequirements,
    writeNumpyConstraint,
)

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENT_FILES = sorted(ROOT.glob("Fetal*/Resources/*-requirements.txt"))


def test_each_module_has_a_requirements_file():
    assert [path.relative_to(ROOT).as_posix() for path in REQUIREMENT_FILES] == [
        "FetalAnnotate/Resources/FetalAnnotate-requirements.txt",
        "FetalInpaint/Resources/FetalInpaint-requirements.txt",
    ]


@pytest.mark.parametrize("path", REQUIREMENT_FILES, ids=lambda path: path.name)
def test_module_requirement_files_are_read(path):
    requirements = readRequirements(path)
    assert requirements and "scikit-learn>=1.3" in requirements
    assert not any(line.startswith("#") for line in requirements)


def test_comments_blank_lines_and_options_are_skipped(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("# a comment\n\n--index-url https://example.org/simple\nnumpy>=1.20  # why\n"
                    "scikit-image >= 0.21\n-r other.txt\nfoo; python_version < '3'\n", encoding="utf-8")
    assert readRequirements(path) == ["numpy>=1.20", "scikit-image>=0.21", 'foo; python_version < "3"']


def test_invalid_line_is_refused(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("numpy>=1.20\nscikit learn\n", encoding="utf-8")
    with pytest.raises(InvalidRequirement):
        readRequirements(path)


def test_missing_requirements_checks_versions_not_only_names():
    numpy = importlib.metadata.version("numpy")
    assert missingRequirements([f"numpy>={numpy}", "numpy>=999", "fetalannotate-no-such-package>=1"]) == [
        "numpy>=999", "fetalannotate-no-such-package>=1"]


def test_requirement_excluded_by_its_marker_is_not_missing():
    assert missingRequirements(["fetalannotate-no-such-package; python_version < '3'"]) == []


def test_satisfied_requirements_need_no_installer(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text(f"numpy>={importlib.metadata.version('numpy')}\n", encoding="utf-8")
    assert ensureRequirements(path, requester="test") == DependencyStatus(True)


def test_numpy_constraint_pins_the_installed_numpy(tmp_path):
    # pip is given it with every installation, so that Slicer's own numpy is never replaced.
    path = writeNumpyConstraint(str(tmp_path))
    assert readRequirements(path) == [f"numpy=={importlib.metadata.version('numpy')}"]


def test_engine_requirements_include_numba():
    assert any(line.startswith("numba") for line in readRequirements(ROOT / "FetalAnnotate" / "Resources"
                                                                    / "FetalAnnotate-requirements.txt"))
